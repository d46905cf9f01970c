"""Export a training output for the PyTorch world.

    python -m ppdreambooth.export <output_dir> --format diffusers --out <folder>
    python -m ppdreambooth.export <output_dir> --format single-file --out <file.safetensors>
    python -m ppdreambooth.export <output_dir> --format kohya --out <file.safetensors>

- `diffusers`, full fine-tuning: a diffusers (PyTorch) pipeline folder, written by ppdiffusers'
  own `save_pretrained(to_diffusers=True)` (which transposes Linear weights to PyTorch's layout).
- `diffusers`, LoRA: `pytorch_lora_weights.safetensors` for diffusers' `load_lora_weights`: the same
  keys in PyTorch's layout (every 2-D matrix transposed).
- `single-file`, full fine-tuning: one `.safetensors` in the layout of WebUI / ComfyUI checkpoints
  (`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.transformer.*`).
- `kohya`, LoRA: `lora_unet_*` / `lora_te_*` keys with `lora_down`/`lora_up` and `alpha`, the layout
  AUTOMATIC1111's WebUI and ComfyUI read. Our adapters already carry alpha/rank in lora_up, so alpha = rank.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np

from . import compat  # noqa: F401
from .lora import LORA_WEIGHTS_NAME

FORMATS = ("diffusers", "single-file", "kohya")
DIFFUSERS_LORA_NAME = "pytorch_lora_weights.safetensors"


class ExportError(ValueError):
    pass


def _load_lora(output_dir: str) -> Dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(os.path.join(output_dir, LORA_WEIGHTS_NAME))


def _torch_layout(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Paddle stores Linear weights as [in, out], PyTorch as [out, in]."""
    return {k: np.ascontiguousarray(v.T) if v.ndim == 2 else v for k, v in state.items()}


def lora_to_kohya(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """`unet.<module>.lora_A.weight` -> `lora_unet_<module with _>.lora_down.weight` (+ `.alpha`)."""
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    out = {}
    for key, value in _torch_layout(state).items():
        component, rest = key.split(".", 1)
        module, kind = rest.rsplit(".lora_", 1)
        name = prefixes[component] + module.replace(".", "_")
        out[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value
        if kind.startswith("A"):
            out[f"{name}.alpha"] = np.asarray(value.shape[0], dtype=np.float32)  # rank: scale 1
    return out


def export(output_dir: str, fmt: str, out: str) -> List[str]:
    """Write `output_dir` (a finished full or LoRA run) in `fmt` to `out`; returns the files written."""
    from safetensors.numpy import save_file

    is_lora = os.path.isfile(os.path.join(output_dir, LORA_WEIGHTS_NAME))
    is_full = os.path.isfile(os.path.join(output_dir, "model_index.json"))
    if not (is_lora or is_full):
        raise ExportError(f"{output_dir} holds no finished run (no model_index.json or {LORA_WEIGHTS_NAME}).")
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}.")
    if fmt == "single-file":
        if not is_full:
            raise ExportError("--format single-file writes a full model; this run trained LoRA adapters "
                              "(use kohya or diffusers).")
        from .single_file import write_single_file

        path = out if out.endswith(".safetensors") else os.path.join(out, "model.safetensors")
        return [write_single_file(output_dir, path)]
    if fmt == "kohya":
        if not is_lora:
            raise ExportError("--format kohya writes LoRA adapters; this run is a full fine-tune (use diffusers).")
        path = out if out.endswith(".safetensors") else os.path.join(out, "lora_kohya.safetensors")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_file(lora_to_kohya(_load_lora(output_dir)), path + ".tmp", metadata={"format": "pt"})
        os.replace(path + ".tmp", path)
        return [path]
    os.makedirs(out, exist_ok=True)
    if is_lora:
        path = os.path.join(out, DIFFUSERS_LORA_NAME)
        save_file(_torch_layout(_load_lora(output_dir)), path + ".tmp", metadata={"format": "pt"})
        os.replace(path + ".tmp", path)
        return [path]
    from ppdiffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(output_dir)
    pipeline.save_pretrained(out, to_diffusers=True)
    return [os.path.join(out, name) for name in sorted(os.listdir(out))]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="ppdreambooth.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="a finished training output_dir")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="destination folder (or .safetensors file for kohya)")
    args = parser.parse_args(argv)
    try:
        files = export(args.output_dir, args.format, args.out)
    except ExportError as e:
        print(f"ppdreambooth: error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.output_dir} as {args.format}: {', '.join(files)}")
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
