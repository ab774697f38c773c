"""Plans you can score (issue 24, item 6): plan --save, then `steplaw score` against the
outcome; end to end with a real tiny training run; bad plan files and a missing outcome refused."""
import json

import numpy as np
import pytest

from steplaw.cli import main


def _out(capsys, argv) -> dict:
    assert main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def law_file(tmp_path_factory):
    """A fitted loss law with a bootstrap (so plans get an interval), from a noisy ladder."""
    tmp = tmp_path_factory.mktemp("law")
    rng = np.random.default_rng(0)
    rows = [(n, n * t, (1.8 + 480 / n**0.35 + 2000 / (n * t) ** 0.37) * (1 + 0.003 * rng.standard_normal()))
            for n in np.geomspace(5e4, 2e6, 5) for t in (5, 20, 80)]
    table = tmp / "ladder.csv"
    table.write_text("N,D,loss\n" + "\n".join(",".join(repr(float(v)) for v in r) for r in rows) + "\n")
    assert main(["fit-loss", str(table), "--n-boot", "50", "--save", str(tmp / "law.json")]) == 0
    return tmp / "law.json"


def test_plan_then_a_real_tiny_run_then_score(capsys, tmp_path, law_file):
    plan_path = tmp_path / "plan.json"
    plan = _out(capsys, ["plan", "--params", "100k", "--tokens", "4096", "--loss-law", str(law_file),
                         "--save", str(plan_path)])
    saved = json.loads(plan_path.read_text())
    assert saved["kind"] == "steplaw.plan" and saved["prediction"]["predicted_loss"] == plan["predicted_loss"]
    assert saved["laws"]["loss_law"]["sha256"] and saved["laws"]["hparam_law"]["key"] == "step_law"
    low, high = saved["prediction"]["predicted_loss_interval"]
    assert low < plan["predicted_loss"] < high
    # the plan scored against its own prediction
    own = _out(capsys, ["score", str(plan_path), "--loss", repr(plan["predicted_loss"])])
    assert own["rel_error"] == 0 and own["inside_interval"] is True
    # a real run at the plan's N and D (its own batch: the Step Law's is not a whole number of sequences here)
    run = _out(capsys, ["train", "--params", "100k", "--tokens", "4096", "--lr", repr(plan["lr"]),
                        "--batch-tokens", "1024", "--seq-len", "64", "--quiet"])
    scored = _out(capsys, ["score", str(plan_path), "--loss", repr(run["final_train_loss"]), "--lr", repr(plan["lr"]),
                           "--batch-tokens", "1024"])
    assert scored["rel_error"] == pytest.approx(run["final_train_loss"] / plan["predicted_loss"] - 1)
    assert scored["inside_interval"] == (low <= run["final_train_loss"] <= high) and scored["lr_ratio"] == 1.0
    table = tmp_path / "runs.csv"
    table.write_text("run_id,N,D,lr,batch_tokens,loss\n"
                     f"{run['run_id']},{run['params_non_embedding']},{run['tokens']},{plan['lr']!r},1024,"
                     f"{run['final_train_loss']!r}\n")
    from_table = _out(capsys, ["score", str(plan_path), "--runs", str(table)])
    assert from_table["rel_error"] == pytest.approx(scored["rel_error"]) and from_table["run"]["run_id"] == run["run_id"]
    assert main(["score", str(plan_path), "--loss", "3.1"]) == 0
    assert "rel_error" in capsys.readouterr().out


@pytest.mark.parametrize("content, argv, message", [
    (None, ["--loss", "3"], "no plan file"),
    ("not json", ["--loss", "3"], "is not a JSON plan file"),
    ('{"kind": "steplaw.loss_law", "version": 1}', ["--loss", "3"], "is not a steplaw plan file"),
    ('{"kind": "steplaw.plan", "version": 99}', ["--loss", "3"], "is a plan file of version 99"),
    ('{"kind": "steplaw.plan", "version": 1, "prediction": {"predicted_loss": 3.0}}', [], "score needs the outcome"),
    ('{"kind": "steplaw.plan", "version": 1, "prediction": {"predicted_loss": 3.0}}', ["--loss", "-1"],
     "--loss '-1' must be a positive finite number"),
])
def test_bad_plans_and_missing_outcomes_are_one_sentence(capsys, tmp_path, content, argv, message):
    path = tmp_path / "plan.json"
    if content is not None:
        path.write_text(content)
    assert main(["score", str(path)] + argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
