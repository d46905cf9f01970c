"""Checkpoints that can be trusted: trained-only weights written atomically, completion markers with checksums,
verification before resume, and rotation that never touches an incomplete folder.

A checkpoint `checkpoint-N/` holds `model_state.pdparams` with only the trained weights (the
Trainer's resume path reads it back into the model) and is marked complete by a `.complete` file
written last, so a run killed mid-write never resumes from a half-written checkpoint. The marker
records the size and a checksum of every 64 MiB block of every file in the folder (XXH3-64 from the
`xxhash` package, which the pinned stack installs through paddlenlp -> datasets, or else zlib's CRC-32;
blocks are hashed in parallel threads), so that a checkpoint damaged after it was written (bit rot, a
full disk, a copy cut short) is recognised before it is loaded (`verify_checkpoint`); a marker from an
older ppdreambooth holds only the step and still counts as complete, unverified.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from ppdreambooth.runtime.streamed_save import streamed_save

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint"
COMPLETE_MARKER = ".complete"
WEIGHTS_NAME = "model_state.pdparams"


def save_trainable_weights(model, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    state = {k: v.detach() for k, v in model.trainable_state_dict().items()}  # views: no copy
    tmp = os.path.join(out_dir, WEIGHTS_NAME + ".tmp")
    streamed_save(state, tmp)  # paddle.save's file, without first copying every tensor into NumPy
    os.replace(tmp, os.path.join(out_dir, WEIGHTS_NAME))


CHECKSUM_BLOCK = 64 << 20
_READ_CHUNK = 8 << 20


class _Crc32:
    def __init__(self):
        self.value = 0

    def update(self, data) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


def _new_hash(algorithm: str):
    if algorithm == "xxh3_64":
        import xxhash

        return xxhash.xxh3_64()
    if algorithm == "crc32":
        return _Crc32()
    raise ValueError(f"unknown checksum {algorithm!r}")


def default_checksum() -> str:
    """XXH3-64 (as fast as the page cache) when `xxhash` is installed, else CRC-32 (slower; see
    `benchmarks/bench_checkpoint_verify.py`)."""
    try:
        import xxhash  # noqa: F401
    except ImportError:
        return "crc32"
    return "xxh3_64"


def _block_digest(algorithm: str, path: str, offset: int, length: int) -> str:
    digest, buf = _new_hash(algorithm), bytearray(min(_READ_CHUNK, max(length, 1)))
    view = memoryview(buf)
    with open(path, "rb") as f:
        f.seek(offset)
        while length > 0:
            n = f.readinto(view[: min(len(buf), length)])
            if not n:  # the file is shorter than when its size was read
                break
            digest.update(view[:n])
            length -= n
    return digest.hexdigest()


def _hash_blocks(algorithm: str, jobs: List[Tuple[str, int, int]]) -> List[str]:
    """Digests of (path, offset, length) blocks; several threads (the hashes release the GIL on large data)."""
    if len(jobs) <= 1:
        return [_block_digest(algorithm, *job) for job in jobs]
    with ThreadPoolExecutor(max_workers=min(len(jobs), 8, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda job: _block_digest(algorithm, *job), jobs))


def _checkpoint_files(checkpoint_dir: str) -> List[str]:
    """Every file of a checkpoint folder except its marker, as sorted '/'-separated relative paths."""
    found = []
    for root, _, names in os.walk(checkpoint_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), checkpoint_dir).replace(os.sep, "/")
            if rel not in (COMPLETE_MARKER, COMPLETE_MARKER + ".tmp"):
                found.append(rel)
    return sorted(found)


def _blocks(size: int, block: int = CHECKSUM_BLOCK) -> List[Tuple[int, int]]:
    return [(start, min(block, size - start)) for start in range(0, size, block)] or [(0, 0)]


def checksum_files(checkpoint_dir: str, algorithm: str) -> Dict[str, dict]:
    """{relative path: {"size": bytes, "blocks": [one hex digest per 64 MiB block]}} for the folder's files."""
    names = _checkpoint_files(checkpoint_dir)
    sizes = {name: os.path.getsize(os.path.join(checkpoint_dir, name)) for name in names}
    jobs = [(name, start, length) for name in names for start, length in _blocks(sizes[name])]
    digests = _hash_blocks(algorithm, [(os.path.join(checkpoint_dir, name), start, length)
                                       for name, start, length in jobs])
    result = {name: {"size": sizes[name], "blocks": []} for name in names}
    for (name, _, _), digest in zip(jobs, digests):
        result[name]["blocks"].append(digest)
    return result


