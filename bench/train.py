"""Training throughput: tokens/s of one optimizer step of a dense and an MoE model with the
same activated parameters, on steplaw's kernels vs the PyTorch references.

Contenders per model (each its own model and optimizer from the same initialisation,
timed interleaved by bench/harness.py; one call = forward + backward + optimizer step of
one batch):
  steplaw        FusedAdamW, and for MoE the compiled dispatch kernels (when built)
  torch_adamw    torch.optim.AdamW with its defaults (foreach on GPU, per-tensor on CPU)
  torch_fused    torch.optim.AdamW(fused=True)
  moe_reference  MoE only: FusedAdamW with the pure-PyTorch dispatch reference
  steplaw_compiled  GPU, dense, without --compile: steplaw with torch.compile (MFU target)
On a GPU each case also gives model FLOPs utilisation (MFU) of the steplaw contender:
FLOPs per token (steplaw.models.accounting, causal attention) x tokens/s / peak bf16
dense FLOP/s; `mfu_palm` counts attention without the causal halving, as PaLM/nanoGPT do.

    python bench/train.py [--quick] [--device cuda] [--compile]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from harness import log, report, speedups, time_interleaved

# Peak dense bf16 tensor-core FLOP/s (vendor data sheets, SXM parts).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def peak_flops(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


@contextlib.contextmanager
def moe_reference_dispatch():
    """Route the MoE ops to their pure-PyTorch references for the duration."""
    from steplaw.ops import reference_kernels
    from steplaw.ops.moe import OP_NAMES

    with reference_kernels(list(OP_NAMES)):
        yield


def moe_kernels_built(device: str) -> bool:
    from steplaw.ops import has_kernel
    from steplaw.ops.moe import OP_NAMES

    kind = "cuda" if device.startswith("cuda") else "cpu"
    return any(has_kernel(name, kind) for name in OP_NAMES)


def make_step(model_config, optimizer_name: str, device: str, batch: tuple, autocast: bool, compile_model: bool, dispatch=None):
    from steplaw.models import Transformer
    from steplaw.optim import FusedAdamW

    torch.manual_seed(0)
    model = Transformer(model_config).to(device)
    params = list(model.parameters())
    if optimizer_name == "steplaw":
        optimizer = FusedAdamW(params, lr=1e-4, weight_decay=0.1)
    elif optimizer_name == "torch_fused":
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=True)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)
    forward = torch.compile(model) if compile_model else model
    x, y = batch
    dispatch = dispatch or contextlib.nullcontext

    def step():
        with dispatch():
            with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
                loss = forward(x, y) + model.aux_loss()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, a few rounds (seconds)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile the models")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()

    from steplaw.models import MoEConfig, flops_per_token, model_for_params, param_counts

    device = args.device
    on_gpu = device.startswith("cuda")
    if args.quick:
        n_active, seq_len, batch_seqs, repeats = 3e5, 64, 8, 3
    elif on_gpu:
        n_active, seq_len, batch_seqs, repeats = 85e6, 1024, 16, 10
    else:
        n_active, seq_len, batch_seqs, repeats = 3e6, 128, 32, 10
    repeats = args.repeats or repeats
    vocab = 50304 if (on_gpu and not args.quick) else 256
    autocast = on_gpu

    # GPU: GPT-2 small's shape (the recipe gives d=768, 12 layers for 85M), tied, 124M in all.
    tied = vocab > 256
    dense = model_for_params(n_active, vocab_size=vocab, max_seq_len=seq_len, tie_embeddings=tied)
    moe = model_for_params(
        n_active, vocab_size=vocab, moe=MoEConfig(n_experts=8, top_k=2), target="active", max_seq_len=seq_len, tie_embeddings=tied
    )
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (batch_seqs, seq_len + 1), generator=g).to(device)
    batch = (tokens[:, :-1], tokens[:, 1:])
    batch_tokens = batch_seqs * seq_len
    peak = peak_flops(device)

    cases = []
    for label, config in (("dense", dense), ("moe", moe)):
        counts = param_counts(config)
        name = (
            f"{label} N_active={counts.active / 1e6:.2f}M N={counts.non_embedding / 1e6:.2f}M "
            f"d={config.d_model} L={config.n_layers} batch={batch_seqs}x{seq_len}"
            + (" bf16" if autocast else " fp32") + (" compiled" if args.compile else "")
        )
        log(f"bench train: {name}")
        contenders = {
            "steplaw": make_step(config, "steplaw", device, batch, autocast, args.compile),
            "torch_adamw": make_step(config, "torch", device, batch, autocast, args.compile),
            "torch_fused": make_step(config, "torch_fused", device, batch, autocast, args.compile),
        }
        if on_gpu and not args.compile and config.moe is None:
            # The MFU target (>= 40% for a ~125M model in bf16) is for the compiled model.
            contenders["steplaw_compiled"] = make_step(config, "steplaw", device, batch, autocast, True)
        if config.moe is not None:
            contenders["moe_reference"] = make_step(config, "steplaw", device, batch, autocast, args.compile, moe_reference_dispatch)
        median_s = time_interleaved(contenders, device=device, warmup=2, repeats=repeats)
        case = {
            "case": name,
            "median_s": median_s,
            "speedup": speedups(median_s, "steplaw"),
            "tokens_per_s": {k: batch_tokens / v for k, v in median_s.items()},
            "params_active": counts.active,
            "params_non_embedding": counts.non_embedding,
            "params_total": counts.total,
            "flops_per_token": flops_per_token(config, seq_len),
        }
        if config.moe is not None:
            case["moe_kernels_built"] = moe_kernels_built(device)
        if peak:
            achieved = batch_tokens / median_s["steplaw"]
            case["mfu"] = flops_per_token(config, seq_len) * achieved / peak
            case["mfu_palm"] = flops_per_token(config, seq_len, causal=False) * achieved / peak
            if "steplaw_compiled" in median_s:
                compiled = batch_tokens / median_s["steplaw_compiled"]
                case["mfu_compiled"] = flops_per_token(config, seq_len) * compiled / peak
                case["mfu_palm_compiled"] = flops_per_token(config, seq_len, causal=False) * compiled / peak
        cases.append(case)
        del contenders
        if on_gpu:
            torch.cuda.empty_cache()
    report("train", device, cases, quick=args.quick, compile=args.compile)


if __name__ == "__main__":
    main()
