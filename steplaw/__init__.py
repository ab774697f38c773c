"""steplaw: the learning rate and batch size to pretrain a language model with.

Predict them from published hyperparameter scaling laws (`steplaw.laws`), measure them
with sweeps of small dense and MoE models on fused kernels (`steplaw.sweep`), and fit
your own laws from those sweeps or any table of runs (`steplaw.laws.fit`).

Importing this package does not import torch; `steplaw.ops`, `steplaw.optim`,
`steplaw.models` and `steplaw.train` do.

Import direction
----------------
Imports run one way: the kernels' Python face (ops) is used by the optimizer and the
models, those by one training run (train), which steplaw's own trainer (trainers) wraps;
the sweep (sweep) knows trainers only through the trial contract (steplaw.trial) and the
run record (steplaw.result), handed a trainer object by the commands; the scaling laws
(laws) depend on no training code, so a table of runs from anywhere can be fitted without
torch; the report and the commands (steplaw/cli/, every `steplaw ...` command and entry
point) sit on top. A layer imports only the layers above it in this table, never one
below it, not even inside a function, and no module falls back to something else when
one of steplaw's own modules fails to import (that would hide broken code). Within a
package, modules do not import each other in a cycle. This table is the one statement of
the rule; tests/test_imports.py reads it and checks every import of every module against
it, and that each row names only layers above it:

    layer     may import (besides its own modules and the neutral ones)
    ops       nothing
    optim     ops
    models    ops
    data      nothing
    laws      nothing
    train     ops optim models data
    trainers  ops optim models data train
    sweep     ops optim models data laws
    report    ops optim models data train laws sweep
    cli       everything

    neutral:  errors units runtable progress fileio trial result
    cli:      __main__

A layer is a subpackage (steplaw.<layer>.*), with no exceptions: a command module lives
in steplaw/cli/, not in the package it serves. The neutral modules (steplaw.<name>, plain
data and helpers: errors, units, the run-table columns, progress lines, atomic file
writes, the trial contract, the run record) import nothing but each other, and any module may import them, as it may this
package's `__version__`. The `cli:` line names the top-level modules that belong to the
cli layer (steplaw.__main__, for `python -m steplaw`).
"""

__version__ = "0.1.0"
