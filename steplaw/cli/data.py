"""`steplaw data prepare TEXT_FILES... -o DIR`: token files from the user's text."""
from __future__ import annotations

import argparse
import json

from steplaw.cli import args as cliargs
from steplaw.data.tokenizers import DEFAULT_BPE_VOCAB
from steplaw.errors import UserError


def add_commands(subparsers) -> None:
    data = subparsers.add_parser("data", help="prepare token files for training")
    data_sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    prepare = data_sub.add_parser(
        "prepare",
        help="tokenize text files into train/val token files",
        description="Tokenize UTF-8 text files into DIR/train.bin and DIR/val.bin (headerless "
        "uint16/uint32 token ids) with JSON sidecars, for `steplaw train --data DIR`.",
    )
    prepare.add_argument("text_files", nargs="+", metavar="TEXT_FILE")
    prepare.add_argument("-o", "--out", required=True, metavar="DIR", help="output directory")
    prepare.add_argument("--tokenizer", choices=["byte", "bpe"], default="byte", help="byte-level (default) or a BPE trained on the text")
    prepare.add_argument("--vocab-size", type=cliargs.positive_int, default=None,
                         help=f"BPE vocabulary size, at most 2^20 (default {DEFAULT_BPE_VOCAB}; --tokenizer bpe only)")
    prepare.add_argument("--val-fraction", type=cliargs.positive_float, default=0.05,
                         help="fraction of the text held out for validation (default 0.05)")
    prepare.set_defaults(func=cmd_prepare)


def cmd_prepare(args: argparse.Namespace) -> int:
    from steplaw.data.tokens import prepare

    if args.tokenizer == "byte" and args.vocab_size is not None:
        raise UserError(f"--vocab-size {args.vocab_size} applies to --tokenizer bpe only: "
                        "the byte tokenizer's vocabulary is the 256 byte values (add --tokenizer bpe, or drop --vocab-size)")
    cliargs.check_output_dir(args.out, "--out")
    summary = prepare(args.text_files, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size, val_fraction=args.val_fraction)
    print(json.dumps(summary))
    return 0
