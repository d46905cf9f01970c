"""The model card (`output_dir/README.md`) and the closing summary printed after training."""
from __future__ import annotations

import math
import os
import re
from typing import Dict, List, Optional

from ppdreambooth.modeling.lora import LOCON_WEIGHTS_NAME, LORA_WEIGHTS_NAME, has_mixed_ranks
from ppdreambooth.modeling.lora_targets import targets_chosen
from ppdreambooth.runtime.checkpoints import complete_checkpoints


def latest_validation_images(output_dir: str) -> List[str]:
    folder = os.path.join(output_dir, "validation")
    if not os.path.isdir(folder):
        return []
    steps = sorted((int(n.split("-")[1]), n) for n in os.listdir(folder) if n.startswith("step-"))
    if not steps:
        return []
    last = os.path.join("validation", steps[-1][1])
    return [os.path.join(last, n) for n in sorted(os.listdir(os.path.join(output_dir, last))) if n.endswith(".png")]


def usage(model_args, output_dir: str) -> str:
    if model_args.use_lora:
        return (f"python -m ppdreambooth.generate --model {model_args.pretrained_model_name_or_path} "
                f"--lora {output_dir} --prompt \"...\"")
    return f"python -m ppdreambooth.generate --model {output_dir} --prompt \"...\""


def needs_peft_backend(model_args, family) -> bool:
    """ppdiffusers 0.29 loads text-encoder and SD3 adapters only under its peft backend; UNet ones anywhere."""
    return bool(model_args.train_text_encoder) or not family.legacy_lora_keys


def merged_command(output_dir: str) -> str:
    return f"python -m ppdreambooth.export {output_dir} --format merged --out {output_dir}-merged"


def is_dora(model_args) -> bool:
    return bool(model_args.use_lora) and getattr(model_args, "lora_type", "lora") == "dora"


def dora_loading(output_dir: str) -> list:
    return ["These are DoRA adapters. ppdiffusers 0.29 cannot load DoRA: its `load_lora_weights` drops the "
            "magnitudes (`lora_magnitude_vector`) without a word and gives another model. Use "
            "`python -m ppdreambooth.generate` (it folds them into the weights), or write a full pipeline folder "
            f"that loads anywhere: `{merged_command(output_dir)}`. For PyTorch diffusers (which loads DoRA through "
            f"PEFT): `python -m ppdreambooth.export {output_dir} --format diffusers --out <folder>`, then "
            "`pipe.load_lora_weights(<folder>)`."]


def lycoris_kind(model_args) -> str:
    """"LoHa" / "LoKr" for a LyCORIS run, "" otherwise."""
    lora_type = getattr(model_args, "lora_type", "lora") if model_args.use_lora else ""
    return {"loha": "LoHa", "lokr": "LoKr"}.get(lora_type, "")


def lycoris_loading(kind: str, output_dir: str, family) -> list:
    kohya = (f" For ComfyUI and AUTOMATIC1111's WebUI: `python -m ppdreambooth.export {output_dir} --format kohya "
             "--out <file>.safetensors` writes the LyCORIS keys they read (`lora_unet_*.hada_w1_a` ..., "
             "`.lokr_w1` ...)." if family.name != "sd3" else "")
    return [f"These are LyCORIS {kind} adapters. Neither ppdiffusers nor diffusers can load {kind} "
            "(`load_lora_weights` reads LoRA keys only). Use `python -m ppdreambooth.generate` (it folds them into "
            f"the weights), or write a full pipeline folder that loads anywhere: `{merged_command(output_dir)}`."
            + kohya]


def adapter_size(path: str) -> str:
    """"N parameters, X MB" of a saved adapter file (LyCORIS's `.alpha` scalars are settings, not counted)."""
    from safetensors import safe_open

    with safe_open(path, framework="np") as f:
        count = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if not k.endswith(".alpha"))
    return f"{count:,} parameters, {os.path.getsize(path) / 1e6:.2f} MB"


