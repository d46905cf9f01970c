"""Caching prompt embeddings and latents: same losses as encoding every step, encoders released."""
import os

import numpy as np
import paddle
import pytest

from ppdreambooth.config.arguments import ModelArguments
from ppdreambooth.training.caching import cache_encodings, cache_latents, cache_prompt_embeddings
from helpers.models import collate
from ppdreambooth.data.dataset import ConceptData, DreamBoothDataset
from ppdreambooth.data.photos import load_image_set
from ppdreambooth.data.images import list_image_files
from ppdreambooth.modeling.build import build_model


def build(tiny_model, photos, flip, prior=True):
    with paddle.utils.unique_name.guard():
        model = build_model(ModelArguments(pretrained_model_name_or_path=tiny_model),
                                with_prior_preservation=prior)
    files = list_image_files(photos)
    inst = load_image_set(files, "a photo of sks dog", model.tokenize, lambda h, w: (64, 64))
    cls = load_image_set(files[::-1], "a photo of dog", model.tokenize, lambda h, w: (64, 64)) if prior else None
    return model, DreamBoothDataset([ConceptData(inst, cls)], center_crop=True, random_flip=flip,
                                    size_conditioning=model.family.size_conditioning)


def losses(model, dataset, keys):
    out = []
    paddle.seed(123)
    for batch_keys in keys:
        batch = collate([dataset[k] for k in batch_keys])
        with paddle.no_grad():
            out.append(float(model(**batch)["loss"]))
    return out


# what a batch carries once everything is cached, per family (SDXL adds its pooled embedding and time ids)
CACHED_KEYS = {"sd": {"latent_mean", "latent_std", "prompt_embeds"},
               "sdxl": {"latent_mean", "latent_std", "prompt_embeds", "pooled_prompt_embeds", "time_ids"},
               "sd3": {"latent_mean", "latent_std", "prompt_embeds", "pooled_prompt_embeds"}}
# prompt_embeds per sample: SD one CLIP (32 wide); SDXL two concatenated on channels; SD3 two CLIPs padded to
# T5's 96 channels, followed by T5's 77 tokens
EMBED_SHAPES = {"sd": [77, 32], "sdxl": [77, 64], "sd3": [154, 96]}


@pytest.mark.parametrize("flip", [False, True], ids=["no_flip", "random_flip"])
def test_cached_training_inputs_give_the_same_losses(family_model, photos, flip):
    family, tiny_model = family_model
    keys = [[(0, 1), (1, 2)], [(2, 3), (3, 4)], [(1, 5), (2, 6)], [(3, 7), (0, 8)]]
    model, dataset = build(tiny_model, photos, flip)
    reference = losses(model, dataset, keys)
    assert "pixel_values" in collate([dataset[(0, 1)]]) and "input_ids" in collate([dataset[(0, 1)]])

    assert cache_prompt_embeddings(model, dataset) == 2  # instance and class prompt
    assert cache_latents(model, dataset) == 4 * (2 if flip else 1) * 2
    batch = collate([dataset[(0, 1)]])
    assert set(batch) == CACHED_KEYS[family]
    assert batch["prompt_embeds"].shape == [2, *EMBED_SHAPES[family]]
    cached = losses(model, dataset, keys)
    np.testing.assert_allclose(cached, reference, rtol=1e-5)


def test_encoders_are_released_after_caching(family_model, photos):
    _, tiny_model = family_model
    model, dataset = build(tiny_model, photos, flip=False, prior=False)
    encoders = model.family.text_encoders
    cache_encodings(model, dataset, cache_latents_too=True, keep_encoders=False)
    assert not any(model.has_component(name) for name in (*encoders, "vae"))
    assert all(n.startswith(model.family.denoiser + ".") for n, _ in model.trainable_named_parameters())
    model, dataset = build(tiny_model, photos, flip=False, prior=False)
    cache_encodings(model, dataset, cache_latents_too=False, keep_encoders=True)
    assert all(model.has_component(name) for name in (*encoders, "vae"))  # parked on the CPU
    assert dataset.concepts[0].instance.prompt_embeds is not None and dataset.concepts[0].instance.latents is None


