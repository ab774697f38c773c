"""--trainer hf (steplaw[hf]): a Hugging Face transformers causal LM as a trainer of the
trial contract (steplaw.trial), with WSD branches (capability "branch").

The model is built from an HF config, never from downloaded weights: a spec's model

    {name = "l64", params = 99_200, args = {model_type = "llama", hidden_size = 64, ...}}

is `AutoConfig.for_model(model_type, **args)` (model_type default "llama"; every other key
must be a field of that config, else the run fails saying which) and
`AutoModelForCausalLM.from_config`, initialised from the trial's seed. vocab_size defaults
to the data's vocabulary and max_position_embeddings to seq_len. The data is steplaw's
(steplaw.data: a `data` token directory in the spec's fixed settings, or the embedded
corpus) and so is its order (steplaw.train.batching: a step's batch depends only on
(seed, step)); the LR of each step is steplaw.optim.schedule.lr_multiplier (cosine, wsd,
constant and decay_shape mean what they mean for steplaw's own trainer), with AdamW
(torch) and steplaw's defaults for weight_decay, beta1, beta2, eps and grad_clip (each may
be set in the spec's fixed table); the final loss is the same smoothed loss and the same
divergence rule as steplaw's (steplaw.train.tracking), val_loss is the mean loss over
`eval_tokens` held-out tokens.

N: `params` must be the model's N as the run table counts it, the non-embedding
parameters: every parameter but the token embedding, an untied output head and learned
position embeddings (every nn.Embedding), Kaplan et al. 2020's convention. A run whose
`params` is more than 1% off the built model's count fails saying both numbers
(`count_params(model_type, args)` prints the count to put in the spec).

A plain training loop, not transformers.Trainer: a WSD branch must end with the losses of
the same run trained alone, to the last bit on a CPU, so the trunk's checkpoints must
hold exactly this loop's state (model, AdamW, step = data position, step losses, RNG) and
each step must see steplaw's batch and steplaw's LR. Trainer brings its own data loader,
sampler, scheduler, checkpoint layout and accelerate (one more dependency), and each of
those would have to be overridden to give that guarantee; the loop is ~40 lines.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from steplaw.errors import UserError
from steplaw.fileio import write_atomic
from steplaw.trial import Trial, failed, parse_result

INSTALL = "pip install steplaw[hf]"
DEFAULT_MODEL_TYPE = "llama"
PARAMS_TOLERANCE = 0.01  # the spec's params may differ from the built model's N by this fraction
# steplaw's own trainer's defaults (steplaw.train.config.RunConfig), so the same spec means
# the same optimizer; each may be given in the spec's fixed table.
SETTINGS = {"weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "grad_clip": 1.0, "eval_tokens": 16384,
            "decay_shape": "linear", "data": None, "device": "auto", "micro_batch_tokens": None}
PROGRESS_INTERVAL_S = 1.0


def transformers_module():
    """The transformers package, or a UserError in one sentence saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise UserError(f"--trainer hf needs Hugging Face transformers, which is not installed: expected `{INSTALL}`") from None
    return transformers


# -- the model --------------------------------------------------------------------------------

def build_config(args: dict, vocab_size: int, seq_len: int):
    """The HF config of a spec model's `args`; UserError for an unknown model type or key."""
    transformers = transformers_module()
    args = dict(args or {})
    model_type = args.pop("model_type", DEFAULT_MODEL_TYPE)
    try:
        default = transformers.AutoConfig.for_model(model_type)
    except (ValueError, KeyError):
        raise UserError(f"args model_type={model_type!r} is not a transformers model type: expected one of "
                        f"transformers' AutoConfig types, e.g. llama, gpt2, qwen2, mistral") from None
    known = set(default.to_dict()) | {k for k in dir(default) if not k.startswith("_")}
    unknown = sorted(k for k in args if k not in known)
    if unknown:
        raise UserError(f"args {', '.join(map(repr, unknown))}: not a field of transformers' {type(default).__name__} "
                        f"(model_type {model_type!r}): expected its own names, e.g. hidden_size, num_hidden_layers")
    args.setdefault("vocab_size", vocab_size)
    if args["vocab_size"] < vocab_size:
        raise UserError(f"args vocab_size={args['vocab_size']} is smaller than the data's vocabulary of {vocab_size} "
                        f"tokens: expected vocab_size >= {vocab_size}")
    if "max_position_embeddings" in known:
        args.setdefault("max_position_embeddings", seq_len)
    try:
        return transformers.AutoConfig.for_model(model_type, **args)
    except (ValueError, TypeError) as exc:
        raise UserError(f"args of model_type {model_type!r} are refused by transformers ({_sentence(exc)})") from None


