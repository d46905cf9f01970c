"""A LoRA from a full fine-tune: the change of each adapted weight against the base model, by truncated SVD.

`python -m ppdreambooth.export <full run> --format lora --rank R --out <folder>` (see `lora_rank`).

Which modules are extracted: exactly the ones our LoRA training adapts, the family's `denoiser_lora_targets` (SD,
SDXL: to_q/to_k/to_v/to_out.0 of every UNet attention; SD3: those and the context stream's add_q/k/v_proj and
to_add_out) and, for each text encoder that changed, its `text_encoder_lora_targets` (q/k/v/out_proj of CLIP's
self-attention). The result is then an ordinary ppdreambooth LoRA file with the keys our runs write, so every path
that reads a LoRA run reads it: ppdiffusers' `load_lora_weights`, `export --format diffusers|kohya|merged`,
`generate --lora`, `evaluate`. Other layers a full fine-tune changes (feed-forward, projections, convolutions,
norms, SD3's text encoders, for which ppdiffusers 0.29 has no LoRA loader) have no place in that file; how much of
the change they carry is printed, so a user sees what the LoRA leaves out.

kohya's rules carried over (sd-scripts networks/extract_lora_from_models.py): the denoiser is always extracted; a
the text encoders only when the largest absolute change over their adapted modules exceeds `min_diff` (0.01), else
they count as unchanged and are skipped with a printed note (decided for SDXL's two together, as kohya does, and as
ppdiffusers' SDXL `save_lora_weights` needs: it writes text-encoder adapters only for both); the factors are
clamped at the `clamp_quantile` quantile (0.99; see `lowrank`).

Everything that can be checked without weights (the base model named and readable, of the run's family, with the
same layer sizes per its configs) is checked before any model loads.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from ppdreambooth.errors import ConfigError, ExportError
from ppdreambooth.interop.lowrank import LowRank, low_rank_change

# Config fields that set weight shapes (UNet, SD3 transformer, CLIP, T5): a base whose values differ is another model
SHAPE_FIELDS = ("block_out_channels", "layers_per_block", "cross_attention_dim", "attention_head_dim",
                "num_attention_heads", "transformer_layers_per_block", "in_channels", "out_channels",
                "down_block_types", "up_block_types", "projection_class_embeddings_input_dim",
                "addition_time_embed_dim", "num_layers", "joint_attention_dim", "caption_projection_dim",
                "pooled_projection_dim", "patch_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "projection_dim", "vocab_size", "d_model", "d_ff", "d_kv", "num_heads")


@dataclass
class ComponentResult:
    """One component's adapters (`state`: peft keys -> arrays) and what the extraction kept and left out."""

    name: str
    parts: List[LowRank] = field(default_factory=list)
    state: Dict[str, np.ndarray] = field(default_factory=dict)
    note: str = ""  # why it was not extracted, when it was not
    outside: float = 0.0  # squared Frobenius norm of the change in layers the LoRA has no adapters for


def component_config(path: str, name: str) -> dict:
    """`<name>/config.json` of a model folder or hub id (just the JSON, no weights)."""
    if os.path.isdir(path):
        config = os.path.join(path, name, "config.json")
        if not os.path.isfile(config):
            return {}
        with open(config, encoding="utf-8") as f:
            return json.load(f)
    from ppdiffusers import UNet2DConditionModel  # its load_config reads any subfolder's config.json

    return dict(UNet2DConditionModel.load_config(path, subfolder=name))


def check_base_model(run: str, base: Optional[str], family) -> str:
    """The base model of the full run `run`, refused (ExportError) when missing, unreadable, of another family or
    of other layer sizes than the run; nothing is loaded."""
    from ppdreambooth.families import detect_family
    from ppdreambooth.interop.model_card import read_model_card

    base = base or read_model_card(run).get("base_model")
    if not base:
        raise ExportError(f"--format lora needs the base model {run} was fine-tuned from, to take the difference; "
                          "its model card names none. Pass --base_model <folder or hub id>.")
    if not os.path.isdir(base) and (base.startswith((".", "/", "~")) or base.count("/") != 1):
        raise ExportError(f"the base model {base} does not exist; pass --base_model with the model {run} was "
                          "fine-tuned from.")
    try:
        base_family = detect_family(base)
    except ConfigError as e:
        raise ExportError(f"cannot read the base model {base}: {e}") from None
    if base_family.name != family.name:
        raise ExportError(f"the base model {base} is a {base_family.name} model and {run} a {family.name} one; "
                          "pass --base_model with the model the run was fine-tuned from.")
    for name in (family.denoiser, *family.text_encoders):
        try:
            ours, theirs = component_config(run, name), component_config(base, name)
        except Exception as e:  # an offline or private hub id: say which and what to do
            raise ExportError(f"cannot read {name}/config.json of the base model {base} ({e}); pass --base_model "
                              "with a local copy of it.") from None
        differ = [k for k in SHAPE_FIELDS if k in ours and k in theirs and ours[k] != theirs[k]]
        if differ:
            raise ExportError(f"the base model {base} is not the model {run} was fine-tuned from: its {name} has "
                              f"{differ[0]} {theirs[differ[0]]}, the run's {ours[differ[0]]}. Pass --base_model "
                              "with the right one.")
    return base


