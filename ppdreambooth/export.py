"""Export a training output for the PyTorch world.

    python -m ppdreambooth.export <output_dir> --format diffusers --out <folder>
    python -m ppdreambooth.export <output_dir> --format single-file --out <file.safetensors>
    python -m ppdreambooth.export <output_dir> --format kohya --out <file.safetensors>
    python -m ppdreambooth.export <lora output_dir> --format merged --out <folder>

- `diffusers`, full fine-tuning: a diffusers (PyTorch) pipeline folder, written by ppdiffusers'
  own `save_pretrained(to_diffusers=True)` (which transposes Linear weights to PyTorch's layout). The run
  is loaded through its family, so an SD3 folder without T5 (no text_encoder_3/tokenizer_3) exports too
  (diffusers loads such a folder with `text_encoder_3=None, tokenizer_3=None`). For SD3 the bias that
  ppdiffusers gives the transformer's parameterless adaptive norms, which diffusers has not, is first moved
  into their modulation (`fold_sd3_norm_biases`).
- `diffusers`, LoRA: `pytorch_lora_weights.safetensors` for diffusers' `load_lora_weights`: the same
  keys in PyTorch's layout (every 2-D matrix transposed). For SD3 these are
  `transformer.transformer_blocks.<n>.attn.<to_q|...|to_add_out>.lora_A/lora_B.weight`, read by
  `StableDiffusion3Pipeline.load_lora_weights`, and this same file is also the ComfyUI SD3 LoRA: in
  comfyanonymous/ComfyUI, `comfy/lora.py` (`model_lora_keys_unet`, its SD3 branch, "regular diffusers sd3 lora
  format") maps `transformer.<diffusers module>` onto its MMDiT weights through `mmdit_to_diffusers` in
  `comfy/utils.py` (to_q/to_k/to_v and add_*_proj become slices of the fused `qkv`), and `load_lora` there reads
  `<module>.lora_B.weight` (up) and `<module>.lora_A.weight` (down). Without an `.alpha` key ComfyUI applies
  the product at scale 1, which is right here: our lora_B already carries alpha/rank.
- `single-file`, full fine-tuning: one `.safetensors` in the layout of WebUI / ComfyUI checkpoints
  (`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.transformer.*`; for SDXL the
  layout of `sd_xl_base_1.0.safetensors`, with `conditioner.embedders.0/1.*`). Not written for SD3 (refused).
- `kohya`, LoRA: `lora_unet_*` / `lora_te_*` keys with `lora_down`/`lora_up` and `alpha`, the layout
  AUTOMATIC1111's WebUI and ComfyUI read. Our adapters already carry alpha/rank in lora_up, so alpha = rank.
  For SDXL the names are kohya's SDXL ones: `lora_unet_<SGM module path>`, `lora_te1_*`, `lora_te2_*`.
  Refused for SD3, pointing to `diffusers`, whose file ComfyUI loads (above).

- `merged`, LoRA: a ppdiffusers pipeline folder of the base model with the adapters folded into its weights
  (`ppdreambooth.interop.merge`): loads with plain `from_pretrained`, no LoRA loader, no peft backend, no ppdreambooth.

Formats a family cannot write are refused with its `unsupported_options["export_<format>"]` message (the
training entry refuses the same `--export_formats` before training).

The model family of a full run is read from its model_index.json. For a LoRA run (kohya only), it is
`--model_family`, else what the run's model card (README.md) records; the SDXL UNet names also need the
base model's UNet config: `--base_model`, else the card's `base_model:`.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ppdreambooth.modeling.lora import LORA_WEIGHTS_NAME
from ppdreambooth.runtime.exiting import exit_process

FORMATS = ("diffusers", "single-file", "kohya", "merged")
DIFFUSERS_LORA_NAME = "pytorch_lora_weights.safetensors"


class ExportError(ValueError):
    pass


def _load_lora(output_dir: str) -> Dict[str, np.ndarray]:
    """A run's adapters with peft names (`...lora_A.weight`), however they were written (UNets: `lora.down`)."""
    from safetensors.numpy import load_file

    from ppdreambooth.modeling.lora import to_peft_keys

    return to_peft_keys(load_file(os.path.join(output_dir, LORA_WEIGHTS_NAME)))


