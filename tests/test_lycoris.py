"""LyCORIS LoHa and LoKr (`--lora_type loha|lokr`): the layers against NumPy transcriptions of the published formulas,
LyCORIS's factorisation, the base model exactly at initialisation, only adapter weights trained, the merged export
equal to the adapted model, the kohya/LyCORIS file read back the way ComfyUI reads it, exact resume, generate, and
bad flags refused before any model loads."""
import json

import numpy as np
import paddle
import pytest
from safetensors.numpy import load_file

from helpers.models import collate, make_model
from helpers.runs import run_module, train_argv, truncate_run_to
from ppdreambooth import train
from ppdreambooth.errors import ConfigError, ExportError
from ppdreambooth.interop.exports import export
from ppdreambooth.interop.merge import load_adapters, write_merged
from ppdreambooth.modeling.lora import LORA_WEIGHTS_NAME, save_lora_weights
from ppdreambooth.modeling.lycoris import (LohaAdapter, LokrAdapter, add_lycoris, factorization, lokr_shapes,
                                           lycoris_state_dict, switch_adapters)


# ----- NumPy transcriptions of the formulas (PyTorch layout: W [out, in]) --------------------------------------------
def numpy_loha(p, alpha):
    rank = p["hada_w1_b"].shape[0]
    return (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"]) * alpha / rank


def numpy_lokr(p, alpha):
    if "lokr_w2" in p:
        return np.kron(p["lokr_w1"], p["lokr_w2"])
    rank = p["lokr_w2_b"].shape[0]
    return np.kron(p["lokr_w1"], p["lokr_w2_a"] @ p["lokr_w2_b"]) * alpha / rank


def comfyui_merge(kohya_file, name, weight_t, strength=1.0):
    """ComfyUI's reading of one module of a LyCORIS file (comfy/weight_adapter loha.py / lokr.py): LoHa scale
    alpha / hada_w1_b.shape[0]; LoKr alpha / (w2_b or w1_b).shape[0] when a factor is low rank, else 1; ΔW reshaped
    to the weight's shape and added times the strength."""
    f = {k[len(name) + 1:]: v.astype(np.float64) for k, v in kohya_file.items() if k.startswith(name + ".")}
    alpha = float(f["alpha"]) if "alpha" in f else None
    if "lora_down.weight" in f:  # LoRA / LoCon (comfy/weight_adapter/lora.py): up.flatten(1) @ down.flatten(1)
        down, up = f["lora_down.weight"], f["lora_up.weight"]
        dim = down.shape[0]
        diff = up.reshape(up.shape[0], -1) @ down.reshape(dim, -1)
    elif "hada_w1_a" in f:
        dim = f["hada_w1_b"].shape[0]
        diff = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])
    else:
        dim = None
        w1 = f["lokr_w1"]
        if "lokr_w2" in f:
            w2 = f["lokr_w2"]
        else:
            dim = f["lokr_w2_b"].shape[0]
            w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
        if w2.ndim == 4:  # a convolution's full w2: w1 unsqueezed to [a, c, 1, 1]
            w1 = w1[:, :, None, None]
        diff = np.kron(w1, w2)
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    return weight_t + strength * scale * diff.reshape(weight_t.shape)


def torch_layout(weight):
    """A Paddle weight in PyTorch's layout: Linear [in, out] transposed; a Conv2D kernel is the same already."""
    return weight.T if weight.ndim == 2 else weight


class Block(paddle.nn.Layer):
    def __init__(self, fan_in, fan_out):
        super().__init__()
        self.proj = paddle.nn.Linear(fan_in, fan_out)
        self.conv = paddle.nn.Conv2D(3, 4, 3)

    def forward(self, x):
        return self.proj(x)


def adapted_block(kind, fan_in=12, fan_out=8, rank=2, alpha=6.0, factor=-1, seed=0):
    """A Linear with `kind` adapters whose matrices are all random (no zero factor) and them as NumPy arrays."""
    paddle.seed(seed)
    with paddle.utils.unique_name.guard():
        block = Block(fan_in, fan_out)
        add_lycoris(block, ["proj"], kind, rank, alpha, factor)
    rng = np.random.RandomState(seed)
    arrays = {}
    with paddle.no_grad():
        for name, param in block.proj.named_parameters(include_sublayers=False):
            arrays[name] = (rng.standard_normal(param.shape) * 0.5).astype("float32")
            param.set_value(arrays[name])
        block.proj.base_layer.bias.set_value(rng.standard_normal(fan_out).astype("float32"))
    return block, arrays


