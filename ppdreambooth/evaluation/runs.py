"""An evaluation run: which models to compare, their images for every prompt and seed, the scores, the files."""
from __future__ import annotations

import gc
import json
import os
from typing import Dict, List, Optional, Sequence

from ppdreambooth.data.images import list_image_files, load_rgb
from ppdreambooth.errors import ConfigError
from ppdreambooth.evaluation.dino import load_dino
from ppdreambooth.evaluation.fidelity import FidelityScorer, load_clip
from ppdreambooth.evaluation.prompts import resolve_prompts
from ppdreambooth.evaluation.report import PAPER, contact_sheet
from ppdreambooth.evaluation.world import WORLD_METRICS, WorldScorer, world_prompts, world_subject
from ppdreambooth.inference.sampling import generate_images, sampling_pipeline
from ppdreambooth.interop.merge import load_adapters
from ppdreambooth.modeling.pivotal import load_if_present
from ppdreambooth.interop.model_card import read_model_card
from ppdreambooth.modeling.lora import LORA_WEIGHTS_NAME


def card_base_model(folder: str) -> Optional[str]:
    """The base model a training output folder's model card (README.md) names, or None."""
    base = read_model_card(folder).get("base_model")
    converted = os.path.join(folder, ".base-from-single-file")  # trained from a single-file checkpoint
    if base and os.path.isdir(converted) and base.endswith((".safetensors", ".ckpt")):
        return converted
    return base or None


def resolve_models(model: str, lora: Optional[str], base_model: Optional[str], no_base: bool):
    """(model, lora, base): `--model` may be a LoRA output folder (its base then comes from the model card);
    a full fine-tune's base is `--base_model` or the one its model card names (None: no comparison)."""
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


def generate_runs(args, prompts: Sequence[str], seeds: Sequence[int]) -> Dict[str, List[list]]:
    """{"trained": images per prompt, "base": images per prompt (when there is a base to compare with)}."""
    from tqdm.auto import tqdm

    runs: Dict[str, List[list]] = {}
    total = len(prompts) * len(seeds) * (2 if args.base else 1)
    with tqdm(total=total, desc="images", disable=args.quiet) as progress:
        def run(pipe, options=None, pivotal=None):  # pivotal: the trained model's new tokens, if any
            return [generate_images(pipe, [pivotal.apply(prompt) if pivotal else prompt] * len(seeds), seeds,
                                    args.steps, args.height, args.width, args.guidance_scale, args.negative_prompt,
                                    options or {}, progress=progress)
                    for prompt in prompts]

        family, pipe = sampling_pipeline(args.model, scheduler=args.scheduler, model_family=args.model_family)
        if args.lora:
            if args.base:  # the base model's images first: the same pipeline before the adapters go in
                runs["base"] = run(pipe)
            options = load_adapters(family, pipe, args.lora, args.lora_scale)
            runs["trained"] = run(pipe, options, load_if_present(family, pipe, args.lora))
        else:
            runs["trained"] = run(pipe, pivotal=load_if_present(family, pipe, args.model))
            if args.base:
                del pipe
                gc.collect()
                family, pipe = sampling_pipeline(args.base, scheduler=args.scheduler, model_family=args.model_family)
                runs["base"] = run(pipe)
        del pipe
        gc.collect()
    return runs


def evaluate(args) -> dict:
    """Generate, score and write metrics.json, grid.png and the images; returns the metrics dict."""
    if args.world:
        subject = world_subject(args.identifier, args.class_name or "cross")
        prompts = [p for group in world_prompts(subject) for p in group]
        prompt_description = f"toy-world prompts ({len(prompts)})"
    else:
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

    if args.world:
        scorer = WorldScorer(photos, subject)
    else:
        scorer = FidelityScorer(load_clip(args.clip_model), load_dino(args.dino_model), photos)
    scores = {name: scorer.score(groups, prompts) for name, groups in runs.items()}
    results = {
        "metrics": {**{name: s["overall"] for name, s in scores.items()},
                    **({} if args.world else {"your_photos": scorer.photo_reference()})},
        **({"world": {"instance_backgrounds": scorer.instance_backgrounds}} if args.world else {"paper": PAPER}),
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
        "definitions": {key: what for key, _, what in WORLD_METRICS} if args.world else {
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
