"""Training throughput of twins' CIFAR-10 pretraining recipes written in plain PyTorch (CPU).

The recipe is read from twins' configs/<method>_cifar10.json and its views file: ResNet-18 with
the CIFAR stem, the projector (BYOL: predictor and EMA target), the loss, LARS at lr = base_lr *
batch / 256, and twins' online linear probe (SGD, momentum 0.9) on detached view-1 features.
Modes (one JSON line each; images_per_s = batch_size * steps / seconds after --warmup steps):
  step        the full step (both views forward, loss, backward, LARS, BYOL's EMA, probe
              step) on synthetic normalised batches already in memory.
  end_to_end  the same step fed by DataLoader(shuffle, drop_last, persistent_workers, one
              torch thread per worker) over CIFAR-10's data_batch_1..5.bin with PIL views;
              data_wait: fraction of the timed span spent waiting for the next batch.
Only step mode runs without torchvision and Pillow (a bare PyTorch install, as on some GPU
machines): its ResNets are then this file's own copy of torchvision's (same modules, names,
initialisation and forward; the JSON line says "models": "own").
Run with Debian's Python (it has torch), e.g.
  /usr/bin/python3 bench/reference/pretrain_torch.py --method vicreg --mode both \
      --root ../shared/data/cifar10/cifar-10-batches-bin --threads 2 --workers 2 --steps 3
"""
import argparse, copy, itertools, json, os, time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # end_to_end mode and the ViT recipes need them; step mode with ResNets does not
    import torchvision
    from PIL import Image
    from torchvision import transforms as T
except ImportError as e:
    torchvision = Image = T = None
    MISSING = str(e)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


VIEW_OPS = {  # twins views-file op -> torchvision/PIL transforms
    "random_resized_crop": lambda o: [T.RandomResizedCrop(o["size"], scale=tuple(o["scale"]),
        interpolation=T.InterpolationMode[o.get("interpolation", "bilinear").upper()])],
    "random_horizontal_flip": lambda o: [T.RandomHorizontalFlip(o["p"])],
    "color_jitter": lambda o: [T.RandomApply([T.ColorJitter(
        o["brightness"], o["contrast"], o["saturation"], o["hue"])], p=o["p"])],
    "random_grayscale": lambda o: [T.RandomGrayscale(o["p"])],
    "solarization": lambda o: [T.RandomSolarize(128, p=o["p"])],  # PIL: ImageOps.solarize
    "equalization": lambda o: [T.RandomEqualize(o.get("p", 0.5))],  # PIL: ImageOps.equalize
    "random_vertical_flip": lambda o: [T.RandomVerticalFlip(o.get("p", 0.5))],
    "random_rotation": lambda o: [T.RandomApply([T.RandomRotation(o["degrees"] if "degrees" in o
                                                                  else (o.get("angle", 90), o.get("angle", 90)))],
                                                p=o.get("p", 0.5))],
    "normalize": lambda o: [T.ToTensor(), T.Normalize(o["mean"], o["std"])],
}


class Cifar10Views(torch.utils.data.Dataset):
    """CIFAR-10 binary training batches (1 label byte + 3072 bytes of R, G, B planes), two views."""
    def __init__(self, root, views):
        raw = np.concatenate([np.fromfile(os.path.join(root, f"data_batch_{i}.bin"), dtype=np.uint8)
                              for i in range(1, 6)]).reshape(-1, 3073)
        self.labels, self.views = torch.from_numpy(raw[:, 0].astype(np.int64)), views
        self.images = np.ascontiguousarray(raw[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))

    __len__ = lambda self: len(self.labels)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i])
        return self.views[0](img), self.views[1](img), self.labels[i]


