"""The fixes the real-size measurements led to, checked by mechanism on tiny tensors and models (README "Memory
measured on this machine"): checkpoints streamed tensor by tensor (no second full copy), every checkpoint file
written once per save, components loaded without a randomly initialised first copy, phase markers with per-phase
peaks."""
import builtins
import collections
import json
import mmap
import os
import tracemalloc

import numpy as np
import paddle
import pytest

from ppdreambooth.runtime import phases
from ppdreambooth.runtime.streamed_save import streamed_save

MB = 1 << 20


def _optimizer_state():
    paddle.seed(0)
    layer = paddle.nn.Sequential(paddle.nn.Linear(8, 16), paddle.nn.LayerNorm(16), paddle.nn.Linear(16, 4))
    optimizer = paddle.optimizer.AdamW(parameters=layer.parameters(), learning_rate=0.1)
    layer(paddle.randn([3, 8])).sum().backward()
    optimizer.step()
    return optimizer.state_dict()


def test_streamed_file_loads_as_paddle_saves_it(tmp_path):
    state = _optimizer_state()
    paddle.save(state, str(tmp_path / "stock.pdopt"))
    streamed_save(state, str(tmp_path / "streamed.pdopt"))
    stock, streamed = paddle.load(str(tmp_path / "stock.pdopt")), paddle.load(str(tmp_path / "streamed.pdopt"))
    assert stock.keys() == streamed.keys() and len(stock) > 6
    for key, value in stock.items():
        if isinstance(value, paddle.Tensor):
            assert streamed[key].name == value.name
            np.testing.assert_array_equal(streamed[key].numpy(), value.numpy())
        else:
            assert streamed[key] == value


