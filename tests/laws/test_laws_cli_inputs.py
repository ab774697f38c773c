"""Bad and unusual inputs to predict / fit / fit-loss: one line and exit 2, or the right answer."""
import json

import numpy as np
import pytest

from steplaw.cli import main
from steplaw.errors import UserError
from steplaw.laws.synthetic import synthetic_runs


def _csv(path, header, rows):
    path.write_text("\n".join([",".join(header)] + [",".join(str(v) for v in row) for row in rows]) + "\n")
    return path


@pytest.fixture(scope="module")
def runs_csv(tmp_path_factory):
    table = synthetic_runs(seed=2, n_values=(6e7, 2.4e8, 9.6e8), d_values=(2e9, 8e9, 3.2e10))
    rows = [(table.N[i], table.D[i], table.lr[i], table.batch_tokens[i], table.status[i],
             "" if not np.isfinite(table.loss[i]) else repr(float(table.loss[i]))) for i in range(len(table))]
    return _csv(tmp_path_factory.mktemp("runs") / "runs.csv", ["N", "D", "lr", "batch_tokens", "status", "loss"], rows)


def one_line_error(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


def test_generic_batch_column_needs_bs_unit(capsys, tmp_path, runs_csv):
    text = runs_csv.read_text().replace("batch_tokens", "bs", 1)
    path = tmp_path / "bs.csv"
    path.write_text(text)
    one_line_error(capsys, ["fit", str(path), "--col-bs", "bs", "--json"], "--bs-unit")
    assert main(["fit", str(path), "--col-bs", "bs", "--bs-unit", "tokens", "--n-boot", "5", "--json"]) == 0


def test_chinchilla_style_table_fits_without_dummy_columns(capsys, tmp_path):
    rows = []
    for n in np.geomspace(7e7, 1.6e10, 6):
        for d in np.geomspace(5e9, 5e11, 5):
            rows.append((n, d, 6 * n * d, 1.69 + 406.4 / n**0.34 + 410.7 / d**0.28))
    path = _csv(tmp_path / "chinchilla.csv", ["N", "D", "C", "loss"], rows)
    assert main(["fit-loss", str(path), "--n-boot", "20", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["alpha"] == pytest.approx(0.34, rel=1e-3) and out["beta"] == pytest.approx(0.28, rel=1e-3)
    # the same table without D: D from the compute column
    path = _csv(tmp_path / "noD.csv", ["N", "C", "loss"], [(r[0], r[2], r[3]) for r in rows])
    assert main(["fit-loss", str(path), "--col-C", "C", "--n-boot", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["alpha"] == pytest.approx(0.34, rel=1e-3)
    # errors of fit-loss name only what fit-loss needs
    path = _csv(tmp_path / "noloss.csv", ["N", "D"], [(r[0], r[1]) for r in rows])
    err = one_line_error(capsys, ["fit-loss", str(path)], "no column 'loss'")
    assert "lr" not in err.split(";")[0] and "batch" not in err


def test_fit_loss_on_two_model_sizes_refuses_the_N_term(capsys, tmp_path):
    # Issue 11: the law is fitted without the N term (said in warnings, text and JSON), and
    # the compute-optimal split, which needs both terms, is refused with one sentence.
    rows = [(n, d, 1.69 + 406.4 / n**0.34 + 410.7 / d**0.28) for n in (1e8, 4e8) for d in np.geomspace(1e9, 1e11, 5)]
    path = _csv(tmp_path / "two.csv", ["N", "D", "loss"], rows)
    assert main(["fit-loss", str(path), "--n-boot", "20"]) == 0
    captured = capsys.readouterr()
    assert "A      not fitted" in captured.out and "compute-optimal N and D: none" in captured.out
    assert "warning: the loss law's N term A/N^alpha is not fitted because the cells have 2 distinct" in captured.err
    assert "1e+08 to 4e+08" in captured.err
    assert main(["fit-loss", str(path), "--n-boot", "20", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["refused_terms"] == ["N"] and out["A"] == 0 and "refused" in out["compute_optimal"]
    assert any("N term" in w for w in out["warnings"])
    one_line_error(capsys, ["fit-loss", str(path), "--n-boot", "0", "--budget", "1e21"],
                   "fitted without its N term, so it has no compute-optimal N and D")
    rows = [(n, d, 1.69 + 406.4 / n**0.34 + 410.7 / d**0.28) for n in (1e8, 1.001e8) for d in (1e9, 1.1e9, 1.2e9)]
    one_line_error(capsys, ["fit-loss", str(_csv(tmp_path / "flat.csv", ["N", "D", "loss"], rows))],
                   "cannot fit the loss law: the cells have 2 distinct value(s) of N")


def test_bom_and_latin1(capsys, tmp_path, runs_csv):
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + runs_csv.read_bytes())
    assert main(["fit", str(bom), "--n-boot", "0", "--json"]) == 0
    capsys.readouterr()
    latin = tmp_path / "latin.csv"
    latin.write_bytes(runs_csv.read_bytes().replace(b"status", b"st\xe4tus", 1))
    one_line_error(capsys, ["fit", str(latin)], "is not UTF-8 text")


def test_output_paths_are_checked_before_any_work(capsys, tmp_path, runs_csv):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    one_line_error(capsys, ["fit", str(runs_csv), "--out", str(a_file)], "is a file: expected a directory")
    one_line_error(capsys, ["fit", str(runs_csv), "--out", str(a_file / "sub")], "is a file, not a directory")
    one_line_error(capsys, ["fit", str(runs_csv), "--json", "--save", str(tmp_path)], "is a directory: expected a file")
    one_line_error(capsys, ["fit-loss", str(runs_csv), "--save", str(a_file / "l.json")], "is a file, not a directory")
    one_line_error(capsys, ["fit", str(runs_csv), "--out", "/proc/steplaw_fit"], "cannot be written")
    one_line_error(capsys, ["fit", str(runs_csv), "--seed", "-1"], "--seed")
    one_line_error(capsys, ["fit", str(runs_csv), "--gap", "nan"], "--gap")
    # nothing was fitted or written on the way
    assert not (runs_csv.parent / "runs_fit").exists()
    # a --save in a directory that does not exist yet is made
    assert main(["fit-loss", str(runs_csv), "--n-boot", "0", "--save", str(tmp_path / "new" / "l.json")]) == 0
    assert (tmp_path / "new" / "l.json").is_file()


def test_damaged_sweep_store_is_one_line(capsys, tmp_path):
    (tmp_path / "runs.sqlite").write_bytes(b"SQLite format 3\x00" + b"\x07" * 200)
    one_line_error(capsys, ["fit", str(tmp_path)], "is not a readable sweep store")
    one_line_error(capsys, ["fit-loss", str(tmp_path)], "is not a readable sweep store")


def test_empty_law_list_is_refused(capsys):
    one_line_error(capsys, ["predict", "--params", "1e9", "--tokens", "1e11", "--law", ""], "names no law")


def test_json_lists_law_scores_and_is_strict(capsys, runs_csv, tmp_path):
    assert main(["fit", str(runs_csv), "--n-boot", "20", "--json"]) == 0
    raw = capsys.readouterr().out
    assert "NaN" not in raw and "Infinity" not in raw
    out = json.loads(raw)
    names = [s["law"] for s in out["law_scores"]]
    assert "step_law" in names and any("fit" in n for n in names)
    for item in out["law_scores"]:
        assert {"law", "lr_factor", "bs_factor", "gap_mean", "gap_max", "rank"} <= set(item)
    assert "nearest" in out["scoring"] and "bowl" in out["scoring"]


def test_save_then_predict_with_sparsity(capsys, tmp_path):
    truth_rows = []
    table = synthetic_runs(seed=4, n_values=(6e7, 2.4e8, 9.6e8), d_values=(2e9, 8e9, 3.2e10))
    for share in (1.0, 0.25):  # dense, and MoE with a quarter of N active; lr* follows N_active
        for i in range(len(table)):
            truth_rows.append({"N": table.N[i] / share, "N_active": table.N[i], "D": table.D[i], "lr": table.lr[i],
                               "batch_tokens": table.batch_tokens[i], "status": table.status[i],
                               "loss": float(table.loss[i]) if np.isfinite(table.loss[i]) else None})
    path = tmp_path / "moe.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in truth_rows) + "\n")
    law = tmp_path / "law.json"
    argv = ["fit", str(path), "--n-column", "N", "--sparsity", "--n-boot", "100", "--save", str(law), "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sparsity"]["laws"]["learning-rate"]["supported"] is True
    assert out["lr_law"]["exp_S"] == pytest.approx(-0.713, abs=0.1)  # lr ~ N_active^-0.713 = N^-0.713 S^-0.713
    assert main(["predict", "--params", "4e8", "--tokens", "1e10", "--moe-active", "1e8", "--law", str(law), "--json"]) == 0
    pred = json.loads(capsys.readouterr().out)["predictions"][0]
    from steplaw.laws.published import step_law

    assert pred["lr"] == pytest.approx(step_law(1e8, 1e10)[0], rel=0.2)  # the activated count sets the LR
    one_line_error(capsys, ["predict", "--params", "4e8", "--tokens", "1e10", "--law", str(tmp_path / "x.json")],
                   "no law file")


def test_moe_sweep_with_flat_total_refuses_the_N_exponent_loudly(capsys, tmp_path):
    # Issue 11: total N moves 0.3% across cells; the N exponent used to print as 17.2.
    path = _flat_total_moe(tmp_path / "moe.jsonl")
    assert main(["fit", str(path), "--n-column", "N", "--n-boot", "50", "--no-plots", "--out", str(tmp_path / "o")]) == 0
    captured = capsys.readouterr()
    assert "refused: the learning-rate law's exponent of N is not fitted because N spans only" in captured.out
    assert "warning: the learning-rate law's exponent of N is not fitted" in captured.err
    assert "exp_N" not in captured.out.split("learning rate:")[1].split("\n")[0]
    result = json.loads((tmp_path / "o" / "fit.json").read_text())
    assert "exp_N" not in result["lr_law"] and any("exponent of N" in w for w in result["warnings"])


def _flat_total_moe(path):
    """An MoE table whose total N moves 0.3% while N_active (and so the sparsity) moves 4x."""
    rows = []
    for n_total, n_active in ((1.000e9, 1.25e8), (1.0015e9, 2.5e8), (1.003e9, 5e8)):
        for d in (2e9, 8e9, 3.2e10):
            lr_star, bs_star = 1.79 * n_active**-0.713 * d**0.307, 0.58 * d**0.571
            for i in range(-3, 4):
                for j in range(-2, 3):
                    lr, bs = lr_star * 2 ** (i / 2), bs_star * 2.0**j
                    rows.append({"N": n_total, "N_active": n_active, "D": d, "lr": lr, "batch_tokens": bs,
                                 "loss": 2.5 + 0.02 * np.log(lr / lr_star) ** 2 + 0.01 * np.log(bs / bs_star) ** 2})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_sparsity_fit_with_default_n_column_on_a_flat_total(capsys, tmp_path):
    # Issue 11: with N_active and S in one law, log N_active - log S = log N_total is flat;
    # the fit used to exit 2 ("singular fit"). Now the S exponent is refused for that fit.
    path = _flat_total_moe(tmp_path / "moe.jsonl")
    law = tmp_path / "law.json"
    assert main(["fit", str(path), "--sparsity", "--n-boot", "30", "--json", "--save", str(law)]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert "exp_N" not in out["lr_law"] and "exp_S" in out["lr_law"]  # N = N: N refused, S carries it
    active = out["by_n_column"]["N_active"]
    assert "exp_N" in active["lr_law"] and "exp_S" not in active["lr_law"]
    assert active["lr_law"]["exp_N"] == pytest.approx(-0.713, abs=0.05)
    refusal = [w for w in active["warnings"] if "exponent of the sparsity N_active/N is not fitted" in w]
    assert refusal and "told apart only by the total N" in refusal[0] and "1.003" in refusal[0]
    # every fit's warnings are in the top-level list, named by their fit, and on stderr
    assert f"fit with N = N_active: {refusal[0]}" in out["warnings"]
    assert any(w.startswith("fit with N = N: ") and "exponent of N is not fitted" in w for w in out["warnings"])
    assert f"fit with N = N_active: {refusal[0]}" in captured.err
    # predict with the saved law: n_active above n_params is refused as for published laws
    one_line_error(capsys, ["predict", "--law", str(law), "--params", "1e9", "--tokens", "1e10", "--moe-active", "2e9"],
                   "n_active=2e+09 exceeds n_params=1e+09")
    one_line_error(capsys, ["predict", "--params", "1e9", "--tokens", "1e10", "--moe-active", "2e9"],
                   "n_active=2e+09 exceeds n_params=1e+09")


def test_law_files_repeat_their_fits_warnings(capsys, tmp_path, runs_csv):
    # Issue 11: a refusal stored in a law file is said again wherever the file is used.
    path = _flat_total_moe(tmp_path / "moe.jsonl")
    law = tmp_path / "law.json"
    assert main(["fit", str(path), "--n-column", "N", "--n-boot", "20", "--json", "--save", str(law)]) == 0
    capsys.readouterr()
    stored = "exponent of N is not fitted because N spans only"
    assert main(["predict", "--law", str(law), "--params", "1e9", "--tokens", "1e10", "--json"]) == 0
    captured = capsys.readouterr()
    assert any(stored in w for w in json.loads(captured.out)["predictions"][0]["warnings"])
    assert f"{law} (from its fit): " in captured.err and stored in captured.err
    assert main(["plan", "--compute", "1e20", "--hparam-law", str(law), "--json"]) == 0
    captured = capsys.readouterr()
    assert any(stored in w for w in json.loads(captured.out)["warnings"]) and stored in captured.err
    loss_law = tmp_path / "loss.json"
    assert main(["fit-loss", str(runs_csv), "--n-boot", "0", "--save", str(loss_law)]) == 0
    capsys.readouterr()
    assert main(["plan", "--compute", "1e20", "--loss-law", str(loss_law)]) == 0
    assert "(from its fit): no bootstrap intervals were computed" in capsys.readouterr().err


def test_fit_without_bootstrap_warns_in_text_and_json(capsys, runs_csv):
    assert main(["fit", str(runs_csv), "--n-boot", "0", "--json"]) == 0
    captured = capsys.readouterr()
    assert any("no bootstrap intervals" in w for w in json.loads(captured.out)["warnings"])
    assert "warning: no bootstrap intervals were computed (n_boot = 0)" in captured.err


def test_fit_loss_budget_warns_of_extrapolation_and_gives_both_intervals(capsys, tmp_path):
    rows = []
    for n in np.geomspace(7e7, 1.6e10, 6):
        for d in np.geomspace(5e9, 5e11, 5):
            rows.append((n, d, 1.69 + 406.4 / n**0.34 + 410.7 / d**0.28))
    path = _csv(tmp_path / "chinchilla.csv", ["N", "D", "loss"], rows)
    assert main(["fit-loss", str(path), "--n-boot", "20", "--budget", "5.76e23"]) == 0
    captured = capsys.readouterr()
    assert "95% intervals N " in captured.out and ", D " in captured.out.split("95% intervals")[1]
    assert "warning: the fitted loss law: N=3.22e+10 is outside the range the law was fitted on" in captured.err
    assert "D=2.98e+12 is outside" in captured.err
    assert main(["fit-loss", str(path), "--n-boot", "0", "--budget", "5.76e23", "--json"]) == 0
    assert sum("extrapolation" in w for w in json.loads(capsys.readouterr().out)["warnings"]) == 2
    assert main(["fit-loss", str(path), "--n-boot", "0", "--budget", "1e21"]) == 0  # inside: no word
    assert "extrapolation" not in capsys.readouterr().err


def _two_spec_sweep(sweep_dir):
    """A sweep directory holding the runs of two specs (as `steplaw sweep --new-spec` leaves it)."""
    from steplaw.models.accounting import param_counts
    from steplaw.models.config import ModelConfig
    from steplaw.sweep.store import ResultStore
    from steplaw.train.config import RunConfig

    with ResultStore(sweep_dir) as store:
        for spec_id, tokens in (("aaaa1111", (2**16, 2**18, 2**20)), ("bbbb2222", (2**17, 2**19, 2**21))):
            entries, counts = [], []
            for d_model in (32, 64, 128):
                model = ModelConfig(d_model=d_model, n_layers=2, n_heads=2, d_ff=2 * d_model, max_seq_len=64)
                for d in tokens:
                    for lr in (0.001, 0.002, 0.004, 0.008):
                        config = RunConfig(model=model, tokens=d, lr=lr, batch_tokens=256, seq_len=64)
                        entries.append({**config.to_dict(), "run_id": config.run_id()})
                        p = param_counts(model)
                        counts.append({"non_embedding": p.non_embedding, "active": p.active, "total": p.total})
            store.add_runs(entries, counts, spec_id=spec_id)
            for entry, count in zip(entries, counts):
                # The loss falls with N and D, so the loss law is well posed on every CPU (a loss
                # flat in N fits alpha ~ +-1e-14, its sign the CPU's: tests/laws/test_degenerate_loss_law.py).
                loss = (3.0 + 0.1 * np.log(entry["lr"] / 0.003) ** 2 + 10 / entry["tokens"] ** 0.3
                        + 20 / count["non_embedding"] ** 0.3)
                store.record_result(entry["run_id"], {"status": "ok", "final_train_loss": loss,
                                                      "compute_flops": 1e12}, host="test")
    return sweep_dir


def test_sweep_of_several_specs_needs_a_choice(capsys, tmp_path):
    # Issue 12: fit and fit-loss used to mix the runs of every spec with no word.
    sweep = _two_spec_sweep(tmp_path / "sweep")
    for command in ("fit", "fit-loss"):
        err = one_line_error(capsys, [command, str(sweep), "--json"], "holds the runs of 2 specs")
        assert "aaaa1111: 36 runs" in err and "bbbb2222: 36 runs" in err and "--spec ID" in err
    assert main(["fit-loss", str(sweep), "--spec", "aaaa", "--n-boot", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fitted_range"]["D"] == [2**16, 2**20] and out["n_cells"] == 9  # only spec aaaa's runs
    assert main(["fit-loss", str(sweep), "--all-specs", "--n-boot", "0", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["n_cells"] == 18
    assert "warning: the runs of 2 specs are fitted together" in captured.err
    assert any("fitted together" in w for w in json.loads(captured.out)["warnings"])
    one_line_error(capsys, ["fit", str(sweep), "--spec", "cccc"], "--spec 'cccc' matches no spec")
    one_line_error(capsys, ["fit", str(sweep), "--spec", ""], "matches 2 specs")
    table = _csv(tmp_path / "t.csv", ["N", "D", "loss"], [(1e8, 1e9, 3.0)])
    one_line_error(capsys, ["fit-loss", str(table), "--spec", "aaaa"], "is a table file")
    assert main(["fit", str(sweep), "--spec", "x", "--all-specs"]) == 2  # one or the other
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [
    ("N,D,lr,batch_tokens,loss\n1e8,1e9,1e-3,1024,3.0\n1e8,1e9,2e-3,1024,3.1,7\n", "row 2 has 6 fields; the header has 5"),
    ("N,D,lr,batch_tokens,loss,lr\n1e8,1e9,1e-3,1024,3.0,1e-3\n", "column 'lr' appears twice in the header"),
    ("N,D,lr,batch_tokens,loss, N\n1e8,1e9,1e-3,1024,3.0,1e-3\n", "column 'N' appears twice in the header"),
])
def test_ragged_rows_and_duplicate_columns_are_refused(capsys, tmp_path, text, message):
    # Issue 12: an extra field or a repeated column name used to be read silently.
    path = tmp_path / "bad.csv"
    path.write_text(text)
    one_line_error(capsys, ["fit", str(path)], message)


def test_fit_notes_are_warnings(capsys, tmp_path, runs_csv, monkeypatch):
    # Issue 13: "note: no plots" bypassed the shared warn (steplaw.errors.warn); every warning is "PROG: warning: ...".
    import steplaw.report.plots as plots

    def no_matplotlib(*args, **kwargs):
        raise UserError("plots need matplotlib")

    monkeypatch.setattr(plots, "plot_fit", no_matplotlib)
    assert main(["fit", str(runs_csv), "--n-boot", "0", "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "steplaw fit: warning: no plots: plots need matplotlib" in err and "note:" not in err
