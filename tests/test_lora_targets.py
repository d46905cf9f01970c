"""Where adapters go, in process: the --lora_layers presets and --text_encoder_lora_layers adapt exactly the expected
modules of each family, per-block ranks/alphas give each block its shapes and scale (every adapter type), per-block
learning-rate multipliers act on the optimizer step (0 freezes, 2 doubles an SGD step), a mixed-rank file reloads as
the trained model and converts to kohya/diffusers keeping each module's scale, and bad values stop before any model
loads. Trainer-level runs per family: tests/test_lora_targets_runs.py."""
import re

import numpy as np
import paddle
import pytest
from safetensors.numpy import load_file

from helpers.models import make_model, probe
from helpers.runs import train_argv
from ppdreambooth import train
from ppdreambooth.config.lora_blocks import BlockValue, block_of, parse_block_values, value_for
from ppdreambooth.errors import ConfigError
from ppdreambooth.interop.exports import diffusers_lora_metadata, lora_to_kohya
from ppdreambooth.interop.keymaps_ldm import sd_kohya_name
from ppdreambooth.interop.weights import lora_state_in_torch_layout
from ppdreambooth.modeling.lora import adapter_ranks, has_mixed_ranks, save_lora_weights, to_peft_keys
from ppdreambooth.modeling.lora_targets import adapted_modules, denoiser_targets

ATTN = ("to_q", "to_k", "to_v", "to_out.0")
SD3_ATTN = ATTN + ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
FF = ("ff.net.0.proj", "ff.net.2")
# adapted modules of the tiny models (families/tiny.py): SD has 6 transformer blocks (2 down, 1 mid, 3 up) with
# self- and cross-attention; SDXL 12 (transformer_layers_per_block 1, 2) and Linear proj_in/proj_out in its 6
# Transformer2DModels; SD3 2 joint blocks, the last without context output (no to_add_out, ff_context)
EXPECTED = {  # family -> preset -> (module count, suffixes every adapted module ends with)
    "sd": {"attn": (48, ATTN), "attn_ff": (60, ATTN + FF), "all_linear": (60, ATTN + FF)},
    "sdxl": {"attn": (96, ATTN), "attn_ff": (120, ATTN + FF), "all_linear": (132, ATTN + FF + ("proj_in", "proj_out"))},
    "sd3": {"attn": (15, SD3_ATTN), "attn_ff": (21, SD3_ATTN + FF + ("ff_context.net.0.proj", "ff_context.net.2")),
            "all_linear": (25, SD3_ATTN + FF + ("ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
                                                "norm1_context.linear"))},
}
FIXTURES = {"sd": "tiny_model", "sdxl": "tiny_sdxl_model", "sd3": "tiny_sd3_model"}


def ends_with(name, suffixes):
    return any(name.endswith("." + s) for s in suffixes)


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_presets_adapt_exactly_the_expected_modules(family, request):
    path = request.getfixturevalue(FIXTURES[family])
    text = family != "sd3"
    found = {}
    for preset in ("attn", "attn_ff", "all_linear"):
        model = make_model(path, use_lora=True, lora_layers=preset, train_text_encoder=text,
                           text_encoder_lora_layers="attn_mlp" if text and preset != "attn" else None)
        modules = set(adapted_modules(model.denoiser))
        count, suffixes = EXPECTED[family][preset]
        assert len(modules) == count and all(ends_with(m, suffixes) for m in modules), (preset, len(modules))
        assert all(re.match(r"(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.attentions\.\d+\.|transformer_blocks\.\d+\.",
                            m) for m in modules)  # inside the transformer blocks: no time/text embedding, no resnet
        found[preset] = modules
        for name in model.family.text_encoders if text else ():
            encoder = set(adapted_modules(getattr(model, name)))
            mlp = {m for m in encoder if ".mlp." in m}
            with_mlp = preset != "attn"  # attn_mlp chosen with the other presets here
            assert len(encoder) == (30 if with_mlp else 20) and len(mlp) == (10 if with_mlp else 0), (name, preset)
    # the default (no --lora_layers) is the attn preset, whose counts above are what ppdreambooth adapted before
    # the presets existed (48, 96, 15); each preset adds to the one before
    assert denoiser_targets(model.family, model.denoiser, None) == denoiser_targets(model.family, model.denoiser,
                                                                                     "attn")
    assert found["attn"] < found["attn_ff"] <= found["all_linear"]
    assert any(m.endswith("ff.net.2") for m in found["attn_ff"]) and not any("ff." in m for m in found["attn"])