def adapter_modules(path: str) -> str:
    """"unet 60, text_encoder 30": how many modules of each component a saved adapter file adapts."""
    from safetensors import safe_open

    counts: Dict[str, set] = {}
    with safe_open(path, framework="np") as f:
        for key in f.keys():
            module = ADAPTER_KEY_SUFFIX.sub("", key)
            counts.setdefault(module.split(".", 1)[0], set()).add(module)
    return ", ".join(f"{component} {len(modules)}" for component, modules in counts.items())


ADAPTER_KEY_SUFFIX = re.compile(r"\.(lora_[AB]\.weight|lora\.(down|up)\.weight|lora_magnitude_vector|alpha|"
                                r"hada_w[12]_[ab]|lokr_w[12](_[ab])?|locon_(down|up))$")


def targets_description(model_args, family) -> str:
    """Where the adapters are, in the flags' words: "unet attn_ff; text encoders attn_mlp; block ranks down=2"."""
    from ppdreambooth.config.lora_blocks import describe, parse_block_values

    parts = [f"{family.denoiser} {getattr(model_args, 'lora_layers', None) or 'attn'}"]
    if model_args.train_text_encoder and family.text_encoder_lora_targets:
        parts.append(f"text encoders {getattr(model_args, 'text_encoder_lora_layers', None) or 'attn'}")
    for flag in ("lora_block_ranks", "lora_block_alphas", "lora_block_lr"):
        entries = parse_block_values(flag, getattr(model_args, flag, None))
        if entries:
            parts.append(f"{flag[len('lora_'):].replace('_', ' ')} {describe(entries)}")
    return "; ".join(parts)


def mixed_rank_loading(model_args, family, output_dir: str) -> list:
    """Model-card lines for LoRA whose modules have different ranks (--lora_block_ranks)."""
    note = ("These adapters have different ranks per block. ppdiffusers 0.29's loader under its peft backend gives "
            "every module the first module's rank as alpha and so scales the others wrongly; ")
    if needs_peft_backend(model_args, family):  # text-encoder or SD3 adapters load only under that backend
        note += "these adapters need that backend, so load them another way: "
    else:
        note += ("in a plain ppdiffusers session (`USE_PEFT_BACKEND` unset, ppdreambooth not imported) "
                 f"`pipe.load_lora_weights(\"{output_dir}\")` loads the UNet adapters exactly. Otherwise: ")
    return [note + "`python -m ppdreambooth.generate` (it folds them into the weights), a full pipeline folder that "
            f"loads anywhere: `{merged_command(output_dir)}`, or for PyTorch diffusers `python -m ppdreambooth.export "
            f"{output_dir} --format diffusers --out <folder>` (its file states each module's rank and alpha)."]


def lora_loading(model_args, family, output_dir: str) -> list:
    """Model-card lines: how to load the adapters, in plain ppdiffusers first."""
    if is_dora(model_args):
        return dora_loading(output_dir)
    if lycoris_kind(model_args):
        return lycoris_loading(lycoris_kind(model_args), output_dir, family)
    weights = os.path.join(output_dir, LORA_WEIGHTS_NAME)
    if os.path.isfile(weights) and has_mixed_ranks(weights) and not getattr(model_args, "conv_rank", None):
        return mixed_rank_loading(model_args, family, output_dir)
    if getattr(model_args, "conv_rank", None):
        return [f"These are LoRA adapters plus LoCon adapters on the UNet's 3x3 convolutions (`{LOCON_WEIGHTS_NAME}`), "
                "which ppdiffusers' `load_lora_weights` does not read: loading only the LoRA file gives another "
                "model. Use `python -m ppdreambooth.generate` (it loads both), write a full pipeline folder that "
                f"loads anywhere: `{merged_command(output_dir)}`, or for ComfyUI and AUTOMATIC1111's WebUI "
                f"`python -m ppdreambooth.export {output_dir} --format kohya --out <file>.safetensors` (both in "
                "kohya's LoRA/LoCon keys)."]
    base = model_args.pretrained_model_name_or_path
    load = [f"pipe = DiffusionPipeline.from_pretrained(\"{base}\")", f"pipe.load_lora_weights(\"{output_dir}\")", "```"]
    if not needs_peft_backend(model_args, family):
        return ["These adapters load in plain ppdiffusers (no ppdreambooth needed; `pipe.unet.load_attn_procs` "
                "works too):", "", "```python", "from ppdiffusers import DiffusionPipeline", "", *load]
    return ["These adapters (text encoders or SD3) load only under ppdiffusers' peft backend (ppdiffusers 0.29): "
            "`import ppdreambooth` first, or set `USE_PEFT_BACKEND=True` before importing ppdiffusers:", "",
            "```python", "import ppdreambooth  # switches on ppdiffusers' peft backend", "from ppdiffusers import "
            "DiffusionPipeline", "", *load, "", "Without either: fold them into a full pipeline folder that loads "
            f"anywhere: `{merged_command(output_dir)}`."]


