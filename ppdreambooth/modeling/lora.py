"""LoRA adapters through ppdiffusers' own peft backend, saved in the file its loaders read.

The modules adapted are the family's (`ModelFamily.denoiser_lora_targets`, `text_encoder_lora_targets`):
for SD and SDXL the q, k, v and output projections of every UNet attention block and, with
`--train_text_encoder`, of each text encoder's self-attention. `--lora_layers` / `--text_encoder_lora_layers`
choose others (`ppdreambooth.modeling.lora_targets`) and `--lora_block_ranks` / `--lora_block_alphas` give the
modules of some blocks another rank or alpha (`config.lora_blocks`; PEFT's rank_pattern / alpha_pattern). Base
weights are frozen.

The saved `paddle_lora_weights.safetensors` is what `pipe.load_lora_weights(dir)` (and
`pipe.unet.load_attn_procs(dir)` for the UNet part) reads; see `save_lora_weights` for its key names. That loader assumes alpha == rank, so each
module's alpha / rank (`--lora_alpha`, or its block's) is baked into its saved up-projection (B * alpha / rank):
the loaded adapters then compute exactly what the trained ones did, whatever each module's rank.

`--lora_type dora` makes the same adapters and turns each into DoRA (`ppdreambooth.modeling.dora`): a magnitude per
output feature is added, saved beside A and B as `<module>.lora_magnitude_vector` (the PEFT / diffusers key).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import paddle

from ppdreambooth.config.lora_blocks import BlockValue

LORA_WEIGHTS_NAME = "paddle_lora_weights.safetensors"
LOCON_WEIGHTS_NAME = "paddle_locon_weights.safetensors"  # --lora_type lora --conv_rank: the convolutions' adapters
LORA_STAGING_NAME = ".lora-staging"  # written there first, then moved into place
MAGNITUDE = "lora_magnitude_vector"  # DoRA's magnitude: PEFT's (and diffusers') name, `<module>.lora_magnitude_vector`


@dataclass(frozen=True)
class LoraSpec:
    """The adapters of a LoRA run: rank, alpha (adapters are scaled by alpha/rank) and the denoiser modules they go
    on (empty: the family's default targets; one name may be a preset of `config.arguments.DENOISER_PRESETS`)."""

    rank: int
    alpha: float
    denoiser_targets: Tuple[str, ...] = ()
    lora_type: str = "lora"  # or "dora" (ppdreambooth.modeling.dora), "loha" / "lokr" (modeling.lycoris)
    lokr_factor: int = -1  # LoKr's split of each dimension (modeling.lycoris.factorization)
    conv_rank: Optional[int] = None  # LoHa/LoKr on the UNet's 3x3 convolutions too (`--conv_rank`)
    conv_alpha: Optional[float] = None
    text_encoder_targets: Optional[str] = None  # `--text_encoder_lora_layers` attn (None) or attn_mlp
    # per-block settings of the denoiser (`config.lora_blocks`): ranks, alphas, learning-rate multipliers
    block_ranks: Tuple[BlockValue, ...] = ()
    block_alphas: Tuple[BlockValue, ...] = ()
    block_lr: Tuple[BlockValue, ...] = ()


def lora_config(rank: int, alpha: float, targets, patterns: Optional[Dict[str, Tuple[int, float]]] = None):
    """PEFT's LoraConfig; `patterns` gives some modules (by full name) their own (rank, alpha)."""
    from ppdiffusers.peft import LoraConfig

    patterns = patterns or {}
    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets),
                      rank_pattern={name: r for name, (r, _) in patterns.items()},
                      alpha_pattern={name: a for name, (_, a) in patterns.items()})


def add_lora(layer, targets: Sequence[str], rank: int, alpha: float,
             patterns: Optional[Dict[str, Tuple[int, float]]] = None) -> None:
    """Freeze `layer` and add trainable LoRA layers to its modules named `targets` (DoRA: `modeling.dora.add_dora`);
    `patterns` (full module name -> (rank, alpha)) overrides `rank` and `alpha` for some of them."""
    from ppdiffusers import ModelMixin
    from ppdiffusers.peft import inject_adapter_in_model

    for param in layer.parameters():
        param.stop_gradient = True
    config = lora_config(rank, alpha, targets, patterns)
    if isinstance(layer, ModelMixin):  # a ppdiffusers model (UNet, transformer): its own method
        layer.add_adapter(config)
    else:
        # CLIPTextModel.add_adapter imports the PyTorch `peft` package (a ppdiffusers 0.29.0 bug), so the
        # adapter is injected directly, exactly as that method would do with ppdiffusers' own peft.
        inject_adapter_in_model(config, layer, "default")


