"""The run-table contract through the store: one set of names, spec history, failures
that are reported, stores from before the contract, and stores that were damaged."""
import json
import sqlite3

import pytest
import sweep_fakes

from steplaw import runtable
from steplaw.cli import main
from steplaw.models.accounting import param_counts
from steplaw.models.config import ModelConfig, MoEConfig
from steplaw.sweep.driver import run_sweep
from steplaw.sweep.execution import as_result
from steplaw.sweep.executors import InlineExecutor
from steplaw.sweep.store import EXPORT_COLUMNS, ResultStore, export_rows
from steplaw.train.config import RunConfig, RunResult
from steplaw.trainers.steplaw import SteplawTrainer

MODEL = ModelConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=64)
FLAGS = ["--params", "20K", "--tokens", "65536", "--lrs", "0.005", "0.01", "--batch-sizes", "512", "1024",
         "--seq-len", "64", "--run-fn", "sweep_fakes:fake_run", "--workers", "1", "--threads-per-worker", "1", "--quiet"]


def configs(seeds=(0,), lrs=(0.005, 0.01, 0.02), batches=(512, 1024), model=MODEL):
    return [RunConfig(model=model, tokens=2**16, lr=lr, batch_tokens=bs, seq_len=64, seed=seed)
            for seed in seeds for lr in lrs for bs in batches]


def inline(run_dirs=True):
    return lambda: InlineExecutor(sweep_fakes.fake_run, capacity=4, run_dirs=run_dirs)


def test_row_mapping_from_config_result_and_counts():
    moe = ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=64,
                      moe=MoEConfig(n_experts=4, top_k=2, d_expert=32))
    config = RunConfig(model=moe, tokens=2**16, lr=0.01, batch_tokens=512, seq_len=64)
    counts = param_counts(moe)
    result = RunResult(status="ok", final_train_loss=3.25, final_val_loss=float("nan"), compute_flops=1e12,
                       params_non_embedding=counts.non_embedding, params_active=counts.active, params_total=counts.total)
    row = runtable.to_row("abc", config.to_dict(), result.to_dict(), spec_id="s1")
    assert list(row) == runtable.NAMES == EXPORT_COLUMNS
    assert row == {"run_id": "abc", "status": "ok", "spec_id": "s1", "N": counts.non_embedding, "N_active": counts.active,
                   "N_total": counts.total, "D": 2**16, "lr": 0.01, "batch_tokens": 512, "seq_len": 64, "loss": 3.25,
                   "val_loss": None, "compute": 1e12, "n_experts": 4, "top_k": 2, "reason": None,
                   "stack": None, "trainer": "steplaw", "trunk": None, "tokens_trained": 0}
    assert counts.active < counts.non_embedding
    assert set(runtable.BY_NAME) == set(runtable.NAMES) and all(c.description for c in runtable.COLUMNS)


@pytest.mark.parametrize("result", [
    RunResult(status="ok", final_train_loss=3.25, final_val_loss=3.5, compute_flops=1e12, params_non_embedding=100,
              params_active=50, params_total=300, stack="0123456789abcdef"),
    RunResult(status="ok", final_train_loss=3.0, tokens=4096, trunk="fedcba9876543210", tokens_trained=1024),
    RunResult(status="ok", final_val_loss=3.5),  # a val_loss only: never read back as the training loss
    RunResult(status="diverged", reason="loss became nan at step 3", final_train_loss=float("inf")),
    RunResult(status="failed", reason="RuntimeError: boom"),
])
def test_result_from_row_inverts_to_row(result):
    config = configs()[0].to_dict()
    row = runtable.to_row("abc", config, result.to_dict(), {"non_embedding": 7, "active": 7, "total": 9}, "s1")
    back = runtable.result_from_row(row)
    assert runtable.to_row("abc", config, back, {"non_embedding": 7, "active": 7, "total": 9}, "s1") == row
    assert back["final_train_loss"] == runtable.finite_or_none(result.final_train_loss)
    assert back["final_val_loss"] == result.final_val_loss
    assert set(back) <= set(RunResult.__dataclass_fields__)


@pytest.mark.parametrize("version", [1, 2])
def test_export_reads_the_run_table_columns_by_name(version, tmp_path):
    from steplaw.sweep.storefile import EXPORT_EXPRESSIONS, V1_RENAMES, export_select

    assert set(EXPORT_EXPRESSIONS[version]) <= set(runtable.NAMES)  # no expression for a column the table lacks
    if version == 2:
        ResultStore(tmp_path).close()
        conn = sqlite3.connect(tmp_path / "runs.sqlite")
    else:
        conn = sqlite3.connect(":memory:")
        conn.execute(f"CREATE TABLE runs (run_id, status, config, lr, batch_tokens, reason, result, tokens_trained, "
                     f"{', '.join(V1_RENAMES)})")
    cursor = conn.execute(f"SELECT {export_select(version)} FROM runs")
    assert [d[0] for d in cursor.description] == runtable.NAMES
    conn.close()