def pivotal_loading(model_args, family, output_dir: str) -> list:
    """Model-card lines for pivotal tuning: the embeddings file and how ppdiffusers/diffusers load it."""
    from ppdreambooth.modeling.pivotal import embeddings_path, spec_from_arguments

    spec = spec_from_arguments(model_args)
    path = embeddings_path(output_dir)
    lines = ["## New tokens (pivotal tuning)", "",
             f"`{spec.token_abstraction}` was trained as the new tokens `{spec.replacement}` in every CLIP text "
             f"encoder (`{os.path.basename(path)}`); write `{spec.replacement}` where the prompt names the subject. "
             "`python -m ppdreambooth.generate` loads them and rewrites the word itself."]
    if not family.textual_inversion_loader:
        keys = dict(family.textual_inversion_keys)
        return lines + [
            "", f"The `{family.pipeline_class}` of ppdiffusers 0.29 (and of diffusers) has no `load_textual_inversion`; "
            "T5 reads the token strings as plain text. ppdreambooth's loader adds the tokens to both CLIP "
            "tokenizers and encoders of a pipeline:", "", "```python",
            "from ppdreambooth.modeling.pivotal import load_into_pipeline",
            f"spec = load_into_pipeline(pipe, \"{path}\", {keys})",
            f"image = pipe(spec.apply(\"a photo of {spec.token_abstraction} ...\")).images[0]", "```"]
    lines += ["In ppdiffusers or diffusers:", "", "```python",
              "from safetensors.paddle import load_file  # diffusers: safetensors.torch",
              f"state = load_file(\"{path}\")"]
    for n, (encoder, key) in enumerate(family.textual_inversion_keys.items()):
        tokenizer = "tokenizer" if n == 0 else f"tokenizer_{n + 1}"
        lines.append(f"pipe.load_textual_inversion(state[\"{key}\"], token={spec.tokens}, "
                     f"text_encoder=pipe.{encoder}, tokenizer=pipe.{tokenizer})")
    lines += [f"image = pipe(\"a photo of {spec.replacement} ...\").images[0]", "```"]
    if model_args.use_lora:
        lines += ["", f"With `--export_formats kohya` the tokens are bundled into the kohya LoRA file as "
                      f"`bundle_emb.{spec.token_abstraction}.*` (A1111 then reads `{spec.token_abstraction}` in "
                      "prompts as the tokens)."]
    return lines


