"""`export --format lora --rank R`: a LoRA of rank R from a full fine-tune (`lora_extraction`), or a LoRA run's
adapters at rank R (`lora_resize`). Either way the output folder is what a LoRA run writes: our
`paddle_lora_weights.safetensors` (same keys, alpha = rank, so scale 1) and a model card naming the base model and
family, so `export --format diffusers|kohya|merged`, `generate --lora` and `evaluate` read it unchanged.

Options are checked before any weight is read. `--conv_rank` (kohya: adapters on 3x3 convolutions too) is refused:
ppdreambooth's LoRA file has adapters on Linear layers only, and its readers assume so (`merge.fold_adapters` folds
A @ B into a Linear's [in, out] weight, the kohya and diffusers exports transpose 2-D matrices; ppdiffusers 0.29's
SD3 loader reads the transformer's attention only). A convolution adapter written there would be dropped or
misread by them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional

from ppdreambooth.errors import ExportError
from ppdreambooth.interop.lora_extraction import ComponentResult, check_base_model, extract_lora
from ppdreambooth.interop.lora_resize import check_resize, lora_file, resize_lora
from ppdreambooth.interop.lowrank import kept_energy, relative_error
from ppdreambooth.modeling.lora import LORA_WEIGHTS_NAME

DEFAULT_CLAMP_QUANTILE = 0.99  # kohya's
DEFAULT_MIN_DIFF = 0.01  # kohya's


@dataclass(frozen=True)
class LoraOptions:
    """The flags of `--format lora` (None: not given)."""

    rank: Optional[int] = None
    clamp_quantile: Optional[float] = None
    min_diff: Optional[float] = None
    conv_rank: Optional[int] = None

    def given(self) -> List[str]:
        return [f"--{k}" for k, v in vars(self).items() if v is not None]


def refuse_lora_options(fmt: str, options: LoraOptions) -> None:
    """The `--format lora` flags with another format would be ignored: refused instead."""
    if fmt != "lora" and options.given():
        raise ExportError(f"{options.given()[0]} applies to --format lora only (this export writes {fmt}).")


def check_options(options: LoraOptions, full_run: bool) -> None:
    if options.rank is None:
        raise ExportError("--format lora needs --rank R, the rank of the LoRA to write (e.g. --rank 8).")
    if options.rank <= 0:
        raise ExportError(f"--rank must be a positive integer (got {options.rank}).")
    if options.conv_rank is not None:
        raise ExportError("--conv_rank is not supported: ppdreambooth's LoRA file holds adapters on Linear layers "
                          "only, and its readers (load_lora_weights for SD3, --format merged|kohya|diffusers) would "
                          "drop or misread convolution adapters. Leave it out; the change of convolutions is "
                          "reported as not in the LoRA.")
    if options.clamp_quantile is not None and not 0 < options.clamp_quantile <= 1:
        raise ExportError(f"--clamp_quantile must be in (0, 1] (got {options.clamp_quantile}); 1 clamps nothing.")
    if options.min_diff is not None and options.min_diff < 0:
        raise ExportError(f"--min_diff must be >= 0 (got {options.min_diff}).")
    if not full_run:
        extra = [flag for flag in ("--clamp_quantile", "--min_diff") if flag in options.given()]
        if extra:
            raise ExportError(f"{extra[0]} applies to extraction from a full fine-tune; resizing a LoRA run takes "
                              "--rank only.")


@dataclass
class LoraWritten:
    """What `write_lora` wrote, and the numbers it prints."""

    path: str
    card: str
    rank: int
    origin: str
    results: List[ComponentResult]

    def report(self) -> str:
        extracted = [r for r in self.results if r.parts]
        parts = [p for r in extracted for p in r.parts]
        params = sum(p.down.size + p.up.size for p in parts)
        lines = [f"{self.origin}: {self.path}"]
        for r in self.results:
            if not r.parts:
                lines.append(f"  {r.name}: {r.note}")
                continue
            line = (f"  {r.name}: {len(r.parts)} modules, relative error {relative_error(r.parts):.3g} "
                    f"(||dW - A@B||_F / ||dW||_F), kept energy {100 * kept_energy(r.parts):.2f}%")
            energy = sum(p.energy for p in r.parts)
            if r.outside > 0:
                share = (r.outside / (r.outside + energy)) ** 0.5
                line += f"; {100 * share:.1f}% of its weight change is outside the adapted modules (not in the LoRA)"
            lines.append(line)
        lines.append(f"  all: relative error {relative_error(parts):.3g}, kept energy "
                     f"{100 * kept_energy(parts):.2f}%")
        size = os.path.getsize(self.path)
        lines.append(f"  adapter: rank {self.rank}, {len(parts)} modules, {params:,} parameters, file "
                     f"{size / 2 ** 20:.2f} MB ({size:,} bytes); model card {self.card}")
        return "\n".join(lines)


def write_lora(run: str, out: str, options: LoraOptions, model_family: Optional[str] = None,
               base_model: Optional[str] = None, log=print) -> LoraWritten:
    """Write `run` (a finished full or LoRA run) as a rank-`options.rank` LoRA folder `out`."""
    from ppdreambooth.families import detect_family
    from ppdreambooth.interop.exports import lora_family
    from ppdreambooth.interop.model_card import read_model_card, write_derived_lora_card
    from ppdreambooth.modeling.lora import write_lora_states

    full = os.path.isfile(os.path.join(run, "model_index.json")) and not os.path.isfile(lora_file(run))
    if not (full or os.path.isfile(lora_file(run))):
        raise ExportError(f"{run} holds no finished run (no model_index.json or {LORA_WEIGHTS_NAME}).")
    check_options(options, full)
    if os.path.abspath(out) == os.path.abspath(run) or out.endswith(".safetensors"):
        raise ExportError(f"--format lora writes a new folder (a {LORA_WEIGHTS_NAME} and a model card); pass "
                          f"--out <folder> other than the run itself (got {out}).")
    if full:
        family = detect_family(run, model_family)
        base = check_base_model(run, base_model, family)
        clamp = DEFAULT_CLAMP_QUANTILE if options.clamp_quantile is None else options.clamp_quantile
        min_diff = DEFAULT_MIN_DIFF if options.min_diff is None else options.min_diff
        results = extract_lora(run, base, family, options.rank, clamp, min_diff, log)
        origin = (f"rank-{options.rank} LoRA extracted from the full fine-tune {run} against {base} (truncated SVD "
                  f"of each adapted weight's change; clamp quantile {clamp:g}, text encoders kept above a change of "
                  f"{min_diff:g})")
    else:
        family = lora_family(run, model_family, base_model)
        old_rank = check_resize(run, options.rank)
        base = base_model or read_model_card(run).get("base_model")
        results = resize_lora(run, options.rank)
        origin = f"the rank-{old_rank} LoRA run {run} resized to rank {options.rank} (truncated SVD of each A @ B)"
    states = {r.name: r.state for r in results if r.parts}
    if not states:
        raise ExportError(f"nothing to write: {run} changed none of the modules a {family.name} LoRA adapts.")
    os.makedirs(out, exist_ok=True)
    path = write_lora_states(out, family, states)
    card = write_derived_lora_card(out, base, family, options.rank, origin[0].upper() + origin[1:],
                                   any(name != family.denoiser for name in states))
    return LoraWritten(path, card, options.rank, origin, results)
