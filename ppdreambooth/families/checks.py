"""Checks of a model before anything of it is loaded: the shape of --pretrained_model_name_or_path, the component
folders its family needs, and the files in them (JSON configs that parse, weight files that are there and whole).
Each problem is a ConfigError naming the file and what to do, where loading would end in a library traceback."""
from __future__ import annotations

import json
import os
from typing import Optional

from ppdreambooth.errors import ConfigError

WEIGHT_SUFFIXES = (".safetensors", ".pdparams", ".bin")
FETCH_AGAIN = "the file is damaged or incomplete (an interrupted download or copy): fetch the model again"


def read_json_file(path: str) -> dict:
    """A JSON file of a model folder, or a ConfigError naming it when it does not parse."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); {FETCH_AGAIN}.") from None


def safetensors_problem(path: str) -> Optional[str]:
    """What is wrong with a .safetensors file's length or header (None: it is whole). Reads only the header: the
    file must be exactly as long as its header says its tensors end."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"is {size} bytes, too short for a safetensors file"
        header_size = int.from_bytes(head, "little")
        if header_size > size - 8:
            return f"is cut short: {size:,} bytes, its header alone needs {header_size + 8:,}"
        try:
            header = json.loads(f.read(header_size))
            end = max((int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"),
                      default=0)
        except (ValueError, KeyError, TypeError, IndexError):
            return "has a damaged header"
    if size < 8 + header_size + end:
        return f"is cut short: {size:,} of {8 + header_size + end:,} bytes"
    return None


def damaged_file(folder: str) -> Optional[str]:
    """The first damaged JSON or safetensors file in a component folder, described (None when all are whole)."""
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith(".safetensors"):
            problem = safetensors_problem(path)
            if problem:
                return f"{os.path.basename(folder)}/{name} {problem}"
        elif name.endswith(".json"):
            try:
                read_json_file(path)
            except ConfigError:
                return f"{os.path.basename(folder)}/{name} is not valid JSON"
    return None


def check_model_files(path: str, family) -> None:
    """For a local model folder: every JSON file of the family's components parses, and the weighted components
    (denoiser, VAE, text encoders) have weight files that are whole. A hub id is not checked."""
    if not os.path.isdir(path):
        return
    read_json_file(os.path.join(path, "model_index.json"))
    for name in family.components:
        folder = os.path.join(path, name)
        if not os.path.isdir(folder):
            continue  # missing required folders are named by `check_model_folder`
        for file_name in sorted(os.listdir(folder)):
            if file_name.endswith(".json"):
                read_json_file(os.path.join(folder, file_name))
        if name not in (family.denoiser, "vae", *family.text_encoders):
            continue
        check_weight_files(folder, f"{name}/ of {path}", lambda file_name: f"{name}/{file_name} of {path}")


def check_weight_files(folder: str, what: str, name_of) -> None:
    """`folder` holds weight files, and its safetensors files are whole; `what` names the folder and
    `name_of(file)` a file in the messages."""
    weights = [n for n in sorted(os.listdir(folder)) if n.endswith(WEIGHT_SUFFIXES)]
    if not weights:
        raise ConfigError(f"{what} has no weight file (*.safetensors, *.pdparams or *.bin): the model is incomplete; "
                          "fetch it again.")
    for file_name in weights:
        if file_name.endswith(".safetensors"):
            problem = safetensors_problem(os.path.join(folder, file_name))
            if problem:
                raise ConfigError(f"{name_of(file_name)} {problem}; {FETCH_AGAIN}.")


def check_single_file(path: str) -> None:
    problem = safetensors_problem(path)
    if problem:
        raise ConfigError(f"{path} {problem}; {FETCH_AGAIN}.")


def check_model_path(path: str, single_file_config: Optional[str] = None) -> str:
    """Check the shape of --pretrained_model_name_or_path before anything is loaded; returns the folder or hub
    id whose configs describe the model (the model itself, or --single_file_config for a single file)."""
    if path.endswith((".safetensors", ".ckpt")):
        if not os.path.isfile(path):
            raise ConfigError(f"--pretrained_model_name_or_path {path} does not exist.")
        if not path.endswith(".safetensors"):
            raise ConfigError(f"{path}: only .safetensors single-file checkpoints are read (not pickled .ckpt).")
        if not single_file_config:
            raise ConfigError(
                f"{path} is a single-file checkpoint, which carries no configuration, tokenizer or scheduler: pass "
                "--single_file_config with a model folder or hub id of the same architecture "
                "(e.g. runwayml/stable-diffusion-v1-5)."
            )
        return check_model_path(single_file_config)
    if not os.path.isdir(path) and (os.path.exists(path) or path.startswith((".", "/")) or path.count("/") != 1):
        raise ConfigError(
            f"--pretrained_model_name_or_path {path!r} is neither a model folder nor a hub id like 'org/name'."
        )
    return path


def check_model_folder(path: str, family) -> None:
    """For a local model folder, name any component of `family` that it lacks (a hub id is not checked)."""
    if not os.path.isdir(path):
        return  # a hub id: ppdiffusers downloads it
    missing = [c for c in family.required_components if not os.path.isdir(os.path.join(path, c))]
    if missing:
        raise ConfigError(
            f"model folder {path} lacks {', '.join(c + '/' for c in missing)}; a {family.pipeline_class} folder has "
            f"{', '.join(c + '/' for c in family.components)}."
        )


def _is_local(path: str) -> bool:
    """A local path rather than a hub id ("org/name")."""
    return os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") != 1


def check_vae_path(path: str, flag: str = "--pretrained_vae_model_name_or_path") -> None:
    """A replacement VAE given as a folder must be an AutoencoderKL folder with whole weights (a hub id is not
    checked)."""
    if not _is_local(path):
        return
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise ConfigError(f"{flag} {path} is not a VAE folder (no config.json): point it at a folder holding an "
                          "AutoencoderKL's config.json and weights, or at a hub id.")
    class_name = read_json_file(config).get("_class_name")
    if class_name != "AutoencoderKL":
        raise ConfigError(f"{flag} {path} holds a {class_name or 'model of unknown class'}, not a VAE "
                          "(AutoencoderKL).")
    check_weight_files(path, f"{flag} {path}", lambda file_name: f"{flag}: {file_name} of {path}")


def check_tokenizer_path(path: str) -> None:
    """--tokenizer_name given as a folder must hold a CLIP tokenizer (vocab.json and merges.txt)."""
    if not _is_local(path):
        return
    missing = [n for n in ("vocab.json", "merges.txt") if not os.path.isfile(os.path.join(path, n))]
    if missing:
        raise ConfigError(f"--tokenizer_name {path} is not a CLIP tokenizer folder (it lacks "
                          f"{' and '.join(missing)}): point it at a tokenizer folder or a hub id.")
    read_json_file(os.path.join(path, "vocab.json"))
