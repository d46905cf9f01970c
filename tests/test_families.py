"""Model families: detection, and SDXL's conditioning, loss, parameters and LoRA checked against first principles.

The SD 1.x behaviour has its own tests (test_model, test_lora, ...); the behaviours every family must share
are parametrised over `family_model` there (caching) and here.
"""
import json
import os
import shutil

import numpy as np
import paddle
import pytest
from PIL import Image

from helpers.models import make_model as make
from ppdreambooth.errors import ConfigError
from ppdreambooth.data.dataset import ConceptData, DreamBoothDataset
from ppdreambooth.data.photos import load_image_set
from ppdreambooth.families import FAMILIES, detect_family
from ppdreambooth.data.images import list_image_files
from ppdreambooth.families.checks import check_model_folder


# ----- detection ---------------------------------------------------------------------------------------
def test_family_is_read_from_model_index(tiny_model, tiny_sdxl_model, tmp_path):
    assert detect_family(tiny_model).name == "sd" and detect_family(tiny_sdxl_model).name == "sdxl"
    assert detect_family(tiny_model, override="sdxl").name == "sdxl"  # --model_family wins
    with pytest.raises(ConfigError, match="--model_family 'sd4' is not known"):
        detect_family(tiny_model, override="sd4")
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ConfigError, match="KandinskyPipeline.*StableDiffusionXLPipeline"):
        detect_family(str(other))
    (other / "model_index.json").unlink()
    with pytest.raises(ConfigError, match="pass --model_family"):
        detect_family(str(other))


def test_a_missing_sdxl_component_is_named_before_loading(tiny_sdxl_model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sdxl_model, broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(ConfigError, match="lacks text_encoder_2/.*StableDiffusionXLPipeline"):
        check_model_folder(str(broken), detect_family(str(broken)))


# ----- SDXL conditioning and loss ---------------------------------------------------------------------
def test_sdxl_loss_equals_its_formula(tiny_sdxl_model):
    """Penultimate states of both encoders, the second one's pooled projection and the time ids reach the UNet."""
    model = make(tiny_sdxl_model, prior=True, prior_loss_weight=0.6)
    model.eval()
    paddle.seed(0)
    pixels = paddle.uniform([4, 3, 64, 64], min=-1, max=1)
    ids = paddle.randint(0, 500, [4, 77])
    ids_2 = paddle.randint(0, 500, [4, 77])
    time_ids = paddle.to_tensor([[96, 80, 0, 8, 64, 64], [64, 64, 0, 0, 64, 64], [128, 64, 32, 0, 64, 64],
                                 [70, 90, 3, 13, 64, 64]], dtype="float32")
    noise = paddle.randn([4, 4, 8, 8])
    timesteps = paddle.to_tensor([5, 980, 400, 123], dtype="int64")
    paddle.seed(11)
    with paddle.no_grad():
        out = model(pixels, ids, input_ids_2=ids_2, time_ids=time_ids, noise=noise, timesteps=timesteps)

    paddle.seed(11)
    latents = model.encode_images(pixels).numpy()
    abar = model.noise_scheduler.alphas_cumprod.numpy()[timesteps.numpy()].reshape(-1, 1, 1, 1)
    noisy = np.sqrt(abar) * latents + np.sqrt(1 - abar) * noise.numpy()
    with paddle.no_grad():
        first = model.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        second = model.text_encoder_2(ids_2, output_hidden_states=True)
        hidden = paddle.concat([first, second.hidden_states[-2]], axis=-1)
        added = {"text_embeds": second.text_embeds, "time_ids": time_ids}
        pred = model.unet(paddle.to_tensor(noisy, dtype="float32"), timesteps, hidden,
                          added_cond_kwargs=added).sample.numpy()
        # the time ids matter: other ids give another prediction
        moved = model.unet(paddle.to_tensor(noisy, dtype="float32"), timesteps, hidden,
                           added_cond_kwargs={**added, "time_ids": time_ids * 0 + 64}).sample.numpy()
    assert np.abs(moved - pred).max() > 1e-4
    mse = ((pred - noise.numpy()) ** 2).reshape(4, -1).mean(1)
    assert float(out["loss_instance"]) == pytest.approx(mse[:2].mean(), rel=1e-4)
    assert float(out["loss_prior"]) == pytest.approx(mse[2:].mean(), rel=1e-4)
    assert float(out["loss"]) == pytest.approx(mse[:2].mean() + 0.6 * mse[2:].mean(), rel=1e-4)


def write(folder, sizes, seed=0):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.RandomState(seed)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.randint(0, 255, (h, w, 3)).astype(np.uint8)).save(os.path.join(folder, f"{i}.png"))
    return list_image_files(str(folder))


