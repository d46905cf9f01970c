"""SD3 in the PyTorch world: a full fine-tune exported as a diffusers folder and a LoRA exported for diffusers
(`StableDiffusion3Pipeline.load_lora_weights`), both giving diffusers the numbers Paddle computes; the LoRA file
is also the ComfyUI SD3 LoRA (checked by its keys and by merging it the way ComfyUI does); the kohya and
single-file exports are refused with a message saying what to use instead.

The client (torch + diffusers from PyPI) lives in its own environment; `bash tests/run.sh` prepares it and
exports PPDB_TORCH_PYTHON. Its side runs tests/helpers/diffusers_client.py and never imports Paddle. It has no
sentencepiece, so the T5 tokenizer is not loaded there: token ids come from the inputs.
"""
import json
import os
import shutil

import numpy as np
import paddle
import pytest
from safetensors.numpy import load_file

from helpers.photos import write_photos
from helpers.runs import client, run_module, train_argv

pytestmark = pytest.mark.slow
# The adapted modules of each joint block; ComfyUI maps each one onto its MMDiT weights (comfy/utils.py,
# mmdit_to_diffusers): to_q/to_k/to_v and add_*_proj onto slices of the fused qkv, to_out.0 and to_add_out
# onto the two attention output projections.
SD3_LORA_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


