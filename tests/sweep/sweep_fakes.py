"""Stand-in run functions for the sweep tests: fast, with scripted behaviour.

They follow the real contract, run_fn(RunConfig, run_dir=...) -> RunResult, and pick a
behaviour from the config's seed:
  seed 0: a result whose loss is a bowl over (log lr, log batch), minimum at lr=0.01, B=1024
  seed 1: raise an exception (a crashing run)
  seed 2: SIGKILL its own worker on the first attempt, succeed on the second
  seed 3: SIGKILL its own worker every time
  seed 4: diverge
Every run appends "run_id generation" to SWEEP_FAKE_LOG when it finishes, so tests can
see which runs were executed by which driver. SWEEP_FAKE_SLEEP (seconds) slows runs down.
With SWEEP_FAKE_VICTIM set to a file path, the first run to start claims that file (writes
its worker's pid into it) and then hangs, so a test can SIGKILL a worker known to be
inside a run; every later run, the victim's retry included, runs normally.
"""
import math
import os
import signal
import time
from pathlib import Path

from steplaw.train.config import RunResult


def bowl_loss(lr: float, batch_tokens: int) -> float:
    return 2.0 + 0.1 * math.log(lr / 0.01) ** 2 + 0.05 * math.log(batch_tokens / 1024) ** 2


def _claim_victim(path: str) -> bool:
    try:  # the claim file stays: exactly one run ever claims
        os.close(os.open(path + ".claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    Path(path + ".tmp").write_text(str(os.getpid()))
    os.rename(path + ".tmp", path)  # the test sees the pid only once it is complete
    return True


def fake_run(config, run_dir=None):
    victim = os.environ.get("SWEEP_FAKE_VICTIM")
    if victim and _claim_victim(victim):
        time.sleep(600)  # killed by the test long before this ends
    time.sleep(float(os.environ.get("SWEEP_FAKE_SLEEP", "0")))
    if config.seed == 1:
        raise RuntimeError("scripted crash")
    if config.seed in (2, 3):
        marker = Path(run_dir) / "attempted"
        if config.seed == 3 or not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
    run_id = config.run_id()
    log = os.environ.get("SWEEP_FAKE_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{run_id} {os.environ.get('SWEEP_FAKE_GENERATION', '0')}\n")
    if config.seed == 4:
        return RunResult(status="diverged", reason="loss is nan", final_train_loss=float("nan"),
                         curve=[(0, 5.5), (config.batch_tokens, float("nan"))], run_id=run_id)
    loss = bowl_loss(config.lr, config.batch_tokens)
    return RunResult(status="ok", final_train_loss=loss, final_val_loss=loss + 0.01,
                     curve=[(0, 5.5), (config.tokens, loss)], tokens=config.tokens, steps=config.tokens // config.batch_tokens,
                     wall_s=0.01, run_id=run_id, config=config.to_dict())


def node_run(config, run_dir=None):
    """For the multi-node Ray test: logs 'start|end run_id node_id' to SWEEP_FAKE_NODE_LOG
    around a sleep of SWEEP_FAKE_SLEEP seconds, then returns the bowl result."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    run_id = config.run_id()
    log = os.environ["SWEEP_FAKE_NODE_LOG"]
    with open(log, "a") as f:
        f.write(f"start {run_id} {node}\n")
    time.sleep(float(os.environ.get("SWEEP_FAKE_SLEEP", "0")))
    with open(log, "a") as f:
        f.write(f"end {run_id} {node}\n")
    loss = bowl_loss(config.lr, config.batch_tokens)
    return RunResult(status="ok", final_train_loss=loss, curve=[(0, 5.5), (config.tokens, loss)], run_id=run_id)
