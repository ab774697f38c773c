"""`steplaw train`: one training run from the command line.

    steplaw train --params 2M --tokens 20M --lr 3e-3 --batch-tokens 32768 [--json]

The model comes from the shape recipe (steplaw.models.recipe) for --params non-embedding
parameters (for MoE: all experts counted, or the activated count with --params-active).
Under torchrun the same command trains with DDP. A progress line goes to stderr; with
--json the RunResult goes to stdout, and with --out DIR to DIR/result.json.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

from steplaw import units
from steplaw.errors import UserError

def parse_count(text: str, what: str = "count") -> int:
    """'2M' -> 2_000_000, '1e9' -> 10**9, '32768' -> 32768, '1.5k' -> 1500."""
    return units.parse_count(text, what, integer=True)


def parse_float(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{what}={text!r}: expected a number (e.g. 3e-3)") from None
    if not math.isfinite(value):
        raise UserError(f"{what}={text!r}: expected a finite number")
    return value


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train one dense or MoE model and report its losses",
        description="Train one model of the shape recipe on the embedded corpus (or --data DIR) and report "
        "final smoothed training loss, validation loss, throughput and compute.",
    )
    p.add_argument("--params", required=True, help="non-embedding parameters N, e.g. 2M")
    p.add_argument("--tokens", required=True, help="training tokens D, e.g. 20M")
    p.add_argument("--lr", required=True, help="peak learning rate, e.g. 3e-3")
    p.add_argument("--batch-tokens", required=True, help="tokens per optimizer step B, e.g. 32768")
    p.add_argument("--seq-len", default="128", help="sequence length in tokens (default 128)")
    p.add_argument("--micro-batch-tokens", default=None, help="largest micro-batch in tokens; gradient accumulation does the rest")
    p.add_argument("--moe-experts", type=int, default=None, help="routed experts per MoE layer (MoE model when given)")
    p.add_argument("--moe-topk", type=int, default=2, help="experts per token (default 2)")
    p.add_argument("--moe-shared", type=int, default=0, help="shared experts per MoE layer (default 0)")
    p.add_argument("--params-active", action="store_true", help="MoE: --params is the activated count, not the total")
    p.add_argument("--schedule", default="cosine", choices=["cosine", "wsd", "constant"])
    p.add_argument("--warmup-tokens", default=None, help="warmup length in tokens (default 5%% of the steps)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None, metavar="DIR", help="token directory from `steplaw data prepare` (default: embedded corpus)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--optimizer", default="steplaw", choices=["steplaw", "torch"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--out", default=None, metavar="DIR", help="run directory: result.json and checkpoints (resumes from one)")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="STEPS", help="checkpoint every STEPS steps (needs --out)")
    p.add_argument("--json", action="store_true", help="print the RunResult as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=run_train)


def config_from_args(args: argparse.Namespace):
    from steplaw.models.config import MoEConfig
    from steplaw.models.recipe import model_for_params
    from steplaw.train.config import RunConfig

    seq_len = parse_count(args.seq_len, "--seq-len")
    moe = None
    if args.moe_experts is not None:
        if args.moe_experts < 1 or not 1 <= args.moe_topk <= args.moe_experts:
            raise UserError(f"--moe-experts {args.moe_experts} --moe-topk {args.moe_topk}: expected 1 <= top-k <= experts")
        if args.moe_shared < 0:
            raise UserError(f"--moe-shared {args.moe_shared}: expected a count of at least 0")
        moe = MoEConfig(n_experts=args.moe_experts, top_k=args.moe_topk, n_shared_experts=args.moe_shared)
    elif args.params_active:
        raise UserError("--params-active applies to MoE models only: add --moe-experts")
    model = model_for_params(
        parse_count(args.params, "--params"),
        moe=moe,
        target="active" if args.params_active else "total",
        max_seq_len=max(seq_len, 128),
    )
    if args.data is not None:
        from steplaw.data.tokens import load_token_data

        vocab = load_token_data(args.data).vocab_size
        if vocab != model.vocab_size:
            model = model_for_params(
                parse_count(args.params, "--params"), vocab_size=vocab, moe=moe,
                target="active" if args.params_active else "total", max_seq_len=max(seq_len, 128),
            )
    return RunConfig(
        model=model,
        tokens=parse_count(args.tokens, "--tokens"),
        lr=parse_float(args.lr, "--lr"),
        batch_tokens=parse_count(args.batch_tokens, "--batch-tokens"),
        seq_len=seq_len,
        micro_batch_tokens=parse_count(args.micro_batch_tokens, "--micro-batch-tokens") if args.micro_batch_tokens else None,
        schedule=args.schedule,
        warmup_tokens=parse_count(args.warmup_tokens, "--warmup-tokens") if args.warmup_tokens else None,
        min_lr_ratio=args.min_lr_ratio,
        weight_decay=args.weight_decay,
        seed=args.seed,
        device=args.device,
        precision=args.precision,
        data=args.data,
        optimizer=args.optimizer,
        compile=args.compile,
    )


def run_train(args: argparse.Namespace) -> int:
    import os

    from steplaw.train.runner import _stderr_progress

    config = config_from_args(args)
    from steplaw.train import run

    from steplaw.models.accounting import param_counts

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
    result = run(
        config,
        run_dir=args.out,
        progress=None if args.quiet else _stderr_progress,
        checkpoint_every=args.checkpoint_every,
    )
    if rank == 0:
        if args.json:
            print(json.dumps(result.to_dict()))
        elif not args.quiet:
            val = f"{result.final_val_loss:.4f}" if result.final_val_loss is not None else "-"
            train = f"{result.final_train_loss:.4f}" if result.final_train_loss is not None else "-"
            print(f"status {result.status}  train loss {train}  val loss {val}  {result.tokens_per_s or 0:,.0f} tok/s", file=sys.stderr)
            if result.reason:
                print(f"reason: {result.reason}", file=sys.stderr)
    return 1 if result.status == "failed" else 0
