"""Training speed and memory against the floor, on a fixed tiny configuration (CPU).

    python benchmarks/bench_training.py [--steps 100] [--warmup 10] [--repeats 3] [--only "SDXL,SD3"]
                                        [--out benchmarks/results]

Each mode and each floor runs --repeats times, alternating, each in a fresh process (so peak RSS is its own): steps per second over the timed steps,
peak resident memory, and time from process launch to the first training step, for tiny SD, SDXL and
SD3 models. The floor is the denoiser's forward + backward + AdamW step alone (clipped as in training) on
ready-made tensors of the same shapes; step/floor (of the medians) is the overhead of everything else. Also:
class-image generation throughput. Writes JSON and Markdown.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
LAUNCHED = time.time()

RESOLUTION = 64
MODES = {
    # name: (model family, extra training flags, floor batch = instance + class rows)
    "full": ("sd", [], 1),
    "full + cache_latents": ("sd", ["--cache_latents", "--center_crop"], 1),
    "full, --no_cache_latents (VAE encode and pixels every step)": ("sd", ["--no_cache_latents"], 1),
    "full + prior preservation": ("sd", ["--with_prior_preservation", "--class_prompt", "a photo of dog"], 2),
    "full + prior preservation + cache_latents": ("sd", ["--with_prior_preservation", "--class_prompt",
                                                         "a photo of dog", "--cache_latents", "--center_crop"], 2),
    "lora (rank 4)": ("sd", ["--use_lora", "--lora_rank", "4", "--learning_rate", "1e-4"], 1),
    "SDXL full": ("sdxl", [], 1),
    "SDXL full + cache_latents": ("sdxl", ["--cache_latents", "--center_crop"], 1),
    "SDXL lora (rank 4) + cache_latents": ("sdxl", ["--use_lora", "--lora_rank", "4", "--learning_rate", "1e-4",
                                                    "--cache_latents", "--center_crop"], 1),
    "SD3 full": ("sd3", [], 1),
    "SD3 full + cache_latents": ("sd3", ["--cache_latents", "--center_crop"], 1),
    "SD3 lora (rank 4) + cache_latents": ("sd3", ["--use_lora", "--lora_rank", "4", "--learning_rate", "1e-4",
                                                  "--cache_latents", "--center_crop"], 1),
}


# The tiny SD3 step is ~12 ms: it gets 4x the timed steps so that its window (~5 s) is as long as the others'
STEP_SCALE = {"sd": 1, "sdxl": 1, "sd3": 4}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_assets(folder: str) -> tuple:
    """Tiny SD and SDXL folders ({family: path}) and four photos."""
    import numpy as np
    from PIL import Image

    from ppdreambooth.families.tiny import build_tiny_pipeline

    model = {family: os.path.join(folder, f"tiny-{family}") for family in ("sd", "sdxl", "sd3")}
    for family, path in model.items():
        build_tiny_pipeline(path, family=family)
    photos = os.path.join(folder, "photos")
    os.makedirs(photos)
    rng = np.random.RandomState(0)
    for i in range(4):
        Image.fromarray(rng.randint(0, 255, (RESOLUTION, RESOLUTION, 3)).astype(np.uint8)).save(
            os.path.join(photos, f"{i}.png"))
    return model, photos


def worker_train(model: str, photos: str, workdir: str, extra: list, warmup: int, steps: int) -> dict:
    from paddlenlp.trainer import TrainerCallback

    from ppdreambooth.config.parsing import parse_args
    from ppdreambooth.train import run

    from paddle.io.dataloader import dataloader_iter

    marks, data_wait = [], {"timed": False, "seconds": 0.0}

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if not marks:
                marks.append(("first", time.time()))
            data_wait["timed"] = warmup <= state.global_step < warmup + steps

        def on_step_end(self, args, state, control, **kwargs):
            marks.append((state.global_step, time.time()))

    # the time the training loop spends waiting for batches (a new epoch's iterator included)
    for method in ("__init__", "__next__"):
        original = getattr(dataloader_iter._DataLoaderIterSingleProcess, method)

        def clocked(self, *args, _original=original, **kwargs):
            start = time.time()
            try:
                return _original(self, *args, **kwargs)
            finally:
                if data_wait["timed"]:
                    data_wait["seconds"] += time.time() - start
        setattr(dataloader_iter._DataLoaderIterSingleProcess, method, clocked)

    argv = ["--pretrained_model_name_or_path", model, "--instance_data_dir", photos,
            "--instance_prompt", "a photo of sks dog", "--output_dir", os.path.join(workdir, "out"),
            "--resolution", str(RESOLUTION), "--train_batch_size", "1", "--max_train_steps", str(warmup + steps),
            "--save_steps", "100000", "--logging_steps", "10", "--report_to", "none", "--seed", "0",
            "--class_data_dir", os.path.join(workdir, "class"), "--num_class_images", "4",
            "--class_image_inference_steps", "2", "--disable_tqdm", "true", *extra]
    run(*parse_args(argv), callbacks=[StepClock()])
    times = dict(marks)
    return {
        "steps_per_second": steps / (times[warmup + steps] - times[warmup]),
        "data_wait_ms_per_step": data_wait["seconds"] / steps * 1e3,
        "peak_rss_mb": peak_rss_mb(),
        "launch_to_first_step_s": times["first"] - LAUNCHED,
    }


def floor_inputs(denoiser, batch: int) -> tuple:
    """Ready-made (noisy latents, timesteps, conditioning) of the training shapes, and the denoiser call."""
    import paddle

    size = RESOLUTION // 8
    config = denoiser.config
    if "joint_attention_dim" in config:  # SD3's transformer: two CLIPs and T5, 77 tokens each
        latents = paddle.randn([batch, config.in_channels, size, size])
        timesteps = paddle.rand([batch]) * 1000
        context = paddle.randn([batch, 154, config.joint_attention_dim])
        pooled = paddle.randn([batch, config.pooled_projection_dim])
        return latents, lambda: denoiser(hidden_states=latents, timestep=timesteps, encoder_hidden_states=context,
                                         pooled_projections=pooled).sample
    latents = paddle.randn([batch, 4, size, size])
    hidden = paddle.randn([batch, 77, config.cross_attention_dim])
    timesteps = paddle.randint(0, 1000, [batch])
    added = None
    if config.addition_embed_type == "text_time":  # SDXL: pooled embedding and time ids
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = {"text_embeds": paddle.randn([batch, pooled]),
                 "time_ids": paddle.to_tensor([[RESOLUTION, RESOLUTION, 0, 0, RESOLUTION, RESOLUTION]] * batch,
                                              dtype="float32")}
    return latents, lambda: denoiser(latents, timesteps, hidden, added_cond_kwargs=added).sample


def worker_floor(model: str, batch: int, warmup: int, steps: int) -> dict:
    """The denoiser's forward + backward + AdamW step alone (same clipping as training), on ready-made tensors."""
    import paddle

    from ppdreambooth.modeling.clipping import GlobalNormClip
    from ppdreambooth.families import detect_family
    from ppdreambooth.families.loading import load_component

    family = detect_family(model)
    denoiser = load_component(model, family.denoiser, family)
    denoiser.train()
    # the clip training uses (bit-identical to Paddle's ClipGradByGlobalNorm, cheaper): the floor stays the floor
    optimizer = paddle.optimizer.AdamW(learning_rate=1e-5, parameters=denoiser.parameters(), weight_decay=1e-2,
                                       grad_clip=GlobalNormClip(1.0))
    latents, call = floor_inputs(denoiser, batch)
    target = paddle.randn(latents.shape)
    for i in range(warmup + steps):
        if i == warmup:
            start = time.time()
        pred = call()
        loss = ((pred - target) ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
    float(loss)
    return {"steps_per_second": steps / (time.time() - start), "peak_rss_mb": peak_rss_mb()}


def worker_class_images(model: str, workdir: str, count: int) -> dict:
    from ppdreambooth.data.class_images import generate_class_images

    start = time.time()
    generate_class_images(model, os.path.join(workdir, "gen"), "a photo of dog", list(range(count)),
                          sample_batch_size=4, num_inference_steps=25, image_size=(RESOLUTION, RESOLUTION),
                          show_progress=False)
    return {"images_per_second": count / (time.time() - start), "peak_rss_mb": peak_rss_mb()}


def median_run(runs: list) -> dict:
    """Each figure's median over repeated runs."""
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def spawn(*args) -> dict:
    result = subprocess.run([sys.executable, __file__, "--worker", json.dumps(args)], capture_output=True,
                            text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    if result.returncode != 0:
        raise SystemExit(f"worker {args[0]} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode and floor; the table shows medians")
    parser.add_argument("--only", default="", help="comma-separated prefixes of the modes to run (default: all)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, *rest = json.loads(args.worker)
        result = {"train": worker_train, "floor": worker_floor, "class_images": worker_class_images}[kind](*rest)
        print(json.dumps(result))
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model, photos = make_assets(tmp)
        prefixes = [p for p in args.only.split(",") if p]
        modes = {name: mode for name, mode in MODES.items() if not prefixes or name.startswith(tuple(prefixes))}
        floor_keys = sorted({(f, b) for f, _, b in modes.values()})
        floor_runs = {key: [] for key in floor_keys}
        train_runs = {name: [] for name in modes}
        for _ in range(args.repeats):  # floors and modes alternate, so machine noise hits both alike
            for family, batch in floor_keys:
                floor_runs[(family, batch)].append(spawn("floor", model[family], batch, args.warmup,
                                                         args.steps * STEP_SCALE[family]))
            for name, (family, extra, batch) in modes.items():
                workdir = tempfile.mkdtemp(dir=tmp)
                train_runs[name].append(spawn("train", model[family], photos, workdir, extra, args.warmup,
                                             args.steps * STEP_SCALE[family]))
        for name, (family, extra, batch) in modes.items():
            result, floor = median_run(train_runs[name]), median_run(floor_runs[(family, batch)])
            rows.append({"mode": name, **result, "floor_steps_per_second": floor["steps_per_second"],
                         "floor_peak_rss_mb": floor["peak_rss_mb"],
                         "step_over_floor": floor["steps_per_second"] / result["steps_per_second"]})
        generation = spawn("class_images", model["sd"], tmp, 8)

    report = {"config": {"resolution": RESOLUTION, "batch_size": 1, "steps": args.steps, "step_scale": STEP_SCALE,
                         "warmup": args.warmup,
                         "repeats": args.repeats,
                         "model": "ppdreambooth.families.tiny (UNet 32/64 channels)", "cpu_count": os.cpu_count()},
              "training": rows, "class_image_generation": generation}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump(report, f, indent=2)
    lines = ["| mode | steps/s | floor steps/s | step/floor | data wait (ms/step) | peak RSS (MB) | floor peak RSS (MB) "
             "| launch→first step (s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['steps_per_second']:.2f} | {r['floor_steps_per_second']:.2f} | "
                     f"{r['step_over_floor']:.3f} | {r['data_wait_ms_per_step']:.2f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['floor_peak_rss_mb']:.0f} | "
                     f"{r['launch_to_first_step_s']:.1f} |")
    lines.append("")
    lines.append(f"Class-image generation (DPM-Solver, 25 steps, {RESOLUTION} px, batch 4): "
                 f"{generation['images_per_second']:.2f} images/s")
    markdown = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "training.md"), "w") as f:
        f.write(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
