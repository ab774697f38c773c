"""Mixture-of-Experts feed-forward layer on the steplaw MoE dispatch ops.

    x -> router (linear, no bias) -> moe_route -> moe_permute -> routed SwiGLU experts
      -> moe_unpermute (weighted sum of each token's k expert outputs) [+ shared experts]

Parameter names (for parameter accounting):
    router.weight        [E, d_model]
    experts.w_gate       [E, d_model, d_expert]   (x @ w_gate[e])
    experts.w_up         [E, d_model, d_expert]
    experts.w_down       [E, d_expert, d_model]
    shared.w_gate/w_up   [d_model, n_shared * d_expert]  (only when n_shared_experts > 0;
    shared.w_down        [n_shared * d_expert, d_model]   the shared experts fused in one MLP)
Buffer `expert_bias` [E]: the selection bias of auxiliary-loss-free balancing.

Per token, the routed experts hold top_k * 3 * d_model * d_expert activated parameters of
the E * 3 * d_model * d_expert total.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from steplaw.models import layers
from steplaw.models.config import MoEConfig
from steplaw.ops.moe import expert_capacity, moe_permute, moe_route, moe_unpermute


def grouped_mm_usable(x: torch.Tensor, *dims: int) -> bool:
    """Whether the experts' matmuls take torch._grouped_mm: bf16 on Hopper-class GPUs,
    and (one C++ loop over the experts, no host sync for their row counts) fp32 on a
    CPU; both want 16-byte aligned rows. A stacked MoE layer (steplaw.models.stacked)
    asks the same question, so a stacked member's experts round as its run alone's."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.is_cuda:
        return x.dtype == torch.bfloat16 and all(d % 8 == 0 for d in dims) and torch.cuda.get_device_capability(x.device)[0] >= 9
    return x.device.type == "cpu" and x.dtype == torch.float32 and all(d % 4 == 0 for d in dims)


