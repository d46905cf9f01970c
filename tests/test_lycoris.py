"""LyCORIS adapters in the model: LoHa and LoKr (`--lora_type loha|lokr`) and LoCon (`--conv_rank`) layers against
NumPy transcriptions of the published formulas (a convolution against a NumPy convolution with the merged kernel),
LyCORIS's factorisation, the base model exactly at initialisation and with adapters off, only adapter weights trained
in every family, and the merged weights equal to the adapted model. Runs, exports and flags: test_lycoris_runs.py."""
import numpy as np
import paddle
import pytest
from safetensors.numpy import load_file

from helpers.lycoris import dataset_of, loss_of, numpy_loha, numpy_lokr
from helpers.models import collate, make_model
from ppdreambooth.errors import ConfigError
from ppdreambooth.interop.merge import write_merged
from ppdreambooth.modeling.lora import LORA_WEIGHTS_NAME, save_lora_weights
from ppdreambooth.modeling.lycoris import (LohaAdapter, LokrAdapter, add_lycoris, factorization, lokr_shapes,
                                           lycoris_state_dict, switch_adapters)


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
    saved = load_file(save_lora_weights(str(tmp_path), model.family, model.trained_layers()))
    modules = {k.rsplit(".", 1)[0] for k in saved}
    assert all(f"{m}.alpha" in saved for m in modules) and len(saved) > len(modules)
    write_merged(saved, path, model.family, str(tmp_path / "merged"))
    merged = make_model(str(tmp_path / "merged"), prior=True)
    np.testing.assert_allclose(loss_of(merged, batch), trained, rtol=1e-5)


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
    save_lora_weights(str(tmp_path), model.family, model.trained_layers())
    conv_state = load_file(str(tmp_path / LOCON_WEIGHTS_NAME))
    assert {k.rsplit(".", 1)[1] for k in conv_state} == {"locon_down", "locon_up", "alpha"}
    lora_state = load_file(str(tmp_path / LORA_WEIGHTS_NAME))
    assert not any("locon" in k or "conv" in k for k in lora_state)  # the LoRA file stays what ppdiffusers loads
    write_merged(to_peft_keys(lora_state), path, model.family, str(tmp_path / "merged"), conv_state)
    np.testing.assert_allclose(loss_of(make_model(str(tmp_path / "merged"), prior=True), batch), trained, rtol=1e-5)
