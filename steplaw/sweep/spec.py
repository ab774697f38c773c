"""What a sweep runs: model sizes x token budgets x (peak LR x batch size) per cell.

A `SweepSpec` expands into runs: steplaw's own trainer's `RunConfig`s, built by the
trainer the spec is bound to (`SweepSpec.bind`; the sweep knows no RunConfig), or trials
(steplaw.trial) for any other trainer. Each (N, D) *cell* gets its own grid:

- Learning rates: `lr_points` values, log-spaced from centre/`lr_span` to
  centre*`lr_span` (default 5 points over x/÷ 4: a 16x range, ratio 2 between points).
- Batch sizes in tokens: `batch_points` powers of two around the centre rounded to a power
  of two (default 5 points, ratio 2: x/÷ 4), shifted up whole when the smallest would be
  below one sequence and down when the largest would leave fewer than `min_steps`
  optimizer steps.

The centre is the Step Law prediction for the cell (eta = 1.79 N^-0.713 D^0.307,
B = 0.58 D^0.571 tokens; N = non-embedding parameters, activated ones for MoE), scaled by
`lr_center_scale` / `batch_center_scale`, unless `lrs` / `batch_sizes` give explicit
values. The paper reports optima within about 2x of the law on its own models, so x/÷ 4
brackets them there; tiny models on a tiny corpus can sit further away, which the report
flags as optima on the grid edge.

Run ids are the run's `run_id()`: a hash of the full config, so a changed setting is a
new run and an unchanged one is found again in the store.

Checks: a spec (file, dict or flags) with a wrong type, an unknown key or an impossible
value is a UserError naming it (counts may be text, "1M" or YAML's 1e6, read by
steplaw.units.parse_count as the CLI reads them; N and D at most 1e15); `validate_runs`
checks every run config of a sweep before any run starts (what can be checked without
training: types, schedule, batch arithmetic, the device, the data's vocabulary), so a
sweep never starts runs that can only fail.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from steplaw.errors import UserError, config_errors, raise_problems
from steplaw.laws.published import step_law
from steplaw.models.config import ModelConfig, MoEConfig
from steplaw.runtable import OBJECTIVES
from steplaw.trial import Trial
from steplaw.units import parse_count

__all__ = ["ModelSpec", "SweepSpec", "Cell", "step_law", "count_params", "lr_grid", "batch_grid", "validate_runs",
           "spec_id_of", "spec_difference"]

# The largest model and token budget a sweep takes: far above any model or corpus trained
# (around 1e12 parameters and 1e14 tokens), far below what the store's 64-bit integer
# columns hold (2^63), so that a slip of the exponent (--params 1e30) is refused up front.
MAX_PARAMS = 10**15
MAX_TOKENS = 10**15

# The sequence length of every trainer's runs when the spec sets none (steplaw's own:
# RunConfig.seq_len's default, checked in tests/sweep/test_spec.py).
DEFAULT_SEQ_LEN = 128
_MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)} - {"moe"}
_MOE_FIELDS = {f.name for f in dataclasses.fields(MoEConfig)}
# The fixed settings a trial names (steplaw.trial); the others go in its `settings`.
_TRIAL_SETTINGS = ("schedule", "warmup_tokens", "min_lr_ratio", "decay_fraction", "seed")
_USER_MODEL_KEYS = ("name", "params", "active_params", "args")


def count_params(model: ModelConfig) -> dict:
    """{'non_embedding', 'active', 'total'} parameter counts of a model config."""
    from steplaw.models.accounting import param_counts

    counts = param_counts(model)
    return {"non_embedding": counts.non_embedding, "active": counts.active, "total": counts.total}


@dataclass(frozen=True)
class ModelSpec:
    """One model size: a parameter target (non-embedding) or an explicit shape."""

    params: float | None = None  # target non-embedding parameter count (shape from the recipe); a user model: N as given
    shape: dict | None = None  # explicit ModelConfig fields (overrides the recipe)
    moe: dict | None = None  # MoEConfig fields; None: dense
    # A user's own model (another trainer's): its name, N_active, and its own table of
    # settings, handed to the trainer untouched (steplaw.trial).
    name: str | None = None
    active_params: float | None = None
    args: dict | None = None

    @property
    def is_user_model(self) -> bool:
        return self.name is not None

    def build(self, vocab_size: int, seq_len: int) -> ModelConfig:
        with config_errors(f"model {self.label()} has a bad MoE setting"):
            moe = MoEConfig(**self.moe) if self.moe is not None else None
        if self.shape is not None:
            fields = dict(self.shape)
            fields.setdefault("vocab_size", vocab_size)
            fields.setdefault("max_seq_len", max(seq_len, 128))
            with config_errors(f"model {self.label()} has a bad shape"):
                return ModelConfig(**fields, moe=moe)
        from steplaw.models.recipe import model_for_params

        model = model_for_params(int(self.params), vocab_size=vocab_size, moe=moe)
        if model.max_seq_len < seq_len:
            model = dataclasses.replace(model, max_seq_len=seq_len)
        return model

    def label(self) -> str:
        if self.name is not None:
            return self.name
        if self.shape is not None:
            text = "d{d_model}L{n_layers}".format(**{"d_model": "?", "n_layers": "?", **self.shape})
        else:
            text = f"{_short(self.params)}"
        if self.moe is not None:
            text += f"-moe{self.moe.get('n_experts', 8)}k{self.moe.get('top_k', 2)}"
        return text


def _short(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:g}"


@dataclass
class Cell:
    """One (model, D) cell of a sweep and its LR x batch grid."""

    model: ModelConfig
    label: str
    n_params: int  # non-embedding (activated, for MoE) parameters: the N of the laws
    tokens: int
    lrs: list[float]
    batch_sizes: list[int]  # tokens
    lr_center: float
    batch_center: float
    n_active: int | None = None  # activated parameters (MoE), when not n_params
    name: str = ""  # the model's name in a trial (its label, or a user model's name)
    args: dict = field(default_factory=dict)  # a trial's `args`: a user model's table, or steplaw's shape


@dataclass
class SweepSpec:
    models: list[ModelSpec]
    tokens: list[int]  # D values
    lr_points: int = 5
    lr_span: float = 4.0  # grid covers centre/span .. centre*span
    lr_center_scale: float = 1.0  # centre = scale * Step Law LR
    lrs: list[float] | None = None  # explicit LRs: same for every cell
    batch_points: int = 5
    batch_center_scale: float = 1.0  # centre = scale * Step Law batch size
    batch_sizes: list[int] | None = None  # explicit batch sizes (tokens)
    min_steps: int = 16  # no batch size with fewer optimizer steps than this
    vocab_size: int = 256
    fixed: dict = field(default_factory=dict)  # other RunConfig fields (seq_len, schedule, seed, ...)
    # The loss a cell's optimum minimises, a run-table column (steplaw.runtable.OBJECTIVES): the adaptive
    # planner searches it, and `steplaw fit DIR` / `steplaw report DIR` fit it by default.
    objective: str = "loss"
    # Who trains the runs: "steplaw" (steplaw's own trainer: runs are RunConfigs), or
    # another trainer ("hf", "MODULE:FUNCTION", "command"): runs are trials (steplaw.trial).
    trainer: str = "steplaw"
    # WSD runs equal but in D train as one trunk with a cooldown branch per D: "auto" (when
    # the schedule is wsd and the trainer can branch) or "off"; None: not given (auto). An
    # execution choice, not part of what is measured: left out of the spec's dict and id.
    branch: str | None = None

    def __post_init__(self):
        _check_types(self, skip=("models", "tokens", "fixed", "lrs", "batch_sizes", "branch"))
        if self.branch not in (None, "auto", "off"):
            raise UserError(f"branch={self.branch!r}: expected 'auto' or 'off'")
        if self.branch is not None and self.fixed.get("schedule", "cosine") != "wsd":
            raise UserError(f"branch {self.branch!r} with schedule {self.fixed.get('schedule', 'cosine')!r}: only WSD runs "
                            "branch off a shared trunk; expected --set schedule=wsd with it, or no --branch")
        if self.objective not in OBJECTIVES:
            raise UserError(f"objective={self.objective!r}: expected one of {', '.join(OBJECTIVES)} "
                            "(the smoothed final training loss or the validation loss)")
        for name in ("lr_span", "lr_center_scale", "batch_center_scale"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise UserError(f"{name}={value!r}: expected a finite number above 0")
        if self.vocab_size < 1:
            raise UserError(f"vocab_size={self.vocab_size}: expected a positive vocabulary size")
        if self.min_steps < 1:
            raise UserError(f"min_steps={self.min_steps}: expected at least 1 optimizer step")
        if not isinstance(self.fixed, dict):
            raise UserError(f"fixed={self.fixed!r}: expected a table of RunConfig settings")
        for name in ("tokens", "lrs", "batch_sizes"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (list, tuple)):
                raise UserError(f"{name}={value!r}: expected a list")
        if not isinstance(self.models, (list, tuple)):
            raise UserError(f"models={self.models!r}: expected a list of model entries")
        if not self.models:
            raise UserError("the sweep has no models: expected at least one model size")
        if not self.tokens:
            raise UserError("the sweep has no token budgets: expected at least one D")
        self._check_grid()
        self._check_models()
        seq_len = self.fixed.get("seq_len", DEFAULT_SEQ_LEN)
        if isinstance(seq_len, bool) or not (isinstance(seq_len, int) and seq_len >= 1):
            raise UserError(f"seq_len={seq_len!r}: expected a positive whole number of tokens")

    def _check_models(self):
        """User models: unique names, and a trainer that can train them; a foreign
        trainer: no steplaw-only model settings (MoE shape)."""
        names = [m.name for m in self.models if isinstance(m, ModelSpec) and m.name is not None]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise UserError(f"model name {twice[0]!r} is given {names.count(twice[0])} times: expected unique model names")
        for model in self.models:
            if self.trainer == "steplaw" and model.is_user_model:
                raise UserError(f"model {model.name!r} is a user model (name, params, args): expected a trainer for it "
                                "(--trainer MODULE:FUNCTION, --trainer hf or --trainer-cmd); steplaw's own trainer sizes "
                                "its models from params or a shape")
            if self.trainer != "steplaw" and model.moe is not None:
                raise UserError(f"model {model.label()} has an MoE shape, a steplaw-only setting: expected a user model "
                                f"(name, params, active_params, args) for trainer {self.trainer!r}")

    def bind(self, trainer) -> SweepSpec:
        """Let `trainer` (steplaw.trainers; for trainer "steplaw" its SteplawTrainer) build
        and check this spec's runs: steplaw's own runs are its RunConfigs, which the sweep
        does not know. Checks the fixed settings against it; returns the spec."""
        if hasattr(trainer, "check_spec"):
            trainer.check_spec(self)
        self.__dict__["_trainer"] = trainer  # not a field: not part of the spec's dict or id
        return self

    def _bound(self):
        trainer = self.__dict__.get("_trainer")
        if trainer is None or not hasattr(trainer, "run_of"):
            raise RuntimeError("a spec of steplaw's own trainer builds its runs through it: call "
                               "spec.bind(steplaw.trainers.steplaw.SteplawTrainer()) first")
        return trainer

    def run_of(self, cell: Cell, lr: float, batch_tokens: int):
        """One run of a cell: the bound trainer's run for steplaw's trainer (a RunConfig),
        else a trial."""
        if self.trainer == "steplaw":
            return self._bound().run_of(cell, lr, batch_tokens, self.fixed)
        from steplaw.optim.schedule import DEFAULT_WARMUP_FRACTION

        named = {k: self.fixed[k] for k in _TRIAL_SETTINGS if k in self.fixed}
        warmup = named.pop("warmup_tokens", None)
        if warmup is None:  # steplaw's default fraction, in tokens (a trial says what it is); one per cell, not per batch
            warmup = round(DEFAULT_WARMUP_FRACTION * cell.tokens)
        return Trial(model=cell.name, args=cell.args, N=int(cell.n_params), N_active=cell.n_active, D=cell.tokens, lr=lr,
                     batch_tokens=batch_tokens, seq_len=self.seq_len, warmup_tokens=int(warmup), objective=self.objective,
                     trainer=self.trainer, settings={k: v for k, v in self.fixed.items() if k not in _TRIAL_SETTINGS},
                     **named)

    def _check_grid(self):
        """The grid's lists: counts given as text (a spec file's "1M", or YAML's 1e6) read as
        the CLI reads them, then each value in its range."""
        self.tokens = [_count(t, "token budget", integer=True) for t in self.tokens]
        for tokens in self.tokens:
            if isinstance(tokens, bool) or not (isinstance(tokens, (int, float)) and math.isfinite(tokens) and tokens >= 1):
                raise UserError(f"token budget {tokens!r}: expected a finite positive number of tokens")
            if tokens > MAX_TOKENS:
                raise UserError(f"token budget {tokens:.3g}: expected at most {MAX_TOKENS:.0e} tokens (a slip of the exponent?)")
        self.tokens = [int(t) for t in self.tokens]
        for model in self.models:
            if isinstance(model, ModelSpec) and model.params is not None and model.params > MAX_PARAMS:
                raise UserError(f"model params={model.params:.3g}: expected at most {MAX_PARAMS:.0e} parameters (a slip of "
                                f"the exponent?)")
        if self.lrs is None and (self.lr_points < 1 or not self.lr_span >= 1):
            raise UserError(f"lr_points={self.lr_points}, lr_span={self.lr_span}: expected lr_points >= 1 and lr_span >= 1")
        if self.batch_sizes is None and self.batch_points < 1:
            raise UserError(f"batch_points={self.batch_points}: expected at least 1")
        if self.lrs is not None:
            self.lrs = [_number(lr) for lr in self.lrs]
        if self.batch_sizes is not None:
            self.batch_sizes = [_count(bs, "batch size", integer=True) for bs in self.batch_sizes]
        for lr in self.lrs or []:
            if isinstance(lr, bool) or not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
                raise UserError(f"learning rate {lr!r}: expected a finite positive number")
        for bs in self.batch_sizes or []:
            if isinstance(bs, bool) or not (isinstance(bs, int) and bs > 0):
                raise UserError(f"batch size {bs!r}: expected a positive integer number of tokens")

    @property
    def seq_len(self) -> int:
        return int(self.fixed.get("seq_len", DEFAULT_SEQ_LEN))

    def cells(self) -> list[Cell]:
        cells = []
        for model_spec in self.models:
            if model_spec.is_user_model:  # N as the user gave it; no shape of ours
                model, n_law = None, int(model_spec.params)
                n_active = int(model_spec.active_params) if model_spec.active_params is not None else None
                name, args = model_spec.name, dict(model_spec.args or {})
            else:
                model = model_spec.build(self.vocab_size, self.seq_len)
                counts = count_params(model)
                if counts["total"] > MAX_PARAMS:
                    raise UserError(f"model {model_spec.label()} has {counts['total']:.3g} parameters: expected at most "
                                    f"{MAX_PARAMS:.0e}")
                n_law = counts["active"] if model.moe is not None else counts["non_embedding"]
                n_active, name, args = None, model_spec.label(), model.to_dict()
            for tokens in self.tokens:
                lr_law, bs_law = step_law(n_law, tokens)
                lr_center = lr_law * self.lr_center_scale
                bs_center = bs_law * self.batch_center_scale
                cells.append(Cell(
                    model=model,
                    label=f"N={model_spec.label()} D={_short(tokens)}",
                    n_params=n_law,
                    tokens=tokens,
                    lrs=list(self.lrs) if self.lrs else lr_grid(lr_center, self.lr_span, self.lr_points),
                    batch_sizes=list(self.batch_sizes) if self.batch_sizes else batch_grid(
                        bs_center, self.batch_points, self.seq_len, tokens, self.min_steps),
                    lr_center=lr_center,
                    batch_center=bs_center,
                    n_active=n_active,
                    name=name,
                    args=args,
                ))
        return cells

    def expand(self) -> list:
        """Every run of the sweep, cell by cell (ids unique: duplicates are dropped)."""
        seen, runs = set(), []
        for cell in self.cells():
            for config in (self.run_of(cell, lr, bs) for bs in cell.batch_sizes for lr in cell.lrs):
                run_id = config.run_id()
                if run_id not in seen:
                    seen.add(run_id)
                    runs.append(config)
        return runs

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        if data["objective"] == "loss":  # the default: left out, so specs written before it keep their spec_id
            del data["objective"]
        if data["trainer"] == "steplaw":  # the same
            del data["trainer"]
        del data["branch"]  # how the runs train, not which: the same runs and spec id either way
        new = ("name", "active_params", "args")  # unset: left out, so older specs keep their spec_id
        data["models"] = [{k: v for k, v in m.items() if not (k in new and v is None)} for m in data["models"]]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> SweepSpec:
        if not isinstance(data, dict):
            raise UserError(f"sweep spec is {type(data).__name__}: expected a table of sweep settings")
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise UserError(f"sweep spec key {sorted(unknown)[0]!r} is unknown: expected one of {sorted(known)}")
        models = data.pop("models", None)
        if not isinstance(models, list):
            raise UserError(f"sweep spec 'models' is {models!r}: expected a list of model entries")
        return cls(models=[_model_spec(m) for m in models], **data)

    @classmethod
    def from_file(cls, path: str | Path, trainer: str | None = None) -> SweepSpec:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"sweep spec {str(path)!r} does not exist or is not a file: expected a TOML, YAML or JSON file")
        try:
            text = path.read_bytes().decode("utf-8-sig")  # a byte-order mark (Windows editors) is not content
        except UnicodeDecodeError as exc:
            raise UserError(f"sweep spec {str(path)!r} is not UTF-8 text (byte {exc.start}): expected a TOML, YAML or JSON "
                            f"file") from None
        except OSError as exc:
            raise UserError(f"cannot read sweep spec {str(path)!r} ({exc.strerror or exc})") from None
        data = _parse_spec_text(path, text)
        if not isinstance(data, dict):
            raise UserError(f"{path} holds {type(data).__name__}: expected a table of sweep settings")
        data = data.get("sweep", data)
        if trainer is not None and isinstance(data, dict):  # the command line's trainer, for the file's models
            data = {**data, "trainer": trainer}
        return cls.from_dict(data)


def _parse_spec_text(path: Path, text: str):
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise UserError(f"{path} is YAML but pyyaml is not installed: pip install 'steplaw[yaml]', or write the "
                            f"spec as TOML") from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UserError(f"{path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    import tomllib

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path} is not valid TOML ({exc})") from None


def _count(value, what: str, integer: bool = False):
    """A count given as text in a spec file ("1M", or "1e6", which YAML reads as text) as
    the CLI reads it (steplaw.units.parse_count); anything else as it is, for the checks."""
    return parse_count(value, what, integer=integer) if isinstance(value, str) else value


def _number(value):
    """A learning rate given as text ("3e-3", which YAML reads as text) as the CLI's --lrs
    reads it; anything else, and text that is no number, as it is, for the checks."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _model_spec(entry) -> ModelSpec:
    entry = _count(entry, "model params")
    if isinstance(entry, (int, float)) and not isinstance(entry, bool):
        if not (math.isfinite(entry) and entry > 0):
            raise UserError(f"model params={entry!r}: expected a finite positive parameter count")
        return ModelSpec(params=float(entry))
    if isinstance(entry, ModelSpec):
        return entry
    if not isinstance(entry, dict):
        raise UserError(f"model entry {entry!r}: expected a parameter count or a table")
    entry = dict(entry)
    if entry.get("name") is not None:
        return _user_model(entry)
    params = _count(entry.pop("params", None), "model params")
    moe = entry.pop("moe", None)
    shape = entry.pop("shape", None) or ({k: entry.pop(k) for k in list(entry)} if entry else None)
    if (params is None) == (shape is None):
        raise UserError(f"model entry {entry or params!r}: expected either 'params' (a target count) or shape fields (d_model, "
                        f"n_layers, ...)")
    valid_number = isinstance(params, (int, float)) and not isinstance(params, bool) and math.isfinite(params)
    if params is not None and not (valid_number and params > 0):
        raise UserError(f"model params={params!r}: expected a finite positive parameter count")
    if shape is not None:
        if not isinstance(shape, dict):
            raise UserError(f"model shape={shape!r}: expected a table of ModelConfig fields")
        unknown = set(shape) - _MODEL_FIELDS
        if unknown:
            raise UserError(f"model field {sorted(unknown)[0]!r} is not a ModelConfig field: expected one of "
                            f"{sorted(_MODEL_FIELDS)}")
    if moe is not None:
        if not isinstance(moe, dict):
            raise UserError(f"model moe={moe!r}: expected a table of MoE settings (n_experts, top_k, ...)")
        unknown = set(moe) - _MOE_FIELDS
        if unknown:
            raise UserError(f"MoE setting {sorted(unknown)[0]!r} is unknown: expected one of {sorted(_MOE_FIELDS)}")
    return ModelSpec(params=float(params) if params is not None else None, shape=shape, moe=moe)