def _torch_layout(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Paddle stores Linear weights as [in, out], PyTorch as [out, in]."""
    return {k: np.ascontiguousarray(v.T) if v.ndim == 2 else v for k, v in state.items()}


def sd_kohya_name(component: str, module: str) -> str:
    """kohya's SD 1.x/2.x LoRA name of an adapted module: its diffusers path under `lora_unet_` / `lora_te_`."""
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    return prefixes[component] + module.replace(".", "_")


def lora_to_kohya(state: Dict[str, np.ndarray],
                  name_of: Callable[[str, str], str] = sd_kohya_name) -> Dict[str, np.ndarray]:
    """`unet.<module>.lora_A.weight` -> `<name_of(unet, module)>.lora_down.weight` (+ `.alpha`).

    `name_of(component, module)` gives the kohya name of a module (default: SD 1.x/2.x names)."""
    out = {}
    for key, value in _torch_layout(state).items():
        component, rest = key.split(".", 1)
        module, kind = rest.rsplit(".lora_", 1)
        name = name_of(component, module)
        out[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value
        if kind.startswith("A"):
            out[f"{name}.alpha"] = np.asarray(value.shape[0], dtype=np.float32)  # rank: scale 1
    return out


def read_model_card(output_dir: str) -> Dict[str, str]:
    """What a run's model card records: `base_model` and `model_family` (each absent when not found)."""
    path = os.path.join(output_dir, "README.md")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        text = f.read()
    found = {}
    base = re.search(r"^base_model: (.+)$", text, re.MULTILINE)
    if base:
        found["base_model"] = base.group(1).strip()
    family = re.search(r"\(model family `([\w-]+)`", text)
    if family:
        found["model_family"] = family.group(1)
    return found


def lora_family(output_dir: str, model_family: Optional[str] = None, base_model: Optional[str] = None):
    """The model family of a LoRA run: `model_family` if given, else the model card's record of it, else the
    family of the base model (`base_model`, else the card's)."""
    from ppdreambooth.errors import ConfigError
    from ppdreambooth.families import detect_family, get_family

    card = read_model_card(output_dir)
    base_model = base_model or card.get("base_model")
    try:
        if model_family or card.get("model_family"):
            return get_family(model_family or card["model_family"])
        if base_model:
            return detect_family(base_model)
    except ConfigError as e:
        raise ExportError(f"{e} (for the LoRA run in {output_dir}: pass --model_family sd|sdxl|sd3)") from e
    raise ExportError(f"cannot tell which model family the LoRA run in {output_dir} was trained on (no model "
                      "card); pass --model_family sd|sdxl|sd3.")


def base_unet_config(output_dir: str, base_model: Optional[str] = None) -> dict:
    """The UNet config of a LoRA run's base model: `base_model` if given, else the model card's."""
    from ppdiffusers import UNet2DConditionModel

    base_model = base_model or read_model_card(output_dir).get("base_model")
    if not base_model:
        raise ExportError(f"the LoRA run in {output_dir} names no base model (no model card); pass --base_model.")
    try:
        return dict(UNet2DConditionModel.load_config(base_model, subfolder="unet"))
    except Exception as e:  # missing folder, offline hub id: say which and what to do
        raise ExportError(f"cannot read the UNet config of the base model {base_model} ({e}); pass --base_model "
                          "with a local copy of it.") from e


def _sdxl_kohya_names(output_dir: str, base_model: Optional[str]) -> Callable[[str, str], str]:
    from ppdreambooth.interop.keymaps_sdxl import kohya_lora_name

    config = base_unet_config(output_dir, base_model)
    return lambda component, module: kohya_lora_name(component, module, config)


# family -> (output_dir, base_model) -> its kohya naming of adapted modules
KOHYA_NAMINGS = {"sd": lambda output_dir, base_model: sd_kohya_name, "sdxl": _sdxl_kohya_names}


def kohya_names(output_dir: str, model_family: Optional[str] = None,
                base_model: Optional[str] = None) -> Callable[[str, str], str]:
    """The kohya LoRA naming of a LoRA run's family (SDXL's depends on the base model's UNet config)."""
    family = lora_family(output_dir, model_family, base_model)
    refuse_unsupported(family, "kohya")
    if family.name not in KOHYA_NAMINGS:
        raise ExportError(f"--format kohya has no naming for model family {family.name}.")
    return KOHYA_NAMINGS[family.name](output_dir, base_model)


def fold_sd3_norm_biases(pipeline) -> None:
    """Move the bias of each parameterless SD3 `AdaLayerNormContinuous` norm into its modulation, where diffusers
    keeps it.

    ppdiffusers 0.29 gives these LayerNorms (`elementwise_affine=False`: the transformer's `norm_out` and the last
    block's `norm1_context`) a trainable bias, zero at first, which diffusers' layer (and the original MMDiT) has
    not: diffusers drops it on loading, so a trained one would be lost. The layer computes
    `(norm(x) + b) * (1 + scale) + shift` with `[scale, shift] = W e + c` (`e` = silu of the conditioning). That
    is `norm(x) * (1 + scale) + shift'` with `shift' = shift + b + b * scale`, still linear in `e`: adding
    `b * W_scale` to `W_shift` and `b + b * c_scale` to `c_shift` gives the same output with `b` = 0."""
    import paddle
    from ppdiffusers.models.normalization import AdaLayerNormContinuous

    for name, layer in pipeline.transformer.named_sublayers():
        if not isinstance(layer, AdaLayerNormContinuous) or not isinstance(layer.norm, paddle.nn.LayerNorm):
            continue
        bias = layer.norm.bias
        if layer.norm.weight is not None or bias is None:  # diffusers has the same parameters
            continue
        weight, linear_bias = layer.linear.weight, layer.linear.bias  # Paddle layout: [in, scale | shift]
        if linear_bias is None:
            raise ExportError(f"cannot move the norm bias of {name} into a modulation without a bias.")
        width = bias.shape[0]
        with paddle.no_grad():
            weight.set_value(paddle.concat([weight[:, :width], weight[:, width:] + weight[:, :width] * bias], axis=1))
            linear_bias.set_value(paddle.concat([linear_bias[:width],
                                                 linear_bias[width:] + bias + bias * linear_bias[:width]]))
            bias.set_value(paddle.zeros_like(bias))


# family -> what its in-memory pipeline needs before ppdiffusers writes it in diffusers' layout
DIFFUSERS_PREPARATIONS = {"sd3": fold_sd3_norm_biases}


def refuse_unsupported(family, fmt: str) -> None:
    """Raise the family's own message when it cannot be exported in `fmt` (e.g. SD3 single files)."""
    message = family.unsupported_options.get(f"export_{fmt}")
    if message:
        raise ExportError(f"--format {fmt}: {message}")


def export(output_dir: str, fmt: str, out: str, model_family: Optional[str] = None,
           base_model: Optional[str] = None) -> List[str]:
    """Write `output_dir` (a finished full or LoRA run) in `fmt` to `out`; returns the files written.

    `model_family` and `base_model` override what a LoRA run's model card says (used by `kohya` only)."""
    from safetensors.numpy import save_file

    from ppdreambooth.families import detect_family

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
        from ppdreambooth.interop.single_file import write_single_file

        family = detect_family(output_dir)
        refuse_unsupported(family, fmt)
        path = out if out.endswith(".safetensors") else os.path.join(out, "model.safetensors")
        return [write_single_file(output_dir, path, family)]
    if fmt == "merged":
        if not is_lora:
            raise ExportError("--format merged folds LoRA adapters into the base model; this run is a full "
                              "fine-tune already (its output folder loads as it is).")
        from ppdreambooth.interop.merge import write_merged

        family = lora_family(output_dir, model_family, base_model)
        base = base_model or read_model_card(output_dir).get("base_model")
        if not base:
            raise ExportError(f"{output_dir} has no model card naming its base model; pass --base_model.")
        return write_merged(_load_lora(output_dir), base, family, out)
    if fmt == "kohya":
        if not is_lora:
            raise ExportError("--format kohya writes LoRA adapters; this run is a full fine-tune (use diffusers).")
        names = kohya_names(output_dir, model_family, base_model)  # refuses families without a kohya layout
        path = out if out.endswith(".safetensors") else os.path.join(out, "lora_kohya.safetensors")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_file(lora_to_kohya(_load_lora(output_dir), names), path + ".tmp", metadata={"format": "pt"})
        os.replace(path + ".tmp", path)
        return [path]
    os.makedirs(out, exist_ok=True)
    if is_lora:
        path = os.path.join(out, DIFFUSERS_LORA_NAME)
        save_file(_torch_layout(_load_lora(output_dir)), path + ".tmp", metadata={"format": "pt"})
        os.replace(path + ".tmp", path)
        return [path]
    # The family's loader, not DiffusionPipeline's: it passes the components a folder may lack (SD3's T5).
    family = detect_family(output_dir)
    pipeline = family.load_pipeline(output_dir)
    if family.name in DIFFUSERS_PREPARATIONS:
        DIFFUSERS_PREPARATIONS[family.name](pipeline)
    pipeline.save_pretrained(out, to_diffusers=True)
    return [os.path.join(out, name) for name in sorted(os.listdir(out))]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="ppdreambooth.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="a finished training output_dir")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="destination folder (or .safetensors file for kohya)")
    parser.add_argument("--model_family", default=None,
                        help="LoRA runs: the base model's family, sd, sdxl or sd3 (default: what the run's model "
                             "card records)")
    parser.add_argument("--base_model", default=None,
                        help="LoRA runs: the base model folder or hub id (default: the model card's base_model); "
                             "SDXL kohya names follow its UNet config")
    args = parser.parse_args(argv)
    from ppdreambooth.errors import ConfigError

    try:
        files = export(args.output_dir, args.format, args.out, args.model_family, args.base_model)
    except (ExportError, ConfigError) as e:
        print(f"ppdreambooth: error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.output_dir} as {args.format}: {', '.join(files)}")
    return 0


def cli() -> None:
    exit_process(main())


if __name__ == "__main__":
    cli()
