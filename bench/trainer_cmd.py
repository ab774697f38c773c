"""Overhead of the command-trainer protocol (steplaw.trainers.command) per run.

A trainer that returns at once (a shell command that writes result.json) is run two
ways, interleaved: directly (`subprocess.run` of the same shell command: the trainer's
own time) and as a sweep's worker runs it (CommandTrainer: clear the run directory,
write trial.json, render the template, start it through the reaper in its own process
group, watch progress.jsonl, read and check result.json). overhead_ms = the difference
of the medians: what the protocol adds to each run (target <= 50 ms).

    python bench/trainer_cmd.py [--quick]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import log, report, speedups, time_interleaved

from steplaw.trainers.command import CommandTrainer
from steplaw.trial import Trial

TEMPLATE = "echo '{{\"loss\": 1.5}}' > {run_dir}/result.json"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    repeats = 5 if parser.parse_args().quick else 40
    trial = Trial(model="m", N=1000, D=4096, lr=1e-3, batch_tokens=512, seq_len=64)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = os.path.join(tmp, "run")
        os.makedirs(run_dir)
        trainer = CommandTrainer(TEMPLATE, cwd=tmp)
        direct_command = TEMPLATE.replace("{{", "{").replace("}}", "}").replace("{run_dir}", run_dir)

        def protocol():
            os.unlink(os.path.join(run_dir, "result.json")) if os.path.exists(os.path.join(run_dir, "result.json")) else None
            result = trainer(trial, run_dir=run_dir)
            assert result["status"] == "ok", result

        def direct():
            subprocess.run(["/bin/sh", "-c", direct_command], check=True)

        log(f"timing {repeats} runs of each, interleaved")
        median = time_interleaved({"command_trainer": protocol, "direct": direct}, repeats=repeats)
    overhead = median["command_trainer"] - median["direct"]
    report("trainer_cmd", "cpu", [{"case": "trainer that returns at once", "median_s": median,
                                   "speedup": speedups(median, "command_trainer"), "overhead_ms": overhead * 1e3, "target_ms": 50.0}],
           cpu="AMD EPYC, 2 cores, AVX-512", repeats=repeats)


if __name__ == "__main__":
    main()
