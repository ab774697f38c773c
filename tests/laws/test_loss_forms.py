"""Loss-law forms and fitting choices (issue 24, item 2): tied exponents, E fixed, compute
weights, the asymmetric penalty on under-prediction, --form auto by rollout error, and the
prediction interval of fit-loss (the same function plan uses). Ladder ranges in the names."""
import json

import numpy as np
import pytest

from steplaw.cli import main
from steplaw.laws.loss import fit_loss
from steplaw.laws.loss_forms import LossForm
from steplaw.laws.loss_solver import fit_batch, fit_once
from steplaw.laws.table import read_runs

N_LADDER = np.geomspace(2e7, 3.2e9, 9)


def _rows(E=1.82, A=482.0, B=2085.0, alpha=0.35, beta=0.37, noise=0.002, seed=0, small_offset=0.0, sizes=N_LADDER):
    """A Chinchilla-shaped ladder, 9 sizes 2e7..3.2e9 at 5 to 80 tokens per parameter;
    `small_offset` lifts the three smallest sizes' losses (a regime the law does not hold in)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, n in enumerate(sizes):
        for tpp in (5, 10, 20, 40, 80):
            d = n * tpp
            loss = (E + A / n**alpha + B / d**beta) * (1 + noise * rng.standard_normal())
            rows.append({"N": float(n), "D": float(d), "loss": float(loss * (1 + (small_offset if i < 3 else 0)))})
    return rows


def _csv(tmp_path, rows, name="ladder.csv"):
    path = tmp_path / name
    path.write_text("N,D,loss\n" + "\n".join(f"{r['N']!r},{r['D']!r},{r['loss']!r}" for r in rows) + "\n")
    return path


def _json(capsys, argv) -> dict:
    assert main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def tied_table():
    return read_runs(_rows(alpha=0.36, beta=0.36, A=700.0, B=2000.0), needs="loss")


def test_tied_form_recovers_one_exponent_and_gives_no_interval_for_the_split_it_fixes(tied_table):
    fit = fit_loss(tied_table, n_boot=40, form=LossForm("tied"))
    assert fit.alpha == fit.beta == pytest.approx(0.36, abs=0.01)
    assert np.allclose(fit.samples[:, 3], fit.samples[:, 4])  # every resample stays on alpha = beta
    assert fit.intervals["alpha"] == fit.intervals["beta"] and fit.intervals["alpha"][0] < fit.intervals["alpha"][1]
    split = fit.to_dict()["compute_optimal"]
    assert split["N_exponent"] == pytest.approx(0.5) and split["exponent_intervals"] == {}  # no zero-width interval
    assert fit.to_dict()["form"] == {"form": "tied", "E_fixed": None, "weights": "none", "underprediction_penalty": 1.0}


def test_fixed_E_is_held_and_has_no_interval(tied_table):
    fit = fit_loss(tied_table, n_boot=30, form=LossForm(E=1.82))
    assert fit.E == pytest.approx(1.82, rel=1e-12) and np.allclose(np.exp(fit.samples[:, 2]), 1.82)
    assert "E" not in fit.intervals and fit.alpha == pytest.approx(0.36, abs=0.01)


def test_batched_bootstrap_in_the_tied_subspace_matches_one_scipy_fit_per_resample(tied_table):
    form = LossForm("tied", E=1.8)
    fit = fit_loss(tied_table, n_boot=0, form=form)
    cells = np.array([[r, d] for r, d in zip(tied_table.N, tied_table.D)])
    log_n, log_d, log_loss = np.log(cells[:, 0]), np.log(cells[:, 1]), np.log(tied_table.loss)
    theta = np.array([np.log(fit.A), np.log(fit.B), np.log(fit.E), fit.alpha, fit.beta])
    counts = np.random.default_rng(1).multinomial(len(cells), np.full(len(cells), 1 / len(cells)), 6).astype(float)
    batched = fit_batch(log_n, log_d, log_loss, counts, theta, 1e-3, form.basis(()), 2.0)
    for row, weights in zip(batched, counts):
        reference = fit_once(log_n, log_d, log_loss, weights, [theta], 1e-3, form.basis(()), 2.0)
        assert row[3] == pytest.approx(row[4], abs=1e-12) and row[2] == pytest.approx(theta[2], abs=1e-12)
        assert row[3] == pytest.approx(reference[3], abs=1e-4)


def test_underprediction_penalty_leaves_fewer_cells_predicted_too_low():
    table = read_runs(_rows(noise=0.004, seed=2), needs="loss")

    def below(penalty):
        fit = fit_loss(table, n_boot=0, form=LossForm(underprediction_penalty=penalty))
        return int(np.sum(fit.predict(table.N, table.D) < table.loss))

    symmetric, penalised = below(1.0), below(10.0)
    assert penalised < symmetric and penalised <= len(table) // 4


def test_compute_weights_are_what_the_fit_minimizes(capsys, tmp_path):
    # Weighted by C / mean C, the fit minimizes the weighted objective: its weighted loss is below the
    # unweighted fit's, and the reverse holds for the unweighted objective (so the weights are not ignored).
    from steplaw.laws.loss_solver import objective

    rows = _rows(noise=0.003, small_offset=0.02, seed=4)
    table = read_runs(rows, needs="loss")
    log_n, log_d, log_loss = np.log(table.N), np.log(table.D), np.log(table.loss)
    flops = 6 * table.N * table.D
    weights = {"none": np.ones(len(table)), "compute": flops / flops.mean()}
    fits = {name: fit_loss(table, n_boot=0, form=LossForm(weights=name)) for name in weights}
    thetas = {name: np.array([np.log(f.A), np.log(f.B), np.log(f.E), f.alpha, f.beta]) for name, f in fits.items()}
    value = {(w, t): objective(thetas[t], log_n, log_d, log_loss, weights[w], 1e-3)[0] for w in weights for t in thetas}
    assert value["compute", "compute"] < value["compute", "none"] and value["none", "none"] < value["none", "compute"]
    out = _json(capsys, ["fit-loss", str(_csv(tmp_path, rows)), "--n-boot", "0", "--weights", "compute"])
    assert out["form"]["weights"] == "compute" and out["alpha"] == pytest.approx(fits["compute"].alpha, rel=1e-6)


def test_form_auto_says_which_form_won_and_by_how_much(capsys, tmp_path):
    # far from tied; 5 sizes (2 rollout steps per form) keep the test short
    path = _csv(tmp_path, _rows(alpha=0.25, beta=0.45, A=150.0, B=8000.0, noise=0.001, sizes=N_LADDER[::2]))
    out = _json(capsys, ["fit-loss", str(path), "--form", "auto", "--n-boot", "0"])
    choice = out["form_choice"]
    assert choice["chosen"] == "chinchilla" == out["form"]["form"] and choice["by"] == "rollout N"
    scores = choice["mean_abs_rel_error"]
    assert choice["margin"] == pytest.approx(scores["tied"] - scores["chinchilla"]) and choice["margin"] > 0
    assert choice["compared_on"] == {"steps": 2, "N": pytest.approx([N_LADDER[6], N_LADDER[8]])}
    assert main(["fit-loss", str(path), "--form", "auto", "--n-boot", "0"]) == 0
    text = capsys.readouterr().out
    assert "form auto (rollout by N" in text and "-> chinchilla, better than tied by" in text


def test_fit_loss_interval_is_plans_interval(capsys, tmp_path):
    path, law = _csv(tmp_path, _rows()), tmp_path / "law.json"
    out = _json(capsys, ["fit-loss", str(path), "--form", "tied", "--budget", "1e21", "--n-boot", "40",
                         "--save", str(law)])
    at = out["at_budget"]
    low, high = at["predicted_loss_interval"]
    assert low < at["predicted_loss"] < high
    plan = _json(capsys, ["plan", "--params", repr(at["N_opt"]), "--tokens", repr(at["D_opt"]), "--loss-law", str(law)])
    assert plan["predicted_loss_interval"] == pytest.approx([low, high], rel=1e-9)
    assert json.loads(law.read_text())["form"]["form"] == "tied"


def test_holdout_rows_carry_their_interval_fit_on_N_2e7_to_9e8_predicts_N_1_7e9_to_3_2e9(capsys, tmp_path):
    path = _csv(tmp_path, _rows())
    hold = _json(capsys, ["fit-loss", str(path), "--holdout", "N>=1e9", "--n-boot", "40"])["holdout"]
    for row in hold["rows"]:
        assert row["interval"][0] < row["predicted"] < row["interval"][1]
        assert row["inside_interval"] == (row["interval"][0] <= row["loss"] <= row["interval"][1])
    assert hold["inside_interval"]["of"] == 10 and hold["inside_interval"]["count"] >= 7


@pytest.mark.parametrize("argv, message", [
    (["--E=-1"], "--E '-1' must be a positive finite number"),
    (["--underprediction-penalty", "0.5"], "--underprediction-penalty 0.5 must be a number >= 1"),
    (["--method", "isoflop", "--form", "tied"], "--form need the parametric loss law"),
])
def test_bad_form_options_are_one_sentence(capsys, tmp_path, argv, message):
    path = _csv(tmp_path, _rows())
    assert main(["fit-loss", str(path)] + argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_form_auto_with_too_few_sizes_is_refused(capsys, tmp_path):
    rows = [r for r in _rows() if r["N"] < 1e8]  # 3 sizes: nothing to roll out onto
    assert main(["fit-loss", str(_csv(tmp_path, rows)), "--form", "auto"]) == 2
    assert "--form auto chooses by the rollout by N, which cannot run here" in capsys.readouterr().err
