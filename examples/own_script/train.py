"""A training script of one's own, driven by `steplaw sweep --trainer-cmd`.

It knows nothing of steplaw: it reads its settings from the command line, trains a small
character-level MLP language model with AdamW and a warmup + cosine schedule on a text
file (or on built-in text), and writes the loss to OUT/result.json (and its progress to
OUT/progress.jsonl). Any script that does the same can be swept:

    steplaw sweep examples/own_script/sweep.toml --planner adaptive --out runs \\
        --trainer-cmd 'python examples/own_script/train.py --lr {lr} --batch-seqs {batch_seqs} \\
                       --seq-len {seq_len} --tokens {D} --width {args} --seed {seed} --out {run_dir}'
"""
import argparse
import json
import math
import os
import time

import torch

TEXT = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; "
        "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. "
        "And God said, Let there be light: and there was light. And God saw the light, that it was good: "
        "and God divided the light from the darkness. ") * 40


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--batch-seqs", type=int, required=True)
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--width", default="{}", help="the model's args as JSON ({\"width\": 64})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text", default=None, help="a text file to train on (default: built-in text)")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    width = int(json.loads(a.width).get("width", 32)) if a.width.startswith("{") else int(a.width)
    torch.manual_seed(a.seed)
    torch.set_num_threads(1)
    data = torch.tensor(list(open(a.text, "rb").read() if a.text else TEXT.encode()), dtype=torch.long)
    model = torch.nn.Sequential(torch.nn.Embedding(256, width), torch.nn.Flatten(0, 1), torch.nn.Linear(width, width),
                                torch.nn.GELU(), torch.nn.Linear(width, 256))
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.1)
    steps = max(1, a.tokens // (a.batch_seqs * a.seq_len))
    warmup = max(1, steps // 20)
    started, smooth = time.time(), None
    progress = open(os.path.join(a.out, "progress.jsonl"), "a")
    for step in range(steps):
        scale = (step + 1) / warmup if step < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        for group in opt.param_groups:
            group["lr"] = a.lr * scale
        starts = torch.randint(0, len(data) - a.seq_len - 1, (a.batch_seqs,))
        x = torch.stack([data[s:s + a.seq_len] for s in starts])
        y = torch.stack([data[s + 1:s + a.seq_len + 1] for s in starts])
        loss = torch.nn.functional.cross_entropy(model(x), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        smooth = loss.item() if smooth is None else 0.9 * smooth + 0.1 * loss.item()
        if not math.isfinite(smooth):
            break
        progress.write(json.dumps({"tokens": (step + 1) * a.batch_seqs * a.seq_len, "loss": smooth}) + "\n")
        progress.flush()
    status = "ok" if smooth is not None and math.isfinite(smooth) else "diverged"
    result = {"loss": smooth if status == "ok" else None, "status": status, "steps": step + 1,
              "tokens": (step + 1) * a.batch_seqs * a.seq_len, "wall_s": time.time() - started}
    if status != "ok":
        result["reason"] = "the loss is not finite"
    with open(os.path.join(a.out, "result.json.tmp"), "w") as f:
        json.dump(result, f)
    os.replace(os.path.join(a.out, "result.json.tmp"), os.path.join(a.out, "result.json"))


if __name__ == "__main__":
    main()
