"""DDP on CPU: two gloo processes under torchrun train exactly the batch one process does."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from steplaw.models import ModelConfig
from steplaw.train import RunConfig, run

TINY = ModelConfig(d_model=64, n_layers=2, n_heads=2, d_ff=192, max_seq_len=64)


def test_two_gloo_processes_equal_one(tmp_path):
    # Each rank gets 8 sequences as 2 micro-batches of 4: accumulation and DDP together.
    micro_batch_tokens = 256
    config = RunConfig(
        model=TINY, tokens=12 * 1024, lr=3e-3, batch_tokens=1024, seq_len=64,
        micro_batch_tokens=micro_batch_tokens, optimizer="torch", device="cpu", eval_tokens=4096,
    )
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "steplaw.cli.ddp", str(tmp_path / "config.json"), str(tmp_path / "result.json"),
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr[-3000:]
    distributed = json.loads((tmp_path / "result.json").read_text())

    single = run(config)
    assert distributed["status"] == "ok" and distributed["steps"] == single.steps == 12
    assert [t for t, _ in distributed["curve"]] == [t for t, _ in single.curve]
    np.testing.assert_allclose([loss for _, loss in distributed["curve"]], [loss for _, loss in single.curve], rtol=2e-4)
    assert distributed["final_val_loss"] == pytest.approx(single.final_val_loss, rel=2e-4)


def test_result_file_is_written_atomically(tmp_path, monkeypatch):
    """Rank 0's result goes through fileio.write_atomic (a reader never sees half of it)."""
    from steplaw.cli import ddp
    from steplaw.train import runner
    from steplaw.train.config import RunResult

    config = RunConfig(model=TINY, tokens=1024, lr=3e-3, batch_tokens=1024, seq_len=64, device="cpu")
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    monkeypatch.setattr(runner, "run", lambda config, run_dir=None: RunResult(status="ok", final_val_loss=3.0))
    written = []
    real = ddp.write_atomic
    monkeypatch.setattr(ddp, "write_atomic", lambda path, data: written.append(str(path)) or real(path, data))
    assert ddp.main([str(tmp_path / "config.json"), str(tmp_path / "result.json")]) == 0
    assert written == [str(tmp_path / "result.json")]
    assert json.loads((tmp_path / "result.json").read_text())["final_val_loss"] == 3.0
