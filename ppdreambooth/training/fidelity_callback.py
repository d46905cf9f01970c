"""Subject and prompt fidelity during training: `--evaluate_every_n_checkpoints K` and/or `--evaluate_at_end`.

At every K-th checkpoint (and/or when training ends) the weights being trained generate images for a few
DreamBench prompts with fixed seeds (the family's deterministic sampler, as validation images), scored by
`ppdreambooth.evaluation.fidelity` against the instance photos: DINO, CLIP-I, CLIP-T. The figures go to VisualDL
(`fidelity/dino`, ...), to `<output_dir>/fidelity.json` (one record per step) and to a plot
`<output_dir>/fidelity.png` (metric vs step), so the step where subject fidelity is high before prompt
fidelity falls can be picked. With `--eval_world` (a subject of the toy world, `ppdreambooth.toyworld`) the
images are of the world's subject and class prompts and the figures are its exact scores: subject fidelity,
prompt fidelity, language drift and background leakage. Evaluation leaves training unchanged (RNG states and
train/eval mode restored).
"""
from __future__ import annotations

import json
import logging
import os
from typing import List, Optional, Sequence

from paddlenlp.trainer import TrainerCallback

from ppdreambooth.inference.sampling import generate_images
from ppdreambooth.evaluation.dino import load_dino
from ppdreambooth.evaluation.fidelity import FidelityScorer, load_clip
from ppdreambooth.evaluation.prompts import resolve_prompts, subject_words
from ppdreambooth.evaluation.world import WorldScorer, world_prompts, world_subject
from ppdreambooth.training.sampling_context import sampling_from

logger = logging.getLogger(__name__)
RESULTS_NAME, PLOT_NAME = "fidelity.json", "fidelity.png"
FIDELITY_METRICS = FidelityScorer.metrics


def plot_fidelity(records: Sequence[dict], path: str, metrics: Sequence = FIDELITY_METRICS) -> str:
    """Metric vs step, one line per metric, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    steps = [r["step"] for r in records]
    for key, label in metrics:
        axis.plot(steps, [r[key] for r in records], marker="o", label=label)
    axis.set_xlabel("step")
    axis.set_ylabel("cosine similarity" if tuple(metrics) == FIDELITY_METRICS else "share of images")
    axis.legend()
    figure.tight_layout()
    tmp = path + ".tmp.png"
    figure.savefig(tmp)
    plt.close(figure)
    os.replace(tmp, path)
    return path


class FidelityCallback(TrainerCallback):
    def __init__(self, model, scorer, prompts: Sequence[str], num_images: int, every: Optional[int],
                 at_end: bool, inference_steps: int, ema=None):
        self.model, self.scorer, self.prompts = model, scorer, list(prompts)
        self.num_images, self.every, self.at_end, self.steps = num_images, every, at_end, inference_steps
        self.ema = ema  # WeightEMA, or schedulefree.ScheduleFreeWeights: what `sampling_from` swaps in
        self.saves = 0
        self.records: List[dict] = []
        self._writer = None

    def on_save(self, args, state, control, **kwargs):
        self.saves += 1
        if self.every and self.saves % self.every == 0:
            self.evaluate(args, state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.at_end and not any(r["step"] == state.global_step for r in self.records):
            self.evaluate(args, state.global_step)
        if self._writer is not None:
            self._writer.close()

    def evaluate(self, args, step: int) -> Optional[dict]:
        if not args.should_save:
            return None
        with sampling_from(self.model, self.ema) as pipeline:
            seeds = [args.seed + i for i in range(self.num_images)]
            groups = [generate_images(pipeline, [p] * len(seeds), seeds, num_inference_steps=self.steps)
                      for p in self.prompts]
        record = {"step": step, **self.scorer.score(groups, self.prompts)["overall"]}
        self.records.append(record)
        with open(os.path.join(args.output_dir, RESULTS_NAME), "w") as f:
            json.dump({"prompts": self.prompts, "images_per_prompt": self.num_images, "records": self.records}, f,
                      indent=2)
        plot_fidelity(self.records, os.path.join(args.output_dir, PLOT_NAME), self.scorer.metrics)
        self._log(args, record)
        logger.info("fidelity at step %d: %s", step,
                    ", ".join(f"{label} {record[key]:.3f}" for key, label in self.scorer.metrics))
        return record

    def _log(self, args, record: dict) -> None:
        if "visualdl" not in args.report_to:
            return
        if self._writer is None:
            from visualdl import LogWriter

            self._writer = LogWriter(logdir=args.logging_dir, file_name="vdlrecords.fidelity.log")
        for key, _ in self.scorer.metrics:
            self._writer.add_scalar(tag=f"fidelity/{key}", value=record[key], step=record["step"])


def fidelity_callback_for(model, data_args, args, instance_photos: List,
                          ema=None) -> Optional[FidelityCallback]:
    """The callback `--evaluate_every_n_checkpoints` / `--evaluate_at_end` ask for (None when neither does):
    metric models loaded, the first concept's photos (`data.photos.Photo`) embedded once."""
    if not (args.evaluate_every_n_checkpoints or args.evaluate_at_end):
        return None
    pictures = [photo.picture() for photo in instance_photos]
    concept = data_args.concept_list[0]
    identifier, class_name = subject_words(concept.instance_prompt, args.eval_class_name)
    if args.eval_world:
        subject = world_subject(identifier, class_name)
        prompts = [p for group in world_prompts(subject) for p in group]
        scorer = WorldScorer(pictures, subject)
    else:
        prompts, _ = resolve_prompts("auto", args.eval_prompts_file, identifier, class_name, args.eval_num_prompts)
        scorer = FidelityScorer(load_clip(args.eval_clip_model), load_dino(args.eval_dino_model), pictures)
    return FidelityCallback(model, scorer, prompts, args.eval_images_per_prompt,
                            args.evaluate_every_n_checkpoints, args.evaluate_at_end, args.validation_inference_steps,
                            ema)
