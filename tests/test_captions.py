"""kohya's caption options (--caption_dropout_rate, --shuffle_caption, --keep_tokens, --caption_tag_dropout_rate):
each one acts on instance captions only, draws from the item's seeded RNG (same (index, seed), same caption), keeps
the instance prompt whole and first, changes nothing at rate 0, caches the empty prompt for dropout and keeps the
text encoders (no prompt cache) when captions vary; the same for SD, SDXL and SD3; bad values stop the run early;
a run with them resumes exactly."""
import itertools
import os

import numpy as np
import paddle
import pytest

from helpers.models import collate, make_model
from helpers.photos import write_photos
from helpers.runs import run_module, train_argv, truncate_run_to
from ppdreambooth import train
from ppdreambooth.batch import CLASS, INSTANCE, is_token_key
from ppdreambooth.data.captions import CaptionOptions, caption_tags
from ppdreambooth.data.dataset import ConceptData, DreamBoothDataset
from ppdreambooth.data.photos import load_image_set
from ppdreambooth.data.images import list_image_files
from ppdreambooth.training.caching import cache_encodings

PROMPT, CLASS_PROMPT = "a photo of sks dog", "a photo of dog"
# photo-0 .. photo-3: the instance prompt first, in the middle, no caption (the prompt), no instance prompt at all
CAPTIONS = ["{instance_prompt}, red collar, on a beach, sunny", "indoors, {instance_prompt}, sofa, lamp, rug", None,
            "a drawing of sks dog, watercolor, blue, small, cute"]
WIDTH = 256


def encode(text):
    """A stand-in tokenizer that can be read back: the caption's bytes as ids."""
    return {"input_ids": np.frombuffer(text.encode().ljust(WIDTH, b"\0"), np.uint8).astype(np.int64)}


def decode(ids):
    return bytes(np.asarray(ids, np.uint8)).rstrip(b"\0").decode()


def captioned_photos(folder):
    photos = write_photos(folder, count=len(CAPTIONS), size=(96, 80))
    for n, caption in enumerate(CAPTIONS):
        if caption is not None:
            with open(os.path.join(photos, f"photo-{n}.txt"), "w", encoding="utf-8") as f:
                f.write(caption)
    return photos


def make_dataset(photos, captions=None, tokenize=encode, prior=True, size_conditioning=None):
    """Instance photos with captions, class images (the same photos reversed) under the class prompt; random crops
    and flips."""
    files = list_image_files(photos)
    instance = load_image_set(files, PROMPT, tokenize, lambda h, w: (64, 64), ".txt")
    prior_set = load_image_set(files[::-1], CLASS_PROMPT, tokenize, lambda h, w: (64, 64)) if prior else None
    return DreamBoothDataset([ConceptData(instance, prior_set)], center_crop=False, random_flip=True,
                             size_conditioning=size_conditioning, captions=captions, tokenize=tokenize)


def caption_of(dataset, index, seed, row=INSTANCE):
    return decode(dataset[(index, seed)][row]["input_ids"])


def tags(text):
    return [t.strip() for t in text.split(",")] if text else []


@pytest.fixture
def photos(tmp_path):
    return captioned_photos(tmp_path / "instance")


SEEDS = range(60)


def test_the_instance_prompt_is_one_tag_wherever_it_stands():
    assert caption_tags("indoors, a photo of sks dog, sofa", PROMPT) == ([PROMPT, "indoors", "sofa"], 1)
    # a prompt holding a comma stays whole; a tag holding the prompt stays whole
    assert caption_tags("beach, a photo of sks dog, smiling, hat", "a photo of sks dog, smiling") == (
        ["a photo of sks dog, smiling", "beach", "hat"], 1)
    assert caption_tags("a photo of sks dog on a beach,red", PROMPT) == (["a photo of sks dog on a beach", "red"], 1)
    assert caption_tags("watercolor, blue", PROMPT) == (["watercolor", "blue"], 0)


