import json
import math

import numpy as np
import pytest
import torch

from steplaw.data import load_token_data
from steplaw.errors import UserError
from steplaw.models import ModelConfig, MoEConfig, param_counts
from steplaw.train import RunConfig, RunResult, run

TINY = ModelConfig(d_model=64, n_layers=2, n_heads=2, d_ff=192, max_seq_len=64)


def tiny_run(**overrides) -> RunConfig:
    fields = dict(model=TINY, tokens=100 * 1024, lr=3e-3, batch_tokens=1024, seq_len=64, optimizer="torch", device="cpu", eval_tokens=8192)
    fields.update(overrides)
    return RunConfig(**fields)


@pytest.fixture(scope="module")
def unigram_val_loss() -> float:
    """Cross-entropy (nats/token) of the validation bytes under the training bytes' unigram."""
    data = load_token_data()
    counts = np.bincount(data.train, minlength=256) + 1
    return float(-np.log(counts / counts.sum())[data.val].mean())


@pytest.fixture(scope="module")
def dense_result() -> RunResult:
    return run(tiny_run())


def test_tiny_dense_model_learns_the_corpus(dense_result, unigram_val_loss):
    assert dense_result.status == "ok", dense_result.reason
    assert unigram_val_loss > 2.9
    assert dense_result.final_val_loss < unigram_val_loss - 0.5
    assert dense_result.final_train_loss < unigram_val_loss - 0.5
    first, last = dense_result.curve[0][1], dense_result.curve[-1][1]
    assert first > 5.0 and last < first - 2.5  # from ~ln(256) down


def test_result_fields(dense_result):
    r = dense_result
    counts = param_counts(TINY)
    assert r.steps == 100 and r.tokens == 100 * 1024
    assert r.params_total == counts.total and r.params_non_embedding == counts.non_embedding == r.params_active
    assert r.compute_flops == pytest.approx(r.flops_per_token * r.tokens)
    assert r.tokens_per_s > 0 and r.wall_s > 0
    assert r.run_id == tiny_run().run_id() and RunConfig.from_dict(r.config) == tiny_run()
    assert r.curve[-1][0] == r.tokens and len(r.curve) == 100
    assert RunResult.from_dict(json.loads(json.dumps(r.to_dict()))) == r


def test_tiny_moe_model_learns_the_corpus(unigram_val_loss):
    pytest.importorskip("steplaw.models.moe")
    model = ModelConfig(d_model=64, n_layers=2, n_heads=2, d_ff=192, max_seq_len=64, moe=MoEConfig(n_experts=4, top_k=2, d_expert=96))
    result = run(tiny_run(model=model))
    assert result.status == "ok", result.reason
    assert result.params_active < result.params_non_embedding
    assert result.final_val_loss < unigram_val_loss - 0.5
    assert 1.0 <= result.moe_max_mean_load < 4.0  # 4 experts: 4.0 would be all tokens on one


def test_divergence_is_a_result():
    result = run(tiny_run(lr=30.0, tokens=60 * 1024, warmup_tokens=1024, grad_clip=None))
    assert result.status == "diverged"
    assert "loss" in result.reason
    assert result.steps < 60 and result.final_val_loss is None
    json.dumps(result.to_dict(), allow_nan=False)  # no NaN in what gets stored


def test_nan_loss_is_diverged(monkeypatch):
    from steplaw.models import transformer

    real_forward = transformer.Transformer.forward
    calls = []

    def forward_turning_nan(self, idx, targets=None):
        calls.append(1)
        loss = real_forward(self, idx, targets)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(transformer.Transformer, "forward", forward_turning_nan)
    result = run(tiny_run(tokens=10 * 1024))
    assert result.status == "diverged" and "nan" in result.reason and result.steps == 5
    assert len(result.curve) == 4 and all(math.isfinite(loss) for _, loss in result.curve)
    json.dumps(result.to_dict(), allow_nan=False)


