"""DreamBoothModel: the loss equals its formula (computed here in NumPy) for given noise and timesteps."""
import numpy as np
import paddle
import pytest

from helpers.models import make_model
from ppdreambooth.config.arguments import ModelArguments
from ppdreambooth.families import get_family
from ppdreambooth.modeling.build import build_model


def expected_losses(model, pixels, ids, noise, timesteps, prior, snr_gamma=None, prior_weight=1.0, seed=11):
    """The DreamBooth loss from first principles (NumPy), with the model's UNet as the only black box."""
    paddle.seed(seed)
    latents = model.encode_images(pixels).numpy()  # the same VAE sample the forward pass draws
    abar = model.noise_scheduler.alphas_cumprod.numpy()[timesteps.numpy()].reshape(-1, 1, 1, 1)
    noisy = np.sqrt(abar) * latents + np.sqrt(1 - abar) * noise.numpy()
    with paddle.no_grad():
        hidden = model.text_encoder(ids)[0]
        pred = model.unet(paddle.to_tensor(noisy, dtype="float32"), timesteps, hidden).sample.numpy()
    if model.prediction_type == "epsilon":
        target = noise.numpy()
    else:
        target = np.sqrt(abar) * noise.numpy() - np.sqrt(1 - abar) * latents
    mse = ((pred - target) ** 2).reshape(len(pred), -1).mean(1)
    if snr_gamma is not None:
        snr = (abar / (1 - abar)).reshape(-1)
        denom = snr + 1 if model.prediction_type == "v_prediction" else snr
        mse = mse * np.minimum(snr, snr_gamma) / denom
    n = len(pred) // 2 if prior else len(pred)
    inst = mse[:n].mean()
    pri = mse[n:].mean() if prior else 0.0
    return inst + prior_weight * pri, inst, pri


@pytest.mark.parametrize("vpred", [False, True], ids=["epsilon", "v_prediction"])
@pytest.mark.parametrize("prior", [False, True], ids=["instance", "with_prior"])
@pytest.mark.parametrize("snr_gamma", [None, 5.0], ids=["plain", "min_snr"])
def test_loss_equals_formula(tiny_model, tiny_vpred_model, vpred, prior, snr_gamma):
    model = make_model(tiny_vpred_model if vpred else tiny_model, prior=prior, snr_gamma=snr_gamma,
                       prior_loss_weight=0.7)
    model.eval()
    assert model.prediction_type == ("v_prediction" if vpred else "epsilon")
    batch = 4 if prior else 2
    paddle.seed(0)
    pixels = paddle.uniform([batch, 3, 64, 64], min=-1, max=1)
    ids = paddle.randint(0, 500, [batch, 77])
    noise = paddle.randn([batch, 4, 8, 8])
    timesteps = paddle.to_tensor([5, 980, 400, 123][:batch], dtype="int64")
    paddle.seed(11)
    with paddle.no_grad():
        out = model(pixels, ids, noise=noise, timesteps=timesteps)
    loss, inst, pri = expected_losses(model, pixels, ids, noise, timesteps, prior, snr_gamma, prior_weight=0.7)
    assert float(out["loss"]) == pytest.approx(loss, rel=1e-4)
    assert float(out["loss_instance"]) == pytest.approx(inst, rel=1e-4)
    assert float(out["loss_prior"]) == pytest.approx(pri, rel=1e-4, abs=1e-8)
    if prior:
        assert float(out["loss"]) != pytest.approx(float(out["loss_instance"]))


def test_noise_offset_changes_only_the_noise(tiny_model):
    model = make_model(tiny_model, noise_offset=0.1)
    latents = paddle.zeros([64, 4, 8, 8])
    paddle.seed(3)
    noise, steps = model.objective.draw(latents)
    paddle.seed(3)
    plain = paddle.randn(latents.shape)
    offset = (noise - plain).numpy()
    # the offset is constant over each (sample, channel) plane and has std close to 0.1
    assert np.allclose(offset, offset[:, :, :1, :1], atol=1e-6)
    assert 0.07 < offset[:, :, 0, 0].std() < 0.13
    assert steps.shape == [64] and int(steps.min()) >= 0 and int(steps.max()) < 1000
    model0 = make_model(tiny_model)
    paddle.seed(3)
    noise0, _ = model0.objective.draw(latents)
    assert np.array_equal(noise0.numpy(), plain.numpy())  # noise_offset 0 (the default) adds nothing