def test_caption_dropout_gives_instance_rows_the_empty_prompt_and_never_class_rows(photos):
    dataset = make_dataset(photos, CaptionOptions(dropout_rate=1.0))
    for index in range(len(dataset)):
        for seed in (1, 2, 3):
            assert caption_of(dataset, index, seed) == ""
            assert caption_of(dataset, index, seed, CLASS) == CLASS_PROMPT
    half = make_dataset(photos, CaptionOptions(dropout_rate=0.5))
    seen = [caption_of(half, 0, seed) for seed in SEEDS]
    assert "" in seen and "a photo of sks dog, red collar, on a beach, sunny" in seen
    assert 15 < seen.count("") < 45


def test_shuffle_varies_the_order_and_keeps_the_instance_prompt_first_and_whole(photos):
    dataset = make_dataset(photos, CaptionOptions(shuffle=True))
    for index, free in ((0, ["red collar", "on a beach", "sunny"]), (1, ["indoors", "sofa", "lamp", "rug"])):
        seen = {caption_of(dataset, index, seed) for seed in SEEDS}
        assert len(seen) > 3  # the order varies
        for caption in seen:
            assert caption.startswith(PROMPT + ", ") and sorted(tags(caption)[1:]) == sorted(free)
    assert {caption_of(dataset, 2, seed) for seed in SEEDS} == {PROMPT}  # no caption: the prompt as it is
    assert {caption_of(dataset, 0, seed, CLASS) for seed in SEEDS} == {CLASS_PROMPT}


def test_keep_tokens_holds_the_first_tags_in_place(photos):
    free = ["blue", "small", "cute"]
    for keep in (0, 2):
        dataset = make_dataset(photos, CaptionOptions(shuffle=True, keep_tokens=keep))
        seen = {caption_of(dataset, 3, seed) for seed in SEEDS}
        firsts = {tuple(tags(caption)[:2]) for caption in seen}
        if keep:
            assert firsts == {("a drawing of sks dog", "watercolor")} and len(seen) == 6
            assert all(sorted(tags(caption)[2:]) == sorted(free) for caption in seen)
        else:
            assert len(firsts) > 3  # without it the first tags move too
    # the instance prompt counts as the first kept tag
    dataset = make_dataset(photos, CaptionOptions(shuffle=True, keep_tokens=2))
    assert {tuple(tags(caption_of(dataset, 0, seed))[:2]) for seed in SEEDS} == {(PROMPT, "red collar")}


def test_tag_dropout_drops_every_droppable_tag_and_keeps_the_rest(photos):
    dataset = make_dataset(photos, CaptionOptions(tag_dropout_rate=1.0, keep_tokens=2))
    for seed in (1, 2, 3):
        assert caption_of(dataset, 0, seed) == "a photo of sks dog, red collar"
        assert caption_of(dataset, 1, seed) == "a photo of sks dog, indoors"  # the prompt moved first
        assert caption_of(dataset, 2, seed) == PROMPT
        assert caption_of(dataset, 3, seed) == "a drawing of sks dog, watercolor"
        assert caption_of(dataset, 0, seed, CLASS) == CLASS_PROMPT
    dataset = make_dataset(photos, CaptionOptions(tag_dropout_rate=1.0))
    assert caption_of(dataset, 0, 1) == PROMPT and caption_of(dataset, 3, 1) == ""  # no instance prompt: nothing kept
    half = make_dataset(photos, CaptionOptions(tag_dropout_rate=0.5))
    counts = {len(tags(caption_of(half, 1, seed))) for seed in SEEDS}
    assert {1, 5} <= counts and len(counts) > 2
    assert all(caption_of(half, 1, seed).startswith(PROMPT) for seed in SEEDS)


def test_the_same_index_and_seed_give_the_same_caption(photos):
    options = CaptionOptions(dropout_rate=0.3, shuffle=True, keep_tokens=1, tag_dropout_rate=0.2)
    first, again = make_dataset(photos, options), make_dataset(photos, options)  # as in a fresh process
    keys = [(index, seed) for index in range(len(first)) for seed in range(20)]
    captions = [caption_of(first, *key) for key in keys]
    assert captions == [caption_of(first, *key) for key in keys] == [caption_of(again, *key) for key in keys]
    assert len(set(captions)) > 20


