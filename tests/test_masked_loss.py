"""--masked_loss (kohya's --masked_loss / --alpha_mask): the loss equals its formula per latent cell; the mask takes
exactly the photo's resize, crop, flip and bucket and is area-averaged to the latent grid; an all-ones mask changes
no bit; masks come from a folder or the alpha channel; class rows are unmasked; every family honours it; bad
input stops the run before a model loads; a masked run resumes exactly."""
import os

import numpy as np
import paddle
import pytest
from PIL import Image

from helpers.models import collate, load_unet_weights, make_model
from helpers.photos import write_photos
from helpers.runs import run_module, train_argv, truncate_run_to
from ppdreambooth import train
from ppdreambooth.batch import CLASS, INSTANCE, LOSS_MASK, PIXEL_VALUES
from ppdreambooth.data.dataset import ConceptData, DreamBoothDataset
from ppdreambooth.data.masks import area_downsample, with_masks
from ppdreambooth.data.photos import collect_photos, load_image_set
from ppdreambooth.modeling.losses import MaskedLoss, dreambooth_loss

PROMPT, CLASS_PROMPT = "a photo of sks dog", "a photo of dog"


def smooth_mask(height, width, seed):
    """A greyscale mask with soft edges and a blob off-centre (so crops and flips move it)."""
    rows, cols = np.mgrid[0:height, 0:width]
    rng = np.random.RandomState(seed)
    cy, cx = rng.uniform(0.2, 0.5) * height, rng.uniform(0.15, 0.45) * width
    blob = np.exp(-(((rows - cy) / (0.25 * height)) ** 2 + ((cols - cx) / (0.2 * width)) ** 2))
    return (blob / blob.max() * 255).round().astype(np.uint8)


def write_mask_pairs(folder, count=3, size=(96, 80)):
    """Photos whose pixels are their masks in grey (so a training crop can be checked against its mask), and a
    folder of the masks: (photos, masks)."""
    photos, masks = os.path.join(folder, "photos"), os.path.join(folder, "masks")
    os.makedirs(photos), os.makedirs(masks)
    for n in range(count):
        mask = smooth_mask(size[1], size[0], n)
        Image.fromarray(np.repeat(mask[..., None], 3, axis=2)).save(os.path.join(photos, f"photo-{n}.jpg"),
                                                                     quality=100)
        Image.fromarray(mask).save(os.path.join(masks, f"photo-{n}.png"))
    return photos, masks


def numpy_loss(pred, target, mask, unmasked_weight, normalize, c=None):
    d = pred - target
    elements = d * d if c is None else 2 * c[:, None, None, None] * (np.sqrt(d * d + c[:, None, None, None] ** 2)
                                                                       - c[:, None, None, None])
    weights = unmasked_weight + (1 - unmasked_weight) * mask
    per_sample = (elements * weights).reshape(len(d), -1).mean(1)
    if normalize:
        area = np.broadcast_to(weights, d.shape).reshape(len(d), -1).mean(1)
        per_sample = per_sample / np.maximum(area, 1e-6)  # a row with no weight anywhere stays 0
    return per_sample


@pytest.mark.parametrize("unmasked_weight", [0.0, 0.3])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("loss_type", ["l2", "huber"])
def test_the_masked_loss_equals_its_formula(unmasked_weight, normalize, loss_type):
    rng = np.random.RandomState(0)
    pred, target = rng.randn(4, 4, 6, 6).astype(np.float32), rng.randn(4, 4, 6, 6).astype(np.float32)
    mask = rng.uniform(size=(4, 1, 6, 6)).astype(np.float32)
    mask[1] = 0.0  # a row with nothing masked in
    c = np.array([0.1, 0.3, 0.5, 0.9], np.float32) if loss_type == "huber" else None
    per_sample = numpy_loss(pred, target, mask, unmasked_weight, normalize, c)
    out = dreambooth_loss(paddle.to_tensor(pred), paddle.to_tensor(target), 2, 0.7, None, loss_type,
                          None if c is None else paddle.to_tensor(c), paddle.to_tensor(mask),
                          MaskedLoss(unmasked_weight, normalize))
    np.testing.assert_allclose(float(out["loss_instance"]), per_sample[:2].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(out["loss_prior"]), per_sample[2:].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(out["loss"]), per_sample[:2].mean() + 0.7 * per_sample[2:].mean(), rtol=1e-5)
    plain = dreambooth_loss(paddle.to_tensor(pred), paddle.to_tensor(target), 2, 0.7, None, loss_type,
                            None if c is None else paddle.to_tensor(c))
    if unmasked_weight == 0.0:
        assert float(out["loss"]) < float(plain["loss"]) or normalize  # the mask is not ignored
        assert abs(float(out["loss"]) - float(plain["loss"])) > 1e-3


