"""Bad input to `steplaw sweep`, `steplaw runs` and the sweep store: one line on stderr,
exit 2, no traceback, nothing run. One row per mistake; add a row with every bug."""
import os
import sqlite3

import pytest
import sweep_fakes  # noqa: F401  (the run function the commands name)

from steplaw.cli import main
from steplaw.models.config import ModelConfig
from steplaw.sweep.store import ResultStore
from steplaw.train.config import RunConfig

BASE = ["--params", "20K", "--tokens", "65536", "--lrs", "0.005", "0.01", "--batch-sizes", "512", "--seq-len", "64",
        "--run-fn", "sweep_fakes:fake_run", "--workers", "1", "--threads-per-worker", "1", "--quiet"]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


FLAG_CASES = {
    "lr-scale 0": ["--lr-scale", "0"],
    "lr-scale -1": ["--lr-scale", "-1"],
    "batch-scale -1": ["--batch-scale", "-1"],
    "batch-scale nan": ["--batch-scale", "nan"],
    "lr-span below 1": ["--lr-span", "0.5"],
    "lr-points 0": ["--lr-points", "0"],
    "batch-points -2": ["--batch-points", "-2"],
    "min-steps 0": ["--min-steps", "0"],
    "seq-len 0": ["--seq-len", "0"],
    "seq-len -64": ["--seq-len", "-64"],
    "top-k above experts": ["--moe-experts", "2", "--moe-topk", "4"],
    "experts -3": ["--moe-experts", "-3"],
    "experts 0": ["--moe-experts", "0"],
    "top-k without experts": ["--moe-topk", "2"],
    "lrs inf": ["--lrs", "inf"],
    "lrs nan": ["--lrs", "nan"],
    "lrs negative": ["--lrs", "-0.01"],
    "batch not whole sequences": ["--batch-sizes", "100"],
    "set seq_len=abc": ["--set", "seq_len=abc"],
    "set seq_len=-5": ["--set", "seq_len=-5"],
    "set seq_len float": ["--set", "seq_len=64.5"],
    "set schedule=bogus": ["--set", "schedule=bogus"],
    "set seed=abc": ["--set", "seed=abc"],
    "set seed=-1": ["--set", "seed=-1"],
    "set seed=2^64": ["--set", f"seed={2**64}"],
    "set micro_batch_tokens=100": ["--set", "micro_batch_tokens=100"],
    "set weight_decay=nan": ["--set", "weight_decay=NaN"],
    "set weight_decay=-5": ["--set", "weight_decay=-5"],
    "set grad_clip=-1": ["--set", "grad_clip=-1"],
    "set beta2=1": ["--set", "beta2=1.0"],
    "set eps=0": ["--set", "eps=0"],
    "set precision=fp8": ["--set", "precision=fp8"],
    "set optimizer=sgd": ["--set", "optimizer=sgd"],
    "set device=tpu": ["--set", "device=tpu"],
    "set unknown key": ["--set", "nosuch=1"],
    "set min_lr_ratio=2": ["--set", "min_lr_ratio=2"],
    "objective bogus": ["--objective", "bogus"],
    "objective val_loss, no eval tokens": ["--objective", "val_loss", "--set", "eval_tokens=0"],
    "set data missing": ["--set", "data=/nonexistent/tokens"],
    "workers 0": ["--workers", "0"],
    "max-attempts 0": ["--max-attempts", "0"],
    "threads 0": ["--threads-per-worker", "0"],
    "run-fn without colon": ["--run-fn", "sweep_fakes"],
    "run-fn missing module": ["--run-fn", "nosuchmodule:run"],
    "tokens below one batch": ["--tokens", "100"],
    "params above the store's integers": ["--params", "1e30"],
    "tokens above the store's integers": ["--tokens", "1e25"],
    "params above any model": ["--params", "1e16"],
    "ray with no CPUs nor GPUs per run": ["--executor", "ray", "--cpus-per-run", "0"],
    "address with the local executor": ["--address", "127.0.0.1:6379"],
    "cpus-per-run with the local executor": ["--cpus-per-run", "2"],
    "gpus-per-run with the local executor": ["--gpus-per-run", "0.25"],
    "workers with ray": ["--executor", "ray", "--workers", "2"],
    "threads-per-worker with ray": ["--executor", "ray", "--threads-per-worker", "2"],
    "workers-per-gpu with ray": ["--executor", "ray", "--workers-per-gpu", "2"],
    "max-batch with the grid planner": ["--max-batch", "4096"],
    "cell-budget with the grid planner": ["--cell-budget", "8"],
    "total-budget with the grid planner": ["--total-budget", "8"],
    "set seq_len contradicts --seq-len": ["--set", "seq_len=128"],
    "set the same key twice": ["--set", "seed=1", "--set", "seed=2"],
}
if not _cuda():
    FLAG_CASES["set device=cuda without a GPU"] = ["--set", "device=cuda"]


