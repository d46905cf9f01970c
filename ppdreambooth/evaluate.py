"""Subject and prompt fidelity of a trained model, as the DreamBooth paper measures them on DreamBench.

    python -m ppdreambooth.evaluate --model ./dream_outputs --instance_data_dir ./dog --class_name dog
    python -m ppdreambooth.evaluate --model runwayml/stable-diffusion-v1-5 --lora ./path-to-save-model \\
        --instance_data_dir ./dog --class_name dog --num_images 4 --out ./eval

The model generates `--num_images` images (seeds seed, seed+1, ...) for each prompt; the same prompts
and seeds go through the base model (a full fine-tune: `--base_model`, by default the one its model card
names; a LoRA: the same pipeline without adapters), so the numbers show what training changed:

- DINO:   mean cosine similarity of DINO ViT-S/16 embeddings (CLS token), over all generated x real pairs;
- CLIP-I: the same with CLIP image embeddings;
- CLIP-T: mean cosine similarity between each generated image's CLIP embedding and its prompt's.

Prompts: the paper's 25 DreamBench templates for objects or for live subjects (`--prompt_set`; `{}` is
filled with `--identifier` and `--class_name`, e.g. "a sks dog in the jungle"), or `--prompts_file`.
Writes `metrics.json`, `grid.png` (the real photos on top, then per prompt the model's images and the
base model's), the images under `images/`, and prints a table with the paper's numbers beside yours.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
from typing import Dict, List, Optional, Sequence


from ppdreambooth.evaluation.dino import DEFAULT_DINO_MODEL, load_dino
from ppdreambooth.evaluation.fidelity import DEFAULT_CLIP_MODEL, FidelityScorer, load_clip
from ppdreambooth.runtime.exiting import exit_process

PROMPTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "resources", "dreambench_prompts.json")
# The paper's Table 1 (DreamBench: 30 subjects x 25 prompts x 4 images).
PAPER = {
    "dreambooth_stable_diffusion": {"dino": 0.668, "clip_i": 0.803, "clip_t": 0.305},
    "dreambooth_imagen": {"dino": 0.696, "clip_i": 0.812, "clip_t": 0.306},
    "real_images": {"dino": 0.774, "clip_i": 0.885},
}
METRICS = (("dino", "DINO", "subject fidelity: generated x your photos"),
           ("clip_i", "CLIP-I", "subject fidelity: generated x your photos"),
           ("clip_t", "CLIP-T", "prompt fidelity: generated x its prompt"))


def dreambench() -> dict:
    with open(PROMPTS_PATH, encoding="utf-8") as f:
        return json.load(f)


def spread(items: Sequence, count: Optional[int]) -> list:
    """`count` items spread evenly over `items` (all of them when count is None or large enough)."""
    items = list(items)
    if not count or count >= len(items):
        return items
    return [items[(i * len(items)) // count] for i in range(count)]


def resolve_prompts(prompt_set: str = "auto", prompts_file: Optional[str] = None, identifier: str = "sks",
                    class_name: Optional[str] = None, num_prompts: Optional[int] = None):
    """(prompts, description). Templates and file lines may hold `{}`, filled with "identifier class"."""
    from ppdreambooth.errors import ConfigError

    subject = " ".join(part for part in (identifier, class_name) if part)
    if prompts_file:
        with open(prompts_file, encoding="utf-8") as f:
            templates = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
        if not templates:
            raise ConfigError(f"{prompts_file} holds no prompts")
        description = prompts_file
    else:
        data = dreambench()
        if prompt_set == "auto":
            prompt_set = "live" if (class_name or "").lower() in data["live_classes"] else "object"
        if not class_name:
            raise ConfigError("the DreamBench prompts need the subject's class: pass --class_name (e.g. dog), "
                              "or give your own --prompts_file")
        templates = data[prompt_set]
        description = f"DreamBench {prompt_set} prompts"
    if any("{}" in t for t in templates) and not class_name and prompts_file:
        raise ConfigError(f"{prompts_file} has '{{}}' placeholders: pass --class_name (and --identifier)")
    templates = spread(templates, num_prompts)
    return [t.replace("{}", subject) for t in templates], f"{description} ({len(templates)})"


# ----- generation -------------------------------------------------------------------------------------
def card_base_model(folder: str) -> Optional[str]:
    """The base model a training output folder's model card (README.md) names, or None."""
    from ppdreambooth.export import read_model_card

    base = read_model_card(folder).get("base_model")
    converted = os.path.join(folder, ".base-from-single-file")  # trained from a single-file checkpoint
    if base and os.path.isdir(converted) and base.endswith((".safetensors", ".ckpt")):
        return converted
    return base or None