def _user_model(entry: dict) -> ModelSpec:
    """A user's model: {name, params (N as the run table defines it), active_params, args}."""
    name = entry["name"]
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"model name {name!r}: expected a non-empty text")
    unknown = sorted(set(entry) - set(_USER_MODEL_KEYS))
    if unknown:
        raise UserError(f"model {name!r} has key {unknown[0]!r}: expected only {', '.join(_USER_MODEL_KEYS)} (the model's own "
                        "settings go in its args table)")
    counts = {}
    for key in ("params", "active_params"):
        value = _count(entry.get(key), f"model {name!r} {key}")
        if value is None:
            if key == "params":
                raise UserError(f"model {name!r} has no params: expected params = N, its non-embedding parameter count "
                                "(the N of the run table)")
            continue
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and 0 < value <= MAX_PARAMS):
            raise UserError(f"model {name!r} {key}={value!r}: expected a positive parameter count up to {MAX_PARAMS:.0e}")
        counts[key] = float(value)
    args = entry.get("args") or {}
    if not isinstance(args, dict):
        raise UserError(f"model {name!r} args={args!r}: expected a table of the model's own settings")
    return ModelSpec(params=counts["params"], name=name, active_params=counts.get("active_params"), args=dict(args))


def lr_grid(center: float, span: float, points: int) -> list[float]:
    """`points` LRs log-spaced over [center/span, center*span] (just the centre for 1 point)."""
    if points == 1:
        return [_round_sig(center)]
    lo, hi = math.log(center / span), math.log(center * span)
    return [_round_sig(math.exp(lo + (hi - lo) * i / (points - 1))) for i in range(points)]