def test_accumulation_matches_one_big_batch():
    whole = run(tiny_run(tokens=8 * 1024))
    accumulated = run(tiny_run(tokens=8 * 1024, micro_batch_tokens=256))
    assert [t for t, _ in whole.curve] == [t for t, _ in accumulated.curve]
    np.testing.assert_allclose([loss for _, loss in whole.curve], [loss for _, loss in accumulated.curve], rtol=1e-4)


MOE_TINY = ModelConfig(
    d_model=64, n_layers=2, n_heads=2, d_ff=192, max_seq_len=64,
    moe=MoEConfig(n_experts=4, top_k=2, d_expert=64, bias_update_rate=1e-3),
)


@pytest.mark.parametrize(
    "model,optimizer", [(TINY, "torch"), (TINY, "steplaw"), (MOE_TINY, "torch")], ids=["dense", "dense-fusedadamw", "moe"]
)
def test_resume_gives_the_same_curve(tmp_path, model, optimizer):
    if model.moe is not None:
        pytest.importorskip("steplaw.models.moe")
    config = tiny_run(model=model, tokens=24 * 1024, optimizer=optimizer)
    straight = run(config)
    stopped = run(config, run_dir=tmp_path, stop_after_steps=10)
    assert stopped.status == "pending" and stopped.steps == 10
    assert (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "result.json").exists()
    resumed = run(config, run_dir=tmp_path)
    assert resumed.status == "ok" and resumed.steps == 24
    assert resumed.curve == straight.curve
    assert resumed.final_val_loss == straight.final_val_loss
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["final_val_loss"] == resumed.final_val_loss and saved["run_id"] == config.run_id()
    assert not (tmp_path / "checkpoint.pt").exists()
    # A finished run directory returns its result without training again.
    assert run(config, run_dir=tmp_path).curve == straight.curve


def test_other_runs_result_refused(tmp_path):
    run(tiny_run(tokens=2 * 1024), run_dir=tmp_path)
    with pytest.raises(UserError, match="another run"):
        run(tiny_run(tokens=3 * 1024), run_dir=tmp_path)


@pytest.mark.parametrize("schedule", ["wsd", "constant"])
def test_other_schedules_train(schedule):
    result = run(tiny_run(tokens=20 * 1024, schedule=schedule))
    assert result.status == "ok" and result.final_train_loss < 5.0


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(batch_tokens=1000), "not a multiple of seq_len"),
        (dict(seq_len=128), "max_seq_len"),
        (dict(schedule="linear"), "schedule"),
        (dict(optimizer="sgd"), "optimizer"),
        (dict(device="tpu"), "device"),
        (dict(precision="fp8"), "precision"),
        (dict(lr=-1.0), "lr"),
        (dict(data="/nonexistent/dir"), "does not exist"),
    ],
)
def test_user_mistakes_raise_user_error(overrides, match):
    with pytest.raises(UserError, match=match):
        run(tiny_run(**overrides))


def test_steplaw_optimizer_option_trains():
    result = run(tiny_run(tokens=10 * 1024, optimizer="steplaw"))
    assert result.status == "ok"


def test_bf16_autocast_on_cpu():
    result = run(tiny_run(tokens=10 * 1024, precision="bf16"))
    assert result.status == "ok" and math.isfinite(result.final_val_loss)


def test_a_run_that_breaks_is_failed_not_raised(monkeypatch):
    from steplaw.models import transformer

    def broken_forward(self, idx, targets=None):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(transformer.Transformer, "forward", broken_forward)
    result = run(tiny_run(tokens=4 * 1024))
    assert result.status == "failed" and "out of memory (simulated)" in result.reason


@pytest.mark.gpu
def test_gpu_bf16_run_learns(unigram_val_loss):
    result = run(tiny_run(device="cuda", precision="auto", tokens=200 * 1024))
    assert result.status == "ok", result.reason
    assert result.final_val_loss < unigram_val_loss - 0.5