class _Block(nn.Module):
    """torchvision's BasicBlock (expansion 1) or Bottleneck (expansion 4, stride on the 3x3)."""
    def __init__(self, bottleneck, inplanes, planes, stride):
        super().__init__()
        self.expansion = 4 if bottleneck else 1
        out = planes * self.expansion
        conv = lambda i, o, k, s=1: nn.Conv2d(i, o, k, stride=s, padding=k // 2, bias=False)
        if bottleneck:
            self.conv1, self.bn1 = conv(inplanes, planes, 1), nn.BatchNorm2d(planes)
            self.conv2, self.bn2 = conv(planes, planes, 3, stride), nn.BatchNorm2d(planes)
            self.conv3, self.bn3 = conv(planes, out, 1), nn.BatchNorm2d(out)
        else:
            self.conv1, self.bn1 = conv(inplanes, planes, 3, stride), nn.BatchNorm2d(planes)
            self.conv2, self.bn2 = conv(planes, planes, 3), nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(conv(inplanes, out, 1, stride), nn.BatchNorm2d(out))
                           if stride != 1 or inplanes != out else None)
        self.bottleneck = bottleneck

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        if self.bottleneck:
            y = self.bn3(self.conv3(self.relu(y)))
        return self.relu(y + identity)


class _ResNet(nn.Module):
    """torchvision.models.resnet18/34/50 (v1.5) rebuilt for machines without torchvision: the
    same module names (state dicts load either way), initialisation and forward."""
    def __init__(self, kind, zero_init_residual=False):
        super().__init__()
        bottleneck, counts = {"resnet18": (False, [2, 2, 2, 2]), "resnet34": (False, [3, 4, 6, 3]),
                              "resnet50": (True, [3, 4, 6, 3])}[kind]
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(64), nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        for i, (planes, n) in enumerate(zip([64, 128, 256, 512], counts)):
            blocks = []
            for j in range(n):
                blocks.append(_Block(bottleneck, inplanes, planes, 2 if i > 0 and j == 0 else 1))
                inplanes = planes * blocks[-1].expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, 1000)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, _Block):
                    nn.init.constant_((m.bn3 if m.bottleneck else m.bn2).weight, 0)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet(kind, zero_init_residual=False, own=False):
    """torchvision's ResNet, or this file's copy when torchvision is absent or `own`."""
    if own or torchvision is None:
        return _ResNet(kind, zero_init_residual)
    return getattr(torchvision.models, kind)(zero_init_residual=zero_init_residual)


def resnet18_cifar(stem_padding=1, own=False):
    """The CIFAR ResNet-18: a 3x3 stride-1 stem without max-pool. The recipes that follow
    solo-learn pad the stem by 2 (34x34 maps after it, ~1.2x the FLOPs of padding 1)."""
    net = resnet("resnet18", zero_init_residual=True, own=own)
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=stem_padding, bias=False)
    net.maxpool, net.fc = nn.Identity(), nn.Identity()
    return net


def backbone(spec, own=False):
    """The recipe's backbone and its feature size: the CIFAR ResNet-18, or torchvision's
    VisionTransformer (heads removed) for the ViT recipes."""
    if spec["type"] in ("resnet18", "resnet34", "resnet50") and not spec.get("cifar_stem", False):
        net = resnet(spec["type"], own=own)  # the ImageNet recipes' torchvision ResNet
        feat_dim = net.fc.in_features
        net.fc = nn.Identity()
        return net, feat_dim
    if not spec["type"].startswith("vit"):
        padding = spec.get("stem_padding", -1)
        return resnet18_cifar(1 if padding < 0 else padding, own), 512
    if torchvision is None:
        raise SystemExit(f"the ViT recipes need torchvision ({MISSING})")
    hidden, heads = {"vit_tiny": (192, 3), "vit_small": (384, 6), "vit_base": (768, 12)}[spec["type"]]
    net = torchvision.models.VisionTransformer(spec.get("image_size", 224), spec.get("patch_size", 16), 12, heads,
                                               hidden, 4 * hidden)
    net.heads = nn.Identity()
    return net, hidden


