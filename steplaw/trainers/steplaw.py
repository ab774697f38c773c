"""steplaw's own trainer as an implementation of the trainer interface (steplaw.trainers):
`--trainer steplaw`, the default.

Its runs are steplaw.train's `RunConfig`s, so that the run ids of every stored sweep stay
what they were: the sweep's spec asks this trainer for the run of a grid point
(`run_of`), checks its fixed settings through it (`check_spec`, `validate`), and rebuilds
a stored run with `from_dict`. What the sweep engine gets from it:

- `__call__(config, run_dir, progress)`: one run alone (steplaw.train.run; it resumes from
  the checkpoint its run directory holds: capability "resume");
- "stack": `plan_stacks(configs, stack)` groups runs of one model shape
  (steplaw.train.stacked) and `run_group(configs, run_dirs, progress)` trains one group;
- "branch": `plan_trunks(configs)` groups WSD runs equal but in D (and lr: a stacked
  trunk) and `run_trunk(configs, trunk_dir, done, on_result, progress)` trains one trunk
  (steplaw.train.branch.train_trunk).

`run_fn` swaps the run function (a MODULE:FUNCTION name; the tests' fake trainers): a
swapped function can only run each run alone, so the trainer then declares no
capabilities. `fn`, when given, is that function already loaded in the driver: it
travels to the workers with the trainer (pickled, as a Ray test sends a module that
Ray's workers could not import by value), instead of being imported there by name.
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field

from steplaw.errors import UserError
from steplaw.train.config import RunConfig

DEFAULT_RUN_FN = "steplaw.train:run"
_RUN_FIELDS = {f.name for f in dataclasses.fields(RunConfig)} - {"model", "tokens", "lr", "batch_tokens"}


@dataclass(frozen=True)
class SteplawTrainer:
    run_fn: str = DEFAULT_RUN_FN  # MODULE:FUNCTION of config, run_dir=, [progress=] -> RunResult
    fn: object = field(default=None, compare=False, repr=False)  # run_fn, loaded (see the module doc)
    name = "steplaw"

    @property
    def capabilities(self) -> tuple[str, ...]:
        return ("stack", "branch", "resume") if self.run_fn == DEFAULT_RUN_FN else ()

    @classmethod
    def swapped(cls, run_fn: str) -> SteplawTrainer:
        """The trainer with run function `run_fn` loaded here (UserError when it cannot be)."""
        trainer = cls(run_fn=run_fn)
        return cls(run_fn=run_fn, fn=trainer._function())

    def _function(self):
        if self.fn is not None:
            return self.fn
        if self.run_fn == DEFAULT_RUN_FN:
            from steplaw.train.runner import run

            return run
        from steplaw.trainers.python import load_function

        return load_function(self.run_fn, "--run-fn", "MODULE:FUNCTION, e.g. steplaw.train:run")

    def check(self) -> None:
        """UserError when `run_fn` cannot be loaded (before anything runs)."""
        self._function()

    # -- the sweep engine's side ------------------------------------------------------

    def __call__(self, config: RunConfig, run_dir: str | None = None, progress=None):
        fn = self._function()
        if progress is not None and "progress" in _parameters(fn):
            return fn(config, run_dir=run_dir, progress=progress)
        return fn(config, run_dir=run_dir)

    @property
    def stack_window(self) -> int:
        """The most runs an "auto" stack may hold on any device (the driver's queue window)."""
        from steplaw.train.stacked import AUTO_STACK_LIMIT

        return max(AUTO_STACK_LIMIT.values())

    def plan_stacks(self, configs: list[RunConfig], stack) -> list[list[RunConfig]]:
        from steplaw.train.stacked import plan_stacks

        return plan_stacks(configs, stack)

    def run_group(self, configs: list[RunConfig], run_dirs=None, progress=None):
        from steplaw.train.stacked import run_group

        return run_group(configs, run_dirs=run_dirs, progress=progress)

    def plan_trunks(self, configs: list[RunConfig], stack: bool = True) -> list[list[RunConfig]]:
        from steplaw.train.trunk import plan_trunks

        return plan_trunks(configs, stack=stack)

    def check_trunks(self, configs: list[RunConfig], explicit: bool = False) -> str | None:
        """Check the trunks `configs` form (UserError, one sentence: a branch point inside
        the warmup, ...); with `explicit` (--branch given) also refuse a WSD run that cannot
        branch (a warmup left to a fraction of D, a decay fraction of 1). Returns a note to
        show once when some WSD runs will train alone, else None."""
        from steplaw.train.trunk import branch_points, branches, plan_trunks

        wsd = [c for c in configs if c.schedule == "wsd"]
        if explicit:
            for config in wsd:
                if not branches(config):
                    branch_points([config])  # raises check_branching's sentence
        for group in plan_trunks(configs, stack=True):
            by_lr: dict[float, list[RunConfig]] = {}
            for config in group:  # a stacked trunk: one trunk per lr, trained together
                by_lr.setdefault(config.lr, []).append(config)
            for members in by_lr.values():
                if len(members) > 1:
                    branch_points(members)
        alone = [c for c in wsd if not branches(c)]
        if alone:
            return (f"{len(alone)} WSD run(s) train alone: a shared trunk needs warmup_tokens set (not a fraction of D) "
                    "and a decay_fraction below 1 (e.g. --set warmup_tokens=4096)")
        return None

    def run_trunk(self, configs: list[RunConfig], trunk_dir: str, done: set[str], on_result, progress=None) -> None:
        from steplaw.train.branch import train_trunk

        train_trunk(configs, trunk_dir, done=done, on_result=lambda config, result: on_result(config.run_id(), result),
                    progress=progress)

    def from_dict(self, data: dict) -> RunConfig:
        return RunConfig.from_dict(data)

    def counts(self, config: RunConfig) -> dict:
        from steplaw.models.accounting import param_counts

        counts = param_counts(config.model)
        return {"non_embedding": counts.non_embedding, "active": counts.active, "total": counts.total}

    # -- the spec's side: a grid point as a RunConfig -----------------------------------

    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig) if f.name in ("seq_len", "eval_tokens")}

    def check_spec(self, spec) -> None:
        """The spec's fixed settings as RunConfig fields (one sentence for the first wrong one)."""
        unknown = set(spec.fixed) - _RUN_FIELDS
        if unknown:
            raise UserError(f"fixed setting {sorted(unknown)[0]!r} is not a RunConfig field: expected one of "
                            f"{sorted(_RUN_FIELDS)}")
        eval_tokens = spec.fixed.get("eval_tokens", self.defaults["eval_tokens"])
        if spec.objective == "val_loss" and eval_tokens == 0:
            raise UserError("objective val_loss with eval_tokens=0: the runs would measure no validation loss; "
                            "expected eval_tokens above 0 (e.g. --set eval_tokens=4096) or objective loss")

    def run_of(self, cell, lr: float, batch_tokens: int, fixed: dict) -> RunConfig:
        return RunConfig(model=cell.model, tokens=cell.tokens, lr=lr, batch_tokens=batch_tokens, **fixed)

    def validate(self, configs: list[RunConfig], local: bool = True) -> None:
        """RunConfig.validate() of every run, with `local` also the device and the data
        directory (once per distinct pair) and the vocabulary against the data's tokens."""
        machine_checked: set = set()
        vocab_checked: set = set()
        for config in configs:
            where = (repr(config.device), repr(config.data))
            on_this_machine = local and where not in machine_checked
            config.validate(on_this_machine=on_this_machine)
            if on_this_machine:
                machine_checked.add(where)
            if local and config.data is not None and (config.data, config.model.vocab_size) not in vocab_checked:
                from steplaw.data.tokens import load_token_data

                load_token_data(config.data).check_model_vocab(config.model.vocab_size)
                vocab_checked.add((config.data, config.model.vocab_size))


def _parameters(fn) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()
