#!/usr/bin/env python3
"""Golden values for tests/train: LARS in the form of solo-learn (vturrisi/solo-learn 9187ea3,
solo/utils/lars.py) and lightly (lightly-ai/lightly, lightly/utils/lars.py), three steps on fixed
parameters and gradients, in float64:
  - solo-learn: clip_lr, exclude_bias_n_norm (1-D parameters excluded), eps 1e-8;
  - lightly: parameters excluded by their group's zero weight decay, no clipping.
A parameter whose norm is zero, and one whose gradient is zero at step 1, take the branch
without weight decay or adaptation.

    /usr/bin/python3 tests/reference/lars_solo_learn_reference.py > tests/reference/lars_solo_learn_golden.json
"""
import json

import torch


def lars_step(groups, state, clip, exclude_1d, exclude_zero_wd, eta, eps, momentum):
    with torch.no_grad():
        for g in groups:
            wd, lr = g["weight_decay"], g["lr"]
            for p in g["params"]:
                d_p = p.grad
                p_norm, g_norm = torch.norm(p), torch.norm(p.grad)
                excluded = (exclude_1d and p.ndim == 1) or (exclude_zero_wd and wd == 0)
                if not excluded and p_norm != 0 and g_norm != 0:
                    lars_lr = eta * p_norm / (g_norm + p_norm * wd + eps)
                    if clip:
                        lars_lr = min(lars_lr / lr, 1)
                    d_p = d_p.add(p, alpha=wd) * lars_lr
                if id(p) not in state:
                    state[id(p)] = torch.clone(d_p).detach()
                else:
                    state[id(p)].mul_(momentum).add_(d_p)
                p.add_(state[id(p)], alpha=-lr)


def run(name, clip, exclude_1d, exclude_zero_wd, bias_wd):
    g = torch.Generator().manual_seed(7)
    weight = torch.randn(4, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(4, generator=g, dtype=torch.float64)
    zero = torch.zeros(2, 2, dtype=torch.float64)
    params = [weight.clone(), bias.clone(), zero.clone()]
    groups = [{"params": [params[0], params[2]], "weight_decay": 0.05, "lr": 0.7},
              {"params": [params[1]], "weight_decay": bias_wd, "lr": 0.7}]
    state, grads, after = {}, [], []
    for step in range(3):
        gs = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
        if step == 1:
            gs[0] = torch.zeros_like(gs[0])  # a zero gradient: no decay, no adaptation
        for p, gr in zip(params, gs):
            p.grad = gr.clone()
        lars_step(groups, state, clip, exclude_1d, exclude_zero_wd, eta=0.02, eps=1e-8, momentum=0.9)
        grads.append([gr.flatten().tolist() for gr in gs])
        after.append([p.detach().flatten().tolist() for p in params])
    return {"name": name, "clip": clip, "exclude_1d": exclude_1d, "exclude_zero_weight_decay": exclude_zero_wd,
            "lr": 0.7, "weight_decay": 0.05, "bias_weight_decay": bias_wd, "momentum": 0.9, "eta": 0.02,
            "eps": 1e-8, "shapes": [list(p.shape) for p in params],
            "initial": [weight.flatten().tolist(), bias.flatten().tolist(), zero.flatten().tolist()],
            "grads": grads, "after": after}


def main():
    cases = [run("solo_learn", clip=True, exclude_1d=True, exclude_zero_wd=False, bias_wd=0.05),
             run("lightly", clip=False, exclude_1d=False, exclude_zero_wd=True, bias_wd=0.0)]
    print(json.dumps({"generator": "tests/reference/lars_solo_learn_reference.py", "torch": torch.__version__,
                      "cases": cases}))


if __name__ == "__main__":
    main()