@pytest.mark.parametrize("kind, rank, factor, keys", [
    ("loha", 2, -1, {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}),
    ("lokr", 1, -1, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),  # 12 x 8 -> (3, 4) x (2, 4): rank 1 < 4 / 2
    ("lokr", 4, -1, {"lokr_w1", "lokr_w2"}),  # rank 4 >= max(4, 4) / 2: w2 is a full matrix
    ("lokr", 1, 2, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),  # factor 2: (2, 6) x (2, 4)
], ids=["loha", "lokr_low_rank_w2", "lokr_full_w2", "lokr_factor_2"])
def test_the_layer_computes_the_published_formula(kind, rank, factor, keys):
    block, p = adapted_block(kind, rank=rank, alpha=6.0, factor=factor)
    assert set(p) == keys
    x = np.random.RandomState(1).standard_normal((5, 12)).astype("float32")
    weight = block.proj.base_layer.weight.numpy().astype(np.float64)  # Paddle: [in, out]
    bias = block.proj.base_layer.bias.numpy()
    delta = numpy_loha(p, 6.0) if kind == "loha" else numpy_lokr(p, 6.0)
    assert delta.shape == (8, 12)  # [out, in]
    want = x @ (weight + delta.T) + bias
    got = block(paddle.to_tensor(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.abs(got - (x @ weight + bias)).max() > 1e-2  # the adapter does something
    # the full-w2 LoKr has scale 1 whatever alpha is (as LyCORIS and ComfyUI), the others alpha / rank
    expected_scale = 1.0 if "lokr_w2" in p else 6.0 / rank
    assert block.proj.scale == expected_scale


def test_lokr_factorisation_follows_lycoris():
    # LyCORIS's documented examples (lycoris/functional/general.py `factorization` docstring)
    assert [factorization(d) for d in (127, 128, 250, 512, 1024)] == [(1, 127), (8, 16), (10, 25), (16, 32),
                                                                       (32, 32)]
    assert [factorization(d, 4) for d in (127, 128, 250, 360, 512)] == [(1, 127), (4, 32), (2, 125), (4, 90),
                                                                        (4, 128)]
    assert factorization(360, 8) == (8, 45) and factorization(1024, 16) == (16, 64)
    # SD 1.5's 320-wide attention: w1 (16, 16), w2 low rank at rank 4 -> (20, 4) @ (4, 20)
    assert lokr_shapes(320, 320, 4, -1) == {"lokr_w1": (16, 16), "lokr_w2_a": (20, 4), "lokr_w2_b": (4, 20)}
    assert lokr_shapes(320, 768, 4, 8) == {"lokr_w1": (8, 8), "lokr_w2_a": (40, 4), "lokr_w2_b": (4, 96)}


@pytest.mark.parametrize("kind, rank", [("loha", 3), ("lokr", 1), ("lokr", 8)])
def test_at_initialisation_the_layer_is_the_base_layer_bit_for_bit_and_switches_off(kind, rank):
    paddle.seed(0)
    with paddle.utils.unique_name.guard():
        block = Block(12, 8)
        add_lycoris(block, ["proj"], kind, rank, 4.0)
    layer = block.proj
    assert isinstance(layer, LohaAdapter if kind == "loha" else LokrAdapter)
    assert layer.base_layer.weight.stop_gradient and not any(
        p.stop_gradient for p in layer.parameters(include_sublayers=False))
    x = paddle.randn([4, 12])
    assert np.array_equal(block(x).numpy(), layer.base_layer(x).numpy())
    assert not np.any(layer.delta().numpy())
    # a gradient reaches the zero factor: training can move it
    block(x).sum().backward()
    zero = "hada_w2_a" if kind == "loha" else "lokr_w2" if rank == 8 else "lokr_w2_b"
    assert np.abs(getattr(layer, zero).grad.numpy()).max() > 0
    adapted, _ = adapted_block(kind, rank=rank)
    base = adapted.proj.base_layer(x).numpy()
    switch_adapters(adapted, False)
    assert np.array_equal(adapted(x).numpy(), base)
    switch_adapters(adapted, True)
    assert np.abs(adapted(x).numpy() - base).max() > 1e-2


def numpy_conv(x, kernel, bias, padding):
    """A direct 2-D convolution (cross-correlation, stride 1) in NumPy: x [n, in, h, w], kernel [out, in, k, k]."""
    n, _, h, w = x.shape
    k = kernel.shape[-1]
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    out = np.zeros((n, kernel.shape[0], h + 2 * padding - k + 1, w + 2 * padding - k + 1))
    for i in range(out.shape[2]):
        for j in range(out.shape[3]):
            out[:, :, i, j] = np.einsum("nchw,ochw->no", xp[:, :, i:i + k, j:j + k], kernel)
    return out + bias[None, :, None, None]


class ConvNet(paddle.nn.Layer):
    """A UNet-like holder: `resnets.0.conv1` (3x3) and `resnets.0.conv_shortcut` (1x1, not adapted)."""

    def __init__(self):
        super().__init__()
        self.resnets = paddle.nn.LayerList([paddle.nn.Layer()])
        self.resnets[0].conv1 = paddle.nn.Conv2D(4, 6, 3, padding=1)
        self.resnets[0].conv_shortcut = paddle.nn.Conv2D(4, 6, 1)
        self.conv_in = paddle.nn.Conv2D(4, 4, 3, padding=1)

    def forward(self, x):
        return self.resnets[0].conv1(x)


@pytest.mark.parametrize("kind, rank, keys, shapes", [
    ("loha", 2, {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}, {"hada_w1_b": (2, 36)}),
    ("lokr", 1, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}, {"lokr_w1": (2, 2), "lokr_w2_a": (3, 1), "lokr_w2_b": (1, 18)}),
    ("lokr", 4, {"lokr_w1", "lokr_w2"}, {"lokr_w1": (2, 2), "lokr_w2": (3, 2, 3, 3)}),
    ("lora", 2, {"locon_down", "locon_up"}, {"locon_down": (2, 4, 3, 3), "locon_up": (6, 2, 1, 1)}),  # LoCon
], ids=["loha", "lokr_low_rank_w2", "lokr_full_w2", "locon"])
def test_a_3x3_convolution_adapter_is_a_convolution_with_the_merged_kernel(kind, rank, keys, shapes):
    from ppdreambooth.modeling.lycoris import add_lycoris_convs

    paddle.seed(0)
    with paddle.utils.unique_name.guard():
        net = ConvNet()
        x = paddle.randn([2, 4, 5, 5])
        assert add_lycoris_convs(net, kind, rank, 3.0) == ["resnets.0.conv1"]  # not the 1x1, not conv_in
        layer = net.resnets[0].conv1
        assert np.array_equal(net(x).numpy(), layer.base_layer(x).numpy())  # starts as the base conv exactly
    rng = np.random.RandomState(0)
    p = {}
    with paddle.no_grad():
        for name, param in layer.named_parameters(include_sublayers=False):
            p[name] = (rng.standard_normal(param.shape) * 0.5).astype("float32")
            param.set_value(p[name])
    assert set(p) == keys and all(p[k].shape == v for k, v in shapes.items())
    kernel = layer.base_layer.weight.numpy().astype(np.float64)  # [out, in, 3, 3], as PyTorch's
    if kind == "loha":
        delta = numpy_loha(p, 3.0)
    elif kind == "lora":  # LoCon: a 1x1 up conv after a 3x3 down conv is the conv with kernel up @ down
        delta = np.einsum("or,rikl->oikl", p["locon_up"][:, :, 0, 0], p["locon_down"]) * 3.0 / 2
    else:  # LyCORIS's kron of w1 [a, c, 1, 1] with w2 [b, d, 3, 3] (rebuilt from w2_a @ w2_b when low rank)
        w2 = p["lokr_w2"] if "lokr_w2" in p else (p["lokr_w2_a"] @ p["lokr_w2_b"]).reshape(3, 2, 3, 3)
        delta = np.kron(p["lokr_w1"][:, :, None, None], w2) * (3.0 / rank if "lokr_w2_a" in p else 1.0)
    want = numpy_conv(x.numpy(), kernel + delta.reshape(kernel.shape), layer.base_layer.bias.numpy(), 1)
    np.testing.assert_allclose(net(x).numpy(), want, rtol=1e-4, atol=1e-4)
    assert np.abs(net(x).numpy() - layer.base_layer(x).numpy()).max() > 1e-2


def test_a_convolution_named_as_a_target_is_refused():
    with paddle.utils.unique_name.guard(), pytest.raises(ConfigError, match="Linear layers only; conv is a Conv2D"):
        add_lycoris(Block(7, 5), ["conv"], "loha", 2, 2.0)


def test_the_saved_state_holds_lycoris_names_in_pytorch_layout():
    block, p = adapted_block("lokr", rank=1, alpha=3.0)
    state = lycoris_state_dict(block)
    assert set(state) == {f"proj.{k}" for k in p} | {"proj.alpha"}
    assert float(state["proj.alpha"]) == 3.0
    assert state["proj.lokr_w1"].shape == (2, 3) and state["proj.lokr_w2_a"].shape == (4, 1)  # [a, c], [b, r]


# ----- every family ----------------------------------------------------------------------------------------------
TEXT_ENCODERS = {"sd": True, "sdxl": True, "sd3": False}  # SD3 LoRA trains the transformer only


def dataset_of(model, photos):
    from ppdreambooth.data.dataset import ConceptData, DreamBoothDataset
    from ppdreambooth.data.images import list_image_files
    from ppdreambooth.data.photos import load_image_set

    files = list_image_files(photos)
    instance = load_image_set(files, "a photo of sks dog", model.tokenize, lambda h, w: (64, 64))
    prior = load_image_set(files[::-1], "a photo of dog", model.tokenize, lambda h, w: (64, 64))
    return DreamBoothDataset([ConceptData(instance, prior)], center_crop=True, random_flip=False,
                             size_conditioning=model.family.size_conditioning)


def loss_of(model, batch):
    paddle.seed(11)
    with paddle.no_grad():
        return model(**batch)["loss"].numpy()


def all_adapters(model, on):
    for layer in model.trained_layers().values():
        switch_adapters(layer, on)


ADAPTER_KEYS = ("hada_", "lokr_")


@pytest.mark.slow  # builds three models per family and kind
@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_every_family_starts_as_its_base_trains_only_adapters_and_merges(kind, family_model, photos, tmp_path):
    family, path = family_model
    base = make_model(path, prior=True)
    conv = {} if family == "sd3" else {"conv_rank": 2, "conv_alpha": 1.0}  # UNets: their 3x3 convolutions too
    model = make_model(path, prior=True, use_lora=True, lora_type=kind, lora_rank=2, lora_alpha=4.0,
                       train_text_encoder=TEXT_ENCODERS[family], **conv)
    dataset = dataset_of(model, photos)
    batch = collate([dataset[(0, 1)], dataset[(1, 2)]])
    assert np.array_equal(loss_of(model, batch), loss_of(base, batch))  # the base model, bit for bit

    named = dict(model.trainable_named_parameters())
    assert named and all(any(k in n for k in ADAPTER_KEYS) for n in named)  # only adapter matrices train
    convs = {n.rsplit(".", 1)[0] for n in named if ".resnets." in n or "samplers." in n}
    assert (len(convs) > 4 and any(n.endswith(".conv1") for n in convs)) if conv else not convs
    assert {n.split(".")[0] for n in named} == ({"unet", "text_encoder", "text_encoder_2"} if family == "sdxl"
                                                else {"unet", "text_encoder"} if family == "sd" else {"transformer"})
    before = {n: p.numpy().copy() for n, p in named.items()}
    frozen = {f"{c}.{k}": v.numpy().copy() for c, layer in model.trained_layers().items()
              for k, v in layer.state_dict().items() if not any(a in k for a in ADAPTER_KEYS)}
    optimizer = paddle.optimizer.AdamW(learning_rate=1e-2, parameters=model.trainable_parameters())
    model.train()
    for step in range(3):
        paddle.seed(step)
        model(**batch)["loss"].backward()
        optimizer.step()
        optimizer.clear_grad()
    model.eval()
    moved = {n for n, p in named.items() if not np.array_equal(p.numpy(), before[n])}
    # SDXL reads the penultimate layer of its first text encoder: its last layer's adapters get no gradient
    unused = {"sdxl": ("text_encoder.text_model.encoder.layers.4.",)}.get(family, ())
    assert set(named) - moved == {n for n in named if any(u in n for u in unused)}
    now = {f"{c}.{k}": v.numpy() for c, layer in model.trained_layers().items()
           for k, v in layer.state_dict().items() if not any(a in k for a in ADAPTER_KEYS)}
    assert all(np.array_equal(now[k], frozen[k]) for k in frozen)  # base weights untouched
    trained = loss_of(model, batch)
    assert abs(float(trained) - float(loss_of(base, batch))) > 1e-6
    all_adapters(model, False)  # adapters off: the base model again, exactly
    assert np.array_equal(loss_of(model, batch), loss_of(base, batch))
    all_adapters(model, True)

    # saved under LyCORIS names; folded into the base weights (the merged export) it is the trained model
    saved = load_file(save_lora_weights(str(tmp_path), model.family, model.trained_layers(), 2, 4.0))
    modules = {k.rsplit(".", 1)[0] for k in saved}
    assert all(f"{m}.alpha" in saved for m in modules) and len(saved) > len(modules)
    write_merged(saved, path, model.family, str(tmp_path / "merged"))
    merged = make_model(str(tmp_path / "merged"), prior=True)
    np.testing.assert_allclose(loss_of(merged, batch), trained, rtol=1e-5)


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
@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_the_base_prediction_prior_switches_lycoris_adapters_off(kind, tiny_model, photos):
    """The prior target is the model with its adapters off: at initialisation exactly its own prediction; with
    trained (here: randomised) adapters the prior term is no longer zero, so the switch is what made it zero."""
    model = make_model(tiny_model, prior=True, use_lora=True, lora_type=kind, lora_rank=2)
    model.base_prediction_prior = True
    batch = collate([dataset_of(model, photos)[(0, 1)], dataset_of(model, photos)[(1, 2)]])
    paddle.seed(3)
    assert float(model(**batch)["loss_prior"]) == 0.0
    with paddle.no_grad():
        for name, param in model.trainable_named_parameters():
            param.set_value(paddle.randn(param.shape) * 0.05)
    paddle.seed(3)
    assert float(model(**batch)["loss_prior"]) > 0.0


# ----- LoCon: plain LoRA with --conv_rank --------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("family_name", ["sd", "sdxl"])
def test_locon_starts_as_the_base_trains_its_convolutions_and_merges(family_name, tiny_model, tiny_sdxl_model,
                                                                     photos, tmp_path):
    from ppdreambooth.modeling.lora import LOCON_WEIGHTS_NAME, to_peft_keys

    path = tiny_model if family_name == "sd" else tiny_sdxl_model
    base = make_model(path, prior=True)
    model = make_model(path, prior=True, use_lora=True, lora_rank=2, conv_rank=2, conv_alpha=1.0)
    batch = collate([dataset_of(model, photos)[(0, 1)], dataset_of(model, photos)[(1, 2)]])
    assert np.array_equal(loss_of(model, batch), loss_of(base, batch))
    named = dict(model.trainable_named_parameters())
    convs = {n: p.numpy().copy() for n, p in named.items() if ".locon_" in n}
    assert len(convs) > 8 and any(".resnets.0.conv1.locon_up" in n for n in convs)
    optimizer = paddle.optimizer.AdamW(learning_rate=1e-2, parameters=model.trainable_parameters())
    model.train()
    for step in range(3):
        paddle.seed(step)
        model(**batch)["loss"].backward()
        optimizer.step()
        optimizer.clear_grad()
    model.eval()
    assert all(not np.array_equal(named[n].numpy(), v) for n, v in convs.items())  # every conv adapter trained
    trained = loss_of(model, batch)
    model.adapters_on(False)  # the base-prediction prior's switch: LoRA and LoCon both off
    assert np.array_equal(loss_of(model, batch), loss_of(base, batch))
    model.adapters_on(True)
    save_lora_weights(str(tmp_path), model.family, model.trained_layers(), 2, 2.0)
    conv_state = load_file(str(tmp_path / LOCON_WEIGHTS_NAME))
    assert {k.rsplit(".", 1)[1] for k in conv_state} == {"locon_down", "locon_up", "alpha"}
    lora_state = load_file(str(tmp_path / LORA_WEIGHTS_NAME))
    assert not any("locon" in k or "conv" in k for k in lora_state)  # the LoRA file stays what ppdiffusers loads
    write_merged(to_peft_keys(lora_state), path, model.family, str(tmp_path / "merged"), conv_state)
    np.testing.assert_allclose(loss_of(make_model(str(tmp_path / "merged"), prior=True), batch), trained, rtol=1e-5)


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
