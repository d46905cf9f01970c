"""Start-up and caching time and memory against the number of images (`bench_real_size.py --curve`).

For each count N: N instance photos (the made-up subject, 128 px) and N class photos already present with
`--num_class_images N` and prior preservation (generation itself is per image and timed by bench_seed_script.py),
the tiny SD model, `--resolution 64`, one training step, in a fresh process with phase markers
(`ppdreambooth.runtime.phases`). Prints per phase the seconds and peak resident memory, and per-image costs: a
phase that grows linearly has the same seconds per image at every N; "x per 10x" is the factor from one count to
the next when counts go up by ten (10 = linear).
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("start-up", "load", "dataset", "caching", "trainer set-up", "first step")


def make_images(folder: str, count: int, offset: int = 0) -> None:
    from made_up_subject import draw_subject

    os.makedirs(folder, exist_ok=True)
    base = [draw_subject(i) for i in range(5)]
    for i in range(count):  # distinct files (a pixel differs), drawn once
        image = base[(i + offset) % 5].copy()
        image.putpixel((i % 128, (i // 128) % 128), (i % 256, (i * 7) % 256, (i * 13) % 256))
        image.save(os.path.join(folder, f"{i:05d}.png"))


def measure_count(model: str, work: str, count: int) -> dict:
    from bench_real_size import phase_table, run_marked

    instance, classes = os.path.join(work, f"instance-{count}"), os.path.join(work, f"class-{count}")
    make_images(instance, count)
    make_images(classes, count, offset=2)
    out = os.path.join(work, f"out-{count}")
    argv = [sys.executable, "-m", "ppdreambooth.train", f"--pretrained_model_name_or_path={model}",
            f"--instance_data_dir={instance}", f"--output_dir={out}", "--instance_prompt=a photo of sks dog",
            "--resolution=64", "--train_batch_size=1", "--max_train_steps=1", "--with_prior_preservation",
            f"--class_data_dir={classes}", "--class_prompt=a photo of dog", f"--num_class_images={count}"]
    marks, wall, start = run_marked(argv, out + ".log")
    table = phase_table(marks, start)
    shutil.rmtree(out, ignore_errors=True)
    return {"count": count, "wall": wall, **table}


def print_curve(counts) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from ppdreambooth.families.tiny import build_tiny_pipeline

    work = tempfile.mkdtemp(prefix="startup-curve-")
    model = os.path.join(work, "tiny-sd")
    build_tiny_pipeline(model)
    rows = [measure_count(model, work, n) for n in counts]
    lines = ["| images (instance + class each) | " + " | ".join(f"{p} s (peak GiB)" for p in PHASES)
             + " | to first step s |", "|" + " --- |" * (len(PHASES) + 2)]
    for r in rows:
        cells = [f"{sum(r['durations'].get(p, [0])):.2f} ({r['peaks'].get(p, 0) / 1024**3:.2f})" for p in PHASES]
        lines.append(f"| {r['count']} | " + " | ".join(cells) + f" | {r['to_first_step']:.1f} |")
    for a, b in zip(rows, rows[1:]):
        factor = b["count"] / a["count"]
        growth = []
        for p in ("dataset", "caching"):
            ta, tb = sum(a["durations"].get(p, [0])), sum(b["durations"].get(p, [0]))
            growth.append(f"{p} x{tb / ta:.1f}" if ta > 0 else f"{p} -")
        lines.append(f"| {a['count']} -> {b['count']} (x{factor:.0f} images) | " + ", ".join(growth)
                     + " |" + " |" * len(PHASES))
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)
