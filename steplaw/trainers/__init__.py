"""Trainers: the implementations of the trial contract (steplaw.trial) a sweep can use.

    steplaw      steplaw's own trainer (steplaw.train): RunConfigs, stacks, resume
    python       --trainer MODULE:FUNCTION: function(trial, report) -> result
    hf           --trainer hf (steplaw[hf]): a Hugging Face transformers causal LM
    command      --trainer-cmd 'TEMPLATE': one process per run, result.json out

Each is a picklable callable `trainer(config, run_dir=..., progress=...)` the sweep's
executors run like any run function, with `capabilities` (a subset of CAPABILITIES) that
say what the engine may use: only a trainer that can "stack" gets groups of runs, and a
run directory left by an unfinished attempt is kept only for one that can "resume"
(else it is cleared before the next attempt).
"""
CAPABILITIES = ("stack", "branch", "resume")
