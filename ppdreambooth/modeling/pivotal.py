"""Pivotal tuning (`--train_text_encoder_ti`): the identifier becomes new tokens trained as textual inversion.

The word standing for the subject (`--token_abstraction`, e.g. `sks`) already means something to the text
encoder. With pivotal tuning it is replaced in the instance prompts by `--num_new_tokens_per_abstraction` new
tokens `<s0><s1>...`, added to every CLIP tokenizer, whose embeddings train beside the LoRA or full fine-tune
for the first `int(--train_text_encoder_ti_frac * max_train_steps)` steps and are then frozen.

The new vectors are a small parameter of their own ([n_new, width] per CLIP encoder, `PivotalTokens`): the
encoder's embedding table is never resized or trained, so every original row stays bit-identical and the
optimizer state holds n_new x width values per encoder. The table's lookup is replaced on the encoder instance
(ids below the original vocabulary read the table, the others the new vectors); ppdiffusers has no embedding
that keeps added rows apart from a frozen table, hence this small wrapper. The vectors start as diffusers'
advanced script starts them: random normal with the standard deviation of the existing rows (not the
identifier's own embedding: pivotal tuning exists to drop the meaning that word already has), or, with
`--initializer_concept`, at the embedding rows of the concept's tokens (token i at the concept's token i modulo
its length; diffusers' `--initializer_concept`, kohya's `--init_word`). In the toy world the default two tokens
make a two-word look ('a <s0><s1> cross'), a form none of its captions has (their looks are one word or four), and
the small encoder then loses the background words however the tokens start; one token works (README, pivotal
tuning).

The final vectors are written as diffusers' advanced script writes them (`<name>_emb.safetensors` with `clip_l`,
and `clip_g` for SDXL), which `load_textual_inversion(state["clip_l"], token=[...], text_encoder=...,
tokenizer=...)` reads in ppdiffusers and in diffusers.
"""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import paddle

EMBEDDINGS_SUFFIX = "_emb.safetensors"


@dataclass(frozen=True)
class PivotalSpec:
    """What `--token_abstraction`, `--num_new_tokens_per_abstraction` and `--train_text_encoder_ti_frac` ask."""

    token_abstraction: str = "sks"
    num_tokens: int = 2
    train_fraction: float = 0.5
    initializer_concept: Optional[str] = None

    @property
    def tokens(self) -> List[str]:
        return [f"<s{i}>" for i in range(self.num_tokens)]

    @property
    def replacement(self) -> str:
        return "".join(self.tokens)

    def apply(self, prompt: Optional[str]) -> Optional[str]:
        """`prompt` with every whole-word occurrence of the abstraction replaced by the new tokens."""
        if prompt is None:
            return None
        return self._pattern(self.token_abstraction).sub(self.replacement, prompt)

    def appears_in(self, prompt: str) -> bool:
        return bool(self._pattern(self.token_abstraction).search(prompt or ""))

    @staticmethod
    def _pattern(word: str):
        return re.compile(rf"(?<![\w<]){re.escape(word)}(?![\w>])")

    def freeze_step(self, max_steps: int) -> int:
        """The step after which the new vectors stop training (the same in every run and every resume)."""
        return int(self.train_fraction * max_steps)


def spec_from_arguments(model_args) -> Optional[PivotalSpec]:
    """The pivotal-tuning settings of the model arguments (None without --train_text_encoder_ti)."""
    if not getattr(model_args, "train_text_encoder_ti", False):
        return None
    return PivotalSpec(model_args.token_abstraction, model_args.num_new_tokens_per_abstraction,
                       model_args.train_text_encoder_ti_frac, getattr(model_args, "initializer_concept", None))


def concept_ids(tokenizer, concept: str) -> List[int]:
    """The token ids of `--initializer_concept` (no start/end tokens). CLIP's byte-level BPE reads any text, so
    unknown words come out as pieces, never as nothing."""
    return [int(i) for i in tokenizer(concept, add_special_tokens=False)["input_ids"]]


def tokens_in_vocabulary(tokenizer, tokens: List[str]) -> List[str]:
    """The `tokens` the tokenizer already knows as whole tokens."""
    vocab = tokenizer.get_vocab()
    return [t for t in tokens if t in vocab]


