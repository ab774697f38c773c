"""`steplaw sweep --replay TABLE`: a table of finished runs replayed as a sweep."""
import csv
import json

import numpy as np
import pytest

from steplaw.cli import main
from steplaw.laws.fit import fit_hparams
from steplaw.laws.synthetic import SyntheticTruth, synthetic_runs
from steplaw.laws.table import read_runs
from steplaw.sweep.store import ResultStore, export_rows


def write_table(path, table, bs_scale=1, bs_name="batch_tokens", extra_rows=()):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["params", "D", "lr", bs_name, "final", "status"])
        for i in range(len(table)):
            loss = "" if not np.isfinite(table.loss[i]) else repr(float(table.loss[i]))
            writer.writerow([table.N[i], table.D[i], repr(float(table.lr[i])), table.batch_tokens[i] / bs_scale, loss,
                             table.status[i]])
        for row in extra_rows:
            writer.writerow(row)


@pytest.fixture(scope="module")
def table():
    # 3 x 3 cells, 9 LRs x 6 batch sizes each, optimum 3x below the Step Law's LR
    truth = SyntheticTruth(lr_coef=1.79 / 3)
    return synthetic_runs(truth, n_values=(6e7, 2.4e8, 9.6e8), d_values=(2e9, 8e9, 3.2e10), lr_steps=9, bs_steps=6,
                          seed=3)


