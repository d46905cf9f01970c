"""Per-block LoRA settings: `--lora_block_ranks`, `--lora_block_alphas`, `--lora_block_lr`.

Each flag is a comma-separated list of `block=value`:

- UNets (SD 1.x/2.x, SDXL): `down`, `mid`, `up` (every block of that part: `down_blocks.*`, `mid_block`,
  `up_blocks.*`), or one block `down.N` / `up.N` (`down_blocks.N`), which wins over its part:
  `down=4,down.2=16,mid=8,up=2`.
- SD3's transformer: a joint block `N` or a range `A-B` (both ends included) of `transformer_blocks.N`:
  `0-5=8,6-11=4`. Ranges must not overlap.

A module outside every listed block keeps `--lora_rank`, `--lora_alpha` and a learning-rate multiplier of 1; a
block given a rank but no alpha keeps `--lora_alpha` (as kohya's block_dims / block_alphas do). Modules outside
all blocks (e.g. `conv_in`, named through `--lora_layers`) always keep the global values.

Checks happen in three steps, each as early as it can: the syntax and the values when the arguments are made
(`parse_block_values`); which naming the family uses, before anything loads (`check_block_kind`); the block
numbers against the model's config, from its `config.json` before the weights load (`check_block_counts`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

from ppdreambooth.errors import ConfigError

UNET_PARTS = ("down", "mid", "up")
BLOCK_FLAGS = ("lora_block_ranks", "lora_block_alphas", "lora_block_lr")
_UNET_KEY = re.compile(r"(down|mid|up)(?:\.(\d+))?")
_RANGE_KEY = re.compile(r"(\d+)(?:-(\d+))?")
_MODULE_BLOCK = (
    (re.compile(r"^(down|up)_blocks\.(\d+)\."), None),
    (re.compile(r"^mid_block\."), "mid"),
    (re.compile(r"^transformer_blocks\.(\d+)\."), "layers"),
)


@dataclass(frozen=True)
class BlockValue:
    """One `block=value` entry: a UNet part (`down`/`mid`/`up`, `index` None for the whole part, or one block) or a
    range `first..last` of SD3 joint blocks (`part` "layers")."""

    part: str
    first: Optional[int]
    last: Optional[int]
    value: float

    @property
    def label(self) -> str:
        if self.part == "layers":
            return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"
        return self.part if self.first is None else f"{self.part}.{self.first}"

    def covers(self, part: str, index: Optional[int]) -> bool:
        if part != self.part:
            return False
        return self.first is None or (index is not None and self.first <= index <= self.last)

    @property
    def specificity(self) -> int:
        return 0 if self.first is None else 1


# flag -> (what the value is, integer?, smallest value allowed, is the smallest itself allowed?)
VALUE_RULES = {
    "lora_block_ranks": ("a rank", True, 1, True),
    "lora_block_alphas": ("an alpha", False, 0.0, False),
    "lora_block_lr": ("a learning-rate multiplier", False, 0.0, True),
}
LARGEST = {"lora_block_ranks": 4096, "lora_block_alphas": 1e6, "lora_block_lr": 1e3}


def _value(flag: str, key: str, text: str) -> float:
    what, integer, low, low_allowed = VALUE_RULES[flag]
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"--{flag}: '{key}={text}' needs {kind} after '=' ({what}).") from None
    high = LARGEST[flag]
    if not math.isfinite(value) or value > high or value < low or (value == low and not low_allowed):
        bound = f">= {low:g}" if low_allowed else f"> {low:g}"
        raise ConfigError(f"--{flag}: '{key}={text}' is out of range: {what} must be {bound} and <= {high:g}.")
    return value


def parse_block_values(flag: str, text: Optional[str]) -> Tuple[BlockValue, ...]:
    """The entries of one block flag (empty when unset). Raises ConfigError on bad syntax, a value out of range, a
    block named twice, overlapping ranges or a mix of UNet names and SD3 block numbers."""
    if text is None:
        return ()
    entries = []
    for item in (p.strip() for p in str(text).split(",")):
        if not item:
            raise ConfigError(f"--{flag} {text!r}: an empty entry; write block=value pairs separated by commas, "
                              "e.g. down=4,mid=8,up=2 (UNets) or 0-5=8,6-11=4 (SD3).")
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or not key or not value:
            raise ConfigError(f"--{flag}: '{item}' is not block=value (e.g. down=4, up.1=8, or 0-5=8 for SD3).")
        unet, numbers = _UNET_KEY.fullmatch(key), _RANGE_KEY.fullmatch(key)
        if unet:
            index = int(unet.group(2)) if unet.group(2) is not None else None
            if unet.group(1) == "mid" and index is not None:
                raise ConfigError(f"--{flag}: '{key}': a UNet has one mid block; write mid=...")
            entries.append(BlockValue(unet.group(1), index, index, _value(flag, key, value)))
        elif numbers:
            first = int(numbers.group(1))
            last = int(numbers.group(2)) if numbers.group(2) is not None else first
            if last < first:
                raise ConfigError(f"--{flag}: the range '{key}' runs backwards; write {last}-{first}.")
            entries.append(BlockValue("layers", first, last, _value(flag, key, value)))
        else:
            raise ConfigError(f"--{flag}: unknown block '{key}'. UNets (SD, SDXL) name down, mid, up or one block "
                              "down.N / up.N; SD3 names joint blocks by number or range, e.g. 0-5.")
    kinds = {e.part == "layers" for e in entries}
    if len(kinds) > 1:
        raise ConfigError(f"--{flag} {text!r} mixes UNet blocks (down/mid/up) and SD3 block numbers; a model has "
                          "one kind.")
    for n, a in enumerate(entries):
        for b in entries[n + 1:]:
            same = a.part == b.part and a.first == b.first and a.last == b.last
            overlap = a.part == b.part == "layers" and a.first <= b.last and b.first <= a.last
            if same or overlap:
                raise ConfigError(f"--{flag}: blocks '{a.label}' and '{b.label}' overlap; give each block once.")
    return tuple(entries)


def block_of(module: str) -> Optional[Tuple[str, Optional[int]]]:
    """The block a denoiser module lies in: ("down", 1) for `down_blocks.1.…`, ("mid", None), ("layers", 7) for
    SD3's `transformer_blocks.7.…`; None outside every block."""
    for pattern, part in _MODULE_BLOCK:
        found = pattern.match(module)
        if found:
            if part == "mid":
                return "mid", None
            if part == "layers":
                return "layers", int(found.group(1))
            return found.group(1), int(found.group(2))
    return None


