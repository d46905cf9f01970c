"""Disks fill and folders refuse writes; resumes come with changed settings or changed photos; photo folders hold
odd entries. Each ends in a clear message (or trains), never a traceback, and nothing the user made is lost.

The disk tests mount small tmpfs file systems (root can; elsewhere they are skipped)."""
import contextlib
import os
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from helpers.photos import write_photos
from helpers.runs import run_module, train_argv
from ppdreambooth import train
from ppdreambooth.runtime.checkpoints import complete_checkpoints, verify_checkpoint


@contextlib.contextmanager
def small_disk(folder, size_bytes, read_only=False):
    """A tmpfs of `size_bytes` mounted at `folder` (skips the test where mounting is not allowed)."""
    os.makedirs(folder, exist_ok=True)
    options = f"size={size_bytes}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def resize_disk(folder, size_bytes):
    subprocess.run(["mount", "-o", f"remount,size={size_bytes}", str(folder)], check=True)


def folder_bytes(folder):
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(folder) for name in names)


def test_a_read_only_output_folder_is_refused_before_loading(tiny_model, photos, tmp_path, capsys,
                                                             no_model_loading):
    with small_disk(tmp_path / "ro", 1 << 20, read_only=True) as disk:
        assert train.main(train_argv(tiny_model, photos, disk / "out")) == 2
    err = capsys.readouterr().err
    assert "cannot be written (read-only file system)" in err and "Traceback" not in err, err


@pytest.mark.slow
def test_a_full_disk_keeps_the_earlier_checkpoint_and_resume_latest_finishes(tiny_model, photos, tmp_path):
    """A checkpoint that does not fit: exit 1 naming what is intact, no half checkpoint left (complete or not),
    the earlier one verifies, and once there is room `--resume_from_checkpoint latest` finishes the run."""
    flags = ["--checkpointing_steps", "2"]
    reference = tmp_path / "reference"
    done = run_module(["-m", "ppdreambooth.train", *train_argv(tiny_model, photos, reference, steps=2, extra=flags)])
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = folder_bytes(reference / "checkpoint-2")
    # room for the first checkpoint and the logs, not for a second checkpoint beside it
    with small_disk(tmp_path / "disk", int(1.5 * checkpoint) + (2 << 20)) as disk:
        out = disk / "run"
        argv = train_argv(tiny_model, photos, out, steps=4, extra=flags)
        full = run_module(["-m", "ppdreambooth.train", *argv])
        assert full.returncode == 1, full.stderr[-3000:]
        assert ("no space left on device while writing checkpoint-4" in full.stderr
                and "checkpoint-2 is intact" in full.stderr and "--resume_from_checkpoint latest" in full.stderr)
        assert "Traceback" not in full.stderr
        assert [os.path.basename(c) for c in complete_checkpoints(str(out))] == ["checkpoint-2"]
        assert not (out / "checkpoint-4").exists() and verify_checkpoint(str(out / "checkpoint-2")).verified
        resize_disk(disk, 8 * checkpoint)
        resumed = run_module(["-m", "ppdreambooth.train", *argv, "--resume_from_checkpoint", "latest"])
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert (out / "model_index.json").exists() and "checkpoint-4" in os.listdir(out)


@pytest.mark.slow
def test_resuming_with_changed_settings_names_each_difference(tiny_model, photos, tmp_path):
    out = tmp_path / "lora"
    lora = ["--use_lora", "--lora_rank", "4", "--checkpointing_steps", "2"]
    first = run_module(["-m", "ppdreambooth.train", *train_argv(tiny_model, photos, out, steps=2, extra=lora)])
    assert first.returncode == 0, first.stderr[-3000:]
    changed = train_argv(tiny_model, photos, out, steps=4, extra=["--use_lora", "--lora_rank", "8",
                                                                  "--resume_from_checkpoint", "latest"])
    refused = run_module(["-m", "ppdreambooth.train", *changed])
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert "--lora_rank is 8 but checkpoint-2 was trained with 4" in refused.stderr
    assert "--lora_alpha is 8.0 but checkpoint-2 was trained with 4.0" in refused.stderr
    assert verify_checkpoint(str(out / "checkpoint-2")).verified  # untouched
    # a new photo and another learning rate: the run continues, and says the data order changed
    shutil.copy(os.path.join(photos, "photo-0.png"), os.path.join(photos, "photo-9.png"))
    allowed = train_argv(tiny_model, photos, out, steps=4, extra=lora + ["--resume_from_checkpoint", "latest",
                                                                          "--learning_rate", "2e-4"])
    resumed = run_module(["-m", "ppdreambooth.train", *allowed])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "the instance images of concept 1 changed since checkpoint-2 (added or replaced: photo-9.png" in (
        resumed.stdout + resumed.stderr)
    assert "an exact resume no longer holds" in resumed.stdout + resumed.stderr


@pytest.mark.slow
def test_odd_entries_in_the_photo_folder_and_a_long_prompt_still_train(tiny_model, tmp_path):
    """A symlink to a photo elsewhere, a folder named like an image, a text file named like one, a dangling link;
    a prompt longer than CLIP's window is cut with a warning."""
    photos = write_photos(tmp_path / "photos", count=2)
    elsewhere = write_photos(tmp_path / "elsewhere", count=1, seed=3)
    os.symlink(os.path.join(elsewhere, "photo-0.png"), os.path.join(photos, "linked.png"))
    os.makedirs(os.path.join(photos, "album.jpg"))
    with open(os.path.join(photos, "notes.png"), "w") as f:
        f.write("not a picture")
    os.symlink(os.path.join(tmp_path, "gone.png"), os.path.join(photos, "dangling.png"))
    Image.fromarray(np.zeros((70, 90, 3), np.uint8)).save(os.path.join(photos, "tiny.bmp"))
    before = sorted(os.listdir(photos))
    long_prompt = "a photo of sks dog " + " ".join(["sitting on a very red sofa"] * 20)
    argv = train_argv(tiny_model, photos, tmp_path / "out", steps=2)
    argv[argv.index("--instance_prompt") + 1] = long_prompt
    result = run_module(["-m", "ppdreambooth.train", *argv])
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "notes.png cannot be read as an image" in output
    assert "tokens long; tokenizer reads 77, so its end is cut off" in output
    assert sorted(os.listdir(photos)) == before  # the photo folder is never written to
