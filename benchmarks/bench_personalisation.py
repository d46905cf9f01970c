"""DreamBooth's trade-off, measured exactly in the toy world: subject fidelity, prompt fidelity, language drift and
background leakage for the settings DreamBooth's users argue about, over several training seeds.

    python benchmarks/bench_personalisation.py [--seeds 3] [--first_seed 0] [--jobs 2] [--only full-prior,lora-none] [--steps 300]

Every run trains the shipped toy-world model (`ppdreambooth/toyworld/models/sd`) on the five photos of the toy
subject (a red-and-white striped cross) with `configs/demo.json` plus the setting's flags, in a fresh process,
then `python -m ppdreambooth.evaluate --world` generates the world's 4 subject prompts and 8 plain class prompts
(--images per prompt, fixed image seeds) and scores them. The base model is scored once with the same prompts
and seeds. Prints one row per setting: the mean over training seeds and, in brackets, the lowest and highest.
An EXTRACTED setting trains its full fine-tune setting, extracts a LoRA from it (`python -m ppdreambooth.export <run>
--format lora --rank R`) and prints two rows: the full run's scores and the extracted LoRA's.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ppdreambooth.demo import DEMO_CONFIG, TOY_MODEL, prepare_photos  # noqa: E402
from ppdreambooth.evaluation.world import WORLD_METRICS  # noqa: E402

PRIOR = ["--with_prior_preservation", "true"]
NO_PRIOR = ["--with_prior_preservation", "false"]
# LoRA's rate: 20x the full fine-tune's, the ratio of the usual SD 1.5 rates (1e-4 vs 5e-6)
LORA = ["--use_lora", "true", "--lora_rank", "8", "--learning_rate", "{lora_lr}"]
MASKED = ["--masked_loss", "--instance_mask_dir", "{masks}"]
# name -> flags on top of configs/demo.json (full fine-tuning, text encoder trained, class-image prior preservation)
SETTINGS = {
    "full-prior": PRIOR,
    "full-none": NO_PRIOR,
    "full-prior-frozen-text-encoder": PRIOR + ["--train_text_encoder", "false"],
    "full-prior-2x-steps": PRIOR + ["--max_train_steps", "{2x}"],
    "full-none-2x-steps": NO_PRIOR + ["--max_train_steps", "{2x}"],
    "full-prior-2x-steps-weight-3": PRIOR + ["--max_train_steps", "{2x}", "--prior_loss_weight", "3"],
    # class images from a full caption, which the toy model draws as plain crosses (it draws noise for "a cross")
    "full-prior-2x-steps-captioned-class": PRIOR + ["--max_train_steps", "{2x}",
                                                    "--class_prompt", "a red cross on a black background"],
    "full-prior-half-lr": PRIOR + ["--learning_rate", "{half_lr}"],
    "full-prior-3x-lr": PRIOR + ["--learning_rate", "{3x_lr}"],
    "full-none-3x-lr": NO_PRIOR + ["--learning_rate", "{3x_lr}"],
    "lora-prior": LORA + PRIOR,
    "lora-base-prediction": LORA + PRIOR + ["--prior_preservation_mode", "base_prediction",
                                            "--train_text_encoder", "false"],
    "lora-none": LORA + NO_PRIOR,
    # the likeness levers (issues 23, 24)
    "full-prior-masked": PRIOR + MASKED,
    "full-prior-prodigy": PRIOR + ["--optim", "prodigy", "--learning_rate", "1.0"],
    "full-prior-adamw-8bit": PRIOR + ["--optim", "adamw_8bit"],
    "full-prior-schedule-free": PRIOR + ["--optim", "adamw_schedulefree"],
    "lora-none-lokr": LORA + NO_PRIOR + ["--lora_type", "lokr"],
    # LoCon: LoRA on the attention projections plus the resnets' 3x3 convolutions at the same rank
    "lora-none-locon": LORA + NO_PRIOR + ["--conv_rank", "8"],
    # where adapters go (same rank, rate, steps): attention only (the default) vs + feed-forward vs every linear layer
    "lora-none-attn-ff": LORA + NO_PRIOR + ["--lora_layers", "attn_ff"],
    "lora-none-all-linear": LORA + NO_PRIOR + ["--lora_layers", "all_linear"],
    "lora-none-dora": LORA + NO_PRIOR + ["--lora_type", "dora"],
    "full-prior-min-snr": PRIOR + ["--snr_gamma", "5"],
    "full-prior-huber": PRIOR + ["--loss_type", "huber", "--huber_schedule", "snr"],
    "full-prior-caption-dropout": PRIOR + ["--caption_dropout_rate", "0.1"],
    "full-prior-ip-noise": PRIOR + ["--ip_noise_gamma", "0.1"],
    "full-prior-multires-noise": PRIOR + ["--multires_noise_iterations", "6", "--multires_noise_discount", "0.3"],
    "full-prior-debiased": PRIOR + ["--debiased_estimation_loss"],
    "full-prior-noise-offset": PRIOR + ["--noise_offset", "0.05"],
    "full-prior-pivotal": PRIOR + ["--train_text_encoder_ti", "true"],
    # one new token keeps the toy captions' one-word look ('a sks cross'); two make a two-word look no caption has
    "full-prior-pivotal-1-token": PRIOR + ["--train_text_encoder_ti", "true", "--num_new_tokens_per_abstraction", "1"],
    "full-prior-pivotal-1-token-from-cross": PRIOR + ["--train_text_encoder_ti", "true",
                                                      "--num_new_tokens_per_abstraction", "1",
                                                      "--initializer_concept", "cross"],
    "lora-none-loha": LORA + NO_PRIOR + ["--lora_type", "loha"],
    # every photo on the same background (blue), as when all are taken in one room: where background leakage shows
    "full-none-one-background": NO_PRIOR + ["--max_train_steps", "{2x}"],
    "full-none-one-background-masked": NO_PRIOR + ["--max_train_steps", "{2x}"] + MASKED,
}
# settings whose photos are not the subject's usual ones (black and blue in turn): name -> photo backgrounds
PHOTO_BACKGROUNDS = {"full-none-one-background": ("blue",), "full-none-one-background-masked": ("blue",)}

# name -> (the full fine-tune setting, rank): that run, then `export --format lora --rank` of it; scored beside it
EXTRACTED = {
    "full-prior-extracted-lora-r8": ("full-prior", 8),
}


def demo_value(key):
    with open(DEMO_CONFIG, encoding="utf-8") as f:
        return json.load(f)[key]


def run(argv, log, threads=None):
    started = time.time()
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}))
    result = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, env=env)
    with open(log, "w") as f:
        f.write(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(argv)}\n{result.stderr[-3000:]}")
    return time.time() - started


def evaluate(model, photos, out, images, threads=None, base=False):
    """The world's four scores of `model` (and, with `base`, of the toy model itself: its `trained` column)."""
    run(["-m", "ppdreambooth.evaluate", "--world", "--model", model, "--instance_data_dir", photos, "--no_base",
         "--num_images", str(images), "--guidance_scale", "4", "--out", out, "--quiet"], out + ".log", threads)
    with open(os.path.join(out, "metrics.json"), encoding="utf-8") as f:
        return json.load(f)["metrics"]["trained"]