@pytest.mark.parametrize("options", [None, CaptionOptions(), CaptionOptions(keep_tokens=3)],
                         ids=["no_options", "rates_0", "keep_tokens_alone"])
def test_rates_0_give_exactly_todays_items(photos, options):
    today = make_dataset(photos)
    dataset = make_dataset(photos, options)
    assert dataset.captions is None
    keys = [(index, seed) for index in range(len(today)) for seed in range(5)]
    for a, b in zip(collate_batches(today, keys), collate_batches(dataset, keys)):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_caption_draws_leave_the_crops_and_flips_alone(photos):
    today = make_dataset(photos)
    dataset = make_dataset(photos, CaptionOptions(dropout_rate=0.5, shuffle=True, tag_dropout_rate=0.3))
    keys = [(index, seed) for index in range(len(today)) for seed in range(5)]
    for a, b in zip(collate_batches(today, keys), collate_batches(dataset, keys)):
        assert np.array_equal(a["pixel_values"], b["pixel_values"])
        assert np.array_equal(a["input_ids"][2:], b["input_ids"][2:])  # the class rows
    assert any(not np.array_equal(a["input_ids"], b["input_ids"])
               for a, b in zip(collate_batches(today, keys), collate_batches(dataset, keys)))


def collate_batches(dataset, keys):
    from ppdreambooth.data.dataset import collate_arrays

    return [collate_arrays([dataset[k] for k in keys[n:n + 2]]) for n in range(0, len(keys), 2)]


def model_dataset(path, photos, options, prior=True):
    model = make_model(path, prior=prior)
    return model, make_dataset(photos, options, tokenize=model.tokenize, prior=prior,
                               size_conditioning=model.family.size_conditioning)


def loss(model, batch):
    paddle.seed(5)
    with paddle.no_grad():
        return float(model(**batch)["loss"])


def test_varying_captions_are_not_cached_and_keep_the_text_encoder(tiny_model, photos):
    for options in (CaptionOptions(shuffle=True), CaptionOptions(tag_dropout_rate=0.5, dropout_rate=0.2)):
        model, dataset = model_dataset(tiny_model, photos, options)
        assert dataset.captions_vary
        report = cache_encodings(model, dataset, cache_latents_too=True, keep_encoders=False)
        assert "prompts encoded at each step" in report and "prompt embedding" not in report
        assert model.has_component("text_encoder") and "text_encoder" in model._frozen  # on the device
        assert all(s.prompt_embeds is None for s in dataset.image_sets) and dataset.empty_prompt_embeds is None
        batch = collate([dataset[(0, 1)], dataset[(1, 2)]])
        assert "input_ids" in batch and "prompt_embeds" not in batch
        assert np.isfinite(loss(model, batch))
    # shuffling captions that have nothing to shuffle (no caption has two free tags): the cache is used as before
    plain = write_photos(photos + "-plain", count=2)
    model, dataset = model_dataset(tiny_model, plain, CaptionOptions(shuffle=True))
    assert not dataset.captions_vary
    assert "prompt embedding" in cache_encodings(model, dataset, cache_latents_too=False, keep_encoders=False)
    assert not model.has_component("text_encoder")


