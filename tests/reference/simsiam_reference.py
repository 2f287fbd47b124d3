#!/usr/bin/env python3
"""Golden values for the SimSiam loss: the official formula, run in PyTorch at float64.

SimSiam: facebookresearch/simsiam main_simsiam.py (train), commit a7bc177:
    criterion = nn.CosineSimilarity(dim=1)            # eps = 1e-8
    loss = -(criterion(p1, z2).mean() + criterion(p2, z1).mean()) * 0.5
  with z1, z2 detached in simsiam/builder.py (SimSiam.forward returns z1.detach(), z2.detach()).
Inputs, in order: p_a, p_b, z_a, z_b (predictor outputs of views a and b, projector outputs of
views a and b). Terms are the unweighted negative mean cosines; total = (view_a + view_b) / 2.
The stop-gradient leaves z_a and z_b without gradients (null in the JSON).

Edge cases pin the eps behaviour of torch 1.13's cosine_similarity: each squared norm is clamped
to at least eps^2 on its own (the clamp is invisible to autograd), then x1/|x1| . x2/|x2|.

Run with Debian's python3-torch (scripts/setup-reference.sh):
    /usr/bin/python3 tests/reference/simsiam_reference.py > tests/reference/simsiam_golden.json
"""
import json

import torch
import torch.nn as nn


def simsiam(pa, pb, za, zb):
    criterion = nn.CosineSimilarity(dim=1)
    a = -criterion(pa, zb.detach()).mean()
    b = -criterion(pb, za.detach()).mean()
    return (a + b) * 0.5, {"view_a": a, "view_b": b}


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


def views(g, n, d):
    za = torch.randn(n, d, generator=g, dtype=torch.float64)
    zb = za + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)
    pa = zb + 0.8 * torch.randn(n, d, generator=g, dtype=torch.float64)
    pb = za + 0.8 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return pa, pb, za, zb


def main():
    g = torch.Generator().manual_seed(4321)
    cases = []
    for n, d in [(8, 6), (16, 32), (5, 3)]:
        cases.append(record(f"simsiam_{n}x{d}", simsiam, list(views(g, n, d))))
    # A zero row of p_a: its cosine is 0 and its gradient is z_b[i] / (eps * |z_b[i]|) scaled.
    pa, pb, za, zb = views(g, 8, 6)
    pa[3] = 0.0
    cases.append(record("simsiam_zero_row_8x6", simsiam, [pa, pb, za, zb]))
    # A nonzero row of p_b whose norm (~1e-10) is below eps: per-vector clamp, not clamp of the product.
    pa, pb, za, zb = views(g, 8, 6)
    pb[5] = pb[5] * 1e-10
    cases.append(record("simsiam_small_row_8x6", simsiam, [pa, pb, za, zb]))
    print(json.dumps({"generator": "tests/reference/simsiam_reference.py",
                      "torch": torch.__version__, "cases": cases}))


if __name__ == "__main__":
    main()
