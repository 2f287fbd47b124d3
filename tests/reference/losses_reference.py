#!/usr/bin/env python3
"""Golden values for tests/losses: the official formulas, run in PyTorch at float64.

VICReg: facebookresearch/vicreg main_vicreg.py (VICReg.forward), single process.
Barlow Twins: facebookresearch/barlowtwins main.py (BarlowTwins.forward), single process,
  with the projector output fed straight to BatchNorm1d(affine=False).
BYOL: the regression loss 2 - 2 cos(p, t) of byol-pytorch / the paper, symmetrised.

Run with Debian's python3-torch (scripts/setup-reference.sh):
    /usr/bin/python3 tests/reference/losses_reference.py > tests/reference/losses_golden.json
"""
import json

import torch
import torch.nn as nn
import torch.nn.functional as F


def off_diagonal(x):
    n, m = x.shape
    assert n == m
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def vicreg(x, y, sim=25.0, std=25.0, cov=1.0, average=True):
    batch_size, num_features = x.shape
    repr_loss = F.mse_loss(x, y)
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    std_x = torch.sqrt(x.var(dim=0) + 0.0001)
    std_y = torch.sqrt(y.var(dim=0) + 0.0001)
    div = 2 if average else 1
    std_loss = torch.mean(F.relu(1 - std_x)) / div + torch.mean(F.relu(1 - std_y)) / div
    cov_x = (x.T @ x) / (batch_size - 1)
    cov_y = (y.T @ y) / (batch_size - 1)
    cov_loss = off_diagonal(cov_x).pow_(2).sum().div(num_features) + off_diagonal(
        cov_y).pow_(2).sum().div(num_features)
    loss = sim * repr_loss + std * std_loss + cov * cov_loss
    return loss, {"invariance": repr_loss, "variance": std_loss, "covariance": cov_loss}


def barlow_twins(z1, z2, lambd=0.0051):
    bn = nn.BatchNorm1d(z1.shape[1], affine=False).double()
    bn.train()
    c = bn(z1).T @ bn(z2)
    c.div_(z1.shape[0])
    on_diag = torch.diagonal(c).add_(-1).pow_(2).sum()
    off_diag = off_diagonal(c).pow_(2).sum()
    return on_diag + lambd * off_diag, {"on_diagonal": on_diag, "off_diagonal": off_diag}


def byol(pa, pb, ta, tb):
    def reg(x, y):
        x = F.normalize(x, dim=-1, p=2)
        y = F.normalize(y.detach(), dim=-1, p=2)
        return (2 - 2 * (x * y).sum(dim=-1)).mean()
    a, b = reg(pa, tb), reg(pb, ta)
    return a + b, {"view_a": a, "view_b": b}


def record(name, fn, inputs, **kwargs):
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    total, terms = fn(*leaves, **kwargs)
    total.backward()
    return {
        "name": name,
        "options": kwargs,
        "inputs": [t.tolist() for t in inputs],
        "total": total.item(),
        "terms": {k: v.item() for k, v in terms.items()},
        "grads": [t.grad.tolist() if t.grad is not None else None for t in leaves],
    }


def main():
    g = torch.Generator().manual_seed(1234)
    cases = []
    for n, d in [(8, 6), (16, 32), (5, 3)]:
        za = torch.randn(n, d, generator=g, dtype=torch.float64) * 0.7
        zb = za + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)
        cases.append(record(f"vicreg_{n}x{d}", vicreg, [za, zb]))
        cases.append(record(f"vicreg_sum_{n}x{d}", vicreg, [za, zb], average=False))
        cases.append(record(f"vicreg_coeffs_{n}x{d}", vicreg, [za, zb], sim=1.0, std=2.0, cov=3.0))
        cases.append(record(f"barlow_twins_{n}x{d}", barlow_twins, [za, zb]))
        cases.append(record(f"barlow_twins_lambda_{n}x{d}", barlow_twins, [za, zb], lambd=0.1))
        pa = torch.randn(n, d, generator=g, dtype=torch.float64)
        pb = torch.randn(n, d, generator=g, dtype=torch.float64)
        ta = torch.randn(n, d, generator=g, dtype=torch.float64)
        tb = torch.randn(n, d, generator=g, dtype=torch.float64)
        cases.append(record(f"byol_{n}x{d}", byol, [pa, pb, ta, tb]))
    print(json.dumps({"generator": "tests/reference/losses_reference.py",
                      "torch": torch.__version__, "cases": cases}))


if __name__ == "__main__":
    main()