@pytest.fixture(scope="module")
def sd3_without_t5(tiny_sd3_model, tmp_path_factory):
    """The tiny SD3 with its T5 left out (no text_encoder_3/, tokenizer_3/; null in model_index.json), as
    `build_tiny_pipeline(with_t5=False)` writes it, but with the same transformer as `tiny_sd3_model`, so that
    adapters trained on that model apply here unchanged."""
    path = tmp_path_factory.mktemp("models") / "tiny-sd3-no-t5"
    shutil.copytree(tiny_sd3_model, path, ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3"))
    index = json.loads((path / "model_index.json").read_text())
    index.update({"text_encoder_3": [None, None], "tokenizer_3": [None, None]})
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return str(path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Latents, timesteps (sigma x 1000), a conditioning for the transformer alone, and token ids shaped like the
    tokenizers' (CLIP: start token, random tokens, then end-of-text padding; T5: pieces, end, then padding)."""
    rng = np.random.RandomState(0)
    clip_ids = rng.randint(0, 500, (2, 77)).astype("int64")
    clip_ids[:, 0], clip_ids[0, 9:], clip_ids[1, 30:] = 512, 513, 513  # the tiny vocabulary's start and end
    t5_ids = rng.randint(3, 32, (2, 77)).astype("int64")
    t5_ids[0, 8], t5_ids[0, 9:], t5_ids[1, 20], t5_ids[1, 21:] = 1, 0, 1, 0  # T5's end and padding ids
    data = dict(latents=rng.standard_normal((2, 16, 8, 8)).astype("float32"),
                timesteps=np.array([30.0, 870.0], dtype="float32"),
                encoder_hidden_states=rng.standard_normal((2, 154, 96)).astype("float32"),
                pooled_projections=rng.standard_normal((2, 64)).astype("float32"),
                input_ids=clip_ids, input_ids_3=t5_ids)
    path = tmp_path_factory.mktemp("inputs") / "inputs.npz"
    np.savez(path, **data)
    return path, data


def load_paddle_sd3(path):
    from ppdreambooth.families import get_family

    return get_family("sd3").load_pipeline(str(path))


def paddle_prediction(transformer, data):
    """What the client's `pred` is, in Paddle, through the family's own denoiser call."""
    from ppdreambooth.families import get_family

    conditioning = {"prompt_embeds": paddle.to_tensor(data["encoder_hidden_states"]),
                    "pooled_prompt_embeds": paddle.to_tensor(data["pooled_projections"])}
    with paddle.no_grad():
        return get_family("sd3").predict(transformer, paddle.to_tensor(data["latents"]),
                                         paddle.to_tensor(data["timesteps"]), conditioning).numpy()


def paddle_conditioning(pipe, data):
    """What the client's `hidden` and `pooled` are, in Paddle, through the family's own prompt encoding."""
    from ppdreambooth.families import get_family

    ids = paddle.to_tensor(data["input_ids"])
    tokens = {"input_ids": ids, "input_ids_2": ids, "input_ids_3": paddle.to_tensor(data["input_ids_3"])}
    encoders = {name: getattr(pipe, name) for name in ("text_encoder", "text_encoder_2", "text_encoder_3")}
    with paddle.no_grad():
        conditioning = get_family("sd3").encode_prompt(encoders, tokens, pipe.transformer.config)
    return {"hidden": conditioning["prompt_embeds"].numpy(), "pooled": conditioning["pooled_prompt_embeds"].numpy()}


def paddle_outputs(pipe, data):
    return {"pred": paddle_prediction(pipe.transformer, data), **paddle_conditioning(pipe, data)}


def relative_error(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


def assert_close(got, want, keys, rel=1e-4, label=""):
    """Largest difference of each output, relative to the largest value, at most `rel` (printed for -rP)."""
    errors = {key: relative_error(got[key], want[key]) for key in keys}
    print(label, {key: f"{error:.1e}" for key, error in errors.items()})
    assert all(error <= rel for error in errors.values()), (label, errors)


def sd3_train(model, photos, out, extra, learning_rate="1e-3"):
    """A 2-step SD3 run at the tiny model's size, in a fresh process."""
    argv = train_argv(model, photos, out, steps=2, extra=extra)
    argv[argv.index("--learning_rate") + 1] = learning_rate
    result = run_module(["-m", "ppdreambooth.train", *argv])
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def lora_run(tiny_sd3_model, tmp_path_factory):
    """A LoRA run on the tiny SD3, exported for diffusers at the end of training."""
    folder = tmp_path_factory.mktemp("lora")
    photos = write_photos(folder / "instance")
    extra = ["--use_lora", "--lora_rank", "4", "--lora_alpha", "8", "--export_formats", "diffusers"]
    return sd3_train(tiny_sd3_model, photos, folder / "out", extra, learning_rate="1e-2")  # adapters start at 0


@pytest.fixture(scope="module")
def base_diffusers(sd3_without_t5, tmp_path_factory):
    """The SD3 without T5 exported as a diffusers folder (the base the LoRA files load over)."""
    from ppdreambooth.interop.exports import export

    folder = tmp_path_factory.mktemp("base") / "diffusers"
    export(sd3_without_t5, "diffusers", str(folder))
    return folder


@pytest.fixture(scope="module")
def lora_expected(sd3_without_t5, lora_run, inputs):
    """Paddle's outputs of the base model without T5, and with the run's adapters (ppdiffusers' loader)."""
    pipe = load_paddle_sd3(sd3_without_t5)
    base = paddle_outputs(pipe, inputs[1])
    pipe.load_lora_weights(str(lora_run))
    return base, paddle_outputs(pipe, inputs[1])


def test_full_fine_tune_exports_to_diffusers(torch_python, tiny_sd3_model, photos, inputs, tmp_path):
    """Transformer and both CLIP encoders trained, exported as a diffusers folder: diffusers' SD3 pipeline loads
    it and gives Paddle's prediction and conditioning (T5 included). Training also moves the norm biases that
    only ppdiffusers' SD3 transformer has; without the export folding them in, `pred` is off by ~1e-3."""
    out = sd3_train(tiny_sd3_model, photos, tmp_path / "full", ["--train_text_encoder", "--export_formats",
                                                               "diffusers"])
    exported = out / "export-diffusers"
    assert (exported / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert (exported / "text_encoder_3" / "model.safetensors").is_file()

    expected = paddle_outputs(load_paddle_sd3(out), inputs[1])
    base = paddle_outputs(load_paddle_sd3(tiny_sd3_model), inputs[1])
    changes = {key: relative_error(expected[key], base[key]) for key in ("pred", "hidden", "pooled")}
    print("training changed", {key: f"{change:.1e}" for key, change in changes.items()})
    assert all(change > 1e-3 for change in changes.values()), changes  # the export must carry what training did
    client(torch_python, "sd3", exported, inputs[0], tmp_path / "folder.npz")
    assert_close(dict(np.load(tmp_path / "folder.npz")), expected, ("pred", "hidden", "pooled"),
                 label="diffusers folder")


def test_lora_export_loads_in_diffusers(torch_python, base_diffusers, lora_run, lora_expected, inputs, tmp_path):
    """The run's diffusers LoRA, loaded by StableDiffusion3Pipeline.load_lora_weights over its base model exported
    as a diffusers folder (here a folder without T5), gives Paddle's LoRA prediction."""
    base, expected = lora_expected
    print("the adapters changed the prediction by", f"{relative_error(expected['pred'], base['pred']):.1e}")
    assert relative_error(expected["pred"], base["pred"]) > 1e-3
    assert not (base_diffusers / "text_encoder_3").exists()
    client(torch_python, "sd3", base_diffusers, inputs[0], tmp_path / "lora.npz", "--lora",
           lora_run / "export-diffusers" / "pytorch_lora_weights.safetensors")
    got = dict(np.load(tmp_path / "lora.npz"))
    assert_close(got, expected, ("pred",), label="diffusers LoRA")
    assert_close(got, base, ("hidden", "pooled"), label="conditioning without T5")  # LoRA leaves the encoders


def test_the_diffusers_lora_is_the_comfyui_sd3_lora(torch_python, base_diffusers, lora_run, lora_expected, inputs,
                                                    tmp_path):
    """ComfyUI loads SD3 LoRAs keyed `transformer.<diffusers module>.lora_A/lora_B.weight` (comfy/lora.py,
    model_lora_keys_unet, SD3 branch), so the diffusers export is the ComfyUI file. Its keys name exactly the
    adapted modules in that form, in PyTorch's layout, with no `.alpha` (ComfyUI's scale is then 1); and merging
    `lora_B @ lora_A` into the weights, as ComfyUI applies a LoRA, gives Paddle's prediction."""
    lora_file = lora_run / "export-diffusers" / "pytorch_lora_weights.safetensors"
    state = load_file(str(lora_file))
    config = json.loads((base_diffusers / "transformer" / "config.json").read_text())
    layers, width = config["num_layers"], config["num_attention_heads"] * config["attention_head_dim"]
    # the last block keeps no context output, so it has no to_add_out
    expected_modules = {f"transformer.transformer_blocks.{n}.attn.{m}" for n in range(layers)
                        for m in SD3_LORA_MODULES if not (n == layers - 1 and m == "to_add_out")}
    assert set(state) == {f"{m}.lora_{ab}.weight" for m in expected_modules for ab in "AB"}
    assert all(state[f"{m}.lora_A.weight"].shape == (4, width) and state[f"{m}.lora_B.weight"].shape == (width, 4)
               for m in expected_modules)  # PyTorch's layout: down [rank, in], up [out, rank]

    client(torch_python, "sd3", base_diffusers, inputs[0], tmp_path / "merged.npz", "--merge_lora", lora_file)
    assert_close(dict(np.load(tmp_path / "merged.npz")), lora_expected[1], ("pred",), label="merged as ComfyUI does")


def test_kohya_export_is_refused_pointing_to_diffusers(tiny_sd3_model, photos, lora_run, tmp_path, capsys):
    """`--format kohya` of an SD3 LoRA run, and `--export_formats kohya` before an SD3 run, say to use the
    diffusers export (which ComfyUI reads) and write nothing."""
    from ppdreambooth import train
    from ppdreambooth.export import main as export_main

    assert export_main([str(lora_run), "--format", "kohya", "--out", str(tmp_path / "k.safetensors")]) == 2
    message = capsys.readouterr().err
    assert "--format kohya: SD3 LoRAs have no kohya export" in message
    assert "--format diffusers" in message and "ComfyUI" in message
    assert not os.path.exists(tmp_path / "k.safetensors")
    assert train.main(train_argv(tiny_sd3_model, photos, tmp_path / "refused", extra=[
        "--use_lora", "--export_formats", "diffusers,kohya"])) == 2  # refused before training
    assert "--export_formats kohya: SD3 LoRAs have no kohya export" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "refused")


def test_single_file_export_is_refused(tiny_sd3_model, photos, tmp_path, capsys):
    """No SD3 single-file layout is written: the export command and the training entry say so and what to use."""
    from ppdreambooth import train
    from ppdreambooth.export import main as export_main

    assert export_main([tiny_sd3_model, "--format", "single-file", "--out", str(tmp_path / "m.safetensors")]) == 2
    message = capsys.readouterr().err
    assert "--format single-file: writing an SD3 single-file checkpoint is not implemented" in message
    assert "--format diffusers" in message
    assert not os.path.exists(tmp_path / "m.safetensors")
    assert train.main(train_argv(tiny_sd3_model, photos, tmp_path / "refused", extra=[
        "--export_formats", "single-file"])) == 2
    assert "--export_formats single-file: writing an SD3 single-file checkpoint" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "refused")
