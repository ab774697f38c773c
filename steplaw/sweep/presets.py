"""Named sweep specs. `demo`: the tiny CPU sweep behind `steplaw demo` / `make demo`.

The demo must finish in under 3 minutes on 2 CPU cores: 108 runs (3 model sizes x 3
token budgets x 4 LRs x 3 batch sizes; three of each so that both exponents of the LR law
can be fitted) at about 1-2 s of one core each. So its models are tiny (27K, 56K and 107K
non-embedding parameters, 2 layers, byte-level vocabulary) and its budgets 32K..128K
tokens of the embedded corpus, 64-token sequences.

Models this small, trained this briefly, prefer smaller learning rates than the Step
Law predicts for them (the law was fitted on far larger models and budgets): a scan of the
56K model on 64K tokens put the best LR near 0.004, about 1/5 of the law's 0.022. So the
demo centres its LR grid at `DEMO_LR_SCALE` x the Step Law and spans x/÷ 4 around it
(4 points, a factor 2.5 apart). The batch grid is the law's, 3 powers of two (x/÷ 2):
these models keep improving with more steps, so expect optima at the small-batch edge;
the report flags such cells.
"""
from __future__ import annotations

from steplaw.errors import UserError
from steplaw.sweep.spec import ModelSpec, SweepSpec

DEMO_LR_SCALE = 0.25


def demo_spec(scale: str = "full") -> SweepSpec:
    """The demo preset. scale="full": 3 model sizes x 3 budgets x 4 LRs x 3 batch sizes
    (108 runs); "small": 3 x 3 x 2 x 2 at an eighth of the tokens (36 runs, for the
    test suite: still enough distinct N and D to fit both laws)."""
    fixed = {
        "seq_len": 64,
        "schedule": "cosine",
        "seed": 0,
        "device": "cpu",
        "eval_tokens": 4096,
    }
    shapes = [
        {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 96, "max_seq_len": 64},
        {"d_model": 48, "n_layers": 2, "n_heads": 4, "d_ff": 128, "max_seq_len": 64},
        {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 192, "max_seq_len": 64},
    ]
    if scale == "full":
        return SweepSpec(
            models=[ModelSpec(shape=s) for s in shapes],
            tokens=[32768, 65536, 131072],
            lr_points=4, lr_span=4.0, lr_center_scale=DEMO_LR_SCALE,
            batch_points=3, min_steps=32,
            fixed=fixed,
        )
    if scale == "small":
        return SweepSpec(
            models=[ModelSpec(shape=s) for s in shapes],
            tokens=[4096, 8192, 16384],
            lr_points=2, lr_span=2.0, lr_center_scale=DEMO_LR_SCALE,
            batch_sizes=[128, 256], min_steps=16,
            fixed={**fixed, "eval_tokens": 1024},
        )
    raise UserError(f"demo scale {scale!r}: expected 'full' or 'small'")


PRESETS = {"demo": demo_spec}
