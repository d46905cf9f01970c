"""The PyTorch world as the real client: exports load in diffusers with the same numbers, kohya LoRA
reads back in ppdiffusers, training starts from a diffusers-format model, and the generate command.

The client (torch + diffusers from PyPI) lives in its own environment; `bash tests/run.sh` prepares it
and exports PPDB_TORCH_PYTHON. Its side runs tests/helpers/diffusers_client.py and never imports Paddle.
"""
import os

import numpy as np
import paddle
import pytest
from PIL import Image

from helpers.runs import client, run_module, train_argv
from ppdreambooth.interop.exports import lora_to_kohya

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    rng = np.random.RandomState(0)
    data = dict(latents=rng.standard_normal((2, 4, 8, 8)).astype("float32"),
                timesteps=np.array([10, 700], dtype="int64"), input_ids=rng.randint(0, 500, (2, 77)).astype("int64"))
    path = tmp_path_factory.mktemp("inputs") / "inputs.npz"
    np.savez(path, **data)
    return path, data


def paddle_outputs(pipe, data):
    with paddle.no_grad():
        hidden = pipe.text_encoder(paddle.to_tensor(data["input_ids"]))[0]
        pred = pipe.unet(paddle.to_tensor(data["latents"]), paddle.to_tensor(data["timesteps"]), hidden).sample
    return {"hidden": hidden.numpy(), "pred": pred.numpy()}


def assert_close(got, want, rel=1e-4):
    for key in ("hidden", "pred"):
        error = np.abs(got[key] - want[key]).max() / np.abs(want[key]).max()
        assert error <= rel, (key, error)


def export(*args):
    result = run_module(["-m", "ppdreambooth.export", *map(str, args)])
    assert result.returncode == 0, result.stderr[-3000:]


def test_full_fine_tune_exports_to_diffusers(torch_python, tiny_model, photos, inputs, tmp_path):
    from ppdiffusers import StableDiffusionPipeline

    out = tmp_path / "out"
    assert run_module(["-m", "ppdreambooth.train", *train_argv(tiny_model, photos, out, steps=2)]).returncode == 0
    export(out, "--format", "diffusers", "--out", tmp_path / "diffusers")
    assert (tmp_path / "diffusers" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    client(torch_python, "unet", tmp_path / "diffusers", inputs[0], tmp_path / "torch.npz")
    expected = paddle_outputs(StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None), inputs[1])
    assert_close(dict(np.load(tmp_path / "torch.npz")), expected)
    bad = run_module(["-m", "ppdreambooth.export", str(out), "--format", "kohya", "--out", str(tmp_path / "k")])
    assert bad.returncode == 2 and "full fine-tune" in bad.stderr


def test_lora_exports_load_in_diffusers_and_kohya_reads_back(torch_python, tiny_model, photos, inputs, tmp_path):
    from ppdiffusers import StableDiffusionPipeline

    out = tmp_path / "lora"
    argv = train_argv(tiny_model, photos, out, steps=2, extra=["--use_lora", "--train_text_encoder",
                                                                "--lora_rank", "4", "--lora_alpha", "8",
                                                                "--export_formats", "diffusers,kohya"])
    result = run_module(["-m", "ppdreambooth.train", *argv])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "export-diffusers" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "export-kohya" / "lora_kohya.safetensors").is_file()
    assert "export-kohya" in result.stdout and (out / "README.md").is_file()
    base = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    base_outputs = paddle_outputs(base, inputs[1])
    base.save_pretrained(str(tmp_path / "base_diffusers"), to_diffusers=True)
    base.load_lora_weights(str(out))
    expected = paddle_outputs(base, inputs[1])
    assert np.abs(expected["pred"] - base_outputs["pred"]).max() > 1e-3

    export(out, "--format", "diffusers", "--out", tmp_path / "d")
    export(out, "--format", "kohya", "--out", tmp_path / "k" / "sks.safetensors")
    from safetensors.numpy import load_file

    kohya = load_file(str(tmp_path / "k" / "sks.safetensors"))
    assert any(k.startswith("lora_unet_") for k in kohya) and any(k.startswith("lora_te_text_model_") for k in kohya)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in kohya)
    for lora in (tmp_path / "d" / "pytorch_lora_weights.safetensors", tmp_path / "k" / "sks.safetensors"):
        client(torch_python, "unet", tmp_path / "base_diffusers", inputs[0], tmp_path / "t.npz", "--lora", lora)
        assert_close(dict(np.load(tmp_path / "t.npz")), expected)

    again = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    again.load_lora_weights(str(tmp_path / "k"), weight_name="sks.safetensors")  # ppdiffusers reads kohya back
    assert_close(paddle_outputs(again, inputs[1]), expected)


