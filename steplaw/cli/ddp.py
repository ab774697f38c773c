"""Entry point for multi-process runs of a RunConfig given as JSON.

    torchrun --standalone --nproc_per_node 2 -m steplaw.cli.ddp CONFIG.json [RESULT.json] [--run-dir DIR]

Every process trains its share of each batch (DDP: gloo on CPU, NCCL on GPU); rank 0
writes the RunResult. `steplaw train` under torchrun does the same from CLI options.
Mistakes (a missing or malformed config, an invalid setting, an unwritable result
path) are one line on stderr and exit code 2, as in every `steplaw` command.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from steplaw.cli import args as cliargs
from steplaw.errors import UserError
from steplaw.fileio import write_atomic

PROG = "python -m steplaw.cli.ddp"


def main(argv: list[str] | None = None) -> int:
    parser = cliargs.Parser(prog=PROG)
    parser.add_argument("config", help="RunConfig as JSON (RunConfig.to_dict())")
    parser.add_argument("result", nargs="?", default=None, help="where rank 0 writes the RunResult JSON (default: stdout)")
    parser.add_argument("--run-dir", default=None)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    return cliargs.run_command(cmd_ddp, args, PROG)


def cmd_ddp(args) -> int:
    from steplaw.train.config import RunConfig

    if args.result is not None:
        cliargs.check_output_file(args.result, "RESULT")
    if args.run_dir is not None:
        cliargs.check_output_dir(args.run_dir, "--run-dir")
    try:
        data = json.loads(Path(args.config).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"config {args.config!r} is not JSON text ({exc})") from None
    config = RunConfig.from_dict(data)
    config.validate()

    from steplaw.train import run
    from steplaw.train.checkpoint import result_json

    result = run(config, run_dir=args.run_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        text = result_json(result)
        if args.result:
            write_atomic(args.result, text + "\n")  # a reader never sees half a result
        else:
            print(text)
    return 0 if result.status != "failed" else 1


if __name__ == "__main__":
    sys.exit(main())