def head(spec, in_dim):
    """"a-b-c": Linear+BN+ReLU between layers, a plain Linear last (biases on)."""
    dims, layers = [in_dim] + [int(d) for d in spec["spec"].split("-")], []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers += [nn.BatchNorm1d(dims[i + 1]), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def off_diagonal(c):
    n = c.shape[0]
    return c.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def vicreg_loss(za, zb, sim, std, cov, eps=1e-4):
    n, d = za.shape
    xa, xb = za - za.mean(0), zb - zb.mean(0)
    hinge = lambda x: F.relu(1 - torch.sqrt(x.var(0) + eps)).mean()
    cov_penalty = lambda x: off_diagonal(x.T @ x / (n - 1)).pow(2).sum() / d
    return (sim * F.mse_loss(za, zb) + std * (hinge(xa) + hinge(xb)) / 2
            + cov * (cov_penalty(xa) + cov_penalty(xb)))


def barlow_twins_loss(za, zb, bn, lambd, scale):
    c = bn(za).T @ bn(zb) / za.shape[0]
    return scale * ((torch.diagonal(c) - 1).pow(2).sum() + lambd * off_diagonal(c).pow(2).sum())


def byol_loss(pa, pb, ta, tb):
    reg = lambda p, t: (2 - 2 * (F.normalize(p, dim=1) * F.normalize(t.detach(), dim=1)).sum(1)).mean()
    return reg(pa, tb) + reg(pb, ta)


class LARS(torch.optim.Optimizer):
    """LARS of the official VICReg code (1-D params excluded from decay and adaptation), plus
    solo-learn's clipping q = min(q / lr, 1) when the config sets clip, as twins' LARS does.
    Multi-tensor (torch._foreach_*, as twins' train/lars.cpp): the official per-parameter loop
    launches about a dozen kernels per parameter, which on a GPU would time Python, not PyTorch."""
    def __init__(self, params, lr, weight_decay, momentum, eta, clip):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, clip=clip))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            live = [p for p in g["params"] if p.grad is not None]
            for adapted in (True, False):
                ps = [p for p in live if (p.ndim != 1) == adapted]
                if not ps:
                    continue
                grads = [p.grad for p in ps]
                if adapted:
                    dps = torch._foreach_add(grads, ps, alpha=g["weight_decay"])
                    pn, un = torch.stack(torch._foreach_norm(ps)), torch.stack(torch._foreach_norm(dps))
                    one = torch.ones_like(pn)
                    q = torch.where(pn > 0., torch.where(un > 0, g["eta"] * pn / un, one), one)
                    if g["clip"] and g["lr"] > 0:
                        q = torch.clamp(q / g["lr"], max=1.0)
                    dps = [d.mul(s) for d, s in zip(dps, q.unbind(0))]
                else:
                    dps = grads
                mus = [self.state[p].setdefault("mu", torch.zeros_like(p)) for p in ps]
                torch._foreach_mul_(mus, g["momentum"])
                torch._foreach_add_(mus, dps)
                torch._foreach_add_(ps, mus, alpha=-g["lr"])