def test_adaptive_replay_is_an_ordinary_sweep_of_table_rows(tmp_path, table, capsys):
    source = tmp_path / "t.csv"
    write_table(source, table)
    out = tmp_path / "replay"
    flags = ["--col-N", "params", "--col-loss", "final"]
    assert main(["sweep", "--replay", str(source), *flags, "--planner", "adaptive", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "planner adaptive (9 bracketed cells)" in err
    rows = export_rows(out)
    assert 0 < len(rows) < 0.5 * len(table)
    # every replayed run is a row of the table, with the table's loss and status
    lookup = {(float(n), float(d), float(lr), float(b)): (s, loss) for n, d, lr, b, s, loss in
              zip(table.N, table.D, table.lr, table.batch_tokens, table.status, table.loss)}
    for row in rows:
        status, loss = lookup[(row["N"], row["D"], row["lr"], row["batch_tokens"])]
        assert row["status"] == ("ok" if status == "ok" else "diverged" if status in ("ok", "diverged") else "failed")
        if row["status"] == "ok":
            assert row["loss"] == loss
    with ResultStore(out, readonly=True) as store:
        assert store.meta("planner") == "adaptive" and len(store.meta("planner_cells")) == 9
    # steplaw runs / fit / report read it
    assert main(["runs", str(out), "--json", "-o", str(tmp_path / "rows.json")]) == 0
    assert len(json.loads((tmp_path / "rows.json").read_text())) == len(rows)
    assert main(["fit", str(out), "--json", "--n-boot", "50"]) == 0
    fitted = json.loads(capsys.readouterr().out)
    assert all(cell["lr_edge"] is None and cell["bs_edge"] is None for cell in fitted["cells"])
    assert main(["report", str(out)]) == 0
    # the same command again replays nothing
    assert main(["sweep", "--replay", str(source), *flags, "--planner", "adaptive", "--out", str(out)]) == 0
    assert f"ran 0, reused {len(rows)}" in capsys.readouterr().err


def test_grid_replay_fits_exactly_as_the_table_and_units_follow_the_fit_flags(tmp_path, table):
    source = tmp_path / "t.csv"
    write_table(source, table, bs_scale=64, bs_name="batch_seqs")  # batch sizes in 64-token sequences
    out = tmp_path / "grid"
    flags = ["--col-N", "params", "--col-loss", "final", "--col-bs", "batch_seqs", "--bs-unit", "sequences",
             "--seq-len", "64"]
    assert main(["sweep", "--replay", str(source), *flags, "--out", str(out), "-q"]) == 0
    replayed = fit_hparams(read_runs(export_rows(out)), n_boot=50).to_dict()
    direct = fit_hparams(table, n_boot=50).to_dict()
    for law in ("lr_law", "bs_law"):
        for key, value in direct[law].items():
            if key != "ci":
                assert replayed[law][key] == pytest.approx(value, rel=1e-6), (law, key)


def test_bad_cells_are_named_one_sentence_each_and_the_rest_goes_on(tmp_path, table, capsys):
    source = tmp_path / "bad.csv"
    first = (repr(float(table.lr[0])), table.batch_tokens[0])
    write_table(source, table, extra_rows=[
        # a cell of two runs
        [1e7, 1e9, 0.01, 65536, 3.1, "ok"], [1e7, 1e9, 0.02, 65536, 3.0, "ok"],
        # a cell with no finite loss
        [2e7, 1e9, 0.01, 65536, "", "diverged"], [2e7, 1e9, 0.02, 65536, "nan", "ok"],
        [2e7, 1e9, 0.04, 65536, "", "failed"],
        # a repeated (lr, B) point in an otherwise good cell
        [table.N[0], table.D[0], first[0], first[1], 2.5, "ok"],
    ])
    out = tmp_path / "r"
    flags = ["--col-N", "params", "--col-loss", "final"]
    assert main(["sweep", "--replay", str(source), *flags, "--planner", "adaptive", "--out", str(out), "-q"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("steplaw sweep: warning: replay cell")]
    assert len(warnings) == 3
    assert any("N=1e+07 D=1e+09 has 2 run(s): expected at least 3" in w for w in warnings)
    assert any("N=2e+07 D=1e+09 has no finished run with a finite loss" in w for w in warnings)
    assert any(f"N={table.N[0]:.4g} D={table.D[0]:.4g} has 2 rows at lr=" in w for w in warnings)
    assert all(w.count(". ") == 0 and w.endswith(".") for w in warnings)  # one sentence each
    cells = {(r["N"], r["D"]) for r in export_rows(out)}
    assert len(cells) == 8 and (table.N[0], table.D[0]) not in cells


def test_replay_input_errors_are_one_line(tmp_path, table, capsys):
    source = tmp_path / "t.csv"
    write_table(source, table)
    assert main(["sweep", "spec.toml", "--replay", str(source), "--out", str(tmp_path / "x")]) == 2
    assert "expected one of them" in capsys.readouterr().err
    assert main(["sweep", "--replay", str(source), "--col-N", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "no column 'nope'" in capsys.readouterr().err
    assert main(["sweep", "--replay", str(source), "--col-N", "params", "--col-loss", "final", "--planner",
                 "adaptive", "--cell-budget", "0", "--out", str(tmp_path / "x")]) == 2
    assert "cell-budget 0" in capsys.readouterr().err


def test_replay_budget_leaves_cells_unbracketed(tmp_path, table, capsys):
    source = tmp_path / "t.csv"
    write_table(source, table)
    out = tmp_path / "b"
    assert main(["sweep", "--replay", str(source), "--col-N", "params", "--col-loss", "final", "--planner",
                 "adaptive", "--cell-budget", "4", "--out", str(out)]) == 0
    assert "9 unbracketed cells" in capsys.readouterr().err
    with ResultStore(out, readonly=True) as store:
        assert {c["state"] for c in store.meta("planner_cells")} == {"unbracketed"}
    assert len(export_rows(out)) == 36


def test_a_validation_loss_is_replayed_as_val_loss(tmp_path, table):
    source = tmp_path / "t.csv"
    write_table(source, table)
    source.write_text(source.read_text().replace(",final,", ",val_loss,", 1))
    out = tmp_path / "val"
    assert main(["sweep", "--replay", str(source), "--col-N", "params", "--col-loss", "val_loss", "--planner", "adaptive",
                 "--out", str(out), "-q"]) == 0
    rows = [row for row in export_rows(out) if row["status"] == "ok"]
    assert rows and all(row["loss"] is None and row["val_loss"] is not None for row in rows)
    with ResultStore(out, readonly=True) as store:
        assert store.objective() == "val_loss"  # the planner searched it, fit and report read it
        assert len(store.meta("planner_cells")) == 9
    again = tmp_path / "again"  # a training loss stays the training loss, and its spec has no objective
    write_table(source, table)
    assert main(["sweep", "--replay", str(source), "--col-N", "params", "--col-loss", "final", "--out", str(again), "-q"]) == 0
    assert all(row["val_loss"] is None for row in export_rows(again))
    with ResultStore(again, readonly=True) as store:
        assert "objective" not in store.meta("spec")