def test_frozen_parts_and_trainable_parameters(tiny_model):
    model = make_model(tiny_model)
    names = [n for n, _ in model.trainable_named_parameters()]
    assert names and all(n.startswith("unet.") for n in names)
    assert set(model.trainable_state_dict()) == set(names)
    te = make_model(tiny_model, train_text_encoder=True)
    te_names = {n.split(".")[0] for n, _ in te.trainable_named_parameters()}
    assert te_names == {"unet", "text_encoder"}
    model.train()
    assert model.unet.training and not model.vae.training and not model.text_encoder.training


def test_train_mode_is_set_once_and_restored_after_eval(tiny_model):
    """The Trainer calls model.train() every step; the walk over sublayers happens only when the mode changed."""
    model = make_model(tiny_model)
    model.train()
    assert all(layer.training for layer in model.sublayers())
    model.unet.conv_in.training = False  # a changed sublayer goes unnoticed while the model stays in training...
    model.train()
    assert not model.unet.conv_in.training
    model.eval()  # ...and is reset on the next switch through eval()
    assert not any(layer.training for layer in model.sublayers())
    model.train()
    assert all(layer.training for layer in model.sublayers())


def test_recompute_turns_on_gradient_checkpointing(tiny_model):
    with paddle.utils.unique_name.guard():
        model = build_model(ModelArguments(pretrained_model_name_or_path=tiny_model, train_text_encoder=True),
                                recompute=True)
    assert model.unet.is_gradient_checkpointing
    assert model.text_encoder.text_model.encoder.gradient_checkpointing
    plain = make_model(tiny_model, train_text_encoder=True)
    assert not plain.unet.is_gradient_checkpointing
    # same loss and gradients with and without recompute
    grads = []
    for m in (model, plain):
        m.train()
        paddle.seed(0)
        pixels, ids = paddle.uniform([2, 3, 64, 64], min=-1, max=1), paddle.randint(0, 500, [2, 77])
        noise, steps = paddle.randn([2, 4, 8, 8]), paddle.to_tensor([10, 500])
        paddle.seed(1)
        m(pixels, ids, noise=noise, timesteps=steps)["loss"].backward()
        grads.append(m.unet.conv_in.weight.grad.numpy().copy())
    assert np.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_prediction_type_and_tokenizer_overrides(tiny_model, tmp_path, monkeypatch):
    import json
    import os
    import shutil

    model = make_model(tiny_model, prediction_type="v_prediction")
    assert model.noise_scheduler.config.prediction_type == "epsilon" and model.prediction_type == "v_prediction"
    # --tokenizer_name: another tokenizer really replaces the model's (here one that pads to 16 tokens)
    other = tmp_path / "other-tokenizer"
    shutil.copytree(os.path.join(tiny_model, "tokenizer"), other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 16}))
    with paddle.utils.unique_name.guard():
        custom = build_model(ModelArguments(pretrained_model_name_or_path=tiny_model, tokenizer_name=str(other)))
    assert custom.tokenizer.model_max_length == 16 and custom.tokenize("a dog")["input_ids"].shape == (16,)
    assert model.tokenize("a dog")["input_ids"].shape == (77,)

    # --revision reaches every component's loader, tokenizers included
    from ppdiffusers.transformers import CLIPTokenizer

    from ppdreambooth.families.loading import load_component

    seen = {}
    original = CLIPTokenizer.from_pretrained.__func__
    monkeypatch.setattr(CLIPTokenizer, "from_pretrained",
                        classmethod(lambda cls, *a, **kw: seen.update(kw) or original(
                            cls, *a, **{k: v for k, v in kw.items() if k != "revision"})))
    load_component(tiny_model, "tokenizer", get_family("sd"), revision="v1")
    assert seen.get("revision") == "v1"
