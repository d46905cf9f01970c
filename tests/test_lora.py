"""LoRA: only adapters train, rank/alpha honoured, the saved file loads and reproduces, resume, validation."""
import json
import os
import shutil

import numpy as np
import paddle
import pytest
from PIL import Image
from safetensors.numpy import load_file

from helpers.runs import run_module, train_argv
from helpers.models import make_model, probe
from ppdreambooth.modeling.lora import LORA_WEIGHTS_NAME, lora_parameter_count, save_lora_weights


def lora_model(path, rank=8, alpha=16.0, text_encoder=True):
    return make_model(path, use_lora=True, lora_rank=rank, lora_alpha=alpha, train_text_encoder=text_encoder)


def train_steps(model, steps=3, lr=5e-2):
    optimizer = paddle.optimizer.AdamW(learning_rate=lr, parameters=model.trainable_parameters())
    model.train()
    paddle.seed(0)
    for _ in range(steps):
        pixels, ids = paddle.uniform([2, 3, 64, 64], min=-1, max=1), paddle.randint(0, 500, [2, 77])
        model(pixel_values=pixels, input_ids=ids)["loss"].backward()
        optimizer.step()
        optimizer.clear_grad()
    model.eval()


def test_only_adapters_train_with_the_requested_rank(tiny_model):
    model = lora_model(tiny_model, rank=8, alpha=16.0)
    named = model.trainable_named_parameters()
    assert named and all(".lora_A." in n or ".lora_B." in n for n, _ in named)
    assert {n.split(".")[0] for n, _ in named} == {"unet", "text_encoder"}
    for name, param in named:
        assert 8 in param.shape, (name, param.shape)  # rank-8 matrices
    unet_params = sum(int(p.numel()) for n, p in named if n.startswith("unet."))
    config = json.load(open(os.path.join(tiny_model, "unet", "config.json")))
    assert unet_params == lora_parameter_count(8, config)  # the size formula the README uses

    base = {k: v.numpy().copy() for k, v in model.unet.state_dict().items() if "lora" not in k}
    base_te = {k: v.numpy().copy() for k, v in model.text_encoder.state_dict().items() if "lora" not in k}
    lora_before = {n: p.numpy().copy() for n, p in named}
    train_steps(model)
    for k, v in model.unet.state_dict().items():
        if "lora" not in k:
            assert np.array_equal(v.numpy(), base[k]), k
    for k, v in model.text_encoder.state_dict().items():
        if "lora" not in k:
            assert np.array_equal(v.numpy(), base_te[k]), k
    assert all(not np.array_equal(p.numpy(), lora_before[n]) for n, p in model.trainable_named_parameters()
               if ".lora_B." in n)


def test_saved_adapters_load_and_reproduce_the_trained_model(tiny_model, tmp_path):
    from ppdiffusers import StableDiffusionPipeline

    model = lora_model(tiny_model, rank=8, alpha=16.0)  # alpha != rank: the scale must survive saving
    train_steps(model)
    trained = probe(model.unet, model.text_encoder)
    path = save_lora_weights(str(tmp_path), model.family, model.trained_layers())
    assert os.path.basename(path) == LORA_WEIGHTS_NAME
    saved = load_file(path)
    assert all("lora" in k and k.split(".")[0] in ("unet", "text_encoder") for k in saved)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    base = probe(pipe.unet, pipe.text_encoder)
    pipe.load_lora_weights(str(tmp_path))
    loaded = probe(pipe.unet, pipe.text_encoder)
    for got, want, before in zip(loaded, trained, base):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert np.abs(got - before).max() > 1e-3  # the adapters change the output

    # A UNet-only run loads the same way; its file has no text-encoder keys.
    unet_only = lora_model(tiny_model, rank=4, alpha=4.0, text_encoder=False)
    train_steps(unet_only)
    save_lora_weights(str(tmp_path / "unet_only"), unet_only.family, unet_only.trained_layers())
    assert all(k.startswith("unet.") for k in load_file(str(tmp_path / "unet_only" / LORA_WEIGHTS_NAME)))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipe.load_lora_weights(str(tmp_path / "unet_only"))
    np.testing.assert_allclose(probe(pipe.unet, pipe.text_encoder)[1],
                               probe(unet_only.unet, unet_only.text_encoder)[1], rtol=1e-5, atol=1e-6)