def test_periodic_checkpoints_survive_a_crash(tmp_path, monkeypatch):
    import importlib

    runner = importlib.import_module("steplaw.train.runner")
    config = tiny_run(tokens=12 * 1024)
    straight = run(config)
    real_multiplier = runner.lr_multiplier

    def crash_at_step_6(step, *args):
        if step == 6:
            raise KeyboardInterrupt  # a kill: no result, no final checkpoint
        return real_multiplier(step, *args)

    monkeypatch.setattr(runner, "lr_multiplier", crash_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        run(config, run_dir=tmp_path, checkpoint_every=4)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 4
    monkeypatch.setattr(runner, "lr_multiplier", real_multiplier)
    assert run(config, run_dir=tmp_path, checkpoint_every=4).curve == straight.curve


def test_resumed_run_records_wall_time_not_only_training_time(tmp_path, monkeypatch):
    import importlib
    import time

    runner = importlib.import_module("steplaw.train.runner")
    real_build = runner.build_state

    def slow_build(*args):
        time.sleep(0.5)  # set-up time: on the wall clock, not the training clock
        return real_build(*args)

    monkeypatch.setattr(runner, "build_state", slow_build)
    config = tiny_run(tokens=6 * 1024)
    run(config, run_dir=tmp_path, stop_after_steps=3)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert saved["wall_s"] >= saved["train_s"] + 0.5
    resumed = run(config, run_dir=tmp_path)
    assert resumed.wall_s >= 1.0 + saved["train_s"]  # both sessions' set-up and training


def test_loss_tracker_smooths_once_and_applies_the_divergence_rule():
    from steplaw.train.tracking import DIVERGENCE_FACTOR, EMA_STEPS, LossTracker, smoothed

    losses = [5.0, 4.0, 3.5, 3.0]
    beta = 1 - 1 / EMA_STEPS
    ema = 0.0
    for x in losses:
        ema = beta * ema + (1 - beta) * x
    assert smoothed(losses) == pytest.approx(ema / (1 - beta ** len(losses)))
    tracker = LossTracker()
    assert [tracker.add(x) for x in losses] == [None] * 4
    assert "nan" in tracker.add(float("nan")) and tracker.finite() == losses
    assert tracker.smoothed == pytest.approx(smoothed(losses))
    rising = LossTracker([1.0])
    reasons = [rising.add(10 * DIVERGENCE_FACTOR) for _ in range(3)]
    assert reasons[0] is not None and "rose above" in reasons[0]


def _strict_json(text: str):
    def refuse(constant):
        raise AssertionError(f"non-strict JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def test_nan_validation_loss_is_stored_as_none(monkeypatch, tmp_path, capsys):
    """A NaN validation loss (the model's output on held-out text) is no number: the
    result holds None, and result.json and `train --json` stay strict JSON."""
    from steplaw.cli import main
    from steplaw.train import runner

    monkeypatch.setattr(runner, "evaluate", lambda *args: torch.tensor(float("nan"), dtype=torch.float64))
    result = run(tiny_run(tokens=2 * 1024), run_dir=tmp_path / "run")
    assert result.status == "ok" and result.final_val_loss is None
    assert _strict_json((tmp_path / "run" / "result.json").read_text())["final_val_loss"] is None
    argv = ["train", "--params", "20K", "--tokens", "2048", "--lr", "3e-3", "--batch-tokens", "1024", "--device", "cpu",
            "--json", "--quiet"]
    assert main(argv) == 0
    printed = _strict_json(capsys.readouterr().out)
    assert printed["status"] == "ok" and printed["final_val_loss"] is None


def test_result_json_refuses_non_finite_numbers():
    from steplaw.train.checkpoint import result_json

    assert _strict_json(result_json(RunResult(status="ok", final_val_loss=2.5)))["final_val_loss"] == 2.5
    with pytest.raises(ValueError):
        result_json(RunResult(status="ok", final_val_loss=float("nan")))
