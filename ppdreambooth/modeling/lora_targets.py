"""Where adapters go: `--lora_layers` presets, `--text_encoder_lora_layers`, and the per-block settings
(`config.lora_blocks`) turned into each adapted module's rank, alpha and learning-rate multiplier.

Denoiser presets (the module names are the family's, `ModelFamily.denoiser_*`):
- `attn`: the family's default targets (SD/SDXL: to_q, to_k, to_v, to_out.0 of every attention; SD3 also the
  context projections add_q/k/v_proj and to_add_out), what an unset `--lora_layers` adapts;
- `attn_ff`: those plus the feed-forward Linears of every transformer block (ff.net.0.proj, ff.net.2; SD3 also
  ff_context.*);
- `all_linear`: every nn.Linear inside the transformer blocks: attention, feed-forward, a UNet
  Transformer2DModel's proj_in/proj_out where they are Linear (SD 2.x, SDXL; SD 1.x has 1x1 convolutions there),
  and SD3's adaLN modulation Linears (norm1.linear, norm1_context.linear), as kohya's and OneTrainer's SD3 LoRAs
  adapt every Linear of a joint block. Time and text embeddings, resnets' time_emb_proj and SD3's
  context_embedder/proj_out lie outside the blocks and stay out.
Anything else is a comma-separated list of module names, matched as PEFT does (full name or dotted suffix).

Text-encoder presets: `attn` (q/k/v/out_proj of CLIP's self-attention, the default) and `attn_mlp` (plus mlp.fc1 and
mlp.fc2).
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Tuple

import paddle

from ppdreambooth.config.arguments import DENOISER_PRESETS
from ppdreambooth.config.lora_blocks import BlockValue, block_of, describe, value_for
from ppdreambooth.errors import ConfigError


def matches(name: str, targets: Sequence[str]) -> bool:
    """PEFT's rule for `target_modules` given as a list: the module's full name or a dotted suffix of it."""
    return any(name == t or name.endswith("." + t) for t in targets)


def denoiser_targets(family, denoiser: paddle.nn.Layer, choice: Optional[str]) -> Tuple[str, ...]:
    """The target names `--lora_layers` `choice` stands for in this denoiser (None: the family's default)."""
    if not choice or choice == "attn":
        return tuple(family.denoiser_lora_targets)
    if choice == "attn_ff":
        return tuple(family.denoiser_lora_targets) + tuple(family.denoiser_ff_targets)
    if choice == "all_linear":
        inside = re.compile(family.denoiser_block_pattern)
        return tuple(name for name, sub in denoiser.named_sublayers()
                     if isinstance(sub, paddle.nn.Linear) and inside.match(name))
    return tuple(t.strip() for t in choice.split(",") if t.strip())


def check_targets_found(denoiser: paddle.nn.Layer, targets: Sequence[str]) -> None:
    """Refuse `--lora_layers` names that match no module of `denoiser` (PEFT only refuses names when none of them
    matches, with a ValueError; a typo among several would silently adapt less)."""
    names = [name for name, _ in denoiser.named_sublayers()]
    missing = [t for t in targets if not any(matches(name, (t,)) for name in names)]
    if missing:
        raise ConfigError(f"--lora_layers: {', '.join(missing)} names no module of the {type(denoiser).__name__}; "
                          f"give a preset ({', '.join(DENOISER_PRESETS)}) or module names it has (full names or "
                          "their dotted ends, e.g. to_q, ff.net.2).")


def text_encoder_targets(family, choice: Optional[str]) -> Tuple[str, ...]:
    """The target names of `--text_encoder_lora_layers` `choice` (None: attn)."""
    if choice == "attn_mlp":
        return tuple(family.text_encoder_lora_targets) + tuple(family.text_encoder_mlp_targets)
    return tuple(family.text_encoder_lora_targets)


def module_patterns(layer: paddle.nn.Layer, targets: Sequence[str], rank: int, alpha: float,
                    block_ranks: Sequence[BlockValue], block_alphas: Sequence[BlockValue]
                    ) -> Dict[str, Tuple[int, float]]:
    """{full module name: (rank, alpha)} for every targeted module of `layer` whose block settings differ from
    (`rank`, `alpha`); the others keep those."""
    if not block_ranks and not block_alphas:
        return {}
    patterns = {}
    for name, _ in layer.named_sublayers():
        if not matches(name, targets):
            continue
        setting = (int(value_for(block_ranks, name, rank)), float(value_for(block_alphas, name, alpha)))
        if setting != (rank, float(alpha)):
            patterns[name] = setting
    return patterns


def adapted_modules(layer: paddle.nn.Layer) -> Dict[str, paddle.nn.Layer]:
    """Every module of `layer` that carries an adapter (peft LoRA/DoRA layers, LyCORIS wrappers, LoCon)."""
    from ppdiffusers.peft.tuners.lora.layer import LoraLayer

    from ppdreambooth.modeling.lycoris import LycorisAdapter

    return {name: sub for name, sub in layer.named_sublayers() if isinstance(sub, (LoraLayer, LycorisAdapter))}


def adapter_parameters(module: paddle.nn.Layer) -> List[paddle.Tensor]:
    """The adapter's own parameters of an adapted module (not its frozen base layer's)."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module.base_layer
    frozen = {id(p) for p in base.parameters()}
    return [p for p in module.parameters() if id(p) not in frozen]


def check_blocks_used(denoiser: paddle.nn.Layer, settings: Dict[str, Sequence[BlockValue]]) -> None:
    """Refuse a block setting that covers no adapted module (e.g. `down.0` of a UNet whose first down block has no
    attention): it would silently do nothing."""
    blocks = [block_of(name) for name in adapted_modules(denoiser)]
    for flag, entries in settings.items():
        for entry in entries:
            if not any(b is not None and entry.covers(*b) for b in blocks):
                raise ConfigError(f"--{flag}: block '{entry.label}' holds none of the adapted modules (no "
                                  "attention or --lora_layers target there); drop it or adapt modules there.")


def set_block_learning_rates(denoiser: paddle.nn.Layer, block_lr: Sequence[BlockValue]) -> None:
    """Give each block's adapters their learning-rate multiplier (`optimize_attr["learning_rate"]`, which Paddle's
    and ppdreambooth's optimizers multiply the scheduled rate by, as for the text-encoder rate). A multiplier of 0
    freezes them outright (no gradient, no optimizer state, not in checkpoints: they keep their initial values,
    which the seeded start reproduces on resume)."""
    if not block_lr:
        return
    for name, module in adapted_modules(denoiser).items():
        multiplier = value_for(block_lr, name, 1.0)
        if multiplier == 1.0:
            continue
        for param in adapter_parameters(module):
            if param.stop_gradient:  # frozen for another reason (SD3's last add_q_proj)
                continue
            param.optimize_attr["learning_rate"] = multiplier
            if multiplier == 0:
                param.stop_gradient = True


def component_counts(layer: paddle.nn.Layer) -> Tuple[int, int]:
    """(adapted modules, trained adapter parameters) of one trained component."""
    modules = adapted_modules(layer)
    trained = sum(int(p.numel()) for m in modules.values() for p in adapter_parameters(m) if not p.stop_gradient)
    return len(modules), trained


def targets_chosen(model_args) -> bool:
    """Whether a run chose where its adapters go (a --lora_layers other than attn, --text_encoder_lora_layers
    attn_mlp, a --lora_block_* flag). Only then do the header, the closing summary and the model card describe the
    targets: a run with the defaults reads as it did before these flags existed."""
    return (getattr(model_args, "lora_layers", None) not in (None, "attn")
            or getattr(model_args, "text_encoder_lora_layers", None) not in (None, "attn")
            or any(getattr(model_args, flag, None) for flag in ("lora_block_ranks", "lora_block_alphas",
                                                                 "lora_block_lr")))


def adapter_summary(model, model_args) -> str:
    """The header's adapter line after the parameter count: per component the target choice, its adapted modules and
    trained parameters, and the per-block settings."""
    parts = []
    for name, layer in model.trained_layers().items():
        modules, trained = component_counts(layer)
        if not modules:
            continue
        if name == model.family.denoiser:
            choice = model_args.lora_layers or "attn"
        else:
            choice = model_args.text_encoder_lora_layers or "attn"
        choice = choice if len(choice) <= 40 else choice[:37] + "..."
        parts.append(f"{name} {choice}: {modules} modules, {trained:,}")
    blocks = [f"{flag.rsplit('_', 1)[-1]} {describe(entries)}" for flag, entries in
              (("block_ranks", model.lora.block_ranks), ("block_alphas", model.lora.block_alphas),
               ("block_lr", model.lora.block_lr)) if entries]
    return "; ".join(parts) + ("; blocks: " + ", ".join(blocks) if blocks else "")


__all__ = ["adapted_modules", "adapter_parameters", "adapter_summary", "check_blocks_used", "check_targets_found",
           "component_counts", "denoiser_targets", "matches", "module_patterns", "set_block_learning_rates",
           "text_encoder_targets"]
