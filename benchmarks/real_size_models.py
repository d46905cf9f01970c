"""Real-size pipeline folders with random weights, no download: SD 1.5, SD 2.1 (768, v-prediction), SDXL base, SD3 Medium.

    python benchmarks/real_size_models.py /work/realsize-models [--family sd15 sd21 sdxl sd3]
                                          [--layout ppdiffusers diffusers] [--seed 0]

For benchmarks only (memory and time at the real architectures); nothing here is on the user path. Each folder
`<out>/<family>-<layout>` has the published component configurations (the parameter-shaping fields of
runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1, stabilityai/stable-diffusion-xl-base-1.0 and
stabilityai/stable-diffusion-3-medium-diffusers; denoisers as in `memory_estimate.py`), in one of the two
layouts users bring:
- `ppdiffusers`: `unet|vae/diffusion_paddle_model.safetensors` (metadata format=pd) and `text_encoder*/model.safetensors`
  (format=np), Paddle's layout (Linear weights [in, out]) - what ppdiffusers' `save_pretrained` writes and reads;
- `diffusers`: `unet|transformer|vae/diffusion_pytorch_model.safetensors` and `text_encoder*/model.safetensors` in
  PyTorch's layout (Linear weights [out, in], format=pt) - what ppdiffusers converts with `from_diffusers=True`.

Fast: the networks are built under `paddle.LazyGuard` (no weights allocated), only to list parameter names and
shapes; each tensor is then drawn from a seeded NumPy generator and streamed into the safetensors file, one tensor
in memory at a time (the safetensors package writes only whole dicts, hence the hand-written writer). Values:
norm weights 1, biases 0, matrices normal with std 1/sqrt(fan-in) (embeddings 0.02): finite losses, not images.
Tokenizers: the real CLIP BPE vocabulary cannot be built offline, so every tokenizer is the character-level one of
`ppdreambooth.families.tiny` (77 tokens per prompt as the real ones) over encoders with the real vocabulary size
49,408. **SD3's T5-XXL (4.76 B parameters, 19 GB in float32) is omitted**: the folder records it as absent, as the
hub's SD3 folders without T5 do, and the pipeline and trainer replace its output with zeros (its memory would only
show before caching releases it: `memory_estimate.py` gives its size).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ppdreambooth  # noqa: F401,E402  (the peft backend switch before ppdiffusers)
from memory_estimate import CLIP_BIG_G, CLIP_L, DENOISERS  # noqa: E402

VAE_4 = dict(in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=[128, 256, 512, 512],
             down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4,
             norm_num_groups=32)
OPEN_CLIP_H = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                   num_attention_heads=16, projection_dim=512, hidden_act="gelu")
SD21_UNET = dict(DENOISERS["sd15"], attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                 use_linear_projection=True, sample_size=96)
# family -> (tiny family to take model_index/tokenizers/scheduler from, denoiser, denoiser config, vae config,
#            [(text encoder folder, class, config)], scheduler overrides)
FAMILIES = {
    "sd15": ("sd", "unet", DENOISERS["sd15"], dict(VAE_4, sample_size=512, scaling_factor=0.18215),
             [("text_encoder", "CLIPTextModel", dict(CLIP_L, hidden_act="quick_gelu"))], {}),
    "sd21": ("sd", "unet", SD21_UNET, dict(VAE_4, sample_size=768, scaling_factor=0.18215),
             [("text_encoder", "CLIPTextModel", OPEN_CLIP_H)], {"prediction_type": "v_prediction"}),
    "sdxl": ("sdxl", "unet", DENOISERS["sdxl"], dict(VAE_4, sample_size=1024, scaling_factor=0.13025),
             [("text_encoder", "CLIPTextModel", dict(CLIP_L, hidden_act="quick_gelu")),
              ("text_encoder_2", "CLIPTextModelWithProjection", dict(CLIP_BIG_G, hidden_act="gelu"))], {}),
    "sd3": ("sd3", "transformer", DENOISERS["sd3"],
            dict(VAE_4, latent_channels=16, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
                 use_quant_conv=False, use_post_quant_conv=False),
            [("text_encoder", "CLIPTextModelWithProjection", dict(CLIP_L, hidden_act="quick_gelu", projection_dim=768)),
             ("text_encoder_2", "CLIPTextModelWithProjection", dict(CLIP_BIG_G, hidden_act="gelu"))], {}),
}
DENOISER_CLASSES = {"unet": "UNet2DConditionModel", "transformer": "SD3Transformer2DModel"}
WEIGHT_FILES = {("ppdiffusers", "model"): "diffusion_paddle_model.safetensors",
                ("diffusers", "model"): "diffusion_pytorch_model.safetensors",
                ("ppdiffusers", "text"): "model.safetensors", ("diffusers", "text"): "model.safetensors"}


def lazy_layer(build):
    """`build()` under paddle.LazyGuard (no weights allocated), weight initialisation skipped (PaddleNLP's
    initialisers write into the unallocated tensors)."""
    import paddle
    from paddlenlp.transformers.model_utils import PretrainedModel

    stock = PretrainedModel.init_weights
    PretrainedModel.init_weights = lambda self: None
    try:
        with paddle.LazyGuard():
            return build()
    finally:
        PretrainedModel.init_weights = stock


def parameter_table(layer) -> list:
    """[(name, shape, kind)] of a layer's float parameters; kind: "linear" (Paddle [in, out]), "embedding",
    "norm" (1-D weight), "bias" or "conv"."""
    import paddle

    linear = {id(sub.weight) for sub in layer.sublayers() if isinstance(sub, paddle.nn.Linear)}
    embedding = {id(sub.weight) for sub in layer.sublayers() if isinstance(sub, paddle.nn.Embedding)}
    table = []
    for name, param in layer.named_parameters():
        shape = tuple(param.shape)
        if id(param) in linear:
            kind = "linear"
        elif id(param) in embedding:
            kind = "embedding"
        elif len(shape) == 1:
            kind = "bias" if name.endswith("bias") else "norm"
        else:
            kind = "conv"
        table.append((name, shape, kind))
    return table


def random_tensor(rng, shape, kind) -> np.ndarray:
    if kind == "norm":
        return np.ones(shape, np.float32)
    if kind == "bias":
        return np.zeros(shape, np.float32)
    fan_in = shape[0] if kind == "linear" else int(np.prod(shape[1:]))
    std = 0.02 if kind == "embedding" else 1.0 / np.sqrt(fan_in)
    values = rng.standard_normal(shape, dtype=np.float32)
    values *= std
    return values


def write_safetensors(path: str, table: list, rng, torch_layout: bool, metadata_format: str) -> int:
    """Stream random float32 tensors for `table` into a safetensors file; returns the bytes written."""
    header, offset, stored = {"__metadata__": {"format": metadata_format}}, 0, []
    for name, shape, kind in table:
        out_shape = tuple(reversed(shape)) if torch_layout and kind == "linear" else shape
        size = int(np.prod(out_shape)) * 4
        header[name] = {"dtype": "F32", "shape": list(out_shape), "data_offsets": [offset, offset + size]}
        stored.append((shape, kind))
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for shape, kind in stored:
            values = random_tensor(rng, shape, kind)
            if torch_layout and kind == "linear":
                values = np.ascontiguousarray(values.T)
            f.write(values.tobytes())
            del values
    return offset


def write_component(folder: str, layer, config_writer, file_name: str, rng, torch_layout: bool, fmt: str) -> int:
    os.makedirs(folder, exist_ok=True)
    config_writer(folder)
    return write_safetensors(os.path.join(folder, file_name), parameter_table(layer), rng, torch_layout, fmt)


def build_real_size(family: str, layout: str, out_dir: str, seed: int = 0) -> dict:
    """Write one pipeline folder; returns {component: parameter count}."""
    import ppdiffusers
    import ppdiffusers.transformers as transformers

    from ppdreambooth.families.tiny import build_tiny_pipeline

    tiny_family, denoiser, denoiser_config, vae_config, encoders, schedule = FAMILIES[family]
    torch_layout = layout == "diffusers"
    rng = np.random.default_rng(seed)
    tmp = tempfile.mkdtemp()
    try:  # model_index.json, tokenizers and the scheduler come from the tiny pipeline of the same family
        build_tiny_pipeline(tmp, family=tiny_family, with_t5=False)
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.makedirs(out_dir)
        for name in os.listdir(tmp):
            if name == "model_index.json" or name.startswith("tokenizer") or name == "scheduler":
                (shutil.copy if name.endswith(".json") else shutil.copytree)(os.path.join(tmp, name),
                                                                           os.path.join(out_dir, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if schedule:
        path = os.path.join(out_dir, "scheduler", "scheduler_config.json")
        with open(path) as f:
            config = json.load(f)
        config.update(schedule)
        with open(path, "w") as f:
            json.dump(config, f, indent=2)
    counts = {}
    model_fmt = "pt" if torch_layout else "pd"
    model_file = WEIGHT_FILES[(layout, "model")]
    for name, cls, config in ((denoiser, DENOISER_CLASSES[denoiser], denoiser_config),
                              ("vae", "AutoencoderKL", vae_config)):
        layer = lazy_layer(lambda: getattr(ppdiffusers, cls)(**config))
        write_component(os.path.join(out_dir, name), layer, layer.save_config, model_file, rng, torch_layout,
                        model_fmt)
        counts[name] = sum(int(np.prod(p.shape)) for p in layer.parameters())
    for name, cls, fields in encoders:
        config = transformers.CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1,
                                             max_position_embeddings=77, **fields)
        layer = lazy_layer(lambda: getattr(transformers, cls)(config))
        tokens = os.path.join(out_dir, name.replace("text_encoder", "tokenizer"), "vocab.json")
        with open(tokens) as f:  # the character-level tokenizer's special ids, inside the real vocabulary
            vocab = json.load(f)
        config.bos_token_id, config.eos_token_id = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
        config.pad_token_id = config.eos_token_id
        config.architectures = [cls]
        write_component(os.path.join(out_dir, name), layer, config.save_pretrained, WEIGHT_FILES[(layout, "text")],
                        rng, torch_layout, "pt" if torch_layout else "np")
        counts[name] = sum(int(np.prod(p.shape)) for p in layer.parameters())
    with open(os.path.join(out_dir, "real_size_model.json"), "w") as f:
        json.dump({"family": family, "layout": layout, "seed": seed, "parameters": counts,
                   "note": "random weights (benchmarks/real_size_models.py); character-level tokenizers"
                           + ("; T5 omitted" if family == "sd3" else "")}, f, indent=2)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--family", nargs="+", choices=sorted(FAMILIES), default=["sd15"])
    parser.add_argument("--layout", nargs="+", choices=["ppdiffusers", "diffusers"], default=["ppdiffusers"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for family in args.family:
        for layout in args.layout:
            start = time.time()
            folder = os.path.join(args.out_dir, f"{family}-{layout}")
            counts = build_real_size(family, layout, folder, args.seed)
            print(f"{folder}: {', '.join(f'{k} {v:,}' for k, v in counts.items())} ({time.time() - start:.0f} s)",
                  flush=True)


if __name__ == "__main__":
    main()
