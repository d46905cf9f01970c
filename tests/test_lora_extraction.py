"""`export --format lora`: a LoRA from a full fine-tune (SVD of each adapted weight's change) and a LoRA resized.

The arithmetic against NumPy; then, per family, a "full run" made by planting a known low-rank change into the
adapted weights of the tiny base model (no training), extracted and loaded back into the base pipeline through
ppdiffusers' own `load_lora_weights`: it must give the edited model."""
import os
import shutil

import numpy as np
import paddle
import pytest
from safetensors.numpy import load_file

from helpers.runs import run_module
from ppdreambooth.errors import ExportError
from ppdreambooth.families import FAMILIES
from ppdreambooth.interop.lora_extraction import adapted_modules
from ppdreambooth.interop.lora_rank import LoraOptions, write_lora
from ppdreambooth.interop.lowrank import clamp_factors, low_rank_change, relative_error, resize_factors
from ppdreambooth.modeling.lora import LORA_WEIGHTS_NAME, to_peft_keys, write_lora_states


# ----- the arithmetic --------------------------------------------------------------------------------------------
def test_a_planted_rank_r_change_is_recovered_to_float_precision():
    rng = np.random.default_rng(0)
    delta = rng.normal(size=(48, 3)) @ rng.normal(size=(3, 40)) * 0.1
    part = low_rank_change(delta, 3)
    assert part.down.shape == (48, 3) and part.up.shape == (3, 40)
    np.testing.assert_allclose(part.down @ part.up, delta, atol=1e-5)
    assert relative_error([part]) < 1e-6
    assert low_rank_change(delta, 2).error > 1e-3  # one rank less cannot hold it


def test_the_truncation_error_is_the_discarded_singular_values():
    rng = np.random.default_rng(1)
    delta = rng.normal(size=(30, 20))
    s = np.linalg.svd(delta, compute_uv=False)
    for rank in (1, 5, 19):
        part = low_rank_change(delta, rank)
        discarded = np.sqrt(np.sum(s[rank:] ** 2))
        np.testing.assert_allclose(np.linalg.norm(delta - part.down.astype(np.float64) @ part.up), discarded,
                                   rtol=1e-5)
        np.testing.assert_allclose(np.sqrt(part.error), discarded, rtol=1e-9)
        np.testing.assert_allclose(part.kept, np.sum(s[:rank] ** 2), rtol=1e-9)
    assert low_rank_change(delta, 50).rank == 20  # capped at min(in, out)


def test_the_clamp_bounds_both_factors_at_one_quantile_of_their_absolute_values():
    rng = np.random.default_rng(2)
    down, up = rng.normal(size=(20, 4)), rng.normal(size=(4, 30))
    up[0, 0] = 50.0  # an outlier
    bound = np.quantile(np.abs(np.concatenate([down.ravel(), up.ravel()])), 0.9)
    cd, cu = clamp_factors(down, up, 0.9)
    assert np.abs(cd).max() <= bound + 1e-12 and np.abs(cu).max() <= bound + 1e-12
    np.testing.assert_array_equal(cd, np.clip(down, -bound, bound))
    np.testing.assert_array_equal(cu, np.clip(up, -bound, bound))
    assert np.mean(np.abs(np.concatenate([down.ravel(), up.ravel()])) > bound) == pytest.approx(0.1, abs=0.01)
    same = clamp_factors(down, up, 1.0)
    assert same[0] is down and same[1] is up
    # through the extraction: the clamp changes the factors, and its error is counted
    delta = down @ up
    assert low_rank_change(delta, 4, 0.9).error > low_rank_change(delta, 4, 1.0).error + 1.0