@pytest.mark.parametrize("loss_type", ["l2", "smooth_l1"])
def test_an_all_ones_mask_changes_no_bit(loss_type):
    rng = np.random.RandomState(1)
    pred, target = (paddle.to_tensor(rng.randn(4, 4, 8, 8).astype(np.float32)) for _ in range(2))
    c = paddle.to_tensor(np.full(4, 0.2, np.float32))
    ones = paddle.ones([4, 1, 8, 8])
    for options in (MaskedLoss(), MaskedLoss(0.5, True)):
        masked = dreambooth_loss(pred, target, 2, 1.0, None, loss_type, c, ones, options)
        plain = dreambooth_loss(pred, target, 2, 1.0, None, loss_type, c)
        for key in ("loss", "loss_instance", "loss_prior"):
            assert np.array_equal(masked[key].numpy(), plain[key].numpy()), key


def ids(text):
    return {"input_ids": np.zeros(4, np.int64)}


def masked_dataset(photos, masks, size_of=lambda h, w: (64, 64), center_crop=False, factor=8, tokenize=ids,
                   size_conditioning=None):
    """Instance photos with masks from the folder `masks` (None: no masks), class images (the same photos reversed),
    random crops (unless `center_crop`) and flips; `factor` None is a dataset without --masked_loss."""
    files = collect_photos(photos, "instance_data_dir")
    if masks is not None:
        files = with_masks(files, masks, alpha_mask=False)
    instance = load_image_set(files, PROMPT, tokenize, size_of)
    prior_set = load_image_set(collect_photos(photos, "class_data_dir")[::-1], CLASS_PROMPT, tokenize, size_of)
    return DreamBoothDataset([ConceptData(instance, prior_set)], center_crop=center_crop, random_flip=True,
                             size_conditioning=size_conditioning, mask_factor=factor)


