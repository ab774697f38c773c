"""A sweep's objective (SweepSpec.objective): the loss column the planner searches and that
`steplaw fit DIR` and `steplaw report DIR` fit by default."""
import json
import math
import subprocess
import sys

import pytest
from planner_fakes import landscape_loss, optimum

from steplaw.errors import UserError
from steplaw.report.build import write_report
from steplaw.sweep.driver import run_sweep
from steplaw.sweep.executors import InlineExecutor
from steplaw.sweep.planner import AdaptivePlanner, spec_cells
from steplaw.sweep.spec import ModelSpec, SweepSpec, spec_id_of
from steplaw.sweep.store import sweep_objective
from steplaw.train.config import RunResult
from steplaw.trainers.steplaw import SteplawTrainer

SHAPES = [{"d_model": d, "n_layers": 1, "n_heads": 2, "d_ff": 2 * d, "max_seq_len": 64} for d in (16, 32, 64)]
TRAIN_LR_SHIFT = 4.0  # the training loss's optimum sits at 4x the validation loss's LR


def two_losses_run(config, run_dir=None):
    """Validation loss: the planner_fakes landscape; training loss: the same landscape with
    its LR optimum moved up by TRAIN_LR_SHIFT, so the two objectives disagree."""
    args = (config.lr, config.batch_tokens, config.model.d_model, config.tokens)
    val, train = landscape_loss(*args), landscape_loss(*args, lr_scale=TRAIN_LR_SHIFT)
    if val is None or train is None:
        return RunResult(status="diverged", reason="loss is nan", run_id=config.run_id())
    return RunResult(status="ok", final_train_loss=train, final_val_loss=val, tokens=config.tokens,
                     run_id=config.run_id(), wall_s=0.0)


def spec(objective="loss"):
    return SweepSpec(models=[ModelSpec(shape=s) for s in SHAPES], tokens=[65536, 262144, 1048576], lr_center_scale=0.05,
                     batch_center_scale=0.3, fixed={"seq_len": 64, "device": "cpu"}, objective=objective).bind(SteplawTrainer())


def sweep(out, the_spec):
    planner = AdaptivePlanner(spec_cells(the_spec), None)
    return run_sweep([], out, lambda: InlineExecutor(two_losses_run, capacity=4, run_dirs=False), progress=False, trainer=SteplawTrainer(),
                     planner=planner, spec=the_spec.to_dict())


def fit_json(out, *extra):
    proc = subprocess.run([sys.executable, "-m", "steplaw", "fit", str(out), "--json", "--n-boot", "0", *extra],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _median_lr_error(fit, lr_scale):
    errors = []
    for cell in fit["cells"]:
        d_model = next(s["d_model"] for s in SHAPES if abs(_n_of(s) - cell["N"]) < 1)
        errors.append(abs(math.log(cell["opt_lr"] / optimum(d_model, cell["D"], lr_scale)[0])))
    return sorted(errors)[len(errors) // 2]


def _n_of(shape):
    from steplaw.sweep.spec import count_params

    return count_params(ModelSpec(shape=shape).build(256, 64))["non_embedding"]


def test_the_planner_searches_the_objective_and_fit_and_report_use_it(tmp_path):
    out = tmp_path / "val"
    summary = sweep(out, spec("val_loss"))
    assert {c["state"] for c in summary.cells} == {"bracketed"}
    assert sweep_objective(out) == "val_loss"
    fit = fit_json(out)
    assert fit["loss_column"] == "val_loss"
    # the optima found are the validation loss's, not the training loss's (4x apart in LR)
    assert _median_lr_error(fit, 1.0) < 0.5 < _median_lr_error(fit, TRAIN_LR_SHIFT)
    assert fit_json(out, "--col-loss", "loss")["loss_column"] == "loss"  # an explicit column still wins
    report = write_report(out, n_boot=0, plots=False, html_report=False)[0].read_text()
    assert "validation loss at the end of the run" in report
    fit_report = json.loads((out / "report" / "fit.json").read_text())
    assert fit_report["loss_column"] == "val_loss" and fit_report["lr_law"] == fit["lr_law"]


def test_the_default_objective_is_the_training_loss_and_keeps_old_spec_ids(tmp_path):
    data = spec().to_dict()
    assert "objective" not in data  # specs written before the field existed keep their spec_id
    assert spec_id_of(data) != spec_id_of(spec("val_loss").to_dict())
    out = tmp_path / "train"
    sweep(out, spec())
    assert sweep_objective(out) == "loss"
    fit = fit_json(out)
    assert fit["loss_column"] == "loss"
    assert _median_lr_error(fit, TRAIN_LR_SHIFT) < 0.5


@pytest.mark.parametrize("value", ["val", "", None, 3])
def test_a_bad_objective_is_refused(value):
    with pytest.raises(UserError, match="objective"):
        spec(value)


def test_a_validation_objective_needs_validation_tokens():
    with pytest.raises(UserError, match="eval_tokens=0"):
        SweepSpec(models=[ModelSpec(shape=SHAPES[0])], tokens=[65536], fixed={"eval_tokens": 0},
                  objective="val_loss").bind(SteplawTrainer())
    # the training loss needs none
    SweepSpec(models=[ModelSpec(shape=SHAPES[0])], tokens=[65536], fixed={"eval_tokens": 0}).bind(SteplawTrainer())