def test_module_names_still_work(tiny_model):
    model = make_model(tiny_model, use_lora=True, lora_layers="to_q,ff.net.2")
    assert len(adapted_modules(model.denoiser)) == 12 + 6
    # a name that matches nothing is refused, even beside names that match (PEFT would adapt the others silently)
    with pytest.raises(ConfigError, match=re.escape("--lora_layers: to_qq names no module of the "
                                                    "UNet2DConditionModel")):
        make_model(tiny_model, use_lora=True, lora_layers="to_q,to_qq")


def test_sd3_text_encoder_targets_are_refused(tiny_sd3_model, photos, tmp_path, capsys, no_model_loading):
    argv = train_argv(tiny_sd3_model, photos, tmp_path / "out", extra=[
        "--use_lora", "--train_text_encoder", "--text_encoder_lora_layers", "attn_mlp"])
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert "--text_encoder_lora_layers attn_mlp: SD3 LoRA trains the transformer only" in err, err


def module_rank(module):
    return module.r["default"] if hasattr(module, "r") else module.rank


def module_scale(module):
    return module.scaling["default"] if hasattr(module, "scaling") else module.scale


@pytest.mark.parametrize("lora_type, conv", [("lora", False), ("dora", False), ("loha", True), ("lokr", False),
                                             ("lora", True)])
def test_block_ranks_and_alphas_give_each_block_its_shapes_and_scale(lora_type, conv, tiny_model):
    extra = {"conv_rank": 3} if conv else {}
    model = make_model(tiny_model, use_lora=True, lora_type=lora_type, lora_rank=4, lora_alpha=4.0,
                       lora_block_ranks="down=2,mid=8,up.0=6", lora_block_alphas="mid=2,up=3", **extra)
    want = {"down_blocks.1": (2, 4.0), "mid_block": (8, 2.0), "up_blocks.0": (6, 3.0)}
    seen = {}
    for name, module in adapted_modules(model.denoiser).items():
        block = re.match(r"(down_blocks\.\d|mid_block|up_blocks\.\d)", name).group(1)
        if ".resnets." in name or "samplers." in name:  # --conv_rank adapters keep --conv_rank everywhere
            assert module_rank(module) == 3, name
            continue
        rank, alpha = want[block]
        assert module_rank(module) == rank, name
        if lora_type == "lokr" and not module.low_rank:  # LoKr with a full w2 has scale 1 (LyCORIS)
            assert module_scale(module) == 1.0
        else:
            assert module_scale(module) == pytest.approx(alpha / rank), name
        seen[block] = seen.get(block, 0) + 1
    assert seen == {"down_blocks.1": 16, "mid_block": 8, "up_blocks.0": 24}
    if lora_type == "lora":  # the shapes: A [in, r], B [r, out]
        layer = dict(model.denoiser.named_sublayers())["mid_block.attentions.0.transformer_blocks.0.attn2.to_k"]
        assert layer.lora_A["default"].weight.shape == [32, 8] and layer.lora_B["default"].weight.shape == [8, 64]


def test_sd3_block_ranges(tiny_sd3_model):
    model = make_model(tiny_sd3_model, use_lora=True, lora_rank=4, lora_block_ranks="0=8", lora_block_alphas="0-1=2")
    for name, module in adapted_modules(model.denoiser).items():
        rank = 8 if name.startswith("transformer_blocks.0.") else 4
        assert module_rank(module) == rank and module_scale(module) == pytest.approx(2 / rank), name


def sgd_step(model, lr=0.5):
    optimizer = paddle.optimizer.SGD(learning_rate=lr, parameters=model.trainable_parameters())
    model.train()
    paddle.seed(0)
    pixels, ids = paddle.uniform([2, 3, 64, 64], min=-1, max=1), paddle.randint(0, 500, [2, 77])
    model(pixel_values=pixels, input_ids=ids)["loss"].backward()
    optimizer.step()
    model.eval()


def adapter_weights(model):
    return {n: p.numpy().copy() for n, p in model.denoiser.named_parameters() if ".lora_B." in n}


