#!/usr/bin/env python3
"""Golden values for tests/train: the official VICReg LARS (facebookresearch/vicreg
main_vicreg.py, class LARS, with exclude_bias_and_norm for both filters), three steps on fixed
parameters and gradients, in float64.

    /usr/bin/python3 tests/reference/lars_reference.py > tests/reference/lars_golden.json
"""
import json

import torch
from torch import optim


def exclude_bias_and_norm(p):
    return p.ndim == 1


class LARS(optim.Optimizer):  # verbatim semantics of the official class
    def __init__(self, params, lr, weight_decay=0, momentum=0.9, eta=0.001,
                 weight_decay_filter=None, lars_adaptation_filter=None):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta,
                        weight_decay_filter=weight_decay_filter,
                        lars_adaptation_filter=lars_adaptation_filter)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if g["weight_decay_filter"] is None or not g["weight_decay_filter"](p):
                    dp = dp.add(p, alpha=g["weight_decay"])
                if g["lars_adaptation_filter"] is None or not g["lars_adaptation_filter"](p):
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0,
                                    torch.where(update_norm > 0, (g["eta"] * param_norm / update_norm), one),
                                    one)
                    dp = dp.mul(q)
                param_state = self.state[p]
                if "mu" not in param_state:
                    param_state["mu"] = torch.zeros_like(p)
                mu = param_state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


def main():
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(4, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(4, generator=g, dtype=torch.float64)
    zero = torch.zeros(2, 2, dtype=torch.float64)  # param_norm 0: q = 1
    params = [weight.clone().requires_grad_(), bias.clone().requires_grad_(), zero.clone().requires_grad_()]
    opt = LARS(params, lr=0.7, weight_decay=0.05, momentum=0.9, eta=0.02,
               weight_decay_filter=exclude_bias_and_norm, lars_adaptation_filter=exclude_bias_and_norm)
    grads, after = [], []
    for step in range(3):
        gs = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
        for p, gr in zip(params, gs):
            p.grad = gr.clone()
        opt.step()
        grads.append([gr.flatten().tolist() for gr in gs])
        after.append([p.detach().flatten().tolist() for p in params])
    print(json.dumps({"generator": "tests/reference/lars_reference.py", "lr": 0.7, "weight_decay": 0.05,
                      "momentum": 0.9, "eta": 0.02,
                      "shapes": [list(p.shape) for p in params],
                      "initial": [weight.flatten().tolist(), bias.flatten().tolist(), zero.flatten().tolist()],
                      "grads": grads, "after": after}))


if __name__ == "__main__":
    main()
