"""Wall time of the seed README's commands: ppdreambooth against ppdiffusers' own `train_dreambooth.py`.

    python benchmarks/bench_seed_script.py --seed_script /path/to/train_dreambooth.py [--repeats 3]

The seed script is not part of this repository: take it from PaddleMIX (`ppdiffusers/examples/dreambooth/
train_dreambooth.py`, e.g. `git clone --depth 1 https://github.com/PaddlePaddle/PaddleMIX`). Both run the
seed README's command lines unchanged except for a tiny random SD model (ppdreambooth.families.tiny), the demo's five
square photos, `--resolution 64` and the step count, each in a fresh process, alternating seed script and
ppdreambooth so machine noise hits both alike; the table shows medians. Rows: the first command at 1 step
(start-up, model loading, set-up) and at 121 steps; the prior-preservation command (8 class images to
generate, DPM-Solver 25 steps in ppdreambooth, the pipeline's default sampler in the seed script) at 1 step.
Each cell also has the run's peak resident memory (the child's own ru_maxrss), and the cost of a step is the
difference of the two step counts' times over their step difference (start-up and the final save cancel out).

At real size (SD 1.5 full fine-tune with random weights, issue 25), alternating as above:

    python benchmarks/real_size_models.py /work/realsize-models --family sd15
    python benchmarks/bench_seed_script.py --seed_script train_dreambooth.py \
        --model /work/realsize-models/sd15-ppdiffusers --steps 1 4 --repeats 2
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def seed_command(model: str, photos: str, out: str, steps: int, prior_dir: str = None, resolution: int = 64) -> list:
    """The seed README's command (1.2.2), or its prior-preservation variant, on the tiny job."""
    argv = [f"--pretrained_model_name_or_path={model}", f"--instance_data_dir={photos}", f"--output_dir={out}",
            "--instance_prompt=a photo of sks dog", f"--resolution={resolution}", "--train_batch_size=1",
            "--gradient_accumulation_steps=1", "--learning_rate=5e-6", "--lr_scheduler=constant",
            "--lr_warmup_steps=0", f"--max_train_steps={steps}"]
    if prior_dir:
        argv += ["--with_prior_preservation", "--prior_loss_weight=1.0", f"--class_data_dir={prior_dir}",
                 "--class_prompt=a photo of dog", "--num_class_images=8"]
    return argv


def make_tiny_job(folder: str, model: str = None) -> tuple:
    """The job both trainers run: `model` (default: a tiny random SD folder) and the made-up subject's five square
    photos."""
    from made_up_subject import draw_subject
    from ppdreambooth.families.tiny import build_tiny_pipeline

    photos = os.path.join(folder, "photos")
    if model is None:
        model = os.path.join(folder, "tiny-sd")
        build_tiny_pipeline(model)
    os.makedirs(photos)
    for i in range(5):
        draw_subject(i).save(os.path.join(photos, f"{i}.png"))
    return model, photos


def timed(command: list, log: str) -> tuple:
    """(wall seconds, peak resident GiB) of one run; os.wait4 gives that child's own peak (ru_maxrss, KiB)."""
    start = time.time()
    with open(log, "w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=ROOT))
        _, status, usage = os.wait4(child.pid, 0)
    seconds = time.time() - start
    if status != 0:
        with open(log, encoding="utf-8", errors="replace") as f:
            raise SystemExit(f"{' '.join(command[:3])} failed:\n{f.read()[-3000:]}")
    return seconds, usage.ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed_script", required=True, help="ppdiffusers' examples/dreambooth/train_dreambooth.py")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default=None, help="a pipeline folder to train instead of the tiny SD model (e.g. "
                        "benchmarks/real_size_models.py's sd15-ppdiffusers); then no prior-preservation row")
    parser.add_argument("--steps", type=int, nargs=2, default=(1, 121), metavar=("SHORT", "LONG"),
                        help="the two step counts; their time difference / (LONG - SHORT) is the cost of a step")
    parser.add_argument("--resolution", type=int, default=64)
    args = parser.parse_args()
    short, long = args.steps
    rows = [(f"seed command, {short} step(s)", short, False), (f"seed command, {long} steps", long, False)]
    if args.model is None:
        rows.append(("prior preservation (8 class images), 1 step", 1, True))
    runs = {(name, tool): [] for name, _, _ in rows for tool in ("seed script", "ppdreambooth")}
    with tempfile.TemporaryDirectory() as tmp:
        model, photos = make_tiny_job(tmp, args.model)
        for repeat in range(args.repeats):
            for name, steps, prior in rows:
                for tool in ("seed script", "ppdreambooth"):
                    out = tempfile.mkdtemp(dir=tmp)
                    flags = seed_command(model, photos, os.path.join(out, "out"), steps,
                                         os.path.join(out, "class") if prior else None, args.resolution)
                    program = [args.seed_script] if tool == "seed script" else ["-m", "ppdreambooth.train"]
                    runs[(name, tool)].append(timed([sys.executable, "-u", *program, *flags],
                                                    os.path.join(out, "run.log")))
                    print(f"repeat {repeat}, {name}, {tool}: {runs[(name, tool)][-1][0]:.1f} s, "
                          f"peak {runs[(name, tool)][-1][1]:.2f} GiB", flush=True)
                    shutil.rmtree(os.path.join(out, "out"), ignore_errors=True)  # real-size runs write GBs

    def median(name, tool, index=0):
        return statistics.median(r[index] for r in runs[(name, tool)])

    lines = [f"| run (median of {args.repeats}) | seed script | ppdreambooth | ppdreambooth / seed |",
             "| --- | --- | --- | --- |"]
    for name, _, _ in rows:
        seed, ours = median(name, "seed script"), median(name, "ppdreambooth")
        lines.append(f"| {name}, s | {seed:.1f} | {ours:.1f} | {ours / seed:.2f} |")
        seed, ours = median(name, "seed script", 1), median(name, "ppdreambooth", 1)
        lines.append(f"| {name}, peak resident GiB | {seed:.2f} | {ours:.2f} | {ours / seed:.2f} |")
    step = {tool: (median(rows[1][0], tool) - median(rows[0][0], tool)) / (long - short)
            for tool in ("seed script", "ppdreambooth")}
    lines.append(f"| s per step ((long - short) / {long - short}) | {step['seed script']:.2f} | "
                 f"{step['ppdreambooth']:.2f} | {step['ppdreambooth'] / step['seed script']:.2f} |")
    if args.model is None:  # the prior row's extra time is generating the 8 class images
        generation = {}
        for tool in ("seed script", "ppdreambooth"):
            extra = median(rows[2][0], tool) - median(rows[0][0], tool)
            generation[tool] = 8 / extra if extra > 0 else float("nan")
        lines.append(f"| class images/s (8 / (prior row - 1-step row)) | {generation['seed script']:.2f} | "
                     f"{generation['ppdreambooth']:.2f} | {generation['seed script'] / generation['ppdreambooth']:.2f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
