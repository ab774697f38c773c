"""Run-directory files: damaged ones are set aside with a warning, never silently."""
from __future__ import annotations

import json

import pytest
import torch

from steplaw.errors import UserError
from steplaw.train.checkpoint import load_checkpoint, load_result, save_checkpoint, save_result
from steplaw.train.config import RunResult


def _checkpoint(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return save_checkpoint(tmp_path, "run1", model, optimizer, step=3, losses=[1.0, 0.9, 0.8], wall_s=1.0, train_s=1.0)


def test_checkpoint_round_trip_leaves_no_temporary_file(tmp_path):
    _checkpoint(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    assert load_checkpoint(tmp_path, "run1", torch.device("cpu"))["step"] == 3
    assert load_checkpoint(tmp_path, "other", torch.device("cpu")) is None


@pytest.mark.parametrize("damage", [lambda b: b[: len(b) // 2], lambda b: b"", lambda b: b"garbage" * 10])
def test_damaged_checkpoint_is_set_aside_with_a_warning(tmp_path, damage):
    path = _checkpoint(tmp_path)
    original = path.read_bytes()
    path.write_bytes(damage(original))
    with pytest.warns(UserWarning, match="cannot be read.*kept as checkpoint.pt.unreadable"):
        assert load_checkpoint(tmp_path, "run1", torch.device("cpu")) is None
    assert not path.exists() and (tmp_path / "checkpoint.pt.unreadable").read_bytes() == damage(original)


@pytest.mark.parametrize("text", ["{trunc", "[1, 2]", "\udcff"])
def test_damaged_result_is_set_aside_with_a_warning(tmp_path, text):
    (tmp_path / "result.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.warns(UserWarning, match="kept as result.json.unreadable"):
        assert load_result(tmp_path, "run1") is None
    assert (tmp_path / "result.json.unreadable").exists()


def test_result_of_another_run_is_refused(tmp_path):
    save_result(tmp_path, RunResult(status="ok", run_id="run1"))
    assert load_result(tmp_path, "run1").status == "ok"
    with pytest.raises(UserError, match="holds the result of another run"):
        load_result(tmp_path, "run2")
    assert json.loads((tmp_path / "result.json").read_text())["run_id"] == "run1"
