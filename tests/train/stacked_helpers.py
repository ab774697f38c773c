"""A per-member AdamW in plain torch with FusedAdamW's per-member API (lr a [K] tensor,
member k = param[k], lr 0 freezes a member), for testing the stacked trainer apart from
the fused kernel."""
import math

import torch


class PerMemberAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                shape = (p.shape[0],) + (1,) * (p.dim() - 1)
                lr = group["lr"].view(shape)
                live = lr != 0
                m = state["exp_avg"] * beta1 + p.grad * (1 - beta1)
                v = state["exp_avg_sq"] * beta2 + p.grad.square() * (1 - beta2)
                denom = v.sqrt() / math.sqrt(1 - beta2 ** t) + group["eps"]
                new = p * (1 - lr * group["weight_decay"]) - lr / (1 - beta1 ** t) * m / denom
                p.copy_(torch.where(live, new, p))
                state["exp_avg"].copy_(torch.where(live, m, state["exp_avg"]))
                state["exp_avg_sq"].copy_(torch.where(live, v, state["exp_avg_sq"]))