def build_model(config, seed: int):
    """A causal LM of `config` in float32, initialised from `seed` (no weights downloaded)."""
    import torch

    transformers = transformers_module()
    torch.manual_seed(seed)
    try:
        return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(f"model_type {config.model_type!r} has no causal LM in transformers ({_sentence(exc)}): "
                        "expected a decoder model type, e.g. llama, gpt2, qwen2") from None


def param_counts(model) -> dict:
    """{'non_embedding', 'total'} parameters of an HF model, as the run table counts them
    (see the module doc: every nn.Embedding and an untied output head are embeddings)."""
    import torch

    embedding = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    head = model.get_output_embeddings()
    if head is not None:
        embedding.add(id(head.weight))
    total = non_embedding = 0
    for p in model.parameters():  # a tied weight is listed once
        total += p.numel()
        if id(p) not in embedding:
            non_embedding += p.numel()
    return {"non_embedding": non_embedding, "total": total}


def count_params(args: dict, vocab_size: int = 256, seq_len: int = 128) -> int:
    """N (non-embedding parameters) of the model a spec's `args` builds: the number to give
    as its `params` (vocab_size: the data's; 256 for the embedded corpus)."""
    return param_counts(build_model(build_config(args, vocab_size, seq_len), 0))["non_embedding"]


def check_params(given: int, counted: int, model: str) -> None:
    if abs(given - counted) > PARAMS_TOLERANCE * counted:
        raise UserError(f"model {model!r} gives params={given} but the model its args build has N={counted} non-embedding "
                        f"parameters: expected params within {PARAMS_TOLERANCE:.0%} of {counted}")


# -- one run's setup and state ------------------------------------------------------------------

@dataclass
class _Setup:
    trial: Trial
    settings: dict
    config: object  # the HF config
    data: object  # steplaw.data.TokenData
    device: object
    plan: object  # steplaw.train.batching.BatchPlan of this trial
    warmup_steps: int


def _setup(trial: Trial) -> _Setup:
    """Everything a run needs before it trains, checked; UserError says what is wrong."""
    from steplaw.data import load_token_data
    from steplaw.optim.schedule import check_schedule
    from steplaw.train.batching import plan_batches
    from steplaw.train.runner import resolve_device

    problems = trial.problems()
    if problems:
        raise UserError("; ".join(problems))
    settings = {**SETTINGS, **{k: v for k, v in (trial.settings or {}).items() if k in SETTINGS}}
    check_schedule(trial.schedule, trial.min_lr_ratio, trial.decay_fraction, settings["decay_shape"])
    data = load_token_data(settings["data"])
    config = build_config(trial.args, data.vocab_size, trial.seq_len)
    plan = plan_batches(trial.D, trial.batch_tokens, trial.seq_len, settings["micro_batch_tokens"])
    warmup = max(1, round(trial.warmup_tokens / trial.batch_tokens))
    return _Setup(trial, settings, config, data, resolve_device(settings["device"]), plan, warmup)


@dataclass
class _State:
    model: object
    optimizer: object
    step: int  # optimizer steps done = the data position
    losses: list  # every step's loss so far (the smoothed loss and the curve are made from them)
    diverged: str | None = None