def test_resizing_keeps_the_best_approximation_of_the_product():
    rng = np.random.default_rng(3)
    down, up = rng.normal(size=(24, 8)), rng.normal(size=(8, 36))
    product = down @ up
    u, s, vt = np.linalg.svd(product)
    part = resize_factors(down, up, 3)
    np.testing.assert_allclose(part.down.astype(np.float64) @ part.up, (u[:, :3] * s[:3]) @ vt[:3], atol=1e-4)
    np.testing.assert_allclose(np.sqrt(part.error), np.sqrt(np.sum(s[3:8] ** 2)), rtol=1e-6)
    full = resize_factors(down, up, 8)
    np.testing.assert_allclose(full.down.astype(np.float64) @ full.up, product, atol=1e-4)


# ----- runs of the tiny models -----------------------------------------------------------------------------------
def plant_change(layer, targets, rank, seed, scale=0.05):
    """Add a random rank-`rank` change to every adapted Linear of `layer`; returns module -> change."""
    rng = np.random.default_rng(seed)
    changes = {}
    modules = dict(layer.named_sublayers())
    for name in adapted_modules(layer, targets):
        weight = modules[name].weight
        fan_in, fan_out = weight.shape
        delta = (rng.normal(size=(fan_in, rank)) @ rng.normal(size=(rank, fan_out)) * scale).astype(np.float32)
        weight.set_value(weight + paddle.to_tensor(delta))
        changes[name] = delta
    return changes


def make_full_run(base, out, family, rank=2, text_encoder=True, seed=0):
    """A pipeline folder, as a full fine-tune writes it, whose adapted weights differ from `base` by a rank-`rank`
    change (and the first text encoder's too, with `text_encoder`); its card names `base`."""
    pipe = family.load_pipeline(base)
    changed = {family.denoiser: plant_change(getattr(pipe, family.denoiser), family.denoiser_lora_targets, rank, seed)}
    if text_encoder:
        changed["text_encoder"] = plant_change(pipe.text_encoder, family.text_encoder_lora_targets or ("q_proj",),
                                               rank, seed + 1)
    pipe.save_pretrained(out)
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(f"---\nbase_model: {base}\n---\n- Base model: `{base}` (model family `{family.name}`)\n")
    return changed


def denoiser_output(family, denoiser):
    """The denoiser's prediction on fixed random inputs of its family."""
    config = denoiser.config
    paddle.seed(7)
    if family.name == "sd3":
        latents = paddle.randn([2, config.in_channels, 8, 8])
        with paddle.no_grad():
            return denoiser(hidden_states=latents, timestep=paddle.to_tensor([100.0, 700.0]),
                            encoder_hidden_states=paddle.randn([2, 6, config.joint_attention_dim]),
                            pooled_projections=paddle.randn([2, config.pooled_projection_dim])).sample.numpy()
    latents, hidden = paddle.randn([2, 4, 8, 8]), paddle.randn([2, 6, config.cross_attention_dim])
    extra = {}
    if family.name == "sdxl":
        width = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        extra = {"added_cond_kwargs": {"text_embeds": paddle.randn([2, width]),
                                       "time_ids": paddle.to_tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}}
    with paddle.no_grad():
        return denoiser(latents, paddle.to_tensor([3, 700]), hidden, **extra).sample.numpy()


def encoder_output(pipe):
    with paddle.no_grad():
        return pipe.text_encoder(paddle.to_tensor([[1, 5, 9, 17, 2, 2, 2, 2]]))[0].numpy()


