"""Several machines (nodes) in one data-parallel job: which folders every rank sees, and each rank's place on its
own node.

`paddle.distributed.launch --nnodes N --master host:port --rank n` numbers ranks globally (PADDLE_TRAINER_ID) and
per node (PADDLE_RANK_IN_NODE, PaddleNLP's `local_process_index`). Whether a folder is one shared folder or a
separate local disk on each node cannot be told from its path, so it is tested: rank 0 leaves a file named after a
random number there and every rank looks for it (`seen_by_every_rank`). The name is new to every node, so no
client of a network file system can answer from a cached "no such file" for it; the file is written and closed
before any rank opens it, which NFS's close-to-open consistency makes visible to the other nodes.
"""
from __future__ import annotations

import os
import random

from ppdreambooth.errors import ConfigError
from ppdreambooth.runtime import ranks

PROBE_NAME = ".ppdreambooth-shared-probe"


def seen_by_every_rank(folder: str, rank: int) -> bool:
    """Whether a file rank 0 writes in `folder` is visible to every rank (all ranks must call it together).

    Rank 0 creates `folder` if needed and removes its probe file afterwards; if it cannot write there, every
    rank raises ConfigError."""
    nonce, problem = 0, None
    if rank == 0:
        nonce = random.SystemRandom().randrange(1, 2**62)
        try:
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, f"{PROBE_NAME}-{nonce}"), "w", encoding="utf-8") as f:
                f.write(str(nonce))
        except OSError as e:
            nonce, problem = 0, e
    nonce = ranks.agree_max(nonce)  # every rank now knows the number rank 0 wrote
    if not nonce:  # every rank stops alike
        raise ConfigError(f"{folder} cannot be written by rank 0 ({problem or 'its log says why'}): choose a folder "
                          "that every process can write to.")
    probe = os.path.join(folder, f"{PROBE_NAME}-{nonce}")
    try:
        with open(probe, encoding="utf-8") as f:
            seen = f.read().strip() == str(nonce)
    except OSError:
        seen = False
    missing = ranks.agree_max(0 if seen else 1)  # after this every rank has looked: rank 0 may remove the file
    if rank == 0:
        try:
            os.remove(probe)
        except OSError:
            pass
    return not missing


def node_share(local_rank: int, world_size: int) -> tuple:
    """(this rank's index on its node, the number of ranks on its node), from the launcher's environment
    (PADDLE_LOCAL_SIZE); without it, from the largest local rank of the job (nodes alike)."""
    size = os.environ.get("PADDLE_LOCAL_SIZE")
    if size and size.isdigit() and int(size) > 0:
        return local_rank, int(size)
    if world_size <= 1:
        return 0, 1
    return local_rank, ranks.agree_max(local_rank) + 1
