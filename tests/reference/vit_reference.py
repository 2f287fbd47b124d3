#!/usr/bin/env python3
"""Golden values for the ViT backbone: torchvision's own VisionTransformer (torchvision 0.14,
torch 1.13 from Debian), a tiny configuration in float64.

    /usr/bin/python3 tests/reference/vit_reference.py tests/reference

writes two files into the given directory:

vit_tiny.safetensors
    The model's state_dict without the ``heads.*`` entries, every tensor F64, contiguous,
    row-major, no ``__metadata__`` -- a plain torchvision export as a user would write it. The
    file is written by hand (the safetensors package is not needed).

vit_golden.json
    config        the VisionTransformer constructor arguments
    input         x, torch.manual_seed(1); randn(2, 3, 16, 16) float64, flattened
    input_shape   [2, 3, 16, 16]
    cls           (2, 16) class token after encoder.ln (the model with heads = Identity)
    mean          (2, 16) mean of the 16 patch tokens (class token excluded) after encoder.ln
    input_24      x2, torch.manual_seed(2); randn(2, 3, 24, 24) float64, flattened
    pos_24        (1, 37, 16) flattened: encoder.pos_embedding with its 4x4 patch grid resized
                  to 6x6 by F.interpolate(mode="bicubic", align_corners=False); the class-token
                  position (index 0) is kept and put in front
    cls_24        (2, 16) class-token features of x2 with pos_24
    input_16x24   x3, randn(1, 3, 16, 24) float64 drawn right after x2 (same seed-2 stream),
                  flattened
    pos_16x24     (1, 25, 16) flattened: as pos_24, grid 4x4 -> 4x6
    cls_16x24     (1, 16) class-token features of x3 with pos_16x24
    pos_24_torchvision_interpolate_embeddings
                  (1, 37, 16) flattened, for documentation only: what torchvision's own
                  ``interpolate_embeddings(24, 4, state)`` gives -- note it uses
                  align_corners=True, unlike pos_24
    state         [[name, shape], ...] of the exported state_dict, in state_dict order

Parameters: torch.manual_seed(0), the model is built (torchvision's init, in float32), converted
with .double(), eval mode, and then every parameter, in ``model.parameters()`` order, gets
``p += 0.02 * randn_like(p)`` (float64) so that zero- or one-initialised tensors (class_token,
biases, LayerNorm weights, heads) are non-trivial.

Forward at other resolutions: VisionTransformer._process_input asserts h == w == image_size, so
for 24x24 and 16x24 the same steps are done by hand (conv_proj, reshape to (n, hidden,
n_h * n_w), permute to (n, tokens, hidden)), then class token in front, + pos, the encoder
layers, encoder.ln. At 16x16 this hand-written path is checked to equal model.encoder exactly.

All forwards run under torch.no_grad() in eval mode (nn.MultiheadAttention then takes its native
fast path in torch 1.13); the script checks that the slow Python path and a from-scratch
implementation agree to 1e-12, and that the written file loads back into a fresh torchvision
model (strict=False, only heads.* missing) and reproduces "cls" exactly.
"""
import json
import math
import os
import struct
import sys
from collections import OrderedDict

import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.vision_transformer import VisionTransformer, interpolate_embeddings

CONFIG = OrderedDict(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16,
                     mlp_dim=32, num_classes=10)
DTYPE = torch.float64


def build_model():
    torch.manual_seed(0)
    model = VisionTransformer(**CONFIG)  # dropout = attention_dropout = 0 by default
    model = model.double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def patchify(model, x):
    """VisionTransformer._process_input without its image-size assertion."""
    n, _, h, w = x.shape
    p = model.patch_size
    y = model.conv_proj(x)
    y = y.reshape(n, model.hidden_dim, (h // p) * (w // p))
    return y.permute(0, 2, 1)


def with_class_token(model, tokens):
    return torch.cat([model.class_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)


def encode(model, x, pos):
    """Encoder.forward with an explicit position embedding (dropout is identity in eval)."""
    y = with_class_token(model, patchify(model, x)) + pos
    for layer in model.encoder.layers:
        y = layer(y)
    return model.encoder.ln(y)


def resize_pos(pos, grid, new_grid):
    """Keep pos[:, :1]; resize the (1, gh*gw, D) patch part bicubically, align_corners=False."""
    d = pos.shape[-1]
    img = pos[:, 1:, :].reshape(1, grid[0], grid[1], d).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=new_grid, mode="bicubic", align_corners=False)
    img = img.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], d)
    return torch.cat([pos[:, :1, :], img], dim=1)


def manual_forward(state, x, pos, cfg):
    """From-scratch ViT forward on a state dict, to confirm what torchvision computes."""
    eps, heads, dim = 1e-6, cfg["num_heads"], cfg["hidden_dim"]
    p = cfg["patch_size"]
    n, _, h, w = x.shape
    t = F.conv2d(x, state["conv_proj.weight"], state["conv_proj.bias"], stride=p)
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([state["class_token"].expand(n, -1, -1), t], dim=1) + pos

    def ln(v, pre):
        return F.layer_norm(v, (dim,), state[pre + ".weight"], state[pre + ".bias"], eps)

    for i in range(cfg["num_layers"]):
        pre = f"encoder.layers.encoder_layer_{i}."
        a = ln(t, pre + "ln_1")
        qkv = a @ state[pre + "self_attention.in_proj_weight"].T + state[pre + "self_attention.in_proj_bias"]
        q, k, v = qkv.chunk(3, dim=-1)
        s = t.shape[1]
        hd = dim // heads
        q, k, v = (z.reshape(n, s, heads, hd).transpose(1, 2) for z in (q, k, v))
        att = torch.softmax((q / math.sqrt(hd)) @ k.transpose(-2, -1), dim=-1)
        o = (att @ v).transpose(1, 2).reshape(n, s, dim)
        o = o @ state[pre + "self_attention.out_proj.weight"].T + state[pre + "self_attention.out_proj.bias"]
        t = t + o
        m = ln(t, pre + "ln_2")
        m = m @ state[pre + "mlp.0.weight"].T + state[pre + "mlp.0.bias"]
        m = 0.5 * m * (1.0 + torch.erf(m / math.sqrt(2.0)))  # exact GELU
        m = m @ state[pre + "mlp.3.weight"].T + state[pre + "mlp.3.bias"]
        t = t + m
    return ln(t, "encoder.ln")


