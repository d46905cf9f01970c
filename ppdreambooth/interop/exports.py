"""Writing a finished run in the formats of other tools (see `python -m ppdreambooth.export --help` for each format and
who reads it). Formats a family cannot write are refused with its `unsupported_options["export_<format>"]`."""
from __future__ import annotations

import os
from collections import Counter
from typing import Callable, Dict, List, Optional

import numpy as np

from ppdreambooth.config.arguments import EXPORT_FORMATS

# `lora` (a LoRA extracted from a full run, or a LoRA run resized; `lora_rank`) exists here only: it needs --rank, so
# it is no choice of training's --export_formats, which stays EXPORT_FORMATS.
FORMATS = (*EXPORT_FORMATS, "lora")
from ppdreambooth.errors import ConfigError, ExportError
from ppdreambooth.families import detect_family, get_family
from ppdreambooth.interop.family_formats import formats_of
from ppdreambooth.interop.keymaps_ldm import sd_kohya_name
from ppdreambooth.interop.merge import write_merged
from ppdreambooth.interop.model_card import read_model_card
from ppdreambooth.interop.single_file import write_single_file
from ppdreambooth.interop.weights import lora_state_in_torch_layout
from ppdreambooth.modeling.lora import LOCON_WEIGHTS_NAME, LORA_WEIGHTS_NAME, MAGNITUDE, to_peft_keys
from ppdreambooth.modeling.lycoris import is_lycoris_state, lycoris_export_problem
from ppdreambooth.modeling.pivotal import find_embeddings, kohya_bundle

DIFFUSERS_LORA_NAME = "pytorch_lora_weights.safetensors"


def _load_lora(output_dir: str) -> Dict[str, np.ndarray]:
    """A run's adapters with peft names (`...lora_A.weight`), however they were written (UNets: `lora.down`)."""
    from safetensors.numpy import load_file

    return to_peft_keys(load_file(os.path.join(output_dir, LORA_WEIGHTS_NAME)))


def _load_convs(output_dir: str) -> Dict[str, np.ndarray]:
    """A LoRA run's LoCon adapters (`--conv_rank`), `<component>.<module>.locon_down` ...; empty without them."""
    from safetensors.numpy import load_file

    path = os.path.join(output_dir, LOCON_WEIGHTS_NAME)
    return load_file(path) if os.path.isfile(path) else {}


