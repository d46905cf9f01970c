"""LyCORIS runs from the command line: LoHa/LoKr/LoCon runs of SD (exact resume, generate, merged, the kohya/LyCORIS
file read back the way ComfyUI reads it), SDXL (SGM names) and SD3 (merged only), the header and closing summary,
and bad flags refused before any model loads."""
import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from helpers.lycoris import comfyui_merge, torch_layout
from helpers.runs import run_module, train_argv, truncate_run_to
from ppdreambooth import train
from ppdreambooth.errors import ExportError
from ppdreambooth.interop.exports import export
from ppdreambooth.interop.merge import load_adapters
from ppdreambooth.modeling.lora import LORA_WEIGHTS_NAME


# ----- the command line ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    (["--lora_type", "lokr"], "--lora_type lokr is a kind of LoRA adapter; it needs --use_lora"),
    (["--use_lora", "--lora_type", "loha", "--lora_rank", "0"], "--lora_rank"),
    (["--use_lora", "--lora_type", "lokr", "--lokr_factor", "0"], "--lokr_factor"),
    (["--use_lora", "--lora_type", "lokr", "--lokr_factor", "-2"], "--lokr_factor"),
    (["--use_lora", "--lora_type", "loha", "--lokr_factor", "4"], "--lokr_factor 4 splits LoKr's Kronecker factors; "
                                                                   "it needs --lora_type lokr"),
    (["--use_lora", "--lora_type", "loha", "--export_formats", "diffusers"],
     "--export_formats diffusers: diffusers cannot load LoHa adapters (its load_lora_weights reads LoRA keys only). "
     "Use --format merged"),
    (["--use_lora", "--lora_type", "dora", "--conv_rank", "4"], "--conv_rank adapts the UNet's 3x3 convolutions "
                                                                 "with LoCon (--lora_type lora), LoHa or LoKr; DoRA"),
    (["--use_lora", "--conv_rank", "4", "--export_formats", "diffusers"],
     "--export_formats diffusers: this LoRA run also trained LoCon adapters"),
    (["--use_lora", "--lora_type", "loha", "--conv_alpha", "2"], "--conv_alpha scales the --conv_rank adapters"),
    (["--use_lora", "--lora_type", "loha", "--conv_rank", "0"], "--conv_rank 0 is out of range"),
], ids=["without_use_lora", "rank_0", "factor_0", "factor_minus_2", "factor_without_lokr", "diffusers_export",
        "conv_rank_with_dora", "locon_diffusers_export", "conv_alpha_alone", "conv_rank_0"])
