"""One training run: RunConfig in, RunResult out (plain dataclasses, JSON round-trip).

Units: `tokens` (D) and `batch_tokens` (B) are token counts; `lr` is the peak learning
rate of the schedule. A run's id is a hash of its full config, so a sweep can skip runs
it has finished and treat any change of config as a new run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass

from steplaw.errors import UserError, number_problem, raise_problems, whole_number_problem
from steplaw.models.config import ModelConfig, known_fields
from steplaw.result import RunResult  # noqa: F401  (re-exported: the run's record lives in a neutral module)

PRECISIONS = ("auto", "fp32", "bf16")  # auto: bf16 autocast on GPU, fp32 on CPU
OPTIMIZERS = ("steplaw", "torch")  # steplaw.optim.FusedAdamW, torch.optim.AdamW
_DEVICE = re.compile(r"^(auto|cpu|cuda(:[0-9]+)?)$")
# Fields added after run ids were first stored, with their defaults: a config at a default
# here hashes as it did before the field existed, so stored sweeps keep their run ids.
_LATER_DEFAULTS = {"decay_shape": "linear"}


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    tokens: int  # D: training tokens
    lr: float  # peak learning rate
    batch_tokens: int  # B: tokens per optimizer step (micro-batch x seq x accumulation x world)
    seq_len: int = 128
    # Largest micro-batch (in tokens) run at once; gradient accumulation makes up the rest.
    # None: the whole batch at once when it fits a memory budget, else the largest dividing
    # micro-batch that does (steplaw.train.batching.auto_micro_batch_tokens).
    micro_batch_tokens: int | None = None
    schedule: str = "cosine"  # "cosine" (warmup + cosine, the Step Law setup), "wsd", "constant"
    warmup_tokens: int | None = None  # None: a default fraction of `tokens` (see steplaw.optim.schedule)
    min_lr_ratio: float = 0.1  # cosine/WSD end at min_lr_ratio * lr
    decay_fraction: float = 0.2  # WSD: fraction of training spent decaying
    decay_shape: str = "linear"  # WSD cooldown: "linear" or "sqrt" (1-sqrt; see steplaw.optim.schedule)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:N"
    precision: str = "auto"  # "auto" (bf16 autocast on GPU, fp32 on CPU), "fp32", "bf16"
    data: str | None = None  # token directory from `steplaw data prepare`; None: embedded corpus
    eval_tokens: int = 16384  # validation tokens at the end of the run
    optimizer: str = "steplaw"  # "steplaw" (FusedAdamW) or "torch" (torch.optim.AdamW)
    compile: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        """From to_dict()'s form. Unknown or missing required keys are a UserError; the
        values are not validated here (see validate()), so stored runs always load."""
        known_fields(cls, data, "run config")
        missing = [name for name in ("model", "tokens", "lr", "batch_tokens") if name not in data]
        if missing:
            raise UserError(f"run config: missing setting(s) {', '.join(missing)}")
        data = dict(data)
        model = data.pop("model")
        return cls(model=model if isinstance(model, ModelConfig) else ModelConfig.from_dict(model), **data)

    def problems(self, *, on_this_machine: bool = False) -> list[str]:
        """One sentence per mistake in this config (empty when it is valid); see validate()."""
        found = _run_problems(self)
        if on_this_machine and not found:
            found = _machine_problems(self)
        return found

    def validate(self, *, on_this_machine: bool = False) -> None:
        """Raise one UserError naming every mistake in this config (sentences joined by
        '; '), cheaply: no training, no data read. `run()` calls it
        before anything else, and a sweep calls it for every run before any starts.

        The device is checked for its form ('auto', 'cpu', 'cuda', 'cuda:N') and `data`
        for being a path; whether this machine has that GPU and that directory is checked
        where the run starts, or here with on_this_machine=True (which imports torch).

        Not called at construction, on purpose: configs are rebuilt from stored dicts
        (run stores, result.json, executors), and a stored run must keep loading for
        fitting and reporting when a rule here is tightened later."""
        raise_problems(self.problems(on_this_machine=on_this_machine))

    def run_id(self) -> str:
        """Deterministic id: a hash of every field (16 hex digits). Computed once per
        config object (it is frozen): the sweep driver asks for the ids of every proposed
        run after each batch of completions, and a 50,000-run sweep would otherwise spend
        minutes deep-copying configs in to_dict()."""
        cached = self.__dict__.get("_run_id")
        if cached is None:
            fields = self.to_dict()
            for name, default in _LATER_DEFAULTS.items():  # ids of runs stored before these fields stay
                if fields.get(name) == default:
                    fields.pop(name)
            canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
            cached = hashlib.sha256(canonical.encode()).hexdigest()[:16]
            object.__setattr__(self, "_run_id", cached)  # not a field: equality, asdict and ids ignore it
        return cached


def _run_problems(c: RunConfig) -> list[str]:
    """The rules of validate(): each field on its own, then the rules between fields
    (checked only for fields valid on their own, so one mistake gives one sentence)."""
    from steplaw.optim.schedule import DECAY_SHAPES, SCHEDULES

    model = c.model.problems() if isinstance(c.model, ModelConfig) else [f"model={c.model!r}: expected a ModelConfig"]
    fields = {
        "tokens": whole_number_problem("tokens", c.tokens, 1),
        "lr": number_problem("lr", c.lr, 0.0, low_open=True),
        "batch_tokens": whole_number_problem("batch_tokens", c.batch_tokens, 1),
        "seq_len": whole_number_problem("seq_len", c.seq_len, 1),
        "micro_batch_tokens": c.micro_batch_tokens is not None and whole_number_problem("micro_batch_tokens", c.micro_batch_tokens, 1),
        "warmup_tokens": c.warmup_tokens is not None and whole_number_problem("warmup_tokens", c.warmup_tokens, 0),
        "min_lr_ratio": number_problem("min_lr_ratio", c.min_lr_ratio, 0.0, 1.0),
        "decay_fraction": number_problem("decay_fraction", c.decay_fraction, 0.0, 1.0, low_open=True),
        "weight_decay": number_problem("weight_decay", c.weight_decay, 0.0),
        "beta1": number_problem("beta1", c.beta1, 0.0, 1.0, high_open=True),
        "beta2": number_problem("beta2", c.beta2, 0.0, 1.0, high_open=True),
        "eps": number_problem("eps", c.eps, 0.0, low_open=True),
        "grad_clip": c.grad_clip is not None and number_problem("grad_clip", c.grad_clip, 0.0, low_open=True),
        "seed": whole_number_problem("seed", c.seed, 0, 2**63, high_text="2^63"),
        "eval_tokens": whole_number_problem("eval_tokens", c.eval_tokens, 0),
    }
    if c.schedule not in SCHEDULES:
        fields["schedule"] = f"schedule={c.schedule!r}: expected one of {', '.join(SCHEDULES)}"
    if c.decay_shape not in DECAY_SHAPES:
        fields["decay_shape"] = f"decay_shape={c.decay_shape!r}: expected one of {', '.join(DECAY_SHAPES)}"
    if not (isinstance(c.device, str) and _DEVICE.match(c.device)):
        fields["device"] = f"device={c.device!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'"
    if c.precision not in PRECISIONS:
        fields["precision"] = f"precision={c.precision!r}: expected one of {', '.join(PRECISIONS)}"
    if c.optimizer not in OPTIMIZERS:
        fields["optimizer"] = f"optimizer={c.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}"
    if not isinstance(c.compile, bool):
        fields["compile"] = f"compile={c.compile!r}: expected true or false"
    if c.data is not None and not (isinstance(c.data, str) and c.data):
        fields["data"] = f"data={c.data!r}: expected the path of a token directory, or none for the embedded corpus"
    bad = {name for name, problem in fields.items() if problem} | ({"model"} if model else set())
    return model + [p for p in fields.values() if p] + _batch_problems(c, bad)


def _batch_problems(c: RunConfig, bad: set[str]) -> list[str]:
    """Rules between tokens, batch, sequence and micro-batch (for fields valid alone)."""
    found = []
    if not bad & {"seq_len", "model"} and c.seq_len > c.model.max_seq_len:
        found.append(f"seq_len={c.seq_len} exceeds the model's max_seq_len={c.model.max_seq_len}")
    if bad & {"seq_len", "batch_tokens"}:
        return found
    if c.batch_tokens % c.seq_len:
        nearest = max(1, round(c.batch_tokens / c.seq_len)) * c.seq_len
        found.append(f"batch_tokens={c.batch_tokens} is not a multiple of seq_len={c.seq_len}: use e.g. {nearest}")
    elif c.micro_batch_tokens is not None and "micro_batch_tokens" not in bad:
        micro = c.micro_batch_tokens
        if micro % c.seq_len:
            found.append(f"micro_batch_tokens={micro} is not a multiple of seq_len={c.seq_len}")
        elif micro < c.batch_tokens and (c.batch_tokens // c.seq_len) % (micro // c.seq_len):
            found.append(f"micro_batch_tokens={micro} ({micro // c.seq_len} sequences) does not divide "
                         f"batch_tokens={c.batch_tokens} ({c.batch_tokens // c.seq_len} sequences)")
    if "tokens" not in bad and c.tokens < c.batch_tokens:
        found.append(f"tokens={c.tokens} is less than one batch of batch_tokens={c.batch_tokens}")
    if "tokens" not in bad and "warmup_tokens" not in bad and c.warmup_tokens is not None and c.warmup_tokens > c.tokens:
        found.append(f"warmup_tokens={c.warmup_tokens} exceeds tokens={c.tokens}: the run would end before its warmup")
    return found


def _machine_problems(c: RunConfig) -> list[str]:
    """What this machine must provide: the GPU a cuda device names, the data directory."""
    found = []
    if c.device.startswith("cuda"):
        import torch

        index = int(c.device.split(":")[1]) if ":" in c.device else 0
        if not torch.cuda.is_available():
            found.append(f"device={c.device!r}: no CUDA device is available on this machine (use 'cpu' or 'auto')")
        elif index >= torch.cuda.device_count():
            found.append(f"device={c.device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if c.data is not None and not os.path.isdir(c.data):
        found.append(f"data={c.data!r}: no such directory here (make one with `steplaw data prepare`)")
    return found


# The run's record is plain data shared by every layer (steplaw.result); re-exported here.