def test_store_rows_are_run_table_rows(tmp_path):
    runs = configs()
    run_sweep(runs, tmp_path, inline(), progress=False, trainer=SteplawTrainer(), spec={"name": "a"})
    rows = export_rows(tmp_path)
    with ResultStore(tmp_path, readonly=True) as store:
        spec_id = store.meta("spec_id")
        columns = {r[1] for r in store.conn.execute("PRAGMA table_info(runs)")}
    # the store's columns carry the run table's names; `trainer` is read from each run's config
    assert set(EXPORT_COLUMNS) - {"trainer"} <= columns
    for row, config in zip(rows, sorted(runs, key=lambda c: c.run_id())):
        expected = runtable.to_row(config.run_id(), config.to_dict(), as_result(sweep_fakes.fake_run(config)).to_dict(),
                                   {"non_embedding": row["N"], "active": row["N_active"], "total": row["N_total"]}, spec_id)
        assert row == expected


def test_executor_returns_run_results(tmp_path):
    executor = InlineExecutor(sweep_fakes.fake_run, run_dirs=False)
    crash, ok = configs(seeds=(1, 0), lrs=(0.01,), batches=(512,))
    executor.submit("a", crash, None)
    executor.submit("b", ok, None)
    done, _ = executor.poll(0)
    assert [type(c.result) for c in done] == [RunResult, RunResult]
    assert done[0].result.status == "failed" and done[0].result.reason == "RuntimeError: scripted crash"
    assert "Traceback" not in done[0].result.reason and "scripted crash" in done[0].traceback
    assert done[1].result.status == "ok"
    assert as_result({"status": "weird"}).status == "failed" and as_result(3).status == "failed"
    assert as_result(RunResult(status="pending")).status == "failed"
    assert as_result({"status": "ok", "final_train_loss": 2.0, "extra": 1}) == RunResult(status="ok", final_train_loss=2.0)