def test_every_family_extracts_the_planted_change_and_loads_it_through_ppdiffusers(family_model, tmp_path):
    name, base = family_model
    family = FAMILIES[name]
    run, out = str(tmp_path / "run"), str(tmp_path / "lora")
    changed = make_full_run(base, run, family, rank=2)
    written = write_lora(run, out, LoraOptions(rank=2, clamp_quantile=1.0), log=lambda *_: None)

    saved = to_peft_keys(load_file(os.path.join(out, LORA_WEIGHTS_NAME)))
    downs = {k: v for k, v in saved.items() if k.endswith("lora_A.weight")}
    # every adapted module, and the text encoders together when one changed (SDXL's second one: zero adapters)
    expected = {"sd": {"unet", "text_encoder"}, "sdxl": {"unet", "text_encoder", "text_encoder_2"},
                "sd3": {"transformer"}}[name]
    assert {k.split(".")[0] for k in downs} == expected
    for component in ([family.denoiser, "text_encoder"] if name != "sd3" else [family.denoiser]):
        assert len([k for k in downs if k.startswith(component + ".")]) == len(changed[component])
    assert all(v.shape[1] == 2 for v in downs.values())  # --rank honoured
    for module, delta in changed[family.denoiser].items():  # each adapter is the planted change
        key = f"{family.denoiser}.{module}"
        np.testing.assert_allclose(saved[f"{key}.lora_A.weight"] @ saved[f"{key}.lora_B.weight"], delta, atol=2e-5)
    assert relative_error([p for r in written.results for p in r.parts]) < 1e-5
    report = written.report()
    assert f"{sum(v.size for v in saved.values()):,} parameters" in report
    assert f"{os.path.getsize(written.path):,} bytes" in report

    tuned = family.load_pipeline(run)
    pipe = family.load_pipeline(base)
    before = denoiser_output(family, getattr(pipe, family.denoiser))
    pipe.load_lora_weights(out)  # ppdiffusers' own loader, as for any LoRA run
    loaded = denoiser_output(family, getattr(pipe, family.denoiser))
    want = denoiser_output(family, getattr(tuned, family.denoiser))
    assert np.abs(want - before).max() > 1e-3  # the planted change shows
    np.testing.assert_allclose(loaded, want, atol=2e-5, rtol=1e-4)
    if name != "sd3":  # the text encoder's adapters load too
        np.testing.assert_allclose(encoder_output(pipe), encoder_output(tuned), atol=2e-5, rtol=1e-4)
    else:  # SD3 LoRAs carry no text-encoder adapters: said, not silently dropped
        assert "text_encoder: changed" in report and "not in the LoRA" in report


@pytest.mark.slow
def test_the_extracted_folder_exports_and_merges_like_a_lora_run(tiny_sdxl_model, tmp_path):
    from ppdreambooth.interop.exports import export

    family = FAMILIES["sdxl"]
    run, out = str(tmp_path / "run"), str(tmp_path / "lora")
    changed = make_full_run(tiny_sdxl_model, run, family, rank=2)
    write_lora(run, out, LoraOptions(rank=2, clamp_quantile=1.0), log=lambda *_: None)
    kohya = load_file(export(out, "kohya", str(tmp_path / "k.safetensors"))[0])  # base model from the card
    assert any(k.startswith("lora_te1_") for k in kohya) and any(k.startswith("lora_unet_") for k in kohya)
    export(out, "merged", str(tmp_path / "merged"))
    merged, tuned = family.load_pipeline(str(tmp_path / "merged")), family.load_pipeline(run)
    for module in changed["unet"]:
        np.testing.assert_allclose(dict(merged.unet.named_sublayers())[module].weight.numpy(),
                                   dict(tuned.unet.named_sublayers())[module].weight.numpy(), atol=2e-5)