def write_model_card(output_dir: str, model_args, data_args, args, global_step: int, family,
                     source: Optional[str] = None) -> str:
    """`source`: the model the user named, when training read it from somewhere else (a converted single file)."""
    base = source or model_args.pretrained_model_name_or_path
    kind = "DoRA" if is_dora(model_args) else lycoris_kind(model_args) or "LoRA"
    extra = {"DoRA": "; LoRA plus a trained magnitude per output feature",
             "LoHa": "; LyCORIS, dW = (w1_a w1_b) * (w2_a w2_b) * alpha/rank",
             "LoKr": f"; LyCORIS, dW = kron(w1, w2), factor {getattr(model_args, 'lokr_factor', -1)}"}.get(kind, "")
    if kind in ("LoHa", "LoKr") and getattr(model_args, "conv_rank", None):
        extra += f"; 3x3 convolutions too, rank {model_args.conv_rank}, alpha {model_args.conv_alpha:g}"
    mode = (f"{kind} (rank {model_args.lora_rank}, alpha {model_args.lora_alpha:g}{extra}), "
            f"file `{LORA_WEIGHTS_NAME}`" if model_args.use_lora else "full fine-tuning, a ppdiffusers pipeline folder")
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: ppdiffusers",
        f"tags: [{family.card_tag}, dreambooth, ppdreambooth" + (", lora" if model_args.use_lora else "")
        + (", dora]" if is_dora(model_args) else f", lycoris, {lycoris_kind(model_args).lower()}]"
           if lycoris_kind(model_args) else "]"),
        "---",
        "",
        "# DreamBooth model trained with ppdreambooth",
        "",
        f"- Base model: `{base}` (model family `{family.name}`, "
        f"`{family.pipeline_class}`)",
        f"- Weights: {mode}",
    ]
    if model_args.use_lora and targets_chosen(model_args):
        lines.append(f"- Adapter targets: {targets_description(model_args, family)} (`--lora_layers`, "
                     "`--text_encoder_lora_layers`, `--lora_block_*`)")
    for concept in data_args.concept_list:
        line = f"- Instance prompt: `{concept.instance_prompt}` ({concept.instance_data_dir})"
        if data_args.with_prior_preservation:
            line += f"; class prompt `{concept.class_prompt}`, {concept.num_class_images} class images"
        lines.append(line)
    settings = [
        f"steps {global_step}", f"learning rate {args.learning_rate:g} ({args.lr_scheduler_type.value})",
        f"batch {args.per_device_train_batch_size} x {args.gradient_accumulation_steps} accumulation "
        f"x {max(args.world_size, 1)} processes",
        f"resolution {data_args.image_size[0]}x{data_args.image_size[1]}"
        + (" with aspect-ratio buckets" if data_args.enable_bucket else ""),
        f"prior preservation {'on (weight %g)' % model_args.prior_loss_weight if data_args.with_prior_preservation else 'off'}",
        f"text encoder{'s' if len(family.text_encoders) > 1 else ''} "
        f"{'trained' if model_args.train_text_encoder else 'frozen'}",
        f"seed {args.seed}",
    ]
    if args.use_ema:
        settings.append(f"EMA decay {args.ema_decay:g} (the weights are the average)")
    if args.fp16 or args.bf16:
        settings.append(f"{'fp16' if args.fp16 else 'bf16'} {args.fp16_opt_level}")
    lines += ["- Training: " + ", ".join(settings), "", "## Use", "", "```bash", usage(model_args, output_dir), "```"]
    if model_args.use_lora:
        lines += ["", *lora_loading(model_args, family, output_dir)]
    if getattr(model_args, "train_text_encoder_ti", False):
        lines += ["", *pivotal_loading(model_args, family, output_dir)]
    images = latest_validation_images(output_dir)
    if images:
        lines += ["", f"## Validation images (`{args.validation_prompt}`)", ""]
        lines += [f"![validation image {i}]({path})" for i, path in enumerate(images)]
    path = os.path.join(output_dir, "README.md")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)
    return path


