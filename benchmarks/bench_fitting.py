"""How fast the subject is learnt: ppdreambooth against the plain training loop, at equal settings.

    python benchmarks/bench_fitting.py [--seeds 0 1 2] [--steps 60] [--out benchmarks/results]

The job of issue 15: a tiny random SD pipeline, five 96x96 instance photos (the demo's toy), 64 px, batch 1, learning rate
1e-3, constant schedule, no warmup. The plain loop (`tests/helpers/reference_loop.py`) is what the seed's
`train_dreambooth.py` does per step (with `--noise_offset 0`), including its data order (a fresh shuffle
per epoch) and its AdamW (weight decay 1e-2 on every weight, gradients clipped to norm 1). Each run is a
fresh process. Printed per run: the training loss averaged over the last ten steps, and the instance
denoising error after training divided by the base model's: the UNet's epsilon MSE on the instance
photos (VAE latent means, fixed noise, t in {50, 200, 400, 600, 800}, the instance prompt).
"ppdreambooth, no clipping" is the step as it was before issue 15 (`--max_grad_norm 0`), for contrast.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
PROMPT = "a photo of sks dog"
RESOLUTION, PHOTO_SIZE, NUM_PHOTOS = 64, 96, 5
EVAL_TIMESTEPS = (50, 200, 400, 600, 800)
RUNS = {  # name -> extra ppdreambooth flags, or None for the plain loop
    "plain loop (seed script, --noise_offset 0)": None,
    "ppdreambooth": [],
    "ppdreambooth, no clipping (before issue 15)": ["--max_grad_norm", "0"],
}


def make_assets(folder: str):
    from made_up_subject import draw_subject
    from ppdreambooth.families.tiny import build_tiny_pipeline

    model = os.path.join(folder, "tiny-sd")
    build_tiny_pipeline(model)
    photos = os.path.join(folder, "photos")
    os.makedirs(photos)
    for i in range(NUM_PHOTOS):  # the made-up subject: a striped toy on five backgrounds
        draw_subject(i, size=PHOTO_SIZE).save(os.path.join(photos, f"{i}.png"))
    return model, photos


def photo_pixels(photos: str):
    """The photos as the seed script feeds them: resized to the training size, in [-1, 1], NCHW."""
    import numpy as np
    from PIL import Image

    arrays = []
    for name in sorted(os.listdir(photos)):
        image = Image.open(os.path.join(photos, name)).convert("RGB").resize((RESOLUTION, RESOLUTION), Image.BILINEAR)
        arrays.append((np.asarray(image, dtype=np.float32) / 127.5 - 1.0).transpose(2, 0, 1))
    return np.stack(arrays)


def denoising_error(model_path: str, unet, photos: str) -> float:
    import numpy as np
    import paddle

    from helpers.reference_loop import load_plain

    with paddle.utils.unique_name.guard():
        tokenizer, text_encoder, vae, _, scheduler = load_plain(model_path)
    pixels = paddle.to_tensor(photo_pixels(photos))
    ids = tokenizer(PROMPT, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pd").input_ids
    unet.eval()
    errors = []
    with paddle.no_grad():
        latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
        hidden = text_encoder(ids.tile([latents.shape[0], 1]))[0]
        noise = paddle.to_tensor(np.random.RandomState(1234).standard_normal(latents.shape).astype(np.float32))
        for t in EVAL_TIMESTEPS:
            steps = paddle.full([latents.shape[0]], t, dtype="int64")
            pred = unet(scheduler.add_noise(latents, noise, steps), steps, hidden).sample
            errors.append(float(((pred - noise) ** 2).mean()))
    return float(np.mean(errors))


def worker(model: str, photos: str, workdir: str, seed: int, steps: int, extra) -> dict:
    import numpy as np

    from helpers.reference_loop import load_plain, train_plain

    if extra is None:
        pixels = photo_pixels(photos)
        rng = np.random.RandomState(seed)
        order = []
        while len(order) < steps:  # one shuffle per epoch, as the seed script's shuffling sampler
            order += rng.permutation(len(pixels)).tolist()
        unet, losses = train_plain(model, PROMPT, (pixels[i : i + 1] for i in order[:steps]), 1e-3, seed)
    else:
        from ppdreambooth.config.parsing import parse_args
        from ppdreambooth.train import run

        argv = ["--pretrained_model_name_or_path", model, "--instance_data_dir", photos, "--instance_prompt", PROMPT,
                "--output_dir", os.path.join(workdir, "out"), "--resolution", str(RESOLUTION),
                "--train_batch_size", "1", "--learning_rate", "1e-3", "--lr_scheduler", "constant",
                "--lr_warmup_steps", "0", "--max_train_steps", str(steps), "--seed", str(seed),
                "--logging_steps", "1", "--save_steps", "100000", "--report_to", "none", "--disable_tqdm", "true",
                *extra]
        trainer = run(*parse_args(argv))
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        unet = trainer.model.unet
    import paddle

    with paddle.utils.unique_name.guard():
        base = load_plain(model)[3]
    return {"last10_loss": float(np.mean(losses[-10:])),
            "error_ratio": denoising_error(model, unet, photos) / denoising_error(model, base, photos)}


def spawn(*args) -> dict:
    result = subprocess.run([sys.executable, __file__, "--worker", json.dumps(args)], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    if result.returncode != 0:
        raise SystemExit(f"worker failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*json.loads(args.worker))))
        return
    results = {name: [] for name in RUNS}
    with tempfile.TemporaryDirectory() as tmp:
        model, photos = make_assets(tmp)
        for seed in args.seeds:  # alternate the runs seed by seed, so machine noise hits all alike
            for name, extra in RUNS.items():
                results[name].append(spawn(model, photos, tempfile.mkdtemp(dir=tmp), seed, args.steps, extra))
    lines = [f"| run (seeds {', '.join(map(str, args.seeds))}) | training loss, mean of the last 10 of {args.steps} "
             "steps | instance denoising error, tuned/base (mean) |", "| --- | --- | --- |"]
    for name, rows in results.items():
        losses = " / ".join(f"{r['last10_loss']:.3f}" for r in rows)
        ratios = [r["error_ratio"] for r in rows]
        lines.append(f"| {name} | {losses} | {' / '.join(f'{x:.3f}' for x in ratios)} "
                     f"({sum(ratios) / len(ratios):.3f}) |")
    markdown = "\n".join(lines) + "\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fitting.json"), "w") as f:
        json.dump({"seeds": args.seeds, "steps": args.steps, "results": results}, f, indent=2)
    with open(os.path.join(args.out, "fitting.md"), "w") as f:
        f.write(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