def test_rank_min_diff_and_clamp_change_what_is_written(tiny_model, tmp_path):
    family = FAMILIES["sd"]
    run = str(tmp_path / "run")
    make_full_run(tiny_model, run, family, rank=3)
    # rank 1 of a rank-3 change: the error is the discarded singular values, and reported; the planted
    # text-encoder change (0.05 * products of N(0, 1)) is below a min_diff of 100, so the text encoder is skipped
    low = write_lora(run, str(tmp_path / "r1"), LoraOptions(rank=1, clamp_quantile=1.0, min_diff=100.0),
                     log=lambda *_: None)
    unet = next(r for r in low.results if r.name == "unet")
    assert all(p.rank == 1 for p in unet.parts) and relative_error(unet.parts) > 0.1
    assert np.sqrt(sum(p.error for p in unet.parts)) == pytest.approx(
        np.sqrt(sum(p.energy - p.kept for p in unet.parts)), rel=1e-4)  # no clamp: the error is the truncation
    assert f"relative error {relative_error(unet.parts):.3g}" in low.report()
    assert not any(k.startswith("text_encoder.") for k in load_file(low.path))
    assert "text_encoder: unchanged" in low.report()
    # the defaults: the text encoder (changed by more than 0.01) is kept; the 0.99 clamp bounds the factors and
    # costs accuracy (without it a rank-3 change comes back to ~1e-7, as the per-family test shows)
    keep = write_lora(run, str(tmp_path / "keep"), LoraOptions(rank=3), log=lambda *_: None)
    assert any(k.startswith("text_encoder.") for k in load_file(keep.path))
    assert relative_error([p for r in keep.results for p in r.parts]) > 1e-3


def make_lora_run(base, run, family, rank=8, seed=5):
    """A LoRA run folder with random rank-`rank` adapters on every module a LoRA of `family` adapts; returns them."""
    pipe = family.load_pipeline(base)
    rng = np.random.default_rng(seed)
    encoders = [n for n in family.text_encoders
                if family.text_encoder_lora_targets and family.is_trainable_text_encoder(n)]
    states = {}
    for component in (family.denoiser, *encoders):
        layer = getattr(pipe, component)
        targets = family.denoiser_lora_targets if component == family.denoiser else family.text_encoder_lora_targets
        states[component] = {}
        for module in adapted_modules(layer, targets):
            fan_in, fan_out = dict(layer.named_sublayers())[module].weight.shape
            states[component][f"{module}.lora_A.weight"] = rng.normal(size=(fan_in, rank)).astype(np.float32)
            states[component][f"{module}.lora_B.weight"] = rng.normal(size=(rank, fan_out)).astype(np.float32) * 0.01
    write_lora_states(run, family, states)
    with open(os.path.join(run, "README.md"), "w") as f:
        f.write(f"---\nbase_model: {base}\n---\n- Base model: `{base}` (model family `{family.name}`)\n")
    return pipe, states


def test_every_family_resizes_a_lora_run_to_the_best_smaller_rank(family_model, tmp_path):
    name, base = family_model
    family = FAMILIES[name]
    run, out = str(tmp_path / "lora-run"), str(tmp_path / "small")
    pipe, states = make_lora_run(base, run, family, rank=8)
    written = write_lora(run, out, LoraOptions(rank=3), log=lambda *_: None)
    small = to_peft_keys(load_file(written.path))
    assert set(small) == set(to_peft_keys(load_file(os.path.join(run, LORA_WEIGHTS_NAME))))  # same modules, keys
    errors, energies = 0.0, 0.0
    for component, state in states.items():
        for key in [k for k in state if k.endswith("lora_A.weight")]:
            product = state[key].astype(np.float64) @ state[key.replace("lora_A", "lora_B")]
            s = np.linalg.svd(product, compute_uv=False)
            down, up = small[f"{component}.{key}"], small[f"{component}.{key.replace('lora_A', 'lora_B')}"]
            assert down.shape[1] == 3 and up.shape[0] == 3  # --rank honoured
            np.testing.assert_allclose(np.linalg.norm(product - down.astype(np.float64) @ up),
                                       np.sqrt(np.sum(s[3:] ** 2)), rtol=1e-3)
            errors += np.sum(s[3:] ** 2)
            energies += np.sum(s ** 2)
    assert relative_error([p for r in written.results for p in r.parts]) == pytest.approx(np.sqrt(errors / energies),
                                                                                         rel=1e-6)
    assert f"relative error {np.sqrt(errors / energies):.3g}" in written.report()
    pipe.load_lora_weights(out)  # loads as a LoRA run does; the card names the base
    assert "base_model: " + base in open(os.path.join(out, "README.md")).read()