def value_for(entries: Sequence[BlockValue], module: str, default: float) -> float:
    """The value `entries` give `module` (the most specific entry covering its block), else `default`."""
    block = block_of(module)
    if block is None:
        return default
    covering = [e for e in entries if e.covers(*block)]
    return max(covering, key=lambda e: e.specificity).value if covering else default


def check_block_kind(flag: str, entries: Sequence[BlockValue], family_name: str, transformer: bool) -> None:
    """Refuse UNet block names for SD3's transformer and SD3 block numbers for a UNet."""
    if not entries:
        return
    if transformer and entries[0].part != "layers":
        raise ConfigError(f"--{flag}: '{entries[0].label}' names a UNet block, but {family_name}'s transformer has "
                          "numbered joint blocks: give numbers or ranges, e.g. 0-5=8,6-11=4.")
    if not transformer and entries[0].part == "layers":
        raise ConfigError(f"--{flag}: '{entries[0].label}' is an SD3 block number, but a {family_name} UNet has "
                          "down, mid and up blocks: e.g. down=4,mid=8,up=2 (or down.1=8 for one block).")


def block_counts(denoiser_config: dict) -> Dict[str, int]:
    """How many blocks of each part a denoiser config has (`layers`: SD3's joint blocks)."""
    if "num_layers" in denoiser_config and "down_block_types" not in denoiser_config:
        return {"layers": int(denoiser_config["num_layers"])}
    mid = denoiser_config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    return {"down": len(denoiser_config.get("down_block_types", ())), "mid": 0 if mid is None else 1,
            "up": len(denoiser_config.get("up_block_types", ()))}


def check_block_counts(flag: str, entries: Sequence[BlockValue], counts: Dict[str, int], where: str) -> None:
    """Refuse a block the model does not have (`counts` from `block_counts`; `where` names the model)."""
    for entry in entries:
        have = counts.get(entry.part, 0)
        if entry.part == "layers" and entry.last >= have:
            raise ConfigError(f"--{flag}: '{entry.label}' goes beyond the {have} joint blocks of {where} "
                              f"(numbered 0-{have - 1}).")
        if entry.part == "mid" and not have:
            raise ConfigError(f"--{flag}: {where} has no mid block.")
        if entry.part in ("down", "up") and entry.first is not None and entry.first >= have:
            raise ConfigError(f"--{flag}: '{entry.label}' goes beyond the {have} {entry.part} blocks of {where} "
                              f"({entry.part}.0-{entry.part}.{have - 1}).")


def check_blocks_for_model(settings: Dict[str, Sequence[BlockValue]], family, denoiser_config: dict,
                           where: str) -> None:
    """Every block flag (`settings`: flag -> entries) against the family's naming and the denoiser's config."""
    counts = block_counts(dict(denoiser_config))
    for flag, entries in settings.items():
        check_block_kind(flag, entries, family.name, family.lora_blocks_numbered)
        check_block_counts(flag, entries, counts, where)


def describe(entries: Sequence[BlockValue]) -> str:
    """The entries as the flag writes them (`down=4,mid=8`)."""
    return ",".join(f"{e.label}={e.value:g}" for e in entries)


__all__ = ["BLOCK_FLAGS", "BlockValue", "block_counts", "block_of", "check_block_counts", "check_block_kind",
           "check_blocks_for_model", "describe", "parse_block_values", "value_for"]
