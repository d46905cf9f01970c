"""Runs in the PyTorch environment (torch + diffusers from PyPI), never imports Paddle.

    python diffusers_client.py unet <pipeline_dir or file> <inputs.npz> <outputs.npz> [--lora <file or dir>]
        [--single_file_config <diffusers folder>]
    python diffusers_client.py unet_sdxl <pipeline_dir or file> <inputs.npz> <outputs.npz> [--lora <file or dir>]
        [--single_file_config <diffusers folder>]
    python diffusers_client.py sd3 <pipeline_dir> <inputs.npz> <outputs.npz> [--lora <file or dir>]
        [--merge_lora <file>]
    python diffusers_client.py make_tiny <out_dir>

`unet`: loads a diffusers pipeline folder (optionally with LoRA weights) and writes the text encoder's
hidden states and the UNet's prediction for the given inputs (latents, timesteps, input_ids).
`unet_sdxl`: the same for a StableDiffusionXLPipeline, conditioned as SDXL was trained: `hidden` is the
concatenated penultimate hidden states of both text encoders, `pooled` the second encoder's projected
output, and `pred` the UNet's prediction given those and the inputs' `time_ids` (input_ids feed both
encoders unless the inputs have input_ids_2).
`sd3`: loads a diffusers StableDiffusion3Pipeline folder, optionally with LoRA weights through its
`load_lora_weights` (`--lora`), or with a LoRA file merged into the weights as ComfyUI applies one
(`--merge_lora`), and writes the transformer's prediction `pred` for the inputs' latents, timesteps,
encoder_hidden_states and pooled_projections. With input_ids in the inputs it also writes SD3's conditioning
from the folder's text encoders (`hidden`, `pooled`; input_ids_2 defaults to input_ids, T5 reads input_ids_3).
`make_tiny`: builds a tiny random Stable Diffusion pipeline with diffusers and saves it (diffusers layout).
"""
import os
import sys

import numpy as np
import torch


def run_unet(pipeline_dir, inputs_path, outputs_path, lora=None, single_file_config=None):
    from diffusers import StableDiffusionPipeline

    if single_file_config:  # `pipeline_dir` is a single-file checkpoint; the architecture comes from a folder
        pipe = StableDiffusionPipeline.from_single_file(pipeline_dir, config=single_file_config,
                                                        safety_checker=None, requires_safety_checker=False)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir, safety_checker=None, requires_safety_checker=False)
    if lora:
        folder, name = (os.path.dirname(lora), os.path.basename(lora)) if os.path.isfile(lora) else (lora, None)
        pipe.load_lora_weights(folder, weight_name=name)
    data = np.load(inputs_path)
    with torch.no_grad():
        hidden = pipe.text_encoder(torch.from_numpy(data["input_ids"]))[0]
        pred = pipe.unet(torch.from_numpy(data["latents"]), torch.from_numpy(data["timesteps"]), hidden).sample
    np.savez(outputs_path, hidden=hidden.numpy(), pred=pred.numpy())


def load_sdxl(source, single_file_config=None):
    """A StableDiffusionXLPipeline from a diffusers folder, or from a single file with its configs from a folder."""
    from diffusers import StableDiffusionXLPipeline

    if single_file_config:
        return StableDiffusionXLPipeline.from_single_file(source, config=single_file_config, add_watermarker=False)
    return StableDiffusionXLPipeline.from_pretrained(source, add_watermarker=False)


def sdxl_outputs(pipe, data):
    """Prompt embedding, pooled embedding and UNet prediction of an SDXL pipeline for the inputs in `data`."""
    ids = torch.from_numpy(data["input_ids"])
    ids_2 = torch.from_numpy(data["input_ids_2"]) if "input_ids_2" in data else ids
    with torch.no_grad():
        first = pipe.text_encoder(ids, output_hidden_states=True)
        second = pipe.text_encoder_2(ids_2, output_hidden_states=True)
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        pooled = second.text_embeds
        added = {"text_embeds": pooled, "time_ids": torch.from_numpy(data["time_ids"])}
        pred = pipe.unet(torch.from_numpy(data["latents"]), torch.from_numpy(data["timesteps"]), hidden,
                         added_cond_kwargs=added).sample
    return {"hidden": hidden.numpy(), "pooled": pooled.numpy(), "pred": pred.numpy()}


def run_unet_sdxl(source, inputs_path, outputs_path, lora=None, single_file_config=None):
    pipe = load_sdxl(source, single_file_config)
    if lora:
        folder, name = (os.path.dirname(lora), os.path.basename(lora)) if os.path.isfile(lora) else (lora, None)
        pipe.load_lora_weights(folder, weight_name=name)
    np.savez(outputs_path, **sdxl_outputs(pipe, dict(np.load(inputs_path))))


def load_sd3(source):
    """A StableDiffusion3Pipeline from a diffusers folder, T5's tokenizer left out: transformers reads the tiny
    model's sentencepiece file only with the sentencepiece package, which this environment does not have (token
    ids come from the inputs instead). A folder without T5 loads as diffusers documents it, text_encoder_3=None."""
    from diffusers import StableDiffusion3Pipeline

    absent = {} if os.path.isdir(os.path.join(source, "text_encoder_3")) else {"text_encoder_3": None}
    return StableDiffusion3Pipeline.from_pretrained(source, tokenizer_3=None, **absent)