def test_a_trained_text_encoder_is_not_cached(tiny_model, photos):
    with paddle.utils.unique_name.guard():
        model = build_model(ModelArguments(pretrained_model_name_or_path=tiny_model, train_text_encoder=True))
    _, dataset = build(tiny_model, photos, flip=False, prior=False)
    cache_encodings(model, dataset, cache_latents_too=False, keep_encoders=False)
    assert model.has_component("text_encoder") and dataset.concepts[0].instance.prompt_embeds is None


@pytest.mark.parametrize("shapes", ["square", "random_crops", "mixed"])
def test_latents_of_determined_crops_are_cached_by_default_with_equal_losses(tiny_model, tmp_path, shapes):
    """Without --center_crop, a photo resized exactly to the training size has no crop freedom: its latents
    are cached (both orientations); photos that need a random crop are encoded at each step. Losses equal
    encoding everything on the fly, in batches that mix both kinds too."""
    from helpers.photos import write_photos

    sizes = {"square": [(64, 64)] * 4, "random_crops": [(96, 80)] * 4, "mixed": [(64, 64), (96, 80)] * 2}[shapes]
    folder = tmp_path / "photos"
    for n, size in enumerate(sizes):
        write_photos(folder / str(n), count=1, size=size, seed=n)
    files = [os.path.join(folder, str(n), "photo-0.png") for n in range(len(sizes))]

    def build_random_crop():
        with paddle.utils.unique_name.guard():
            model = build_model(ModelArguments(pretrained_model_name_or_path=tiny_model),
                                    with_prior_preservation=True)
        inst = load_image_set(files, "a photo of sks dog", model.tokenize, lambda h, w: (64, 64))
        cls = load_image_set(files[::-1], "a photo of dog", model.tokenize, lambda h, w: (64, 64))
        return model, DreamBoothDataset([ConceptData(inst, cls)], center_crop=False, random_flip=True)

    keys = [[(0, 1), (1, 2)], [(2, 3), (3, 4)], [(1, 5), (2, 6)], [(3, 7), (0, 8)]]
    model, dataset = build_random_crop()
    reference = losses(model, dataset, keys)
    model, dataset = build_random_crop()
    report = cache_encodings(model, dataset, cache_latents_too=True, keep_encoders=False)
    square = sum(1 for s in sizes if s == (64, 64))
    cached = 2 * 2 * square  # instance and class half, both orientations
    assert f"latents of {cached} of {2 * 2 * len(sizes)} image crops" in report
    assert model.has_component("vae") == (shapes != "square")  # released only when nothing is left to encode
    batch = collate([dataset[k] for k in keys[0]])
    assert ("latent_cached" in batch) == (shapes == "mixed")
    assert ("pixel_values" in batch) == (shapes != "square")
    np.testing.assert_allclose(losses(model, dataset, keys), reference, rtol=1e-5)


def test_no_cache_latents_opts_out(tiny_model, photos):
    model, dataset = build(tiny_model, photos, flip=False, prior=False)
    report = cache_encodings(model, dataset, cache_latents_too=False, keep_encoders=False)
    assert "latents" not in report and model.has_component("vae")
    assert "pixel_values" in collate([dataset[(0, 1)]])


def test_released_encoders_are_freed(tiny_model, photos):
    """Released after caching means gone: nothing keeps the VAE or the text encoder alive (their memory is freed)."""
    import gc
    import weakref

    model, dataset = build(tiny_model, photos, flip=False, prior=False)
    released = {name: weakref.ref(getattr(model, name)) for name in ("vae", "text_encoder")}
    cache_encodings(model, dataset, cache_latents_too=True, keep_encoders=False)
    # no gc.collect(): freed as soon as the model lets go (no reference cycle keeps them)
    assert {name: ref() is None for name, ref in released.items()} == {"vae": True, "text_encoder": True}