def adapted_modules(layer, targets) -> List[str]:
    """Names of the Linear sublayers of `layer` that LoRA training adapts: a name equal to a target or ending in
    `.<target>` (how peft's `target_modules` match)."""
    import paddle

    return [name for name, sub in layer.named_sublayers() if isinstance(sub, paddle.nn.Linear)
            and any(name == t or name.endswith("." + t) for t in targets)]


def read_weights(path: str, name: str, family, targets) -> Tuple[Dict[str, np.ndarray], List[str]]:
    """All weights of one component as float32 arrays (Paddle layout), and its adapted modules; the model itself is
    released before returning (two components, not two pipelines, are held at once)."""
    import paddle

    from ppdreambooth.families.loading import load_component

    layer = load_component(path, name, family)
    modules = adapted_modules(layer, targets) if targets else []
    state = {k: v.astype("float32").numpy() for k, v in layer.state_dict().items() if paddle.is_floating_point(v)}
    del layer
    return state, modules


def weight_changes(run: Dict[str, np.ndarray], base: Dict[str, np.ndarray], name: str) -> Dict[str, np.ndarray]:
    """run - base per weight, after checking both have the same weights and shapes."""
    missing = sorted(set(run) ^ set(base))
    if missing:
        raise ExportError(f"the base model's {name} and the run's have different weights (e.g. {missing[0]}): "
                          "pass --base_model with the model the run was fine-tuned from.")
    for key, value in run.items():
        if value.shape != base[key].shape:
            raise ExportError(f"{name}.{key} is {base[key].shape} in the base model but {value.shape} in the run: "
                              "pass --base_model with the model the run was fine-tuned from.")
    return {key: run[key] - base[key] for key in run}


def adapted_changes(changes: Dict[str, np.ndarray], modules: List[str]) -> Tuple[Dict[str, np.ndarray], float]:
    """The changes of the adapted modules (module -> [in, out]), and the squared Frobenius norm of all the others
    (layers a LoRA has no adapters for)."""
    adapted = {f"{m}.weight" for m in modules}
    outside = float(sum(np.sum(d.astype(np.float64) ** 2) for k, d in changes.items() if k not in adapted))
    return {m: changes[f"{m}.weight"] for m in modules}, outside


def extract_component(name: str, changes: Dict[str, np.ndarray], outside: float, rank: int,
                      clamp_quantile: float) -> ComponentResult:
    """Factors of the change of each module (peft keys `<module>.lora_A/B.weight`)."""
    result = ComponentResult(name, outside=outside)
    for module, change in changes.items():
        part = low_rank_change(change, rank, clamp_quantile)
        result.parts.append(part)
        result.state[f"{module}.lora_A.weight"] = part.down
        result.state[f"{module}.lora_B.weight"] = part.up
    return result


def largest_change(changes: Dict[str, np.ndarray]) -> float:
    return max((float(np.max(np.abs(c))) for c in changes.values() if c.size), default=0.0)


def extract_lora(run: str, base: str, family, rank: int, clamp_quantile: float,
                 min_diff: float, log=print) -> List[ComponentResult]:
    """The adapters of the full run `run` against `base` (already checked by `check_base_model`), one component
    after the other. As kohya decides, the text encoders count as changed together: all are extracted when any
    one's largest change over its adapted modules exceeds `min_diff`, else none (a printed note). Together also
    because ppdiffusers 0.29's SDXL `save_lora_weights` writes text-encoder adapters only when both are given."""
    from ppdreambooth.families.loading import present_components

    present = present_components(run, family)
    encoders = [n for n in family.text_encoders if n in present and family.is_trainable_text_encoder(n)]
    found = {}
    for name in (family.denoiser, *encoders):
        targets = family.denoiser_lora_targets if name == family.denoiser else family.text_encoder_lora_targets
        log(f"reading {name} of {run} and of {base}")
        tuned, modules = read_weights(run, name, family, targets)
        changes = weight_changes(tuned, read_weights(base, name, family, ())[0], name)
        del tuned
        found[name] = adapted_changes(changes, modules) if modules else ({}, largest_change(changes))
    results = [extract_component(family.denoiser, *found.pop(family.denoiser), rank, clamp_quantile)]
    if not family.text_encoder_lora_targets:  # SD3: no text-encoder adapters to write; say what that leaves out
        for name, (_, largest) in found.items():
            note = (f"changed (largest change {largest:.3g}), but {family.name} LoRAs carry no {name} adapters: "
                    "that change is not in the LoRA" if largest > min_diff else "unchanged")
            results.append(ComponentResult(name, note=note))
        return results
    largest = {name: largest_change(changes) for name, (changes, _) in found.items()}
    if found and max(largest.values()) <= min_diff:
        for name in found:
            results.append(ComponentResult(name, note=f"unchanged (largest change {largest[name]:.3g} <= --min_diff "
                                                      f"{min_diff:g}): not extracted"))
        return results
    return results + [extract_component(name, changes, outside, rank, clamp_quantile)
                      for name, (changes, outside) in found.items()]
