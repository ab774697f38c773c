"""`steplaw predict`, `steplaw fit`, `steplaw fit-loss` through steplaw.cli.main."""
import json

import numpy as np
import pytest

from steplaw.cli import main
from steplaw.laws.synthetic import synthetic_runs


@pytest.fixture(scope="module")
def runs_csv(tmp_path_factory):
    table = synthetic_runs(seed=2, n_values=(6e7, 2.4e8, 9.6e8, 1.9e9), d_values=(2e9, 8e9, 3.2e10, 6.4e10))
    path = tmp_path_factory.mktemp("runs") / "runs.csv"
    lines = ["run_id,status,params,tokens,peak_lr,bsz_seqs,final_loss"]
    for i in range(len(table)):
        loss = "" if not np.isfinite(table.loss[i]) else repr(float(table.loss[i]))
        lines.append(f"{i},{table.status[i]},{table.N[i]},{table.D[i]},{table.lr[i]},{table.batch_tokens[i] / 1024},{loss}")
    path.write_text("\n".join(lines) + "\n")
    return path


MAPPING = ["--col-N", "params", "--col-D", "tokens", "--col-lr", "peak_lr", "--col-bs", "bsz_seqs",
           "--col-loss", "final_loss", "--bs-unit", "sequences", "--seq-len", "1024"]


def test_predict_table(capsys):
    assert main(["predict", "--params", "1e9", "--tokens", "1e11", "--seq-len", "4096"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "step_law" in out and "deepseek" in out and "kaplan" in out
    assert "0.00163" in out and "1.11e+06" in out and "270.4" in out  # 1.1077e6 / 4096 sequences
    assert "disagree on the batch size" in captured.err  # warnings on stderr, data on stdout


def test_predict_json_moe(capsys):
    assert main(["predict", "--params", "8B", "--tokens", "1e11", "--moe-active", "1B", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    used = [p["n_used"] for p in out["predictions"] if p["law"] == "step_law"]
    assert used == ["N total (non-embedding)", "N activated (non-embedding)"]
    assert out["predictions"][0]["batch_seqs"] == pytest.approx(out["predictions"][0]["batch_tokens"] / 2048)
    assert set(out["laws"]) == {"step_law", "deepseek", "kaplan", "porian"}


@pytest.mark.parametrize("argv, message", [
    (["predict", "--params", "0", "--tokens", "1e11"], "--params '0' must be a positive"),
    (["predict", "--params", "1e9", "--tokens", "nan"], "--tokens 'nan' is not a number"),
    (["predict", "--params", "big", "--tokens", "1e11"], "is not a number"),
    (["predict", "--params", "1e9", "--tokens", "1e11", "--law", "foo"], "unknown law 'foo'"),
    (["fit", "/nonexistent/runs.csv"], "no such file"),
    (["fit-loss", "/nonexistent/runs.csv"], "no such file"),
])
def test_errors_are_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_fit_json(capsys, runs_csv):
    assert main(["fit", str(runs_csv), *MAPPING, "--n-boot", "50", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["lr_law"]) >= {"coef", "exp_N", "exp_D", "ci"}
    assert set(out["bs_law"]) >= {"coef", "exp_D", "ci"}
    assert out["lr_law"]["exp_N"] == pytest.approx(-0.713, abs=0.06)
    assert out["bs_law"]["exp_D"] == pytest.approx(0.571, abs=0.06)
    assert {"lr_factor", "bs_factor", "relative_loss_gap", "step_law"} <= set(out["validation"])
    assert out["counts"]["dropped"]["diverged"] > 0


def test_fit_text_writes_json(capsys, runs_csv, tmp_path):
    assert main(["fit", str(runs_csv), *MAPPING, "--n-boot", "20", "--out", str(tmp_path), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "learning rate: lr = " in out and "every law scored on these cells" in out and "step_law" in out
    assert json.loads((tmp_path / "fit.json").read_text())["n_boot"] == 20


def test_fit_missing_column_is_one_line(capsys, runs_csv):
    assert main(["fit", str(runs_csv)]) == 2
    err = capsys.readouterr().err
    assert "no column 'N'" in err and len(err.strip().splitlines()) == 1


def test_fit_loss_json(capsys, runs_csv):
    argv = ["fit-loss", str(runs_csv), *MAPPING, "--n-boot", "5", "--budget", "1e21", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"E", "A", "B", "alpha", "beta", "intervals"} <= set(out)
    truth_alpha, truth_beta = 0.34, 0.28  # SyntheticTruth defaults
    assert out["alpha"] == pytest.approx(truth_alpha, abs=0.05)
    assert out["beta"] == pytest.approx(truth_beta, abs=0.05)
    at = out["at_budget"]
    assert 6 * at["N_opt"] * at["D_opt"] == pytest.approx(1e21, rel=1e-6)
    assert at["step_law_lr"] > 0


def test_fit_moe_table_reports_both_counts(capsys, tmp_path):
    table = synthetic_runs(seed=8, n_values=(6e7, 2.4e8, 9.6e8), d_values=(2e9, 8e9, 3.2e10))
    path = tmp_path / "moe.jsonl"
    rows = [json.dumps({"N": 8 * table.N[i], "N_active": table.N[i], "D": table.D[i], "lr": table.lr[i],
                        "batch_tokens": table.batch_tokens[i], "status": table.status[i],
                        "loss": float(table.loss[i]) if np.isfinite(table.loss[i]) else None})
            for i in range(len(table))]
    path.write_text("\n".join(rows) + "\n")
    assert main(["fit", str(path), "--n-boot", "10", "--out", str(tmp_path / "out"), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "N = N: non-embedding" in out and "N = N_active: activated" in out
    assert main(["fit", str(path), "--n-boot", "10", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_column"] == "N" and set(result["by_n_column"]) == {"N_active"}