SEED_LORA = ["--gradient_accumulation_steps=1", "--checkpointing_steps=2", "--learning_rate=1e-4",
             "--report_to=visualdl", "--lr_scheduler=constant", "--lr_warmup_steps=0", "--max_train_steps=4",
             "--validation_prompt=A photo of sks dog in a bucket", "--validation_epochs=50", "--lora_rank=4",
             "--seed=0"]


@pytest.mark.slow
def test_seed_lora_command_output_loads_and_reproduces_validation_images(tiny_model, photos, tmp_path):
    from ppdiffusers import StableDiffusionPipeline

    from ppdreambooth.families import get_family
    from ppdreambooth.inference.sampling import generate_images, prepare_for_sampling

    out = tmp_path / "path-to-save-model"
    # The seed README's LoRA command with a local tiny model, 64 px and 4 steps (and fewer sampler steps).
    argv = ["-m", "ppdreambooth.train_lora", f"--pretrained_model_name_or_path={tiny_model}",
            f"--instance_data_dir={photos}", f"--output_dir={out}", "--instance_prompt=a photo of sks dog",
            "--resolution=64", "--train_batch_size=1", *SEED_LORA, "--validation_inference_steps=3",
            "--num_validation_images=2"]
    result = run_module(argv)
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.isfile(out / LORA_WEIGHTS_NAME) and not os.path.exists(out / "unet")
    card = (out / "README.md").read_text()
    assert "load in plain ppdiffusers" in card  # UNet-only adapters: no backend needed
    assert "loading:     plain ppdiffusers" in result.stdout
    # default targets: header, summary and card say nothing of --lora_layers (README "Where adapters go")
    adapter_lines = [line for line in result.stdout.splitlines() if line.lstrip().startswith("adapters:")]
    assert len(adapter_lines) == 2 and adapter_lines[0].endswith("trained parameters"), adapter_lines
    assert "modules:" not in adapter_lines[1] and "Adapter targets" not in card
    assert os.path.getsize(out / LORA_WEIGHTS_NAME) < 200_000
    ckpt = paddle.load(str(out / "checkpoint-4" / "model_state.pdparams"))
    assert ckpt and all(".lora_" in k for k in ckpt)
    final = sorted(os.listdir(out / "validation" / "step-4"))
    assert final == ["image-0.png", "image-1.png"]

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    prepare_for_sampling(pipe, get_family("sd"))
    pipe.load_lora_weights(str(out))
    images = generate_images(pipe, ["A photo of sks dog in a bucket"] * 2, [0, 1], num_inference_steps=3)
    for i, image in enumerate(images):
        expected = np.asarray(Image.open(out / "validation" / "step-4" / f"image-{i}.png")).astype(int)
        assert np.abs(np.asarray(image).astype(int) - expected).max() <= 1


@pytest.mark.slow
def test_lora_resume_and_validation_leave_training_unchanged(tiny_model, photos, tmp_path):
    extra = ["--use_lora", "--lora_rank", "4", "--random_flip", "--checkpointing_steps", "2",
             "--train_text_encoder", "--lr_scheduler", "linear"]
    plain = tmp_path / "plain"
    assert run_module(["-m", "ppdreambooth.train", *train_argv(tiny_model, photos, plain, 5, extra)]).returncode == 0
    reference = load_file(str(plain / LORA_WEIGHTS_NAME))
    assert any(k.startswith("text_encoder.") for k in reference)

    validated = tmp_path / "validated"
    result = run_module(["-m", "ppdreambooth.train", *train_argv(tiny_model, photos, validated, 5, extra + [
        "--validation_prompt", "a photo of sks dog", "--validation_steps", "1", "--num_validation_images", "1",
        "--validation_inference_steps", "2"])])
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(validated / "validation")) == [f"step-{i}" for i in range(1, 6)]
    with_validation = load_file(str(validated / LORA_WEIGHTS_NAME))

    resumed = tmp_path / "resumed"
    shutil.copytree(plain, resumed)
    for name in ("checkpoint-4", LORA_WEIGHTS_NAME):
        path = resumed / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    result = run_module(["-m", "ppdreambooth.train", *train_argv(tiny_model, photos, resumed, 5, extra + [
        "--resume_from_checkpoint", "latest"])])
    assert result.returncode == 0, result.stderr[-3000:]
    after_resume = load_file(str(resumed / LORA_WEIGHTS_NAME))

    for other in (with_validation, after_resume):
        assert other.keys() == reference.keys()
        for k in reference:
            assert np.array_equal(other[k], reference[k]), k


