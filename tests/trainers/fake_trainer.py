"""A command trainer for the tests (no torch, starts in milliseconds).

    python -S fake_trainer.py MODE TRIAL_JSON [LOG]

Modes: ok (a loss that is lowest at lr 2^-5 and batch 2 sequences per 1K tokens),
crash, hang, silent (exit 0, no result), garbage (malformed JSON), nan, negative,
noloss (status ok, no loss), slow (hangs unless FAKE_FAST is set, then as ok). Each
start appends the run id to LOG when given.
"""
import json
import math
import os
import sys
import time

mode, path = sys.argv[1], sys.argv[2]
trial = json.load(open(path))
if len(sys.argv) > 3:
    with open(sys.argv[3], "a") as log:
        log.write(trial["run_id"] + "\n")
out = os.path.join(trial["run_dir"], "result.json")


def write(data):
    with open(out + ".tmp", "w") as f:
        f.write(data if isinstance(data, str) else json.dumps(data))
    os.replace(out + ".tmp", out)


if mode == "crash":
    print("Traceback: something broke\nValueError: bad things", file=sys.stderr)
    sys.exit(3)
if mode == "hang" or (mode == "slow" and not os.environ.get("FAKE_FAST")):
    time.sleep(60)
if mode == "silent":
    sys.exit(0)
if mode == "garbage":
    write("{not json")
    sys.exit(0)
loss = {"nan": float("nan"), "negative": -1.0}.get(mode)
if mode == "noloss":
    write({"status": "ok"})
    sys.exit(0)
if loss is None:
    seqs = trial["batch_seqs"] * 1024 / trial["D"]
    loss = 3.0 + (math.log2(trial["lr"]) + 5) ** 2 * 0.05 + (math.log2(max(seqs, 1e-9)) - 1) ** 2 * 0.03 \
        + 1e3 / trial["N"] ** 0.5 + 1e2 / trial["D"] ** 0.3
with open(os.path.join(trial["run_dir"], "progress.jsonl"), "a") as f:
    f.write(json.dumps({"tokens": trial["D"], "loss": loss}) + "\n") if math.isfinite(loss) else None
write(json.dumps({"loss": loss, "tokens": trial["D"]}) if math.isfinite(loss) else '{"loss": NaN}')
