"""`steplaw train`: one training run from the command line.

    steplaw train --params 2M --tokens 20M --lr 3e-3 --batch-tokens 32768 [--json]

The model comes from the shape recipe (steplaw.models.recipe) for --params non-embedding
parameters (for MoE: all experts counted, or the activated count with --params-active).
Under torchrun the same command trains with DDP. The config is validated, and --out
checked, before anything trains. A progress line goes to stderr; with --json the
RunResult goes to stdout, and with --out DIR to DIR/result.json.
"""
from __future__ import annotations

import argparse
import os
import sys

from steplaw.cli import args as cliargs
from steplaw.errors import UserError

DEFAULT_TOP_K = 2


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train one dense or MoE model and report its losses",
        description="Train one model of the shape recipe on the embedded corpus (or --data DIR) and report "
        "final smoothed training loss, validation loss, throughput and compute.",
    )
    p.add_argument("--params", required=True, type=cliargs.count, help="non-embedding parameters N, e.g. 2M")
    p.add_argument("--tokens", required=True, type=cliargs.count, help="training tokens D, e.g. 20M")
    p.add_argument("--lr", required=True, type=cliargs.positive_float, help="peak learning rate, e.g. 3e-3")
    p.add_argument("--batch-tokens", required=True, type=cliargs.count, help="tokens per optimizer step B, e.g. 32768")
    p.add_argument("--seq-len", default=128, type=cliargs.count, help="sequence length in tokens (default 128)")
    p.add_argument("--micro-batch-tokens", default=None, type=cliargs.count,
                   help="largest micro-batch in tokens; gradient accumulation does the rest")
    p.add_argument("--moe-experts", type=cliargs.positive_int, default=None, help="routed experts per MoE layer (MoE model when given)")
    p.add_argument("--moe-topk", type=cliargs.positive_int, default=None,
                   help=f"experts per token (with --moe-experts; default {DEFAULT_TOP_K})")
    p.add_argument("--moe-shared", type=cliargs.nonnegative_int, default=None,
                   help="shared experts per MoE layer (with --moe-experts; default 0)")
    p.add_argument("--params-active", action="store_true", help="MoE: --params is the activated count, not the total")
    p.add_argument("--schedule", default="cosine", choices=["cosine", "wsd", "constant"])
    p.add_argument("--warmup-tokens", default=None, type=cliargs.count, help="warmup length in tokens (default 5%% of the steps)")
    p.add_argument("--min-lr-ratio", type=cliargs.finite_float, default=0.1, help="final LR as a fraction of the peak (default 0.1)")
    p.add_argument("--weight-decay", type=cliargs.nonnegative_float, default=0.1, help="AdamW weight decay (default 0.1)")
    p.add_argument("--seed", type=cliargs.nonnegative_int, default=0, help="seed of the initialisation and data order (default 0)")
    p.add_argument("--data", default=None, metavar="DIR", help="token directory from `steplaw data prepare` (default: embedded corpus)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--optimizer", default="steplaw", choices=["steplaw", "torch"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--out", default=None, metavar="DIR", help="run directory: result.json and checkpoints (resumes from one)")
    p.add_argument("--checkpoint-every", type=cliargs.positive_int, default=None, metavar="STEPS",
                   help="checkpoint every STEPS steps (needs --out)")
    p.add_argument("--json", action="store_true", help="print the RunResult as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=cmd_train)


def moe_from_args(args: argparse.Namespace):
    """The MoE settings of the flags, or None for a dense model. MoE flags without
    --moe-experts are refused, not ignored."""
    from steplaw.models.config import MoEConfig

    if args.moe_experts is None:
        given = [flag for flag, value in (("--moe-topk", args.moe_topk), ("--moe-shared", args.moe_shared),
                                          ("--params-active", args.params_active or None)) if value is not None]
        if given:
            raise UserError(f"{', '.join(given)} applies to MoE models only: add --moe-experts E (or drop it)")
        return None
    top_k = DEFAULT_TOP_K if args.moe_topk is None else args.moe_topk
    if args.moe_topk is None:
        top_k = min(top_k, args.moe_experts)
    if top_k > args.moe_experts:
        raise UserError(f"--moe-topk {top_k} exceeds --moe-experts {args.moe_experts}: expected 1 <= top-k <= experts")
    return MoEConfig(n_experts=args.moe_experts, top_k=top_k, n_shared_experts=args.moe_shared or 0)


def config_from_args(args: argparse.Namespace):
    """The RunConfig of the flags (not yet validated)."""
    from steplaw.models.recipe import model_for_params
    from steplaw.train.config import RunConfig

    moe = moe_from_args(args)
    vocab_size = 256
    if args.data is not None:
        from steplaw.data.tokens import load_token_data

        vocab_size = load_token_data(args.data).vocab_size  # also checks the files
    model = model_for_params(
        args.params, vocab_size=vocab_size, moe=moe,
        target="active" if args.params_active else "total", max_seq_len=max(args.seq_len, 128),
    )
    return RunConfig(
        model=model,
        tokens=args.tokens,
        lr=args.lr,
        batch_tokens=args.batch_tokens,
        seq_len=args.seq_len,
        micro_batch_tokens=args.micro_batch_tokens,
        schedule=args.schedule,
        warmup_tokens=args.warmup_tokens,
        min_lr_ratio=args.min_lr_ratio,
        weight_decay=args.weight_decay,
        seed=args.seed,
        device=args.device,
        precision=args.precision,
        data=args.data,
        optimizer=args.optimizer,
        compile=args.compile,
    )


def cmd_train(args: argparse.Namespace) -> int:
    from steplaw.models.accounting import param_counts

    if args.out is not None:
        cliargs.check_output_dir(args.out, "--out")
    if args.checkpoint_every is not None and args.out is None:
        raise UserError("--checkpoint-every needs a run directory: add --out DIR")
    config = config_from_args(args)
    config.validate()

    from steplaw.train import run
    from steplaw.train.checkpoint import result_json

    rank = int(os.environ.get("RANK", "0"))
    shape = config.model
    if rank == 0 and not args.quiet:
        counts = param_counts(shape)
        moe = f" experts={shape.moe.n_experts} top_k={shape.moe.top_k} d_expert={shape.moe.d_expert}" if shape.moe else ""
        print(
            f"steplaw train: d_model={shape.d_model} n_layers={shape.n_layers} n_heads={shape.n_heads} d_ff={shape.d_ff}{moe}; "
            f"N={counts.non_embedding:,} (active {counts.active:,}), run {config.run_id()}",
            file=sys.stderr,
        )
    result = run(config, run_dir=args.out, progress=not args.quiet, checkpoint_every=args.checkpoint_every)
    if rank == 0:
        if args.json:
            print(result_json(result))
        elif not args.quiet:
            val = f"{result.final_val_loss:.4f}" if result.final_val_loss is not None else "-"
            train = f"{result.final_train_loss:.4f}" if result.final_train_loss is not None else "-"
            print(f"status {result.status}  train loss {train}  val loss {val}  {result.tokens_per_s or 0:,.0f} tok/s", file=sys.stderr)
            if result.reason:
                print(f"reason: {result.reason}", file=sys.stderr)
    return 1 if result.status == "failed" else 0
