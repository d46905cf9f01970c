"""SDXL in the PyTorch world: a full fine-tune exported as a diffusers folder and as an sd_xl_base-layout
single file, a LoRA exported for diffusers and in kohya's SDXL layout, all giving diffusers the numbers
Paddle computes; and training from an SDXL single file.

The client (torch + diffusers from PyPI) lives in its own environment; `bash tests/run.sh` prepares it
and exports PPDB_TORCH_PYTHON. Its side runs tests/helpers/diffusers_client.py and never imports Paddle.

The full fine-tune uses a tiny SDXL whose second text encoder is wider than the first (48 vs 32
channels), as in the real model (1280 vs 768): diffusers' `from_single_file` tells the two CLIP
encoders of an SDXL file apart by width, and with equal widths it would load `text_encoder_2` from
the first encoder's weights.
"""
import os
import re
import shutil

import numpy as np
import paddle
import pytest
from safetensors.numpy import load_file

from helpers.photos import write_photos
from helpers.runs import client, run_module, train_argv

pytestmark = pytest.mark.slow
COMPONENT_FILES = {"unet": "diffusion_paddle_model.safetensors", "vae": "diffusion_paddle_model.safetensors",
                   "text_encoder": "model.safetensors", "text_encoder_2": "model.safetensors"}


def build_two_width_sdxl(out_dir):
    """The tiny SDXL with a 48-channel second text encoder (the UNet's cross attention reads 32 + 48)."""
    from ppdiffusers import UNet2DConditionModel
    from ppdiffusers.transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from ppdreambooth.families.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(out_dir, seed=0, family="sdxl")
    paddle.seed(1)
    with paddle.utils.unique_name.guard():
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig(**{**pipe.text_encoder_2.config.to_dict(), "hidden_size": 48}))
        unet = UNet2DConditionModel.from_config({**pipe.unet.config, "cross_attention_dim": 80})
    for name, model in (("text_encoder_2", text_encoder_2), ("unet", unet)):
        shutil.rmtree(os.path.join(out_dir, name))
        model.save_pretrained(os.path.join(out_dir, name), safe_serialization=True)
    return out_dir