def test_time_ids_record_each_samples_own_size_crop_and_flip(tiny_sdxl_model, tmp_path):
    """(original h, w, crop top, crop left, target h, w), the crop really taken, mirrored on a flip."""
    tokenize = FAMILIES["sdxl"].tokenize
    from ppdiffusers.transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sdxl_model, subfolder="tokenizer")
    tokens = {"tokenizer": tokenizer, "tokenizer_2": tokenizer}
    photos = write(tmp_path / "photos", [(200, 100), (90, 160)])  # (w, h): wide and tall
    classes = write(tmp_path / "class", [(64, 64), (128, 96)], seed=1)
    inst = load_image_set(photos, "a photo of sks dog", lambda t: tokenize(tokens, t), lambda h, w: (64, 64))
    cls = load_image_set(classes, "a photo of dog", lambda t: tokenize(tokens, t), lambda h, w: (64, 64))
    dataset = DreamBoothDataset([ConceptData(inst, cls)], center_crop=False, random_flip=True,
                                size_conditioning=FAMILIES["sdxl"].size_conditioning)
    seen_flips, seen_corners = set(), set()
    for seed in range(12):
        for index in range(len(dataset)):
            item = dataset[(index, seed)]
            for role, images, k in (("instance", inst, index % 2), ("class", cls, index % 2)):
                example = item[role]
                original = images.original_sizes[k]
                covered = images.images[k]
                oh, ow, top, left, th, tw = example["time_ids"].tolist()
                assert (oh, ow) == original and (th, tw) == (64, 64)
                # find which crop and orientation produced the pixels: it must match the recorded corner
                matches = []
                for flip in (False, True):
                    real_left = covered.width - left - 64 if flip else left
                    crop = covered.crop((int(real_left), int(top), int(real_left) + 64, int(top) + 64))
                    if flip:
                        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
                    expected = np.asarray(crop, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0
                    if np.array_equal(expected, example["pixel_values"]):
                        matches.append(flip)
                assert matches, (role, index, seed)
                seen_flips.update(matches)
                seen_corners.add((role, k, top, left))
    assert seen_flips == {False, True}
    assert len({c for c in seen_corners if c[0] == "instance"}) > 4  # random crops really vary
    assert ("class", 0, 0, 0) in seen_corners  # a 64x64 class image keeps its own (uncropped) geometry


# ----- parameters ----------------------------------------------------------------------------------------
def train_steps(model, steps=2, lr=1e-2):
    optimizer = paddle.optimizer.AdamW(learning_rate=lr, parameters=model.trainable_parameters())
    model.train()
    paddle.seed(0)
    for _ in range(steps):
        batch = {"pixel_values": paddle.uniform([2, 3, 64, 64], min=-1, max=1),
                 "input_ids": paddle.randint(0, 500, [2, 77]), "input_ids_2": paddle.randint(0, 500, [2, 77]),
                 "time_ids": paddle.to_tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype="float32")}
        model(**batch)["loss"].backward()
        optimizer.step()
        optimizer.clear_grad()
    model.eval()


def snapshot(layer):
    return {k: v.numpy().copy() for k, v in layer.state_dict().items()}


def changed(before, layer):
    """Keys of `before` whose value in `layer` differs now."""
    return [k for k, v in layer.state_dict().items() if k in before and not np.array_equal(v.numpy(), before[k])]


@pytest.mark.parametrize("train_text_encoder", [False, True], ids=["unet_only", "with_text_encoders"])
def test_sdxl_full_fine_tune_trains_exactly_what_it_should(tiny_sdxl_model, train_text_encoder):
    model = make(tiny_sdxl_model, train_text_encoder=train_text_encoder)
    parts = ("unet", "vae", "text_encoder", "text_encoder_2")
    before = {name: snapshot(getattr(model, name)) for name in parts}
    te = model.text_encoder_parameters()
    # selected by layer, not by a name prefix: both encoders' weights, nothing of the UNet
    assert len(te) == (len(model.text_encoder.parameters()) + len(model.text_encoder_2.parameters())
                       if train_text_encoder else 0)
    model.set_text_encoder_learning_rate(1e-3, 2e-3)
    assert all(p.optimize_attr["learning_rate"] == pytest.approx(2.0) for p in te)
    train_steps(model)
    assert changed(before["unet"], model.unet)
    assert not changed(before["vae"], model.vae)
    for name in ("text_encoder", "text_encoder_2"):
        assert bool(changed(before[name], getattr(model, name))) == train_text_encoder, name


