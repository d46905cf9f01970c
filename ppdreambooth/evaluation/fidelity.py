"""Fidelity metrics as the DreamBooth paper defines them: DINO and CLIP-I (subject fidelity, generated x real
images) and CLIP-T (prompt fidelity, generated image x its prompt), over L2-normalised embeddings.

The metric definitions are pure functions of embeddings; `FidelityScorer` embeds the real photos once and
scores groups of generated images; `load_clip` reads a CLIP model (Paddle or PyTorch layout). Used by
`ppdreambooth.evaluate`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import numpy as np

from ppdreambooth.evaluation.model_files import read_json, read_torch_weights, resolve_model_folder
from ppdreambooth.evaluation.preprocess import ImagePreprocess

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# ----- the metric definitions (pure functions of embeddings) ------------------------------------------
def l2_normalize(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def mean_pairwise_cosine(generated, real) -> float:
    """DINO / CLIP-I: the cosine similarity of every (generated, real) pair, averaged."""
    return float((l2_normalize(generated) @ l2_normalize(real).T).mean())


def mean_paired_cosine(images, texts) -> float:
    """CLIP-T: the cosine similarity of image i and text i, averaged over i."""
    images, texts = l2_normalize(images), l2_normalize(texts)
    if images.shape != texts.shape:
        raise ValueError(f"one text per image: {images.shape} vs {texts.shape}")
    return float(np.sum(images * texts, axis=-1).mean())


def mean_distinct_pairs_cosine(x) -> Optional[float]:
    """The real photos among themselves (every pair of different photos): the paper's "real images" row.
    None with fewer than two photos."""
    x = l2_normalize(x)
    n = len(x)
    if n < 2:
        return None
    sims = x @ x.T
    return float((sims.sum() - np.trace(sims)) / (n * (n - 1)))


def fidelity_scores(dino_generated, dino_real, clip_generated, clip_real, clip_text) -> Dict[str, float]:
    """The three numbers of the paper from embeddings (rows: images; `clip_text` row i: image i's prompt)."""
    return {"dino": mean_pairwise_cosine(dino_generated, dino_real),
            "clip_i": mean_pairwise_cosine(clip_generated, clip_real),
            "clip_t": mean_paired_cosine(clip_generated, clip_text)}


# ----- prompts ----------------------------------------------------------------------------------------
def has_torch_weights(folder: str) -> bool:
    """True when the folder's weights are PyTorch's (transformers) rather than Paddle's."""
    if os.path.isfile(os.path.join(folder, "model_state.pdparams")):
        return False
    path = os.path.join(folder, "model.safetensors")
    if os.path.isfile(path):
        from safetensors import safe_open

        with safe_open(path, "np") as f:
            return (f.metadata() or {}).get("format") == "pt"
    return os.path.isfile(os.path.join(folder, "pytorch_model.bin"))


@dataclass
class ClipEncoder:
    model: object  # ppdiffusers.transformers.CLIPModel
    tokenizer: object
    preprocess: ImagePreprocess
    batch_size: int = 16

    def image_features(self, images) -> np.ndarray:
        import paddle

        pixels, out = self.preprocess(images), []
        with paddle.no_grad():
            for start in range(0, len(pixels), self.batch_size):
                batch = paddle.to_tensor(pixels[start:start + self.batch_size])
                out.append(self.model.get_image_features(pixel_values=batch).numpy().astype(np.float64))
        return np.concatenate(out)

    def text_features(self, texts: Sequence[str]) -> np.ndarray:
        import paddle

        ids = self.tokenizer(list(texts), padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="np").input_ids
        with paddle.no_grad():
            return self.model.get_text_features(input_ids=paddle.to_tensor(ids)).numpy().astype(np.float64)


def load_clip(name_or_path: str = DEFAULT_CLIP_MODEL, batch_size: int = 16) -> ClipEncoder:
    """CLIP (ppdiffusers' CLIPModel) with its tokenizer and image preprocessing, from a Paddle folder, a
    transformers (PyTorch-layout) folder or a hub id."""
    from ppdiffusers.transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from ppdreambooth.errors import ConfigError

    folder = resolve_model_folder(name_or_path, ["config.json", "preprocessor_config.json", "vocab.json",
                                                 "merges.txt", "tokenizer_config.json", "special_tokens_map.json"])
    if has_torch_weights(folder):
        from ppdiffusers.models.modeling_pytorch_paddle_utils import convert_pytorch_state_dict_to_paddle

        model = CLIPModel(CLIPConfig.from_pretrained(folder))
        weights = read_torch_weights(folder)
        convert_pytorch_state_dict_to_paddle(model, weights)  # transposes Linear weights in place
        missing = sorted(k for k in set(model.state_dict()) - set(weights) if "position_ids" not in k)
        if missing:
            raise ConfigError(f"{folder} lacks {len(missing)} CLIP weights, e.g. {', '.join(missing[:3])}")
        model.set_state_dict({k: v for k, v in weights.items() if k in model.state_dict()})
    else:
        model = CLIPModel.from_pretrained(folder)
    model.eval()
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    size = model.config.vision_config.image_size
    defaults = ImagePreprocess(shortest_edge=size, crop=(size, size), resample=3, mean=CLIP_MEAN, std=CLIP_STD)
    preprocess = ImagePreprocess.from_config(read_json(os.path.join(folder, "preprocessor_config.json")), defaults)
    return ClipEncoder(model, tokenizer, preprocess, batch_size)


class FidelityScorer:
    """The metric models plus the embeddings of the real photos, computed once; `score` takes generated
    images grouped by prompt. Usable on its own (e.g. at checkpoints during training)."""

    metrics = (("dino", "DINO (subject)"), ("clip_i", "CLIP-I (subject)"), ("clip_t", "CLIP-T (prompt)"))

    def __init__(self, clip: ClipEncoder, dino, photos: Sequence):
        self.clip, (self.dino_model, self.dino_preprocess) = clip, dino
        self.real_dino = self.dino_features(photos)
        self.real_clip = clip.image_features(photos)

    def dino_features(self, images) -> np.ndarray:
        return self.dino_model.cls_features(self.dino_preprocess(images))

    def photo_reference(self) -> Dict[str, Optional[float]]:
        """Your photos among themselves (different photos only): the ceiling DINO and CLIP-I can reach."""
        return {"dino": mean_distinct_pairs_cosine(self.real_dino),
                "clip_i": mean_distinct_pairs_cosine(self.real_clip)}

    def score(self, images_by_prompt: Sequence[Sequence], prompts: Sequence[str]) -> dict:
        """{"overall": {dino, clip_i, clip_t}, "per_prompt": [{prompt, dino, clip_i, clip_t}]}."""
        if len(images_by_prompt) != len(prompts):
            raise ValueError(f"{len(images_by_prompt)} groups of images for {len(prompts)} prompts")
        images = [image for group in images_by_prompt for image in group]
        dino, clip = self.dino_features(images), self.clip.image_features(images)
        text_features = self.clip.text_features(prompts)  # row i of `text`: the prompt of image i
        text = np.concatenate([np.repeat(text_features[p:p + 1], len(group), axis=0)
                               for p, group in enumerate(images_by_prompt)])
        per_prompt, start = [], 0
        for prompt, group in zip(prompts, images_by_prompt):
            rows = slice(start, start + len(group))
            start += len(group)
            per_prompt.append({"prompt": prompt, **fidelity_scores(dino[rows], self.real_dino, clip[rows],
                                                                    self.real_clip, text[rows])})
        return {"overall": fidelity_scores(dino, self.real_dino, clip, self.real_clip, text), "per_prompt": per_prompt}