def add_tokens(encoder, tokenizer, tokens: List[str], vectors: paddle.Tensor) -> int:
    """Add `tokens` to `tokenizer` and make `encoder` read `vectors` ([len(tokens), width]) for them, its own table
    (left as it is) for every other id; returns the first new id (the tokenizer's former length)."""
    offset = len(tokenizer)
    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if list(ids) != list(range(offset, offset + len(tokens))):
        raise ValueError(f"the new tokens got ids {ids}, expected {offset}..{offset + len(tokens) - 1}")
    table = encoder.get_input_embeddings()
    weight = table.weight

    def forward(ids):
        original = paddle.nn.functional.embedding(paddle.clip(ids, max=offset - 1), weight)
        new = paddle.nn.functional.embedding(paddle.clip(ids - offset, min=0), vectors).astype(original.dtype)
        return paddle.where((ids >= offset).unsqueeze(-1), new, original)

    table.forward = forward
    return offset


class PivotalTokens(paddle.nn.Layer):
    """The new token vectors of each CLIP encoder (parameter name = the encoder's subfolder name), and their lookup.

    `encoders`/`tokenizers`: subfolder name -> component, paired in family order. The tokens are added to each
    tokenizer here; each encoder's embedding lookup is replaced so that ids >= the tokenizer's former length read
    the new vectors. Raises `ConfigError` when a tokenizer already holds one of the token strings."""

    def __init__(self, spec: PivotalSpec, encoders: Dict[str, paddle.nn.Layer], tokenizers: Dict[str, object]):
        super().__init__()
        from ppdreambooth.errors import ConfigError

        self.spec, self.frozen = spec, False
        self.offsets: Dict[str, int] = {}
        for (name, encoder), tokenizer in zip(encoders.items(), tokenizers.values()):
            known = tokens_in_vocabulary(tokenizer, spec.tokens)
            if known:
                raise ConfigError(f"--num_new_tokens_per_abstraction: the tokenizer of {name} already has "
                                  f"{', '.join(known)}; pivotal tuning needs token strings of its own. Use a model "
                                  "whose tokenizer has no <sN> tokens.")
            table = encoder.get_input_embeddings()
            vectors = self.create_parameter([spec.num_tokens, table.weight.shape[1]], dtype="float32",
                                            default_initializer=paddle.nn.initializer.Assign(
                                                self.start_vectors(spec, table.weight, tokenizer)))
            self.add_parameter(name, vectors)
            self.offsets[name] = add_tokens(encoder, tokenizer, spec.tokens, vectors)
            table.weight.stop_gradient = True  # even when the encoder trains (--train_text_encoder): rows unchanged

    @staticmethod
    def start_vectors(spec: PivotalSpec, table: paddle.Tensor, tokenizer) -> paddle.Tensor:
        """[num_tokens, width]: the concept's rows in turn with --initializer_concept, else random normal with the
        standard deviation of the table's rows."""
        if spec.initializer_concept:
            ids = concept_ids(tokenizer, spec.initializer_concept)
            picks = paddle.to_tensor([ids[i % len(ids)] for i in range(spec.num_tokens)])
            return paddle.gather(table.astype("float32"), picks)
        std = float(table.astype("float32").std())
        return paddle.randn([spec.num_tokens, table.shape[1]]) * std

    def vectors(self) -> Dict[str, paddle.Tensor]:
        return {name: getattr(self, name) for name in self.offsets}

    def norms(self) -> Dict[str, float]:
        """Mean L2 norm of the new vectors of each encoder (logged: textual inversion drifts by growing them)."""
        return {name: float(paddle.linalg.norm(v.astype("float32"), axis=-1).mean()) for name, v in self.vectors().items()}

    def set_learning_rate_ratio(self, ratio: float) -> None:
        for vectors in self.vectors().values():
            vectors.optimize_attr["learning_rate"] = 0.0 if self.frozen else ratio

    def freeze(self) -> None:
        """Stop training the vectors: AdamW with a zero rate changes neither them nor (decoupled) their decay; the
        caller then serves their prompts from the cache, so they get no gradient either."""
        self.frozen = True
        self.set_learning_rate_ratio(0.0)


