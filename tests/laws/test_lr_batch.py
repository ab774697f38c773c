"""The batch-aware LR law (issue 24 item 4): eta = a N^alpha D^beta B^delta from each (N, D, B)
row's optimum in LR; delta recovered with its interval on a surface with a known delta
(marin's lr ~ B^0.5), refused by name when the batch never varies within a cell, and
`predict --batch-tokens` gives the LR for the batch chosen."""
import json

import numpy as np
import pytest

from steplaw.cli import main
from steplaw.errors import UserError
from steplaw.laws.fit import fit_hparams
from steplaw.laws.table import table_from_arrays

DELTA, ALPHA, BETA = 0.5, -0.25, 0.1
N_VALUES, D_VALUES = (6e7, 2.4e8, 9.6e8), (2e9, 8e9, 3.2e10)


def lr_star(n, d, b):
    return 0.3 * n**ALPHA * d**BETA / 40 * (b / 1e6) ** DELTA


def _rows(batches_of=lambda bstar: bstar * 2.0 ** np.arange(-2, 2), seed=0):
    """3 N x 3 D cells, 4 batch sizes x 11 LRs each; loss a bowl about lr*(N, D, B)."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in N_VALUES:
        for d in D_VALUES:
            bstar = 2e5 * (d / 2e9) ** 0.3
            batches = np.atleast_1d(batches_of(bstar))
            grid = np.geomspace(lr_star(n, d, batches.min()) / 4, lr_star(n, d, batches.max()) * 4, 11)
            for b in batches:
                for lr in grid:
                    loss = (1.7 + 400 / n**0.34 + 410 / d**0.28 + 0.02 * np.log(lr / lr_star(n, d, b)) ** 2
                            + 0.01 * np.log(b / bstar) ** 2)
                    rows.append((n, d, lr, b, loss * (1 + 3e-4 * rng.standard_normal())))
    return np.array(rows).T


def _csv(path, columns):
    path.write_text("N,D,lr,batch_tokens,loss\n" + "\n".join(",".join(repr(float(v)) for v in r)
                                                             for r in columns.T) + "\n")
    return path


@pytest.fixture(scope="module")
def batch_fit():
    return fit_hparams(table_from_arrays(*_rows()), n_boot=200, lr_form="batch", score_laws=False)


def test_known_delta_is_recovered_inside_its_interval(batch_fit):
    law, delta = batch_fit.lr_batch.law, batch_fit.lr_batch.delta
    low, high = law.ci["exp_B"]
    assert low < DELTA < high and high - low < 0.4
    assert abs(law.exps["B"] - DELTA) < 0.08
    low_n, high_n = law.ci["exp_N"]
    assert low_n < ALPHA < high_n
    assert delta["supported"] is True and "excludes 0" in delta["verdict"]
    assert delta["cells_with_3_or_more_batches"] == 9 and delta["distinct_batches"] == 12
    # the cell law stays what it was: the LR at each cell's optimal batch
    assert "B" not in batch_fit.lr_law.exps


def test_no_batch_effect_is_said_to_be_unsupported():
    cols = _rows()
    n, d, lr, b, _ = cols
    flat = lr_star(n, d, 1e6)  # the optimum does not move with B
    loss = 1.7 + 400 / n**0.34 + 410 / d**0.28 + 0.02 * np.log(lr / flat) ** 2
    fit = fit_hparams(table_from_arrays(n, d, lr, b, loss), n_boot=100, lr_form="batch", score_laws=False)
    assert abs(fit.lr_batch.law.exps["B"]) < 0.1
    assert fit.lr_batch.delta["supported"] is False and "contains 0" in fit.lr_batch.delta["verdict"]


@pytest.mark.parametrize("batches, words", [
    (lambda bstar: np.array([2.0**20]), "every cell was run at one batch size (1.049e+06 tokens)"),
    (lambda bstar: np.array([round(bstar)]), "every cell was run at one batch size each (2e+05 to 4.595e+05 tokens)"),
])
def test_one_batch_size_overall_or_per_cell_refuses_the_batch_law(batches, words, tmp_path, capsys):
    table = table_from_arrays(*_rows(batches))
    with pytest.raises(UserError, match="batch-aware learning-rate law is not fitted because " + words.replace("(", r"\(")
                       .replace(")", r"\)").replace("+", r"\+")):
        fit_hparams(table, n_boot=20, lr_form="batch", score_laws=False)
    path = _csv(tmp_path / "one.csv", _rows(batches))
    assert main(["fit", str(path), "--lr-form", "batch", "--n-boot", "20", "--json"]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_two_batch_sizes_per_cell_are_too_few_distinct_values():
    table = table_from_arrays(*_rows(lambda bstar: np.array([2.0**19, 2.0**20])))
    with pytest.raises(UserError, match="too few batch sizes"):
        fit_hparams(table, n_boot=20, lr_form="batch", score_laws=False)


def test_fit_saves_the_batch_law_and_predict_gives_the_lr_for_my_batch(tmp_path, capsys):
    path = _csv(tmp_path / "runs.csv", _rows())
    law = tmp_path / "law.json"
    assert main(["fit", str(path), "--lr-form", "batch", "--n-boot", "100", "--no-plots", "--out",
                 str(tmp_path / "fit"), "--save", str(law)]) == 0
    text = capsys.readouterr().out
    assert "batch-aware learning-rate law" in text and "excludes 0" in text
    saved = json.loads(law.read_text())
    assert saved["lr_batch_law"]["exp_B"] == pytest.approx(DELTA, abs=0.08)
    assert saved["lr_batch_delta"]["supported"] is True
    fitted = json.loads((tmp_path / "fit" / "fit.json").read_text())["lr_batch"]
    assert fitted["delta"]["ci"][0] < DELTA < fitted["delta"]["ci"][1]

    lrs = {}
    for batch in ("2.5e5", "1e6"):
        assert main(["predict", "--params", "2.4e8", "--tokens", "8e9", "--law", str(law), "--batch-tokens", batch,
                     "--json"]) == 0
        (pred,) = json.loads(capsys.readouterr().out)["predictions"]
        assert pred["batch_tokens"] == float(batch) and pred["batch_given"] is True
        assert pred["lr"] == pytest.approx(float(lr_star(2.4e8, 8e9, float(batch))), rel=0.15)
        lrs[batch] = pred["lr"]
    assert lrs["1e6"] / lrs["2.5e5"] == pytest.approx(4 ** saved["lr_batch_law"]["exp_B"])
    assert main(["predict", "--params", "2.4e8", "--tokens", "8e9", "--law", str(law), "--batch-tokens", "4e8"]) == 0
    assert "outside the range" in capsys.readouterr().err  # a batch beyond the fitted rows is an extrapolation


def test_predict_batch_tokens_refusals(tmp_path, capsys):
    path = _csv(tmp_path / "runs.csv", _rows())
    law = tmp_path / "law.json"
    assert main(["fit", str(path), "--n-boot", "20", "--json", "--save", str(law)]) == 0
    capsys.readouterr()
    assert main(["predict", "--params", "2.4e8", "--tokens", "8e9", "--law", str(law), "--batch-tokens", "1e6"]) == 2
    assert "refit with `steplaw fit --lr-form batch --save`" in capsys.readouterr().err
    assert main(["predict", "--params", "2.4e8", "--tokens", "8e9", "--batch-tokens", "1e6"]) == 2
    assert "--batch-tokens needs a batch-aware law file" in capsys.readouterr().err
