"""K copies of one Transformer trained as one model: every weight has a leading member dim.

`StackedTransformer(config, K)` holds K members of `steplaw.models.transformer.Transformer`
(dense or MoE). Member k's weights are `param[k]` and have the single model's names and
layouts (so `member_state_dict(k)` is a state dict `Transformer(config)` loads), every
linear layer is one batched matmul over the members, and an MoE layer's K*E experts
dispatch in one `moe_permute` (member k's expert e is expert k*E + e). All members read
the same token batch [B, T]; the forward returns one mean cross-entropy per member [K].

Nothing mixes members: each member's outputs and gradients are those of its own model,
so a member whose weights turn NaN leaves the others untouched, and summing the member
losses before backward gives each member exactly its own gradient. Both this model and
the single Transformer compute with steplaw.models.layers (the single one as one
member), so a member's values are its single model's bit for bit.

Why a native member dimension rather than torch.func (stack_module_state + vmap over
functional_call): measured once with a prototype on this project's 2-core CPU machine
(under load, one thread, d_model 48, 2 layers, K = 8, one training step), vmap took
159 ms vs 131 ms for this model at 128-token batches and 552 ms vs 382 ms at 512 (one
model at a time: 250 ms and 548 ms): vmap has no batching rule for CPU flash attention
(it loops over members), adds per-op batching work, and would need vmap rules for every
custom MoE op besides. Here the code is plain PyTorch (autocast works as in the single model) and
the MoE dispatch is the existing ops over K*E experts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from steplaw.models import layers
from steplaw.models.config import ModelConfig
from steplaw.models.moe import balance_loss, grouped_mm_usable, router_logits, shared_mlp
from steplaw.models.transformer import Transformer


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
        if grouped_mm_usable(permuted, self.d_model, cfg.d_expert):
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
        logits = router_logits(x, self.router)  # [K, M, E]
        ids, weights = self._route(logits)
        capacity = expert_capacity(tokens, cfg.top_k, cfg.n_experts, cfg.capacity_factor)
        flat = x.reshape(members * tokens, d_model)
        permuted, row_map, src_index, offsets, _ = moe_permute(flat, ids, members * cfg.n_experts, self.pad_multiple, capacity)
        out = moe_unpermute(self._experts(permuted, offsets), row_map, src_index, weights).view(members, tokens, d_model)
        if self.shared is not None:
            out = out + shared_mlp(x, self.shared["w_gate"], self.shared["w_up"], self.shared["w_down"])
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
        self.register_buffer("rope_cos2", init.rope_cos2.clone(), persistent=False)
        self.register_buffer("rope_sin2", init.rope_sin2.clone(), persistent=False)
        self._row_offsets: torch.Tensor | None = None  # [K, 1]: k * vocab_size, member k's rows of the embedding

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
        self.members, self._row_offsets = len(keep), None

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

    def _member_rows(self, device: torch.device) -> torch.Tensor:
        if self._row_offsets is None or self._row_offsets.device != device or self._row_offsets.shape[0] != self.members:
            self._row_offsets = torch.arange(self.members, device=device).unsqueeze(1) * self.config.vocab_size
        return self._row_offsets

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
        members, vocab, eps = self.members, self.config.vocab_size, self.config.norm_eps
        cos2, sin2 = layers.rotary_rows(self.rope_cos2, self.rope_sin2, seq)
        # Member k's rows of the flattened [K*V, d] table start at k*V.
        shifted = idx.reshape(1, -1) + self._member_rows(idx.device)
        x = F.embedding(shifted, self.tok_emb.reshape(members * vocab, -1))  # [K, B*T, d]
        for layer in self.layers:
            x = x + layers.attention(layers.rms_norm(x, layer.attn_norm, eps), layer.qkv, layer.out, batch, seq,
                                     self.config.n_heads, cos2, sin2)
            h = layers.rms_norm(x, layer.ffn_norm, eps)
            x = x + (layer.ffn(h) if layer.is_moe else layers.feed_forward(h, layer.gate_up, layer.down))
        x = layers.rms_norm(x, self.norm, eps)
        logits = layers.linear(x, self.tok_emb if self.lm_head is None else self.lm_head)  # [K, B*T, V]
        if targets is None:
            return logits.view(members, batch, seq, vocab)
        losses = layers.cross_entropy(logits, targets)  # [K, B*T]
        if sequences is None or all(n == batch for n in sequences):
            return losses.mean(dim=1)
        # Member k's mean over its own rows, the op its run alone takes over its batch.
        return torch.cat([losses[k:k + 1, :n * seq].mean(dim=1) for k, n in enumerate(sequences)])

    def aux_loss(self) -> torch.Tensor | float:
        """Per member [K]: the sum of the MoE layers' auxiliary losses of the last forward (0.0 for dense)."""
        total = 0.0
        for layer in self.moe_layers():
            total = total + layer.aux_loss
        return total