def test_bad_lycoris_flags_stop_before_any_model_loads(extra, message, tiny_model, photos, tmp_path, capsys,
                                                       no_model_loading):
    assert train.main(train_argv(tiny_model, photos, tmp_path / "out", extra=extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_sd3_lycoris_exports_other_than_merged_and_conv_rank_are_refused_before_training(tiny_sd3_model, photos, tmp_path,
                                                                          capsys, no_model_loading):
    for fmt in ("kohya", "diffusers"):
        argv = train_argv(tiny_sd3_model, photos, tmp_path / "out", extra=["--use_lora", "--lora_type", "lokr",
                                                                            "--export_formats", fmt])
        assert train.main(argv) == 2
        err = capsys.readouterr().err
        assert f"--export_formats {fmt}:" in err and "Use --format merged" in err and "Traceback" not in err, err
    argv = train_argv(tiny_sd3_model, photos, tmp_path / "out", extra=["--use_lora", "--lora_type", "loha",
                                                                        "--conv_rank", "4"])
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert "--conv_rank: SD3's transformer has no 3x3 convolutions to adapt" in err and "Traceback" not in err, err


LYCORIS_ARGS = ["--use_lora", "--lora_rank", "2", "--lora_alpha", "4", "--learning_rate", "1e-2",
                "--checkpointing_steps", "2", "--train_text_encoder"]


def lycoris_run(model, photos, out, kind, steps=6, extra=()):
    argv = train_argv(model, photos, out, steps=steps, extra=["--lora_type", kind, *LYCORIS_ARGS, *extra])
    argv[argv.index("--learning_rate") + 1] = "1e-2"
    return run_module(["-m", "ppdreambooth.train", *argv])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_an_sd_run_resumes_exactly_generates_merges_and_exports_lycoris_keys(kind, tiny_model, photos, tmp_path):
    from ppdiffusers import StableDiffusionPipeline
    from PIL import Image

    from ppdreambooth.families import get_family
    from ppdreambooth.interop.keymaps_ldm import sd_kohya_name

    conv = ["--conv_rank", "2", "--conv_alpha", "1"] if kind == "lokr" else []  # LoKr on the 3x3 convolutions too
    full = tmp_path / "full"
    result = lycoris_run(tiny_model, photos, full, kind, extra=["--export_formats", "kohya,merged", *conv])
    assert result.returncode == 0, result.stderr[-3000:]
    name = {"loha": "LoHa", "lokr": "LoKr"}[kind]
    settings = json.loads((full / "checkpoint-2" / "run_settings.json").read_text())
    assert settings["lora_type"] == kind
    reference = load_file(str(full / LORA_WEIGHTS_NAME))
    count = sum(v.size for k, v in reference.items() if not k.endswith(".alpha"))
    assert f"{name} rank 2" in result.stdout and f"adapters:  {count:,} trained parameters" in result.stdout
    assert f"adapters:    {count:,} parameters, " in result.stdout and " MB" in result.stdout
    assert f"{name}: not by ppdiffusers' or diffusers' load_lora_weights" in result.stdout
    card = (full / "README.md").read_text()
    assert f"{name} (rank 2, alpha 4" in card and f"Neither ppdiffusers nor diffusers can load {name}" in card
    assert f"lycoris, {kind}]" in card
    assert any(k.startswith("text_encoder.") for k in reference)
    assert any(k.endswith(".resnets.0.conv1.lokr_w1") for k in reference) == bool(conv)

    # stopped at a checkpoint and resumed: the same adapters as the uninterrupted run, bit for bit
    for step, resume in ((4, "latest"), (2, "checkpoint-2")):
        resumed = tmp_path / f"resumed-{step}"
        truncate_run_to(str(full), step, str(resumed))
        target = resume if resume == "latest" else str(resumed / resume)
        result = lycoris_run(tiny_model, photos, resumed, kind, extra=["--resume_from_checkpoint", target, *conv])
        assert result.returncode == 0, result.stderr[-3000:]
        weights = load_file(str(resumed / LORA_WEIGHTS_NAME))
        assert weights.keys() == reference.keys() and all(np.array_equal(weights[k], reference[k]) for k in weights)

    # the merged export holds W + ΔW; the LyCORIS file, read as ComfyUI reads it, gives the same weights
    base = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    merged = StableDiffusionPipeline.from_pretrained(str(full / "export-merged"), safety_checker=None)
    kohya = load_file(str(full / "export-kohya" / "lora_kohya.safetensors"))
    modules = {k.rsplit(".", 1)[0] for k in reference}
    assert len(kohya) == len(reference) and {k.rsplit(".", 1)[0] for k in kohya} == {
        sd_kohya_name(*m.split(".", 1)) for m in modules}
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha" in kohya
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in kohya
    for module in modules:
        component, path = module.split(".", 1)
        before = torch_layout(dict(getattr(base, component).named_sublayers())[path].weight.numpy())
        after = torch_layout(dict(getattr(merged, component).named_sublayers())[path].weight.numpy())
        want = comfyui_merge(kohya, sd_kohya_name(component, path), before.astype(np.float64))
        np.testing.assert_allclose(after, want, rtol=1e-5, atol=1e-6, err_msg=module)
    assert any(np.abs(dict(merged.unet.named_sublayers())[m.split(".", 1)[1]].weight.numpy()
                      - dict(base.unet.named_sublayers())[m.split(".", 1)[1]].weight.numpy()).max() > 1e-4
               for m in modules if m.startswith("unet."))

    # generate (and evaluate, the same load_adapters) folds the run; --lora_scale 0 is the base model
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    assert load_adapters(get_family("sd"), pipe, str(full), 0.0) == {}
    assert all(np.array_equal(v.numpy(), base.unet.state_dict()[k].numpy()) for k, v in pipe.unet.state_dict().items())
    images = {}
    for label, model_args in (("lora", ["--model", tiny_model, "--lora", str(full)]),
                              ("merged", ["--model", str(full / "export-merged")])):
        result = run_module(["-m", "ppdreambooth.generate", *model_args, "--prompt", "a photo of sks dog",
                             "--num_images", "1", "--steps", "3", "--seed", "5", "--out", str(tmp_path / label)])
        assert result.returncode == 0, result.stderr[-3000:]
        images[label] = np.asarray(Image.open(tmp_path / label / "00-00-a-photo-of-sks-dog-seed5.png"))
    assert np.array_equal(images["lora"], images["merged"])

    with pytest.raises(ExportError, match=f"diffusers cannot load {name} adapters.*--format merged"):
        export(str(full), "diffusers", str(tmp_path / "d"))
    other = "lokr" if kind == "loha" else "loha"
    as_other = tmp_path / "as-other"
    truncate_run_to(str(full), 4, str(as_other))
    result = lycoris_run(tiny_model, photos, as_other, other, extra=["--resume_from_checkpoint", "latest"])
    assert result.returncode == 2 and f"--lora_type is {other} but checkpoint-4 was trained with {kind}" in result.stderr


def check_merged_against_comfyui(base, merged, kohya, reference, name_of):
    """Every adapted module's merged weight is ComfyUI's reading of the LyCORIS file over the base weight."""
    modules = {k.rsplit(".", 1)[0] for k in reference}
    assert {k.rsplit(".", 1)[0] for k in kohya} == {name_of(*m.split(".", 1)) for m in modules}
    changed = 0
    for module in modules:
        component, path = module.split(".", 1)
        before = torch_layout(dict(getattr(base, component).named_sublayers())[path].weight.numpy())
        after = torch_layout(dict(getattr(merged, component).named_sublayers())[path].weight.numpy())
        np.testing.assert_allclose(after, comfyui_merge(kohya, name_of(component, path), before.astype(np.float64)),
                                   rtol=1e-5, atol=1e-6, err_msg=module)
        changed += np.abs(after - before).max() > 1e-4
    assert changed > len(modules) // 2


@pytest.mark.slow
def test_an_sdxl_lokr_run_merges_and_exports_sdxl_lycoris_keys(tiny_sdxl_model, photos, tmp_path):
    from ppdreambooth.families import get_family
    from ppdreambooth.interop.exports import kohya_names

    out = tmp_path / "run"
    result = lycoris_run(tiny_sdxl_model, photos, out, "lokr", steps=2, extra=["--export_formats", "kohya,merged",
                                                                               "--conv_rank", "2"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LoKr rank 2, factor -1; 3x3 convolutions rank 2, alpha 2 (LyCORIS)" in result.stdout
    family = get_family("sdxl")
    reference = load_file(str(out / LORA_WEIGHTS_NAME))
    assert {k.split(".")[0] for k in reference} == {"unet", "text_encoder", "text_encoder_2"}
    kohya = load_file(str(out / "export-kohya" / "lora_kohya.safetensors"))
    assert "lora_te2_text_model_encoder_layers_4_self_attn_out_proj.lokr_w1" in kohya
    assert any(k.startswith("lora_unet_input_blocks_") for k in kohya)  # SGM names, as kohya's SDXL files
    assert any(k.endswith("_in_layers_2.lokr_w1") for k in kohya)  # a resnet's conv1 under its SGM name
    check_merged_against_comfyui(family.load_pipeline(tiny_sdxl_model), family.load_pipeline(str(out / "export-merged")),
                                 kohya, reference, kohya_names(str(out)))


@pytest.mark.slow
def test_an_sd3_loha_run_merges_and_refuses_other_exports(tiny_sd3_model, photos, tmp_path):
    from ppdreambooth.families import get_family
    from ppdreambooth.interop.merge import fold_adapters

    out = tmp_path / "run"
    argv = train_argv(tiny_sd3_model, photos, out, steps=2, extra=["--use_lora", "--lora_type", "loha",
                                                                   "--lora_rank", "2", "--export_formats", "merged"])
    argv[argv.index("--learning_rate") + 1] = "1e-2"
    result = run_module(["-m", "ppdreambooth.train", *argv])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LoHa rank 2, alpha 2 (LyCORIS)" in result.stdout
    family = get_family("sd3")
    reference = load_file(str(out / LORA_WEIGHTS_NAME))
    assert {k.split(".")[0] for k in reference} == {"transformer"} and any(".hada_w1_a" in k for k in reference)
    folded = family.load_pipeline(tiny_sd3_model)
    fold_adapters(folded, reference)
    merged = family.load_pipeline(str(out / "export-merged"))
    got, want = merged.transformer.state_dict(), folded.transformer.state_dict()
    base = family.load_pipeline(tiny_sd3_model).transformer.state_dict()
    changed = [k for k in want if not np.array_equal(want[k].numpy(), base[k].numpy())]
    assert changed and all(np.array_equal(got[k].numpy(), want[k].numpy()) for k in want)
    for fmt in ("kohya", "diffusers"):
        with pytest.raises(ExportError, match=f"--format {fmt}: .*Use --format merged"):
            export(str(out), fmt, str(tmp_path / fmt))


@pytest.mark.slow
def test_an_sd_locon_run_resumes_exactly_generates_and_exports_kohya_locon(tiny_model, photos, tmp_path):
    from ppdiffusers import StableDiffusionPipeline
    from PIL import Image

    from ppdreambooth.interop.keymaps_ldm import sd_kohya_name
    from ppdreambooth.modeling.lora import LOCON_WEIGHTS_NAME

    extra = ["--use_lora", "--lora_rank", "2", "--conv_rank", "2", "--conv_alpha", "1", "--checkpointing_steps", "2"]
    full = tmp_path / "full"
    argv = train_argv(tiny_model, photos, full, steps=6, extra=[*extra, "--export_formats", "kohya,merged"])
    argv[argv.index("--learning_rate") + 1] = "1e-2"
    result = run_module(["-m", "ppdreambooth.train", *argv])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LoRA rank 2; LoCon 3x3 convolutions rank 2, alpha 1" in result.stdout
    assert "LoCon:       " in result.stdout and "load_lora_weights reads the LoRA file only" in result.stdout
    assert "LoCon adapters on the UNet's 3x3 convolutions" in (full / "README.md").read_text()
    reference = {n: load_file(str(full / n)) for n in (LORA_WEIGHTS_NAME, LOCON_WEIGHTS_NAME)}
    for step in (4, 2):
        resumed = tmp_path / f"resumed-{step}"
        truncate_run_to(str(full), step, str(resumed))
        argv = train_argv(tiny_model, photos, resumed, steps=6, extra=[
            *extra, "--resume_from_checkpoint", str(resumed / f"checkpoint-{step}")])
        argv[argv.index("--learning_rate") + 1] = "1e-2"
        result = run_module(["-m", "ppdreambooth.train", *argv])
        assert result.returncode == 0, result.stderr[-3000:]
        for name, want in reference.items():
            got = load_file(str(resumed / name))
            assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in got), name

    base = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    merged = StableDiffusionPipeline.from_pretrained(str(full / "export-merged"), safety_checker=None)
    kohya = load_file(str(full / "export-kohya" / "lora_kohya.safetensors"))
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert kohya[f"{conv}.lora_down.weight"].shape == (2, 32, 3, 3) and kohya[f"{conv}.lora_up.weight"].shape == (
        32, 2, 1, 1) and float(kohya[f"{conv}.alpha"]) == 1.0
    for module in {k.rsplit(".", 1)[0] for k in reference[LOCON_WEIGHTS_NAME]}:
        component, path = module.split(".", 1)
        before = dict(base.unet.named_sublayers())[path].weight.numpy()
        after = dict(merged.unet.named_sublayers())[path].weight.numpy()
        np.testing.assert_allclose(after, comfyui_merge(kohya, sd_kohya_name(component, path), before.astype(
            np.float64)), rtol=1e-5, atol=1e-6, err_msg=module)
    images = {}
    for label, model_args in (("lora", ["--model", tiny_model, "--lora", str(full)]),
                              ("merged", ["--model", str(full / "export-merged")])):
        result = run_module(["-m", "ppdreambooth.generate", *model_args, "--prompt", "a photo of sks dog",
                             "--num_images", "1", "--steps", "3", "--seed", "5", "--out", str(tmp_path / label)])
        assert result.returncode == 0, result.stderr[-3000:]
        images[label] = np.asarray(Image.open(tmp_path / label / "00-00-a-photo-of-sks-dog-seed5.png")).astype(int)
    assert np.abs(images["lora"] - images["merged"]).max() <= 1  # LoRA applied by ppdiffusers, LoCon folded
    with pytest.raises(ExportError, match="LoCon adapters .* Use --format kohya"):
        export(str(full), "diffusers", str(tmp_path / "d"))
