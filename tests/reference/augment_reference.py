#!/usr/bin/env python3
"""Reference outputs of torchvision's PIL image ops, for the twins augment tests.

Writes into tests/reference/augment/:
  * input images: synthetic_gradient.png (37x29), synthetic_noise.png (32x32),
    photo_a/b/c.png (Imagewoof JPEGs downscaled to ~64 px on the shorter side with
    PIL bicubic) and photo_grey.png (photo_a in mode "L");
  * out_NNNN.png: torchvision 0.14 torchvision.transforms.functional ops applied to
    the PIL images (adjust_brightness/contrast/saturation/hue, to_grayscale,
    solarize, hflip, gaussian_blur, resized_crop, then vflip and equalize, the latter also
    on equalize_*.png, small inputs for PIL's special cases, then rotate), saved losslessly as PNG in the
    mode torchvision returns ("L" or "RGB");
  * manifest.json: one entry per case {"input", "op", "args", "output"};
  * hsv_samples.json: PIL's RGB->HSV and HSV->RGB conversions on random and edge-case
    pixels ({"rgb", "hsv", "hsv_in", "rgb_out"}).

Everything is deterministic: running it twice gives identical bytes.

Run with Debian's python3-torch / python3-torchvision / python3-pil
(scripts/setup-reference.sh), from the repository root:
    /usr/bin/python3 tests/reference/augment_reference.py
Optionally pass the Imagewoof root (default /work/shared/data/imagewoof-320-bench):
    /usr/bin/python3 tests/reference/augment_reference.py /path/to/imagewoof-320-bench
"""
import glob
import json
import os
import sys

import numpy as np
import PIL
import torch
import torchvision
import torchvision.transforms.functional as F
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(HERE, "augment")
DEFAULT_WOOF = "/work/shared/data/imagewoof-320-bench"


def save_png(img, name):
    assert img.mode in ("L", "RGB"), img.mode
    img.save(os.path.join(OUT_DIR, name), format="PNG", optimize=False)