def photo_folders(work, backgrounds=None):
    """(photos, masks) folders under `work` for the subject's photos on `backgrounds` (default: its own)."""
    suffix = "-" + "-".join(backgrounds) if backgrounds else ""
    photos, masks = os.path.join(work, "photos" + suffix), os.path.join(work, "masks" + suffix)
    prepare_photos(photos, masks, backgrounds)  # the masks are exact: the renderer's object masks
    return photos, masks


def train_and_score(name, seed, steps, work, images, threads):
    """One training run of a setting (its own class-image folder: runs may go in parallel) and its scores, as
    {row: scores}; an EXTRACTED setting gives two rows, its full run's and the extracted LoRA's."""
    photos, masks = photo_folders(work, PHOTO_BACKGROUNDS.get(name))
    out = os.path.join(work, f"{name.split(' ')[0]}-seed{seed}")
    source, rank = EXTRACTED.get(name, (name, None))
    flags = [f.replace("{2x}", str(2 * steps)).replace("{half_lr}", str(demo_value("learning_rate") / 2))
             .replace("{3x_lr}", str(3 * demo_value("learning_rate")))
             .replace("{lora_lr}", str(20 * demo_value("learning_rate")))
             .replace("{masks}", masks) for f in SETTINGS[source]]
    argv = ["-m", "ppdreambooth.train", DEMO_CONFIG, "--output_dir", out, "--seed", str(seed),
            "--instance_data_dir", photos, "--class_data_dir", out + "-class", "--max_train_steps", str(steps),
            "--checkpointing_steps", str(10 * steps), "--report_to", "none", *flags]
    seconds = run(argv, out + ".train.log", threads)
    scores = {source if rank is None else f"{name}: its {source} run": evaluate(out, photos, out + "-eval", images,
                                                                              threads)}
    if rank is not None:
        run(["-m", "ppdreambooth.export", out, "--format", "lora", "--rank", str(rank), "--out", out + "-lora"],
            out + ".extract.log", threads)
        scores[name] = evaluate(out + "-lora", photos, out + "-lora-eval", images, threads)  # its card names the base
    return scores, seconds