def mark_complete(checkpoint_dir: str, step: int) -> None:
    """Write the marker last: the step and every file's size and block checksums (read back from disk)."""
    algorithm = default_checksum()
    files = checksum_files(checkpoint_dir, algorithm)
    head = json.dumps({"step": step, "checksum": algorithm, "block_size": CHECKSUM_BLOCK})[:-1]
    body = ",\n".join(f"  {json.dumps(name)}: {json.dumps(entry)}" for name, entry in files.items())
    tmp = os.path.join(checkpoint_dir, COMPLETE_MARKER + ".tmp")
    with open(tmp, "w") as f:
        f.write(f"{head}, \"files\": {{\n{body}\n}}}}\n")  # one line per file
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(checkpoint_dir, COMPLETE_MARKER))


@dataclass
class CheckpointCheck:
    """What `verify_checkpoint` found: `ok` (safe to load), `verified` (checked against checksums), `problem`."""

    path: str
    ok: bool
    verified: bool
    problem: Optional[str] = None

    def describe(self) -> str:
        name = os.path.basename(os.path.normpath(self.path))
        if not self.ok:
            return f"{name} is damaged: {self.problem}"
        if not self.verified:
            why = self.problem or "it has no checksums (written by an older ppdreambooth)"
            return f"{name} cannot be verified, {why}: it is used unverified"
        return f"{name} verified"


def verify_checkpoint(checkpoint_dir: str) -> CheckpointCheck:
    """Check a checkpoint's files against the sizes and checksums its completion marker recorded."""
    def damaged(problem: str) -> CheckpointCheck:
        return CheckpointCheck(checkpoint_dir, False, False, problem)

    try:
        with open(os.path.join(checkpoint_dir, COMPLETE_MARKER), encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return damaged(f"it has no {COMPLETE_MARKER} marker (it was never finished)")
    except (OSError, UnicodeDecodeError) as e:
        return damaged(f"its {COMPLETE_MARKER} marker cannot be read ({e})")
    if re.fullmatch(r"\s*\d+\s*", text):  # the older marker: just the step
        return CheckpointCheck(checkpoint_dir, True, False)
    try:
        marker = json.loads(text)
        algorithm, block = str(marker["checksum"]), int(marker["block_size"])
        files = {str(name): (int(entry["size"]), [str(c) for c in entry["blocks"]])
                 for name, entry in marker["files"].items()}
        if block <= 0:
            raise ValueError(block)
    except (ValueError, KeyError, TypeError, AttributeError):
        return damaged(f"its {COMPLETE_MARKER} marker is damaged")
    try:
        _new_hash(algorithm)
    except (ImportError, ValueError):
        return CheckpointCheck(checkpoint_dir, True, False, f"its {algorithm} checksums need a package this "
                                                            "installation lacks (pip install xxhash)")
    for name, (size, _) in sorted(files.items()):
        path = os.path.join(checkpoint_dir, *name.split("/"))
        if not os.path.isfile(path):
            return damaged(f"{name} is missing")
        if os.path.getsize(path) != size:
            return damaged(f"{name} is {os.path.getsize(path)} bytes, {size} were written (cut short or overwritten)")
    jobs = [(name, n, start, length) for name in sorted(files)
            for n, (start, length) in enumerate(_blocks(files[name][0], block))]
    digests = _hash_blocks(algorithm, [(os.path.join(checkpoint_dir, *name.split("/")), start, length)
                                       for name, _, start, length in jobs])
    for (name, n, start, length), digest in zip(jobs, digests):
        expected = files[name][1]
        if n >= len(expected) or digest != expected[n]:
            return damaged(f"{name} differs from its checksum (bytes {start}-{start + length})")
    return CheckpointCheck(checkpoint_dir, True, True)


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


def checkpoint_step(path: str) -> int:
    return int(os.path.basename(os.path.normpath(path)).rsplit("-", 1)[1])


def newest_good_checkpoint(output_dir: str, at_most: Optional[int] = None
                           ) -> Tuple[Optional[CheckpointCheck], List[CheckpointCheck]]:
    """(the check of the newest complete checkpoint whose files match its checksums, or None; the checks of the
    newer complete ones that did not match). `at_most`: consider only checkpoints of that step or earlier."""
    damaged = []
    for path in reversed(complete_checkpoints(output_dir)):
        if at_most is not None and checkpoint_step(path) > at_most:
            continue
        check = verify_checkpoint(path)
        if check.ok:
            return check, damaged
        damaged.append(check)
    return None, damaged


def checkpoints_to_delete(output_dir: str, limit: Optional[int], keep: Optional[str] = None) -> List[str]:
    """Rotation: the complete checkpoints beyond the newest `limit`, never `keep` (the one just written), which
    counts as one of the `limit` kept even when older complete checkpoints carry higher step numbers."""
    if limit is None or limit <= 0:
        return []
    keep_path = os.path.normpath(keep) if keep else None
    others = [c for c in complete_checkpoints(output_dir) if os.path.normpath(c) != keep_path]
    room = limit - (1 if keep_path and is_complete(keep_path) else 0)
    return others[: max(len(others) - room, 0)]
