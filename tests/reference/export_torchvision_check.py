"""Loads a file written by `twins export` into torchvision's ResNet, with PyTorch itself.

An independent check of the export format (the `safetensors` package is not on Debian, so the
layout is read here from its specification: 8-byte little-endian header length, JSON header,
raw little-endian tensor data), run with Debian's python3-torch/torchvision:
  build/cli/twins export --backbone 'random:{"type": "resnet50"}' --out /tmp/r50.safetensors
  /usr/bin/python3 tests/reference/export_torchvision_check.py /tmp/r50.safetensors resnet50
Prints the missing and unexpected keys (expected: only fc.weight and fc.bias missing) and exits 1
otherwise.
"""
import json, struct, sys

import torch
import torchvision

DTYPES = {"F32": torch.float32, "F64": torch.float64, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8}


def load(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    out = {}
    for name, h in header.items():
        a, b = h["data_offsets"]
        out[name] = torch.frombuffer(bytearray(raw[8 + n + a:8 + n + b]), dtype=DTYPES[h["dtype"]]).reshape(h["shape"])
    return out


def main():
    path, arch = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "resnet50")
    model = getattr(torchvision.models, arch)()
    result = model.load_state_dict(load(path), strict=False)
    print("missing:", result.missing_keys, "unexpected:", result.unexpected_keys)
    model.fc = torch.nn.Identity()
    print("features:", tuple(model.eval()(torch.zeros(1, 3, 64, 64)).shape))
    sys.exit(0 if sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys else 1)


if __name__ == "__main__":
    main()
