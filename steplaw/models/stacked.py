"""K copies of one Transformer trained as one model: every weight has a leading member dim.

`StackedTransformer(config, K)` holds K members of `steplaw.models.transformer.Transformer`
(dense or MoE). Member k's weights are `param[k]` and have the single model's names and
layouts (so `member_state_dict(k)` is a state dict `Transformer(config)` loads), every
linear layer is one batched matmul over the members, and an MoE layer's K*E experts
dispatch in one `moe_permute` (member k's expert e is expert k*E + e). All members read
the same token batch [B, T]; the forward returns one mean cross-entropy per member [K].

Nothing mixes members: each member's outputs and gradients are those of its own model,
so a member whose weights turn NaN leaves the others untouched, and summing the member
losses before backward gives each member exactly its own gradient.

Why a native member dimension rather than torch.func (stack_module_state + vmap over
functional_call): measured once with a prototype on this project's 2-core CPU machine
(under load, one thread, d_model 48, 2 layers, K = 8, one training step), vmap took
159 ms vs 131 ms for this model at 128-token batches and 552 ms vs 382 ms at 512 (one
model at a time: 250 ms and 548 ms): vmap has no batching rule for CPU flash attention
(it loops over members), adds per-op batching work, and would need vmap rules for every
custom MoE op besides. Here the code is plain PyTorch (autocast works as in the single model) and
the MoE dispatch is the existing ops over K*E experts.

At the demo's sizes (d_model 16-64, 8-token sequences, 4-32 per batch) a step is mostly
per-op overhead, so float32 steps without autocast take a few hand-written autograd
Functions (_MemberLinear, _MemberRMSNorm, _SwiGLU, _CrossEntropy) that do the same arithmetic in
fewer ops and autograd nodes; their forwards give the same values bit for bit and their
gradients agree with autograd's to rounding. Rotary embeddings rotate q and k together in
the qkv projection's layout (apply_rotary_rolled: apply_rotary's values bit for bit).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from steplaw.models.config import ModelConfig
from steplaw.models.moe import balance_loss
from steplaw.models.transformer import Transformer, apply_rotary_rolled, rotary_pair_tables, rotary_tables, swiglu, upcast


class _MemberLinear(torch.autograd.Function):
    """bmm(x, weight.transpose(1, 2)) whose backward gives the weight's gradient in the
    weight's own layout (bmm(grad.T, x)): autograd's gives it transposed, which costs a
    TransposeBackward node and a copy per weight and step. Same values bit for bit."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return torch.bmm(x, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        grad_weight = torch.bmm(grad.transpose(1, 2), x) if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight


def _plain(*tensors: torch.Tensor) -> bool:
    """Whether the hand-written autograd Functions apply: float32 tensors, no autocast
    (whose dtype rules they do not follow; those cases take plain torch ops)."""
    return all(t.dtype == torch.float32 for t in tensors) and not torch.is_autocast_enabled(tensors[0].device.type)


