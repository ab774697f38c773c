"""The bad-input suite: what a careless user types gets one line and exit code 2.

Each CLI case is an argv run in-process through `steplaw.cli.main` (a few also as a real
subprocess), and must give exit code 2, exactly one line on stderr that contains the
expected words, nothing on stdout, and no traceback. Python API cases must raise a
UserError whose message is one line. Training is forbidden in these cases (the runner
is replaced by one that fails the test): every mistake is caught before any work.

Placeholders in argv ({file}, {dir}, ...) are paths made once per module by `paths`.
Add a case for every bad input found; keep each case fast (no training).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from steplaw.cli import main
from steplaw.errors import UserError

TRAIN = ["train", "--params", "100k", "--tokens", "16384", "--lr", "3e-3", "--batch-tokens", "2048",
         "--device", "cpu", "--optimizer", "torch", "--quiet"]
PREDICT = ["predict", "--params", "1e9", "--tokens", "1e11"]


def train(*extra: str) -> list[str]:
    """TRAIN with flags replaced or added."""
    argv = list(TRAIN)
    extra = list(extra)
    while extra:
        flag = extra.pop(0)
        value = extra.pop(0) if extra and not extra[0].startswith("--") else None
        if flag in argv and value is not None:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag] + ([value] if value is not None else [])
    return argv


def without(argv: list[str], flag: str) -> list[str]:
    i = argv.index(flag)
    return argv[:i] + argv[i + 2:]


CLI_CASES = [
    # ---- train: numbers
    ("train-wd-nan", train("--weight-decay", "nan"), "argument --weight-decay: 'nan': expected a finite number"),
    ("train-wd-neg", train("--weight-decay", "-5"), "argument --weight-decay: '-5': expected a number >= 0"),
    ("train-wd-inf", train("--weight-decay", "inf"), "finite"),
    ("train-lr-nan", train("--lr", "nan"), "--lr"),
    ("train-lr-zero", train("--lr", "0"), "--lr"),
    ("train-lr-neg", train("--lr", "-1e-3"), "argument --lr: '-1e-3': expected a number > 0"),
    ("train-lr-inf", train("--lr", "inf"), "finite"),
    ("train-lr-word", train("--lr", "fast"), "not a number"),
    ("train-params-nan", train("--params", "nan"), "--params"),
    ("train-params-zero", train("--params", "0"), "--params"),
    ("train-params-neg", train("--params", "-2M"), "argument --params: '-2M' must be a positive"),
    ("train-params-tiny", train("--params", "500"), "at least 1000"),
    ("train-tokens-nan", train("--tokens", "nan"), "--tokens"),
    ("train-tokens-zero", train("--tokens", "0"), "--tokens"),
    ("train-tokens-neg", train("--tokens", "-1"), "argument --tokens: '-1' must be a positive"),
    ("train-tokens-fraction", train("--tokens", "1.5"), "whole"),
    ("train-tokens-overflow", train("--tokens", "1e400"), "--tokens"),
    ("train-tokens-below-batch", train("--tokens", "1000"), "less than one batch"),
    ("train-batch-zero", train("--batch-tokens", "0"), "--batch-tokens"),
    ("train-batch-nan", train("--batch-tokens", "nan"), "--batch-tokens"),
    ("train-batch-neg", train("--batch-tokens", "-2048"), "--batch-tokens"),
    ("train-batch-not-multiple", train("--batch-tokens", "1000"), "not a multiple of seq_len=128"),
    ("train-seq-zero", train("--seq-len", "0"), "--seq-len"),
    ("train-seq-neg", train("--seq-len", "-64"), "--seq-len"),
    ("train-seq-word", train("--seq-len", "abc"), "--seq-len"),
    ("train-micro-not-multiple", train("--micro-batch-tokens", "100"), "micro_batch_tokens=100"),
    ("train-micro-not-dividing", train("--micro-batch-tokens", "384"), "does not divide"),
    ("train-warmup-zero", train("--warmup-tokens", "0"), "--warmup-tokens"),
    ("train-warmup-too-long", train("--warmup-tokens", "1G"), "warmup_tokens"),
    ("train-min-lr-ratio-big", train("--min-lr-ratio", "2"), "min_lr_ratio=2"),
    ("train-min-lr-ratio-nan", train("--min-lr-ratio", "nan"), "--min-lr-ratio"),
    # ---- train: seeds
    ("train-seed-neg", train("--seed", "-1"), "argument --seed: '-1': expected a whole number >= 0"),
    ("train-seed-2^64+1", train("--seed", str(2**64 + 1)), "seed="),
    ("train-seed-2^63", train("--seed", str(2**63)), "[0, 2^63)"),
    ("train-seed-word", train("--seed", "abc"), "--seed"),
    ("train-seed-fraction", train("--seed", "1.5"), "--seed"),
    # ---- train: MoE flags
    ("train-moe-zero-experts", train("--moe-experts", "0"), "argument --moe-experts: '0': expected a whole number >= 1"),
    ("train-moe-neg-experts", train("--moe-experts", "-3"), "--moe-experts"),
    ("train-moe-topk-gt-experts", train("--moe-experts", "2", "--moe-topk", "4"), "--moe-topk 4 exceeds"),
    ("train-moe-topk-zero", train("--moe-experts", "4", "--moe-topk", "0"), "--moe-topk"),
    ("train-moe-topk-alone", train("--moe-topk", "2"), "--moe-topk applies to MoE models only"),
    ("train-moe-shared-alone", train("--moe-shared", "1"), "--moe-shared applies to MoE models only"),
    ("train-moe-shared-neg", train("--moe-experts", "4", "--moe-shared", "-1"), "--moe-shared"),
    ("train-moe-experts-too-many", train("--params", "20K", "--moe-experts", "1000"),
     "n_params=20000 is too small for 1000 experts per MoE layer"),
    ("train-params-active-dense", train("--params-active"), "--params-active"),
    # ---- train: names and flags
    ("train-device-word", train("--device", "gpu"), "device='gpu'"),
    ("train-device-bad-index", train("--device", "cuda:x"), "device='cuda:x'"),
    ("train-schedule", train("--schedule", "bogus"), "--schedule"),
    ("train-precision", train("--precision", "fp16"), "--precision"),
    ("train-checkpoint-zero", train("--checkpoint-every", "0"), "--checkpoint-every"),
    ("train-checkpoint-no-out", train("--checkpoint-every", "5"), "--checkpoint-every needs a run directory"),
    ("train-missing-lr", without(TRAIN, "--lr"), "--lr"),
    ("train-unknown-flag", train("--bogus", "1"), "--bogus"),
    # ---- train: paths (checked before training)
    ("train-out-is-file", train("--out", "{file}"), "is a file"),
    ("train-out-under-file", train("--out", "{file}/run"), "is a file, not a directory"),
    ("train-out-other-run", train("--out", "{other_run}"), "result of another run"),
    ("train-data-missing", train("--data", "{missing}"), "does not exist"),
    ("train-data-is-file", train("--data", "{file}"), "is a file"),
    ("train-data-empty-dir", train("--data", "{dir}"), "train.bin"),
    ("train-data-ids-beyond-vocab", train("--data", "{bad_ids}"), "outside its vocabulary of 256"),
    ("train-data-truncated", train("--data", "{truncated}"), "bytes, expected"),
    ("train-data-bad-sidecar", train("--data", "{bad_sidecar}"), "token sidecar"),
    # ---- data prepare
    ("prepare-missing", ["data", "prepare", "{missing}", "-o", "{new}"], "does not exist"),
    ("prepare-dir-as-text", ["data", "prepare", "{dir}", "-o", "{new}"], "is a directory"),
    ("prepare-latin1", ["data", "prepare", "{latin1}", "-o", "{new}"], "not UTF-8"),
    ("prepare-empty-text", ["data", "prepare", "{empty}", "-o", "{new}"], "too little"),
    ("prepare-out-is-file", ["data", "prepare", "{text}", "-o", "{file}"], "is a file"),
    ("prepare-out-under-file", ["data", "prepare", "{text}", "-o", "{file}/tok"], "is a file, not a directory"),
    ("prepare-val-zero", ["data", "prepare", "{text}", "-o", "{new}", "--val-fraction", "0"], "--val-fraction"),
    ("prepare-val-big", ["data", "prepare", "{text}", "-o", "{new}", "--val-fraction", "0.7"], "val_fraction"),
    ("prepare-val-nan", ["data", "prepare", "{text}", "-o", "{new}", "--val-fraction", "nan"], "--val-fraction"),
    ("prepare-vocab-zero", ["data", "prepare", "{text}", "-o", "{new}", "--vocab-size", "0"], "--vocab-size"),
    ("prepare-bpe-vocab-small", ["data", "prepare", "{text}", "-o", "{new}", "--tokenizer", "bpe", "--vocab-size", "100"], "at least 257"),
    ("prepare-bpe-vocab-huge", ["data", "prepare", "{text}", "-o", "{new}", "--tokenizer", "bpe", "--vocab-size", "1000000000"],
     "vocab_size=1000000000: expected a BPE vocabulary of at least 257 tokens (the 256 bytes and one merge) and at most 2^20"),
    ("prepare-byte-vocab", ["data", "prepare", "{text}", "-o", "{new}", "--vocab-size", "1000"],
     "--vocab-size 1000 applies to --tokenizer bpe only"),
    ("prepare-no-out", ["data", "prepare", "{text}"], "--out"),
    ("prepare-tokenizer", ["data", "prepare", "{text}", "-o", "{new}", "--tokenizer", "wordpiece"], "--tokenizer"),
    ("data-no-subcommand", ["data"], "SUBCOMMAND"),
    # ---- predict
    ("predict-params-nan", ["predict", "--params", "nan", "--tokens", "1e11"], "--params"),
    ("predict-params-zero", ["predict", "--params", "0", "--tokens", "1e11"], "--params"),
    ("predict-tokens-neg", ["predict", "--params", "1e9", "--tokens", "-5"], "--tokens"),
    ("predict-tokens-inf", ["predict", "--params", "1e9", "--tokens", "inf"], "--tokens"),
    ("predict-missing-tokens", ["predict", "--params", "1e9"], "--tokens"),
    ("predict-unknown-law", PREDICT + ["--law", "nosuch"], "nosuch"),
    ("predict-seq-zero", PREDICT + ["--seq-len", "0"], "--seq-len"),
    ("predict-active-gt-total", PREDICT + ["--moe-active", "2e9"], "n_active"),
    ("predict-compute-neg", PREDICT + ["--compute", "-1"], "--compute"),
    ("predict-empty-law", PREDICT + ["--law", ""], "--law"),
    # ---- top level
    ("unknown-command", ["fly"], "invalid choice"),
]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    from steplaw.data.tokens import prepare, write_token_file
    from steplaw.train.checkpoint import save_result
    from steplaw.train.config import RunResult

    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "file.txt").write_text("not a directory\n")
    (root / "dir").mkdir()
    text = root / "text.txt"
    text.write_text("In the beginning was the word, and the word was with the text. " * 200)
    (root / "latin1.txt").write_bytes("caf\u00e9 na\u00efve \u00e0 la carte\n".encode("latin-1") * 50)
    (root / "empty.txt").write_bytes(b"")
    prepare([text], root / "good")
    # Ids up to 999 in a file whose sidecar claims a byte vocabulary.
    (root / "bad_ids").mkdir()
    for split in ("train", "val"):
        write_token_file(root / "bad_ids" / f"{split}.bin", np.arange(4096) % 1000, 1000)
        sidecar = root / "bad_ids" / f"{split}.json"
        sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "vocab_size": 256}))
    (root / "big_vocab").mkdir()  # a 1000-token vocabulary, declared: more than the model's 256
    for split in ("train", "val"):
        write_token_file(root / "big_vocab" / f"{split}.bin", np.arange(4096) % 1000, 1000)
    for name in ("truncated", "bad_sidecar"):
        (root / name).mkdir()
        for split in ("train", "val"):
            write_token_file(root / name / f"{split}.bin", np.arange(4096) % 256, 256)
    (root / "truncated" / "train.bin").write_bytes((root / "truncated" / "train.bin").read_bytes()[:-3])
    (root / "bad_sidecar" / "train.json").write_text("{not json")
    save_result(root / "other_run", RunResult(status="ok", run_id="0123456789abcdef"))
    return {
        "file": str(root / "file.txt"),
        "dir": str(root / "dir"),
        "missing": str(root / "missing"),
        "big_vocab": str(root / "big_vocab"),
        "new": str(root / "new_out"),
        "text": str(text),
        "latin1": str(root / "latin1.txt"),
        "empty": str(root / "empty.txt"),
        "bad_ids": str(root / "bad_ids"),
        "truncated": str(root / "truncated"),
        "bad_sidecar": str(root / "bad_sidecar"),
        "other_run": str(root / "other_run"),
    }


@pytest.fixture
def no_training(monkeypatch):
    """Every case must be refused before training starts: the runner is replaced by one
    that fails the test. It keeps the runner's first check (a run directory holding
    another run's result is refused), which comes before any training."""
    import steplaw.train.runner as runner
    from steplaw.train import checkpoint

    def refuse(config, run_dir=None, **kwargs):
        if run_dir is not None:
            checkpoint.load_result(Path(run_dir), config.run_id())
        raise AssertionError("a bad input reached training")

    monkeypatch.setattr(runner, "run", refuse)


