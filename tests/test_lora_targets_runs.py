"""Where adapters go, from the command line, per family: a run with a --lora_layers preset, text-encoder MLP targets
(SD, SDXL) and per-block ranks, alphas and learning rates trains exactly the chosen modules (the feed-forward ones
move, a block at multiplier 0 does not), says so in the header, the closing summary and the model card, writes
per-module ranks and kohya alphas that reproduce each module's scale, and loads in PyTorch diffusers giving the
numbers ppdreambooth computes (SD: its kohya file; SDXL and SD3: the diffusers file, whose metadata states each
module's rank and alpha; one client call per family keeps these runs short). An SD run resumes exactly and refuses
a changed block setting before anything loads."""
import json

import numpy as np
import paddle
import pytest
from safetensors.numpy import load_file

from helpers.runs import client, run_module, train_argv, truncate_run_to
from ppdreambooth import train
from ppdreambooth.families import get_family
from ppdreambooth.interop.exports import export, kohya_names
from ppdreambooth.interop.merge import load_adapters
from ppdreambooth.modeling.lora import LORA_WEIGHTS_NAME, adapter_ranks, to_peft_keys

pytestmark = pytest.mark.slow

RUNS = {  # family -> (fixture, flags, expected ranks by block, the frozen block, modules per component)
    "sd": ("tiny_model",
           ["--lora_layers", "attn_ff", "--train_text_encoder", "--text_encoder_lora_layers", "attn_mlp",
            "--lora_block_ranks", "down=2,mid=8", "--lora_block_alphas", "mid=4", "--lora_block_lr", "mid=2,up=0",
            "--export_formats", "diffusers,kohya", "--checkpointing_steps", "2"],
           {"down": 2, "mid": 8, "up": 4}, "up_blocks.", {"unet": 60, "text_encoder": 30}),
    "sdxl": ("tiny_sdxl_model",
             ["--lora_layers", "all_linear", "--train_text_encoder", "--text_encoder_lora_layers", "attn_mlp",
              "--lora_block_ranks", "down.1=2,mid=8", "--lora_block_lr", "up.0=0", "--export_formats", "diffusers,kohya"],
             {"down": 2, "mid": 8, "up": 4}, "up_blocks.0.", {"unet": 132, "text_encoder": 30, "text_encoder_2": 30}),
    "sd3": ("tiny_sd3_model",
            ["--lora_layers", "attn_ff", "--lora_block_ranks", "0=8", "--lora_block_alphas", "0=2",
             "--lora_block_lr", "1=0", "--export_formats", "diffusers"],
            {"transformer_blocks.0": 8, "transformer_blocks.1": 4}, "transformer_blocks.1.", {"transformer": 21}),
}


def target_run(model, photos, out, family, steps, extra=()):
    argv = train_argv(model, photos, out, steps=steps, extra=["--use_lora", "--lora_rank", "4", *RUNS[family][1],
                                                              *extra])
    argv[argv.index("--learning_rate") + 1] = "1e-2"  # adapters start at zero: move them visibly
    return run_module(["-m", "ppdreambooth.train", *argv])


def block_key(family, module):
    if family == "sd3":
        return ".".join(module.split(".")[:2])
    return module.split("_")[0]


# ----- the client's inputs and what Paddle computes for them (as tests/test_interop*.py do) -------------------
def client_inputs(family, folder):
    rng = np.random.RandomState(0)
    ids = rng.randint(0, 500, (2, 77)).astype("int64")
    ids[:, 0], ids[0, 9:], ids[1, 30:] = 512, 513, 513  # the tiny vocabulary's start and end tokens
    data = dict(timesteps=np.array([10, 700], dtype="int64"), input_ids=ids)
    if family == "sd3":
        data = dict(latents=rng.standard_normal((2, 16, 8, 8)).astype("float32"),
                    timesteps=np.array([30.0, 870.0], dtype="float32"),
                    encoder_hidden_states=rng.standard_normal((2, 154, 96)).astype("float32"),
                    pooled_projections=rng.standard_normal((2, 64)).astype("float32"))
    else:
        data["latents"] = rng.standard_normal((2, 4, 8, 8)).astype("float32")
    if family == "sdxl":
        data["time_ids"] = np.array([[64, 64, 0, 0, 64, 64], [96, 80, 8, 4, 64, 64]], dtype="float32")
    path = folder / "inputs.npz"
    np.savez(path, **data)
    return path, data