@pytest.mark.parametrize("bucket", [False, True], ids=["square", "bucket"])
def test_the_mask_follows_the_photos_crop_flip_and_bucket(tmp_path, bucket):
    """The photos are their masks in grey: every example's pixels, area-averaged, must equal its loss mask."""
    photos, masks = write_mask_pairs(str(tmp_path))
    size_of = (lambda h, w: (64, 80)) if bucket else (lambda h, w: (64, 64))
    dataset = masked_dataset(photos, masks, size_of)
    sums = set()
    for index in range(len(dataset)):
        for seed in range(12):
            item = dataset[(index, seed)]
            pixels, mask = item[INSTANCE][PIXEL_VALUES], item[INSTANCE][LOSS_MASK]
            assert mask.shape == (1, pixels.shape[1] // 8, pixels.shape[2] // 8) and mask.dtype == np.float32
            grey = (pixels.mean(axis=0) + 1.0) / 2.0
            np.testing.assert_allclose(mask[0], area_downsample(grey, 8), atol=0.02)  # JPEG rounding only
            assert np.array_equal(item[CLASS][LOSS_MASK], np.ones_like(mask))  # class rows are unmasked
            sums.add(round(float(mask.sum()), 4))
    assert len(sums) > 6  # the random crops really moved the mask


def test_masks_of_fixed_crops_are_kept_like_cached_latents_and_random_crops_are_not(tmp_path):
    photos, masks = write_mask_pairs(str(tmp_path))
    centred = masked_dataset(photos, masks, center_crop=True)
    for index in range(len(centred)):
        for seed in range(8):
            centred[(index, seed)]
    assert 0 < len(centred._kept_masks) <= 3 * 2 * 2  # (instance + class) images x orientations
    again = centred[(0, 0)][INSTANCE][LOSS_MASK]
    assert any(again is kept for kept in centred._kept_masks.values())
    cropped = masked_dataset(photos, masks)  # 96x80 photos at 64x64: every crop is drawn
    for seed in range(8):
        cropped[(0, seed)]
    assert all(key[0] != id(cropped.concepts[0].instance) for key in cropped._kept_masks)


def test_the_alpha_channel_is_the_mask_and_the_pixels_stay_composited(tmp_path):
    folder = tmp_path / "rgba"
    folder.mkdir()
    alpha = smooth_mask(64, 64, 3)
    rgba = np.dstack([np.full((64, 64, 3), 200, np.uint8), alpha])
    Image.fromarray(rgba, "RGBA").save(folder / "photo-0.png")
    photos = with_masks(collect_photos(str(folder), "instance_data_dir"), None, alpha_mask=True)
    assert np.array_equal(np.asarray(photos[0].mask), alpha)
    share = alpha.astype(np.float64) / 255.0
    expected = np.round(200 * share + 255 * (1 - share))  # composited on white, as before
    assert np.abs(np.asarray(photos[0].image)[..., 0].astype(float) - expected).max() <= 1


def test_a_mask_set_with_the_same_photos_gives_todays_pixels(tmp_path):
    photos, masks = write_mask_pairs(str(tmp_path))
    today = masked_dataset(photos, masks, factor=None)
    masked = masked_dataset(photos, masks)
    for seed in range(5):
        a, b = today[(1, seed)], masked[(1, seed)]
        assert LOSS_MASK not in a[INSTANCE] and LOSS_MASK in b[INSTANCE]
        assert np.array_equal(a[INSTANCE][PIXEL_VALUES], b[INSTANCE][PIXEL_VALUES])


def forward(model, dataset, keys=((0, 3), (1, 4))):
    paddle.seed(11)
    with paddle.no_grad():
        return model(**collate([dataset[k] for k in keys]))


@pytest.mark.slow  # builds a model per family
def test_every_family_weights_its_loss_by_the_mask(family_model, tmp_path):
    """All-ones masks: the loss of today, bit for bit. All-black masks: the instance loss is exactly 0 and no
    gradient flows from it (only the prior loss trains). A real mask gives another loss."""
    family, path = family_model
    photos, masks = write_mask_pairs(str(tmp_path))
    ones_dir, black_dir = tmp_path / "ones", tmp_path / "black"
    ones_dir.mkdir(), black_dir.mkdir()
    for n in range(3):
        Image.fromarray(np.full((80, 96), 255, np.uint8)).save(ones_dir / f"photo-{n}.png")
        Image.fromarray(np.zeros((80, 96), np.uint8)).save(black_dir / f"photo-{n}.png")
    model = make_model(path, prior=True)
    model.masked_loss = MaskedLoss()
    factor = model.vae_scale_factor

    def loss_with(mask_dir):
        dataset = masked_dataset(photos, mask_dir and str(mask_dir), factor=factor if mask_dir else None,
                                 tokenize=model.tokenize, size_conditioning=model.family.size_conditioning)
        return forward(model, dataset)

    plain, ones = loss_with(None), loss_with(ones_dir)
    assert all(np.array_equal(plain[k].numpy(), ones[k].numpy()) for k in ("loss", "loss_instance", "loss_prior"))
    real = loss_with(masks)
    assert abs(float(real["loss_instance"]) - float(plain["loss_instance"])) > 1e-4
    assert np.array_equal(real["loss_prior"].numpy(), plain["loss_prior"].numpy())  # class rows unmasked
    black = loss_with(black_dir)
    assert float(black["loss_instance"]) == 0.0 and float(black["loss"]) == float(black["loss_prior"]) > 0


def argv(model, photos, out, *extra, steps=4):
    return train_argv(model, photos, out, steps=steps, extra=list(extra))


@pytest.mark.parametrize("case", ["no_source", "dir_without_flag", "weight_without_flag", "both_sources",
                                  "missing_mask", "wrong_size", "no_alpha", "weight_out_of_range", "not_a_folder"])
def test_bad_mask_input_stops_the_run_before_loading(case, tiny_model, tmp_path, capsys, no_model_loading):
    photos, masks = write_mask_pairs(str(tmp_path))
    out = tmp_path / "out"
    if case == "missing_mask":
        os.remove(os.path.join(masks, "photo-1.png"))
    if case == "wrong_size":
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(os.path.join(masks, "photo-2.png"))
    extra, message = {
        "no_source": (["--masked_loss"], "--masked_loss needs masks: --instance_mask_dir"),
        "dir_without_flag": (["--instance_mask_dir", masks], "--instance_mask_dir only acts with --masked_loss"),
        "weight_without_flag": (["--masked_loss_unmasked_weight", "0.5"],
                                "--masked_loss_unmasked_weight only acts with --masked_loss"),
        "both_sources": (["--masked_loss", "--alpha_mask", "--instance_mask_dir", masks], "not both"),
        "missing_mask": (["--masked_loss", "--instance_mask_dir", masks],
                         f"photo-1.jpg has no mask: expected {os.path.join(masks, 'photo-1.png')}"),
        "wrong_size": (["--masked_loss", "--instance_mask_dir", masks], "is 64x64 but its photo"),
        "no_alpha": (["--masked_loss", "--alpha_mask"], "photo-0.jpg has no alpha channel"),
        "weight_out_of_range": (["--masked_loss", "--alpha_mask", "--masked_loss_unmasked_weight", "1.5"],
                                "--masked_loss_unmasked_weight 1.5 is out of range"),
        "not_a_folder": (["--masked_loss", "--instance_mask_dir", str(tmp_path / "nowhere")], "is not a folder"),
    }[case]
    assert train.main(argv(tiny_model, photos, out, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not os.path.exists(out)


@pytest.mark.slow
def test_a_masked_run_trains_differently_and_resumes_exactly(tiny_model, tmp_path):
    photos, masks = write_mask_pairs(str(tmp_path))
    extra = ["--random_flip", "--checkpointing_steps", "2", "--masked_loss", "--instance_mask_dir", masks,
             "--masked_loss_unmasked_weight", "0.1", "--masked_loss_normalize"]
    full = tmp_path / "full"
    result = run_module(["-m", "ppdreambooth.train", *argv(tiny_model, photos, full, *extra, steps=6)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "masks:     loss weighted by mask files on the 8x8-pixel latent grid; outside weight 0.1, normalised " \
           "by mask area; class rows unmasked" in result.stdout
    reference = load_unet_weights(str(full))
    unmasked = tmp_path / "unmasked"
    result = run_module(["-m", "ppdreambooth.train", *argv(tiny_model, photos, unmasked, *extra[:3], steps=6)])
    assert result.returncode == 0, result.stderr[-3000:]
    other = load_unet_weights(str(unmasked))
    assert any(not np.array_equal(other[k], reference[k]) for k in reference)  # the mask was not ignored
    resumed = tmp_path / "resumed"
    truncate_run_to(str(full), 4, str(resumed))
    result = run_module(["-m", "ppdreambooth.train", *argv(tiny_model, photos, resumed, *extra,
                                                          "--resume_from_checkpoint", "latest", steps=6)])
    assert result.returncode == 0, result.stderr[-3000:]
    weights = load_unet_weights(str(resumed))
    assert all(np.array_equal(weights[k], reference[k]) for k in reference)
