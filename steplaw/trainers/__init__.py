"""Trainers: the implementations of the trial contract (steplaw.trial) a sweep can use.

    steplaw      steplaw's own trainer (steplaw.train): RunConfigs, stacks, trunks, resume
    python       --trainer MODULE:FUNCTION: function(trial, report) -> result
    hf           --trainer hf (steplaw[hf]): a Hugging Face transformers causal LM
    command      --trainer-cmd 'TEMPLATE': one process per run, result.json out

Each is a picklable callable `trainer(config, run_dir=..., progress=...)` the sweep's
executors run like any run function, with `capabilities` (a subset of CAPABILITIES) that
say what the engine may use: only a trainer that can "stack" gets groups of runs, and a
run directory left by an unfinished attempt is kept only for one that can "resume"
(else it is cleared before the next attempt).

The command line (steplaw.cli.sweep.make_trainer) chooses the trainer and hands it to the
sweep; the sweep imports no trainer. What the engine calls, by capability:

- always: `name`, `capabilities`, `__call__(config, run_dir=None, progress=None)`;
  optional `from_dict(config dict)` (rebuild a stored run of its own kind) and
  `counts(config)` (the run table's parameter counts) for runs that are not trials;
- "stack": `plan_stacks(configs, stack)` and `run_group(configs, run_dirs, progress)`;
- "branch": `run_trunk(configs, trunk_dir, done, on_result, progress=None)`: one trunk of
  WSD runs equal but in D (steplaw's: and lr, a stacked trunk); `on_result(run_id,
  result)` once per finished branch, as it finishes, with `trunk` and `tokens_trained`;
  runs in `done` are never trained again; called again with the same trunk_dir after a
  kill, it resumes from the last durable checkpoint. Optional `plan_trunks(configs)`
  (else the sweep groups trials equal but in D).
"""
CAPABILITIES = ("stack", "branch", "resume")