def test_block_learning_rate_multipliers_act_on_the_step(tiny_model):
    """One SGD step (B starts at zero, so only B moves): the down block moves as with no multiplier, the mid block
    (multiplier 2) exactly twice as far, the up blocks (multiplier 0) not at all, and they are not trained."""
    paddle.seed(3)
    plain = make_model(tiny_model, use_lora=True)
    paddle.seed(3)
    scaled = make_model(tiny_model, use_lora=True, lora_block_lr="mid=2,up=0")
    params = dict(scaled.denoiser.named_parameters())
    frozen = [n for n in params if n.startswith("up_blocks.") and ".lora_" in n]
    assert frozen and all(params[n].stop_gradient for n in frozen)
    trained = {id(p) for p in scaled.trainable_parameters()}
    assert not any(id(params[n]) in trained for n in frozen)
    before = adapter_weights(scaled)
    assert before.keys() == adapter_weights(plain).keys()
    sgd_step(plain)
    sgd_step(scaled)
    after_plain, after_scaled = adapter_weights(plain), adapter_weights(scaled)
    for name in before:
        step_plain, step_scaled = after_plain[name] - before[name], after_scaled[name] - before[name]
        if name.startswith("up_blocks."):
            assert np.array_equal(after_scaled[name], before[name]) and np.abs(step_plain).max() > 0, name
        elif name.startswith("mid_block."):
            np.testing.assert_allclose(step_scaled, 2 * step_plain, rtol=1e-6, atol=1e-12, err_msg=name)
            assert np.abs(step_plain).max() > 0
        else:
            np.testing.assert_allclose(step_scaled, step_plain, rtol=1e-6, atol=1e-12, err_msg=name)


def test_a_mixed_rank_file_reloads_as_the_trained_model_and_converts_keeping_each_scale(tiny_model, tmp_path):
    from ppdiffusers import StableDiffusionPipeline

    from ppdreambooth.families import get_family
    from ppdreambooth.interop.merge import load_adapters

    model = make_model(tiny_model, use_lora=True, lora_rank=4, lora_alpha=4.0, lora_layers="attn_ff",
                       train_text_encoder=True, text_encoder_lora_layers="attn_mlp",
                       lora_block_ranks="down=2,mid=8", lora_block_alphas="down=6,mid=2")
    paddle.seed(1)
    with paddle.no_grad():  # trained-looking adapters: B away from its zero start
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.set_value(paddle.randn(param.shape) * 0.1)
    model.eval()
    trained = probe(model.unet, model.text_encoder)
    path = save_lora_weights(str(tmp_path), model.family, model.trained_layers())
    ranks = adapter_ranks(path)
    assert {m: r for m, r in ranks["unet"].items() if m.startswith("mid_block.")} and has_mixed_ranks(path)
    assert all(r == {"down": 2, "mid": 8, "up": 4}[m.split("_")[0]] for m, r in ranks["unet"].items())
    assert len(ranks["text_encoder"]) == 30 and set(ranks["text_encoder"].values()) == {4}

    # ppdiffusers' peft loader would take one rank as every module's alpha; load_adapters folds such a file
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    base = probe(pipe.unet, pipe.text_encoder)
    assert load_adapters(get_family("sd"), pipe, str(tmp_path), None) == {}
    loaded = probe(pipe.unet, pipe.text_encoder)
    for got, want, was in zip(loaded, trained, base):
        assert np.abs(want - was).max() > 1e-3
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

    # kohya: one alpha for all (the common rank), each up scaled so that up @ down * alpha / rank is the update
    state = to_peft_keys(load_file(path))
    kohya = lora_to_kohya(state)
    torch_state = lora_state_in_torch_layout(state)
    modules = {k[: -len(".lora_A.weight")] for k in state if k.endswith(".lora_A.weight")}
    assert sum(k.endswith(".alpha") for k in kohya) == len(modules) == 90
    for module in modules:
        name = sd_kohya_name(*module.split(".", 1))
        down, up, alpha = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"], float(kohya[f"{name}.alpha"])
        assert alpha == 4.0
        update = torch_state[f"{module}.lora_B.weight"] @ torch_state[f"{module}.lora_A.weight"]
        np.testing.assert_allclose(up @ down * alpha / down.shape[0], update, rtol=1e-5, atol=1e-7, err_msg=module)

    # diffusers: the file says each module's rank, and alpha = rank (the scale is in lora_B)
    import json

    metadata = json.loads(diffusers_lora_metadata(lora_state_in_torch_layout(state))["lora_adapter_metadata"])
    assert metadata["unet.r"] == metadata["unet.lora_alpha"] == 4 and metadata["text_encoder.r"] == 4
    pattern = metadata["unet.rank_pattern"]
    assert pattern == metadata["unet.alpha_pattern"] and set(pattern.values()) == {2, 8} and len(pattern) == 20 + 10
    assert "encoder.layers.0.mlp.fc1" in metadata["text_encoder.target_modules"]  # no `text_model.` (transformers 5)
    uniform = {k: v for k, v in torch_state.items() if k.startswith("text_encoder.")}
    assert diffusers_lora_metadata(uniform) is None