def test_sdxl_lora_saves_and_loads_in_the_sdxl_pipeline(tiny_sdxl_model, tmp_path):
    from ppdiffusers import StableDiffusionXLPipeline

    from ppdreambooth.modeling.lora import save_lora_weights

    model = make(tiny_sdxl_model, use_lora=True, lora_rank=4, lora_alpha=8.0, train_text_encoder=True)
    named = model.trainable_named_parameters()
    assert {n.split(".")[0] for n, _ in named} == {"unet", "text_encoder", "text_encoder_2"}
    assert all(".lora_A." in n or ".lora_B." in n for n, _ in named)
    base_unet = {k: v for k, v in snapshot(model.unet).items() if "lora" not in k}
    train_steps(model, steps=3, lr=5e-2)
    assert not changed(base_unet, model.unet)  # base weights frozen: only adapters moved

    def probe(unet, te1, te2):
        paddle.seed(42)
        latents, ids, t = paddle.randn([2, 4, 8, 8]), paddle.randint(0, 500, [2, 77]), paddle.to_tensor([3, 700])
        time_ids = paddle.to_tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype="float32")
        with paddle.no_grad():
            cond = FAMILIES["sdxl"].encode_prompt({"text_encoder": te1, "text_encoder_2": te2},
                                                 {"input_ids": ids, "input_ids_2": ids})
            return FAMILIES["sdxl"].predict(unet, latents, t, {**cond, "time_ids": time_ids}).numpy()

    trained = probe(model.unet, model.text_encoder, model.text_encoder_2)
    save_lora_weights(str(tmp_path), model.family, model.trained_layers())
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model)
    base = probe(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    pipe.load_lora_weights(str(tmp_path))
    loaded = probe(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    np.testing.assert_allclose(loaded, trained, rtol=1e-5, atol=1e-6)
    assert np.abs(loaded - base).max() > 1e-3


def test_sdxl_validation_pipeline_generates_from_the_trained_weights(tiny_sdxl_model):
    from ppdreambooth.inference.sampling import generate_images
    from ppdreambooth.training.sampling_context import validation_pipeline

    model = make(tiny_sdxl_model)
    pipeline = validation_pipeline(model)
    assert type(pipeline).__name__ == "StableDiffusionXLPipeline" and pipeline.unet is model.unet
    first = np.asarray(generate_images(pipeline, ["a photo of sks dog"], [3], num_inference_steps=2)[0])
    again = np.asarray(generate_images(pipeline, ["a photo of sks dog"], [3], num_inference_steps=2)[0])
    assert first.shape == (64, 64, 3) and np.array_equal(first, again)


def test_a_replacement_vae_is_used_for_encoding_and_written_out(tiny_sdxl_model, tmp_path):
    """--pretrained_vae_model_name_or_path (e.g. an fp16-fixed SDXL VAE) replaces the model's own VAE."""
    from ppdiffusers import AutoencoderKL

    from ppdreambooth.interop.pipeline_folder import write_pipeline

    paddle.seed(5)
    other = AutoencoderKL.from_config(AutoencoderKL.load_config(tiny_sdxl_model, subfolder="vae"))
    other.save_pretrained(str(tmp_path / "fixed-vae"))
    model = make(tiny_sdxl_model, pretrained_vae_model_name_or_path=str(tmp_path / "fixed-vae"))
    own = make(tiny_sdxl_model)
    pixels = paddle.uniform([1, 3, 64, 64], min=-1, max=1)
    mean, _ = model.latent_moments(pixels)
    expected = other.encode(pixels).latent_dist.mean
    np.testing.assert_allclose(mean.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    assert np.abs(own.latent_moments(pixels)[0].numpy() - mean.numpy()).max() > 1e-3
    model.release_frozen("vae", keep_on_cpu=False)  # as after --cache_latents: the output re-reads the VAE
    write_pipeline(model, tiny_sdxl_model, str(tmp_path / "out"), vae=str(tmp_path / "fixed-vae"))
    written = AutoencoderKL.from_pretrained(str(tmp_path / "out"), subfolder="vae")
    for (k, a), b in zip(written.state_dict().items(), other.state_dict().values()):
        assert np.array_equal(a.numpy(), b.numpy()), k


def test_lora_size_formula_holds_for_sdxl(tiny_sdxl_model):
    """The computed LoRA size (README, memory estimate) counts per-level transformer depths right."""
    from ppdreambooth.modeling.lora import lora_parameter_count

    model = make(tiny_sdxl_model, use_lora=True, lora_rank=4)
    trained = sum(int(p.numel()) for p in model.trainable_parameters())
    config = json.load(open(os.path.join(tiny_sdxl_model, "unet", "config.json")))
    assert config["transformer_layers_per_block"] == [1, 2] and trained == lora_parameter_count(4, config)
    # SDXL-base-1.0's UNet (transformer depths 1, 2, 10): the count measured on the real model, rank 4 and 16
    sdxl_base = {"block_out_channels": [320, 640, 1280], "layers_per_block": 2, "cross_attention_dim": 2048,
                 "transformer_layers_per_block": [1, 2, 10],
                 "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}
    assert lora_parameter_count(4, sdxl_base) == 5_806_080 and lora_parameter_count(16, sdxl_base) == 23_224_320