def resolve_models(model: str, lora: Optional[str], base_model: Optional[str], no_base: bool):
    """(model, lora, base): `--model` may be a LoRA output folder (its base then comes from the model card);
    a full fine-tune's base is `--base_model` or the one its model card names (None: no comparison)."""
    from ppdreambooth.errors import ConfigError
    from ppdreambooth.modeling.lora import LORA_WEIGHTS_NAME

    if (lora is None and os.path.isdir(model) and os.path.isfile(os.path.join(model, LORA_WEIGHTS_NAME))
            and not os.path.isfile(os.path.join(model, "model_index.json"))):
        lora, model = model, base_model or card_base_model(model)
        if model is None:
            raise ConfigError(f"{lora} holds LoRA adapters and no model card naming their base: pass the base "
                              "model as --model and the adapters as --lora")
    if no_base:
        return model, lora, None
    if lora:
        return model, lora, model  # the same pipeline, adapters not yet loaded
    return model, None, base_model or (card_base_model(model) if os.path.isdir(model) else None)


def generate_images(pipe, family, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance_scale: float,
                    height: int, width: int, negative_prompt: Optional[str] = None,
                    lora_scale: Optional[float] = None, progress=None) -> List[list]:
    """Per prompt, one image per seed (DPM-Solver or the family's deterministic sampler, seeded latents)."""
    import paddle

    from ppdreambooth.inference.sampling import seeded_latents

    extra = {family.lora_scale_kwarg: {"scale": lora_scale}} if lora_scale is not None else {}
    out = []
    for prompt in prompts:
        group = []
        for seed in seeds:
            with paddle.no_grad():
                group.append(pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=steps,
                                  guidance_scale=guidance_scale, height=height, width=width,
                                  latents=seeded_latents(pipe, [seed], height, width), **extra).images[0])
            if progress is not None:
                progress.update(1)
        out.append(group)
    return out


def load_sampling_pipeline(path: str, scheduler: Optional[str], model_family: Optional[str] = None):
    import ppdiffusers

    from ppdreambooth.families import detect_family
    from ppdreambooth.generate import SCHEDULERS

    family = detect_family(path, model_family)
    pipe = family.load_pipeline(path)
    name = SCHEDULERS[scheduler] if scheduler else family.sampling_scheduler
    pipe.scheduler = getattr(ppdiffusers, name).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return family, pipe


def generate_runs(args, prompts: Sequence[str], seeds: Sequence[int]) -> Dict[str, List[list]]:
    """{"trained": images per prompt, "base": images per prompt (when there is a base to compare with)}."""
    from tqdm.auto import tqdm

    from ppdreambooth.inference.sampling import default_image_size

    runs: Dict[str, List[list]] = {}
    total = len(prompts) * len(seeds) * (2 if args.base else 1)
    with tqdm(total=total, desc="images", disable=args.quiet) as progress:
        def run(family, pipe, lora_scale=None):
            default = default_image_size(pipe)
            return generate_images(pipe, family, prompts, seeds, args.steps, args.guidance_scale,
                                   args.height or default, args.width or default, args.negative_prompt,
                                   lora_scale, progress)

        if args.lora:
            family, pipe = load_sampling_pipeline(args.model, args.scheduler, args.model_family)
            if args.base:  # the base model's images first: the same pipeline before the adapters go in
                runs["base"] = run(family, pipe)
            pipe.load_lora_weights(args.lora)
            runs["trained"] = run(family, pipe, args.lora_scale)
        else:
            family, pipe = load_sampling_pipeline(args.model, args.scheduler, args.model_family)
            runs["trained"] = run(family, pipe)
            if args.base:
                del pipe
                gc.collect()
                family, pipe = load_sampling_pipeline(args.base, args.scheduler, args.model_family)
                runs["base"] = run(family, pipe)
        del pipe
        gc.collect()
    return runs


