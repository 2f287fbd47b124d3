#!/usr/bin/env python3
"""torchvision's ResNet state_dict names and shapes, for tests/models.

Writes tests/reference/<arch>_state.txt: one line per entry, "name dim0,dim1,...", in
state_dict order (num_batches_tracked is a 0-d buffer: empty shape), then a last line
"#parameters N" with the parameter count including fc.

    /usr/bin/python3 tests/reference/torchvision_resnets.py tests/reference
"""
import os
import sys

import torchvision


def main(out_dir):
    for arch in ["resnet18", "resnet50"]:
        model = getattr(torchvision.models, arch)()
        lines = [f"{k} {','.join(str(s) for s in v.shape)}" for k, v in model.state_dict().items()]
        n = sum(p.numel() for p in model.parameters())
        lines.append(f"#parameters {n}")
        with open(os.path.join(out_dir, f"{arch}_state.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(__file__))