def _reference_outputs(model, inputs):
    """What the trained model computes for the client's inputs (UNet prediction, first encoder's states)."""
    data = {k: paddle.to_tensor(v) for k, v in inputs.items()}
    tokens = {k: v for k, v in data.items() if k.startswith("input_ids")}
    with paddle.no_grad():
        cond = model.family.encode_prompt(model.text_encoders(), tokens, model.denoiser.config)
        cond.update({k: data[k] for k in ("time_ids",) if k in data})
        pred = model.family.predict(model.unet, data["latents"], data["timesteps"], cond)
        hidden = model.text_encoder(data["input_ids"])[0]
    return pred.numpy(), hidden.numpy()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_unet_adapters_load_without_ppdreambooth(family, tiny_model, tiny_sdxl_model, tmp_path):
    """In a fresh session that never imports ppdreambooth: the plain ppdiffusers loaders (load_lora_weights,
    and the seed README's unet.load_attn_procs) and the peft backend all reproduce the trained UNet;
    text-encoder adapters load under the peft backend."""
    from helpers.runs import ROOT

    base = tiny_model if family == "sd" else tiny_sdxl_model
    rng = np.random.RandomState(0)
    inputs = {"latents": rng.standard_normal((2, 4, 8, 8)).astype("float32"),
              "timesteps": np.array([10, 700], dtype="int64"), "input_ids": rng.randint(0, 500, (2, 77))}
    if family == "sdxl":
        inputs.update(input_ids_2=rng.randint(0, 500, (2, 77)),
                      time_ids=np.array([[64, 64, 0, 0, 64, 64]] * 2, dtype="float32"))
    np.savez(tmp_path / "inputs.npz", **inputs)
    client = os.path.join(ROOT, "tests", "helpers", "plain_lora_client.py")

    def load(mode, folder, how, model=base):
        out = tmp_path / f"{mode}-{how}-{os.path.basename(folder)}.npz"
        result = run_module([client, mode, model, str(folder), how, str(tmp_path / "inputs.npz"), str(out)])
        assert result.returncode == 0, result.stderr[-3000:]
        loaded = np.load(out)
        return loaded["pred"], loaded["hidden"]

    cases = [("unet_only", False, [("plain", "load_lora_weights"), ("plain", "load_attn_procs"),
                                   ("peft", "load_lora_weights")]),
             ("with_text_encoder", True, [("peft", "load_lora_weights")])]
    for name, text_encoder, loaders in cases:
        model = lora_model(base, rank=4, alpha=8.0, text_encoder=text_encoder)
        if family == "sdxl":
            optimizer = paddle.optimizer.AdamW(learning_rate=5e-2, parameters=model.trainable_parameters())
            model.train()
            paddle.seed(0)
            for _ in range(3):
                model(pixel_values=paddle.uniform([2, 3, 64, 64], min=-1, max=1),
                      input_ids=paddle.randint(0, 500, [2, 77]), input_ids_2=paddle.randint(0, 500, [2, 77]),
                      time_ids=paddle.to_tensor(inputs["time_ids"]))["loss"].backward()
                optimizer.step()
                optimizer.clear_grad()
            model.eval()
        else:
            train_steps(model)
        folder = tmp_path / name
        save_lora_weights(str(folder), model.family, model.trained_layers())
        assert any(".lora.down.weight" in k for k in load_file(str(folder / LORA_WEIGHTS_NAME)))
        want_pred, want_hidden = _reference_outputs(model, inputs)
        for mode, how in loaders:
            pred, hidden = load(mode, folder, how)
            np.testing.assert_allclose(pred, want_pred, rtol=1e-5, atol=1e-5, err_msg=f"{name} {mode} {how}")
            np.testing.assert_allclose(hidden, want_hidden, rtol=1e-5, atol=1e-5, err_msg=f"{name} {mode} {how}")
        if text_encoder:  # the way without any LoRA loader: adapters folded into a full pipeline folder
            from ppdreambooth.interop.exports import export

            merged = tmp_path / f"merged-{name}"
            export(str(folder), "merged", str(merged), model_family=family, base_model=base)
            pred, hidden = load("plain", folder, "none", model=str(merged))  # the merged folder, no LoRA
            np.testing.assert_allclose(pred, want_pred, rtol=1e-5, atol=1e-5, err_msg="merged")
            np.testing.assert_allclose(hidden, want_hidden, rtol=1e-5, atol=1e-5, err_msg="merged")