def summary(values):
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    mean = sum(values) / len(values)
    return f"{mean:.2f} [{min(values):.2f}-{max(values):.2f}]" if len(values) > 1 else f"{mean:.2f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per setting")
    parser.add_argument("--first_seed", type=int, default=0, help="the seeds are first_seed .. first_seed+seeds-1 "
                        "(more seeds for settings already run)")
    parser.add_argument("--images", type=int, default=4, help="images per prompt")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: configs/demo.json's)")
    parser.add_argument("--only", default=None, help="comma-separated setting names (default: all)")
    parser.add_argument("--work", default=None, help="keep the runs in this folder (default: a temporary one)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each then on one thread)")
    args = parser.parse_args()
    steps = args.steps or demo_value("max_train_steps")
    every = [*SETTINGS, *EXTRACTED]
    names = [n for n in every if n.split(" ")[0] in args.only.split(",")] if args.only else every
    work = args.work or tempfile.mkdtemp(prefix="bench-personalisation-")
    photos, _ = photo_folders(work)
    for backgrounds in {PHOTO_BACKGROUNDS[n] for n in names if n in PHOTO_BACKGROUNDS}:
        photo_folders(work, backgrounds)  # written once, before the parallel runs read them
    threads = 1 if args.jobs > 1 else None
    rows = {"base model": [evaluate(TOY_MODEL, photos, os.path.join(work, "base"), args.images, threads)]}
    seconds = {}
    jobs = [(name, seed) for name in names for seed in range(args.first_seed, args.first_seed + args.seeds)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {job: pool.submit(train_and_score, *job, steps, work, args.images, threads)
                   for job in jobs}
        for (name, seed), future in futures.items():
            by_row, took = future.result()
            seconds.setdefault(name, []).append(took)
            for row, scores in by_row.items():
                rows.setdefault(row, []).append(scores)
                print(f"{row} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items())
                      + f" ({took:.0f} s)", flush=True)
    print(f"\n{args.seeds} training seeds ({args.first_seed}-{args.first_seed + args.seeds - 1}), {steps} steps, {args.images} images per prompt "
          f"(4 subject + 8 class prompts); mean [lowest-highest] over seeds\n")
    keys = [key for key, _, _ in WORLD_METRICS]
    print("| setting | " + " | ".join(label for _, label, _ in WORLD_METRICS) + " | train s |")
    print("| --- |" + " --- |" * (len(keys) + 1))
    for name, results in rows.items():
        cells = [summary([r[key] for r in results]) for key in keys]
        time_cell = summary(seconds[name]).split(" ")[0] if name in seconds else ""
        print(f"| {name} | " + " | ".join(cells) + f" | {time_cell} |")


if __name__ == "__main__":
    main()
