"""A large sweep of instant fake runs through the real driver and store, as a script that
tests kill -9 at random moments:  python scale_sweep.py OUT RUNS LOG GENERATION

Each execution appends "d_model tokens lr batch_tokens generation" to LOG (unbuffered,
one write per line), so a test can see which runs each driver generation executed.
"""
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from steplaw.models.config import ModelConfig
from steplaw.sweep.driver import run_sweep
from steplaw.sweep.executors import InlineExecutor
from steplaw.train.config import RunConfig, RunResult
from steplaw.trainers.steplaw import SteplawTrainer

_LOG = None


def grid(total: int) -> list[RunConfig]:
    """`total` runs (rounded to whole cells of 10 LRs x 10 batch sizes)."""
    cells = max(1, total // 100)
    models = [ModelConfig(d_model=16 * (1 + i % 50), n_layers=1, n_heads=2, d_ff=32, max_seq_len=64) for i in range(cells)]
    return [RunConfig(model=m, tokens=2**20 * (1 + i // 50), lr=1e-4 * 1.5**k, batch_tokens=64 * 2**b, seq_len=64)
            for i, m in enumerate(models) for k in range(10) for b in range(10)]


def expected_loss(config: RunConfig) -> float:
    return 2.0 + math.log(config.lr / 1e-3) ** 2 / 10 + config.batch_tokens / 2**20 + config.model.d_model / 1e4


def fast_run(config: RunConfig, run_dir=None) -> RunResult:
    os.write(_LOG, f"{config.model.d_model} {config.tokens} {config.lr!r} {config.batch_tokens} {GENERATION}\n".encode())
    loss = expected_loss(config)
    return RunResult(status="ok", final_train_loss=loss, curve=[(0, 6.0), (config.tokens, loss)], tokens=config.tokens)


if __name__ == "__main__":
    out, runs, log, GENERATION = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    _LOG = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    summary = run_sweep(grid(runs), out, lambda: InlineExecutor(fast_run, capacity=128, run_dirs=False), progress=False,
                        trainer=SteplawTrainer())
    print(summary.line())