def merge_lora_as_comfyui(transformer, path):
    """Add each adapter's `lora_B @ lora_A` to the weight it adapts, as ComfyUI's LoRA loader applies a
    `<module>.lora_A/lora_B.weight` pair: scaled by alpha / rank when the file has `<module>.alpha`, else by 1."""
    from safetensors.torch import load_file

    state = load_file(path)
    weights = dict(transformer.named_parameters())
    with torch.no_grad():
        for key, down in state.items():
            if not key.endswith(".lora_A.weight"):
                continue
            module = key[:-len(".lora_A.weight")]
            up = state[f"{module}.lora_B.weight"]
            alpha = state.get(f"{module}.alpha")
            scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
            weights[module[len("transformer."):] + ".weight"] += scale * (up @ down)


def sd3_conditioning(pipe, data):
    """SD3's prompt and pooled embeddings from token ids: both CLIPs' penultimate hidden states side by side,
    zero-padded to T5's width, followed along the sequence by T5's last hidden state (zeros without T5); the
    pooled embedding is both CLIP projections side by side."""
    ids = torch.from_numpy(data["input_ids"])
    ids_2 = torch.from_numpy(data["input_ids_2"]) if "input_ids_2" in data else ids
    with torch.no_grad():
        first = pipe.text_encoder(ids, output_hidden_states=True)
        second = pipe.text_encoder_2(ids_2, output_hidden_states=True)
        clip = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        if pipe.text_encoder_3 is not None:
            t5 = pipe.text_encoder_3(torch.from_numpy(data["input_ids_3"]))[0]
        else:
            t5 = torch.zeros(clip.shape[0], clip.shape[1], pipe.transformer.config.joint_attention_dim)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        hidden = torch.cat([clip, t5], dim=-2)
        pooled = torch.cat([first.text_embeds, second.text_embeds], dim=-1)
    return {"hidden": hidden.numpy(), "pooled": pooled.numpy()}


def sd3_prediction(transformer, data):
    """The SD3 transformer's output for the inputs' latents, timesteps (sigma x 1000) and conditioning."""
    with torch.no_grad():
        pred = transformer(hidden_states=torch.from_numpy(data["latents"]),
                           timestep=torch.from_numpy(data["timesteps"]),
                           encoder_hidden_states=torch.from_numpy(data["encoder_hidden_states"]),
                           pooled_projections=torch.from_numpy(data["pooled_projections"])).sample
    return pred.numpy()


def run_sd3(source, inputs_path, outputs_path, lora=None, merge_lora=None):
    pipe = load_sd3(source)
    if lora:
        folder, name = (os.path.dirname(lora), os.path.basename(lora)) if os.path.isfile(lora) else (lora, None)
        pipe.load_lora_weights(folder, weight_name=name)
    if merge_lora:
        merge_lora_as_comfyui(pipe.transformer, merge_lora)
    data = dict(np.load(inputs_path))
    outputs = {"pred": sd3_prediction(pipe.transformer, data)}
    if "input_ids" in data:
        outputs.update(sd3_conditioning(pipe, data))
    np.savez(outputs_path, **outputs)


def _tiny_tokenizer_module():
    """ppdreambooth/families/tiny.py loaded by path: the package's __init__ imports Paddle, absent here."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "..", "ppdreambooth", "families", "tiny.py")
    spec = importlib.util.spec_from_file_location("ppdreambooth_tiny", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_tiny(out_dir):
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32)
    vae = AutoencoderKL(block_out_channels=[16, 16, 32, 32], layers_per_block=1, norm_num_groups=8, in_channels=3,
                        out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, sample_size=64)
    tok_dir = os.path.join(out_dir, "_tok")
    vocab_size = _tiny_tokenizer_module().write_tiny_tokenizer(tok_dir)  # the same vocabulary as ppdreambooth.families.tiny
    tokenizer = CLIPTokenizer(os.path.join(tok_dir, "vocab.json"), os.path.join(tok_dir, "merges.txt"),
                              model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id, hidden_size=32, intermediate_size=37,
                                                layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=5,
                                                vocab_size=vocab_size))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out_dir)
    import shutil

    for name in ("vocab.json", "merges.txt"):  # as hub folders have them (transformers 5 saves only tokenizer.json)
        shutil.copy(os.path.join(tok_dir, name), os.path.join(out_dir, "tokenizer", name))
    shutil.rmtree(tok_dir)


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "unet":
        lora = sys.argv[sys.argv.index("--lora") + 1] if "--lora" in sys.argv else None
        config = sys.argv[sys.argv.index("--single_file_config") + 1] if "--single_file_config" in sys.argv else None
        run_unet(sys.argv[2], sys.argv[3], sys.argv[4], lora, config)
    elif command == "unet_sdxl":
        lora = sys.argv[sys.argv.index("--lora") + 1] if "--lora" in sys.argv else None
        config = sys.argv[sys.argv.index("--single_file_config") + 1] if "--single_file_config" in sys.argv else None
        run_unet_sdxl(sys.argv[2], sys.argv[3], sys.argv[4], lora, config)
    elif command == "sd3":
        lora = sys.argv[sys.argv.index("--lora") + 1] if "--lora" in sys.argv else None
        merge = sys.argv[sys.argv.index("--merge_lora") + 1] if "--merge_lora" in sys.argv else None
        run_sd3(sys.argv[2], sys.argv[3], sys.argv[4], lora, merge)
    elif command == "make_tiny":
        make_tiny(sys.argv[2])
    else:
        raise SystemExit(f"unknown command {command}")