def assert_one_line_error(err: str, match: str) -> None:
    assert "Traceback" not in err, err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0], f"expected one line on stderr, got {err!r}"
    assert match in lines[0], f"{match!r} not in {lines[0]!r}"


def _cases(cases):
    """pytest params (id first in each case; a pytest.param keeps its marks)."""
    out = []
    for case in cases:
        if hasattr(case, "values"):
            out.append(pytest.param(*case.values[1:], id=case.values[0], marks=case.marks))
        else:
            out.append(pytest.param(*case[1:], id=case[0]))
    return out


@pytest.mark.parametrize("argv,match", _cases(CLI_CASES))
def test_cli_bad_input(argv, match, paths, no_training, capsys):
    code = main([arg.format(**paths) for arg in argv])
    out, err = capsys.readouterr()
    assert code == 2, (code, err)
    assert out == ""
    assert_one_line_error(err, match)


def test_case_ids_are_unique():
    ids = [p.id for p in _cases(CLI_CASES)]
    assert len(ids) == len(set(ids))


def _unwritable_dir(tmp_path):
    """A directory this process may not write in, or None when it may write anywhere (root)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if not os.access(locked, os.W_OK):
        return locked
    if os.path.isdir("/proc/1") and not os.access("/proc/1", os.W_OK):
        return "/proc/1"
    return None


@pytest.mark.parametrize("argv", [train("--out", "{place}/run"), ["data", "prepare", "{text}", "-o", "{place}/tok"]],
                         ids=["train", "prepare"])
def test_unwritable_output_place(argv, paths, no_training, capsys, tmp_path):
    place = _unwritable_dir(tmp_path)
    if place is None:
        pytest.skip("every directory is writable here")
    code = main([arg.format(place=place, **paths) for arg in argv])
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, "no permission to write")


@pytest.mark.parametrize("argv,match", [
    (train("--lr", "nan"), "--lr"),
    (["data", "prepare", "{latin1}", "-o", "{new}"], "not UTF-8"),
], ids=["train-lr-nan", "prepare-latin1"])
def test_cli_bad_input_subprocess(argv, match, paths):
    """The real entry point (python -m steplaw): exit code 2, one line, no traceback."""
    completed = subprocess.run([sys.executable, "-m", "steplaw", *[a.format(**paths) for a in argv]],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    assert completed.stdout == ""
    assert_one_line_error(completed.stderr, match)


# ---------------------------------------------------------------- python -m steplaw.cli.ddp

def _config_dict(**changes) -> dict:
    from steplaw.models.config import ModelConfig
    from steplaw.train.config import RunConfig

    config = RunConfig(model=ModelConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=64),
                       tokens=4096, lr=3e-3, batch_tokens=512, seq_len=64, device="cpu")
    return {**config.to_dict(), **changes}


DDP_CASES = [
    ("missing-config", lambda d: [str(d / "nope.json")], "No such file"),
    ("config-is-dir", lambda d: [str(d)], "directory"),
    ("invalid-json", lambda d: [_write(d / "c.json", "{oops")], "not JSON"),
    ("non-utf8", lambda d: [_write(d / "c.json", b"\xff\xfe{}")], "not JSON"),
    ("unknown-key", lambda d: [_write(d / "c.json", json.dumps(_config_dict(learning_rate=1)))], "unknown setting(s) 'learning_rate'"),
    ("missing-key", lambda d: [_write(d / "c.json", json.dumps({"model": _config_dict()["model"]}))], "missing setting(s)"),
    ("negative-lr", lambda d: [_write(d / "c.json", json.dumps(_config_dict(lr=-1)))], "lr=-1"),
    ("seed-string", lambda d: [_write(d / "c.json", json.dumps(_config_dict(seed="abc")))], "seed='abc'"),
    ("bad-model", lambda d: [_write(d / "c.json", json.dumps(_config_dict(model={**_config_dict()["model"], "vocab_size": 0})))],
     "vocab_size=0"),
    ("result-is-dir", lambda d: [_write(d / "c.json", json.dumps(_config_dict())), str(d)], "is a directory"),
    ("run-dir-is-file", lambda d: [_write(d / "c.json", json.dumps(_config_dict())), "--run-dir", _write(d / "f", "x")],
     "--run-dir"),
    ("no-args", lambda d: [], "required"),
]


def _write(path, content) -> str:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


@pytest.mark.parametrize("make_argv,match", _cases(DDP_CASES))
def test_ddp_bad_input(make_argv, match, tmp_path, no_training, capsys):
    from steplaw.cli import ddp

    code = ddp.main(make_argv(tmp_path))
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert_one_line_error(err, match)
    assert err.startswith("python -m steplaw.cli.ddp: error:")


# ---------------------------------------------------------------- Python API

def _run_config(**changes):
    from steplaw.models.config import ModelConfig
    from steplaw.train.config import RunConfig

    fields = dict(model=ModelConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=128),
                  tokens=16384, lr=3e-3, batch_tokens=2048, seq_len=128)
    return RunConfig(**{**fields, **changes})


def _validate(**changes):
    return lambda: _run_config(**changes).validate()


def _model(**kwargs):
    from steplaw.models.config import ModelConfig

    return lambda: ModelConfig(**kwargs)


def _moe(**kwargs):
    from steplaw.models.config import MoEConfig

    return lambda: MoEConfig(**kwargs)


def _adamw(**kwargs):
    def make():
        import torch

        from steplaw.optim import FusedAdamW

        return FusedAdamW([torch.nn.Parameter(torch.zeros(4))], **kwargs)

    return make


API_CASES = [
    ("validate-weight-decay-nan", _validate(weight_decay=math.nan), "weight_decay=nan"),
    ("validate-weight-decay-neg", _validate(weight_decay=-5), "weight_decay=-5"),
    ("validate-grad-clip-neg", _validate(grad_clip=-1), "grad_clip=-1"),
    ("validate-grad-clip-zero", _validate(grad_clip=0.0), "grad_clip=0.0"),
    ("validate-seed-neg", _validate(seed=-1), "seed=-1"),
    ("validate-seed-huge", _validate(seed=2**64 + 1), "seed=18446744073709551617"),
    ("validate-seed-string", _validate(seed="abc"), "seed='abc'"),
    ("validate-seed-float", _validate(seed=1.0), "seed=1.0"),
    ("validate-schedule", _validate(schedule="bogus"), "schedule='bogus'"),
    ("validate-lr-inf", _validate(lr=math.inf), "lr=inf"),
    ("validate-lr-zero", _validate(lr=0.0), "lr=0.0"),
    ("validate-lr-bool", _validate(lr=True), "lr=True"),
    ("validate-lr-string", _validate(lr="3e-3"), "lr='3e-3'"),
    ("validate-batch-not-multiple", _validate(batch_tokens=100, seq_len=64), "not a multiple of seq_len=64"),
    ("validate-seq-len-zero", _validate(seq_len=0), "seq_len=0"),
    ("validate-seq-len-string", _validate(seq_len="abc"), "seq_len='abc'"),
    ("validate-seq-len-over-model", _validate(seq_len=256, batch_tokens=2048), "max_seq_len=128"),
    ("validate-micro-not-multiple", _validate(micro_batch_tokens=100), "micro_batch_tokens=100"),
    ("validate-micro-not-dividing", _validate(micro_batch_tokens=384), "does not divide"),
    ("validate-tokens-below-batch", _validate(tokens=1024), "less than one batch"),
    ("validate-tokens-inf", _validate(tokens=math.inf), "tokens=inf"),
    ("validate-warmup-neg", _validate(warmup_tokens=-1), "warmup_tokens=-1"),
    ("validate-warmup-too-long", _validate(warmup_tokens=10**9), "warmup_tokens=1000000000"),
    ("validate-min-lr-ratio", _validate(min_lr_ratio=1.5), "min_lr_ratio=1.5"),
    ("validate-decay-fraction-zero", _validate(decay_fraction=0.0), "decay_fraction=0.0"),
    ("validate-beta1-one", _validate(beta1=1.0), "beta1=1.0"),
    ("validate-beta2-neg", _validate(beta2=-0.1), "beta2=-0.1"),
    ("validate-eps-zero", _validate(eps=0.0), "eps=0.0"),
    ("validate-device", _validate(device="gpu"), "device='gpu'"),
    ("validate-precision", _validate(precision="fp16"), "precision='fp16'"),
    ("validate-optimizer", _validate(optimizer="adam"), "optimizer='adam'"),
    ("validate-eval-tokens-neg", _validate(eval_tokens=-1), "eval_tokens=-1"),
    ("validate-compile-string", _validate(compile="yes"), "compile='yes'"),
    ("validate-data-empty", _validate(data=""), "data=''"),
    ("validate-model-dict", _validate(model={"d_model": 64}), "expected a ModelConfig"),
    ("from-dict-unknown", lambda: _run_config().from_dict({**_run_config().to_dict(), "lr_peak": 1}), "unknown setting(s) 'lr_peak'"),
    ("from-dict-missing", lambda: _run_config().from_dict({"model": {}}), "missing setting(s) tokens, lr, batch_tokens"),
    ("from-dict-not-dict", lambda: _run_config().from_dict([1, 2]), "expected a table of settings"),
    ("model-vocab-zero", _model(vocab_size=0), "vocab_size=0"),
    ("model-heads", _model(d_model=130, n_heads=4), "not divisible by n_heads=4"),
    ("model-odd-head", _model(d_model=96, n_heads=32), "odd"),
    ("model-d-model-string", _model(d_model="128"), "d_model='128'"),
    ("model-layers-neg", _model(n_layers=-1), "n_layers=-1"),
    ("model-rope-nan", _model(rope_theta=math.nan), "rope_theta=nan"),
    ("model-moe-first-past-layers", lambda: _model(n_layers=2, moe=_moe(moe_first=5)())(), "no layer would be an MoE layer"),
    ("model-from-dict-unknown", lambda: _model()().from_dict({"width": 3}), "unknown setting(s) 'width'"),
    ("moe-zero-experts", _moe(n_experts=0), "n_experts=0"),
    ("moe-neg-experts", _moe(n_experts=-3), "n_experts=-3"),
    ("moe-topk-gt-experts", _moe(n_experts=2, top_k=4), "top_k=4"),
    ("moe-topk-zero", _moe(top_k=0), "top_k=0"),
    ("moe-score-func", _moe(score_func="relu"), "score_func='relu'"),
    ("moe-capacity-zero", _moe(capacity_factor=0.0), "capacity_factor=0.0"),
    ("moe-aux-neg", _moe(aux_loss_coef=-1.0), "aux_loss_coef=-1.0"),
    ("adamw-lr-neg", _adamw(lr=-1.0), "lr"),
    ("adamw-lr-nan", _adamw(lr=math.nan), "lr"),
    ("adamw-eps-neg", _adamw(eps=-1.0), "eps"),
    ("adamw-beta-one", _adamw(betas=(1.0, 0.999)), "betas[0]"),
    ("adamw-beta2-neg", _adamw(betas=(0.9, -0.1)), "betas[1]"),
    ("adamw-wd-nan", _adamw(weight_decay=math.nan), "weight_decay"),
]


@pytest.mark.parametrize("make,match", _cases(API_CASES))
def test_api_bad_input(make, match):
    with pytest.raises(UserError) as info:
        make()
    message = str(info.value)
    assert "\n" not in message and match in message, message


def test_run_with_a_model_vocabulary_below_the_data_is_refused(paths):
    # `steplaw train` sizes the model to the data; a RunConfig built otherwise (the Python
    # API, a sweep spec) meets the same check as a sweep's validation, before training.
    from steplaw.train.runner import prepare

    with pytest.raises(UserError, match="1000-token vocabulary but the model's vocab_size is 256: expected vocab_size >= 1000"):
        prepare(_run_config(data=paths["big_vocab"], device="cpu"))


def test_validate_names_every_mistake_at_once():
    with pytest.raises(UserError) as info:
        _run_config(lr=-1.0, seed=-1, schedule="bogus").validate()
    message = str(info.value)
    assert "lr=-1.0" in message and "seed=-1" in message and "schedule='bogus'" in message