def paddle_outputs(family_name, pipe, data):
    family = get_family(family_name)
    tensors = {k: paddle.to_tensor(v) for k, v in data.items()}
    with paddle.no_grad():
        if family_name == "sd3":
            conditioning = {"prompt_embeds": tensors["encoder_hidden_states"],
                            "pooled_prompt_embeds": tensors["pooled_projections"]}
            return {"pred": family.predict(pipe.transformer, tensors["latents"], tensors["timesteps"],
                                           conditioning).numpy()}
        encoders = {name: getattr(pipe, name) for name in family.text_encoders}
        tokens = {"input_ids": tensors["input_ids"], "input_ids_2": tensors["input_ids"]}
        conditioning = family.encode_prompt(encoders, tokens)
        if family_name == "sdxl":
            conditioning["time_ids"] = tensors["time_ids"]
        pred = family.predict(pipe.unet, tensors["latents"], tensors["timesteps"], conditioning)
        return {"hidden": conditioning["prompt_embeds"].numpy(), "pred": pred.numpy()}


def assert_close(got, want, rel=1e-4, label=""):
    for key in want:
        error = float(np.abs(got[key] - want[key]).max() / np.abs(want[key]).max())
        assert error <= rel, (label, key, error)


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_a_run_adapts_the_chosen_modules_per_block_and_its_files_load_in_diffusers(family, torch_python, photos,
                                                                                  tmp_path, request):
    fixture, flags, block_ranks, frozen, counts = RUNS[family]
    model = request.getfixturevalue(fixture)
    out = tmp_path / "run"
    result = target_run(model, photos, out, family, steps=4 if family == "sd" else 2)
    assert result.returncode == 0, result.stderr[-3000:]
    path = str(out / LORA_WEIGHTS_NAME)
    state = to_peft_keys(load_file(path))

    # the chosen modules, each block at its rank (text encoders at --lora_rank)
    ranks = adapter_ranks(path)
    assert {component: len(modules) for component, modules in ranks.items()} == counts
    denoiser = get_family(family).denoiser
    assert all(rank == block_ranks[block_key(family, module)] for module, rank in ranks[denoiser].items())
    assert all(set(ranks[c].values()) == {4} for c in counts if c != denoiser)
    if family != "sd3":
        assert all(sum(".mlp.fc" in m for m in ranks[c]) == 10 for c in counts if c != denoiser)

    # B starts at zero: the frozen block's is still zero, the feed-forward (and text MLP) adapters moved
    # (SDXL conditions on the first encoder's penultimate layer: its last layer gets no gradient)
    unused = "text_encoder.text_model.encoder.layers.4." if family == "sdxl" else "-"
    ups = {k: v for k, v in state.items() if k.endswith(".lora_B.weight") and not k.startswith(unused)}
    still = [k for k, v in ups.items() if not np.any(v)]
    assert still and all(k.startswith(f"{denoiser}.{frozen}") for k in still)
    assert all(not np.any(v) for k, v in ups.items() if k.startswith(f"{denoiser}.{frozen}"))
    assert any(np.any(v) for k, v in ups.items() if ".ff.net.2." in k)
    if family != "sd3":
        assert all(np.any(v) for k, v in ups.items() if ".mlp.fc" in k)

    # header, closing summary, model card
    trained = sum(v.size for k, v in state.items() if not k.startswith(f"{denoiser}.{frozen}"))
    choice = flags[flags.index("--lora_layers") + 1]
    assert f"adapters:  {trained:,} trained parameters ({denoiser} {choice}: {counts[denoiser]} modules" in result.stdout
    assert f"modules: " in result.stdout and f"{denoiser} {counts[denoiser]}" in result.stdout
    assert "ranks differ per block" in result.stdout
    card = (out / "README.md").read_text()
    assert f"- Adapter targets: {denoiser} {choice}" in card and "different ranks per block" in card

    # kohya (SD, SDXL): every module has an alpha, and up @ down * alpha / rank is the module's trained update
    if family != "sd3":
        kohya = load_file(str(out / "export-kohya" / "lora_kohya.safetensors"))
        name_of = kohya_names(str(out))
        modules = [k[: -len(".lora_A.weight")] for k in state if k.endswith(".lora_A.weight")]
        assert sum(k.endswith(".alpha") for k in kohya) == len(modules) == sum(counts.values())
        for module in modules:
            name = name_of(*module.split(".", 1))
            down, up = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"]
            update = (state[f"{module}.lora_A.weight"] @ state[f"{module}.lora_B.weight"]).T  # PyTorch's [out, in]
            np.testing.assert_allclose(up @ down * float(kohya[f"{name}.alpha"]) / down.shape[0], update,
                                       rtol=1e-5, atol=1e-8, err_msg=module)

    # PyTorch diffusers loads the file with per-module ranks and gives Paddle's numbers: SD's kohya file (one alpha,
    # each up scaled), the diffusers file of SDXL (UNet, both text encoders) and SD3 (transformer); the SD diffusers
    # file's metadata is checked value by value in tests/test_lora_targets.py
    export(model, "diffusers", str(tmp_path / "base-diffusers"))
    pipe = get_family(family).load_pipeline(model)
    inputs, data = client_inputs(family, tmp_path)
    base = paddle_outputs(family, pipe, data)
    assert load_adapters(get_family(family), pipe, str(out), None) == {}  # mixed ranks: folded (see merge.py)
    expected = paddle_outputs(family, pipe, data)
    assert float(np.abs(expected["pred"] - base["pred"]).max()) > 1e-4
    command = {"sd": "unet", "sdxl": "unet_sdxl", "sd3": "sd3"}[family]
    lora = (out / "export-kohya" / "lora_kohya.safetensors" if family == "sd"
            else out / "export-diffusers" / "pytorch_lora_weights.safetensors")
    client(torch_python, command, tmp_path / "base-diffusers", inputs, tmp_path / "torch.npz", "--lora", lora)
    assert_close(dict(np.load(tmp_path / "torch.npz")), expected, label=lora.name)

    if family != "sd":
        return
    # stopped at checkpoint-2 and resumed: the same adapters as the uninterrupted run, bit for bit; a changed
    # block setting is refused before anything loads
    settings = json.loads((out / "checkpoint-2" / "run_settings.json").read_text())
    assert settings["lora_block_ranks"] == "down=2,mid=8" and settings["text_encoder_lora_layers"] == "attn_mlp"
    resumed = tmp_path / "resumed"
    truncate_run_to(str(out), 2, str(resumed))
    result = target_run(model, photos, resumed, family, steps=4, extra=["--resume_from_checkpoint", "latest"])
    assert result.returncode == 0, result.stderr[-3000:]
    again = load_file(str(resumed / LORA_WEIGHTS_NAME))
    reference = load_file(path)
    assert again.keys() == reference.keys() and all(np.array_equal(again[k], reference[k]) for k in again)
    changed = tmp_path / "changed"
    truncate_run_to(str(out), 2, str(changed))
    request.getfixturevalue("no_model_loading")
    capsys = request.getfixturevalue("capsys")
    capsys.readouterr()
    saved = {"--lora_block_ranks": "down=2,mid=8", "--lora_block_lr": "mid=2,up=0",
             "--text_encoder_lora_layers": "attn_mlp"}
    for flag, value in (("--lora_block_ranks", "down=2,mid=4"), ("--lora_block_lr", "mid=2"),
                        ("--text_encoder_lora_layers", "attn")):
        argv = train_argv(model, photos, changed, steps=4, extra=["--use_lora", "--lora_rank", "4", *flags,
                                                                  "--resume_from_checkpoint", "latest"])
        argv[argv.index(flag) + 1] = value
        assert train.main(argv) == 2
        err = capsys.readouterr().err
        assert f"{flag} is {value} but checkpoint-2 was trained with {saved[flag]}" in err, err
        assert "Traceback" not in err