class Trainer:
    """twins' training step: both views through the online network, loss, LARS, EMA, probe.
    device: where it runs; bf16: autocast to bfloat16; channels_last: NHWC weights and inputs;
    compile: torch.compile of the networks (PyTorch >= 2.0), in compile_mode ("default",
    "reduce-overhead": with CUDA graphs, "max-autotune", ...)."""
    def __init__(self, cfg, batch_size, device="cpu", bf16=False, channels_last=False, compile=False,
                 compile_mode="default", own_models=False):
        self.method, model, lc, oc = cfg["method"], cfg["model"], cfg["loss"], cfg["optimizer"]
        self.device, self.bf16 = torch.device(device), bf16
        net, feat_dim = backbone(model["backbone"], own_models)
        self.online = nn.Sequential(net, head(model["projector"], feat_dim))
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.online.to(self.device, memory_format=fmt)
        out_dim = self.online[1][-1].out_features
        params = list(self.online.parameters())
        if self.method == "byol":
            self.predictor = head(model["predictor"], out_dim).to(self.device)
            params += list(self.predictor.parameters())
            self.target = copy.deepcopy(self.online).requires_grad_(False)
            self.tau = cfg["byol"]["tau_base"]
        elif self.method == "vicreg":
            self.loss = lambda a, b: vicreg_loss(a, b, lc.get("sim_coeff", 25.0), lc.get("std_coeff", 25.0),
                                                 lc.get("cov_coeff", 1.0))  # twins' defaults (losses.h)
        else:
            bn = nn.BatchNorm1d(out_dim, affine=False).to(self.device)
            self.loss = lambda a, b: barlow_twins_loss(a, b, bn, lc.get("lambda", 0.0051), lc.get("scale", 1.0))
        # The networks the step calls (compiled or not); the parameters stay those of self.online.
        self.net, self.proj = self.online[0], self.online[1]
        self.target_net = self.target if self.method == "byol" else None
        if compile:
            if not hasattr(torch, "compile"):
                raise SystemExit(f"--compile needs PyTorch >= 2.0 (this is {torch.__version__})")
            self.net, self.proj = (torch.compile(m, mode=compile_mode) for m in (self.net, self.proj))
            if self.target_net is not None:
                self.target_net = torch.compile(self.target_net, mode=compile_mode)
        lr = oc["base_lr"] * batch_size / 256
        if oc["type"] == "adamw":  # biases, norms, class token and position embedding without decay
            no_decay = {id(p) for n, p in self.online.named_parameters()
                        if n.endswith(("class_token", "pos_embedding"))}
            flat = [p for p in params if p.ndim <= 1 or id(p) in no_decay]
            rest = [p for p in params if p.ndim > 1 and id(p) not in no_decay]
            self.optimizer = torch.optim.AdamW([dict(params=rest), dict(params=flat, weight_decay=0.0)], lr=lr,
                                               betas=tuple(oc.get("betas", (0.9, 0.999))),
                                               weight_decay=oc["weight_decay"])
        else:
            self.optimizer = LARS(params, lr, oc["weight_decay"], oc["momentum"], oc["eta"], oc.get("clip", False))
        self.probe = nn.Linear(feat_dim, 10).to(self.device)
        self.probe_optimizer = torch.optim.SGD(self.probe.parameters(), lr=cfg["online_probe"]["lr"], momentum=0.9)

    def step(self, x1, x2, labels):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            feats = self.net(x1)
            z1, z2 = self.proj(feats), self.proj(self.net(x2))
            if self.method == "byol":
                with torch.no_grad():
                    t1, t2 = self.target_net(x1), self.target_net(x2)
                p1, p2 = self.predictor(z1), self.predictor(z2)
        # The losses in fp32, as twins computes them.
        if self.method == "byol":
            loss = byol_loss(p1.float(), p2.float(), t1.float(), t2.float())
        else:
            loss = self.loss(z1.float(), z2.float())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.method == "byol":
            with torch.no_grad():  # tau t + (1 - tau) o, multi-tensor as twins' (train/ssl_model.cpp)
                pairs = list(zip([*self.target.parameters(), *self.target.buffers()],
                                 [*self.online.parameters(), *self.online.buffers()]))
                ts, os_ = [t for t, _ in pairs if t.is_floating_point()], [o for t, o in pairs if t.is_floating_point()]
                if hasattr(torch, "_foreach_lerp_"):
                    torch._foreach_lerp_(ts, os_, 1 - self.tau)
                else:  # PyTorch 1.13
                    for t, o in zip(ts, os_):
                        t.lerp_(o, 1 - self.tau)
                for t, o in pairs:
                    if not t.is_floating_point():
                        t.copy_(o)
        probe_loss = F.cross_entropy(self.probe(feats.detach().float()), labels)
        self.probe_optimizer.zero_grad(set_to_none=True)
        probe_loss.backward()
        self.probe_optimizer.step()


def run_steps(trainer, batches, steps, warmup):
    """warmup + steps training steps; (seconds of the timed steps, seconds of those waiting for data)."""
    cuda = trainer.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    start = wait = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            start, wait = time.perf_counter(), 0.0
        t0 = time.perf_counter()
        x1, x2, labels = next(batches)
        x1, x2, labels = (t.to(trainer.device, non_blocking=True) for t in (x1, x2, labels))
        wait += time.perf_counter() - t0
        trainer.step(x1, x2, labels)
    sync()
    return time.perf_counter() - start, wait


