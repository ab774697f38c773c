"""No silent non-law (issue 24, item 1): an exponent whose variable never varied (one batch
size, one N, one D, one LR per cell) is refused by name, never printed with a zero-width
interval; with one batch size the LR law is said to be conditional on it."""
import json

import numpy as np
import pytest

from steplaw.cli import main

N_VALUES, D_VALUES = (6e7, 2.4e8, 9.6e8), (2e9, 8e9, 3.2e10)
LRS, BATCHES = np.geomspace(1e-4, 1.6e-3, 5), (2**18, 2**19, 2**20, 2**21)


def _loss(n, d, lr, bs):
    lr_star, bs_star = 0.3 * n**-0.25 * d**0.1 / 40, 2e5 * (d / 2e9) ** 0.3
    return 1.7 + 400 / n**0.34 + 410 / d**0.28 + 0.02 * np.log(lr / lr_star) ** 2 + 0.01 * np.log(bs / bs_star) ** 2


def _table(path, n_values=N_VALUES, d_values=D_VALUES, lrs=lambda n, d: LRS, batches=lambda n, d: BATCHES):
    rows = [(n, d, lr, bs, _loss(n, d, lr, bs)) for n in n_values for d in d_values for lr in lrs(n, d)
            for bs in batches(n, d)]
    path.write_text("N,D,lr,batch_tokens,loss\n" + "\n".join(",".join(repr(float(v)) for v in r) for r in rows) + "\n")
    return path


def _fit(capsys, path) -> tuple[dict, str]:
    assert main(["fit", str(path), "--n-boot", "50", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert main(["fit", str(path), "--n-boot", "50", "--no-plots", "--out", str(path.parent / "fit")]) == 0
    text = capsys.readouterr().out
    for key in ("lr_law", "bs_law"):  # no exponent with an interval of zero width
        for name, (low, high) in out[key]["ci"].items():
            assert high > low, (key, name, low, high)
    return out, text


def _reasons(out, law) -> list[str]:
    return [r["reason"] for r in out["refused_exponents"] if r["law"] == law]


def test_one_batch_size_refuses_the_batch_law_and_conditions_the_lr_law(capsys, tmp_path):
    out, text = _fit(capsys, _table(tmp_path / "t.csv", batches=lambda n, d: (2**20,)))
    (reason,) = _reasons(out, "batch-size")
    assert "every cell was run at one batch size (1.049e+06 tokens)" in reason
    assert "the learning-rate law is conditional on that batch size, B = 1.049e+06 tokens" in reason
    assert not [k for k in out["bs_law"] if k.startswith("exp_")] and out["bs_law"]["ci"] == {}
    assert "exp_N" in out["lr_law"] and "exp_D" in out["lr_law"]  # the LR law itself stands
    assert reason in out["warnings"] and f"refused: {reason}" in text and "D^-0.0000" not in text


def test_one_batch_size_per_cell_refuses_the_batch_law(capsys, tmp_path):
    out, _ = _fit(capsys, _table(tmp_path / "t.csv", batches=lambda n, d: (round(2e5 * (d / 2e9) ** 0.3),)))
    (reason,) = _reasons(out, "batch-size")
    assert "every cell was run at one batch size each (2e+05 to 4.595e+05 tokens)" in reason
    assert "the learning-rate law is conditional on each cell's batch size" in reason
    assert not [k for k in out["bs_law"] if k.startswith("exp_")]


def test_one_lr_per_cell_refuses_the_lr_law(capsys, tmp_path):
    out, text = _fit(capsys, _table(tmp_path / "t.csv", lrs=lambda n, d: (0.3 * n**-0.25 * d**0.1 / 40,)))
    (reason,) = _reasons(out, "learning-rate")
    assert "every cell was run at one learning rate each" in reason and "no cell has an optimum in learning rate" in reason
    assert not [k for k in out["lr_law"] if k.startswith("exp_")] and out["lr_law"]["ci"] == {}
    assert "exp_D" in out["bs_law"] and f"refused: {reason}" in text


@pytest.mark.parametrize("variable, kwargs, laws", [
    ("N", {"n_values": (2.4e8,)}, ("learning-rate",)),
    ("D", {"d_values": (8e9,)}, ("learning-rate", "batch-size")),
])
def test_one_value_of_N_or_D_refuses_its_exponents(capsys, tmp_path, variable, kwargs, laws):
    out, _ = _fit(capsys, _table(tmp_path / "t.csv", **kwargs))
    for law in laws:
        (reason,) = [r["reason"] for r in out["refused_exponents"] if r["law"] == law and r["variable"] == variable]
        assert f"exponent of {variable} is not fitted because the cells have 1 distinct value(s) of {variable}" in reason
    assert f"exp_{variable}" not in out["lr_law"] and f"exp_{variable}" not in out["bs_law"]
