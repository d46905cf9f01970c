"""Kills, bad numbers and hostile files: nothing is lost, a restart ends where an uninterrupted run ends."""
import os
import signal

import numpy as np
import paddle
import pytest
from PIL import Image

from helpers.models import load_unet_weights
from helpers.photos import write_photos
from helpers.models import assert_same_weights
from helpers.runs import ROOT, run_module, train_argv
from ppdreambooth.data.photos import collect_photos
from ppdreambooth.data.images import ImageError, load_rgb
from ppdreambooth.runtime.checkpoints import complete_checkpoints

FAULT_ENTRY = os.path.join(ROOT, "tests", "helpers", "fault_entry.py")
# prior preservation (so class images are generated), random flips and crops, linear LR decay
EXTRA = ["--with_prior_preservation", "--class_prompt", "a photo of dog", "--num_class_images", "3",
         "--class_image_inference_steps", "2", "--sample_batch_size", "1", "--random_flip",
         "--lr_scheduler", "linear", "--checkpointing_steps", "2", "--checkpoints_total_limit", "2"]


def argv(model, photos, out, class_dir):
    return train_argv(model, photos, out, steps=6, extra=EXTRA + ["--class_data_dir", str(class_dir)])


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    photos = write_photos(tmp / "instance")
    result = run_module(["-m", "ppdreambooth.train", *argv(tiny_model, photos, tmp / "out", tmp / "class")])
    assert result.returncode == 0, result.stderr[-3000:]
    return photos, load_unet_weights(str(tmp / "out"))


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill_in_class_image:2", "kill_in_step:4", "kill_in_checkpoint:2",
                                   "kill_in_final_save:2"])
def test_sigkill_then_resume_latest_equals_uninterrupted(tiny_model, reference, tmp_path, fault):
    photos, expected = reference
    out, class_dir = tmp_path / "out", tmp_path / "class"
    killed = run_module([FAULT_ENTRY, *argv(tiny_model, photos, out, class_dir)], env={"FAULT": fault})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    for checkpoint in complete_checkpoints(str(out)):  # whatever is marked complete is loadable
        paddle.load(os.path.join(checkpoint, "optimizer.pdopt"))
    if fault.startswith("kill_in_checkpoint"):  # the half-written checkpoint-4 exists but is not complete
        assert (out / "checkpoint-4" / "model_state.pdparams").is_file()
        assert [os.path.basename(c) for c in complete_checkpoints(str(out))] == ["checkpoint-2"]

    resumed = run_module(["-m", "ppdreambooth.train",
                          *argv(tiny_model, photos, out, class_dir), "--resume_from_checkpoint", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(load_unet_weights(str(out)), expected)
    assert len([n for n in os.listdir(class_dir) if n.endswith(".png")]) == 3
    assert [os.path.basename(c) for c in complete_checkpoints(str(out))] == ["checkpoint-4", "checkpoint-6"]


@pytest.mark.slow
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_model, photos, tmp_path):
    out = tmp_path / "out"
    result = run_module([FAULT_ENTRY, *train_argv(tiny_model, photos, out, steps=6,
                                                  extra=["--checkpointing_steps", "2"])],
                        env={"FAULT": "nan_in_step:3"})
    assert result.returncode == 3
    assert "the loss is nan at step 3" in result.stderr and "learning rate" in result.stderr
    assert "Traceback" not in result.stderr
    assert [os.path.basename(c) for c in complete_checkpoints(str(out))] == ["checkpoint-2"]
    weights = paddle.load(str(out / "checkpoint-2" / "model_state.pdparams"))
    assert all(np.isfinite(v.numpy()).all() for v in weights.values())
    assert not (out / "model_index.json").exists() and not (out / "unet").exists()


def test_decompression_bomb_is_refused_by_name(tmp_path):
    big = tmp_path / "huge.png"
    Image.new("L", (9000, 9000)).save(big)
    with pytest.raises(ImageError, match="huge.png is 9000x9000 pixels"):
        load_rgb(str(big))


def test_real_world_folder(tmp_path, caplog):
    folder = tmp_path / "phone"
    folder.mkdir()
    Image.new("RGBA", (80, 80), (10, 20, 30, 128)).save(folder / "a.png")
    Image.new("CMYK", (80, 80)).save(folder / "b.jpg")
    Image.new("P", (80, 80)).save(folder / "c.gif")
    Image.fromarray(np.full((80, 80), 40000, np.uint16)).save(folder / "d.png")
    Image.new("RGB", (40, 40)).save(folder / "e.webp")
    (folder / ".DS_Store").write_bytes(b"\0\1")
    (folder / "notes.txt").write_text("shot on my phone")
    (folder / "zero.jpg").write_bytes(b"")
    photos = collect_photos(str(folder), "instance_data_dir")
    assert [os.path.basename(p.path) for p in photos] == ["a.png", "b.jpg", "c.gif", "d.png", "e.webp"]
    assert all(p.image.mode == "RGB" and load_rgb(p.path).mode == "RGB" for p in photos)
    assert "zero.jpg is empty" in caplog.text


def test_rotation_deletes_only_older_complete_checkpoints(tmp_path):
    from ppdreambooth.runtime.checkpoints import delete_checkpoint, mark_complete

    for step in (2, 4, 6, 8):
        os.makedirs(tmp_path / f"checkpoint-{step}")
        if step != 8:
            mark_complete(str(tmp_path / f"checkpoint-{step}"), step)
    assert [os.path.basename(c) for c in complete_checkpoints(str(tmp_path))] == [
        "checkpoint-2", "checkpoint-4", "checkpoint-6"]
    delete_checkpoint(str(tmp_path / "checkpoint-2"))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]