def module_scales(layer) -> Dict[str, float]:
    """alpha / rank of every peft LoRA (or DoRA) module of `layer`, by module name."""
    from ppdiffusers.peft.tuners.lora.layer import LoraLayer

    return {name: float(sub.scaling["default"]) for name, sub in layer.named_sublayers() if isinstance(sub, LoraLayer)}


def adapter_state_dict(layer) -> Dict[str, paddle.Tensor]:
    """The layer's LoRA weights in the loaders' layout, with each module's own alpha / rank folded into its lora_B
    (and DoRA's magnitudes, `<module>.lora_magnitude_vector`, as they are: the norm they divide by is that of
    W + A @ B * alpha / rank, the same with the scale in B)."""
    from ppdiffusers.peft.utils import get_peft_model_state_dict

    scales = module_scales(layer)
    state = get_peft_model_state_dict(layer)
    out = {}
    for key, value in state.items():
        scale = scales[key.rsplit(".lora_", 1)[0]] if ".lora_B." in key else 1.0
        out[key] = (value * scale if scale != 1 else value).astype("float32")
    return out


def is_dora_state(state) -> bool:
    """Whether a saved adapter state (our keys, diffusers' or kohya's) holds DoRA magnitudes."""
    return any(k.endswith(("." + MAGNITUDE, ".dora_scale")) for k in state)


def adapter_ranks(path: str) -> Dict[str, Dict[str, int]]:
    """component -> {module: rank} of a saved LoRA file (ours, Paddle's layout, or a PyTorch one: `format=pt`),
    read from the down matrices' shapes without loading them."""
    from safetensors import safe_open

    ranks: Dict[str, Dict[str, int]] = {}
    with safe_open(path, framework="np") as f:
        torch_layout = (f.metadata() or {}).get("format") == "pt"
        for key in f.keys():
            for suffix in (".lora_A.weight", ".lora.down.weight"):
                if key.endswith(suffix):
                    shape = f.get_slice(key).get_shape()
                    component, module = key[: -len(suffix)].split(".", 1)
                    ranks.setdefault(component, {})[module] = int(shape[0] if torch_layout else shape[-1])
    return ranks


def has_mixed_ranks(path: str) -> bool:
    """Whether some component of a saved LoRA file has modules of different ranks (`--lora_block_ranks`)."""
    return any(len(set(modules.values())) > 1 for modules in adapter_ranks(path).values())


def to_legacy_keys(state: Dict[str, paddle.Tensor]) -> Dict[str, paddle.Tensor]:
    """peft names (`<module>.lora_A.weight` / `.lora_B.weight`) -> the attention-processor names
    (`<module>.lora.down.weight` / `.lora.up.weight`), same tensors."""
    return {k.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight"): v
            for k, v in state.items()}


def to_peft_keys(state: dict) -> dict:
    """The reverse of `to_legacy_keys`: a saved file's keys in peft names, whichever way it was written."""
    return {k.replace(".lora.down.weight", ".lora_A.weight").replace(".lora.up.weight", ".lora_B.weight"): v
            for k, v in state.items()}


def save_lora_weights(out_dir: str, family, layers: Dict[str, paddle.nn.Layer]) -> str:
    """Write `paddle_lora_weights.safetensors` into `out_dir` (atomically) with the adapters of `layers`
    (component name -> layer, e.g. unet, text_encoder, text_encoder_2); returns its path. Each module's scale
    (alpha / rank) is read from the module itself (per-block ranks and alphas differ).

    UNet adapters (SD, SDXL) are written with the attention-processor names (`...lora.down.weight`): measured
    on ppdiffusers 0.29, those load exactly both in a plain session (`load_lora_weights`, the seed's
    `unet.load_attn_procs`) and under the peft backend, where peft names crash the plain loader. Text
    encoders and SD3's transformer keep peft names: ppdiffusers 0.29 loads them only under its peft backend.
    """
    from ppdreambooth.modeling.lycoris import lycoris_layers

    kinds = {sub.kind for layer in layers.values() for sub in lycoris_layers(layer).values()}
    if kinds - {"locon"}:  # LoHa / LoKr: one LyCORIS file
        staging = os.path.join(out_dir, LORA_STAGING_NAME)
        shutil.rmtree(staging, ignore_errors=True)
        save_lycoris_weights(os.path.join(staging, LORA_WEIGHTS_NAME), layers)
        target = os.path.join(out_dir, LORA_WEIGHTS_NAME)
        os.replace(os.path.join(staging, LORA_WEIGHTS_NAME), target)
        shutil.rmtree(staging, ignore_errors=True)
        return target
    if kinds:  # LoCon: the convolutions' adapters in a file of their own, which ppdiffusers' loader never sees
        partial = os.path.join(out_dir, LOCON_WEIGHTS_NAME + ".partial")
        save_lycoris_weights(partial, layers)
        os.replace(partial, os.path.join(out_dir, LOCON_WEIGHTS_NAME))
    return write_lora_states(out_dir, family, {name: adapter_state_dict(layer) for name, layer in layers.items()})


