"""Named sweep specs. `demo`: the CPU sweep behind `steplaw demo` / `make demo`.

What the demo shows. Nine cells (3 model sizes x 3 token budgets, so that both
exponents of the LR law can be fitted), each searched by the adaptive planner
(steplaw.sweep.planner) until its optimum is bracketed in LR and in batch size; then the
Step Law's method fits lr(N, D) and B(D) to those runs, with bootstrap intervals and
leave-one-cell-out validation, beside the published Step Law.

Its design is forced by the CPU budget (150 s on 2 cores) and by three facts.
  * A batch optimum needs room below it: at these budgets tiny models want batches of a
    few sequences, so sequences are short (8 tokens) and the smallest batch (one
    sequence) lies below the optimum (2-16 sequences).
  * The loss it minimises is the validation loss on 4096 held-out tokens (objective
    val_loss), not the smoothed training loss: at batches of 16-128 tokens the training
    loss's last ~10 steps see a few hundred tokens, different ones at each batch size,
    and where it ranked batch sizes differently from the validation loss its pick was up
    to 2.5% worse on the validation loss; on the same runs, fitting it gave a
    leave-one-cell-out loss gap of 1.7%, the validation loss 0.25%.
  * The D exponent needs a wide lever: budgets span 9x (16K, 48K, 144K tokens; the old
    32K-128K gave an interval 0.6-0.8 wide), for fewer tokens in all than before.
A step costs about the same whatever the width at these sizes (per-step overhead
dominates), so the models span 16x in non-embedding parameters (d_model 16, 32, 64) at
little extra cost, and the runs of one batch size train as one stack (steplaw.train.stacked).

Measured (2026-12-05, 2 quiet cores, bench/results/demo_2026-12-05_cpu-2core_layers.json):
114 runs, 121 s for sweep, fit and report (172 s with --stack off, the same runs to the same
losses, so the same law). Every cell bracketed with its best run inside the LR and batch
range it tried (9 of 9). LR law lr = a N^alpha D^beta: alpha -0.62 [-0.70, -0.51]
(interval 0.19 wide), beta +0.26 [+0.14, +0.40] (0.25 wide); batch law B = c D^gamma,
gamma 0.94 [0.68, 0.98]; leave-one-cell-out relative loss gap 0.41% mean (Step Law 6.0%).

What it cannot show. The models are 6K-100K non-embedding parameters trained on the
embedded corpus with an 8-token context, far below the Step Law's fitted range (60M-1B
parameters): the fitted exponents describe these toy models, not LLMs, and the Step Law
column is there to show the method, not to validate the law (its LR is about 10x too
high here, which is why the planner starts from a tenth of it). At these sizes the
trained model itself is noisy: the validation loss of neighbouring LRs (a factor sqrt(2)
apart, same batch) can differ by ~1% in no smooth pattern, and the same run with its
batch split into smaller micro-batches (mathematically the same run) can end 0.3-3% apart
at high LRs (bench/results/sweep_2026-12-05_cpu-1thread_demo.json): so a cell's
near-optimal set is mostly its single best run, and the optimum is known to a factor of
sqrt(2) in LR and 2 in batch.
"""
from __future__ import annotations

from steplaw.errors import UserError
from steplaw.sweep.search import AdaptiveSettings
from steplaw.sweep.spec import ModelSpec, SweepSpec

DEMO_SEQ_LEN = 8
DEMO_LR_SCALE = 0.1  # the planner's first LR: a tenth of the Step Law's (these models prefer ~10x less)
DEMO_BATCH_SCALE = 0.4  # and 0.4x its batch size
DEMO_EVAL_TOKENS = 4096  # held-out tokens per run: the loss the demo minimises (objective val_loss)
# The planner's settings: at most 24 runs a cell (8 for the small smoke run), LR steps of
# x/÷ 4 bisected down to x/÷ sqrt(2) (the default: x/÷ 2 to x/÷ 2). On this rough landscape
# the wider first look finds the optimum at a lower cost, and the finer last step halves
# the law's intervals for ~30% more runs (see "Measured" above); the runs of one batch size
# train as one stack, so a finer LR line costs less than its run count suggests.
DEMO_PLANNER = {"full": AdaptiveSettings(cell_budget=24, lr_coarse=4.0, lr_resolution=2 ** 0.5),
                "small": AdaptiveSettings(cell_budget=8, lr_coarse=4.0)}


# `steplaw demo --schedule wsd` (issue 22): warmup-stable-decay with a 1-sqrt cooldown over
# the last 20% of each run to zero (Hägele et al. 2024, arXiv:2405.18392: 1-sqrt beats
# linear), an absolute warmup (one warmup for every budget, so runs of one model, lr and
# batch share their stable phase and branch off one trunk: steplaw.train.branch), and five
# budgets per model instead of three over the same 9x span: a trunk trains the longest
# budget and only the cooldowns of the shorter ones, (9 + 0.2 x 13) / 22 = 0.53 of
# training them alone (steplaw.sweep.cost), so the D exponent gets more lever for less.
DEMO_WSD = {"schedule": "wsd", "warmup_tokens": 1024, "decay_fraction": 0.2, "decay_shape": "sqrt",
            "min_lr_ratio": 0.0}
DEMO_WSD_TOKENS = {"full": [16384, 32768, 65536, 98304, 147456], "small": [1024, 2048, 3072, 4096]}
DEMO_WSD_SMALL_WARMUP = 128  # the small scale's warmup (its shortest budget is 1K tokens)
DEMO_SCHEDULES = ("cosine", "wsd")


def demo_spec(scale: str = "full", schedule: str = "cosine") -> SweepSpec:
    """The demo preset for the adaptive planner. scale="full": 3 model sizes x 3 budgets
    (16K, 48K and 144K tokens); "small": the same models at 1K..4K tokens and at most 8 runs a
    cell (a smoke run for the test suite: its cells may end unbracketed). schedule="wsd":
    the WSD preset (`DEMO_WSD`: five budgets per model, four at the small scale)."""
    if schedule not in DEMO_SCHEDULES:
        raise UserError(f"demo schedule {schedule!r}: expected one of {', '.join(DEMO_SCHEDULES)}")
    fixed = {
        "seq_len": DEMO_SEQ_LEN,
        "schedule": "cosine",
        "seed": 0,
        "device": "cpu",
        "eval_tokens": DEMO_EVAL_TOKENS,
    }
    if schedule == "wsd":
        fixed.update(DEMO_WSD, **({"warmup_tokens": DEMO_WSD_SMALL_WARMUP} if scale == "small" else {}))
    shapes = [
        {"d_model": d, "n_layers": 2, "n_heads": heads, "d_ff": 3 * d, "max_seq_len": DEMO_SEQ_LEN}
        for d, heads in ((16, 1), (32, 2), (64, 4))
    ]
    if scale not in ("full", "small"):
        raise UserError(f"demo scale {scale!r}: expected 'full' or 'small'")
    if schedule == "wsd":
        tokens = DEMO_WSD_TOKENS[scale]
    else:
        tokens = [16384, 49152, 147456] if scale == "full" else [1024, 2048, 4096]
    return SweepSpec(models=[ModelSpec(shape=s) for s in shapes], tokens=tokens, lr_center_scale=DEMO_LR_SCALE,
                     batch_center_scale=DEMO_BATCH_SCALE, min_steps=16, fixed=fixed, objective="val_loss")


PRESETS = {"demo": demo_spec}