def test_changed_spec_is_refused_unless_asked(tmp_path, capsys):
    out = str(tmp_path / "s")
    assert main(["sweep", "--out", out] + FLAGS) == 0
    first = json.loads((tmp_path / "s" / "spec.json").read_text())
    capsys.readouterr()
    assert main(["sweep", "--out", out] + FLAGS + ["--set", "schedule=constant"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different spec" in err[0] and "schedule" in err[0] and "--new-spec" in err[0]
    assert json.loads((tmp_path / "s" / "spec.json").read_text()) == first  # not overwritten
    assert len(export_rows(out)) == 4
    # the same spec again is fine (a resume), with or without the flags
    assert main(["sweep", "--out", out, "--quiet", "--run-fn", "sweep_fakes:fake_run"]) == 0
    assert main(["sweep", "--out", out] + FLAGS + ["--set", "schedule=constant", "--new-spec"]) == 0
    rows = export_rows(out)
    assert len(rows) == 8 and len({r["spec_id"] for r in rows}) == 2
    capsys.readouterr()
    assert main(["runs", out, "--specs"]) == 0
    specs = capsys.readouterr().out.strip().splitlines()
    assert len(specs) == 2 and specs[1].split(":")[0].endswith("(current)") and "constant" in specs[1]
    assert main(["runs", out]) == 0
    assert "spec_id" in capsys.readouterr().out.splitlines()[0]


def test_dry_run_refuses_a_changed_spec_as_the_run_does(tmp_path, capsys):
    out = str(tmp_path / "s")
    assert main(["sweep", "--out", out] + FLAGS) == 0
    capsys.readouterr()
    changed = ["sweep", "--out", out] + FLAGS + ["--set", "schedule=constant"]
    assert main(changed) == 2
    refusal = capsys.readouterr().err
    assert main(changed + ["--dry-run"]) == 2
    assert capsys.readouterr().err == refusal and "different spec" in refusal
    assert main(changed + ["--dry-run", "--new-spec"]) == 0
    assert main(["sweep", "--out", out] + FLAGS + ["--dry-run"]) == 0  # the same spec


def test_grid_lists_in_another_order_are_the_same_spec(tmp_path):
    out = str(tmp_path / "s")
    assert main(["sweep", "--out", out] + FLAGS) == 0
    spec = json.loads((tmp_path / "s" / "spec.json").read_text())
    reordered = [{"0.005": "0.01", "0.01": "0.005", "512": "1024", "1024": "512"}.get(flag, flag) for flag in FLAGS]
    assert reordered != FLAGS
    assert main(["sweep", "--out", out, "--dry-run"] + reordered) == 0
    before = export_rows(out)
    assert main(["sweep", "--out", out] + reordered) == 0
    assert export_rows(out) == before  # nothing ran again
    assert json.loads((tmp_path / "s" / "spec.json").read_text()) == spec  # the spec and its id are kept
    with ResultStore(out, readonly=True) as store:
        assert len(store.specs()) == 1


def test_failed_runs_exit_non_zero_with_their_reasons(tmp_path, capsys):
    out = str(tmp_path / "s")
    code = main(["sweep", "--out", out] + FLAGS + ["--set", "seed=1", "--max-attempts", "1"])
    err = capsys.readouterr().err
    assert code == 1
    assert "4 run(s) failed" in err and "  4: RuntimeError: scripted crash" in err
    assert "Traceback" not in err


DAMAGE = {
    "empty (0 bytes)": lambda data: b"",
    "not an SQLite database": lambda data: b"garbage " * 1000,
    "truncated": lambda data: data[: len(data) // 2],
}


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_damaged_store_is_rebuilt_from_run_directories_and_said(how, tmp_path, capsys, monkeypatch):
    log = tmp_path / "log"
    monkeypatch.setenv("SWEEP_FAKE_LOG", str(log))
    runs = configs(lrs=[0.001 * k for k in range(1, 41)])  # enough rows for a store of several pages
    run_sweep(runs, tmp_path / "s", inline(), progress=False, trainer=SteplawTrainer())
    assert len(log.read_text().splitlines()) == 80
    path = tmp_path / "s" / "runs.sqlite"
    path.write_bytes(DAMAGE[how](path.read_bytes()))
    for side in ("runs.sqlite-wal", "runs.sqlite-shm"):
        (tmp_path / "s" / side).unlink(missing_ok=True)
    capsys.readouterr()
    summary = run_sweep(runs, tmp_path / "s", inline(), progress=False, trainer=SteplawTrainer())
    err = capsys.readouterr().err
    assert (how if how != "truncated" else "was ") in err
    assert "rebuilt the store" in err and "from 80 finished run directories" in err
    assert summary.ran == 0 and summary.counts == {"ok": 80}
    assert len(log.read_text().splitlines()) == 80  # nothing trained again
    assert list((tmp_path / "s").glob("runs.sqlite.broken-*"))
    assert [r["loss"] for r in export_rows(tmp_path / "s")] == [
        pytest.approx(sweep_fakes.bowl_loss(c.lr, c.batch_tokens)) for c in sorted(runs, key=lambda c: c.run_id())]


def test_empty_store_without_run_directories_says_everything_trains_again(tmp_path, capsys):
    runs = configs(lrs=(0.01,))
    run_sweep(runs, tmp_path, inline(run_dirs=False), progress=False, trainer=SteplawTrainer())
    (tmp_path / "runs.sqlite").write_bytes(b"")
    capsys.readouterr()
    assert run_sweep(runs, tmp_path, inline(run_dirs=False), progress=False, trainer=SteplawTrainer()).ran == 2
    assert "every run will train again" in capsys.readouterr().err


def test_truncated_spec_json_does_not_break_resume(tmp_path, capsys):
    out = str(tmp_path / "s")
    assert main(["sweep", "--out", out] + FLAGS) == 0
    (tmp_path / "s" / "spec.json").write_text('{"models": [')
    assert main(["sweep", "--out", out, "--quiet", "--run-fn", "sweep_fakes:fake_run"]) == 0
    assert json.loads((tmp_path / "s" / "spec.json").read_text())["tokens"] == [65536]  # rewritten whole


V1_SCHEMA = """
CREATE TABLE runs (run_id TEXT PRIMARY KEY, config TEXT NOT NULL, status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, reason TEXT, n_params INTEGER, n_active INTEGER, n_total INTEGER,
    tokens INTEGER NOT NULL, lr REAL NOT NULL, batch_tokens INTEGER NOT NULL, final_train_loss REAL,
    final_val_loss REAL, compute_flops REAL, tokens_trained INTEGER, steps INTEGER, tokens_per_s REAL, wall_s REAL,
    curve TEXT, result TEXT, host TEXT, versions TEXT, created_at REAL NOT NULL, started_at REAL, finished_at REAL);
CREATE INDEX runs_status ON runs(status);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
INSERT INTO meta VALUES ('schema_version', '1');
"""


def v1_store(sweep_dir, runs):
    sweep_dir.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(sweep_dir / "runs.sqlite")
    db.executescript(V1_SCHEMA)
    counts = param_counts(MODEL)
    with db:
        for i, c in enumerate(runs):
            status, loss = ("ok", 2.5 + i) if i else ("running", None)
            db.execute("INSERT INTO runs(run_id, config, status, n_params, n_active, n_total, tokens, lr, batch_tokens,"
                       " final_train_loss, compute_flops, curve, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                       (c.run_id(), json.dumps(c.to_dict()), status, counts.non_embedding, counts.active, counts.total,
                        c.tokens, c.lr, c.batch_tokens, loss, 1e9, "[]", 1.0))
        db.execute("INSERT INTO meta VALUES ('spec', ?)", (json.dumps({"old": True}),))
    db.close()


def test_v1_store_is_read_as_is_and_migrated_by_the_driver(tmp_path, monkeypatch):
    runs = configs(lrs=(0.01,))
    v1_store(tmp_path, runs)
    before = export_rows(tmp_path)
    assert [set(r) for r in before] == [set(EXPORT_COLUMNS)] * 2
    by_id = {r["run_id"]: r for r in before}
    assert by_id[runs[1].run_id()]["loss"] == 3.5 and by_id[runs[1].run_id()]["seq_len"] == 64
    assert by_id[runs[0].run_id()]["status"] == "pending"
    log = tmp_path / "log"
    monkeypatch.setenv("SWEEP_FAKE_LOG", str(log))
    summary = run_sweep(runs, tmp_path, inline(), progress=False, trainer=SteplawTrainer(), spec={"old": True})
    assert summary.ran == 1 and summary.counts == {"ok": 2}  # the finished v1 run is reused
    after = {r["run_id"]: r for r in export_rows(tmp_path)}
    assert after[runs[1].run_id()]["loss"] == 3.5
    with ResultStore(tmp_path, readonly=True) as store:
        assert store.version == 2 and store.specs()[0][1] == {"old": True}
        spec_id = store.meta("spec_id")
    assert {r["spec_id"] for r in after.values()} == {spec_id}  # the old rows joined the stored spec


def test_runs_columns_describes_every_column(capsys):
    assert main(["runs", "--columns"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == EXPORT_COLUMNS


def test_trunk_and_tokens_trained_columns(tmp_path, capsys):
    """A WSD branch shows its trunk and the tokens it trained (its cooldown); a run alone,
    and a result stored before the fields existed, shows no trunk and its tokens."""
    branch, alone, old = configs(lrs=(0.01,)) + configs(lrs=(0.02,))[:1]
    results = {branch.run_id(): RunResult(status="ok", final_train_loss=3.0, tokens=65536, trunk="0123456789abcdef",
                                          tokens_trained=13107).to_dict(),
               alone.run_id(): RunResult(status="ok", final_train_loss=3.1, tokens=65536, tokens_trained=65536).to_dict(),
               old.run_id(): {k: v for k, v in RunResult(status="ok", final_train_loss=3.2, tokens=65536).to_dict().items()
                              if k not in ("trunk", "tokens_trained")}}
    with ResultStore(tmp_path) as store:
        store.add_runs([{**c.to_dict(), "run_id": c.run_id()} for c in (branch, alone, old)])
        store.record_results([(run_id, result, None, None, None) for run_id, result in results.items()])
    rows = {r["run_id"]: r for r in export_rows(tmp_path)}
    assert (rows[branch.run_id()]["trunk"], rows[branch.run_id()]["tokens_trained"]) == ("0123456789abcdef", 13107)
    assert (rows[alone.run_id()]["trunk"], rows[alone.run_id()]["tokens_trained"]) == (None, 65536)
    assert (rows[old.run_id()]["trunk"], rows[old.run_id()]["tokens_trained"]) == (None, 65536)
    assert main(["runs", str(tmp_path), "--json"]) == 0
    shown = {r["run_id"]: r for r in json.loads(capsys.readouterr().out)}
    assert shown[branch.run_id()]["trunk"] == "0123456789abcdef" and shown[old.run_id()]["tokens_trained"] == 65536
    assert main(["runs", str(tmp_path), "--csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split(",")
    cells = {line.split(",")[0]: dict(zip(header, line.split(","))) for line in lines[1:]}
    assert (cells[branch.run_id()]["trunk"], cells[branch.run_id()]["tokens_trained"]) == ("0123456789abcdef", "13107")
    assert (cells[alone.run_id()]["trunk"], cells[alone.run_id()]["tokens_trained"]) == ("", "65536")
    assert main(["runs", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "trunk" in text.splitlines()[0] and "0123456789abcdef" in text and "13107" in text


def test_v1_store_shows_tokens_trained_as_tokens(tmp_path):
    runs = configs(lrs=(0.01,))
    v1_store(tmp_path, runs)
    db = sqlite3.connect(tmp_path / "runs.sqlite")
    with db:
        db.execute("UPDATE runs SET tokens_trained=tokens WHERE status='ok'")  # what a v1 driver recorded
    db.close()
    rows = {r["run_id"]: r for r in export_rows(tmp_path)}
    assert rows[runs[1].run_id()]["tokens_trained"] == runs[1].tokens and rows[runs[1].run_id()]["trunk"] is None
