"""Wall time of the seed README's commands: ppdreambooth against ppdiffusers' own `train_dreambooth.py`.

    python benchmarks/bench_seed_script.py --seed_script /path/to/train_dreambooth.py [--repeats 3]

The seed script is not part of this repository: take it from PaddleMIX (`ppdiffusers/examples/dreambooth/
train_dreambooth.py`, e.g. `git clone --depth 1 https://github.com/PaddlePaddle/PaddleMIX`). Both run the
seed README's command lines unchanged except for a tiny random SD model (ppdreambooth.families.tiny), the demo's five
square photos, `--resolution 64` and the step count, each in a fresh process, alternating seed script and
ppdreambooth so machine noise hits both alike; the table shows medians. Rows: the first command at 1 step
(start-up, model loading, set-up) and at 121 steps; the prior-preservation command (8 class images to
generate, DPM-Solver 25 steps in ppdreambooth, the pipeline's default sampler in the seed script) at 1 step.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def seed_command(model: str, photos: str, out: str, steps: int, prior_dir: str = None) -> list:
    """The seed README's command (1.2.2), or its prior-preservation variant, on the tiny job."""
    argv = [f"--pretrained_model_name_or_path={model}", f"--instance_data_dir={photos}", f"--output_dir={out}",
            "--instance_prompt=a photo of sks dog", "--resolution=64", "--train_batch_size=1",
            "--gradient_accumulation_steps=1", "--learning_rate=5e-6", "--lr_scheduler=constant",
            "--lr_warmup_steps=0", f"--max_train_steps={steps}"]
    if prior_dir:
        argv += ["--with_prior_preservation", "--prior_loss_weight=1.0", f"--class_data_dir={prior_dir}",
                 "--class_prompt=a photo of dog", "--num_class_images=8"]
    return argv


def make_tiny_job(folder: str) -> tuple:
    """The tiny job both trainers run: a tiny random SD folder and the made-up subject's five square photos."""
    from made_up_subject import draw_subject
    from ppdreambooth.families.tiny import build_tiny_pipeline

    model, photos = os.path.join(folder, "tiny-sd"), os.path.join(folder, "photos")
    build_tiny_pipeline(model)
    os.makedirs(photos)
    for i in range(5):
        draw_subject(i).save(os.path.join(photos, f"{i}.png"))
    return model, photos


def timed(command: list) -> float:
    start = time.time()
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])} failed:\n{result.stderr[-3000:]}")
    return time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed_script", required=True, help="ppdiffusers' examples/dreambooth/train_dreambooth.py")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = [("seed command, 1 step", 1, False), ("seed command, 121 steps", 121, False),
            ("prior preservation (8 class images), 1 step", 1, True)]
    times = {(name, tool): [] for name, _, _ in rows for tool in ("seed script", "ppdreambooth")}
    with tempfile.TemporaryDirectory() as tmp:
        model, photos = make_tiny_job(tmp)
        for repeat in range(args.repeats):
            for name, steps, prior in rows:
                for tool in ("seed script", "ppdreambooth"):
                    out = tempfile.mkdtemp(dir=tmp)
                    flags = seed_command(model, photos, os.path.join(out, "out"), steps,
                                         os.path.join(out, "class") if prior else None)
                    program = [args.seed_script] if tool == "seed script" else ["-m", "ppdreambooth.train"]
                    times[(name, tool)].append(timed([sys.executable, "-u", *program, *flags]))
    lines = [f"| run (median of {args.repeats}, seconds) | seed script | ppdreambooth | ppdreambooth / seed |",
             "| --- | --- | --- | --- |"]
    for name, _, _ in rows:
        seed, ours = statistics.median(times[(name, "seed script")]), statistics.median(times[(name, "ppdreambooth")])
        lines.append(f"| {name} | {seed:.1f} | {ours:.1f} | {ours / seed:.2f} |")
    generation = {}
    for tool in ("seed script", "ppdreambooth"):  # the prior row's extra time is generating the 8 class images
        extra = statistics.median(times[(rows[2][0], tool)]) - statistics.median(times[(rows[0][0], tool)])
        generation[tool] = 8 / extra if extra > 0 else float("nan")
    lines.append(f"| class images/s (8 / (prior row - 1-step row)) | {generation['seed script']:.2f} | "
                 f"{generation['ppdreambooth']:.2f} | {generation['seed script'] / generation['ppdreambooth']:.2f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
