"""What verifying a checkpoint costs, against what loading it costs.

    python benchmarks/bench_checkpoint_verify.py [--sizes-mb 17 800] [--repeats 3] [--dir /tmp]
                                                 [--checksums xxh3_64 crc32]

For each size it writes a checkpoint folder shaped like a real one (trained weights, AdamW state twice their
size, scheduler, trainer state, RNG state; random float32 values), then, for each checksum (XXH3-64 is what
ppdreambooth uses when `xxhash` is installed, as the pinned stack has it; CRC-32 is the fallback), times
(median of `--repeats`):
- save:   `paddle.save` of the weights and optimizer state, then `mark_complete` (checksums of every file);
- verify: `verify_checkpoint` (what `--resume_from_checkpoint` does first);
- load:   `paddle.load` of the weights and the optimizer state (what the Trainer's resume then reads).
"Warm" has the files in the page cache (a resume soon after the save); "cold" first evicts them
(`posix_fadvise(DONTNEED)`, only these files), so verify pays the disk read, and the load after it is warm.
The 17 MB default is the size of the tiny test model's checkpoints; 800 MB is a realistic LoRA/small-UNet one.
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import paddle  # noqa: E402

from ppdreambooth.runtime import checkpoints as saving  # noqa: E402
from ppdreambooth.runtime.checkpoints import mark_complete, verify_checkpoint  # noqa: E402

LOADED = ("model_state.pdparams", "optimizer.pdopt")


def random_state(n_params: int, rng, prefix: str, tensor_params: int = 1 << 20) -> dict:
    state, i = {}, 0
    while n_params > 0:
        n = min(tensor_params, n_params)
        state[f"{prefix}.{i}"] = paddle.to_tensor(rng.standard_normal(n, dtype=np.float32))
        n_params, i = n_params - n, i + 1
    return state


def write_checkpoint(folder: str, total_mb: float, seed: int = 0) -> dict:
    """A checkpoint of about `total_mb` MB: weights N float32 values, optimizer state 2N. Returns save timings."""
    rng = np.random.default_rng(seed)
    n = int(total_mb * 1e6 / 4 / 3)
    os.makedirs(folder, exist_ok=True)
    weights = random_state(n, rng, "unet.weight")
    optimizer = {**random_state(n, rng, "moment1"), **random_state(n, rng, "moment2")}
    started = time.perf_counter()
    paddle.save(weights, os.path.join(folder, "model_state.pdparams"))
    paddle.save(optimizer, os.path.join(folder, "optimizer.pdopt"))
    paddle.save({"last_epoch": 3, "last_lr": 1e-4}, os.path.join(folder, "scheduler.pdparams"))
    with open(os.path.join(folder, "trainer_state.json"), "w") as f:
        f.write('{"global_step": 3}\n')
    with open(os.path.join(folder, "rng_state.pth"), "wb") as f:
        f.write(rng.bytes(32_000))
    save = time.perf_counter() - started
    for name in os.listdir(folder):  # clean pages, so that they can be evicted for the cold runs
        with open(os.path.join(folder, name), "rb+") as f:
            os.fsync(f.fileno())
    return save


def evict(folder: str) -> None:
    for name in os.listdir(folder):
        fd = os.open(os.path.join(folder, name), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def load(folder: str) -> None:
    for name in LOADED:
        paddle.load(os.path.join(folder, name))


def verify(folder: str) -> None:
    check = verify_checkpoint(folder)
    assert check.ok and check.verified, check


def measure(folder: str, repeats: int) -> dict:
    warm_verify, warm_load, cold_verify, load_after, cold_load = [], [], [], [], []
    for _ in range(repeats):
        load(folder)  # warm the cache
        warm_verify.append(timed(lambda: verify(folder)))
        warm_load.append(timed(lambda: load(folder)))
        evict(folder)
        cold_verify.append(timed(lambda: verify(folder)))
        load_after.append(timed(lambda: load(folder)))
        evict(folder)
        cold_load.append(timed(lambda: load(folder)))
    med = statistics.median
    return {"warm verify": med(warm_verify), "warm load": med(warm_load), "cold verify": med(cold_verify),
            "load after cold verify": med(load_after), "cold load": med(cold_load)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[17, 800])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write the checkpoints (default: the temp folder)")
    parser.add_argument("--checksums", nargs="+", default=["xxh3_64", "crc32"])
    args = parser.parse_args()
    paddle.set_device("cpu")
    print(f"{os.cpu_count()} CPU cores; paddle {paddle.__version__}; median of {args.repeats}\n")
    print("| checkpoint | checksum | save | + checksums at save | warm: verify / load | cold: verify + load after "
          "it | cold: load alone |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for size in args.sizes_mb:
        root = tempfile.mkdtemp(prefix="bench-verify-", dir=args.dir)
        try:
            folder = os.path.join(root, "checkpoint-3")
            save = write_checkpoint(folder, size)
            mb = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)) / 1e6
            for algorithm in args.checksums:
                saving.default_checksum = lambda: algorithm  # noqa: B023 - used at once
                checksum = timed(lambda: mark_complete(folder, 3))
                t = measure(folder, args.repeats)
                ratio = t["warm verify"] / t["warm load"]
                print(f"| {mb:,.0f} MB | {algorithm} | {save:.3f} s | {checksum:.3f} s | "
                      f"{t['warm verify']:.3f} s / {t['warm load']:.3f} s ({ratio:.0%}) | "
                      f"{t['cold verify']:.3f} s + {t['load after cold verify']:.3f} s | {t['cold load']:.3f} s |",
                      flush=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
