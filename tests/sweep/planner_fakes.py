"""A fast stand-in training run whose loss is a known landscape, for the planner tests.

landscape_run(config, run_dir=None) follows the real contract (RunConfig -> RunResult).
Its loss is a convex bowl in (ln lr, ln B), tilted (the optimal LR grows with the batch),
around lr* = 0.02 (d_model/32)^-1 (D/65536)^0.3 and B* = 512 (D/65536)^0.5 tokens;
LRs above 8 lr* diverge. LANDSCAPE_LOG / LANDSCAPE_SLEEP as SWEEP_FAKE_LOG / _SLEEP in
sweep_fakes.
"""
import math
import os
import time

from steplaw.train.config import RunResult


def optimum(d_model: int, tokens: int, lr_scale: float = 1.0, bs_scale: float = 1.0):
    return (0.02 * lr_scale * (d_model / 32) ** -1 * (tokens / 65536) ** 0.3,
            512 * bs_scale * (tokens / 65536) ** 0.5)


def landscape_loss(lr, batch_tokens, d_model, tokens, lr_scale=1.0, bs_scale=1.0):
    lr_star, bs_star = optimum(d_model, tokens, lr_scale, bs_scale)
    x_b = math.log(batch_tokens / bs_star)
    x_lr = math.log(lr / lr_star) - 0.3 * x_b
    if x_lr > math.log(8):
        return None
    base = 2.0 + 10 / d_model + 200 / tokens**0.5
    return base + (0.03 if x_lr > 0 else 0.02) * x_lr**2 + 0.01 * x_b**2


def landscape_run(config, run_dir=None):
    time.sleep(float(os.environ.get("LANDSCAPE_SLEEP", "0")))
    lr_scale = float(os.environ.get("LANDSCAPE_LR_SCALE", "1"))
    loss = landscape_loss(config.lr, config.batch_tokens, config.model.d_model, config.tokens, lr_scale)
    run_id = config.run_id()
    log = os.environ.get("LANDSCAPE_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{run_id} {os.environ.get('LANDSCAPE_GENERATION', '0')}\n")
    if loss is None:
        return RunResult(status="diverged", reason="loss is nan", run_id=run_id)
    return RunResult(status="ok", final_train_loss=loss, tokens=config.tokens, run_id=run_id, wall_s=0.0)
