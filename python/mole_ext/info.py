"""``python -m mole_ext.info``: what was built (versions, CUDA archs, backends per op)."""

from __future__ import annotations

import json
import os

import torch


def build_info() -> dict:
    path = os.path.join(os.path.dirname(__file__), "_build_info.json")
    info = {}
    if os.path.exists(path):
        with open(path) as f:
            info = json.load(f)
    from . import _C, ops

    info["compiled_with_cuda"] = _C.compiled_with_cuda()
    info["runtime_torch"] = torch.__version__
    info["cuda_available"] = torch.cuda.is_available()
    info["cuda_backend"] = ops.cuda_backend()
    info["cuda_validate"] = ops.cuda_validate()
    return info


def main():
    info = build_info()
    width = max(len(k) for k in info)
    for k, v in info.items():
        if k == "cuda_backend":
            print(f"{k:<{width}}  " + ", ".join(f"{op}={how}" for op, how in v.items()))
        else:
            print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