# ----- the flags ------------------------------------------------------------------------------------------------
def test_block_syntax():
    entries = parse_block_values("lora_block_ranks", " down=4, down.1=16 ,mid=8,up=2")
    assert entries[1] == BlockValue("down", 1, 1, 16)
    assert value_for(entries, "down_blocks.1.attentions.0.proj_in", 0) == 16  # the block beats its part
    assert value_for(entries, "down_blocks.0.resnets.0.conv1", 0) == 4
    assert value_for(entries, "mid_block.attentions.0.transformer_blocks.0.attn1.to_q", 0) == 8
    assert value_for(entries, "conv_in", 7) == 7 and block_of("time_embedding.linear_1") is None
    ranges = parse_block_values("lora_block_alphas", "0-5=8,6-11=0.5,12=2")
    assert [value_for(ranges, f"transformer_blocks.{n}.attn.to_q", 1.0) for n in (0, 5, 6, 11, 12, 13)] == [
        8, 8, 0.5, 0.5, 2, 1.0]
    assert parse_block_values("lora_block_lr", "up=0")[0].value == 0


@pytest.mark.parametrize("flag, text, message", [
    ("lora_block_ranks", "down:4", "'down:4' is not block=value"),
    ("lora_block_ranks", "down=4,,up=2", "an empty entry"),
    ("lora_block_ranks", "side=4", "unknown block 'side'"),
    ("lora_block_ranks", "down=0", "a rank must be >= 1"),
    ("lora_block_ranks", "down=2.5", "needs an integer"),
    ("lora_block_alphas", "mid=0", "an alpha must be > 0"),
    ("lora_block_lr", "up=-1", "a learning-rate multiplier must be >= 0"),
    ("lora_block_lr", "up=nan", "out of range"),
    ("lora_block_ranks", "mid.0=4", "one mid block"),
    ("lora_block_ranks", "5-2=4", "runs backwards"),
    ("lora_block_ranks", "0-5=4,5-7=2", "blocks '0-5' and '5-7' overlap"),
    ("lora_block_ranks", "down=4,down=2", "blocks 'down' and 'down' overlap"),
    ("lora_block_ranks", "down=4,0-3=2", "mixes UNet blocks"),
])
def test_bad_block_values_are_named(flag, text, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_block_values(flag, text)


@pytest.mark.parametrize("model, extra, message", [
    ("sd", ["--lora_block_ranks", "down=4"], "--lora_block_ranks sets LoRA adapters per block; it needs --use_lora"),
    ("sd", ["--use_lora", "--lora_block_ranks", "down=0"], "--lora_block_ranks: 'down=0' is out of range: a rank "
                                                           "must be >= 1"),
    ("sd", ["--use_lora", "--lora_block_ranks", "up.2=8"], "--lora_block_ranks: 'up.2' goes beyond the 2 up blocks"),
    ("sd", ["--use_lora", "--lora_block_lr", "0-1=0"], "--lora_block_lr: '0-1' is an SD3 block number, but a sd UNet "
                                                       "has down, mid and up blocks"),
    ("sd3", ["--use_lora", "--lora_block_alphas", "mid=2"], "--lora_block_alphas: 'mid' names a UNet block, but "
                                                            "sd3's transformer has numbered joint blocks"),
    ("sd3", ["--use_lora", "--lora_block_ranks", "0-5=8"], "--lora_block_ranks: '0-5' goes beyond the 2 joint blocks"),
    ("sd", ["--use_lora", "--lora_layers", "all-linear"], "--lora_layers 'all-linear': did you mean all_linear?"),
    ("sd", ["--use_lora", "--text_encoder_lora_layers", "attn_mlp"], "--text_encoder_lora_layers attn_mlp chooses "
                                                                      "the text encoders' LoRA targets; it needs "
                                                                      "--use_lora and --train_text_encoder"),
    ("sd", ["--use_lora", "--train_text_encoder", "--text_encoder_lora_layers", "mlp"], "--text_encoder_lora_layers"),
], ids=["without_use_lora", "rank_0", "beyond_up_blocks", "sd3_names_for_a_unet", "unet_names_for_sd3",
        "beyond_sd3_blocks", "preset_typo", "text_targets_without_text_encoder", "unknown_text_preset"])
def test_bad_target_flags_stop_before_any_model_loads(model, extra, message, tiny_model, tiny_sd3_model, photos,
                                                      tmp_path, capsys, no_model_loading):
    path = tiny_model if model == "sd" else tiny_sd3_model
    assert train.main(train_argv(path, photos, tmp_path / "out", extra=extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_resume_compares_the_target_flags_as_parsed():
    """Spacing, order and `--lora_layers attn` (the default spelled out) do not count; a changed block does; a
    checkpoint from before these flags (no such keys) resumes with the defaults."""
    from types import SimpleNamespace

    from ppdreambooth.config.arguments import ModelArguments
    from ppdreambooth.families import get_family
    from ppdreambooth.training.resume_settings import current_settings, differences

    args = SimpleNamespace(fp16=False, bf16=False, fp16_opt_level="O1", optim="adamw", use_ema=False, world_size=1)

    def settings(**kw):
        model_args = ModelArguments(pretrained_model_name_or_path="base", use_lora=True, train_text_encoder=True, **kw)
        return current_settings(model_args, args, get_family("sd"), [], [])

    saved = settings(lora_block_ranks="down=2, mid=8", lora_block_lr="up=0")
    assert saved["lora_block_ranks"] == "down=2,mid=8" and saved["text_encoder_lora_layers"] == "attn"
    same = settings(lora_block_ranks="mid=8,down=2", lora_block_lr="up=0.0", lora_layers="attn",
                    text_encoder_lora_layers="attn")
    assert differences(saved, same, "checkpoint-2") == ([], [])
    errors, _ = differences(saved, settings(lora_block_ranks="down=2,mid=4", lora_block_lr="up=0"), "checkpoint-2")
    assert errors == ["--lora_block_ranks is down=2,mid=4 but checkpoint-2 was trained with down=2,mid=8"]
    older = {k: v for k, v in settings().items() if k not in ("text_encoder_lora_layers", "lora_block_ranks",
                                                                "lora_block_alphas", "lora_block_lr")}
    assert differences(older, settings(), "checkpoint-2") == ([], [])
    assert differences(settings(), settings(lora_layers="attn"), "checkpoint-2") == ([], [])


def test_only_runs_that_choose_targets_describe_them():
    from ppdreambooth.config.arguments import ModelArguments
    from ppdreambooth.modeling.lora_targets import targets_chosen

    def chosen(**kw):
        return targets_chosen(ModelArguments(pretrained_model_name_or_path="base", use_lora=True,
                                             train_text_encoder=True, **kw))

    assert not chosen() and not chosen(lora_layers="attn", text_encoder_lora_layers="attn")
    assert all(chosen(**{flag: value}) for flag, value in (
        ("lora_layers", "attn_ff"), ("lora_layers", "to_q"), ("text_encoder_lora_layers", "attn_mlp"),
        ("lora_block_ranks", "mid=8"), ("lora_block_alphas", "up=2"), ("lora_block_lr", "up=0")))


def test_a_block_without_adapters_is_refused_at_build(tiny_model):
    """down.0 of the tiny SD UNet is a DownBlock2D (no attention): a setting there would do nothing."""
    with pytest.raises(ConfigError, match=re.escape("--lora_block_ranks: block 'down.0' holds none of the adapted")):
        make_model(tiny_model, use_lora=True, lora_block_ranks="down.0=8")
    model = make_model(tiny_model, use_lora=True, conv_rank=2, lora_block_lr="down.0=0")  # its convolutions count
    assert all(p.stop_gradient for n, p in model.denoiser.named_parameters() if n.startswith("down_blocks.0.")
               and "locon" in n)
