"""Datasets as users bring them: several concepts, caption files, aspect-ratio buckets."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from helpers.models import load_unet_weights
from helpers.photos import write_photos
from helpers.runs import run_module, train_argv
from ppdreambooth.data.buckets import make_buckets, nearest_bucket
from ppdreambooth.config.parsing import parse_args
from helpers.models import collate
from ppdreambooth.data.dataset import ConceptData, DreamBoothDataset, SeededBatchSampler
from ppdreambooth.data.photos import load_image_set
from ppdreambooth.families import FAMILIES
from ppdreambooth.data.images import list_image_files


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    """The SD family's tokenize(text) -> {"input_ids": ids} over the tiny model's tokenizer."""
    from ppdiffusers.transformers import CLIPTokenizer

    tokenizers = {"tokenizer": CLIPTokenizer.from_pretrained(tiny_model, subfolder="tokenizer")}
    return lambda text: FAMILIES["sd"].tokenize(tokenizers, text)


def tokenize(tokenize_fn, text):
    return tokenize_fn(text)["input_ids"]


def solid(folder, color, sizes):
    os.makedirs(folder, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), color).save(os.path.join(folder, f"{color[0]}-{i}.png"))
    return str(folder)


def fixed(h, w):
    return (64, 64)


def test_two_concepts_each_prompt_with_its_own_images(tokenizer, tmp_path):
    red = solid(tmp_path / "red", (255, 0, 0), [(64, 64)] * 3)
    blue = solid(tmp_path / "blue", (0, 0, 255), [(64, 64)] * 2)
    dog, cat = "a photo of sks dog", "a photo of zwx cat"
    dataset = DreamBoothDataset([
        ConceptData(load_image_set(list_image_files(red), dog, tokenizer, fixed)),
        ConceptData(load_image_set(list_image_files(blue), cat, tokenizer, fixed), repeats=2),
    ])
    assert len(dataset) == 3 + 2 * 2  # repeats count per concept
    sampler = SeededBatchSampler(dataset, batch_size=2, num_replicas=1, rank=0, seed=0)
    seen = {dog: 0, cat: 0}
    for batch in sampler:
        rows = collate([dataset[key] for key in batch])
        for pixels, ids in zip(rows["pixel_values"].numpy(), rows["input_ids"].numpy()):
            prompt = dog if np.array_equal(ids, tokenize(tokenizer, dog)) else cat
            assert np.array_equal(ids, tokenize(tokenizer, prompt))
            red_image = pixels[0].mean() > 0.9 and pixels[2].mean() < -0.9
            assert red_image == (prompt == dog)  # each prompt arrives with its own concept's images
            seen[prompt] += 1
    assert seen == {dog: 3, cat: 4}


def test_caption_files_override_the_prompt(tokenizer, tmp_path):
    folder = solid(tmp_path / "photos", (9, 9, 9), [(64, 64)] * 3)
    files = list_image_files(folder)
    with open(os.path.splitext(files[0])[0] + ".txt", "w") as f:
        f.write("{instance_prompt} on a beach\n")
    with open(os.path.splitext(files[1])[0] + ".caption", "w") as f:
        f.write("a drawing of sks dog")
    images = load_image_set(files, "a photo of sks dog", tokenizer, fixed, ".txt")
    assert np.array_equal(images.tokens[0]["input_ids"], tokenize(tokenizer, "a photo of sks dog on a beach"))
    assert np.array_equal(images.tokens[1]["input_ids"], tokenize(tokenizer, "a photo of sks dog"))  # .caption not used
    assert np.array_equal(images.tokens[2]["input_ids"], tokenize(tokenizer, "a photo of sks dog"))
    images = load_image_set(files, "a photo of sks dog", tokenizer, fixed, ".caption")
    assert np.array_equal(images.tokens[1]["input_ids"], tokenize(tokenizer, "a drawing of sks dog"))


def test_buckets_keep_aspect_ratio_and_crop_only_the_mismatch():
    buckets = make_buckets(512, 256, 1024, 64)
    assert all(h % 64 == 0 and w % 64 == 0 and h * w <= 512 * 512 for h, w in buckets)
    assert (512, 512) in buckets and (384, 640) in buckets and (640, 384) in buckets
    for h, w in [(3000, 4000), (4000, 3000), (1080, 1920), (500, 500), (1000, 3000)]:
        bucket = nearest_bucket(h, w, buckets)

        def kept(b):  # fraction of the image left after resize-to-cover and centre crop
            scale = max(b[0] / h, b[1] / w)
            return (b[0] * b[1]) / (h * scale * w * scale)

        assert kept(bucket) == max(kept(b) for b in buckets)
        assert kept(bucket) > 0.9 and bucket[0] * bucket[1] > 0.8 * 512 * 512
        assert (bucket[1] > bucket[0]) == (w > h) or h == w


def test_bucketed_batches_are_uniform_with_prior_and_across_ranks(tokenizer, tmp_path):
    wide = [(96, 48), (100, 50), (90, 44)]
    tall = [(48, 96), (50, 100)]
    square = [(64, 64)]
    photos = solid(tmp_path / "photos", (200, 10, 10), wide + tall + square)
    classes = solid(tmp_path / "class", (10, 200, 10), [(64, 64)] * 4)
    buckets = make_buckets(64, 32, 128, 16)

    def size_of(h, w):
        return nearest_bucket(h, w, buckets)

    dataset = DreamBoothDataset([ConceptData(load_image_set(list_image_files(photos), "p", tokenizer, size_of),
                                             load_image_set(list_image_files(classes), "c", tokenizer, size_of))],
                                center_crop=True, random_flip=True)
    shapes = set()
    seen = []
    for rank in (0, 1):
        sampler = SeededBatchSampler(dataset, batch_size=2, num_replicas=2, rank=rank, seed=3)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        for batch in batches:
            rows = collate([dataset[key] for key in batch])
            assert rows["pixel_values"].shape[0] == 2 * len(batch)  # instance + class halves, one shape
            shapes.add(tuple(rows["pixel_values"].shape[2:]))
            seen += [index for index, _ in batch]
    assert len(shapes) == 3  # wide, tall and square buckets
    assert set(seen) == set(range(len(dataset)))  # the two ranks together cover every entry


@pytest.mark.slow
def test_concepts_config_with_buckets_prior_and_cached_latents_trains(tiny_model, tmp_path):
    dog = solid(tmp_path / "dog", (200, 100, 50), [(96, 64), (64, 96), (80, 80)])
    cat = solid(tmp_path / "cat", (50, 100, 200), [(64, 64), (100, 60)])
    cfg = tmp_path / "concepts.json"
    cfg.write_text(json.dumps({
        "pretrained_model_name_or_path": tiny_model, "output_dir": str(tmp_path / "out"), "resolution": 64,
        "with_prior_preservation": True, "num_class_images": 2, "class_image_inference_steps": 2,
        "enable_bucket": True, "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 16,
        "cache_latents": True, "random_flip": True, "train_batch_size": 1, "max_train_steps": 3,
        "report_to": "none", "logging_steps": 1,
        "concepts": [
            {"instance_data_dir": dog, "instance_prompt": "a photo of sks dog", "class_data_dir": str(tmp_path / "cd"),
             "class_prompt": "a photo of dog", "repeats": 2},
            {"instance_data_dir": cat, "instance_prompt": "a photo of zwx cat", "class_data_dir": str(tmp_path / "cc"),
             "class_prompt": "a photo of cat", "num_class_images": 3},
        ],
    }))
    _, data, _ = parse_args([str(cfg)])
    assert [c.num_class_images for c in data.concept_list] == [2, 3]
    result = run_module(["-m", "ppdreambooth.train", str(cfg)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(os.listdir(tmp_path / "cd")) == 2 and len(os.listdir(tmp_path / "cc")) == 3
    assert (tmp_path / "out" / "model_index.json").is_file()


def test_concept_errors_name_the_entry(tmp_path, monkeypatch):
    from ppdreambooth.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    base = ["--pretrained_model_name_or_path", "m"]
    with pytest.raises(ConfigError, match=r"unknown key 'instance_promt' in concepts\[0\].*'instance_prompt'"):
        parse_args(base + ["--concepts", json.dumps([{"instance_data_dir": "a", "instance_promt": "x"}])])
    with pytest.raises(ConfigError, match=r"concepts\[1\] needs instance_prompt"):
        parse_args(base + ["--concepts", json.dumps([{"instance_data_dir": "a", "instance_prompt": "x"},
                                                     {"instance_data_dir": "b"}])])
    with pytest.raises(ConfigError, match="--with_prior_preservation needs --class_data_dir and --class_prompt"):
        parse_args(base + ["--with_prior_preservation", "--concepts",
                           json.dumps([{"instance_data_dir": "a", "instance_prompt": "x"}])])
    with pytest.raises(ConfigError, match="bucket_reso_steps"):
        parse_args(base + ["--instance_data_dir", "a", "--instance_prompt", "x", "--enable_bucket",
                           "--bucket_reso_steps", "12"])


@pytest.mark.slow
def test_data_loader_worker_processes_train_the_same_model(tiny_model, tmp_path):
    """--dataloader_num_workers 2 prepares the batches (random crops and flips of non-square photos, encoded
    at each step) in other processes; every augmentation depends only on (seed, epoch, entry), so the run
    is the same as with batches prepared in the training process."""
    photos = write_photos(tmp_path / "photos", count=3, size=(96, 80))
    weights = []
    for workers in (0, 2):
        out = tmp_path / f"out-{workers}"
        result = run_module(["-m", "ppdreambooth.train", *train_argv(
            tiny_model, photos, out, steps=5, extra=["--random_flip", "--dataloader_num_workers", str(workers)])])
        assert result.returncode == 0, result.stderr[-3000:]
        weights.append(load_unet_weights(str(out)))
    assert set(weights[0]) == set(weights[1])
    assert all(np.array_equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_photos_are_decoded_once_and_large_folders_are_not_held(tmp_path, monkeypatch):
    """Photos are decoded when the folder is checked and that picture is used afterwards; past HELD_PIXELS in all
    they are not held (decoded again when used), so a large folder does not sit in memory twice."""
    from ppdreambooth.data import photos as photo_folders

    folder = write_photos(tmp_path / "p", count=3, size=(96, 80))
    photos = photo_folders.collect_photos(folder, "instance_data_dir")
    assert all(p.image is not None and p.picture() is p.image for p in photos)
    monkeypatch.setattr(photo_folders, "HELD_PIXELS", 96 * 80 * 2)
    few = photo_folders.collect_photos(folder, "instance_data_dir")
    assert [p.image is not None for p in few] == [True, True, False]
    assert np.array_equal(np.asarray(few[2].picture()), np.asarray(photos[2].image))
