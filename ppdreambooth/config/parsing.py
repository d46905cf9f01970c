"""Turn `[config.json] [--flag value ...]` into the three argument dataclasses.

PaddleNLP's `PdArgumentParser` builds the flags from the dataclasses; this module adds what it lacks:
command-line flags override JSON values, an unknown key or flag is an error that names it and
suggests the nearest valid name, a wrong value names its flag, and the seed script's flag names are
folded into the Trainer's fields (`SeedFlagAliases`) with conflicting values refused.
"""
from __future__ import annotations

import argparse
import importlib.util
import difflib
import json
from typing import Dict, List, Optional, Sequence, Tuple

from paddlenlp.trainer import PdArgumentParser

from ppdreambooth.config.arguments import (
    ALIAS_TARGETS,
    DataArguments,
    DreamBoothTrainingArguments,
    ModelArguments,
    SeedFlagAliases,
)
from ppdreambooth.config.concepts import resolve_concepts
from ppdreambooth.config.ranges import check_given
from ppdreambooth.errors import ConfigError

ARGUMENT_CLASSES = (ModelArguments, DataArguments, DreamBoothTrainingArguments, SeedFlagAliases)


class _Parser(PdArgumentParser):
    """Raises ConfigError instead of printing the (very long) usage and exiting."""

    def error(self, message):
        raise ConfigError(message)


def build_parser(prog: str = "ppdreambooth.train") -> PdArgumentParser:
    return _Parser(ARGUMENT_CLASSES, prog=prog, allow_abbrev=False)


def _known_names(parser: argparse.ArgumentParser) -> List[str]:
    return sorted({opt[2:] for action in parser._actions for opt in action.option_strings if opt.startswith("--")})


def _unknown_error(name: str, known: Sequence[str], where: str) -> ConfigError:
    near = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f" Did you mean '{near[0]}'?" if near else " See --help for the valid names."
    return ConfigError(f"unknown {where} '{name}'.{hint}")


def json_to_argv(path: str, known: Sequence[str]) -> List[str]:
    """Read a JSON config as flags. A `null` value means "leave the default"."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist.") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold one JSON object of flag names and values.")
    argv: List[str] = []
    for key, value in data.items():
        if key not in known:
            raise _unknown_error(key, known, f"key in {path}:")
        if value is None:
            continue
        if key == "concepts" and not isinstance(value, str):
            argv += [f"--{key}", json.dumps(value)]
            continue
        values = value if isinstance(value, list) else [value]
        argv.append(f"--{key}")
        argv.extend(str(v) for v in values)
    return argv


def _given_values(parser: argparse.ArgumentParser, argv: List[str]) -> Dict[str, object]:
    """Parse `argv` keeping only the flags that were actually given (no defaults)."""
    saved = {}
    for action in parser._actions:
        if action.dest != "help":
            saved[action] = action.default
            action.default = argparse.SUPPRESS
    try:
        namespace, rest = parser.parse_known_args(argv)
    finally:
        for action, default in saved.items():
            action.default = default
    if rest:
        flag = next((r for r in rest if r.startswith("-")), rest[0])
        if flag.startswith("--"):
            raise _unknown_error(flag[2:].split("=")[0], _known_names(parser), "flag")
        raise ConfigError(f"unexpected value '{flag}' (values follow their --flag).")
    return vars(namespace)


def _fold_aliases(given: Dict[str, object]) -> None:
    for alias, target in ALIAS_TARGETS.items():
        if alias not in given:
            continue
        value = given.pop(alias)
        if target in given and given[target] != value:
            raise ConfigError(
                f"--{alias} {value} and --{target} {given[target]} are the same setting with different values; "
                "give only one of them."
            )
        given[target] = value
    precision = given.pop("mixed_precision", None)
    if precision is not None:
        for name in ("fp16", "bf16"):
            wanted = precision == name
            if given.get(name, wanted) != wanted:
                raise ConfigError(f"--mixed_precision {precision} contradicts --{name} {given[name]}.")
            given[name] = wanted


def check_report_to(report_to) -> None:
    """The loggers other than VisualDL need their packages: say which to install before anything runs."""
    for logger_name, module, package in (("tensorboard", "tensorboardX", "tensorboardX"), ("wandb", "wandb", "wandb")):
        if logger_name in report_to and importlib.util.find_spec(module) is None:
            raise ConfigError(f"--report_to {logger_name} needs the {package} package: pip install {package} "
                              "(or use --report_to visualdl, the default, or none).")


LORA_DEFAULT_LEARNING_RATE = 1e-4  # the seed LoRA README's rate; 5e-6 barely moves rank-4 adapters
PRODIGY_DEFAULT_LEARNING_RATE = 1.0  # Prodigy estimates the step size; the rate only scales it


def parse_args(
    argv: Optional[Sequence[str]] = None,
) -> Tuple[ModelArguments, DataArguments, DreamBoothTrainingArguments]:
    """Parse `[config.json] [--flag value ...]`; flags on the command line override the JSON file."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    known = _known_names(parser)
    if argv and argv[0].endswith(".json"):
        argv = json_to_argv(argv[0], known) + argv[1:]
    given = _given_values(parser, argv)
    check_given(given, set(ALIAS_TARGETS))  # the seed script's names, before they become the Trainer's
    _fold_aliases(given)
    if given.get("optim") == "prodigy" and "learning_rate" not in given:
        given["learning_rate"] = PRODIGY_DEFAULT_LEARNING_RATE
    if given.get("use_lora") and "learning_rate" not in given:
        given["learning_rate"] = LORA_DEFAULT_LEARNING_RATE
    outputs = []
    for cls in ARGUMENT_CLASSES[:3]:
        names = {f.name for f in cls.__dataclass_fields__.values() if f.init}
        try:
            outputs.append(cls(**{k: v for k, v in given.items() if k in names}))
        except ConfigError:
            raise
        except ValueError as e:  # checks inside PaddleNLP's TrainingArguments
            raise ConfigError(str(e)) from None
    model_args, data_args, training_args = outputs
    data_args.concept_list = resolve_concepts(data_args)
    check_report_to(training_args.report_to)
    if not model_args.pretrained_model_name_or_path:
        raise ConfigError("--pretrained_model_name_or_path is required (a ppdiffusers model folder or hub id).")
    if training_args.stop_text_encoder_training is not None and not model_args.train_text_encoder:
        raise ConfigError("--stop_text_encoder_training needs --train_text_encoder.")
    if training_args.text_encoder_learning_rate is not None and not (model_args.train_text_encoder
                                                                     or model_args.train_text_encoder_ti):
        raise ConfigError("--text_encoder_learning_rate needs --train_text_encoder (or --train_text_encoder_ti, "
                          "whose new tokens it sets the rate of).")
    formats = training_args.export_format_list
    if "kohya" in formats and not model_args.use_lora:
        raise ConfigError("--export_formats kohya exports LoRA adapters; it needs --use_lora.")
    if "single-file" in formats and model_args.use_lora:
        raise ConfigError("--export_formats single-file exports a full model; with --use_lora use kohya or diffusers.")
    if not data_args.concept_list:
        raise ConfigError("--instance_data_dir and --instance_prompt are required (or a --concepts list).")
    if data_args.instance_data_dir and not data_args.instance_prompt or (
            data_args.instance_prompt and not data_args.instance_data_dir):
        raise ConfigError("--instance_data_dir and --instance_prompt go together; give both.")
    return model_args, data_args, training_args