def one_thread(_):
    torch.set_num_threads(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", choices=["vicreg", "barlow_twins", "byol"], required=True)
    ap.add_argument("--root", help="folder with CIFAR-10's data_batch_1..5.bin (end_to_end)")
    ap.add_argument("--batch-size", type=int, help="default: the config's train.batch_size")
    for name, default in [("--workers", 2), ("--threads", 2), ("--steps", 3), ("--warmup", 1)]:
        ap.add_argument(name, type=int, default=default)
    ap.add_argument("--mode", choices=["end_to_end", "step", "both"], default="both")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    ap.add_argument("--bf16", action="store_true", help="autocast to bfloat16")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the networks (PyTorch >= 2.0)")
    ap.add_argument("--compile-mode", default="default",
                    help="torch.compile's mode: default, reduce-overhead (CUDA graphs), max-autotune, ...")
    ap.add_argument("--own-models", action="store_true",
                    help="build the ResNets with this file's copy of torchvision's (the default without torchvision)")
    ap.add_argument("--config", help="a twins recipe (default: configs/<method>_cifar10.json); step mode only for "
                                     "recipes other than CIFAR-10's")
    args = ap.parse_args()
    if args.mode != "step" and not args.root:
        ap.error("--root is needed for end_to_end")
    if args.mode != "step" and torchvision is None:
        ap.error(f"end_to_end needs torchvision and Pillow for its views ({MISSING}); step mode runs without")
    read_json = lambda name: json.loads(Path(CONFIGS, name).read_text())
    cfg = json.loads(Path(args.config).read_text()) if args.config else read_json(f"{args.method}_cifar10.json")
    views_spec = read_json(cfg["views"]) if isinstance(cfg["views"], str) else cfg["views"]
    size = views_spec[0][0]["size"]
    batch = args.batch_size or cfg["train"]["batch_size"]
    torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision(cfg["train"].get("float32_matmul_precision", "highest"))  # as twins
    torch.manual_seed(0)
    own = args.own_models or torchvision is None
    trainer = Trainer(cfg, batch, args.device, args.bf16, args.channels_last, args.compile, args.compile_mode, own)
    if trainer.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats()
    for mode in (["step", "end_to_end"] if args.mode == "both" else [args.mode]):
        if mode == "step":
            channels = cfg["model"]["backbone"].get("in_channels", 3)
            fmt = torch.channels_last if args.channels_last else torch.contiguous_format
            x = tuple(t.to(trainer.device) for t in (torch.randn(batch, channels, size, size).to(memory_format=fmt),
                                                     torch.randn(batch, channels, size, size).to(memory_format=fmt),
                                                     torch.randint(0, 10, (batch,))))
            batches = iter(lambda: x, None)
        else:
            views = [T.Compose([t for op in v for t in VIEW_OPS[op["type"]](op)]) for v in views_spec]
            loader = torch.utils.data.DataLoader(
                Cifar10Views(args.root, views), batch_size=batch, shuffle=True, num_workers=args.workers,
                drop_last=True, persistent_workers=args.workers > 0, worker_init_fn=one_thread)
            batches = itertools.chain.from_iterable(itertools.repeat(loader))  # epoch after epoch
        seconds, wait = run_steps(trainer, batches, args.steps, args.warmup)
        extra = {"data_wait": round(wait / seconds, 4)} if mode == "end_to_end" else {}
        if trainer.device.type == "cuda":
            extra["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        extra.update(device=str(trainer.device), models="own" if own else "torchvision",
                     bf16=args.bf16, channels_last=args.channels_last,
                     compile=args.compile, **({"compile_mode": args.compile_mode} if args.compile else {}))
        print(json.dumps(dict(method=args.method, mode=mode, batch_size=batch, steps=args.steps,
                              images_per_s=round(batch * args.steps / seconds, 2), **extra,
                              threads=args.threads, workers=args.workers, torch=torch.__version__)), flush=True)


if __name__ == "__main__":
    main()