def _fresh(setup: _Setup) -> _State:
    import torch

    model = build_model(setup.config, setup.trial.seed).to(setup.device)
    check_params(setup.trial.N, param_counts(model)["non_embedding"], setup.trial.model)
    s = setup.settings
    decay = [p for p in model.parameters() if p.dim() >= 2]  # no weight decay on norms and biases, as steplaw's
    other = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": s["weight_decay"]}, {"params": other, "weight_decay": 0.0}],
                                  lr=setup.trial.lr, betas=(s["beta1"], s["beta2"]), eps=s["eps"])
    return _State(model, optimizer, 0, [])


def _train(setup: _Setup, state: _State, until: int, total_steps: int, progress=None, run_id=None) -> None:
    """Train `state` from its step to `until`, under the LR schedule of a run of
    `total_steps` steps (a trunk trains under its longest run's: every run's LR is the same
    before its own branch point). Stops at a divergence (state.diverged says why)."""
    import torch
    import torch.nn.functional as F

    from steplaw.optim.schedule import lr_multiplier
    from steplaw.train.batching import gather_windows, step_offsets
    from steplaw.train.tracking import LossTracker

    trial, plan, s = setup.trial, setup.plan, setup.settings
    tracker = LossTracker(state.losses)
    state.losses = tracker.losses
    model, optimizer = state.model, state.optimizer
    model.train()
    last = time.perf_counter()
    while state.step < until and state.diverged is None:
        lr = trial.lr * lr_multiplier(state.step, total_steps, setup.warmup_steps, trial.schedule, trial.min_lr_ratio,
                                      trial.decay_fraction, s["decay_shape"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        offsets = step_offsets(trial.seed, state.step, plan.batch_seqs, len(setup.data.train), plan.seq_len)
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for micro in range(plan.accumulation):
            x, y = gather_windows(setup.data.train, offsets[micro * plan.micro_seqs:(micro + 1) * plan.micro_seqs],
                                  plan.seq_len, setup.device)
            with _autocast(setup.device):
                logits = model(input_ids=x).logits
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1)) / plan.accumulation
            loss.backward()
            step_loss += loss.item()
        if s["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), s["grad_clip"])
        optimizer.step()
        state.step += 1
        state.diverged = tracker.add(step_loss)
        now = time.perf_counter()
        if progress is not None and (now - last >= PROGRESS_INTERVAL_S or state.step == until):
            last = now
            info = {"tokens": state.step * plan.batch_tokens, "loss": tracker.smoothed, "step": state.step}
            progress({**info, "run_id": run_id} if run_id else info)


def _autocast(device):
    """bf16 autocast on a GPU (steplaw's "auto" precision); float32 on a CPU."""
    import contextlib

    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def _val_loss(setup: _Setup, model) -> float:
    import torch
    import torch.nn.functional as F

    from steplaw.train.batching import eval_offsets, gather_windows

    offsets = eval_offsets(len(setup.data.val), setup.plan.seq_len, setup.settings["eval_tokens"])
    total = count = 0.0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(offsets), setup.plan.micro_seqs):
            x, y = gather_windows(setup.data.val, offsets[start:start + setup.plan.micro_seqs], setup.plan.seq_len, setup.device)
            with _autocast(setup.device):
                logits = model(input_ids=x).logits.float()
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
            count += y.numel()
    model.train()
    return total / count


def _result(setup: _Setup, state: _State, wall_s: float) -> dict:
    """The contract's result of a run that trained to its end (or diverged)."""
    from steplaw.train.tracking import LossTracker, loss_curve

    tracker = LossTracker(state.losses)
    finite = tracker.finite()
    curve = [list(p) for p in loss_curve(finite, setup.plan.batch_tokens)]
    common = {"tokens": state.step * setup.plan.batch_tokens, "steps": state.step, "wall_s": wall_s, "curve": curve}
    if state.diverged is not None:
        return {"status": "diverged", "reason": state.diverged, **common}
    return {"status": "ok", "loss": tracker.smoothed, "val_loss": _val_loss(setup, state.model), **common}


# -- checkpoints --------------------------------------------------------------------------------

def _save(path: Path, state: _State, trunk: str) -> None:
    import torch

    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    buffer = io.BytesIO()
    torch.save({"trunk": trunk, "step": state.step, "losses": state.losses, "model": state.model.state_dict(),
                "optimizer": state.optimizer.state_dict(), "rng": rng}, buffer)
    write_atomic(path, buffer.getvalue())