def _peak_numpy_bytes(save, state, path) -> int:
    """Peak of the memory NumPy allocated (tracemalloc sees it; Paddle's tensors it does not) while saving."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        save(state, path)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_streamed_save_holds_about_one_tensor_not_the_whole_state(tmp_path):
    state = {f"w{i}": paddle.full([MB], float(i), dtype="float32") for i in range(12)}  # 12 x 4 MiB
    stock = _peak_numpy_bytes(paddle.save, state, str(tmp_path / "stock"))
    streamed = _peak_numpy_bytes(streamed_save, state, str(tmp_path / "streamed"))
    assert stock > 11 * 4 * MB  # paddle.save copies every tensor to NumPy before writing
    assert streamed < 3 * 4 * MB  # one tensor's array (and its pickled bytes) at a time
    loaded = paddle.load(str(tmp_path / "streamed"))
    assert [float(loaded[f"w{i}"][0]) for i in range(12)] == [float(i) for i in range(12)]


def test_trainer_writes_checkpoints_with_the_streaming_writer(tiny_model, tmp_path):
    from paddlenlp.trainer import TrainingArguments

    from ppdreambooth.runtime.streamed_save import save_checkpoint_object
    from ppdreambooth.training.trainer import DreamBoothTrainer

    trainer = DreamBoothTrainer(model=paddle.nn.Linear(2, 2), args=TrainingArguments(output_dir=str(tmp_path)),
                                base_model=tiny_model)
    assert trainer._save_ckpt_func is save_checkpoint_object


def _record_writes(monkeypatch) -> dict:
    """Count, per final path, every open for writing (`open` in a writing mode, `os.open` with write flags); a file
    written to `x.tmp` and renamed to `x` counts for `x`. The streamed writer, `paddle.save` and the Trainer's JSON
    files all open through these."""
    opened = collections.Counter()
    renamed = {}
    real_open, real_os_open, real_replace = builtins.open, os.open, os.replace

    def tracked_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
            opened[os.path.abspath(file)] += 1
        return real_open(file, mode, *args, **kwargs)

    def tracked_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND):
            opened[os.path.abspath(path)] += 1
        return real_os_open(path, flags, *args, **kwargs)

    def tracked_replace(src, dst, *args, **kwargs):
        renamed[os.path.abspath(src)] = os.path.abspath(dst)
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", tracked_open)
    monkeypatch.setattr(os, "open", tracked_os_open)
    monkeypatch.setattr(os, "replace", tracked_replace)
    return {"opened": opened, "renamed": renamed}


@pytest.mark.parametrize("extra", [["--use_ema"], ["--use_lora"]], ids=["full+ema", "lora"])
def test_each_checkpoint_file_is_written_once_per_save(tiny_model, photos, tmp_path, monkeypatch, extra):
    """A 2-step run with a checkpoint at each step: every file of checkpoint-1 and checkpoint-2 was opened for
    writing exactly once (a second write of a multi-GB file would double the save time at real size), and no file
    in them was written by a path this test cannot see."""
    from helpers.runs import train_argv
    from ppdreambooth import train

    out = tmp_path / "out"
    seen = _record_writes(monkeypatch)
    assert train.main(train_argv(tiny_model, photos, out, steps=2, extra=["--checkpointing_steps", "1", *extra])) == 0
    monkeypatch.undo()
    writes = collections.Counter()
    for path, count in seen["opened"].items():
        writes[seen["renamed"].get(path, path)] += count
    for step in (1, 2):
        folder = out / f"checkpoint-{step}"
        files = {os.path.abspath(os.path.join(root, name)) for root, _, names in os.walk(folder) for name in names}
        expected = {"model_state.pdparams", "optimizer.pdopt", "scheduler.pdparams", "rng_state.pth",
                    "trainer_state.json", ".complete", *(["ema_state.pdparams"] if "--use_ema" in extra else [])}
        assert {os.path.basename(f) for f in files} >= expected
        counts = {os.path.relpath(f, folder): writes[f] for f in sorted(files)}
        assert all(count == 1 for count in counts.values()), counts
        # nothing written there that is not in the folder now (a temporary file left, a file written then removed)
        inside = {p: n for p, n in writes.items() if os.path.dirname(p) == str(folder)}
        assert set(inside) == files, set(inside) ^ files


def test_networks_load_tensor_by_tensor_into_an_empty_network(tiny_model):
    """The denoiser is built without weights and filled from plain reads of the file, one tensor at a time (NumPy
    holds about one tensor; ppdiffusers' loader held the whole file), equal to the file, trainable as after the
    stock load."""
    from safetensors.numpy import load_file

    from ppdreambooth.families import detect_family
    from ppdreambooth.families.loading import load_component

    weights = load_file(os.path.join(tiny_model, "unet", "diffusion_paddle_model.safetensors"))
    total, largest = sum(v.nbytes for v in weights.values()), max(v.nbytes for v in weights.values())
    family = detect_family(tiny_model, None, None)
    tracemalloc.start()
    try:
        unet = load_component(tiny_model, "unet", family)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < max(3 * largest, total // 2), (peak, largest, total)
    assert all(not p.stop_gradient for p in unet.parameters())
    for name, param in unet.named_parameters():
        np.testing.assert_array_equal(param.numpy(), weights[name])


def test_streamed_load_leaves_other_folders_to_ppdiffusers(tiny_model, tmp_path):
    """A folder whose names differ from the network's (older checkpoints, other layouts) is not streamed."""
    import shutil

    import ppdiffusers
    from safetensors.numpy import load_file, save_file

    from ppdreambooth.families.streamed_load import load_streamed

    folder = tmp_path / "unet"
    shutil.copytree(os.path.join(tiny_model, "unet"), folder)
    assert load_streamed(ppdiffusers.UNet2DConditionModel, str(folder)) is not None
    weights = load_file(str(folder / "diffusion_paddle_model.safetensors"))
    weights["renamed." + next(iter(weights))] = weights.pop(next(iter(weights)))
    save_file(weights, str(folder / "diffusion_paddle_model.safetensors"), metadata={"format": "pd"})
    assert load_streamed(ppdiffusers.UNet2DConditionModel, str(folder)) is None


def test_phase_marks_record_each_phase_peak(tmp_path, monkeypatch):
    log = tmp_path / "phases.jsonl"
    assert phases.mark("nothing") is None  # off without the variable
    monkeypatch.setenv(phases.ENV, str(log))
    phases.mark("before")
    # 64 MiB made resident, then given back: an anonymous mapping touched page by page and unmapped, so no allocator
    # decides whether freed memory leaves the process (a freed np.ones block once stayed resident in the fast
    # suite's process, failing this test)
    block = mmap.mmap(-1, 64 * MB)
    for offset in range(0, 64 * MB, mmap.PAGESIZE):
        block[offset] = 1
    block.close()
    phases.mark("allocate")
    phases.mark("after", step=3)
    records = phases.read_marks(str(log))
    assert [r["phase"] for r in records] == ["before", "allocate", "after"] and records[2]["step"] == 3
    if not all(r["peak_reset"] for r in records):
        pytest.skip("this kernel refuses to reset the peak (/proc/self/clear_refs)")
    assert records[1]["peak"] - records[0]["rss"] >= 60 * MB
    assert records[2]["peak"] < records[1]["peak"] - 40 * MB  # the next phase's peak starts afresh, not at 64 MiB
    assert json.loads(log.read_text().splitlines()[0])["phase"] == "before"


def test_freed_heap_memory_goes_back_to_the_system():
    """Many mid-size tensors freed: glibc keeps their pages until `give_back_freed_memory` (malloc_trim) returns
    them. Run in a fresh process so that other tests' heap does not blur the figures."""
    import subprocess
    import sys

    code = """
import paddle
from ppdreambooth.runtime.host_memory import give_back_freed_memory
from ppdreambooth.runtime.phases import memory_status
keep = [paddle.ones([64 * 1024]) for _ in range(400)]  # 256 KiB each, 100 MiB
pins = [paddle.ones([16]) for _ in range(400)]  # interleaved small ones keep the heap from shrinking by itself
blocks = [paddle.ones([64 * 1024]) for _ in range(1600)]  # 400 MiB in 256 KiB tensors
before = memory_status()["rss"]
del blocks
freed = memory_status()["rss"]
trimmed = give_back_freed_memory()
after = memory_status()["rss"]
print(before, freed, after, trimmed)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1")).stdout.split()
    before, freed, after, trimmed = int(out[-4]), int(out[-3]), int(out[-2]), out[-1] == "True"
    if not trimmed:
        pytest.skip("no glibc malloc_trim here")
    assert freed - after > 200 * MB, (before, freed, after)  # the pages came back only when trimmed
