"""Image loading and transforms: modes -> RGB, EXIF orientation, resize/crop/flip arithmetic, bad files named."""
import random

import numpy as np
import pytest
from PIL import Image

from ppdreambooth.data.images import ImageError, crop_box, list_image_files, load_rgb, prepare_image, to_rgb


def test_prepare_image_resizes_to_cover_then_crops_and_scales():
    # 40 x 20 (w x h) image, left half black, right half white; target 16 x 16
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, 20:] = 255
    out = prepare_image(Image.fromarray(arr), (16, 16), center_crop=True, flip=False)
    assert out.shape == (3, 16, 16) and out.dtype == np.float32
    # resized to 32 x 16, centre crop = columns 8..24: left half -1, right half +1
    assert np.allclose(out[:, :, :7], -1.0) and np.allclose(out[:, :, 9:], 1.0)
    flipped = prepare_image(Image.fromarray(arr), (16, 16), center_crop=True, flip=True)
    assert np.array_equal(flipped, out[:, :, ::-1])


def test_random_crop_uses_the_given_rng_and_stays_inside():
    arr = np.arange(30 * 50, dtype=np.uint16).reshape(30, 50) % 256
    img = Image.fromarray(np.stack([arr.astype(np.uint8)] * 3, -1))
    a = prepare_image(img, (30, 30), center_crop=False, flip=False, rng=random.Random(3))
    b = prepare_image(img, (30, 30), center_crop=False, flip=False, rng=random.Random(3))
    assert np.array_equal(a, b)
    tops_lefts = {crop_box((30, 50), (30, 30), False, random.Random(s)) for s in range(50)}
    assert all(t == 0 and 0 <= l <= 20 for t, l in tops_lefts) and len(tops_lefts) > 5
    assert crop_box((30, 50), (30, 30), True, random.Random(0)) == (0, 10)


def test_non_square_target_and_upscaling():
    out = prepare_image(Image.new("RGB", (10, 10), (255, 0, 0)), (16, 24), center_crop=True, flip=False)
    assert out.shape == (3, 16, 24)
    assert np.allclose(out[0], 1.0) and np.allclose(out[1], -1.0)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "I", "1"])
def test_every_mode_becomes_rgb(mode, tmp_path):
    img = Image.new("RGB", (12, 10), (200, 100, 50)).convert(mode)
    assert to_rgb(img).mode == "RGB" and to_rgb(img).size == (12, 10)


def test_transparency_is_composited_on_white_and_16_bit_is_scaled():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(to_rgb(rgba)).min() == 255
    deep = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    assert np.asarray(to_rgb(deep)).min() == 255


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise to display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif.tobytes())
    upright = load_rgb(str(path))
    assert upright.size == (20, 40)  # portrait once rotated
    top = np.asarray(upright)[:20].mean()
    assert top > 200  # the white half ends on top


def test_bad_files_are_named(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty.png is empty"):
        load_rgb(str(empty))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(ImageError, match="broken.jpg cannot be read"):
        load_rgb(str(broken))


def test_only_image_files_are_listed(tmp_path):
    for name in ("a.png", "b.JPG", "notes.txt", ".DS_Store", "c.webp"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.rsplit("/", 1)[1] for p in list_image_files(str(tmp_path))] == ["a.png", "b.JPG", "c.webp"]
