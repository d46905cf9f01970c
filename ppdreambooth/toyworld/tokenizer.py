"""A CLIP tokenizer for the toy world in which every world word, and the DreamBooth identifier, is one token.

CLIP's tokenizer is byte-level BPE: a word starts as characters (the last one marked `</w>`) and pairs are merged
in rank order. A word becomes a single token only if the merges chain all the way through it, and one word's
early merges can cut into another word first (`r e` from "red" firing inside "green"). So the merges are grown
greedily: each word is tokenized with the merges so far and, while it is still several tokens, a merge of its
first two tokens is appended. A merge appended last never changes a word that already merges to one token (a
word's tokenization only reaches unranked pairs once it is done), so the loop converges with every word whole.
The full byte alphabet stays in the vocabulary, so any other word still tokenizes, character by character.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence, Tuple

from ppdreambooth.families.tiny import byte_alphabet

from .world import SUBJECT, VOCABULARY

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
MODEL_MAX_LENGTH = 16  # the longest world caption is 9 words + start + end
IDENTIFIER = SUBJECT.identifier  # "sks": a token of its own that pretraining never shows


def world_words() -> Tuple[str, ...]:
    """Words that must be single tokens: the world's vocabulary plus the subject's identifier."""
    return tuple(sorted(set(VOCABULARY) | {IDENTIFIER}))


def apply_merges(word: str, ranks: Dict[Tuple[str, str], int]) -> Tuple[str, ...]:
    """The BPE of one word, as CLIPTokenizer.bpe computes it (lowest-ranked pair first, all its occurrences)."""
    parts = tuple(word[:-1]) + (word[-1] + "</w>",)
    while len(parts) > 1:
        pairs = set(zip(parts, parts[1:]))
        best = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = tuple(merged)
    return parts


def grow_merges(words: Sequence[str]) -> List[Tuple[str, str]]:
    """Merges, in rank order, that turn each of `words` into one token (see the module docstring)."""
    merges: List[Tuple[str, str]] = []
    ranks: Dict[Tuple[str, str], int] = {}
    for word in words:
        parts = apply_merges(word, ranks)
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            parts = apply_merges(word, ranks)
    return merges


def tokenizer_files(words: Sequence[str] = ()) -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
    """(vocab, merges): the byte alphabet, each character as a word end, every merge result, the specials."""
    words = tuple(words) or world_words()
    merges = grow_merges(words)
    alphabet = byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges] + list(SPECIAL_TOKENS)
    vocab: Dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def write_tokenizer_files(folder: str) -> Tuple[str, str]:
    """Write vocab.json and merges.txt into `folder`; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    vocab, merges = tokenizer_files()
    vocab_path, merges_path = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    with open(vocab_path, "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(merges_path, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return vocab_path, merges_path


def build_world_tokenizer(folder: str):
    """A ppdiffusers CLIPTokenizer over the world vocabulary (files kept in `folder`, which the pipeline copies
    when saved), padding with `<|endoftext|>` to MODEL_MAX_LENGTH."""
    from ppdiffusers.transformers import CLIPTokenizer

    vocab_path, merges_path = write_tokenizer_files(folder)
    return CLIPTokenizer(vocab_path, merges_path, model_max_length=MODEL_MAX_LENGTH)


def single_token_words(tokenizer, words: Sequence[str] = ()) -> Dict[str, bool]:
    """For each word, whether the tokenizer maps it to exactly one token (start and end tokens aside)."""
    words = tuple(words) or world_words()
    return {word: len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1 for word in words}
