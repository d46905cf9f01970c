"""The output folder of a run, on one machine or several: one run per folder (the lock), who writes it, and the
checkpoint every rank resumes from.

PaddleNLP's `should_save` names the writing ranks: global rank 0 or, with `--save_on_each_node`, the first rank of
every node (local rank 0). Which of the two a folder needs is tested, not assumed (`nodes.seen_by_every_rank`):
a folder every node sees, given one writer per node, would get the same checkpoints written into it by several
processes at once; a folder on each node's own disk, given a single writer, would leave the other nodes without
the checkpoints they resume from. Both are refused before any model loads. With a folder per node, each node's
writer locks, checks and verifies its own copy, and `latest` is the newest checkpoint that verifies on every node.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

from ppdreambooth.config.arguments import DreamBoothTrainingArguments
from ppdreambooth.errors import ConfigError
from ppdreambooth.modeling.lora import LORA_WEIGHTS_NAME
from ppdreambooth.runtime import nodes, ranks, run_lock
from ppdreambooth.runtime.checkpoints import checkpoint_step, is_complete, newest_good_checkpoint, verify_checkpoint
from ppdreambooth.training.folders import check_writable

logger = logging.getLogger("ppdreambooth")
FINAL_FILES = ("model_index.json", LORA_WEIGHTS_NAME)  # what a finished full / LoRA run leaves in output_dir


def choose_checkpoint(args: DreamBoothTrainingArguments, at_most: Optional[int] = None) -> Optional[str]:
    """`--resume_from_checkpoint latest|<dir>` -> a complete checkpoint folder whose files match the checksums
    in its marker, or None to start fresh. `latest` skips damaged checkpoints, naming each (and those after step
    `at_most`); a damaged folder asked for by name, or only damaged ones to choose from, is a ConfigError."""
    wanted = args.resume_from_checkpoint
    if wanted == "latest":
        found, damaged = newest_good_checkpoint(args.output_dir, at_most)
        for check in damaged:
            logger.warning("%s: skipped", check.describe())
        if found is None and damaged:
            raise ConfigError(
                f"--resume_from_checkpoint latest: no checkpoint in {args.output_dir} can be trusted ("
                + "; ".join(check.describe() for check in damaged)
                + "). Move them away to start a new run, or copy an intact checkpoint back."
            )
        if found is None:
            logger.info("no complete checkpoint in %s: starting a new run", args.output_dir)
            return None
        if not found.verified:
            logger.warning(found.describe())
        if damaged:
            logger.warning("resuming from %s, the newest checkpoint that verifies", found.path)
        return found.path
    if not os.path.isdir(wanted) or not is_complete(wanted):
        raise ConfigError(
            f"--resume_from_checkpoint {wanted} is not a complete checkpoint folder "
            f"(use 'latest' to pick the newest complete one in {args.output_dir})."
        )
    check = verify_checkpoint(wanted)
    if not check.ok:
        raise ConfigError(f"--resume_from_checkpoint {wanted}: {check.describe()}. Use 'latest' to pick the newest "
                          f"checkpoint in {args.output_dir} that verifies.")
    if not check.verified:
        logger.warning(check.describe())
    return wanted


_NOT_WRITING = -3


def resolve_resume(args: DreamBoothTrainingArguments) -> Optional[str]:
    """`choose_checkpoint`; under data parallel the writing ranks (rank 0, or each node's first rank with
    `--save_on_each_node`) read and verify their copy of the files and every rank takes their common answer."""
    if not args.resume_from_checkpoint:
        return None
    if args.world_size <= 1:
        return choose_checkpoint(args)
    latest, at_most = args.resume_from_checkpoint == "latest", None
    while True:
        error, code = None, _NOT_WRITING  # a writer's code: -1 none, 0 the named folder, N+1 checkpoint-N
        if args.should_save:
            try:
                found = choose_checkpoint(args, at_most)
                code = -1 if found is None else checkpoint_step(found) + 1 if latest else 0
            except ConfigError as e:
                error = e
        if ranks.agree_max(1 if error is not None else 0):
            if error is not None:
                raise error
            raise ConfigError(f"--resume_from_checkpoint {args.resume_from_checkpoint}: refused (the log of the "
                              "rank that writes --output_dir says why).")
        if not latest:
            return args.resume_from_checkpoint
        newest = ranks.agree_max(code)
        oldest = -ranks.agree_max(-code if args.should_save else -newest)
        if newest == oldest:
            break
        if oldest == -1:
            raise ConfigError(
                f"--resume_from_checkpoint latest: the nodes' copies of --output_dir {args.output_dir} (one per node "
                f"with --save_on_each_node) have no checkpoint in common: one holds checkpoint-{newest - 1}, another "
                "none that verifies. Copy that checkpoint into every node's folder, or move the checkpoints away to "
                "start a new run.")
        at_most = oldest - 1  # a node lacks the newer ones: look again, no further than its newest
    return None if newest == -1 else os.path.join(args.output_dir, f"checkpoint-{newest - 1}")


_claims = set()  # id() of the argument objects whose run holds its output folder


def _lock(args: DreamBoothTrainingArguments) -> Optional[str]:
    """Lock `--output_dir` for this process; the refusal message, or None."""
    try:
        run_lock.acquire(args.output_dir, ranks=max(args.world_size, 1))
    except run_lock.OutputDirBusy as e:
        return str(e)
    _claims.add(id(args))
    ranks.clear_notes(args.output_dir)  # failure notes of an earlier run
    return None


def claim_output_dir(args: DreamBoothTrainingArguments) -> None:
    """Lock `--output_dir` for this run, or raise ConfigError naming the folder and the run that holds it.

    Under data parallel rank 0 locks it for the whole run and tells the other ranks whether it could; then the
    folder is checked to suit the writers (`check_storage`)."""
    world = max(args.world_size, 1)
    error = _lock(args) if args.process_index <= 0 else None
    if world > 1 and ranks.agree_max(1 if error else 0) and error is None:
        holder = run_lock.describe_holder(run_lock.read_holder(args.output_dir))
        error = f"--output_dir {args.output_dir} is in use by another run: {holder} (rank 0's log says more)."
    if error:
        raise ConfigError(error)
    if world > 1:
        check_storage(args)


def check_storage(args: DreamBoothTrainingArguments) -> None:
    """One shared folder for one writer, a folder on each node's own disk for one writer per node; with the
    latter, the writers of the other nodes check and lock their own copy."""
    rank = max(args.process_index, 0)
    shared = nodes.seen_by_every_rank(args.output_dir, rank)
    writers = ranks.agree_sum(1 if args.should_save else 0)
    if shared and writers > 1:
        raise ConfigError(
            f"--save_on_each_node with --output_dir {args.output_dir}, a folder every node sees: the first process of "
            "each node would write the same checkpoints and final model into it at the same time. Drop "
            "--save_on_each_node (rank 0 then writes everything, once), or give --output_dir a path on each node's "
            "own disk.")
    if not shared and writers == 1:
        raise ConfigError(
            f"--output_dir {args.output_dir} is not one folder shared by all nodes (a file rank 0 wrote there is not "
            "seen by every rank): the other nodes could not resume from its checkpoints. Put it on storage every "
            "node mounts, or pass --save_on_each_node so that each node keeps its own copy.")
    error = None
    if not shared and args.should_save and rank != 0:  # this node's own copy
        try:
            check_writable(args.output_dir)
            error = _lock(args)
        except ConfigError as e:
            error = str(e)
    if ranks.agree_max(1 if error else 0):
        raise ConfigError(error or f"--output_dir {args.output_dir} on another node cannot be used (the log of that "
                                   "node's first rank says why).")


def release_output_dir(args: DreamBoothTrainingArguments) -> None:
    if id(args) in _claims:
        _claims.discard(id(args))
        run_lock.release(args.output_dir)


def check_output_dir(args: DreamBoothTrainingArguments, resume: Optional[str]) -> None:
    finished = any(os.path.isfile(os.path.join(args.output_dir, name)) for name in FINAL_FILES)
    if args.world_size > 1:  # with a folder per node, any node's copy counts
        finished = bool(ranks.agree_max(int(finished)))
    if finished and resume is None and not args.overwrite_output_dir:
        raise ConfigError(
            f"--output_dir {args.output_dir} already holds a finished model. Choose another --output_dir, "
            "pass --overwrite_output_dir to replace it, or --resume_from_checkpoint latest to continue it."
        )
