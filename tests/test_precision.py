"""Mixed precision as far as a CPU allows: what AMP O2 casts, what stays float32, what gets saved.

Paddle's CPU build has no bfloat16/float16 matmul kernels and its `amp.decorate` leaves CPU models
alone, so this emulates O2's cast (`Layer.to(dtype=...)` over the model's sub-layers, which is what
decoration does) and checks where each tensor ends up; the GPU run itself is not verified here.
"""
import os

import numpy as np
import paddle
from safetensors.numpy import load_file

from helpers.models import make_model as make
from ppdreambooth.config.arguments import ModelArguments
from ppdreambooth.config.parsing import parse_args
from ppdreambooth.modeling.build import build_model
from ppdreambooth.interop.pipeline_folder import write_pipeline
from ppdreambooth.training.trainer import DreamBoothTrainer


def test_o2_casts_only_the_trained_layers(family_model):
    """The VAE stays float32 in every family (SDXL's VAE overflows in fp16), so do frozen text encoders."""
    _, tiny_model = family_model
    model = make(tiny_model)
    encoders = model.family.text_encoders
    model.to(dtype="bfloat16")  # what paddle.amp.decorate(level="O2") does to the model's sub-layers
    assert all(p.dtype == paddle.bfloat16 for p in model.denoiser.parameters())
    assert model.vae.encoder.conv_in.weight.dtype == paddle.float32  # frozen VAE: not a sub-layer
    for name in encoders:  # frozen encoders
        assert all(p.dtype == paddle.float32 for p in getattr(model, name).parameters()), name
    schedule = model.objective.sigma_grid if model.family.objective == "flow" else model.noise_scheduler.alphas_cumprod
    assert schedule.dtype == paddle.float32  # never a buffer
    assert all(v.dtype == paddle.bfloat16 for v in model.trainable_state_dict().values())

    trained_te = make(tiny_model, train_text_encoder=True)
    trained_te.to(dtype="bfloat16")
    for name in encoders:  # SD3's T5 stays frozen even then
        trained = trained_te.family.is_trainable_text_encoder(name)
        want = paddle.bfloat16 if trained else paddle.float32
        assert all(p.dtype == want for p in getattr(trained_te, name).parameters()), name
    assert trained_te.vae.encoder.conv_in.weight.dtype == paddle.float32


def test_latents_noise_and_loss_stay_float32(tiny_model):
    model = make(tiny_model)
    paddle.seed(0)
    mean, std = model.latent_moments(paddle.uniform([2, 3, 64, 64], min=-1, max=1))
    assert mean.dtype == std.dtype == paddle.float32
    latents = model.sample_latents(mean, std)
    noise, _ = model.objective.draw(latents)
    assert latents.dtype == noise.dtype == paddle.float32
    from ppdreambooth.modeling.losses import dreambooth_loss

    pred = noise.astype("bfloat16")  # a low-precision UNet output
    out = dreambooth_loss(pred, noise, num_instance=2)
    assert out["loss"].dtype == paddle.float32


def test_final_weights_are_saved_in_float32_after_o2(tiny_model, tmp_path):
    model = make(tiny_model)
    model.to(dtype="bfloat16")
    write_pipeline(model, tiny_model, str(tmp_path))
    saved = load_file(os.path.join(tmp_path, "unet", "diffusion_paddle_model.safetensors"))
    assert all(v.dtype == np.float32 for v in saved.values())


def test_amp_flags_reach_the_trainer(tiny_model, photos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    m, d, a = parse_args(["--pretrained_model_name_or_path", tiny_model, "--instance_data_dir", photos,
                          "--instance_prompt", "x", "--mixed_precision", "bf16", "--fp16_opt_level", "O2",
                          "--report_to", "none"])
    model = make(tiny_model)
    trainer = DreamBoothTrainer(model=model, args=a, base_model=tiny_model)
    assert trainer.enable_autocast_context_manager and trainer.amp_dtype == "bfloat16"
    assert a.fp16_opt_level == "O2" and not trainer.do_grad_scaling  # bf16 needs no loss scaling
    _, _, a16 = parse_args(["--pretrained_model_name_or_path", tiny_model, "--instance_data_dir", photos,
                            "--instance_prompt", "x", "--fp16", "--report_to", "none", "--output_dir", "o16"])
    trainer16 = DreamBoothTrainer(model=make(tiny_model), args=a16, base_model=tiny_model)
    assert trainer16.amp_dtype == "float16" and trainer16.do_grad_scaling


def test_memory_efficient_attention_is_wired_to_ppdiffusers(tiny_model, monkeypatch):
    from ppdiffusers import UNet2DConditionModel

    calls = []
    monkeypatch.setattr(UNet2DConditionModel, "enable_xformers_memory_efficient_attention",
                        lambda self, attention_op=None: calls.append(attention_op))
    with paddle.utils.unique_name.guard():
        build_model(ModelArguments(pretrained_model_name_or_path=tiny_model), memory_efficient_attention=True)
    assert calls == [None]