# ----- outputs ----------------------------------------------------------------------------------------
def contact_sheet(photos: Sequence, runs: Dict[str, List[list]], prompts: Sequence[str], cell_height: int = 256):
    """The real photos on top, then per prompt a labelled row: the model's images, then the base model's.
    Cells have the generated images' aspect ratio; photos are centre-cropped to it."""
    from PIL import Image, ImageDraw, ImageOps

    band, gap = 14, 8  # a text line above each row; space between the trained and base blocks
    first = runs["trained"][0][0]
    cell = (max(1, round(cell_height * first.size[0] / first.size[1])), cell_height)  # (width, height)
    per_run = len(runs["trained"][0])
    names = [name for name in ("trained", "base") if name in runs]
    block = per_run * cell[0] + gap
    columns = max(per_run * len(names), 1)
    width = max(len(names) * block - gap, 200)
    photo_rows = -(-len(photos) // columns)
    height = band + photo_rows * cell[1] + band + len(prompts) * (band + cell[1])
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    characters = max(width // 6, 10)  # PIL's default font is about 6 px wide

    draw.text((2, 1), f"your photos ({len(photos)})"[:characters], fill="black")
    for i, photo in enumerate(photos):
        row, col = divmod(i, columns)
        sheet.paste(ImageOps.fit(photo.convert("RGB"), cell), (col * cell[0], band + row * cell[1]))
    y = band + photo_rows * cell[1]
    for r, name in enumerate(names):
        draw.text((r * block + 2, y + 1), name, fill="blue")
    y += band
    for p, prompt in enumerate(prompts):
        draw.text((2, y + 1), prompt[:characters], fill="black")
        for r, name in enumerate(names):
            for i, image in enumerate(runs[name][p]):
                sheet.paste(image.convert("RGB").resize(cell), (r * block + i * cell[0], y + band))
        y += band + cell[1]
    return sheet


def format_table(results: dict) -> str:
    metrics, photos = results["metrics"], results["metrics"].get("your_photos", {})
    settings = results["settings"]
    has_base = "base" in metrics
    paper = PAPER["dreambooth_stable_diffusion"]
    head = f"{'':8}{'':45}{'trained':>9}" + (f"{'base':>9}{'change':>9}" if has_base else "") + f"{'paper':>8}"
    lines = [f"Fidelity over {len(settings['prompts'])} prompts x {settings['num_images']} images, "
             f"{settings['num_photos']} photos of the subject", head]
    for key, name, what in METRICS:
        line = f"{name:8}{what:45}{metrics['trained'][key]:9.3f}"
        if has_base:
            line += f"{metrics['base'][key]:9.3f}{metrics['trained'][key] - metrics['base'][key]:+9.3f}"
        lines.append(line + f"{paper[key]:8.3f}")
    if photos.get("dino") is not None:
        real = PAPER["real_images"]
        lines.append(f"Your photos among themselves (the ceiling): DINO {photos['dino']:.3f}, CLIP-I "
                     f"{photos['clip_i']:.3f} (the paper's real images: {real['dino']:.3f}, {real['clip_i']:.3f})")
    if not has_base:
        lines.append("No base model compared (--no_base, or a full fine-tune without a model card: --base_model).")
    lines.append("paper: DreamBooth on Stable Diffusion, DreamBench (Ruiz et al. 2023, Table 1)")
    return "\n".join(lines)


def evaluate(args) -> dict:
    """Generate, score and write metrics.json, grid.png and the images; returns the metrics dict."""
    from ppdreambooth.errors import ConfigError
    from ppdreambooth.data.images import list_image_files, load_rgb

    prompts, prompt_description = resolve_prompts(args.prompt_set, args.prompts_file, args.identifier,
                                                  args.class_name, args.num_prompts)
    files = list_image_files(args.instance_data_dir) if os.path.isdir(args.instance_data_dir) else []
    if not files:
        raise ConfigError(f"no photos of the subject in {args.instance_data_dir}")
    photos = [load_rgb(path) for path in files]
    seeds = [args.seed + i for i in range(args.num_images)]
    args.model, args.lora, args.base = resolve_models(args.model, args.lora, args.base_model, args.no_base)
    runs = generate_runs(args, prompts, seeds)

    os.makedirs(args.out, exist_ok=True)
    for name, groups in runs.items():
        folder = os.path.join(args.out, "images", name)
        os.makedirs(folder, exist_ok=True)
        for p, group in enumerate(groups):
            for i, image in enumerate(group):
                image.save(os.path.join(folder, f"{p:02d}-{i:02d}-seed{seeds[i]}.png"))

    scorer = FidelityScorer(load_clip(args.clip_model), load_dino(args.dino_model), photos)
    scores = {name: scorer.score(groups, prompts) for name, groups in runs.items()}
    results = {
        "metrics": {**{name: s["overall"] for name, s in scores.items()}, "your_photos": scorer.photo_reference()},
        "paper": PAPER,
        "per_prompt": [{"prompt": prompt, **{name: {k: v for k, v in scores[name]["per_prompt"][p].items()
                                                     if k != "prompt"} for name in scores}}
                       for p, prompt in enumerate(prompts)],
        "settings": {
            "model": args.model, "lora": args.lora, "lora_scale": args.lora_scale if args.lora else None,
            "base": args.base, "instance_data_dir": args.instance_data_dir, "num_photos": len(photos),
            "prompt_set": prompt_description, "prompts": prompts, "num_images": args.num_images, "seeds": seeds,
            "steps": args.steps, "guidance_scale": args.guidance_scale, "scheduler": args.scheduler or "family default",
            "negative_prompt": args.negative_prompt, "height": runs["trained"][0][0].size[1],
            "width": runs["trained"][0][0].size[0], "clip_model": args.clip_model, "dino_model": args.dino_model,
        },
        "definitions": {
            "dino": "mean cosine similarity of L2-normalised DINO ViT-S/16 CLS embeddings over all generated x real "
                    "pairs",
            "clip_i": "mean cosine similarity of L2-normalised CLIP image embeddings over all generated x real pairs",
            "clip_t": "mean cosine similarity of each generated image's CLIP embedding and its prompt's",
            "your_photos": "the same over pairs of different real photos",
        },
    }
    with open(os.path.join(args.out, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    cell = min(args.grid_cell, results["settings"]["height"])
    contact_sheet(photos, runs, prompts, cell).save(os.path.join(args.out, "grid.png"))
    return results


# ----- command line -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from ppdreambooth.generate import SCHEDULERS

    parser = argparse.ArgumentParser(prog="ppdreambooth.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="the trained pipeline folder, or the base model of --lora (or a LoRA output folder)")
    parser.add_argument("--lora", help="folder with paddle_lora_weights.safetensors to evaluate on --model")
    parser.add_argument("--lora_scale", type=float, default=1.0)
    parser.add_argument("--base_model", help="the base model to compare a full fine-tune with "
                                             "(default: the model card's base_model)")
    parser.add_argument("--no_base", action="store_true", help="skip the base model's images and numbers")
    parser.add_argument("--model_family", choices=["sd", "sdxl", "sd3"], default=None)
    parser.add_argument("--instance_data_dir", required=True, help="the real photos of the subject")
    parser.add_argument("--prompt_set", choices=["auto", "object", "live"], default="auto",
                        help="DreamBench's 25 prompts for objects or live subjects (auto: live for dog and cat)")
    parser.add_argument("--prompts_file", help="your own prompts, one a line; '{}' becomes 'identifier class'")
    parser.add_argument("--identifier", default="sks", help="the subject's unique identifier (default sks)")
    parser.add_argument("--class_name", help="the subject's class noun, e.g. dog")
    parser.add_argument("--num_prompts", type=int, default=None, help="use this many prompts, spread over the set")
    parser.add_argument("--num_images", type=int, default=4, help="images per prompt (the paper: 4)")
    parser.add_argument("--seed", type=int, default=0, help="image i of every prompt uses seed + i")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--negative_prompt", default=None)
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None,
                        help="default: dpm (SD, SDXL), flow_euler (SD3)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--clip_model", default=DEFAULT_CLIP_MODEL, help="CLIP: hub id or local folder")
    parser.add_argument("--dino_model", default=DEFAULT_DINO_MODEL, help="DINO ViT-S/16: hub id or local folder")
    parser.add_argument("--grid_cell", type=int, default=256, help="height of an image in grid.png (at most)")
    parser.add_argument("--out", default=None, help="default: <model or lora folder>/evaluation, else ./evaluation")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if min(args.num_images, args.steps, args.grid_cell, args.num_prompts or 1) <= 0:
        parser.error("--num_images, --steps, --num_prompts and --grid_cell must be positive")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 8):
            parser.error(f"--{name} must be a positive multiple of 8")
    if args.out is None:
        target = args.lora or args.model
        args.out = os.path.join(target, "evaluation") if os.path.isdir(target) else "evaluation"
    from ppdreambooth.errors import ConfigError
    from ppdreambooth.data.images import ImageError

    try:
        results = evaluate(args)
    except (ConfigError, ImageError) as e:
        parser.error(str(e))
    print(format_table(results))
    print(f"metrics.json, grid.png and the images written to {args.out}")
    return 0


def cli() -> None:
    exit_process(main())


if __name__ == "__main__":
    cli()
