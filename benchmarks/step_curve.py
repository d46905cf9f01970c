"""Per-step time against batch size and number of concepts (`bench_real_size.py --step_curve`).

Each setting trains the tiny SD model (`ppdreambooth.families.tiny`, 64 px, full fine-tune, prior preservation
off) for `steps` steps in a fresh process with phase markers (`ppdreambooth.runtime.phases`): the trainer marks
the end of every step, so a step's time is the interval between two marks (data, forward, backward, optimizer
step and the trainer's own bookkeeping). The first `warmup` steps are left out (the first creates AdamW's moments)
and the steady time is the median of the rest (robust to another process taking the CPU for a moment).

- Batch sizes: one subject with `max(batches)` photos, `--train_batch_size B`.
- Concepts: `--concepts` with N subjects of `PHOTOS_PER_CONCEPT` photos each, batch 1.

Linear cost means: seconds per sample not rising with the batch size, and seconds per step not rising with the
number of concepts (a step still trains one sample). A rise above `TOLERANCE` is reported as faster than linear.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile

PHOTOS_PER_CONCEPT = 4
TOLERANCE = 0.15  # noise between processes on a shared 2-core machine stays below this


def make_photos(folder: str, count: int, offset: int = 0) -> str:
    from made_up_subject import draw_subject

    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        draw_subject((i + offset) % 5).save(os.path.join(folder, f"{i:03d}.png"))
    return folder


def steady_seconds(marks: list, warmup: int) -> tuple:
    """(median seconds per step after `warmup` steps, number of steps it is taken over) from a run's marks."""
    ends = [r for r in marks if r["phase"] in ("first step", "step")]
    intervals = [b["time"] - a["time"] for a, b in zip(ends, ends[1:]) if b["step"] > warmup]
    if not intervals:
        raise SystemExit(f"no steady steps after {warmup} warm-up steps: raise --curve_steps")
    return statistics.median(intervals), len(intervals)


def measure_setting(model: str, work: str, name: str, data_args: list, batch: int, steps: int, warmup: int) -> dict:
    from bench_real_size import run_marked

    out = os.path.join(work, f"out-{name}")
    argv = [sys.executable, "-m", "ppdreambooth.train", f"--pretrained_model_name_or_path={model}", *data_args,
            f"--output_dir={out}", "--resolution=64", f"--train_batch_size={batch}", "--learning_rate=5e-6",
            "--lr_scheduler=constant", "--lr_warmup_steps=0", f"--max_train_steps={steps}",
            f"--checkpointing_steps={steps + 1000}"]
    marks, wall, _ = run_marked(argv, out + ".log")
    seconds, counted = steady_seconds(marks, warmup)
    shutil.rmtree(out, ignore_errors=True)
    return {"setting": name, "batch": batch, "seconds_per_step": seconds, "steps_counted": counted, "wall": wall}


def batch_rows(model: str, work: str, batches, steps: int, warmup: int) -> list:
    photos = make_photos(os.path.join(work, "photos"), max(batches))
    data = [f"--instance_data_dir={photos}", "--instance_prompt=a photo of sks dog"]
    return [measure_setting(model, work, f"batch {b}, 1 concept", data, b, steps, warmup) for b in batches]


def concept_rows(model: str, work: str, counts, steps: int, warmup: int) -> list:
    rows = []
    for n in counts:
        concepts = [{"instance_data_dir": make_photos(os.path.join(work, f"concept-{i}"), PHOTOS_PER_CONCEPT, i),
                     "instance_prompt": f"a photo of sks{i} toy"} for i in range(n)]
        data = [f"--concepts={json.dumps(concepts)}"]
        rows.append(measure_setting(model, work, f"batch 1, {n} concept{'s' * (n > 1)}", data, 1, steps, warmup))
    return rows


def growth_verdict(batch: list, concepts: list) -> str:
    """Which settings grow faster than linear (beyond TOLERANCE), or that none does."""
    faster = []
    base = batch[0]["seconds_per_step"] / batch[0]["batch"] if batch else None
    for r in batch[1:]:
        per_sample = r["seconds_per_step"] / r["batch"]
        if per_sample > base * (1 + TOLERANCE):
            faster.append(f"{r['setting']}: {per_sample / base:.2f}x the seconds per sample of batch "
                          f"{batch[0]['batch']}")
    for r in concepts[1:]:
        ratio = r["seconds_per_step"] / concepts[0]["seconds_per_step"]
        if ratio > 1 + TOLERANCE:
            faster.append(f"{r['setting']}: {ratio:.2f}x the seconds per step of {concepts[0]['setting']}")
    if faster:
        return "Faster than linear (beyond {:.0%}): ".format(TOLERANCE) + "; ".join(faster) + "."
    return (f"Nothing grows faster than linear (within {TOLERANCE:.0%}): seconds per sample do not rise with the "
            "batch size and seconds per step do not rise with the number of concepts.")


def format_table(batch: list, concepts: list, steps: int, warmup: int) -> str:
    lines = [f"Steady step = median of steps {warmup + 1}..{steps} (steps 1..{warmup} are warm-up)", "",
             "| setting | s per steady step | s per sample | ratio to the smallest setting (step) |",
             "| --- | --- | --- | --- |"]
    for group in (batch, concepts):
        for r in group:
            ratio = r["seconds_per_step"] / group[0]["seconds_per_step"]
            lines.append(f"| {r['setting']} | {r['seconds_per_step']:.3f} | {r['seconds_per_step'] / r['batch']:.3f} "
                         f"| {ratio:.2f} |")
    lines += ["", growth_verdict(batch, concepts)]
    return "\n".join(lines)


def print_step_curve(batches, concept_counts, steps: int = 22, warmup: int = 2) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from ppdreambooth.families.tiny import build_tiny_pipeline

    work = tempfile.mkdtemp(prefix="step-curve-")
    model = os.path.join(work, "tiny-sd")
    build_tiny_pipeline(model)
    batch = batch_rows(model, work, sorted(batches), steps, warmup)
    concepts = concept_rows(model, work, sorted(concept_counts), steps, warmup)
    print(format_table(batch, concepts, steps, warmup))
    shutil.rmtree(work, ignore_errors=True)