def _load(path: Path, setup: _Setup, trunk: str) -> _State | None:
    """The state a checkpoint holds (None when it is not this trunk's or cannot be read)."""
    import torch

    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError):  # unreadable: recompute from an earlier one
        return None
    if not isinstance(saved, dict) or saved.get("trunk") != trunk:
        return None
    state = _fresh(setup)
    state.model.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.step, state.losses = int(saved["step"]), list(saved["losses"])
    torch.set_rng_state(saved["rng"]["cpu"])
    if "cuda" in saved["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    return state


def _checkpoints(trunk_dir: Path) -> dict[int, Path]:
    return {int(p.stem.split("-")[1]): p for p in trunk_dir.glob("trunk-*.pt") if p.stem.split("-")[1].isdigit()}


def trunk_id(trial: Trial) -> str:
    """16 hex digits naming the trunk of a WSD trial: a hash of the trial without D."""
    data = {k: v for k, v in trial.to_dict().items() if k != "D"}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- the trainer --------------------------------------------------------------------------------

@dataclass(frozen=True)
class HFTrainer:
    name = "hf"
    capabilities = ("branch",)

    def __call__(self, config: Trial, run_dir: str | None = None, progress=None) -> dict:
        return parse_result(self.train(config, progress), "the hf trainer")

    def train(self, trial: Trial, progress=None) -> dict:
        """One run alone: the contract's result (loss, val_loss, tokens, steps, wall_s, curve)."""
        started = time.perf_counter()
        try:
            setup = _setup(trial)
            state = _fresh(setup)
        except UserError as exc:
            return failed(str(exc))
        _train(setup, state, setup.plan.steps, setup.plan.steps, progress)
        return _result(setup, state, time.perf_counter() - started)

    def run_trunk(self, trials, trunk_dir: str, done: set, on_result, progress=None) -> None:
        """INTERFACE.md's trunk: the stable phase once, a durable checkpoint at each branch
        point, each branch cooled down from its checkpoint (see _Trunk)."""
        _Trunk(list(trials), Path(trunk_dir), set(done), on_result, progress).run()


class _Trunk:
    """One call of run_trunk. Branches run in branch-point order: the trunk trains to run
    k's branch point, writes trunk-<step>.pt (durable), deletes the previous checkpoint
    (its branch has finished), cools run k down from the checkpoint to its D, writes
    branch-<run_id>.json and calls on_result, then reloads the checkpoint to go on. A call
    after a kill resumes from the last checkpoint at or before the next branch point it
    needs; a branch whose result file exists is delivered, not trained again."""

    def __init__(self, trials, trunk_dir: Path, done: set, on_result, progress):
        self.fresh = None  # a fresh state, built before the trunk trains (it checks the runs)
        self.trunk_dir, self.done, self.on_result, self.progress = trunk_dir, done, on_result, progress
        by_id = {t.run_id(): t for t in trials}
        self.trials = sorted(by_id.values(), key=lambda t: t.D)
        self._check()

    def _check(self) -> None:
        from steplaw.optim.schedule import check_branching

        if not self.trials:
            return
        first = self.trials[0]
        self.id = trunk_id(first)
        for trial in self.trials:
            if trunk_id(trial) != self.id:
                raise UserError(f"runs {first.run_id()} and {trial.run_id()} differ in more than D: expected one trunk's "
                                "runs (equal in every field but D)")
        steps = [t.D // t.batch_tokens for t in self.trials]
        warmup = max(1, round(first.warmup_tokens / first.batch_tokens)) if first.warmup_tokens else None
        self.points = [check_branching(s, warmup, first.decay_fraction, first.schedule) for s in steps]

    def run(self) -> None:
        if not self.trials:
            return
        todo = [(t, b) for t, b in zip(self.trials, self.points) if t.run_id() not in self.done]
        todo = [(t, b) for t, b in todo if not self._deliver_stored(t)]
        if not todo:
            return
        try:  # what would fail each run alone (its args, its params, the data) fails every branch
            setups = {t.run_id(): _setup(t) for t, _ in todo}
            self.fresh = _fresh(setups[todo[0][0].run_id()])
        except UserError as exc:
            for trial, _ in todo:
                self.on_result(trial.run_id(), {**failed(str(exc)), "trunk": self.id, "tokens_trained": 0})
            return
        self.trunk_dir.mkdir(parents=True, exist_ok=True)
        self._check_disk(self.fresh)
        self._train_branches(todo, setups)

    def _train_branches(self, todo, setups) -> None:
        longest = todo[-1][0].run_id()
        state, start_step, started = None, None, time.perf_counter()
        for trial, point in todo:
            setup = setups[trial.run_id()]
            if state is None or state.step > point:
                state = self._resume(setup, point)
                start_step = state.step if start_step is None else min(start_step, state.step)
            if state.diverged is None and state.step < point:
                # the stable phase: the longest run's schedule, the same LR as every run's here
                _train(setup, state, point, setups[longest].plan.steps, self.progress, longest)
            if state.diverged is not None:  # diverged in the stable phase: so would this run alone
                self._finish(trial, {**_result(setup, state, 0.0), "tokens_trained": 0})
                continue
            self._write_checkpoint(point, state)
            trunk_s = time.perf_counter() - started
            branch_started = time.perf_counter()
            _train(setup, state, setup.plan.steps, setup.plan.steps, self.progress, trial.run_id())
            result = _result(setup, state, time.perf_counter() - branch_started)
            cooled = (setup.plan.steps - point) * setup.plan.batch_tokens
            if trial.run_id() == longest:  # charged the stable phase this call trained
                result["tokens_trained"] = cooled + (point - start_step) * setup.plan.batch_tokens
                result["wall_s"] += trunk_s
            else:
                result["tokens_trained"] = cooled
            self._finish(trial, result)
            state = None  # the trunk goes on from the checkpoint, as a resumed trunk would

    def _resume(self, setup: _Setup, point: int) -> _State:
        """The latest checkpointed state at or before `point`, or a fresh one (the first
        time, the one built to check the runs: its RNG is where a run alone's is)."""
        fresh, self.fresh = self.fresh, None
        for step in sorted(_checkpoints(self.trunk_dir), reverse=True):
            if step <= point:
                state = _load(_checkpoints(self.trunk_dir)[step], setup, self.id)
                if state is not None:
                    return state
        return fresh if fresh is not None else _fresh(setup)

    def _write_checkpoint(self, point: int, state: _State) -> None:
        path = self.trunk_dir / f"trunk-{point:09d}.pt"
        if not path.exists():
            _save(path, state, self.id)
        for step, old in _checkpoints(self.trunk_dir).items():
            if step < point:  # every branch that needed it has finished (branches run in order)
                old.unlink(missing_ok=True)

    def _check_disk(self, state: _State) -> None:
        """Two checkpoints (model + AdamW's two moments, float32) must fit the free disk:
        checked before the trunk trains its first step."""
        n = sum(p.numel() for p in state.model.parameters())
        need = 2 * (3 * 4 * n + (1 << 20))
        free = shutil.disk_usage(self.trunk_dir).free
        if need > free:
            raise UserError(f"trunk {self.id} needs {need / 1e9:.2f} GB for its 2 checkpoints but {self.trunk_dir} has "
                            f"{free / 1e9:.2f} GB free: expected more disk, or --branch off")

    def _deliver_stored(self, trial: Trial) -> bool:
        path = self.trunk_dir / f"branch-{trial.run_id()}.json"
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        self.on_result(trial.run_id(), result)
        return True

    def _finish(self, trial: Trial, result: dict) -> None:
        """A finished branch: its result made durable (a later call delivers it, never
        retrains it), then handed to on_result."""
        result = {**result, "trunk": self.id}
        result.setdefault("tokens_trained", 0)
        write_atomic(self.trunk_dir / f"branch-{trial.run_id()}.json", json.dumps(result) + "\n")
        self.on_result(trial.run_id(), result)


def _sentence(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]