def make_gradient():
    """37x29 smooth gradients plus saturated / grey edge-case pixels."""
    w, h = 37, 29
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 255.0 * x / (w - 1)
    g = 255.0 * y / (h - 1)
    b = 255.0 * (0.5 + 0.5 * np.sin(0.35 * x + 0.2 * y))
    a = np.stack([r, g, b], axis=-1).round().clip(0, 255).astype(np.uint8)
    # Edge cases in the first row(s): pure colours, black, white, greys, near-greys.
    specials = [
        (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255),
        (255, 0, 255), (0, 0, 0), (255, 255, 255), (128, 128, 128), (1, 1, 1),
        (254, 254, 254), (127, 127, 127), (200, 0, 0), (0, 1, 0), (255, 254, 255),
        (10, 10, 11), (255, 128, 0), (128, 0, 255), (0, 128, 255), (64, 64, 64),
        (255, 0, 1), (1, 0, 255), (3, 3, 3), (250, 250, 250),
    ]
    for i, c in enumerate(specials):
        a[i // w, i % w] = c
    # A saturated block and a grey block in the bottom-right corner.
    a[h - 4:h, w - 4:w] = (255, 0, 0)
    a[h - 4:h, w - 8:w - 4] = (77, 77, 77)
    a[h - 8:h - 4, w - 4:w] = (0, 0, 255)
    return Image.fromarray(a, "RGB")


def make_noise():
    rng = np.random.RandomState(1234)
    a = rng.randint(0, 256, size=(32, 32, 3)).astype(np.uint8)
    return Image.fromarray(a, "RGB")


def pick_photos(root):
    classes = sorted(d for d in glob.glob(os.path.join(root, "train", "*")) if os.path.isdir(d))
    assert len(classes) >= 9, f"expected Imagewoof class folders under {root}/train"
    picks = []
    for ci in (0, 4, 8):
        files = sorted(glob.glob(os.path.join(classes[ci], "*.JPEG")))
        picks.append(files[0])
    return picks


def downscale(path, short=64):
    img = Image.open(path).convert("RGB")
    w, h = img.size
    if w <= h:
        nw, nh = short, int(round(h * short / w))
    else:
        nw, nh = int(round(w * short / h)), short
    return img.resize((nw, nh), Image.BICUBIC, reducing_gap=None), os.path.relpath(path, os.path.dirname(os.path.dirname(os.path.dirname(path))))


def crop_params(w, h):
    """(top, left, height, width, out_h, out_w) cases valid for a w x h image."""
    cases = []
    # ~3x downscale.
    ch, cw = h - 3, w - 4
    cases.append((1, 2, ch, cw, round(ch / 3), round(cw / 3)))
    # ~2x upscale.
    ch, cw = h // 2, w // 2
    cases.append((h // 4, w // 5, ch, cw, 2 * ch, 2 * cw))
    # Non-uniform: shrink in x, grow in y.
    ch, cw = h // 3, w - 2
    cases.append((3, 1, ch, cw, 2 * ch + 1, cw // 2))
    # Crop touching the bottom-right border.
    ch, cw = h // 2 + 1, w // 3 + 2
    cases.append((h - ch, w - cw, ch, cw, ch + ch // 2, (3 * cw) // 4))
    # Whole image (touches all borders) to a fixed 24x24, as RandomResizedCrop would.
    cases.append((0, 0, h, w, 24, 24))
    # Identity-sized: crop size == output size, no resampling.
    ch, cw = h // 2, w // 2
    cases.append((2, 3, ch, cw, ch, cw))
    for t, l, ch, cw, oh, ow in cases:
        assert 0 <= t and 0 <= l and t + ch <= h and l + cw <= w and oh > 0 and ow > 0
    return cases


def hsv_samples():
    rng = np.random.RandomState(4321)
    rgb = rng.randint(0, 256, size=(2000, 3)).tolist()
    edge = []
    for v in (0, 1, 2, 3, 127, 128, 129, 254, 255):
        edge.append([v, v, v])
    for c in ([255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255],
              [255, 0, 255], [128, 0, 0], [0, 128, 0], [0, 0, 128], [1, 0, 0],
              [0, 1, 0], [0, 0, 1], [255, 254, 254], [254, 255, 254], [254, 254, 255],
              [255, 128, 0], [128, 255, 0], [0, 255, 128], [0, 128, 255], [128, 0, 255],
              [255, 0, 128], [255, 0, 1], [1, 0, 255], [2, 1, 0], [0, 1, 2]):
        edge.append(c)
    rgb = edge + rgb
    a = np.array(rgb, dtype=np.uint8).reshape(1, -1, 3)
    hsv = np.array(Image.fromarray(a, "RGB").convert("HSV")).reshape(-1, 3).tolist()

    hsv_in = rng.randint(0, 256, size=(2000, 3)).tolist()
    hsv_edge = []
    for h in (0, 1, 42, 43, 85, 86, 127, 128, 170, 171, 212, 213, 254, 255):
        for s, v in ((255, 255), (0, 200), (128, 128), (1, 255), (255, 1)):
            hsv_edge.append([h, s, v])
    hsv_in = hsv_edge + hsv_in
    b = np.array(hsv_in, dtype=np.uint8).reshape(1, -1, 3)
    rgb_out = np.array(Image.fromarray(b, "HSV").convert("RGB")).reshape(-1, 3).tolist()
    return {"rgb": rgb, "hsv": hsv, "hsv_in": hsv_in, "rgb_out": rgb_out}


def main():
    woof = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_WOOF
    os.makedirs(OUT_DIR, exist_ok=True)
    for f in glob.glob(os.path.join(OUT_DIR, "out_*.png")):  # (not the JPEG fixtures below)
        os.remove(f)

    inputs = {}
    inputs["synthetic_gradient.png"] = make_gradient()
    inputs["synthetic_noise.png"] = make_noise()
    sources = {}
    for name, path in zip(("photo_a.png", "photo_b.png", "photo_c.png"), pick_photos(woof)):
        img, rel = downscale(path)
        inputs[name] = img
        sources[name] = rel
    inputs["photo_grey.png"] = inputs["photo_a.png"].convert("L")
    sources["photo_grey.png"] = sources["photo_a.png"] + " (convert L)"
    for name, img in inputs.items():
        save_png(img, name)

    cases = []

    def emit(inp, op, args, out):
        assert out.mode in ("L", "RGB")
        name = f"out_{len(cases):04d}.png"
        save_png(out, name)
        cases.append({"input": inp, "op": op, "args": args, "output": name})

    interp = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}

    for inp, img in inputs.items():
        grey = img.mode == "L"
        w, h = img.size
        for f in (0.6, 1.0, 1.37):
            emit(inp, "adjust_brightness", {"factor": f}, F.adjust_brightness(img, f))
        for f in (0.6, 1.4, 0.0):
            emit(inp, "adjust_contrast", {"factor": f}, F.adjust_contrast(img, f))
        if not grey:
            for f in (0.8, 1.2, 0.0, 2.0):
                emit(inp, "adjust_saturation", {"factor": f}, F.adjust_saturation(img, f))
            for f in (-0.1, -0.03, 0.05, 0.1, 0.5, -0.5):
                emit(inp, "adjust_hue", {"hue_factor": f}, F.adjust_hue(img, f))
            for n in (1, 3):
                emit(inp, "to_grayscale", {"out_channels": n}, F.to_grayscale(img, n))
        sol = ImageOps.solarize(img, threshold=128)
        tv_sol = F.solarize(img, 128)
        assert np.array_equal(np.asarray(sol), np.asarray(tv_sol)), "solarize mismatch"
        emit(inp, "solarize", {"threshold": 128}, sol)
        emit(inp, "hflip", {}, F.hflip(img))
        blurs = [(3, 0.5), (7, 1.3)]
        blurs.append((23, 2.0) if (w > 23 and h > 23) else (9, 2.0))
        for k, s in blurs:
            emit(inp, "gaussian_blur", {"kernel_size": k, "sigma": s},
                 F.gaussian_blur(img, [k, k], [s, s]))
        for t, l, ch, cw, oh, ow in crop_params(w, h):
            for iname, imode in interp.items():
                out = F.resized_crop(img, t, l, ch, cw, [oh, ow], interpolation=imode)
                assert out.size == (ow, oh)
                emit(inp, "resized_crop",
                     {"top": t, "left": l, "height": ch, "width": cw,
                      "out_h": oh, "out_w": ow, "interpolation": iname}, out)

    # Appended after the cases above (so that their file names stay): vflip and equalize on every
    # input, and equalize on channels PIL leaves alone (one value; fewer than 255 pixels below
    # the highest value) or maps with small steps (clipped at 255).
    extra = {}
    flat = Image.new("RGB", (16, 16), (10, 200, 77))
    extra["equalize_flat.png"] = flat
    few = np.full((32, 32), 200, np.uint8)
    few.flat[:100] = 10  # 100 pixels below the highest value: step 0, left alone
    extra["equalize_few.png"] = Image.fromarray(few, "L")
    small = np.full((32, 32, 3), 250, np.uint8)
    small[:2, :, 0] = np.arange(64).reshape(2, 32) * 3  # red: 64 pixels below 250, step 0
    small[:10, :, 1] = (np.arange(320).reshape(10, 32) % 40) * 6  # 320 below in green: step 1
    small[:, :, 2] = np.arange(1024).reshape(32, 32) % 256  # blue: every value, 4 times
    extra["equalize_steps.png"] = Image.fromarray(small, "RGB")
    for name, img in extra.items():
        save_png(img, name)
    for inp, img in list(inputs.items()) + list(extra.items()):
        if inp in inputs:
            emit(inp, "vflip", {}, F.vflip(img))
        eq = ImageOps.equalize(img)
        assert np.array_equal(np.asarray(eq), np.asarray(F.equalize(img))), "equalize mismatch"
        emit(inp, "equalize", {}, eq)
    inputs.update(extra)
    # Appended after those: rotate (PIL's Image.rotate: nearest, same size, black corners) by
    # quarter turns (a transpose on squares, the affine map on the others), a half turn and
    # angles between, on the first six inputs (squares and not, RGB and L).
    for inp in list(inputs)[:6]:
        for angle in (90, 270, 180, 30, -45.5, 12.3, 200.7, -90):
            emit(inp, "rotate", {"degrees": angle}, F.rotate(inputs[inp], angle))
    # Angles within a hair of a whole or half turn (PIL's scaling branch, or a sine of 1e-15), and
    # a strip too wide for PIL's fixed-point map (its floating-point one).
    for angle in (-1e-20, 180 + 3e-14, 1e-13):
        emit("synthetic_gradient.png", "rotate", {"degrees": angle}, F.rotate(inputs["synthetic_gradient.png"], angle))
    wide = Image.fromarray((np.arange(2 * 40000) * 7 % 251).astype(np.uint8).reshape(2, 40000), "L")
    save_png(wide, "rotate_wide.png")
    inputs["rotate_wide.png"] = wide
    for angle in (30, 90, -0.001):
        emit("rotate_wide.png", "rotate", {"degrees": angle}, F.rotate(wide, angle))

    manifest = {
        "generator": "tests/reference/augment_reference.py",
        "torchvision": torchvision.__version__,
        "torch": torch.__version__,
        "pil": PIL.__version__,
        "numpy": np.__version__,
        "sources": sources,
        "inputs": {n: {"width": im.size[0], "height": im.size[1], "mode": im.mode}
                   for n, im in inputs.items()},
        "cases": cases,
    }
    with open(os.path.join(OUT_DIR, "manifest.json"), "w") as fh:
        json.dump(manifest, fh, indent=1)
        fh.write("\n")
    with open(os.path.join(OUT_DIR, "hsv_samples.json"), "w") as fh:
        s = hsv_samples()
        fh.write("{\n")
        keys = list(s)
        for i, k in enumerate(keys):
            fh.write(f' "{k}": {json.dumps(s[k], separators=(",", ":"))}')
            fh.write(",\n" if i + 1 < len(keys) else "\n")
        fh.write("}\n")
    print(f"wrote {len(inputs)} inputs and {len(cases)} cases to {OUT_DIR}")


if __name__ == "__main__":
    main()

# JPEG fixtures for tests/data (decode parity with PIL) were written once with PIL 9.4:
#   Image.open("photo_b.png").convert("RGB").save("jpeg_photo.jpg", quality=90)
#   Image.open("jpeg_photo.jpg").convert("RGB").save("jpeg_photo_decoded.png")
#   Image.open("photo_grey.png").save("jpeg_grey.jpg", quality=85)
#   Image.open("jpeg_grey.jpg").save("jpeg_grey_decoded.png")
