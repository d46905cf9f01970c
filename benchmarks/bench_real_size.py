"""Host memory and time of training at the real architectures (random weights), phase by phase, against the floor.

    python benchmarks/real_size_models.py /work/realsize-models --family sd15 sdxl sd3     # once, ~30 s per model
    python benchmarks/bench_real_size.py --models /work/realsize-models --family sd15 --mode lora full \\
        [--recompute off on] [--resolutions 64 128] [--steps 4] [--resume] [--seed_script train_dreambooth.py]
    python benchmarks/bench_real_size.py --curve [--counts 10 100 1000]        # start-up/caching vs image count
    python benchmarks/bench_real_size.py --step_curve [--batches 1 2 4 8] [--concepts 1 2 4]   # step time vs work

Each configuration trains `--steps` steps with `python -m ppdreambooth.train` in a fresh process (the seed README's
first command, batch 1, the made-up subject's photos), writing a checkpoint at step 2; `--resume` then continues
from it for one more step in a second process. The trainer writes a phase marker when each phase ends
(`ppdreambooth.runtime.phases`, on with PPDB_PHASE_LOG): the peak resident memory of that phase alone (the kernel's
VmHWM, reset at every marker) and the time. Phases: start-up (imports, checks), load, dataset, caching, trainer
set-up (optimizer state loaded on resume), first step (creates AdamW's moments), steps, checkpoint save, final save.

The floor is what training must hold, from the model the trainer holds (reported by the run): every weight held
(4 bytes, float32) + gradient and two AdamW moments of every trained weight (12 bytes). Ratios above 1.3 are
explained in the README (activations at this resolution are small; the rest is named there).
The seed script (`train_dreambooth.py` from PaddleMIX, given by path) runs the same command on SD 1.5 full for its
peak (`/usr/bin/time`-like, via wait4) and its s/it (tqdm's rate): only when `--seed_script` is given.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

GB = 1024**3


def train_command(model: str, photos: str, out: str, mode: str, resolution: int, steps: int, recompute: bool,
                  checkpoint_every: int = 2, resume: bool = False, precision: str = "fp32") -> list:
    argv = [sys.executable, "-m", "ppdreambooth.train", f"--pretrained_model_name_or_path={model}",
            f"--instance_data_dir={photos}", f"--output_dir={out}", "--instance_prompt=a photo of sks dog",
            f"--resolution={resolution}", "--train_batch_size=1", "--lr_scheduler=constant", "--lr_warmup_steps=0",
            f"--max_train_steps={steps}", f"--checkpointing_steps={checkpoint_every}",
            "--learning_rate=" + ("1e-4" if mode == "lora" else "5e-6")]
    if mode == "lora":
        argv += ["--use_lora", "--lora_rank=4"]
    if recompute:
        argv.append("--gradient_checkpointing")
    if precision != "fp32":
        argv.append(f"--mixed_precision={precision}")
    if resume:
        argv.append("--resume_from_checkpoint=latest")
    return argv


def run_marked(argv: list, log: str) -> tuple:
    """Run a training command with phase markers; returns (marks, wall seconds, process start time)."""
    marks = log + ".phases"
    if os.path.exists(marks):
        os.remove(marks)
    env = dict(os.environ, PYTHONPATH=ROOT, PPDB_PHASE_LOG=marks, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS",
                                                                                                   "1"))
    start = time.time()
    with open(log, "w") as out:
        code = subprocess.call(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    wall = time.time() - start
    if code != 0:
        with open(log) as f:
            raise SystemExit(f"training failed ({code}), see {log}:\n{f.read()[-3000:]}")
    from ppdreambooth.runtime.phases import read_marks

    return read_marks(marks), wall, start


def phase_table(marks: list, start: float) -> dict:
    """Per phase name: the largest peak, and the durations; plus the held/trained parameter counts."""
    peaks, durations, previous = {}, {}, start
    info = {}
    for record in marks:
        name = record["phase"]
        peaks[name] = max(peaks.get(name, 0), record["peak"])
        durations.setdefault(name, []).append(record["time"] - previous)
        previous = record["time"]
        if "held_parameters" in record:
            info = {k: record[k] for k in ("held_parameters", "trained_parameters")}
    first = next((r["time"] for r in marks if r["phase"] == "first step"), None)
    return {"peaks": peaks, "durations": durations, "to_first_step": (first - start) if first else None, **info}


def floor_bytes(held: int, trained: int) -> int:
    """4 B per weight held + gradient and two AdamW moments (12 B) per trained weight. The same under bf16: these
    runs pass `--mixed_precision bf16` alone, i.e. `--fp16_opt_level O1` (autocast; the level a CPU runs), which
    keeps every weight in float32 and casts activations only (O2 would hold 2 B per weight + 16 B per trained
    weight, on a GPU)."""
    return 4 * held + 12 * trained


def measure(model: str, photos: str, mode: str, resolution: int, steps: int, recompute: bool, resume: bool,
            work: str, precision: str = "fp32") -> dict:
    from ppdreambooth.runtime.checkpoints import verify_checkpoint

    out = os.path.join(work, f"{os.path.basename(model)}-{mode}-{resolution}-{int(recompute)}-{precision}")
    shutil.rmtree(out, ignore_errors=True)
    marks, wall, start = run_marked(train_command(model, photos, out, mode, resolution, steps, recompute,
                                                  precision=precision), out + ".log")
    row = phase_table(marks, start)
    row.update(model=os.path.basename(model), mode=mode, resolution=resolution, recompute=recompute, wall=wall,
               precision=precision)
    checkpoint = os.path.join(out, "checkpoint-2")
    row["checkpoint_bytes"] = sum(os.path.getsize(os.path.join(checkpoint, f)) for f in os.listdir(checkpoint))
    t = time.time()
    row["checkpoint_verified"] = verify_checkpoint(checkpoint).verified
    row["verify_seconds"] = time.time() - t
    steps_only = row["durations"].get("step", [])
    row["seconds_per_step"] = statistics.median(steps_only) if steps_only else None
    if resume:
        shutil.rmtree(os.path.join(out, f"checkpoint-{steps}"), ignore_errors=True)
        marks, _, start = run_marked(train_command(model, photos, out, mode, resolution, steps + 1, recompute,
                                                   checkpoint_every=1000, resume=True, precision=precision),
                                     out + ".resume.log")
        resumed = phase_table(marks, start)
        row["resume_peak"] = max(resumed["peaks"].get(p, 0) for p in ("resume: weights", "trainer set-up"))
        row["resume_to_first_step"] = resumed["to_first_step"]
    shutil.rmtree(out, ignore_errors=True)
    return row


def seed_script_row(script: str, model: str, photos: str, resolution: int, steps: int, work: str) -> dict:
    """The seed script's whole-run peak (wait4's ru_maxrss) and its tqdm s/it."""
    out = os.path.join(work, "seed-out")
    shutil.rmtree(out, ignore_errors=True)
    argv = [sys.executable, "-u", script, f"--pretrained_model_name_or_path={model}", f"--instance_data_dir={photos}",
            f"--output_dir={out}", "--instance_prompt=a photo of sks dog", f"--resolution={resolution}",
            "--train_batch_size=1", "--gradient_accumulation_steps=1", "--learning_rate=5e-6",
            "--lr_scheduler=constant", "--lr_warmup_steps=0", f"--max_train_steps={steps}"]
    start = time.time()
    with open(out + ".log", "w") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=ROOT))
        _, status, usage = os.wait4(process.pid, 0)
    with open(out + ".log") as f:
        text = f.read()
    if status != 0:
        raise SystemExit(f"seed script failed, see {out}.log:\n{text[-3000:]}")
    rates = re.findall(r"([0-9.]+)s/it", text)
    shutil.rmtree(out, ignore_errors=True)
    return {"model": os.path.basename(model), "mode": "full (seed script)", "resolution": resolution,
            "peak": usage.ru_maxrss * 1024, "seconds_per_step": float(rates[-1]) if rates else None,
            "wall": time.time() - start}


def gb(value) -> str:
    return "" if value is None else f"{value / GB:.2f}"


def seconds(value) -> str:
    return "" if value is None else f"{value:.1f}"


def format_rows(rows: list) -> str:
    lines = ["Peak resident memory per phase, GiB (2^30 bytes); floor = 4 B x weights held + 12 B x trained weights",
             "", "| model | mode | res | recompute | load | caching | first step | steady step | checkpoint save | "
             "resume | floor (steady) | steady / floor | s/step | start-up to step 1 (s) | checkpoint GiB | "
             "write / verify (s) |", "|" + " --- |" * 16]
    for r in rows:
        if "peaks" not in r:  # the seed script: its whole-run peak only
            lines.append(f"| {r['model']} | {r['mode']} | {r['resolution']} | off | | | | {gb(r['peak'])} (whole run) "
                         f"| | | | | {seconds(r['seconds_per_step'])} | | | |")
            continue
        p = r["peaks"]
        floor = floor_bytes(r.get("held_parameters", 0), r.get("trained_parameters", 0))
        steady = max(p.get("step", 0), p.get("first step", 0) if "step" not in p else 0)
        write = statistics.median(r["durations"].get("checkpoint save", [0]))
        lines.append(
            f"| {r['model']} | {r['mode']}{'' if r.get('precision', 'fp32') == 'fp32' else ', ' + r['precision'] + ' O1'} | "
            f"{r['resolution']} | {'on' if r['recompute'] else 'off'} | "
            f"{gb(p.get('load'))} | {gb(p.get('caching'))} | {gb(p.get('first step'))} | {gb(steady)} | "
            f"{gb(p.get('checkpoint save'))} | {gb(r.get('resume_peak'))} | {gb(floor)} | "
            f"{steady / floor:.2f} | {seconds(r['seconds_per_step'])} | {seconds(r['to_first_step'])} | "
            f"{gb(r['checkpoint_bytes'])} | {write:.1f} / {r['verify_seconds']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="/work/realsize-models", help="folder of real_size_models.py's output")
    parser.add_argument("--family", nargs="+", default=["sd15"], help="sd15 sd21 sdxl sd3")
    parser.add_argument("--layout", default="ppdiffusers", choices=["ppdiffusers", "diffusers"])
    parser.add_argument("--mode", nargs="+", default=["lora"], choices=["lora", "full"])
    parser.add_argument("--recompute", nargs="+", default=["off"], choices=["off", "on"])
    parser.add_argument("--resolutions", nargs="+", type=int, default=[64])
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--resume", action="store_true", help="also resume from checkpoint-2 (a second process)")
    parser.add_argument("--seed_script", help="PaddleMIX's train_dreambooth.py: also run it on SD 1.5 full")
    parser.add_argument("--json", help="append the raw rows to this file")
    parser.add_argument("--curve", action="store_true", help="start-up and caching against the number of images")
    parser.add_argument("--counts", nargs="+", type=int, default=[10, 100, 1000])
    parser.add_argument("--step_curve", action="store_true",
                        help="seconds per steady step against the batch size and the number of concepts")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--concepts", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--curve_steps", type=int, default=22, help="--step_curve: steps per setting")
    parser.add_argument("--curve_warmup", type=int, default=2, help="--step_curve: first steps left out")
    args = parser.parse_args()
    if args.step_curve:
        from step_curve import print_step_curve

        print_step_curve(args.batches, args.concepts, args.curve_steps, args.curve_warmup)
        return
    if args.curve:
        from startup_curve import print_curve

        print_curve(args.counts)
        return
    work = tempfile.mkdtemp(prefix="bench-real-size-")
    photos = os.path.join(work, "photos")
    from made_up_subject import draw_subject

    os.makedirs(photos)
    for i in range(5):
        draw_subject(i).save(os.path.join(photos, f"{i}.png"))
    rows = []
    for family in args.family:
        model = os.path.join(args.models, f"{family}-{args.layout}")
        for mode in args.mode:
            for precision in args.precision:
                for recompute in args.recompute:
                    for resolution in args.resolutions:
                        rows.append(measure(model, photos, mode, resolution, args.steps, recompute == "on",
                                            args.resume, work, precision))
                        print(format_rows(rows[-1:]).splitlines()[-1], flush=True)
        if args.seed_script and family == "sd15":
            rows.append(seed_script_row(args.seed_script, model, photos, args.resolutions[0], args.steps, work))
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    print(format_rows(rows))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