class RoutedExperts(nn.Module):
    """E SwiGLU MLPs applied to contiguous row groups of a permuted token matrix."""

    def __init__(self, num_experts: int, d_model: int, d_expert: int):
        super().__init__()
        self.num_experts, self.d_model, self.d_expert = num_experts, d_model, d_expert
        self.w_gate = nn.Parameter(torch.empty(num_experts, d_model, d_expert))
        self.w_up = nn.Parameter(torch.empty(num_experts, d_model, d_expert))
        self.w_down = nn.Parameter(torch.empty(num_experts, d_expert, d_model))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        for weight in (self.w_gate, self.w_up, self.w_down):
            nn.init.normal_(weight, std=std)

    def forward(self, permuted: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """permuted [R, d_model], expert e owning rows offsets[e]:offsets[e+1] -> [R, d_model].
        Rows past offsets[-1] (padding of the upper bound) come back zero on the loop
        path and unspecified on the grouped-GEMM path; moe_unpermute never reads them."""
        if grouped_mm_usable(permuted, self.d_model, self.d_expert):
            ends = offsets[1:].to(torch.int32)
            gate = torch._grouped_mm(permuted, self.w_gate.to(permuted.dtype), offs=ends)
            up = torch._grouped_mm(permuted, self.w_up.to(permuted.dtype), offs=ends)
            return torch._grouped_mm(F.silu(gate) * up, self.w_down.to(permuted.dtype), offs=ends)
        bounds = offsets.tolist()  # the loop needs the group sizes on the host
        pieces = []
        for e in range(self.num_experts):
            rows = permuted[bounds[e] : bounds[e + 1]]
            if rows.shape[0]:
                hidden = F.silu(rows @ self.w_gate[e].to(rows.dtype)) * (rows @ self.w_up[e].to(rows.dtype))
                pieces.append(hidden @ self.w_down[e].to(rows.dtype))
        tail = permuted.shape[0] - bounds[-1]
        if tail or not pieces:
            pieces.append(permuted.new_zeros(tail, self.d_model))
        return torch.cat(pieces)


class SharedExperts(nn.Module):
    """n_shared SwiGLU experts that every token goes through, fused into one MLP."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(d_model, d_hidden))
        self.w_up = nn.Parameter(torch.empty(d_model, d_hidden))
        self.w_down = nn.Parameter(torch.empty(d_hidden, d_model))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        for weight in (self.w_gate, self.w_up, self.w_down):
            nn.init.normal_(weight, std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, d_model] -> [M, d_model]."""
        return shared_mlp(x.unsqueeze(0), self.w_gate, self.w_up, self.w_down).squeeze(0)


def shared_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """The shared experts' SwiGLU per member: x [K, M, d] with weights [K, d, h] / [K, h, d]
    (a single layer's [d, h] / [h, d] taken as K = 1). One batched matmul per weight for
    the single layer and a stack alike: a plain mm computes the weights' gradients with
    another GEMM layout than bmm, which rounds differently on some CPUs (an AVX2-only AMD
    EPYC), so a stacked member would drift from its run alone."""
    def members(w: torch.Tensor) -> torch.Tensor:
        return (w if w.dim() == 3 else w.unsqueeze(0)).to(x.dtype)

    hidden = F.silu(torch.bmm(x, members(w_gate))) * torch.bmm(x, members(w_up))
    return torch.bmm(hidden, members(w_down))


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Router logits per member, in float32 at least whatever the activations' dtype (bf16
    logits would flip near-tied choices and blur the load-balancing losses): x [K, M, d],
    weight [K, E, d] (a single layer's [E, d] as K = 1) -> [K, M, E]. The single layer and
    a stack both take steplaw.models.layers.linear, so the router's weight gradient has
    one GEMM layout (F.linear's mm backward and bmm's round differently on some CPUs)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return layers.linear(x.to(dtype), weight.to(dtype))


def balance_loss(cfg: MoEConfig, logits: torch.Tensor, counts: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """aux_loss_coef * Switch load-balancing loss + z_loss_coef * router z-loss, per
    leading index: logits [..., T, E] and counts [..., E] give a loss of shape [...]
    (a scalar for one layer, [K] for a stack of K members).

    Switch loss (Fedus et al. 2021, eq. 4, extended to top-k): E * sum_e f_e * P_e with
    f_e the fraction of the T*k routed slots that chose e and P_e the mean router
    probability of e; it is 1 for a perfectly balanced router. z-loss (Zoph et al.
    2022, ST-MoE eq. 5): mean over tokens of logsumexp(logits)^2.
    """
    loss = logits.new_zeros(logits.shape[:-2], dtype=torch.float32)
    if num_tokens == 0:
        return loss
    logits32 = logits.float()
    if cfg.aux_loss_coef > 0:
        if cfg.score_func == "softmax":
            probs = torch.softmax(logits32, dim=-1)
        else:
            scores = torch.sigmoid(logits32)
            probs = scores / scores.sum(dim=-1, keepdim=True)
        fraction = counts.detach().float() / (num_tokens * cfg.top_k)
        loss = loss + cfg.aux_loss_coef * cfg.n_experts * (fraction * probs.mean(dim=-2)).sum(dim=-1)
    if cfg.z_loss_coef > 0:
        loss = loss + cfg.z_loss_coef * torch.logsumexp(logits32, dim=-1).square().mean(dim=-1)
    return loss


class MoE(nn.Module):
    """MoE feed-forward layer: x [..., d_model] -> same shape and dtype.

    After each forward: `aux_loss` (scalar, already weighted by cfg.aux_loss_coef and
    cfg.z_loss_coef; add it to the training loss) and `stats` ({'load': tokens routed
    per expert [E] before capacity dropping, 'max_mean_load': max/mean of that load,
    'dropped_fraction': dropped slots / (tokens * top_k)}, all detached tensors).
    Call `update_bias()` after each optimizer step (a no-op unless
    cfg.bias_update_rate > 0).
    """

    def __init__(self, d_model: int, cfg: MoEConfig, pad_multiple: int = 1):
        super().__init__()
        self.d_model, self.cfg, self.pad_multiple = d_model, cfg, pad_multiple
        self.router = nn.Linear(d_model, cfg.n_experts, bias=False)
        self.experts = RoutedExperts(cfg.n_experts, d_model, cfg.d_expert)
        self.shared = SharedExperts(d_model, cfg.n_shared_experts * cfg.d_expert) if cfg.n_shared_experts else None
        self.register_buffer("expert_bias", torch.zeros(cfg.n_experts), persistent=True)
        # Tokens per expert summed over the forwards since the last update_bias() (all
        # micro-batches of one optimizer step).
        self.register_buffer("_load_since_update", torch.zeros(cfg.n_experts), persistent=False)
        nn.init.normal_(self.router.weight, std=0.02)
        self.aux_loss = torch.zeros(())
        self.stats: dict[str, torch.Tensor] = {}

    def _apply(self, fn, recurse=True):
        # The selection bias takes steps of bias_update_rate and the load counter counts
        # tokens: both stay fp32 when the layer is cast to bf16/fp16 (bf16 would swallow
        # the steps and round the counts).
        super()._apply(fn, recurse)
        self.expert_bias = self.expert_bias.float()
        self._load_since_update = self._load_since_update.float()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        num_tokens = tokens.shape[0]
        logits = router_logits(tokens.unsqueeze(0), self.router.weight).squeeze(0)
        bias = self.expert_bias if cfg.bias_update_rate > 0 else None
        expert_ids, weights, counts = moe_route(logits, cfg.top_k, cfg.score_func, cfg.renormalize, bias)
        capacity = expert_capacity(num_tokens, cfg.top_k, cfg.n_experts, cfg.capacity_factor)
        permuted, row_map, src_index, offsets, dropped = moe_permute(
            tokens, expert_ids, cfg.n_experts, self.pad_multiple, capacity)
        expert_out = self.experts(permuted, offsets)
        out = moe_unpermute(expert_out, row_map, src_index, weights)
        if self.shared is not None:
            out = out + self.shared(tokens)

        self.aux_loss = balance_loss(self.cfg, logits, counts, num_tokens)
        load = counts.detach()
        load_f = load.float()
        self.stats = {
            "load": load,
            "max_mean_load": load_f.max() / load_f.mean().clamp_min(1e-9),
            "dropped_fraction": dropped.detach().float() / max(num_tokens * cfg.top_k, 1),
        }
        if self.training and cfg.bias_update_rate > 0:
            with torch.no_grad():
                self._load_since_update += load_f
        return out.reshape(shape)

    @torch.no_grad()
    def update_bias(self) -> None:
        """DeepSeek-V3 auxiliary-loss-free balancing (Wang et al. 2024; DeepSeek-V3 report
        sec. 2.1.2): bias_e += rate * sign(mean load - load_e), from the load since the
        last call; under-loaded experts become more likely to be selected."""
        rate = self.cfg.bias_update_rate
        if rate == 0:
            return
        load = self._load_since_update
        if load.sum() > 0:
            self.expert_bias += rate * torch.sign(load.mean() - load)
        load.zero_()

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"d_model={self.d_model}, experts={c.n_experts}, top_k={c.top_k}, d_expert={c.d_expert}, "
                f"shared={c.n_shared_experts}, score={c.score_func}, capacity_factor={c.capacity_factor}")