def write_lora_states(out_dir: str, family, states: Dict[str, dict]) -> str:
    """Write adapters given as component -> {`<module>.lora_A.weight`: [in, r], `.lora_B.weight`: [r, out]} (Paddle
    tensors or NumPy arrays, alpha / rank in B) as `save_lora_weights` does: same file, same key layout."""
    staging = os.path.join(out_dir, LORA_STAGING_NAME)
    shutil.rmtree(staging, ignore_errors=True)
    states = dict(states)
    if family.legacy_lora_keys and family.denoiser in states:
        states[family.denoiser] = to_legacy_keys(states[family.denoiser])
    family.save_lora(staging, LORA_WEIGHTS_NAME, states)
    written = _components_in(os.path.join(staging, LORA_WEIGHTS_NAME))
    if written != {name for name, state in states.items() if state}:
        # ppdiffusers' SDXL save_lora_weights, e.g., writes text-encoder adapters only when both encoders have them
        raise ValueError(f"the pipeline's save_lora_weights wrote adapters of {sorted(written)} out of "
                         f"{sorted(states)}")
    target = os.path.join(out_dir, LORA_WEIGHTS_NAME)
    os.replace(os.path.join(staging, LORA_WEIGHTS_NAME), target)
    shutil.rmtree(staging, ignore_errors=True)
    return target


def _components_in(path: str) -> set:
    from safetensors import safe_open

    with safe_open(path, framework="np") as f:
        return {key.split(".", 1)[0] for key in f.keys()}


def save_lycoris_weights(path: str, layers: Dict[str, paddle.nn.Layer]) -> None:
    """LoHa/LoKr adapters (`modeling.lycoris`) as `<component>.<module>.<LyCORIS key>` in PyTorch's layout (the
    matrices as LyCORIS files hold them) plus `.alpha`; ppdiffusers cannot load these (its loaders know LoRA
    only): `ppdreambooth.generate`/`evaluate` and `export --format merged` fold them into the base weights."""
    from safetensors.numpy import save_file

    from ppdreambooth.modeling.lycoris import lycoris_state_dict

    state = {f"{component}.{key}": value for component, layer in layers.items()
             for key, value in lycoris_state_dict(layer).items()}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(state, path, metadata={"format": "pt"})


def lora_parameter_count(rank: int, unet_config: dict, dora: bool = False) -> int:
    """Parameters of rank-`rank` UNet adapters on to_q/to_k/to_v/to_out.0, from a UNet config alone.

    Each adapted Linear(in, out) adds rank * (in + out), and with `dora` its magnitude, out more (every adapted
    projection of a block outputs the block's width: 8 * width per block). Per transformer block: self-attention
    (attn1) maps width->width four times; cross-attention (attn2) reads the text width for k and v.
    `transformer_layers_per_block` may be one number or one per level (SDXL: 1, 2, 10; the mid block
    uses the deepest level's).
    """
    widths = list(unet_config["block_out_channels"])
    layers = unet_config.get("layers_per_block", 2)
    depth = unet_config.get("transformer_layers_per_block", 1)
    depths = list(depth) if isinstance(depth, (list, tuple)) else [depth] * len(widths)
    cross = unet_config["cross_attention_dim"]
    cross_down = [t.startswith("CrossAttn") for t in unet_config["down_block_types"]]
    cross_up = [t.startswith("CrossAttn") for t in unet_config["up_block_types"]]

    def block(width: int, blocks: int) -> int:
        attn1 = 4 * rank * (width + width)
        attn2 = rank * (2 * width) + 2 * rank * (cross + width) + rank * (2 * width)
        return blocks * (attn1 + attn2 + (8 * width if dora else 0))

    total = sum(layers * block(w, d) for w, d, c in zip(widths, depths, cross_down) if c)
    total += sum((layers + 1) * block(w, d) for w, d, c in zip(widths[::-1], depths[::-1], cross_up) if c)
    if unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn":
        total += block(widths[-1], depths[-1])
    return total
