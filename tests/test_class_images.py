"""Class-image generation: count, reuse of existing images, continuation after a kill, split across ranks."""
import os

import numpy as np
from PIL import Image

from ppdreambooth.data.class_images import SLOT_NAME, free_slots, generate_class_images


def generate(model, folder, slots, seed=0):
    return generate_class_images(model, str(folder), "a photo of dog", slots, sample_batch_size=2,
                                 num_inference_steps=2, seed=seed, image_size=(64, 64), show_progress=False)


def pixels(path):
    return np.asarray(Image.open(path))


def test_generates_missing_images_and_reuses_existing(tiny_model, tmp_path):
    folder = tmp_path / "class"
    folder.mkdir()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(folder / "mine.jpg")  # a user's own class image
    (folder / "notes.txt").write_text("not an image")
    before = (folder / "mine.jpg").read_bytes()

    assert free_slots(str(folder), 3) == [0, 1]
    assert generate(tiny_model, folder, free_slots(str(folder), 3)) == 2
    assert sorted(os.listdir(folder)) == [SLOT_NAME.format(0), SLOT_NAME.format(1), "mine.jpg", "notes.txt"]
    assert (folder / "mine.jpg").read_bytes() == before
    first = {n: (folder / n).read_bytes() for n in os.listdir(folder)}

    # enough images already: nothing is generated or touched
    assert free_slots(str(folder), 3) == [] and free_slots(str(folder), 2) == []
    assert generate(tiny_model, folder, free_slots(str(folder), 3)) == 0
    assert {n: (folder / n).read_bytes() for n in os.listdir(folder)} == first

    # asking for more later continues with new slots and leaves the others as they are
    assert free_slots(str(folder), 5) == [2, 3]
    generate(tiny_model, folder, free_slots(str(folder), 5))
    assert all((folder / n).read_bytes() == b for n, b in first.items())
    assert len([n for n in os.listdir(folder) if n.endswith((".png", ".jpg"))]) == 5


def test_continuation_after_a_kill_and_split_across_ranks_give_the_same_images(tiny_model, tmp_path):
    single = tmp_path / "single"
    generate(tiny_model, single, free_slots(str(single), 4))

    # a run killed after two images (plus a half-written temporary file) continues with the rest
    killed = tmp_path / "killed"
    generate(tiny_model, killed, [0, 1])
    (killed / f".{SLOT_NAME.format(2)}.tmp").write_bytes(b"half a png")
    assert free_slots(str(killed), 4) == [2, 3]
    generate(tiny_model, killed, free_slots(str(killed), 4))

    # two ranks sharing one list of free slots
    split = tmp_path / "split"
    slots = free_slots(str(split), 4)
    generate(tiny_model, split, slots[0::2])
    generate(tiny_model, split, slots[1::2])

    for k in range(4):
        name = SLOT_NAME.format(k)
        assert np.array_equal(pixels(killed / name), pixels(single / name))
        # batched differently: equal up to float rounding in the batched UNet (at most 1/255 here)
        diff = np.abs(pixels(split / name).astype(int) - pixels(single / name).astype(int))
        assert diff.max() <= 2, (name, diff.max())
    assert not np.array_equal(pixels(single / SLOT_NAME.format(0)), pixels(single / SLOT_NAME.format(1)))


def test_inference_steps_are_honoured(tiny_model, tmp_path):
    two, four = tmp_path / "two", tmp_path / "four"
    generate(tiny_model, two, [0])
    generate_class_images(tiny_model, str(four), "a photo of dog", [0], num_inference_steps=4,
                          image_size=(64, 64), show_progress=False)
    assert not np.array_equal(pixels(two / SLOT_NAME.format(0)), pixels(four / SLOT_NAME.format(0)))
