"""Export a training output for the PyTorch world.

    python -m ppdreambooth.export <output_dir> --format diffusers --out <folder>
    python -m ppdreambooth.export <output_dir> --format single-file --out <file.safetensors>
    python -m ppdreambooth.export <output_dir> --format kohya --out <file.safetensors>
    python -m ppdreambooth.export <lora output_dir> --format merged --out <folder>
    python -m ppdreambooth.export <full or lora output_dir> --format lora --rank 8 --out <folder>

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

- `lora`, full fine-tuning: a LoRA of rank `--rank` extracted from the run: per adapted module (the family's LoRA
  targets), the truncated SVD of its weight's change against the base model (`--base_model`, else the card's),
  both factors clamped at the `--clamp_quantile` quantile (0.99); a text encoder whose largest change is at most
  `--min_diff` (0.01) counts as unchanged and is skipped. LoRA runs: the adapters resized to `--rank` (no larger
  than theirs) by the SVD of each A @ B. Either way the folder is an ordinary LoRA run's output (our file and a model
  card), so every format above and `generate --lora` read it. Prints modules, parameters, file size and the
  relative Frobenius error. `--conv_rank` is refused (our LoRA file has no convolution adapters).

DoRA runs (`--lora_type dora`): `diffusers` carries each magnitude as `<module>.lora_magnitude_vector` (text
encoders: `...lora_magnitude_vector.weight`, the name transformers 5 loads), which diffusers loads through PEFT's
DoRA; `kohya` adds `<name>.dora_scale` shaped [out, 1] (LyCORIS's per-output `wd_on_out` layout; see the README
for which readers compute it exactly); `merged` bakes W' = m (W + BA) / ||W + BA|| into the weights.

LoHa / LoKr runs (`--lora_type loha|lokr`): `kohya` writes the LyCORIS layout (`lora_unet_*.hada_w1_a` ...,
`.lokr_w1` ..., `.alpha`) that ComfyUI and WebUI read (SD and SDXL); `merged` folds W + ΔW into the weights;
`diffusers` is refused (diffusers cannot load LoHa/LoKr), and so is SD3's `kohya`: use merged.
LoRA runs with LoCon (`--conv_rank`, the convolutions' adapters in `paddle_locon_weights.safetensors`): `kohya`
adds them as `lora_down.weight` [r, in, 3, 3] / `lora_up.weight` [out, r, 1, 1] / `alpha`, `merged` folds them,
`diffusers` is refused (it would drop them).

Formats a family cannot write are refused with its `unsupported_options["export_<format>"]` message (the
training entry refuses the same `--export_formats` before training).

The model family of a full run is read from its model_index.json. For a LoRA run (kohya only), it is
`--model_family`, else what the run's model card (README.md) records; the SDXL UNet names also need the
base model's UNet config: `--base_model`, else the card's `base_model:`.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ppdreambooth.errors import ConfigError, ExportError
from ppdreambooth.interop.exports import FORMATS, export
from ppdreambooth.interop.lora_rank import LoraOptions, refuse_lora_options, write_lora
from ppdreambooth.runtime.exiting import exit_process


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="ppdreambooth.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="a finished training output_dir")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="destination folder (or .safetensors file for kohya)")
    parser.add_argument("--rank", type=int, default=None, help="--format lora: the rank of the LoRA written")
    parser.add_argument("--clamp_quantile", type=float, default=None,
                        help="--format lora from a full run: clamp the factors at this quantile of their absolute "
                             "values (default 0.99, as kohya; 1 clamps nothing)")
    parser.add_argument("--min_diff", type=float, default=None,
                        help="--format lora from a full run: a text encoder whose largest weight change is at most "
                             "this counts as unchanged and is not extracted (default 0.01, as kohya)")
    parser.add_argument("--conv_rank", type=int, default=None,
                        help="refused: our LoRA file holds no convolution adapters")
    parser.add_argument("--model_family", default=None,
                        help="LoRA runs: the base model's family, sd, sdxl or sd3 (default: what the run's model "
                             "card records)")
    parser.add_argument("--base_model", default=None,
                        help="LoRA runs: the base model folder or hub id (default: the model card's base_model); "
                             "SDXL kohya names follow its UNet config")
    args = parser.parse_args(argv)
    options = LoraOptions(args.rank, args.clamp_quantile, args.min_diff, args.conv_rank)
    try:
        refuse_lora_options(args.format, options)
        if args.format == "lora":
            print(write_lora(args.output_dir, args.out, options, args.model_family, args.base_model).report())
            return 0
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
