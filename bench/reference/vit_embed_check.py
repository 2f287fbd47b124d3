#!/usr/bin/env python3
"""`twins embed` on a torchvision ViT against torchvision itself, on real image files.

Builds a small torchvision VisionTransformer (224 px, patch 16, 2 blocks, 128 wide: 2 heads, the
standard family's hidden / 64), saves its weights as safetensors without any twins metadata (as a
user exporting from PyTorch would; the format is written from its specification, the
`safetensors` package not being on Debian), runs `twins embed` on a folder of images, and
computes the same features in PyTorch: PIL RGB, Resize(256), CenterCrop(224), ToTensor,
Normalize(ImageNet), the class token after encoder.ln. Prints the largest absolute difference and
the smallest cosine similarity per image; exits 1 if any cosine < 0.9999.
Run with Debian's python3-torch/torchvision (scripts/setup-reference.sh):
  /usr/bin/python3 bench/reference/vit_embed_check.py build/cli/twins <image folder>
"""
import json, os, struct, subprocess, sys, tempfile

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision import transforms as T


def save_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        data = t.detach().contiguous().to(torch.float32).numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def main(twins, folder):
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(224, 16, 2, 2, 128, 512).eval()
    with torch.no_grad():
        for p in model.parameters():  # make the zero-initialised class token and biases matter
            p.add_(0.02 * torch.randn_like(p))
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "vit.safetensors")
        save_safetensors(weights, {k: v for k, v in model.state_dict().items() if not k.startswith("heads.")})
        out = os.path.join(tmp, "emb.npy")
        subprocess.run([twins, "embed", "--backbone", weights, "--input", folder, "--output", out], check=True,
                       stdout=subprocess.DEVNULL)
        ours = np.load(out)
        ids = open(os.path.join(tmp, "emb.ids.txt")).read().split()
    model.heads = torch.nn.Identity()
    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    worst_diff, worst_cos = 0.0, 1.0
    for row, name in zip(ours, ids):
        path = name if os.path.isabs(name) else os.path.join(folder, name)
        img = Image.open(path).convert("RGB")
        with torch.no_grad():
            ref = model(tf(img).unsqueeze(0))[0].numpy()
        cos = float(np.dot(row, ref) / (np.linalg.norm(row) * np.linalg.norm(ref)))
        diff = float(np.abs(row - ref).max())
        print(f"{os.path.basename(path)} {img.size[0]}x{img.size[1]}: cosine {cos:.6f}, max |diff| {diff:.2e}")
        worst_diff, worst_cos = max(worst_diff, diff), min(worst_cos, cos)
    print(f"{len(ids)} images: smallest cosine {worst_cos:.6f}, largest |diff| {worst_diff:.2e}")
    sys.exit(0 if worst_cos >= 0.9999 else 1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