def lora_to_kohya(state: Dict[str, np.ndarray],
                  name_of: Callable[[str, str], str] = sd_kohya_name) -> Dict[str, np.ndarray]:
    """`unet.<module>.lora_A.weight` -> `<name_of(unet, module)>.lora_down.weight` (+ `.alpha`); a DoRA magnitude
    `unet.<module>.lora_magnitude_vector` ([out]) -> `<name>.dora_scale` ([out, 1]).

    `name_of(component, module)` gives the kohya name of a module (default: SD 1.x/2.x names).

    `dora_scale` is LyCORIS's key. Its [out, 1] shape is LyCORIS's `wd_on_out` layout (a magnitude per output
    feature, the norm over each row of the PyTorch weight: what we train, as PEFT does); LyCORIS's default layout is
    [1, in], per input feature, and some readers apply only that one (see the README's DoRA section).

    Every module gets a `.alpha`, and all of them the same value: the most common rank c. Our file has each module's
    alpha / rank folded into lora_B already (scale 1), so a module of rank r gets lora_up * r / c, and every reader's
    up @ down * alpha / rank is the trained update; with one rank (c = r) the matrices are written as they are.
    Different alphas per module (per-block ranks) would be the kohya way to state them, but diffusers reads them
    wrongly from SD/SDXL kohya files (seen with diffusers 0.42.1: its alpha_pattern keeps the old processor key
    names, matches no module and is dropped, so those modules get the common alpha)."""
    torch_state = lora_state_in_torch_layout(state)
    ranks = {key[: -len(".lora_A.weight")]: value.shape[0] for key, value in torch_state.items()
             if key.endswith(".lora_A.weight")}
    common = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    out = {}
    for key, value in torch_state.items():
        component, rest = key.split(".", 1)
        module, kind = rest.rsplit(".lora_", 1)
        name = name_of(component, module)
        if kind == MAGNITUDE[len("lora_"):]:
            out[f"{name}.dora_scale"] = np.ascontiguousarray(value.reshape(-1, 1))
            continue
        if kind.startswith("B") and ranks[f"{component}.{module}"] != common:
            value = (value.astype(np.float64) * (ranks[f"{component}.{module}"] / common)).astype(value.dtype)
        out[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value
        if kind.startswith("A"):
            out[f"{name}.alpha"] = np.asarray(common, dtype=np.float32)
    return out


def lycoris_to_kohya(state: Dict[str, np.ndarray],
                     name_of: Callable[[str, str], str] = sd_kohya_name) -> Dict[str, np.ndarray]:
    """LoHa/LoKr adapters `<component>.<module>.<key>` -> `<name_of(component, module)>.<key>`, the layout of a
    LyCORIS file (`lora_unet_*.hada_w1_a`, `.lokr_w1`, ..., `.alpha`) that ComfyUI and WebUI read. The matrices are
    saved in PyTorch's layout already; they are written as they are. LoCon's convolution adapters (a LoRA run's
    `--conv_rank`) become `<name>.lora_down.weight` [r, in, k, k] / `.lora_up.weight` [out, r, 1, 1] / `.alpha`."""
    out = {}
    for key, value in state.items():
        component, rest = key.split(".", 1)
        module, kind = rest.rsplit(".", 1)
        kind = KOHYA_LOCON_KEYS.get(kind, kind)
        out[f"{name_of(component, module)}.{kind}"] = np.ascontiguousarray(value)
    return out


KOHYA_LOCON_KEYS = {"locon_down": "lora_down.weight", "locon_up": "lora_up.weight"}  # LoCon in kohya's names


LOCON_DIFFUSERS = ("this LoRA run also trained LoCon adapters on the UNet's 3x3 convolutions (--conv_rank), "
                   "which this export does not carry. Use --format kohya (ComfyUI/WebUI read LoCon) or merged.")


def lycoris_type(state) -> str:
    return "loha" if any(k.endswith(".hada_w1_a") for k in state) else "lokr"


def lora_to_diffusers(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Our adapters (peft names, Paddle layout) as the file diffusers' `load_lora_weights` reads: every matrix in
    PyTorch's layout. DoRA magnitudes keep PEFT's key `<component>.<module>.lora_magnitude_vector` for the denoiser;
    for text encoders they are written as `<module>.lora_magnitude_vector.weight`: with transformers 5 (seen with
    diffusers 0.42.1, transformers 5.24.0, peft 0.21.2) the text encoders' adapter loader maps only that name onto
    PEFT's parameter and leaves a magnitude under the plain key unloaded (the encoder then runs with the magnitude
    PEFT initialised, another model). PEFT's own `set_peft_model_state_dict` puts both names in the same place."""
    out = {}
    for key, value in lora_state_in_torch_layout(state).items():
        if key.startswith("text_encoder") and key.endswith("." + MAGNITUDE):
            key += ".weight"
        out[key] = value
    return out


def diffusers_lora_metadata(state: Dict[str, np.ndarray]) -> Optional[Dict[str, str]]:
    """diffusers' `lora_adapter_metadata` (the LoraConfig of each component, read by its `load_lora_weights` since
    0.34) for adapters in PyTorch's layout (`lora_to_diffusers`), or None when every component has one rank.

    Written only for per-block ranks. A diffusers LoRA file has no per-module alpha of its own (only kohya files'
    `.alpha` keys become network alphas), so each module's alpha / rank is folded into its lora_B (as in our file)
    and every module's alpha equals its rank. Without metadata some diffusers releases take one module's rank as
    the alpha of all modules (`get_peft_kwargs`), which mis-scales the others; the metadata states rank and alpha
    per module, for every component in the file (diffusers reads an absent component's config as PEFT's defaults).
    """
    import json

    ranks: Dict[str, Dict[str, int]] = {}
    dora = set()
    for key, value in state.items():
        component, rest = key.split(".", 1)
        if rest.endswith(".lora_A.weight"):
            # transformers 5's CLIPTextModel has no `text_model.` level (diffusers strips it from the keys, not from
            # the metadata); without it the name still matches older ones as a suffix, as PEFT matches targets
            module = rest[:-len(".lora_A.weight")].removeprefix("text_model.")
            ranks.setdefault(component, {})[module] = int(value.shape[0])
        elif MAGNITUDE in rest:
            dora.add(component)
    if all(len(set(modules.values())) <= 1 for modules in ranks.values()):
        return None
    config = {}
    for component, modules in ranks.items():
        common = Counter(modules.values()).most_common(1)[0][0]
        pattern = {module: rank for module, rank in modules.items() if rank != common}
        config.update({f"{component}.r": common, f"{component}.lora_alpha": common,
                       f"{component}.rank_pattern": pattern, f"{component}.alpha_pattern": dict(pattern),
                       f"{component}.target_modules": sorted(modules),
                       f"{component}.use_dora": component in dora})
    return {"lora_adapter_metadata": json.dumps(config, indent=2, sort_keys=True)}


def lora_family(output_dir: str, model_family: Optional[str] = None, base_model: Optional[str] = None):
    """The model family of a LoRA run: `model_family` if given, else the model card's record of it, else the
    family of the base model (`base_model`, else the card's)."""
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


def kohya_names(output_dir: str, model_family: Optional[str] = None,
                base_model: Optional[str] = None) -> Callable[[str, str], str]:
    """The kohya LoRA naming of a LoRA run's family (SDXL's depends on the base model's UNet config)."""
    family = lora_family(output_dir, model_family, base_model)
    refuse_unsupported(family, "kohya")
    formats = formats_of(family)
    name = formats.kohya_name
    if name is None:
        raise ExportError(f"--format kohya has no naming for model family {family.name}.")
    config = base_unet_config(output_dir, base_model) if formats.kohya_names_need_unet_config else {}
    return lambda component, module: name(component, module, config)


def copy_embeddings(output_dir: str, out: str) -> List[str]:
    """Pivotal tuning's `*_emb.safetensors` beside a diffusers export (the same file serves both clients)."""
    import shutil

    embeddings = find_embeddings(output_dir)
    if not embeddings:
        return []
    target = os.path.join(out, os.path.basename(embeddings))
    shutil.copyfile(embeddings, target)
    return [target]


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

    is_lora = os.path.isfile(os.path.join(output_dir, LORA_WEIGHTS_NAME))
    is_full = os.path.isfile(os.path.join(output_dir, "model_index.json"))
    if not (is_lora or is_full):
        raise ExportError(f"{output_dir} holds no finished run (no model_index.json or {LORA_WEIGHTS_NAME}).")
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}.")
    if fmt == "lora":
        raise ExportError("--format lora takes a rank: use ppdreambooth.interop.lora_rank.write_lora (the CLI's "
                          "--rank).")
    if fmt == "single-file":
        if not is_full:
            raise ExportError("--format single-file writes a full model; this run trained LoRA adapters "
                              "(use kohya or diffusers).")
        family = detect_family(output_dir)
        refuse_unsupported(family, fmt)
        path = out if out.endswith(".safetensors") else os.path.join(out, "model.safetensors")
        return [write_single_file(output_dir, path, family)]
    if is_lora and fmt in ("diffusers", "kohya") and is_lycoris_state(_load_lora(output_dir)):
        state = _load_lora(output_dir)
        family = lora_family(output_dir, model_family, base_model)
        problem = lycoris_export_problem(fmt, lycoris_type(state), family.name)
        if problem:
            raise ExportError(f"--format {fmt}: {problem}")
    if is_lora and fmt == "diffusers" and _load_convs(output_dir):
        raise ExportError(f"--format diffusers: {LOCON_DIFFUSERS}")
    if fmt == "merged":
        if not is_lora:
            raise ExportError("--format merged folds LoRA adapters into the base model; this run is a full "
                              "fine-tune already (its output folder loads as it is).")
        family = lora_family(output_dir, model_family, base_model)
        base = base_model or read_model_card(output_dir).get("base_model")
        if not base:
            raise ExportError(f"{output_dir} has no model card naming its base model; pass --base_model.")
        return write_merged(_load_lora(output_dir), base, family, out, _load_convs(output_dir))
    if fmt == "kohya":
        if not is_lora:
            raise ExportError("--format kohya writes LoRA adapters; this run is a full fine-tune (use diffusers).")
        names = kohya_names(output_dir, model_family, base_model)  # refuses families without a kohya layout
        path = out if out.endswith(".safetensors") else os.path.join(out, "lora_kohya.safetensors")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        state = _load_lora(output_dir)
        kohya = lycoris_to_kohya(state, names) if is_lycoris_state(state) else lora_to_kohya(state, names)
        kohya.update(lycoris_to_kohya(_load_convs(output_dir), names))
        embeddings = find_embeddings(output_dir)
        if embeddings:  # pivotal tuning: the new tokens travel in the same file, as A1111 bundles them
            kohya.update(kohya_bundle(embeddings))
        save_file(kohya, path + ".tmp", metadata={"format": "pt"})
        os.replace(path + ".tmp", path)
        return [path]
    os.makedirs(out, exist_ok=True)
    if is_lora:
        path = os.path.join(out, DIFFUSERS_LORA_NAME)
        state = lora_to_diffusers(_load_lora(output_dir))
        save_file(state, path + ".tmp", metadata={"format": "pt", **(diffusers_lora_metadata(state) or {})})
        os.replace(path + ".tmp", path)
        return [path, *copy_embeddings(output_dir, out)]
    # The family's loader, not DiffusionPipeline's: it passes the components a folder may lack (SD3's T5).
    family = detect_family(output_dir)
    pipeline = family.load_pipeline(output_dir)
    prepare = formats_of(family).prepare_for_diffusers
    if prepare is not None:
        prepare(pipeline)
    pipeline.save_pretrained(out, to_diffusers=True)
    copy_embeddings(output_dir, out)
    return [os.path.join(out, name) for name in sorted(os.listdir(out))]