@pytest.mark.slow  # builds a model per family
def test_every_family_drops_to_the_empty_prompt_cached_or_not(family_model, photos):
    """Dropout 1.0: each instance row has the empty prompt's ids for every tokenizer (class rows their prompt's);
    once cached, its embeddings, giving the same loss; shuffled captions stay token ids for every tokenizer."""
    family, path = family_model
    model, dataset = model_dataset(path, photos, CaptionOptions(dropout_rate=1.0))
    empty, class_ids = model.tokenize(""), model.tokenize(CLASS_PROMPT)
    assert len(empty) == {"sd": 1, "sdxl": 2, "sd3": 3}[family]
    item = dataset[(0, 4)]
    for row, expected in ((INSTANCE, empty), (CLASS, class_ids)):
        assert {k for k in item[row] if is_token_key(k)} == set(expected)
        assert all(np.array_equal(item[row][k], expected[k]) for k in expected), row
    keys = [(0, 4), (3, 9)]
    uncached = loss(model, collate([dataset[k] for k in keys]))
    empty_embeds = model.encode_prompts({k: paddle.to_tensor(v[None]) for k, v in empty.items()})
    report = cache_encodings(model, dataset, cache_latents_too=False, keep_encoders=False)
    # 3 captions, the instance prompt, the class prompt and the empty prompt
    assert "6 prompt embedding(s) (the empty prompt's among them" in report
    assert not any(model.has_component(n) for n in model.family.text_encoders)
    item = dataset[(0, 4)]
    for key, value in empty_embeds.items():
        np.testing.assert_allclose(item[INSTANCE][key], value[0].numpy(), rtol=1e-6)
        assert np.array_equal(dataset.empty_prompt_embeds[key], item[INSTANCE][key])
    assert not np.allclose(item[CLASS]["prompt_embeds"], item[INSTANCE]["prompt_embeds"])
    np.testing.assert_allclose(loss(model, collate([dataset[k] for k in keys])), uncached, rtol=1e-5)

    model, dataset = model_dataset(path, photos, CaptionOptions(shuffle=True), prior=False)
    cache_encodings(model, dataset, cache_latents_too=False, keep_encoders=False)
    assert all(model.has_component(n) for n in model.family.text_encoders)  # kept for encoding at each step
    free = ["red collar", "on a beach", "sunny"]
    variants = [model.tokenize(", ".join([PROMPT, *order])) for order in itertools.permutations(free)]
    row = dataset[(0, 4)][INSTANCE]
    assert any(all(np.array_equal(row[k], v[k]) for k in v) for v in variants)
    assert set(k for k in row if is_token_key(k)) == set(empty)
    assert np.isfinite(loss(model, collate([dataset[(0, 4)], dataset[(1, 5)]])))


@pytest.mark.parametrize("flag, value, message", [
    ("--caption_dropout_rate", "1.5", "--caption_dropout_rate 1.5 is out of range: it must be a number >= 0 and <= 1"),
    ("--caption_dropout_rate", "nan", "--caption_dropout_rate nan is out of range"),
    ("--caption_tag_dropout_rate", "-0.1", "--caption_tag_dropout_rate -0.1 is out of range: it must be a number >= 0"),
    ("--keep_tokens", "-1", "--keep_tokens -1 is out of range: it must be an integer >= 0"),
    ("--keep_tokens", "1.5", "invalid int value"),
], ids=["dropout_above_1", "dropout_nan", "tag_dropout_negative", "keep_tokens_negative", "keep_tokens_fraction"])
def test_bad_caption_values_stop_the_run_before_loading(flag, value, message, tiny_model, photos, tmp_path, capsys,
                                                        no_model_loading):
    assert train.main(train_argv(tiny_model, photos, tmp_path / "out", extra=[flag, value])) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow
def test_training_with_caption_dropout_and_shuffled_tags_resumes_exactly(tiny_model, tmp_path):
    from helpers.models import load_unet_weights

    photos = captioned_photos(tmp_path / "photos")
    extra = ["--random_flip", "--checkpointing_steps", "2", "--caption_dropout_rate", "0.3", "--shuffle_caption",
             "--caption_extension", ".txt"]
    full = tmp_path / "full"
    result = run_module(["-m", "ppdreambooth.train", *train_argv(tiny_model, photos, full, steps=6, extra=extra)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "captions:  dropout 0.3, tags shuffled (instance photos only); prompts encoded at each step" in result.stdout
    assert "caching:     cached latents of" in result.stdout and "prompts encoded at each step" in result.stdout
    reference = load_unet_weights(str(full))
    for step, resume in ((4, "latest"), (2, "checkpoint-2")):
        resumed = tmp_path / f"resumed-{step}"
        truncate_run_to(str(full), step, str(resumed))
        target = resume if resume == "latest" else str(resumed / resume)
        result = run_module(["-m", "ppdreambooth.train", *train_argv(
            tiny_model, photos, resumed, steps=6, extra=extra + ["--resume_from_checkpoint", target])])
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"global step {step}" in result.stderr + result.stdout
        weights = load_unet_weights(str(resumed))
        assert weights.keys() == reference.keys() and all(np.array_equal(weights[k], reference[k]) for k in weights)