def batch_grid(center: float, points: int, seq_len: int, tokens: int, min_steps: int) -> list[int]:
    """`points` powers of two (tokens) around `center`, within [seq_len, tokens/min_steps].

    The window keeps its width and moves as a whole, so every cell has the same grid
    shape; a budget too small for the window keeps what fits.
    """
    low_exp = math.ceil(math.log2(seq_len))
    high_exp = math.floor(math.log2(max(tokens / max(min_steps, 1), 1)))
    if high_exp < low_exp:
        raise UserError(f"token budget D={tokens} is too small for seq_len={seq_len} and min_steps={min_steps}: expected D >= "
                        f"seq_len * min_steps")
    first = round(math.log2(center)) - (points - 1) // 2
    first = min(max(first, low_exp), max(high_exp - points + 1, low_exp))
    last = min(first + points - 1, high_exp)
    return [2**e for e in range(first, last + 1)]


def _round_sig(value: float, digits: int = 4) -> float:
    """Round to a few significant digits so ids do not depend on float noise."""
    return float(f"{value:.{digits}g}")


# -- checks ------------------------------------------------------------------------------------

_PLAIN_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "None": type(None), "dict": dict}


def _type_problem(value, annotation: str) -> str | None:
    """Why `value` does not fit a field annotated `annotation` ('int', 'float | None',
    ...), or None when it fits (or the annotation is not a plain type)."""
    names = [name.strip() for name in str(annotation).split("|")]
    if any(name not in _PLAIN_TYPES for name in names):
        return None
    for name in names:
        kind = _PLAIN_TYPES[name]
        if kind in (int, float) and isinstance(value, bool):
            continue
        if kind is float and isinstance(value, (int, float)):
            return None if math.isfinite(value) else "expected a finite number"
        if isinstance(value, kind):
            return None
    words = {"int": "a whole number", "float": "a number", "str": "text", "bool": "true or false", "None": "null",
             "dict": "a table"}
    wanted = " or ".join(words[n] for n in names)
    return f"expected {wanted}"


