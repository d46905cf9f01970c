"""Load a ppdiffusers network from one Paddle-layout safetensors file tensor by tensor: one copy of the weights.

ppdiffusers 0.29's `from_pretrained(low_cpu_mem_usage=True)` builds the network without weights, then reads every
tensor of the memory-mapped file (its pages stay resident while the file is open) and copies it into the network:
twice the weights resident at the peak (SD 1.5's UNet 6.9 GiB for 3.2 GiB of weights; SDXL's 2.6 B-parameter UNet
would reach 19 GiB). Here the network is built the same way (no weights: `paddle.LazyGuard` + ppdiffusers'
`no_init_weights`) and each parameter is filled from a plain read of its bytes (no mapping), one tensor in memory
at a time. The safetensors format is an 8-byte header length, a JSON header of name -> dtype, shape and byte
offsets, then the data; the safetensors package only reads through a mapping, hence the few lines here. Only for the simple case, a folder with a single
`diffusion_paddle_model.safetensors` whose names are exactly the network's; anything else (shards, PyTorch layout,
older attention names that ppdiffusers renames) returns None and the caller uses `from_pretrained`.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Optional

PADDLE_WEIGHTS = "diffusion_paddle_model.safetensors"
DTYPES = {"F32": "float32", "F16": "float16", "F64": "float64"}  # bfloat16 goes through from_pretrained


def load_streamed(model_class, folder: str):
    """`model_class` built from `folder`'s config and weights, or None when the folder is not the simple case."""
    import numpy as np
    import paddle
    from ppdiffusers.utils.paddle_utils import no_init_weights

    path = os.path.join(folder, PADDLE_WEIGHTS)
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        start = 8 + length
        if header.pop("__metadata__", {}).get("format", "pd") not in ("pd", "np") or any(
                entry["dtype"] not in DTYPES for entry in header.values()):
            return None
        config = model_class.load_config(folder)
        with no_init_weights(_enable=True), paddle.LazyGuard():
            model = model_class.from_config(config)
        state = model.state_dict()
        if set(header) != set(state):
            return None  # renamed or missing weights: ppdiffusers' own loader converts or reports them
        with paddle.no_grad():
            for name, target in state.items():
                entry = header[name]
                begin, end = entry["data_offsets"]
                array = np.empty(entry["shape"], dtype=DTYPES[entry["dtype"]])
                f.seek(start + begin)
                if f.readinto(memoryview(array).cast("B")) != end - begin:
                    raise OSError(f"{path} is shorter than its header says (cut short?)")
                value = paddle.Tensor(array, zero_copy=True)
                target.copy_(value if value.dtype == target.dtype else value.cast(target.dtype), False)
                del value, array
    for param in model.parameters():
        param.stop_gradient = False  # as the stock load leaves them; the DreamBoothModel freezes the others
    model.eval()
    return model


def load_network(model_class, path: str, subfolder: str, options: dict):
    """`model_class.from_pretrained(path, subfolder=..., **options)`, streamed when the folder allows it."""
    folder = os.path.join(path, subfolder)
    streamed: Optional[object] = None
    if os.path.isdir(folder) and not options.get("from_diffusers") and not options.get("revision"):
        streamed = load_streamed(model_class, folder)
    if streamed is not None:
        return streamed
    return model_class.from_pretrained(path, subfolder=subfolder, **options)
