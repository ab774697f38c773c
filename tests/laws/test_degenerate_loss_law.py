"""Loss laws with an exponent <= 0 or not finite (issue 25, item 3): no compute-optimal split,
said in one sentence by fit-loss (text and JSON warnings), plan and the report; never a traceback.

The laws are built directly, so the tests do not depend on which float values a CPU's
fit lands on (a loss flat in N fits alpha = +-1e-14, its sign the CPU's)."""
import html
import json
import math

import numpy as np
import pytest

import steplaw.laws.loss as loss_module
from steplaw.cli import main
from steplaw.errors import UserError
from steplaw.laws.loss import LossFit
from steplaw.laws.saved import loss_law_record, write_json
from steplaw.laws.text import loss_fit_lines
from steplaw.report.build import fit_sweep_loss, loss_law_blocks, render_html, render_markdown

CASES = [("alpha", -1e-14), ("alpha", 0.0), ("beta", -0.2), ("alpha", math.nan), ("beta", math.inf)]


def _law(name, value) -> LossFit:
    constants = {"E": 1.7, "A": 400.0, "B": 410.0, "alpha": 0.34, "beta": 0.28, name: value}
    rows = np.tile([math.log(400.0), math.log(410.0), math.log(1.7), 0.34, 0.28], (20, 1))
    rows[:, 3 if name == "alpha" else 4] = value  # every resample as degenerate as the point fit
    return LossFit(**constants, intervals={}, flops_per_param_token=6.0, n_cells=12, n_column="N",
                   rms_log_residual=0.01, n_boot=20, samples=rows,
                   fitted_range={"N": [1e8, 1e9], "D": [1e9, 1e11]})


def _sentence(name, value) -> str:
    return f"the loss law's {name} = {value:.3g} is not a positive finite number, so it has no compute-optimal N and D"


@pytest.mark.parametrize("name, value", CASES)
def test_the_law_itself_refuses_the_split(name, value):
    law = _law(name, value)
    assert _sentence(name, value) in law.split_problem()
    for call in (lambda: law.G, lambda: law.n_exponent, lambda: law.compute_optimal(1e21)):
        with pytest.raises(UserError, match="no compute-optimal N and D"):
            call()
    assert law.optimal_interval(1e21) is None  # no resample has a split: no (nan, nan) interval
    data = json.loads(json.dumps(law.to_dict(), default=float))
    assert _sentence(name, value) in data["compute_optimal"]["refused"]
    assert sum(_sentence(name, value) in w for w in data["warnings"]) == 1
    lines = loss_fit_lines(law, law.to_dict())
    assert lines[-1] == "compute-optimal N and D: none (refused: see the warnings)"


@pytest.mark.parametrize("name, value", CASES[:1] + CASES[3:4])
def test_fit_loss_plan_and_report_say_it_in_one_sentence(capsys, tmp_path, monkeypatch, name, value):
    law = _law(name, value)
    table = tmp_path / "t.csv"
    rows = [(n, d, 3.0) for n in (1e8, 3e8, 1e9) for d in (1e9, 1e10, 1e11)]
    table.write_text("N,D,loss\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
    monkeypatch.setattr(loss_module, "fit_loss", lambda *args, **kwargs: law)
    # fit-loss: JSON warnings, text, and --budget refused with the sentence (exit 2)
    assert main(["fit-loss", str(table), "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert any(_sentence(name, value) in w for w in out["warnings"]) and "refused" in out["compute_optimal"]
    assert "Traceback" not in captured.err
    assert main(["fit-loss", str(table)]) == 0
    captured = capsys.readouterr()
    assert "compute-optimal N and D: none" in captured.out and _sentence(name, value) in captured.err
    assert main(["fit-loss", str(table), "--budget", "1e21"]) == 2
    err = capsys.readouterr().err
    assert _sentence(name, value) in err and len(err.strip().splitlines()) == 1
    # plan: --compute refused in one sentence; --params/--tokens still predict a loss
    path = write_json(tmp_path / "law.json", loss_law_record(law, "t.csv"))
    assert main(["plan", "--compute", "1e21", "--loss-law", str(path)]) == 2
    err = capsys.readouterr().err
    assert _sentence(name, value) in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert main(["plan", "--params", "1e9", "--tokens", "2e10", "--loss-law", str(path), "--json"]) == 0
    assert "predicted_loss" in json.loads(capsys.readouterr().out)
    # the report: the loss-law section says why there is no split
    monkeypatch.setattr("steplaw.report.build.fit_loss", lambda *args, **kwargs: law)
    fit, error = fit_sweep_loss(object(), n_boot=1000)
    blocks = loss_law_blocks(fit, error)
    text = render_markdown(blocks, tmp_path)
    assert f"No compute-optimal split: {_sentence(name, value)}" in text and text.count(_sentence(name, value)) == 1
    assert html.escape(_sentence(name, value)) in render_html(blocks)