# ----- files -----------------------------------------------------------------------------------------------
def embeddings_path(output_dir: str) -> str:
    """`<output_dir>/<name>_emb.safetensors`, the name diffusers' advanced script gives the file."""
    name = os.path.basename(os.path.normpath(os.path.abspath(output_dir)))
    return os.path.join(output_dir, name + EMBEDDINGS_SUFFIX)


def save_embeddings(tokens: PivotalTokens, file_keys: Dict[str, str], output_dir: str) -> str:
    """Write the vectors in float32 under the keys textual-inversion loaders read (`file_keys`: encoder -> key,
    `clip_l`/`clip_g`); the token strings and abstraction go into the file's metadata (read by generate)."""
    from safetensors.numpy import save_file

    state = {file_keys[name]: np.ascontiguousarray(v.astype("float32").numpy()) for name, v in tokens.vectors().items()}
    path = embeddings_path(output_dir)
    metadata = {"token_abstraction": tokens.spec.token_abstraction, "tokens": ",".join(tokens.spec.tokens)}
    save_file(state, path + ".tmp", metadata=metadata)
    os.replace(path + ".tmp", path)
    return path


def find_embeddings(*folders: Optional[str]) -> Optional[str]:
    """The `*_emb.safetensors` of a training output folder (or of a LoRA folder), if there is one."""
    for folder in folders:
        if folder and os.path.isdir(folder):
            found = sorted(glob.glob(os.path.join(folder, "*" + EMBEDDINGS_SUFFIX)))
            if found:
                return found[0]
    return None


def read_embeddings(path: str) -> Tuple[Dict[str, np.ndarray], PivotalSpec]:
    from safetensors import safe_open
    from safetensors.numpy import load_file

    with safe_open(path, framework="np") as f:
        metadata = f.metadata() or {}
    tokens = [t for t in metadata.get("tokens", "").split(",") if t]
    state = load_file(path)
    spec = PivotalSpec(metadata.get("token_abstraction", ""), len(tokens) or len(next(iter(state.values()))))
    return state, spec


def kohya_bundle(path: str) -> Dict[str, np.ndarray]:
    """The embeddings as A1111/kohya bundle them into a LoRA file, named by the abstraction (the word A1111 then
    replaces in prompts): SD `bundle_emb.<name>.string_to_param.*`, SDXL `bundle_emb.<name>.clip_l` / `.clip_g`."""
    state, spec = read_embeddings(path)
    name = spec.token_abstraction or "pivotal"
    if set(state) == {"clip_l"}:
        return {f"bundle_emb.{name}.string_to_param.*": state["clip_l"]}
    return {f"bundle_emb.{name}.{key}": value for key, value in state.items()}


def load_into_pipeline(pipe, path: str, file_keys: Dict[str, str]) -> PivotalSpec:
    """Load a `*_emb.safetensors` into a ppdiffusers pipeline, once per CLIP encoder (`file_keys`: encoder
    subfolder -> key): with the pipeline's own `load_textual_inversion` (SD, SDXL), else (SD3, whose pipeline has
    no such loader in ppdiffusers 0.29) with the lookup training used, so that the pipeline's own prompt encoding
    (negative prompts and guidance included) reads the tokens; returns the spec whose `apply` rewrites prompts."""
    state, spec = read_embeddings(path)
    for n, (encoder_name, key) in enumerate(file_keys.items()):
        tokenizer_name = "tokenizer" if n == 0 else f"tokenizer_{n + 1}"
        encoder, tokenizer = getattr(pipe, encoder_name), getattr(pipe, tokenizer_name)
        if hasattr(pipe, "load_textual_inversion"):  # the loader users call themselves
            pipe.load_textual_inversion(paddle.to_tensor(state[key]), token=spec.tokens, text_encoder=encoder,
                                        tokenizer=tokenizer)
        else:
            add_tokens(encoder, tokenizer, spec.tokens, paddle.to_tensor(state[key]).astype(encoder.dtype))
    return spec


def load_if_present(family, pipe, *folders: Optional[str]) -> Optional[PivotalSpec]:
    """Load the new tokens of a pivotal-tuning run found in `folders` (a trained model or LoRA folder) into `pipe`;
    returns the spec whose `apply` writes the abstraction as the tokens in prompts, or None when there are none."""
    path = find_embeddings(*folders)
    if path is None:
        return None
    return load_into_pipeline(pipe, path, family.textual_inversion_keys)
