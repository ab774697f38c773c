"""Entry point for multi-process runs of a RunConfig given as JSON.

    torchrun --standalone --nproc_per_node 2 -m steplaw.train.ddp CONFIG.json [RESULT.json] [--run-dir DIR]

Every process trains its share of each batch (DDP: gloo on CPU, NCCL on GPU); rank 0
writes the RunResult. `steplaw train` under torchrun does the same from CLI options.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m steplaw.train.ddp")
    parser.add_argument("config", help="RunConfig as JSON (RunConfig.to_dict())")
    parser.add_argument("result", nargs="?", default=None, help="where rank 0 writes the RunResult JSON (default: stdout)")
    parser.add_argument("--run-dir", default=None)
    args = parser.parse_args(argv)

    from steplaw.errors import UserError
    from steplaw.train import RunConfig, run

    try:
        config = RunConfig.from_dict(json.loads(Path(args.config).read_text()))
        result = run(config, run_dir=args.run_dir)
    except UserError as exc:
        print(f"steplaw.train.ddp: error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        text = json.dumps(result.to_dict())
        if args.result:
            Path(args.result).write_text(text + "\n")
        else:
            print(text)
    return 0 if result.status != "failed" else 1


if __name__ == "__main__":
    sys.exit(main())