def closing_summary(output_dir: str, model_args, args, cached: str = "", family=None) -> str:
    checkpoints = complete_checkpoints(output_dir)
    images = latest_validation_images(output_dir)
    what = os.path.join(output_dir, LORA_WEIGHTS_NAME) if model_args.use_lora else output_dir
    convs = os.path.join(output_dir, LOCON_WEIGHTS_NAME)
    lora_with_convs = (model_args.use_lora and getattr(model_args, "conv_rank", None) is not None
                       and not lycoris_kind(model_args))
    mixed = model_args.use_lora and os.path.isfile(what) and has_mixed_ranks(what)
    chosen = targets_chosen(model_args)
    lines = [
        "",
        "Training finished.",
        f"  model:       {what}",
        f"  model card:  {os.path.join(output_dir, 'README.md')}",
        f"  checkpoints: {', '.join(os.path.basename(c) for c in checkpoints) or 'none'} in {output_dir}",
        f"  validation:  {os.path.dirname(os.path.join(output_dir, images[0])) if images else 'none (--validation_prompt)'}",
        f"  exports:     {', '.join(os.path.join(output_dir, 'export-' + f) for f in args.export_format_list) or 'none (--export_formats)'}",
        f"  logs:        {args.logging_dir} ({', '.join(args.report_to) or 'no logger'})",
        *([f"  caching:     {cached}"] if cached else []),
        *([f"  adapters:    {adapter_size(what)}" + (f"; modules: {adapter_modules(what)}" if chosen else "")
           + (f"; targets: {targets_description(model_args, family)}" if chosen and family is not None else "")]
          if model_args.use_lora and os.path.isfile(what) else []),
        *([f"  LoCon:       {adapter_size(convs)} in {convs} (the 3x3 convolutions' adapters)"]
          if model_args.use_lora and os.path.isfile(convs) else []),
        *([f"  loading:     LoRA + LoCon: load_lora_weights reads the LoRA file only; ppdreambooth.generate loads "
           f"both, or {merged_command(output_dir)}"] if lora_with_convs else []),
        *([] if lora_with_convs else
          [f"  loading:     {lycoris_kind(model_args)}: not by ppdiffusers' or diffusers' load_lora_weights; "
           f"ppdreambooth.generate folds them, or {merged_command(output_dir)}"] if lycoris_kind(model_args) else
          [f"  loading:     DoRA: not by ppdiffusers' load_lora_weights (it drops the magnitudes); "
           f"ppdreambooth.generate folds them, or {merged_command(output_dir)}"] if is_dora(model_args) else
          [f"  loading:     ranks differ per block: ppdiffusers' peft backend scales them wrongly (see the model "
           f"card); ppdreambooth.generate folds them, or {merged_command(output_dir)}"] if mixed else
          [f"  loading:     needs ppdiffusers' peft backend (import ppdreambooth first); or {merged_command(output_dir)}"]
          if model_args.use_lora and family is not None and needs_peft_backend(model_args, family) else
          [f"  loading:     plain ppdiffusers: pipe.load_lora_weights(\"{output_dir}\")"] if model_args.use_lora else []),
        f"  generate:    {usage(model_args, output_dir)}",
    ]
    return "\n".join(lines)


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


def write_derived_lora_card(out: str, base: Optional[str], family, rank: int, origin: str,
                            text_encoders: bool) -> str:
    """The model card of a LoRA written by `export --format lora` (extracted from a full run, or resized): it
    records `base_model` and the model family as a training card does, so `export`, `generate` and `evaluate` read
    it unchanged. `origin`: one line saying where the adapters came from."""
    from types import SimpleNamespace

    settings = SimpleNamespace(use_lora=True, lora_type="lora", train_text_encoder=text_encoders,
                               pretrained_model_name_or_path=base or "<base model>")
    lines = ["---", *([f"base_model: {base}"] if base else []), "library_name: ppdiffusers",
             f"tags: [{family.card_tag}, dreambooth, ppdreambooth, lora]", "---", "",
             "# LoRA written by ppdreambooth", "",
             f"- Base model: `{base or 'unknown'}` (model family `{family.name}`, `{family.pipeline_class}`)",
             f"- Weights: LoRA (rank {rank}, alpha {rank}), file `{LORA_WEIGHTS_NAME}`",
             f"- {origin}", "", "## Use", "", "```bash", usage(settings, out), "```", "",
             *lora_loading(settings, family, out)]
    path = os.path.join(out, "README.md")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)
    return path
