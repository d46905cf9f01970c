"""Where weights are written: trained-only checkpoints, and the final ppdiffusers pipeline folder.

A checkpoint `checkpoint-N/` holds `model_state.pdparams` with only the trained weights (the
Trainer's resume path reads it back into the model) and is marked complete by a `.complete` file
written last, so a run killed mid-write never resumes from a half-written checkpoint. The final
pipeline is written to a staging folder first and then moved into place, component by component.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from typing import List, Optional

import paddle

from .loading import is_diffusers_folder, load_component

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint"
COMPLETE_MARKER = ".complete"
WEIGHTS_NAME = "model_state.pdparams"


def save_trainable_weights(model, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    state = {k: v.detach() for k, v in model.trainable_state_dict().items()}
    tmp = os.path.join(out_dir, WEIGHTS_NAME + ".tmp")
    paddle.save(state, tmp)
    os.replace(tmp, os.path.join(out_dir, WEIGHTS_NAME))


def mark_complete(checkpoint_dir: str, step: int) -> None:
    tmp = os.path.join(checkpoint_dir, COMPLETE_MARKER + ".tmp")
    with open(tmp, "w") as f:
        f.write(f"{step}\n")
    os.replace(tmp, os.path.join(checkpoint_dir, COMPLETE_MARKER))


def mark_incomplete(checkpoint_dir: str) -> None:
    """Before (re)writing a checkpoint folder, so that a kill mid-write never leaves it marked complete."""
    marker = os.path.join(checkpoint_dir, COMPLETE_MARKER)
    if os.path.exists(marker):
        os.remove(marker)


def delete_checkpoint(checkpoint_dir: str) -> None:
    """Unmark first, then delete: a kill mid-deletion leaves an incomplete folder, never a broken 'complete' one."""
    mark_incomplete(checkpoint_dir)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)


def is_complete(checkpoint_dir: str) -> bool:
    return os.path.isfile(os.path.join(checkpoint_dir, COMPLETE_MARKER))


def complete_checkpoints(output_dir: str) -> List[str]:
    """Complete `checkpoint-N` folders in `output_dir`, oldest (lowest N) first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = re.fullmatch(rf"{CHECKPOINT_PREFIX}-(\d+)", name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path) and is_complete(path):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str) -> Optional[str]:
    checkpoints = complete_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def write_pipeline(model, base_model: str, out_dir: str, revision: Optional[str] = None) -> None:
    """Save the trained model as a ppdiffusers pipeline folder that `from_pretrained(out_dir)` loads.

    The trained denoiser (and text encoders) come from `model`; the scheduler and any other component
    (feature extractor, safety checker) come from the base model unchanged.
    """
    from ppdiffusers import AutoencoderKL, DiffusionPipeline

    # Under AMP O2 the trained layers are float16/bfloat16; training is over, so cast them back in place:
    # the shared weights are float32 like the base model's.
    for layer in model.children():
        layer.to(dtype="float32")
    # Components the model no longer holds (released after caching) are read again from the base model.
    family = model.family
    held = {}
    for name in (family.denoiser, "vae", *family.text_encoders, *family.tokenizers):
        if model.has_component(name):
            held[name] = getattr(model, name)
        elif name == "vae" and model.model_args.pretrained_vae_model_name_or_path:  # the replacement VAE trained with
            held[name] = AutoencoderKL.from_pretrained(model.model_args.pretrained_vae_model_name_or_path)
        else:
            held[name] = load_component(base_model, name, revision, family)
    options = {"from_diffusers": True} if os.path.isdir(base_model) and is_diffusers_folder(base_model,
                                                                                            family.denoiser) else {}
    pipeline = DiffusionPipeline.from_pretrained(base_model, revision=revision, **options, **held)
    staging = os.path.join(out_dir, ".pipeline-staging")
    shutil.rmtree(staging, ignore_errors=True)
    pipeline.save_pretrained(staging)
    for name in sorted(os.listdir(staging), key=lambda n: n == "model_index.json"):  # the index goes last
        target, old = os.path.join(out_dir, name), os.path.join(staging, name + ".old")
        if os.path.isdir(target):
            os.replace(target, old)  # a folder cannot be replaced in one step: move the old one aside first
        os.replace(os.path.join(staging, name), target)
        shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(staging)
    logger.info("pipeline written to %s", out_dir)


def push_to_hub(output_dir: str, repo_id: Optional[str] = None, token: Optional[str] = None) -> str:
    """Upload the final pipeline (not checkpoints or logs) to a Hugging Face hub model repository."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = repo_id or os.path.basename(os.path.abspath(output_dir))
    repo_id = api.create_repo(repo_id, exist_ok=True).repo_id
    api.upload_folder(
        repo_id=repo_id,
        folder_path=output_dir,
        ignore_patterns=[f"{CHECKPOINT_PREFIX}-*", "logs/*", ".*"],
        commit_message="ppdreambooth: upload fine-tuned model",
    )
    return repo_id