def test_training_starts_from_a_diffusers_folder(torch_python, photos, inputs, tmp_path):
    from ppdiffusers import StableDiffusionPipeline

    source = tmp_path / "made_by_diffusers"
    client(torch_python, "make_tiny", source)
    assert (source / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    out = tmp_path / "out"
    result = run_module(["-m", "ppdreambooth.train", *train_argv(str(source), photos, out, steps=2)])
    assert result.returncode == 0, result.stderr[-3000:]
    # the frozen text encoder came across intact: same hidden states as diffusers computes
    client(torch_python, "unet", source, inputs[0], tmp_path / "source.npz")
    ours = paddle_outputs(StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None), inputs[1])
    np.testing.assert_allclose(ours["hidden"], np.load(tmp_path / "source.npz")["hidden"], rtol=1e-4, atol=1e-5)


def test_generate_command(tiny_model, tmp_path):
    out = tmp_path / "samples"
    argv = ["-m", "ppdreambooth.generate", "--model", tiny_model, "--prompt", "a photo of sks dog",
            "--prompt", "a dog on a beach", "--num_images", "2", "--steps", "3", "--seed", "5", "--out", str(out)]
    result = run_module(argv)
    assert result.returncode == 0, result.stderr[-3000:]
    files = sorted(os.listdir(out))
    assert files == ["00-00-a-photo-of-sks-dog-seed5.png", "00-01-a-photo-of-sks-dog-seed6.png",
                     "01-00-a-dog-on-a-beach-seed5.png", "01-01-a-dog-on-a-beach-seed6.png", "grid.png"]
    assert Image.open(out / "grid.png").size == (128, 128)
    first = np.asarray(Image.open(out / files[0]))
    assert run_module(argv[:-1] + [str(tmp_path / "again")]).returncode == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again" / files[0])), first)  # seeded


def test_kohya_key_names():
    state = {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_A.weight": np.ones((32, 4)),
             "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_B.weight": np.ones((4, 32)),
             "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": np.ones((16, 4))}
    kohya = lora_to_kohya(state)
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0"
    assert kohya[f"{name}.lora_down.weight"].shape == (4, 32) and kohya[f"{name}.lora_up.weight"].shape == (32, 4)
    assert float(kohya[f"{name}.alpha"]) == 4.0
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in kohya


def test_single_file_export_loads_in_diffusers_and_trains_back(torch_python, photos, inputs, tmp_path):
    """A tiny model made by diffusers -> our single file -> diffusers' from_single_file gives the same
    outputs as the original folder; training then starts from that single file."""
    from ppdiffusers import StableDiffusionPipeline

    source = tmp_path / "made_by_diffusers"
    client(torch_python, "make_tiny", source)
    out = tmp_path / "out"
    assert run_module(["-m", "ppdreambooth.train", *train_argv(str(source), photos, out, steps=2)]).returncode == 0
    export(out, "--format", "single-file", "--out", tmp_path / "sks.safetensors")
    from safetensors.numpy import load_file

    keys = load_file(str(tmp_path / "sks.safetensors"))
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    assert any(k.startswith("first_stage_model.encoder.down.") for k in keys)
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in keys)
    client(torch_python, "unet", tmp_path / "sks.safetensors", inputs[0], tmp_path / "sf.npz",
           "--single_file_config", source)
    expected = paddle_outputs(StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None), inputs[1])
    assert_close(dict(np.load(tmp_path / "sf.npz")), expected)

    again = tmp_path / "from_single_file"
    argv = train_argv(str(tmp_path / "sks.safetensors"), photos, again, steps=1)
    refused = run_module(["-m", "ppdreambooth.train", *argv])
    assert refused.returncode == 2 and "--single_file_config" in refused.stderr
    result = run_module(["-m", "ppdreambooth.train", *argv, "--single_file_config", str(source)])
    assert result.returncode == 0, result.stderr[-3000:]
    # the imported base is exactly the exported model
    base = StableDiffusionPipeline.from_pretrained(str(again / ".base-from-single-file"), safety_checker=None)
    assert_close(paddle_outputs(base, inputs[1]), expected, rel=1e-6)


def test_generate_with_an_ancestral_sampler_depends_only_on_the_seed(tiny_model, tmp_path):
    """euler_a draws noise at every step; each image is still a function of its seed alone."""
    def run(out, seed, prompts):
        argv = ["-m", "ppdreambooth.generate", "--model", tiny_model, *sum((["--prompt", p] for p in prompts), []),
                "--num_images", "1", "--steps", "3", "--seed", str(seed), "--scheduler", "euler_a", "--out", str(out)]
        assert run_module(argv).returncode == 0
        return {n: np.asarray(Image.open(out / n), dtype=np.int16) for n in os.listdir(out) if n != "grid.png"}

    once = run(tmp_path / "a", 3, ["a photo of sks dog"])
    again = run(tmp_path / "b", 3, ["a dog on a beach", "a photo of sks dog"])  # other images drawn before it
    other = run(tmp_path / "c", 4, ["a photo of sks dog"])
    image = once["00-00-a-photo-of-sks-dog-seed3.png"]
    assert np.array_equal(again["01-00-a-photo-of-sks-dog-seed3.png"], image)
    assert np.abs(other["00-00-a-photo-of-sks-dog-seed4.png"] - image).max() > 0