def assert_one_line_error(code, capsys, ran_nothing_in=None):
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, captured.err
    assert len(lines) == 1, captured.err
    assert "error:" in lines[0] and "Traceback" not in captured.err
    if ran_nothing_in is not None:
        assert not (ran_nothing_in / "runs").exists()
    return lines[0]


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize("name", sorted(FLAG_CASES))
def test_bad_sweep_flag(name, dry_run, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--out", str(out)] + BASE + FLAG_CASES[name] + (["--dry-run"] if dry_run else [])
    assert_one_line_error(main(argv), capsys, ran_nothing_in=out)


SPEC_CASES = {
    "tokens wrong type": ("toml", 'models = [1e6]\ntokens = ["abc"]\n'),
    "lr_points wrong type": ("toml", 'models = [1e6]\ntokens = [65536]\nlr_points = "five"\n'),
    "lr_span nan": ("toml", "models = [1e6]\ntokens = [65536]\nlr_span = nan\n"),
    "models not a list": ("toml", "models = 5\ntokens = [65536]\n"),
    "params wrong type": ("toml", 'models = [{params = "x"}]\ntokens = [65536]\n'),
    "fixed seed wrong type": ("toml", 'models = [1e6]\ntokens = [65536]\n[fixed]\nseed = "abc"\n'),
    "fixed not a table": ("toml", "models = [1e6]\ntokens = [65536]\nfixed = 3\n"),
    "unknown key": ("toml", "models = [1e6]\ntokens = [65536]\nfoo = 1\n"),
    "unknown model "
    "field": ("toml", "models = [{d_model = 32, n_layers = 2, n_heads = 2, d_ff = 64, colour = 1}]\ntokens = [65536]\n"),
    "unknown moe key": ("toml", "models = [{params = 1e6, moe = {n_experts = 4, bogus = 1}}]\ntokens = [65536]\n"),
    "top_k above n_experts": ("toml", "models = [{params = 1e6, moe = {n_experts = 2, top_k = 4}}]\ntokens = [65536]\n"),
    "moe wrong type": ("toml", 'models = [{params = 1e6, moe = {n_experts = "many"}}]\ntokens = [65536]\n'),
    "d_model not divisible by "
    "heads": ("toml", "models = [{d_model = 30, n_layers = 2, n_heads = 4, d_ff = 64}]\ntokens = [65536]\n"),
    "shape wrong type": ("toml", 'models = [{d_model = "wide", n_layers = 2, n_heads = 2, d_ff = 64}]\ntokens = [65536]\n'),
    "seq_len above max_seq_len": ("toml", "models = [{d_model = 32, n_layers = 2, n_heads = 2, d_ff = 64, max_seq_len = 64}]\n"
                                          "tokens = [65536]\nbatch_sizes = [1024]\n[fixed]\nseq_len = 128\n"),
    "infinite tokens": ("toml", "models = [1e6]\ntokens = [inf]\n"),
    "negative tokens": ("toml", "models = [1e6]\ntokens = [-5]\n"),
    "vocab_size 0": ("toml", "models = [1e6]\ntokens = [65536]\nvocab_size = 0\n"),
    "invalid TOML": ("toml", "models = [1e6\n"),
    "non-UTF-8 bytes": ("toml", b"models = [1e6]\ntokens = [65536]\n# caf\xe9\n"),
    "invalid JSON": ("json", '{"models": [1e6], "tokens": [65536],'),
    "JSON wrong type": ("json", '{"models": [1e6], "tokens": [65536], "lr_points": 2.5}'),
    "JSON a list": ("json", "[1, 2, 3]"),
    "JSON sweep not a table": ("json", '{"sweep": [1]}'),
    "JSON bool batch": ("json", '{"models": [1e6], "tokens": [65536], "batch_sizes": [true]}'),
    "params text not a count": ("json", '{"models": ["1M params"], "tokens": [65536]}'),
    "params text above any model": ("toml", 'models = ["1e30"]\ntokens = [65536]\n'),
    "tokens text above the store's integers": ("toml", 'models = [1e6]\ntokens = ["1e25"]\n'),
    "tokens text not whole": ("yaml", "models: [1e6]\ntokens: [6.55365e4]\n"),  # YAML text: 65536.5
    "batch text not a count": ("json", '{"models": [1e6], "tokens": [65536], "batch_sizes": ["big"]}'),
    "lr text not a number": ("json", '{"models": [1e6], "tokens": [65536], "lrs": ["fast"]}'),
    "shape above any model": ("toml", "models = [{d_model = 1000000, n_layers = 100000, n_heads = 2, d_ff = 64}]\n"
                                      "tokens = [65536]\n"),
}


@pytest.mark.parametrize("name", sorted(SPEC_CASES))
def test_bad_spec_file(name, tmp_path, capsys):
    suffix, text = SPEC_CASES[name]
    if suffix == "yaml":
        pytest.importorskip("yaml")
    path = tmp_path / f"spec.{suffix}"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    out = tmp_path / "sweep"
    argv = ["sweep", str(path), "--out", str(out), "--run-fn", "sweep_fakes:fake_run", "--quiet", "--dry-run"]
    assert_one_line_error(main(argv), capsys, ran_nothing_in=out)


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_data_vocabulary_above_the_models_is_refused(dry_run, tmp_path, capsys):
    import numpy as np

    from steplaw.data.tokens import write_token_file

    data = tmp_path / "tokens"
    data.mkdir()
    for split in ("train", "val"):
        write_token_file(data / f"{split}.bin", np.arange(4096) % 1000, vocab_size=1000)
    out = tmp_path / "sweep"
    argv = ["sweep", "--out", str(out)] + BASE + ["--set", f"data={data}"] + (["--dry-run"] if dry_run else [])
    line = assert_one_line_error(main(argv), capsys, ran_nothing_in=out)
    assert "1000-token vocabulary" in line and "vocab_size is 256" in line


def test_spec_path_is_a_directory(tmp_path, capsys):
    assert_one_line_error(main(["sweep", str(tmp_path), "--out", str(tmp_path / "s"), "--dry-run"]), capsys)


def test_out_is_an_existing_file(tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("not a sweep")
    assert_one_line_error(main(["sweep", "--out", str(out)] + BASE), capsys)
    assert_one_line_error(main(["sweep", "--out", str(out), "--dry-run"] + BASE), capsys)
    assert out.read_text() == "not a sweep"


def test_out_below_a_file_or_in_proc(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert_one_line_error(main(["sweep", "--out", str(tmp_path / "file" / "sweep")] + BASE), capsys)
    assert_one_line_error(main(["sweep", "--out", "/proc/steplaw-sweep-test"] + BASE), capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_out_in_an_unwritable_place(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert_one_line_error(main(["sweep", "--out", str(locked / "sweep")] + BASE), capsys)
        assert_one_line_error(main(["sweep", "--out", str(locked)] + BASE), capsys)
    finally:
        locked.chmod(0o700)


# -- damaged stores --------------------------------------------------------------------------

def small_store(sweep_dir, runs=40):
    model = ModelConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=64)
    configs = [RunConfig(model=model, tokens=2**16, lr=0.001 * (i + 1), batch_tokens=512, seq_len=64) for i in range(runs)]
    with ResultStore(sweep_dir) as store:
        store.add_runs([{**c.to_dict(), "run_id": c.run_id()} for c in configs])
        store.record_results([(c.run_id(), {"status": "ok", "final_train_loss": 3.0, "curve": [(i, 3.0) for i in range(50)]},
                               None, None, None) for c in configs])
    return configs


def damage(path, how):
    if how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(b"this is not a database at all\n" * 100)
    elif how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "header only":
        path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize("how", ["empty", "garbage", "truncated", "header only"])
@pytest.mark.parametrize("command", [["runs"], ["runs", "--csv"], ["runs", "--specs"], ["fit"], ["report"]])
def test_damaged_store_is_refused_by_readers(how, command, tmp_path, capsys):
    sweep = tmp_path / "s"
    small_store(sweep)
    damage(sweep / "runs.sqlite", how)
    line = assert_one_line_error(main(command + [str(sweep)]), capsys)
    assert "runs.sqlite" in line


def test_store_that_is_a_directory(tmp_path, capsys):
    (tmp_path / "s" / "runs.sqlite").mkdir(parents=True)
    assert "not a file" in assert_one_line_error(main(["runs", str(tmp_path / "s")]), capsys)


@pytest.mark.parametrize("argv", [["runs", "{out}"], ["runs", "{out}/nosuch"], ["runs", "{out}/file"],
                                  ["runs", "{out}/s", "-o", "{out}"], ["runs", "{out}/s", "-o", "{out}/file/x.csv"],
                                  ["runs", "{out}/s", "-o", "/proc/steplaw-runs.csv"]])
def test_bad_runs_arguments(argv, tmp_path, capsys):
    small_store(tmp_path / "s", runs=2)
    (tmp_path / "file").write_text("x")
    argv = [a.format(out=tmp_path) for a in argv]
    assert_one_line_error(main(argv), capsys)


def test_runs_output_is_written_atomically(tmp_path, capsys):
    small_store(tmp_path / "s", runs=3)
    target = tmp_path / "runs.csv"
    assert main(["runs", str(tmp_path / "s"), "--csv", "-o", str(target)]) == 0
    assert target.read_text().startswith("run_id,status,spec_id,N,")
    assert main(["runs", str(tmp_path / "s"), "--json", "-o", str(tmp_path / "new" / "dir" / "runs.json")]) == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_newer_schema_is_refused(tmp_path, capsys):
    small_store(tmp_path / "s", runs=1)
    db = sqlite3.connect(tmp_path / "s" / "runs.sqlite")
    with db:
        db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    db.close()
    assert "schema 99" in assert_one_line_error(main(["runs", str(tmp_path / "s")]), capsys)