@pytest.fixture(scope="module")
def two_width_sdxl(tmp_path_factory):
    return build_two_width_sdxl(str(tmp_path_factory.mktemp("models") / "tiny-sdxl-two-widths"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Latents, timesteps, size conditioning, and token ids shaped like the tokenizer's (start token, a few
    random tokens, then end-of-text padding: the pooled embedding is read at the first end token)."""
    rng = np.random.RandomState(0)
    ids = rng.randint(0, 500, (2, 77)).astype("int64")
    ids[:, 0], ids[0, 9:], ids[1, 30:] = 512, 513, 513  # the tiny vocabulary's start and end tokens
    data = dict(latents=rng.standard_normal((2, 4, 8, 8)).astype("float32"),
                timesteps=np.array([10, 700], dtype="int64"), input_ids=ids,
                time_ids=np.array([[64, 64, 0, 0, 64, 64], [96, 80, 8, 4, 64, 64]], dtype="float32"))
    path = tmp_path_factory.mktemp("inputs") / "inputs.npz"
    np.savez(path, **data)
    return path, data


def paddle_outputs(pipe, data):
    """What the client computes, in Paddle, through the family's own conditioning code."""
    from ppdreambooth.families import get_family

    family = get_family("sdxl")
    with paddle.no_grad():
        tokens = {"input_ids": paddle.to_tensor(data["input_ids"]), "input_ids_2": paddle.to_tensor(data["input_ids"])}
        conditioning = family.encode_prompt({"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2},
                                            tokens)
        conditioning["time_ids"] = paddle.to_tensor(data["time_ids"])
        pred = family.predict(pipe.unet, paddle.to_tensor(data["latents"]), paddle.to_tensor(data["timesteps"]),
                              conditioning)
    return {"hidden": conditioning["prompt_embeds"].numpy(), "pooled": conditioning["pooled_prompt_embeds"].numpy(),
            "pred": pred.numpy()}


def load_paddle_sdxl(path):
    from ppdreambooth.families import get_family

    return get_family("sdxl").load_pipeline(str(path))


def assert_close(got, want, rel=1e-4, label=""):
    """Largest difference of each output, relative to the largest value, at most `rel` (printed for -rP)."""
    errors = {key: float(np.abs(got[key] - want[key]).max() / np.abs(want[key]).max())
              for key in ("hidden", "pooled", "pred")}
    print(label, {key: f"{error:.1e}" for key, error in errors.items()})
    assert all(error <= rel for error in errors.values()), (label, errors)


def first_loss(run_dir):
    """The loss logged at the first step (--logging_steps 1), from the run's full log (the Trainer's line)."""
    with open(os.path.join(run_dir, "train.log"), encoding="utf-8") as f:
        return float(re.search(r"\bloss: ([0-9.eE+-]+)", f.read()).group(1))


def sdxl_argv(model, photos, out, steps, extra=()):
    """A short SDXL run at the tiny model's size, with the text encoders trained (so that every exported
    component differs from the base model)."""
    return ["-m", "ppdreambooth.train", *train_argv(model, photos, out, steps=steps,
                                                    extra=["--train_text_encoder", *extra])]


@pytest.fixture(scope="module")
def full_run(two_width_sdxl, tmp_path_factory):
    """A 2-step full fine-tune, exported at the end as a diffusers folder and as a single file."""
    folder = tmp_path_factory.mktemp("full")
    photos = write_photos(folder / "instance")
    out = folder / "out"
    result = run_module(sdxl_argv(two_width_sdxl, photos, out, 2, ["--export_formats", "diffusers,single-file"]))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, photos


def test_full_fine_tune_exports_to_diffusers_and_single_file(torch_python, two_width_sdxl, full_run, inputs,
                                                             tmp_path):
    out = full_run[0]
    diffusers_dir, single_file = out / "export-diffusers", out / "export-single-file" / "model.safetensors"
    assert (diffusers_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (diffusers_dir / "text_encoder_2" / "model.safetensors").is_file()
    keys = load_file(str(single_file))
    assert "model.diffusion_model.label_emb.0.0.weight" in keys  # SDXL's added embedding, SGM names
    assert "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight" in keys
    assert any(k.startswith("first_stage_model.encoder.down.") for k in keys)
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys
    assert keys["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (144, 48)
    assert keys["conditioner.embedders.1.model.text_projection"].shape == (48, 32)  # OpenCLIP's [width, proj]
    assert not any(k.startswith(("model.diffusion_model.down_blocks", "cond_stage_model.")) for k in keys)

    expected = paddle_outputs(load_paddle_sdxl(out), inputs[1])
    base = paddle_outputs(load_paddle_sdxl(two_width_sdxl), inputs[1])
    for key in ("hidden", "pooled", "pred"):  # training moved UNet and both text encoders: exports must carry that
        assert np.abs(expected[key] - base[key]).max() / np.abs(base[key]).max() > 1e-3, key
    client(torch_python, "unet_sdxl", diffusers_dir, inputs[0], tmp_path / "folder.npz")
    assert_close(dict(np.load(tmp_path / "folder.npz")), expected, label="diffusers folder")
    client(torch_python, "unet_sdxl", single_file, inputs[0], tmp_path / "file.npz", "--single_file_config",
           diffusers_dir)
    assert_close(dict(np.load(tmp_path / "file.npz")), expected, label="single file")


def test_training_starts_from_an_sdxl_single_file(two_width_sdxl, full_run, tmp_path):
    """The base model as a single file: converting it back gives the base's weights bit for bit, and training
    from it starts exactly as training from the folder did (same first loss)."""
    from ppdreambooth.interop.single_file import write_single_file

    folder_run, photos = full_run
    base_file = write_single_file(two_width_sdxl, str(tmp_path / "base.safetensors"))
    out = tmp_path / "from-file"
    result = run_module(sdxl_argv(base_file, photos, out, 1, ["--single_file_config", two_width_sdxl]))
    assert result.returncode == 0, result.stderr[-3000:]
    converted = out / ".base-from-single-file"
    for name, file in COMPONENT_FILES.items():
        want, got = load_file(os.path.join(two_width_sdxl, name, file)), load_file(str(converted / name / file))
        assert set(got) == set(want), name
        assert all(np.array_equal(got[k], want[k]) for k in want), name
    print("first loss from the file", first_loss(out), "from the folder", first_loss(folder_run))
    assert first_loss(out) == pytest.approx(first_loss(folder_run), rel=1e-6)


def test_single_file_of_another_architecture_is_refused(tiny_model, tiny_sdxl_model, two_width_sdxl, tmp_path):
    """An SD 1.x file, or an SDXL file of other widths, with an SDXL --single_file_config: a clear error, not
    a model with weights silently left at their initial values."""
    from ppdreambooth.errors import ConfigError
    from ppdreambooth.interop.single_file import read_single_file, write_single_file

    sd_file = write_single_file(tiny_model, str(tmp_path / "sd.safetensors"))
    with pytest.raises(ConfigError, match="not a StableDiffusionXLPipeline single file"):
        read_single_file(sd_file, two_width_sdxl, str(tmp_path / "a"))
    wide_file = write_single_file(two_width_sdxl, str(tmp_path / "wide.safetensors"))
    with pytest.raises(ConfigError, match="other shapes than --single_file_config"):
        read_single_file(wide_file, tiny_sdxl_model, str(tmp_path / "b"))
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")

def test_lora_exports_load_in_diffusers_and_kohya_reads_back(torch_python, tiny_sdxl_model, photos, inputs, tmp_path):
    """LoRA on the UNet and both text encoders, exported for diffusers and in kohya's SDXL layout: both load
    with diffusers' StableDiffusionXLPipeline.load_lora_weights and give Paddle's numbers; ppdiffusers reads
    the kohya file back."""
    from ppdreambooth.export import main as export_main

    out = tmp_path / "lora"
    extra = ["--use_lora", "--lora_rank", "4", "--lora_alpha", "8", "--export_formats", "diffusers,kohya"]
    result = run_module(sdxl_argv(tiny_sdxl_model, photos, out, 2, extra))
    assert result.returncode == 0, result.stderr[-3000:]
    diffusers_lora = out / "export-diffusers" / "pytorch_lora_weights.safetensors"
    kohya_lora = out / "export-kohya" / "lora_kohya.safetensors"
    kohya = load_file(str(kohya_lora))
    assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k.lora_down.weight" in kohya  # SGM names
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_out_0.alpha" in kohya
    assert "lora_unet_output_blocks_2_1_transformer_blocks_0_attn1_to_q.lora_up.weight" in kohya
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in kohya
    assert "lora_te2_text_model_encoder_layers_4_self_attn_out_proj.lora_up.weight" in kohya
    assert not any("down_blocks" in k or "lora_te_" in k for k in kohya)
    assert all(float(v) == 4.0 for k, v in kohya.items() if k.endswith(".alpha"))

    base = load_paddle_sdxl(tiny_sdxl_model)
    base_outputs = paddle_outputs(base, inputs[1])
    base.save_pretrained(str(tmp_path / "base_diffusers"), to_diffusers=True)
    base.load_lora_weights(str(out))
    expected = paddle_outputs(base, inputs[1])
    for key in ("hidden", "pooled", "pred"):  # the adapters of all three models changed something
        assert np.abs(expected[key] - base_outputs[key]).max() > 1e-3, key

    for label, lora in (("diffusers LoRA", diffusers_lora), ("kohya LoRA", kohya_lora)):
        client(torch_python, "unet_sdxl", tmp_path / "base_diffusers", inputs[0], tmp_path / "t.npz", "--lora", lora)
        assert_close(dict(np.load(tmp_path / "t.npz")), expected, label=label)

    again = load_paddle_sdxl(tiny_sdxl_model)
    again.load_lora_weights(str(kohya_lora.parent), weight_name=kohya_lora.name)  # ppdiffusers reads kohya back
    assert_close(paddle_outputs(again, inputs[1]), expected, label="kohya in ppdiffusers")

    # the export command: the family and base model come from the model card, or from the flags without it
    os.remove(out / "README.md")
    assert export_main([str(out), "--format", "kohya", "--out", str(tmp_path / "k.safetensors")]) == 2
    assert export_main([str(out), "--format", "kohya", "--out", str(tmp_path / "k.safetensors"),
                        "--model_family", "sdxl", "--base_model", tiny_sdxl_model]) == 0
    again = load_file(str(tmp_path / "k.safetensors"))
    assert set(again) == set(kohya) and all(np.array_equal(again[k], kohya[k]) for k in kohya)


def test_sdxl_key_maps():
    """The pure maps: OpenCLIP fusing and its inverse, the added embedding, kohya's SDXL names."""
    from ppdreambooth.interop.keymaps_sdxl import kohya_lora_name, open_clip_from_hf, open_clip_to_hf, unet_key_to_sgm

    rng = np.random.RandomState(0)
    hf = {f"text_model.encoder.layers.0.self_attn.{p}_proj.{w}": rng.rand(*((8, 8) if w == "weight" else (8,)))
          for p in "qkvo" for w in ("weight", "bias")}
    hf = {k.replace("o_proj", "out_proj"): v for k, v in hf.items()}
    hf.update({"text_projection.weight": rng.rand(4, 8), "text_model.final_layer_norm.weight": rng.rand(8),
               "text_model.embeddings.position_embedding.weight": rng.rand(77, 8)})
    open_clip = open_clip_from_hf(hf)
    layer = "transformer.resblocks.0.attn."
    assert sorted(open_clip) == ["ln_final.weight", "positional_embedding", "text_projection",
                                 *(layer + name for name in ("in_proj_bias", "in_proj_weight", "out_proj.bias",
                                                             "out_proj.weight"))]
    assert np.array_equal(open_clip["transformer.resblocks.0.attn.in_proj_weight"][8:16],
                          hf["text_model.encoder.layers.0.self_attn.k_proj.weight"])
    assert np.array_equal(open_clip["text_projection"], hf["text_projection.weight"].T)
    back = open_clip_to_hf({**open_clip, "logit_scale": np.ones(())})  # OpenCLIP's extra scalar is skipped
    assert set(back) == set(hf) and all(np.array_equal(back[k], hf[k]) for k in hf)

    config = {"layers_per_block": 2, "up_block_types": ["CrossAttnUpBlock2D"] * 2 + ["UpBlock2D"]}
    assert unet_key_to_sgm("add_embedding.linear_2.weight", config) == "label_emb.0.2.weight"
    assert unet_key_to_sgm("up_blocks.1.upsamplers.0.conv.bias", config) == "output_blocks.5.2.conv.bias"
    assert (kohya_lora_name("unet", "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_out.0", config)
            == "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_out_0")
    assert (kohya_lora_name("text_encoder_2", "text_model.encoder.layers.31.self_attn.v_proj", config)
            == "lora_te2_text_model_encoder_layers_31_self_attn_v_proj")