def write_safetensors(path, tensors):
    header, blobs, offset = OrderedDict(), [], 0
    for name, t in tensors.items():
        t = t.detach().to(DTYPE).contiguous().cpu()
        data = struct.pack("<%dd" % t.numel(), *t.flatten().tolist())
        header[name] = {"dtype": "F64", "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * ((-len(text)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def read_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    header.pop("__metadata__", None)
    body = raw[8 + n:]
    out = OrderedDict()
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        assert info["dtype"] == "F64", name
        b, e = info["data_offsets"]
        vals = struct.unpack("<%dd" % ((e - b) // 8), body[b:e])
        out[name] = torch.tensor(vals, dtype=DTYPE).reshape(info["shape"])
    return out


def flat(t):
    return t.detach().flatten().tolist()


def main():
    outdir = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
    model = build_model()
    state = OrderedDict((k, v) for k, v in model.state_dict().items() if not k.startswith("heads."))
    st_path = os.path.join(outdir, "vit_tiny.safetensors")
    write_safetensors(st_path, state)

    torch.manual_seed(1)
    x = torch.randn(2, 3, 16, 16, dtype=DTYPE)
    torch.manual_seed(2)
    x24 = torch.randn(2, 3, 24, 24, dtype=DTYPE)
    x16x24 = torch.randn(1, 3, 16, 24, dtype=DTYPE)

    pos = model.encoder.pos_embedding
    with torch.no_grad():
        # Native resolution through torchvision's own modules.
        tokens = with_class_token(model, model._process_input(x))
        out = model.encoder(tokens)
        cls = out[:, 0]
        mean = out[:, 1:].mean(dim=1)
        assert torch.equal(encode(model, x, pos), out)
        heads = model.heads
        model.heads = torch.nn.Identity()
        assert torch.equal(model(x), cls)
        model.heads = heads

        pos_24 = resize_pos(pos, (4, 4), (6, 6))
        out_24 = encode(model, x24, pos_24)
        pos_16x24 = resize_pos(pos, (4, 4), (4, 6))
        out_16x24 = encode(model, x16x24, pos_16x24)
        # Resizing to the same grid must be the identity.
        assert torch.allclose(resize_pos(pos, (4, 4), (4, 4)), pos, rtol=0, atol=1e-14)

        tv_state = interpolate_embeddings(24, 4, OrderedDict(state))
        pos_24_tv = tv_state["encoder.pos_embedding"]
        assert pos_24_tv.shape == (1, 37, 16)

    # The fast path (no_grad, eval) against the slow Python MHA path and a from-scratch forward.
    slow = model.encoder(tokens)  # grad enabled -> nn.MultiheadAttention's Python path
    assert torch.allclose(slow.detach(), out, rtol=0, atol=1e-12)
    sd = {k: v.detach() for k, v in state.items()}
    with torch.no_grad():
        for inp, p_, ref in ((x, pos, out), (x24, pos_24, out_24), (x16x24, pos_16x24, out_16x24)):
            assert torch.allclose(manual_forward(sd, inp, p_, CONFIG), ref, rtol=0, atol=1e-12)

    # Reload the written file into a fresh torchvision model.
    loaded = read_safetensors(st_path)
    assert list(loaded.keys()) == list(state.keys())
    fresh = VisionTransformer(**CONFIG).double().eval()
    result = fresh.load_state_dict(loaded, strict=False)
    assert sorted(result.missing_keys) == ["heads.head.bias", "heads.head.weight"], result
    assert not result.unexpected_keys, result
    fresh.heads = torch.nn.Identity()
    with torch.no_grad():
        assert torch.equal(fresh(x), cls)

    golden = OrderedDict()
    golden["config"] = CONFIG
    golden["torch_version"] = torch.__version__
    golden["torchvision_version"] = torchvision.__version__
    golden["input"] = flat(x)
    golden["input_shape"] = list(x.shape)
    golden["cls"] = cls.tolist()
    golden["mean"] = mean.tolist()
    golden["input_24"] = flat(x24)
    golden["input_24_shape"] = list(x24.shape)
    golden["pos_24"] = flat(pos_24)
    golden["pos_24_shape"] = list(pos_24.shape)
    golden["cls_24"] = out_24[:, 0].tolist()
    golden["input_16x24"] = flat(x16x24)
    golden["input_16x24_shape"] = list(x16x24.shape)
    golden["pos_16x24"] = flat(pos_16x24)
    golden["pos_16x24_shape"] = list(pos_16x24.shape)
    golden["cls_16x24"] = out_16x24[:, 0].tolist()
    golden["pos_24_torchvision_interpolate_embeddings"] = flat(pos_24_tv)
    golden["state"] = [[k, list(v.shape)] for k, v in state.items()]
    with open(os.path.join(outdir, "vit_golden.json"), "w") as f:
        json.dump(golden, f)
        f.write("\n")


if __name__ == "__main__":
    main()