def _check_types(spec: SweepSpec, skip=()):
    """The spec's own plain-typed fields (run and model settings are checked by their
    configs' validate())."""
    for f in dataclasses.fields(spec):
        if f.name not in skip:
            value = getattr(spec, f.name)
            problem = _type_problem(value, f.type)
            if problem:
                raise UserError(f"sweep spec setting {f.name}={value!r}: {problem}")


def validate_runs(configs: list, local: bool = True, trainer=None) -> None:
    """Check every run before any run starts: a trial by the contract's own rules, any
    other run by its trainer's `validate` (steplaw's: RunConfig.validate(), and with
    `local` the device, the data directory and its vocabulary). Raises the first UserError."""
    native = []
    for config in configs:
        if isinstance(config, Trial):
            raise_problems(config.problems())
        else:
            native.append(config)
    if native and trainer is not None and hasattr(trainer, "validate"):
        trainer.validate(native, local=local)


def spec_id_of(spec: dict) -> str:
    """A spec's id: a hash of its canonical JSON (12 hex digits). Lists are hashed in the
    order given, as they always were, so that existing sweep directories keep their ids;
    `spec_difference` is what says whether two specs are the same."""
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def _unordered(spec: dict) -> dict:
    """A spec with its list settings (models, tokens, lrs, batch sizes) in a canonical
    order: the order of a grid list changes the order of the runs, never the runs."""
    return {key: sorted(value, key=lambda item: json.dumps(item, sort_keys=True, default=str)) if isinstance(value, list)
            else value for key, value in spec.items()}


def spec_difference(old: dict, new: dict) -> str | None:
    """None when `new` is the same spec as `old` (its lists in any order), else the first
    difference in words ("tokens was [65536], now [131072]")."""
    old, new = _unordered(old), _unordered(new)
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if not changed:
        return None
    key = changed[0]
    if isinstance(old.get(key), dict) and isinstance(new.get(key), dict):
        inner = sorted(k for k in set(old[key]) | set(new[key]) if old[key].get(k) != new[key].get(k))
        if inner:
            k = inner[0]
            return f"{key}.{k} was {old[key].get(k)!r}, now {new[key].get(k)!r}"
    return f"{key} was {_json_short(old.get(key))}, now {_json_short(new.get(key))}"


def _json_short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