def _linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-member x [K, M, d_in] @ weight[k].T with weight [K, d_out, d_in] (nn.Linear's layout)."""
    if _plain(x, weight):
        return _MemberLinear.apply(x, weight)
    return torch.bmm(x, weight.to(x.dtype).transpose(1, 2))


class _MemberRMSNorm(torch.autograd.Function):
    """float32 x [K, M, d] normalised over d and scaled by weight [K, d] per member, with a
    hand-written backward: one autograd node instead of the composite's six (pow, mean,
    add, rsqrt, mul, mul), which at the demo's sizes cost more than their arithmetic.
    The forward is F.rms_norm's float32 composite (x * rsqrt(mean(x^2) + eps)) times the
    weight, the same values bit for bit; the backward agrees with autograd's to rounding."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))  # [K, M, 1]
        normed = x * rstd
        ctx.save_for_backward(normed, rstd, weight)
        return normed * weight.unsqueeze(1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        normed, rstd, weight = ctx.saved_tensors
        grad_weight = (grad * normed).sum(1) if ctx.needs_input_grad[1] else None
        grad_normed = grad * weight.unsqueeze(1)
        # d/dx of x * rstd(x): rstd * (g - normed * mean(g * normed)).
        dot = (grad_normed * normed).mean(-1, keepdim=True)
        grad_x = grad_normed.sub_(normed * dot).mul_(rstd) if ctx.needs_input_grad[0] else None
        return grad_x, grad_weight, None


class _CrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of float32 logits [K, N, V] against target [K, N, 1] (int64):
    F.cross_entropy(reduction="none")'s values bit for bit (the negated log_softmax at the
    target), with a backward of three passes over the logits (exp of the saved
    log-probabilities times the upstream gradient, less it at the target) where autograd's
    takes five (nll_loss's zero-filled gradient, its scatter, log_softmax's backward);
    the gradients agree to rounding."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(logits, dim=-1)
        ctx.save_for_backward(log_probs, target)
        return log_probs.gather(-1, target).squeeze(-1).neg_()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        log_probs, target = ctx.saved_tensors
        grad = grad.unsqueeze(-1)
        return torch.exp(log_probs).mul_(grad).scatter_add_(-1, target, grad.neg()), None


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up of gate_up [K, M, 2F] (gate its first F columns) with a backward
    that writes both halves of the gradient into one [K, M, 2F] tensor: autograd's joins
    two [K, M, F] halves with a cat (chunk's backward), which at d_model 64 and K = 8 costs
    as much as a matmul (a memory-bound copy of the whole tensor). Same values bit for bit,
    gradients too (the same ops as autograd's: up's is g * silu(gate), gate's is
    silu_backward(g * up, gate))."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        silu = F.silu(gate)
        ctx.save_for_backward(gate_up, silu)
        return silu * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate_up, silu = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        out = torch.empty_like(gate_up)
        grad_gate, grad_up = out.chunk(2, dim=-1)
        torch.mul(grad, silu, out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
        return out


def _swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of gate_up [K, M, 2F], gate its first F columns."""
    return _SwiGLU.apply(gate_up) if _plain(gate_up) else swiglu(gate_up)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [K, M, d] normalised over d and scaled by weight [K, d] per member."""
    if _plain(x, weight):
        return _MemberRMSNorm.apply(x, weight, eps)
    return F.rms_norm(x, (x.shape[-1],), None, eps) * weight.to(x.dtype).unsqueeze(1)


def _member_param(value: torch.Tensor, members: int) -> nn.Parameter:
    return nn.Parameter(value.detach().unsqueeze(0).repeat(members, *([1] * value.dim())).contiguous())


class StackedMoE(nn.Module):
    """K MoE layers (steplaw.models.moe.MoE) as one; see that class for the math."""

    def __init__(self, layer, members: int):
        super().__init__()
        self.cfg, self.members, self.d_model = layer.cfg, members, layer.d_model
        self.pad_multiple = layer.pad_multiple
        self.router = _member_param(layer.router.weight, members)  # [K, E, d]
        self.w_gate = _member_param(layer.experts.w_gate, members)  # [K, E, d, h]
        self.w_up = _member_param(layer.experts.w_up, members)
        self.w_down = _member_param(layer.experts.w_down, members)  # [K, E, h, d]
        self.shared = None
        if layer.shared is not None:
            self.shared = nn.ParameterDict({
                name: _member_param(getattr(layer.shared, name), members) for name in ("w_gate", "w_up", "w_down")})
        self.register_buffer("expert_bias", layer.expert_bias.detach().repeat(members, 1).float())
        self.register_buffer("_load_since_update", torch.zeros(members, self.cfg.n_experts), persistent=False)
        self.aux_loss = torch.zeros(members)
        self.stats: dict[str, torch.Tensor] = {}

    def member_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The stacked [K, ...] tensors under a member's MoE state-dict names."""
        tensors = {
            f"{prefix}router.weight": self.router, f"{prefix}experts.w_gate": self.w_gate,
            f"{prefix}experts.w_up": self.w_up, f"{prefix}experts.w_down": self.w_down,
            f"{prefix}expert_bias": self.expert_bias,
        }
        if self.shared is not None:
            tensors.update({f"{prefix}shared.{name}": p for name, p in self.shared.items()})
        return tensors

    def _route(self, logits: torch.Tensor):
        """Expert ids [K*M, k] offset by member (member k's expert e is k*E + e), weights."""
        from steplaw.ops.moe import moe_route

        cfg, members, tokens = self.cfg, self.members, logits.shape[1]
        if cfg.bias_update_rate > 0:  # each member's own selection bias: route member by member
            routed = [moe_route(logits[k], cfg.top_k, cfg.score_func, cfg.renormalize, self.expert_bias[k])
                      for k in range(members)]
            ids = torch.cat([r[0] for r in routed])
            weights = torch.cat([r[1] for r in routed])
        else:  # routing is per token: all members' tokens in one call
            ids, weights, _ = moe_route(logits.reshape(members * tokens, -1), cfg.top_k, cfg.score_func, cfg.renormalize)
        offset = torch.arange(members, device=ids.device, dtype=ids.dtype).repeat_interleave(tokens) * cfg.n_experts
        return ids + offset.unsqueeze(1), weights

    def _experts(self, permuted: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        members, cfg = self.members, self.cfg
        w_gate = self.w_gate.reshape(members * cfg.n_experts, self.d_model, cfg.d_expert).to(permuted.dtype)
        w_up = self.w_up.reshape(members * cfg.n_experts, self.d_model, cfg.d_expert).to(permuted.dtype)
        w_down = self.w_down.reshape(members * cfg.n_experts, cfg.d_expert, self.d_model).to(permuted.dtype)
        if _grouped_mm_ok(permuted, self.d_model, cfg.d_expert):
            ends = offsets[1:].to(torch.int32)
            gate = torch._grouped_mm(permuted, w_gate, offs=ends)
            up = torch._grouped_mm(permuted, w_up, offs=ends)
            out = torch._grouped_mm(F.silu(gate) * up, w_down, offs=ends)
            # Rows past the last group (padding of the upper bound) are unspecified there.
            return out
        bounds = offsets.tolist()
        pieces = []
        for e in range(members * cfg.n_experts):
            rows = permuted[bounds[e]: bounds[e + 1]]
            if rows.shape[0]:
                pieces.append((F.silu(rows @ w_gate[e]) * (rows @ w_up[e])) @ w_down[e])
        tail = permuted.shape[0] - bounds[-1]
        if tail or not pieces:
            pieces.append(permuted.new_zeros(tail, self.d_model))
        return torch.cat(pieces)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [K, M, d] -> [K, M, d]."""
        from steplaw.ops.moe import expert_capacity, moe_permute, moe_unpermute

        cfg, members = self.cfg, self.members
        _, tokens, d_model = x.shape
        router_dtype = torch.promote_types(x.dtype, torch.float32)
        logits = torch.bmm(x.to(router_dtype), self.router.to(router_dtype).transpose(1, 2))  # [K, M, E]
        ids, weights = self._route(logits)
        capacity = expert_capacity(tokens, cfg.top_k, cfg.n_experts, cfg.capacity_factor)
        flat = x.reshape(members * tokens, d_model)
        permuted, row_map, src_index, offsets, _ = moe_permute(flat, ids, members * cfg.n_experts, self.pad_multiple, capacity)
        out = moe_unpermute(self._experts(permuted, offsets), row_map, src_index, weights).view(members, tokens, d_model)
        if self.shared is not None:
            dt = x.dtype
            s = self.shared
            hidden = F.silu(torch.bmm(x, s["w_gate"].to(dt))) * torch.bmm(x, s["w_up"].to(dt))
            out = out + torch.bmm(hidden, s["w_down"].to(dt))
        counts = torch.bincount(ids.reshape(-1).long(), minlength=members * cfg.n_experts).view(members, cfg.n_experts)
        self.aux_loss = balance_loss(self.cfg, logits, counts, tokens)  # [K]: one per member
        load = counts.float()
        self.stats = {"load": counts, "max_mean_load": load.max(1).values / load.mean(1).clamp_min(1e-9)}
        if self.training and cfg.bias_update_rate > 0:
            with torch.no_grad():
                self._load_since_update += load
        return out

    @torch.no_grad()
    def update_bias(self) -> None:
        """MoE.update_bias, member by member (a member with no load since the last call keeps its bias)."""
        rate = self.cfg.bias_update_rate
        if rate == 0:
            return
        load = self._load_since_update
        step = rate * torch.sign(load.mean(dim=1, keepdim=True) - load)
        self.expert_bias += torch.where(load.sum(dim=1, keepdim=True) > 0, step, torch.zeros_like(step))
        load.zero_()


def _grouped_mm_ok(x: torch.Tensor, *dims: int) -> bool:
    """torch._grouped_mm: bf16 on Hopper-class GPUs, and (one C++ loop instead of K*E
    Python-level matmuls) fp32 on CPU; both want 16-byte aligned rows."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.is_cuda:
        return x.dtype == torch.bfloat16 and all(d % 8 == 0 for d in dims) and torch.cuda.get_device_capability(x.device)[0] >= 9
    return x.device.type == "cpu" and x.dtype == torch.float32 and all(d % 4 == 0 for d in dims)


class StackedTransformer(nn.Module):
    """K members of Transformer(config), all starting from the weights of `init` (a
    Transformer) or, without it, from K copies of a fresh Transformer(config)."""

    def __init__(self, config: ModelConfig, members: int, init: Transformer | None = None):
        super().__init__()
        if members < 1:
            raise ValueError(f"members={members}: expected at least 1")
        init = init if init is not None else Transformer(config)
        self.config, self.members = config, members
        self._parameter_names = [name for name, _ in init.named_parameters()]
        self.tok_emb = _member_param(init.tok_emb.weight, members)  # [K, V, d]
        self.lm_head = None if init.lm_head is None else _member_param(init.lm_head.weight, members)
        self.norm = _member_param(init.norm.weight, members)
        self.layers = nn.ModuleList()
        for block in init.blocks:
            layer = nn.Module()
            layer.attn_norm = _member_param(block.attn_norm.weight, members)
            layer.qkv = _member_param(block.attn.qkv.weight, members)
            layer.out = _member_param(block.attn.out.weight, members)
            layer.ffn_norm = _member_param(block.ffn_norm.weight, members)
            layer.is_moe = block.is_moe
            if block.is_moe:
                layer.ffn = StackedMoE(block.ffn, members)
            else:
                layer.gate_up = _member_param(block.ffn.gate_up.weight, members)
                layer.down = _member_param(block.ffn.down.weight, members)
            self.layers.append(layer)
        cos2, sin2 = rotary_pair_tables(*rotary_tables(config.head_dim, config.max_seq_len, config.rope_theta))
        self.register_buffer("rope_cos2", cos2, persistent=False)
        self.register_buffer("rope_sin2", sin2, persistent=False)
        self._row_offsets: torch.Tensor | None = None  # [K, 1]: k * vocab_size, member k's rows of the embedding
        self._weights: tuple | None = None  # (key, [K, B*T] token weights) of the last `sequences`

    def moe_layers(self) -> list[StackedMoE]:
        return [layer.ffn for layer in self.layers if layer.is_moe]

    @torch.no_grad()
    def keep_members(self, keep: list[int]) -> None:
        """Drop every member not in `keep` (their slots, in place: parameters keep their
        identity, so an optimizer's state can follow with the same index)."""
        index = torch.tensor(keep, dtype=torch.long, device=self.tok_emb.device)
        for param in self.parameters():
            param.data = param.data.index_select(0, index)
        for layer in self.moe_layers():
            layer.expert_bias = layer.expert_bias.index_select(0, index)
            layer._load_since_update = layer._load_since_update.index_select(0, index)
            layer.members = len(keep)
            # The last forward's outputs hold autograd nodes that remember the old shapes.
            layer.aux_loss, layer.stats = torch.zeros(len(keep), device=index.device), {}
        self.members, self._row_offsets, self._weights = len(keep), None, None

    def _member_tensors(self) -> dict[str, torch.Tensor]:
        """The stacked [K, ...] tensors under a member's Transformer state-dict names."""
        tensors = {"tok_emb.weight": self.tok_emb, "norm.weight": self.norm}
        if self.lm_head is not None:
            tensors["lm_head.weight"] = self.lm_head
        for i, layer in enumerate(self.layers):
            p = f"blocks.{i}."
            tensors.update({f"{p}attn_norm.weight": layer.attn_norm, f"{p}attn.qkv.weight": layer.qkv,
                            f"{p}attn.out.weight": layer.out, f"{p}ffn_norm.weight": layer.ffn_norm})
            if layer.is_moe:
                tensors.update(layer.ffn.member_tensors(f"{p}ffn."))
            else:
                tensors.update({f"{p}ffn.gate_up.weight": layer.gate_up, f"{p}ffn.down.weight": layer.down})
        return tensors

    def member_state_dict(self, k: int) -> dict[str, torch.Tensor]:
        """Member k as a Transformer state dict (views of the stacked weights)."""
        return {name: tensor[k] for name, tensor in self._member_tensors().items()}

    def member_parameters(self) -> list[nn.Parameter]:
        """The stacked parameters in the order of a member's Transformer.parameters():
        gradient clipping sums the per-tensor norms in this order, as a run alone does,
        so the clipped gradients round the same."""
        tensors = self._member_tensors()
        return [tensors[name] for name in self._parameter_names]

    def _attention(self, layer, x: torch.Tensor, batch: int, seq: int, cos2, sin2) -> torch.Tensor:
        members, d_model = self.members, self.config.d_model
        heads, head_dim = self.config.n_heads, self.config.head_dim
        qkv = _linear(x, layer.qkv).view(members * batch, seq, 3, heads, head_dim)
        # q and k rotated together in qkv's layout (cos2, sin2 [T, 1, 1, h]), then [N, H, T, h] views.
        q, k = apply_rotary_rolled(qkv[:, :, :2], cos2, sin2).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, qkv[:, :, 2].transpose(1, 2), is_causal=True)
        return _linear(y.transpose(1, 2).reshape(members, batch * seq, d_model), layer.out)

    def _member_rows(self, device: torch.device) -> torch.Tensor:
        if self._row_offsets is None or self._row_offsets.device != device or self._row_offsets.shape[0] != self.members:
            self._row_offsets = torch.arange(self.members, device=device).unsqueeze(1) * self.config.vocab_size
        return self._row_offsets

    def _token_weights(self, sequences: tuple[int, ...], batch: int, seq: int, device: torch.device) -> torch.Tensor:
        """[K, B*T]: 1 / (n_k * T) on member k's first n_k sequences, 0 after them."""
        key = (sequences, batch, seq, device)
        if self._weights is None or self._weights[0] != key:
            counts = torch.tensor(sequences, dtype=torch.float32).unsqueeze(1) * seq
            positions = torch.arange(batch * seq, dtype=torch.float32).unsqueeze(0)
            self._weights = (key, torch.where(positions < counts, 1.0 / counts, 0.0).to(device))
        return self._weights[1]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                sequences: tuple[int, ...] | None = None) -> torch.Tensor:
        """idx [B, T] token ids (the same batch for every member) -> logits [K, B, T, V],
        or with targets [B, T] each member's mean cross-entropy [K] (nats per token).
        The MoE auxiliary losses of the same forward are in `aux_loss()` [K].

        sequences: with targets, member k's loss is the mean over the batch's first
        `sequences[k]` sequences only (members of different batch sizes; each row of a
        dense model depends on its own tokens alone, so the rows after them change
        nothing of member k but the compute). Not for MoE layers, whose routing
        statistics see every row."""
        batch, seq = idx.shape
        if sequences is not None and (len(sequences) != self.members or self.moe_layers()):
            raise ValueError(f"sequences={sequences!r}: expected one count per member ({self.members}) of a dense model")
        if seq > self.config.max_seq_len:
            raise ValueError(f"sequence length {seq} exceeds max_seq_len={self.config.max_seq_len}")
        members, vocab, eps = self.members, self.config.vocab_size, self.config.norm_eps
        cos2, sin2 = (table[:seq].view(seq, 1, 1, -1) for table in (self.rope_cos2, self.rope_sin2))
        # Member k's rows of the flattened [K*V, d] table start at k*V.
        shifted = idx.reshape(1, -1) + self._member_rows(idx.device)
        x = F.embedding(shifted, self.tok_emb.reshape(members * vocab, -1))  # [K, B*T, d]
        for layer in self.layers:
            x = x + self._attention(layer, _rms_norm(x, layer.attn_norm, eps), batch, seq, cos2, sin2)
            h = _rms_norm(x, layer.ffn_norm, eps)
            if layer.is_moe:
                x = x + layer.ffn(h)
            else:
                x = x + _linear(_swiglu(_linear(h, layer.gate_up)), layer.down)
        x = _rms_norm(x, self.norm, eps)
        logits = _linear(x, self.tok_emb if self.lm_head is None else self.lm_head)  # [K, B*T, V]
        if targets is None:
            return logits.view(members, batch, seq, vocab)
        if _plain(logits):
            losses = _CrossEntropy.apply(logits, targets.reshape(1, -1, 1).expand(members, -1, 1))
        else:
            losses = F.cross_entropy(upcast(logits).reshape(-1, vocab), targets.reshape(-1).repeat(members), reduction="none")
            losses = losses.view(members, -1)
        if sequences is None or all(n == batch for n in sequences):
            return losses.mean(dim=1)
        return (losses * self._token_weights(tuple(sequences), batch, seq, idx.device)).sum(dim=1)

    def aux_loss(self) -> torch.Tensor | float:
        """Per member [K]: the sum of the MoE layers' auxiliary losses of the last forward (0.0 for dense)."""
        total = 0.0
        for layer in self.moe_layers():
            total = total + layer.aux_loss
        return total
