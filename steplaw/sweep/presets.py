"""Named sweep specs. `demo`: the tiny CPU sweep behind `steplaw demo` / `make demo`.

The demo must finish in under 3 minutes on 2 CPU cores: 108 runs (3 model sizes x 3
token budgets x 4 LRs x 3 batch sizes; three of each so that both exponents of the LR law
can be fitted) at about 1-2 s of one core each. So its models are tiny (27K, 56K and 107K
non-embedding parameters, 2 layers, byte-level vocabulary) and its budgets 32K..128K
tokens of the embedded corpus, 64-token sequences.

Every cell gets the same absolute grid (`DEMO_LRS` x `DEMO_BATCH_SIZES`) rather than one
centred on the Step Law's prediction for that cell. A per-cell centred grid this coarse
puts each cell's optimum at the same grid index, and the fitted exponents then merely
echo the law that placed the grid; a shared grid lets the data alone move the optimum.
The LRs bracket what these models prefer (a scan of the 56K model on 64K tokens put the
best LR near 0.004, about 1/5 of the Step Law's 0.022: the law was fitted on far larger
models). These models keep improving with more steps, so expect batch optima at or near
the small-batch edge; the report flags such cells.
"""
from __future__ import annotations

from steplaw.errors import UserError
from steplaw.sweep.spec import ModelSpec, SweepSpec

DEMO_LRS = [0.0015, 0.003, 0.006, 0.012]
DEMO_BATCH_SIZES = [128, 256, 512]  # tokens: 2, 4 and 8 sequences of 64


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
            lrs=DEMO_LRS,
            batch_sizes=DEMO_BATCH_SIZES,
            min_steps=32,
            fixed=fixed,
        )
    if scale == "small":
        return SweepSpec(
            models=[ModelSpec(shape=s) for s in shapes],
            tokens=[4096, 8192, 16384],
            lrs=DEMO_LRS[1:3],
            batch_sizes=[128, 256], min_steps=16,
            fixed={**fixed, "eval_tokens": 1024},
        )
    raise UserError(f"demo scale {scale!r}: expected 'full' or 'small'")


PRESETS = {"demo": demo_spec}
