"""The quickstart's network trained with labels: a ceiling for its self-supervised linear probe.

The network of configs/quickstart.json (ResNet with one basic block per stage, CIFAR stem, one input
channel, width --width) with a linear classifier on its pooled features, trained with cross-entropy
on Fashion-MNIST's training set under the quickstart's geometric views (random resized crop, scale
[0.25, 1], ratio [3/4, 4/3], bilinear, and a horizontal flip), SGD with Nesterov momentum 0.9,
weight decay 5e-4, a one-cycle schedule peaking at 0.1, batch 128. Prints the test top-1 after
each epoch. Plain PyTorch, nothing of twins; run with Debian's Python (it has torch), e.g.
  /usr/bin/python3 bench/reference/supervised_fashion_mnist.py --threads 2 --epochs 4 --width 16
"""
import argparse, gzip, math, time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--root", default="/usr/share/datasets/fashion-mnist")
p.add_argument("--epochs", type=int, default=4)
p.add_argument("--width", type=int, default=16)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--seed", type=int, default=0)
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(a.seed)


def idx(name, offset):
    with gzip.open(f"{a.root}/{name}") as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset).copy()


def images(name):
    return torch.tensor(idx(name, 16).reshape(-1, 1, 28, 28)).float() / 255


x_train, y_train = images("train-images-idx3-ubyte.gz"), torch.tensor(idx("train-labels-idx1-ubyte.gz", 8)).long()
x_test, y_test = images("t10k-images-idx3-ubyte.gz"), torch.tensor(idx("t10k-labels-idx1-ubyte.gz", 8)).long()
normalize = lambda x: (x - 0.286) / 0.353  # configs/views/fashion_mnist.json


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None
        if cin != cout or stride != 1:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
        return F.relu(y + (x if self.down is None else self.down(x)))


w = a.width
net = nn.Sequential(nn.Conv2d(1, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                    Block(w, w, 1), Block(w, 2 * w, 2), Block(2 * w, 4 * w, 2), Block(4 * w, 8 * w, 2),
                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8 * w, 10))


def views(x):
    """Random resized crop (scale [0.25, 1], log-uniform ratio [3/4, 4/3]) and flip, as one affine grid."""
    n = x.size(0)
    scale = torch.empty(n).uniform_(0.25, 1)
    ratio = torch.exp(torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3)))
    cw, ch = torch.sqrt(scale * ratio).clamp(max=1), torch.sqrt(scale / ratio).clamp(max=1)
    cx, cy = (torch.rand(n) * 2 - 1) * (1 - cw), (torch.rand(n) * 2 - 1) * (1 - ch)
    flip = torch.where(torch.rand(n) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = cw * flip, cx, ch, cy
    return F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)


batch = 128
steps_per_epoch = len(x_train) // batch
opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
schedule = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=a.epochs * steps_per_epoch, pct_start=0.1)
start = time.time()
for epoch in range(a.epochs):
    net.train()
    order = torch.randperm(len(x_train))
    for i in range(steps_per_epoch):
        b = order[i * batch:(i + 1) * batch]
        loss = F.cross_entropy(net(normalize(views(x_train[b]))), y_train[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    net.eval()
    with torch.no_grad():
        correct = sum((net(normalize(x_test[i:i + 1000])).argmax(1) == y_test[i:i + 1000]).sum().item()
                      for i in range(0, len(x_test), 1000))
    print(f"epoch {epoch + 1}/{a.epochs}: test top-1 {100 * correct / len(x_test):.2f}% ({time.time() - start:.0f} s)",
          flush=True)
