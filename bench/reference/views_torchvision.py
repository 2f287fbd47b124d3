"""Throughput of the reference PIL + torchvision two-view augmentation pipelines.

The torchvision side of the augmentation benchmark; prints one JSON object on stdout.
  cifar: solo-learn's CIFAR recipe on CIFAR-10's binary data_batch_1.bin.
  byol:  the VICReg / Barlow Twins / BYOL ImageNet recipe on a folder of JPEGs.
Phases (each about --seconds):
  decode_images_per_s           one process, decoding only (Image.fromarray for cifar,
                                Image.open(path).convert("RGB") for byol).
  augment_views_per_s_per_core  one process, both views (ToTensor + Normalize included)
                                of samples drawn from up to 64 pre-decoded images.
  loader_views_per_s(_per_core) end to end through DataLoader(batch_size=64, shuffle,
                                num_workers=N, drop_last, persistent_workers), one torch
                                thread per worker, after 2 warm-up batches. The dataset
                                repeats its files to >= 10,000 samples per epoch so a
                                small folder's epoch-end stalls do not skew the rate.
Run with Debian's Python (it has torch), e.g.
  /usr/bin/python3 bench/reference/views_torchvision.py --pipeline byol \
      --root ../shared/data/imagewoof-320-bench/train --workers 2 --seconds 10
"""
import argparse, json, math, os, random, time

import numpy as np
import torch
import torchvision
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

BICUBIC = T.InterpolationMode.BICUBIC
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Solarization:
    """PIL ImageOps.solarize (threshold 128) with probability p."""
    def __init__(self, p):
        self.p = p

    def __call__(self, img):
        return ImageOps.solarize(img) if random.random() < self.p else img


class PilBlur:
    """The official VICReg / Barlow Twins code's blur (solo-learn's and lightly's too): PIL's
    ImageFilter.GaussianBlur with sigma uniform in [0.1, 2.0], with probability p."""
    def __init__(self, p):
        self.p = p

    def __call__(self, img):
        if random.random() < self.p:
            return img.filter(ImageFilter.GaussianBlur(random.random() * 1.9 + 0.1))
        return img


BLUR = "torchvision"  # or "pil" (--blur)


def view(size, scale, mean, std, blur_p, solarize_p):
    ops = [T.RandomResizedCrop(size, scale=scale, interpolation=BICUBIC),
           T.RandomHorizontalFlip(0.5),
           T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
           T.RandomGrayscale(0.2)]
    if blur_p is not None and BLUR == "pil":
        ops.append(PilBlur(blur_p))
    elif blur_p is not None:
        ops.append(T.RandomApply([T.GaussianBlur(kernel_size=23, sigma=(0.1, 2.0))], p=blur_p))
    ops += [Solarization(solarize_p), T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


def pipelines(name):
    if name == "cifar":
        args = (32, (0.08, 1.0), CIFAR_MEAN, CIFAR_STD)
        return view(*args, None, 0.0), view(*args, None, 0.2)
    args = (224, (0.08, 1.0), IMAGENET_MEAN, IMAGENET_STD)
    return view(*args, 1.0, 0.0), view(*args, 0.1, 0.2)


class TwoViews(torch.utils.data.Dataset):
    def __init__(self, pipeline, root, min_len=10000):
        if pipeline == "cifar":
            raw = np.fromfile(os.path.join(root, "data_batch_1.bin"), dtype=np.uint8)
            raw = raw.reshape(-1, 3073)[:, 1:].reshape(-1, 3, 32, 32)
            self.items = np.ascontiguousarray(raw.transpose(0, 2, 3, 1))  # [N,32,32,3]
        else:
            self.items = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
                                if f.lower().endswith((".jpeg", ".jpg")))
        self.n = len(self.items)
        self.length = self.n * math.ceil(min_len / self.n)
        self.t1, self.t2 = pipelines(pipeline)

    def decode(self, i):
        item = self.items[i % self.n]
        if isinstance(item, str):  # PIL closes the file once convert() has loaded it
            return Image.open(item).convert("RGB")
        return Image.fromarray(item)

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        img = self.decode(i)
        return self.t1(img), self.t2(img)


def timed(seconds, step):
    """Calls step() (returning a count) until `seconds` pass; returns count per second."""
    count, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        count += step()
    return count / elapsed


def worker_init(_):
    torch.set_num_threads(1)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pipeline", choices=["cifar", "byol"], required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--blur", choices=["torchvision", "pil"], default="torchvision",
                   help="T.GaussianBlur(23) (torchvision's recipes) or PIL's ImageFilter.GaussianBlur (the official "
                        "VICReg/Barlow Twins code, solo-learn, lightly)")
    a = p.parse_args()
    global BLUR
    BLUR = a.blur
    torch.set_num_threads(1)
    ds = TwoViews(a.pipeline, a.root)
    counter = iter(range(1 << 62))
    pool = [ds.decode(i) for i in range(min(64, ds.n))]

    def decode_one():
        ds.decode(next(counter))
        return 1

    def augment_one():
        img = random.choice(pool)
        ds.t1(img), ds.t2(img)
        return 2
    decode, augment = timed(a.seconds, decode_one), timed(a.seconds, augment_one)

    loader = torch.utils.data.DataLoader(
        ds, batch_size=64, shuffle=True, num_workers=a.workers, drop_last=True,
        persistent_workers=True, worker_init_fn=worker_init)
    batches = iter(loader)

    def next_batch():
        nonlocal batches
        try:
            v1, v2 = next(batches)
        except StopIteration:
            batches = iter(loader)
            v1, v2 = next(batches)
        return v1.shape[0] + v2.shape[0]

    next_batch(), next_batch()  # warm-up
    loader_rate = timed(a.seconds, next_batch)
    print(json.dumps({
        "pipeline": a.pipeline, "workers": a.workers,
        "decode_images_per_s": round(decode, 1),
        "augment_views_per_s_per_core": round(augment, 1),
        "loader_views_per_s": round(loader_rate, 1),
        "loader_views_per_s_per_core": round(loader_rate / a.workers, 1),
        "torch": torch.__version__, "torchvision": torchvision.__version__,
    }))


if __name__ == "__main__":
    main()
