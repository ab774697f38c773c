"""The MoE layer equals a naive per-token loop over experts, forward and backward."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from steplaw.models.config import MoEConfig
from steplaw.models.moe import MoE


def naive_moe(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """Per token: score all experts, pick top-k (ties to the lower index), sum the
    weighted SwiGLU outputs; capacity applied in token order. No steplaw ops."""
    cfg = layer.cfg
    tokens = x.reshape(-1, x.shape[-1])
    exp = layer.experts
    taken = [0] * cfg.n_experts
    capacity = None
    if cfg.capacity_factor is not None:
        capacity = max(1, math.ceil(cfg.capacity_factor * tokens.shape[0] * cfg.top_k / cfg.n_experts))
    outputs = []
    for t in range(tokens.shape[0]):
        logits = (tokens[t] @ layer.router.weight.t()).float()
        scores = torch.softmax(logits, -1) if cfg.score_func == "softmax" else torch.sigmoid(logits)
        select = scores.detach() + (layer.expert_bias if cfg.bias_update_rate > 0 else 0)
        chosen = sorted(range(cfg.n_experts), key=lambda e: (-float(select[e]), e))[: cfg.top_k]
        weights = scores[chosen]
        if cfg.renormalize:
            weights = weights / weights.sum()
        out = torch.zeros_like(tokens[t], dtype=torch.float32)
        for j, e in enumerate(chosen):
            if capacity is not None:
                if taken[e] >= capacity:
                    continue
                taken[e] += 1
            h = F.silu(tokens[t] @ exp.w_gate[e]) * (tokens[t] @ exp.w_up[e])
            out = out + weights[j] * (h @ exp.w_down[e]).float()
        out = out.to(tokens.dtype)
        if layer.shared is not None:
            s = layer.shared
            out = out + (F.silu(tokens[t] @ s.w_gate) * (tokens[t] @ s.w_up)) @ s.w_down
        outputs.append(out)
    return torch.stack(outputs).reshape(x.shape)


CASES = [
    dict(n_experts=4, top_k=2, d_expert=8),
    dict(n_experts=8, top_k=1, d_expert=4, renormalize=False),
    dict(n_experts=6, top_k=3, d_expert=8, n_shared_experts=2),
    dict(n_experts=5, top_k=2, d_expert=8, score_func="sigmoid", bias_update_rate=0.01),
    dict(n_experts=4, top_k=2, d_expert=8, capacity_factor=0.5),
    dict(n_experts=16, top_k=16, d_expert=4),
]


@pytest.mark.parametrize("cfg_kwargs", CASES, ids=[str(i) for i in range(len(CASES))])
def test_layer_matches_naive_loop_forward_and_backward(cfg_kwargs):
    torch.manual_seed(0)
    cfg = MoEConfig(**cfg_kwargs)
    layer = MoE(12, cfg).double()
    with torch.no_grad():
        layer.expert_bias.normal_(std=0.05)
        layer.router.weight.mul_(20)  # spread the scores so routing is not near ties
    x = torch.randn(3, 7, 12, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = naive_moe(layer, x_ref)
    torch.testing.assert_close(y, y_ref)

    grad = torch.randn_like(y)
    params = [p for p in layer.parameters()]
    got = torch.autograd.grad(y, [x] + params, grad, allow_unused=True)
    want = torch.autograd.grad(y_ref, [x_ref] + params, grad, allow_unused=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g if g is not None else torch.zeros(()), w if w is not None else torch.zeros(()))


def test_parameter_names_and_shapes():
    cfg = MoEConfig(n_experts=8, top_k=2, d_expert=16, n_shared_experts=1)
    shapes = {name: tuple(p.shape) for name, p in MoE(32, cfg).named_parameters()}
    assert shapes == {
        "router.weight": (8, 32),
        "experts.w_gate": (8, 32, 16), "experts.w_up": (8, 32, 16), "experts.w_down": (8, 16, 32),
        "shared.w_gate": (32, 16), "shared.w_up": (32, 16), "shared.w_down": (16, 32),
    }


def test_aux_loss_and_stats():
    torch.manual_seed(1)
    cfg = MoEConfig(n_experts=4, top_k=2, d_expert=8, aux_loss_coef=0.5, z_loss_coef=0.25)
    layer = MoE(16, cfg)
    x = torch.randn(2, 5, 16)
    layer(x)
    logits = x.reshape(-1, 16) @ layer.router.weight.t()
    probs = torch.softmax(logits, -1)
    ids = torch.topk(probs, 2).indices
    fraction = torch.bincount(ids.flatten(), minlength=4).float() / 20
    switch = 4 * (fraction * probs.mean(0)).sum()
    z = torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(layer.aux_loss, 0.5 * switch + 0.25 * z)
    assert layer.aux_loss.requires_grad
    assert layer.stats["load"].tolist() == torch.bincount(ids.flatten(), minlength=4).tolist()
    assert float(layer.stats["max_mean_load"]) == pytest.approx(float(fraction.max() / fraction.mean()))
    assert float(layer.stats["dropped_fraction"]) == 0.0

    quiet = MoE(16, dataclasses.replace(cfg, aux_loss_coef=0.0, z_loss_coef=0.0))
    quiet(x)
    assert quiet.aux_loss.shape == () and float(quiet.aux_loss) == 0.0


def test_dropped_fraction_with_capacity():
    cfg = MoEConfig(n_experts=2, top_k=1, d_expert=4, capacity_factor=0.5)
    layer = MoE(4, cfg)
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]))
    x = torch.zeros(8, 4)
    x[:, 0] = 1.0  # every token prefers expert 0, which takes ceil(0.5 * 8 / 2) = 2
    layer(x)
    assert layer.stats["load"].tolist() == [8, 0]
    assert float(layer.stats["dropped_fraction"]) == pytest.approx(6 / 8)


def test_bias_update_moves_toward_balance():
    cfg = MoEConfig(n_experts=3, top_k=1, d_expert=4, bias_update_rate=0.1)
    layer = MoE(4, cfg)
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0.5, 0, 0, 0], [0.0, 0, 0, 0]]))
    x = torch.zeros(6, 4)
    x[:, 0] = 1.0  # all to expert 0
    layer.train()
    layer(x)
    layer(x)  # two micro-batches before one step
    layer.update_bias()
    torch.testing.assert_close(layer.expert_bias, torch.tensor([-0.1, 0.1, 0.1]))
    layer.update_bias()  # no load since the last update: no change
    torch.testing.assert_close(layer.expert_bias, torch.tensor([-0.1, 0.1, 0.1]))
    # cast to bf16, the bias stays fp32: a 1e-4 step on a bias of 1 survives (bf16 would round it away)
    half = MoE(4, dataclasses.replace(cfg, bias_update_rate=1e-4)).to(torch.bfloat16)
    assert half.expert_bias.dtype == torch.float32 and half.router.weight.dtype == torch.bfloat16
    with torch.no_grad():
        half.router.weight.copy_(layer.router.weight)
        half.expert_bias.fill_(1.0)
    half.train()(x.to(torch.bfloat16))
    half.update_bias()
    assert half.expert_bias.tolist() == pytest.approx([1 - 1e-4, 1 + 1e-4, 1 + 1e-4], abs=1e-6)
    frozen = MoE(4, dataclasses.replace(cfg, bias_update_rate=0.0))
    frozen(x)
    frozen.update_bias()
    assert frozen.expert_bias.abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_batch_and_dtypes(dtype):
    layer = MoE(8, MoEConfig(n_experts=4, top_k=2, d_expert=8, n_shared_experts=1)).to(dtype)
    assert layer(torch.zeros(0, 8, dtype=dtype)).shape == (0, 8)
    x = torch.randn(2, 3, 8, dtype=dtype, requires_grad=True)
    y = layer(x)
    y.float().sum().backward()
    assert y.dtype == dtype and x.grad.shape == x.shape and torch.isfinite(x.grad.float()).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_layer_matches_cpu(dtype):
    """CUDA kernels (+ torch._grouped_mm for bf16 on Hopper) against the fp32 CPU layer
    holding the same (dtype-rounded) weights and inputs."""
    torch.manual_seed(0)
    cfg = MoEConfig(n_experts=16, top_k=4, d_expert=64, n_shared_experts=1)
    gpu_layer = MoE(128, cfg).cuda().to(dtype)
    with torch.no_grad():
        gpu_layer.router.weight.normal_(std=0.1)
    cpu_layer = MoE(128, cfg)
    cpu_layer.load_state_dict({name: t.float().cpu() for name, t in gpu_layer.state_dict().items()})
    x = torch.randn(4, 64, 128).to(dtype)
    y_cpu = cpu_layer(x.float())
    x_gpu = x.cuda().requires_grad_(True)
    y_gpu = gpu_layer(x_gpu)
    assert y_gpu.dtype == dtype
    assert torch.equal(gpu_layer.stats["load"].cpu(), cpu_layer.stats["load"])
    rel_err = float((y_gpu.float().cpu() - y_cpu).norm() / y_cpu.norm())
    assert rel_err < (2e-2 if dtype == torch.bfloat16 else 1e-5), rel_err
    y_gpu.float().square().sum().backward()
    assert torch.isfinite(x_gpu.grad.float()).all()
    assert all(p.grad is not None and torch.isfinite(p.grad.float()).all() for p in gpu_layer.experts.parameters())


@pytest.mark.parametrize("cfg_kwargs", [
    dict(n_experts=4, top_k=2, d_expert=16),
    dict(n_experts=4, top_k=1, d_expert=16, n_shared_experts=1, capacity_factor=1.0, score_func="sigmoid"),
    dict(n_experts=3, top_k=2, d_expert=12, bias_update_rate=0.01),
], ids=["plain", "shared-capacity-sigmoid", "bias"])
def test_stacked_layer_is_k_moe_layers(cfg_kwargs):
    """StackedMoE: member k's outputs, aux loss, load and gradients are those of MoE k,
    with K*E experts in one dispatch (and, with a selection bias, each member's own)."""
    from steplaw.models.stacked import StackedMoE

    torch.manual_seed(0)
    cfg = MoEConfig(**cfg_kwargs)
    layers = [MoE(16, cfg) for _ in range(3)]
    if cfg.bias_update_rate:
        for k, layer in enumerate(layers):
            layer.expert_bias.copy_(torch.randn(cfg.n_experts) * 0.1 * k)
    stacked = StackedMoE(layers[0], 3)
    with torch.no_grad():
        for name, p in stacked.named_parameters():
            single_name = "router.weight" if name == "router" else name if name.startswith("shared.") else f"experts.{name}"
            for k, layer in enumerate(layers):
                p[k].copy_(layer.get_parameter(single_name))
        for k, layer in enumerate(layers):
            stacked.expert_bias[k].copy_(layer.expert_bias)
    x = torch.randn(3, 10, 16, requires_grad=True)
    out = stacked(x)
    (out.square().sum() + stacked.aux_loss.sum()).backward()
    for k, layer in enumerate(layers):
        xk = x[k].detach().clone().requires_grad_()
        ref = layer(xk)
        (ref.square().sum() + layer.aux_loss).backward()
        torch.testing.assert_close(out[k], ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stacked.aux_loss[k], layer.aux_loss, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(stacked.stats["load"][k], layer.stats["load"])
        torch.testing.assert_close(x.grad[k], xk.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(stacked.router.grad[k], layer.router.weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(stacked.w_down.grad[k], layer.experts.w_down.grad, rtol=1e-4, atol=1e-6)
    stacked.update_bias()
    for layer in layers:
        layer.update_bias()
    torch.testing.assert_close(stacked.expert_bias, torch.stack([layer.expert_bias for layer in layers]))
