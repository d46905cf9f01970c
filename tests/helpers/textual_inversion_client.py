"""Runs in the PyTorch environment (torch + diffusers from PyPI), never imports Paddle.

    python textual_inversion_client.py <diffusers SD pipeline folder> <*_emb.safetensors> <prompt> <outputs.npz>

Loads the folder with diffusers, the new tokens with `load_textual_inversion(state["clip_l"], token=[...],
text_encoder=..., tokenizer=...)` as the model card says, and writes the token ids (`input_ids`) and the text
encoder's last hidden state (`hidden`) for the prompt.
"""
import sys

import numpy as np
import torch


def main(folder, embeddings, prompt, outputs):
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open
    from safetensors.torch import load_file

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    with safe_open(embeddings, framework="pt") as f:
        tokens = f.metadata()["tokens"].split(",")
    state = load_file(embeddings)
    pipe.load_textual_inversion(state["clip_l"], token=tokens, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]
    np.savez(outputs, input_ids=ids.numpy(), hidden=hidden.numpy())


if __name__ == "__main__":
    main(*sys.argv[1:])