def test_resizing_refusals_come_before_any_model_loads(tiny_model, tmp_path, no_model_loading):
    family = FAMILIES["sd"]
    run = str(tmp_path / "lora-run")
    down, up = np.ones((32, 4), np.float32), np.ones((4, 32), np.float32)
    module = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    write_lora_states(run, family, {"unet": {f"{module}.lora_A.weight": down, f"{module}.lora_B.weight": up}})
    with pytest.raises(ExportError, match="--rank 5 is larger than the rank of .* adapters \\(4\\)"):
        write_lora(run, str(tmp_path / "big"), LoraOptions(rank=5), model_family="sd")
    with pytest.raises(ExportError, match="--clamp_quantile applies to extraction from a full fine-tune"):
        write_lora(run, str(tmp_path / "c"), LoraOptions(rank=2, clamp_quantile=0.9), model_family="sd")
    with pytest.raises(ExportError, match="other than the run itself"):
        write_lora(run, run, LoraOptions(rank=2), model_family="sd")
    dora = str(tmp_path / "dora-run")
    write_lora_states(dora, family, {"unet": {f"{module}.lora_A.weight": down, f"{module}.lora_B.weight": up,
                                              f"{module}.lora_magnitude_vector": np.ones(32, np.float32)}})
    with pytest.raises(ExportError, match="DoRA adapters"):
        write_lora(dora, str(tmp_path / "d"), LoraOptions(rank=2), model_family="sd")


# ----- refusals, before any model loads ----------------------------------------------------------------------------
@pytest.fixture
def full_run(tiny_model, tmp_path):
    """A full run folder (a copy of the tiny model) whose card names the tiny model."""
    run = str(tmp_path / "run")
    shutil.copytree(tiny_model, run)
    with open(os.path.join(run, "README.md"), "w") as f:
        f.write(f"---\nbase_model: {tiny_model}\n---\n")
    return run


@pytest.mark.parametrize("options, message", [
    (LoraOptions(rank=0), "--rank must be a positive integer"),
    (LoraOptions(rank=-2), "--rank must be a positive integer"),
    (LoraOptions(), "--format lora needs --rank"),
    (LoraOptions(rank=4, conv_rank=4), "--conv_rank is not supported: .*Linear layers only"),
    (LoraOptions(rank=4, clamp_quantile=0.0), "--clamp_quantile must be in \\(0, 1\\]"),
    (LoraOptions(rank=4, min_diff=-1.0), "--min_diff must be >= 0"),
])
def test_bad_values_are_refused_before_any_model_loads(options, message, full_run, tmp_path, no_model_loading):
    with pytest.raises(ExportError, match=message):
        write_lora(full_run, str(tmp_path / "out"), options)


def test_a_missing_or_mismatched_base_model_is_refused_before_loading(full_run, tiny_sdxl_model, tmp_path,
                                                                      no_model_loading):
    os.remove(os.path.join(full_run, "README.md"))
    with pytest.raises(ExportError, match="names none. Pass --base_model"):
        write_lora(full_run, str(tmp_path / "out"), LoraOptions(rank=4))
    with pytest.raises(ExportError, match="does not exist"):
        write_lora(full_run, str(tmp_path / "out"), LoraOptions(rank=4), base_model=str(tmp_path / "nowhere"))
    with pytest.raises(ExportError, match="is a sdxl model"):
        write_lora(full_run, str(tmp_path / "out"), LoraOptions(rank=4), base_model=tiny_sdxl_model)
    other = str(tmp_path / "other")  # same family, other layer sizes (its weights are never read)
    shutil.copytree(full_run, other)
    config_path = os.path.join(other, "unet", "config.json")
    text = open(config_path).read().replace('"cross_attention_dim": 32', '"cross_attention_dim": 48')
    assert '"cross_attention_dim": 48' in text
    open(config_path, "w").write(text)
    with pytest.raises(ExportError, match="its unet has cross_attention_dim 48, the run's 32"):
        write_lora(full_run, str(tmp_path / "out"), LoraOptions(rank=4), base_model=other)


