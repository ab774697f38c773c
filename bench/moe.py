"""Benchmark of the MoE token dispatch: steplaw's permute/unpermute kernels and the whole
MoE layer, against a pure-PyTorch baseline written the way most codebases do it
(argsort by expert + index_select to dispatch, index_add_ to combine), and against the
ops' own pure-PyTorch references (contender "reference": the reference functions called
directly, differentiated by autograd; the same functions serve as the ops' kernels on
devices without a compiled one, which steplaw.ops.reference_kernels switches on to
check that both paths give the same output).

    python bench/moe.py [--device cpu|cuda] [--quick]

One JSON object on stdout (bench/harness.py); progress on stderr. On CUDA each case also
reports the achieved GB/s of our permute + unpermute forward (bytes read + written) and
of a device copy of the same bytes.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from harness import log, report, speedups, time_interleaved

from steplaw.models.config import MoEConfig
from steplaw.models.moe import MoE
from steplaw.ops import has_kernel, reference_kernels
from steplaw.ops import moe as moe_ops

# (tokens, hidden, experts, top_k, dtype)
CASES = {
    "cpu": [(4096, 256, 8, 2, torch.float32)],
    "cuda": [(16384, 4096, 64, 8, torch.bfloat16), (8192, 2048, 128, 8, torch.bfloat16)],
}
QUICK = {
    "cpu": [(512, 64, 8, 2, torch.float32)],
    "cuda": [(2048, 1024, 64, 8, torch.bfloat16)],
}


# ---- baseline: argsort + index_select / index_add_ ----------------------------------------

def baseline_permute(x, expert_ids, num_experts):
    flat = expert_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    token_of_row = order // expert_ids.shape[1]
    counts = torch.bincount(flat, minlength=num_experts)
    return x.index_select(0, token_of_row), order, token_of_row, counts


def baseline_unpermute(y, order, token_of_row, weights, num_tokens):
    weighted = y * weights.reshape(-1)[order].unsqueeze(1).to(y.dtype)
    return torch.zeros(num_tokens, y.shape[1], dtype=y.dtype, device=y.device).index_add_(0, token_of_row, weighted)


def baseline_layer(layer: MoE, x):
    """The same MoE layer (same parameters, same expert compute) with baseline dispatch."""
    cfg = layer.cfg
    tokens = x.reshape(-1, x.shape[-1])
    logits = layer.router(tokens)
    probs = torch.softmax(logits.float(), dim=-1)
    weights, expert_ids = torch.topk(probs, cfg.top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    permuted, order, token_of_row, counts = baseline_permute(tokens, expert_ids, cfg.n_experts)
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    out = baseline_unpermute(layer.experts(permuted, offsets), order, token_of_row, weights, tokens.shape[0])
    return out.reshape(x.shape)


# ---- cases ---------------------------------------------------------------------------------

def bench_case(T, H, E, k, dtype, device, repeats, min_time_s):
    name = f"T={T} H={H} E={E} k={k} {str(dtype).replace('torch.', '')}"
    log(f"moe bench: {name} on {device}")
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(T, H, generator=gen).to(device=device, dtype=dtype)
    logits = torch.randn(T, E, generator=gen).to(device)
    expert_ids, weights, _ = moe_ops.moe_route(logits, k)
    grad = torch.randn(T, H, generator=gen).to(device=device, dtype=dtype)
    x_req = x.clone().requires_grad_(True)
    w_req = weights.clone().requires_grad_(True)
    w_base = torch.topk(torch.softmax(logits, -1), k).values
    w_base_req = (w_base / w_base.sum(-1, keepdim=True)).requires_grad_(True)
    timing = dict(device=device, repeats=repeats, min_time_s=min_time_s)
    cases = []

    def ours_fwd():
        permuted, row_map, src, _, _ = moe_ops.moe_permute(x, expert_ids, E)
        return moe_ops.moe_unpermute(permuted, row_map, src, weights)

    def base_fwd():
        permuted, order, token_of_row, _ = baseline_permute(x, expert_ids, E)
        return baseline_unpermute(permuted, order, token_of_row, weights, T)

    def ref_fwd(x=x, w=weights):
        permuted, row_map, src, _, _ = moe_ops.permute_reference(x, expert_ids, E)
        return moe_ops.unpermute_reference(permuted, row_map, src, w)

    torch.testing.assert_close(ours_fwd().float(), base_fwd().float(), rtol=2e-2, atol=2e-2)
    with reference_kernels():
        assert torch.equal(ours_fwd(), ref_fwd())
    assert torch.equal(ours_fwd(), ref_fwd())
    med = time_interleaved({"steplaw": ours_fwd, "torch_argsort": base_fwd, "reference": ref_fwd}, **timing)
    entry = {"case": f"permute+unpermute fwd {name}", "median_s": med, "speedup": speedups(med, "steplaw")}
    if device.startswith("cuda"):
        es = x.element_size()
        moved = (T * H + T * k * H) * es * 2  # permute: read T*H, write T*k*H; unpermute: the reverse
        copy_src = torch.empty(T * k * H, dtype=dtype, device=device)
        copy_dst = torch.empty_like(copy_src)
        copy_s = time_interleaved({"copy": lambda: copy_dst.copy_(copy_src)}, **timing)["copy"]
        entry["gbps"] = moved / med["steplaw"] / 1e9
        entry["copy_gbps"] = 2 * copy_src.numel() * es / copy_s / 1e9
    cases.append(entry)

    def ours_fwd_bwd():
        permuted, row_map, src, _, _ = moe_ops.moe_permute(x_req, expert_ids, E)
        out = moe_ops.moe_unpermute(permuted, row_map, src, w_req)
        torch.autograd.backward(out, grad)
        x_req.grad = w_req.grad = None

    def base_fwd_bwd():
        permuted, order, token_of_row, _ = baseline_permute(x_req, expert_ids, E)
        out = baseline_unpermute(permuted, order, token_of_row, w_base_req, T)
        torch.autograd.backward(out, grad)
        x_req.grad = w_base_req.grad = None

    def ref_fwd_bwd():
        torch.autograd.backward(ref_fwd(x_req, w_req), grad)
        x_req.grad = w_req.grad = None

    med = time_interleaved({"steplaw": ours_fwd_bwd, "torch_argsort": base_fwd_bwd, "reference": ref_fwd_bwd},
                           **timing)
    cases.append({"case": f"permute+unpermute fwd+bwd {name}", "median_s": med, "speedup": speedups(med, "steplaw")})

    cfg = MoEConfig(n_experts=E, top_k=k, d_expert=max(8, H // 4), aux_loss_coef=0.0, z_loss_coef=0.0)
    layer = MoE(H, cfg).to(device=device, dtype=dtype)
    xl = x.clone().requires_grad_(True)

    def layer_ours():
        torch.autograd.backward(layer(xl), grad)
        layer.zero_grad(set_to_none=True)
        xl.grad = None

    def layer_base():
        torch.autograd.backward(baseline_layer(layer, xl), grad)
        layer.zero_grad(set_to_none=True)
        xl.grad = None

    med = time_interleaved({"steplaw": layer_ours, "torch_argsort": layer_base}, **timing)
    cases.append({"case": f"MoE layer fwd+bwd {name} d_expert={cfg.d_expert}", "median_s": med,
                  "speedup": speedups(med, "steplaw")})
    return cases


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats (a smoke run)")
    args = parser.parse_args(argv)
    device_type = "cuda" if args.device.startswith("cuda") else "cpu"
    compiled = has_kernel("moe_permute", device_type)
    if not compiled:
        log(f"warning: no compiled {device_type} kernel; 'steplaw' times the pure-PyTorch reference")
    cases = []
    table = QUICK if args.quick else CASES
    for T, H, E, k, dtype in table[device_type]:
        cases += bench_case(T, H, E, k, dtype, args.device, repeats=5 if args.quick else 20,
                            min_time_s=0.0 if args.quick else 2.0)
    report("moe", args.device, cases, quick=args.quick,
           compiled_kernel=compiled)
    return 0


if __name__ == "__main__":
    sys.exit(main())