@pytest.mark.slow
def test_the_cli_refuses_lora_flags_with_other_formats_and_prints_the_count(full_run, tmp_path):
    result = run_module(["-m", "ppdreambooth.export", full_run, "--format", "kohya", "--out", str(tmp_path / "k"),
                         "--rank", "4"])
    assert result.returncode == 2 and "--rank applies to --format lora only" in result.stderr
    result = run_module(["-m", "ppdreambooth.export", full_run, "--format", "lora", "--out", str(tmp_path / "l"),
                         "--rank", "2"])
    assert result.returncode == 0, result.stderr[-2000:]
    # an unchanged copy: the denoiser's adapters are zero, the text encoder is skipped
    assert "text_encoder: unchanged" in result.stdout and "parameters, file" in result.stdout
    assert "lora" not in __import__("ppdreambooth.config.arguments", fromlist=["x"]).EXPORT_FORMATS


@pytest.mark.slow
def test_an_extracted_lora_loads_in_diffusers_and_generates_as_the_full_run(torch_python, tiny_model, tmp_path):
    """Through the CLI: extract, `--format diffusers` (PyTorch diffusers' load_lora_weights), `generate --lora`."""
    from PIL import Image

    from helpers.runs import client

    family = FAMILIES["sd"]
    run, out = str(tmp_path / "run"), str(tmp_path / "lora")
    changed = make_full_run(tiny_model, run, family, rank=2)
    result = run_module(["-m", "ppdreambooth.export", run, "--format", "lora", "--rank", "2", "--clamp_quantile", "1",
                         "--out", out])
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"unet: {len(changed['unet'])} modules" in result.stdout
    assert f"text_encoder: {len(changed['text_encoder'])} modules" in result.stdout
    result = run_module(["-m", "ppdreambooth.export", out, "--format", "diffusers", "--out", str(tmp_path / "d")])
    assert result.returncode == 0, result.stderr[-2000:]

    rng = np.random.RandomState(0)
    data = dict(latents=rng.standard_normal((2, 4, 8, 8)).astype("float32"),
                timesteps=np.array([10, 700], dtype="int64"), input_ids=rng.randint(0, 500, (2, 77)).astype("int64"))
    np.savez(tmp_path / "inputs.npz", **data)
    family.load_pipeline(tiny_model).save_pretrained(str(tmp_path / "base_diffusers"), to_diffusers=True)
    client(torch_python, "unet", tmp_path / "base_diffusers", tmp_path / "inputs.npz", tmp_path / "t.npz", "--lora",
           tmp_path / "d" / "pytorch_lora_weights.safetensors")
    tuned = family.load_pipeline(run)
    with paddle.no_grad():
        hidden = tuned.text_encoder(paddle.to_tensor(data["input_ids"]))[0]
        pred = tuned.unet(paddle.to_tensor(data["latents"]), paddle.to_tensor(data["timesteps"]), hidden).sample
    torch_out = np.load(tmp_path / "t.npz")
    np.testing.assert_allclose(torch_out["hidden"], hidden.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(torch_out["pred"], pred.numpy(), atol=1e-4, rtol=1e-4)

    common = ["-m", "ppdreambooth.generate", "--prompt", "a photo of sks dog", "--num_images", "1", "--steps", "3"]
    assert run_module(common + ["--model", run, "--out", str(tmp_path / "full")]).returncode == 0
    assert run_module(common + ["--model", tiny_model, "--lora", out, "--out", str(tmp_path / "lora-samples")]
                      ).returncode == 0
    name = "00-00-a-photo-of-sks-dog-seed0.png"
    full = np.asarray(Image.open(tmp_path / "full" / name), dtype=np.int32)
    lora = np.asarray(Image.open(tmp_path / "lora-samples" / name), dtype=np.int32)
    assert np.abs(full - lora).max() <= 2  # the same image, up to rounding
