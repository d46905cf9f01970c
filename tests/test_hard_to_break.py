"""Pre-emption and Ctrl-C, one run per output folder, ranks that stop together, checkpoints that verify.

Each behaviour is checked the way it happens: real signals sent from outside to a training process at a
random step, a second process started on a folder in use, a lock left by a SIGKILLed holder, a NaN or an
exception on one of two data-parallel CPU processes, and checkpoint files damaged after they were written.
"""
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import load_file

from helpers.models import load_unet_weights
from helpers.models import assert_same_weights
from helpers.runs import ROOT, run_module, train_argv
from ppdreambooth.runtime import run_lock, checkpoints as saving, signals
from ppdreambooth.errors import ConfigError
from ppdreambooth.modeling.lora import LORA_WEIGHTS_NAME
from ppdreambooth.runtime.checkpoints import (
    checkpoints_to_delete,
    complete_checkpoints,
    mark_complete,
    newest_good_checkpoint,
    verify_checkpoint,
)
from helpers.checkpoints import latest_checkpoint
from ppdreambooth.training.preflight import resolve_resume

HELPERS = os.path.join(ROOT, "tests", "helpers")
RUN_LOCK_FILE = os.path.join(ROOT, "ppdreambooth", "runtime", "run_lock.py")
STEPS = 6
# random flips and a decaying learning rate: an exact resume must restore the RNG and scheduler states too
EXTRA = ["--random_flip", "--lr_scheduler", "linear", "--checkpointing_steps", "2", "--checkpoints_total_limit", "2"]
LORA = ["--use_lora", "--lora_rank", "4"]


def random_step(low: int = 1) -> int:
    """The step to signal at: random from `low`, or HARD_TO_BREAK_STEP (if not below `low`) to replay a failure
    (the step is in every message)."""
    wanted = int(os.environ.get("HARD_TO_BREAK_STEP") or 0)
    return wanted if wanted >= low else random.randint(low, STEPS)


def final_weights(out, lora: bool):
    return load_file(str(out / LORA_WEIGHTS_NAME)) if lora else load_unet_weights(str(out))


def write_checkpoint(folder, step, sizes=(300_000, 1000), seed=0):
    rng = np.random.RandomState(seed + step)
    os.makedirs(folder, exist_ok=True)
    for name, size in zip(("model_state.pdparams", "optimizer.pdopt"), sizes):
        (folder / name).write_bytes(rng.bytes(size))
    mark_complete(str(folder), step)
    return str(folder)


def flip_a_byte(path, offset=1234):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def resume_args(output_dir, wanted):
    return SimpleNamespace(output_dir=str(output_dir), resume_from_checkpoint=wanted, world_size=1, process_index=0)


# ----- 4. checkpoints you can trust ------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["xxh3_64", "crc32"])  # CRC-32: installations without xxhash
def test_latest_skips_damaged_checkpoints_by_name(tmp_path, caplog, monkeypatch, algorithm):
    monkeypatch.setattr(saving, "default_checksum", lambda: algorithm)
    for step in (2, 4, 6):
        write_checkpoint(tmp_path / f"checkpoint-{step}", step)
    marker = json.loads((tmp_path / "checkpoint-6" / ".complete").read_text())
    assert marker["step"] == 6 and set(marker["files"]) == {"model_state.pdparams", "optimizer.pdopt"}
    assert marker["checksum"] == algorithm
    assert latest_checkpoint(str(tmp_path)).endswith("checkpoint-6")
    # the bound `latest` uses when another node's copy of the folder lacks the newer checkpoints
    assert newest_good_checkpoint(str(tmp_path), at_most=5)[0].path.endswith("checkpoint-4")
    assert newest_good_checkpoint(str(tmp_path), at_most=1)[0] is None

    flip_a_byte(tmp_path / "checkpoint-6" / "model_state.pdparams")  # bit rot: same size, other content
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(str(tmp_path)).endswith("checkpoint-4")
    assert "checkpoint-6 is damaged: model_state.pdparams differs from its checksum" in caplog.text

    path = tmp_path / "checkpoint-4" / "optimizer.pdopt"
    path.write_bytes(path.read_bytes()[:500])  # a copy cut short, a full disk
    assert "optimizer.pdopt is 500 bytes, 1000 were written" in verify_checkpoint(str(path.parent)).problem
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert resolve_resume(resume_args(tmp_path, "latest")).endswith("checkpoint-2")
    assert "checkpoint-6 is damaged" in caplog.text and "checkpoint-4 is damaged" in caplog.text
    # complete (marker present) is unchanged: rotation still counts the damaged ones
    assert [os.path.basename(c) for c in complete_checkpoints(str(tmp_path))] == [
        "checkpoint-2", "checkpoint-4", "checkpoint-6"]

    os.remove(tmp_path / "checkpoint-2" / "optimizer.pdopt")
    with pytest.raises(ConfigError, match="no checkpoint in .* can be trusted .*checkpoint-2 is damaged: "
                                          "optimizer.pdopt is missing"):
        resolve_resume(resume_args(tmp_path, "latest"))


def test_a_damaged_checkpoint_asked_for_by_name_is_refused(tmp_path):
    folder = write_checkpoint(tmp_path / "checkpoint-4", 4)
    assert resolve_resume(resume_args(tmp_path, folder)) == folder
    flip_a_byte(tmp_path / "checkpoint-4" / "model_state.pdparams", offset=299_999)
    with pytest.raises(ConfigError, match=r"checkpoint-4 is damaged: model_state.pdparams differs from its checksum"
                                          r".*Use 'latest'"):
        resolve_resume(resume_args(tmp_path, folder))
    (tmp_path / "checkpoint-4" / ".complete").write_text('{"step": 4, "files": {"model_st')  # a torn marker
    assert "marker is damaged" in verify_checkpoint(folder).problem


def test_markers_of_older_runs_still_count_as_complete_but_unverified(tmp_path, caplog):
    folder = tmp_path / "checkpoint-2"
    write_checkpoint(folder, 2)
    (folder / ".complete").write_text("2\n")  # what ppdreambooth wrote before checksums
    check = verify_checkpoint(str(folder))
    assert check.ok and not check.verified
    with caplog.at_level(logging.WARNING):
        assert resolve_resume(resume_args(tmp_path, "latest")) == str(folder)
    assert ("checkpoint-2 cannot be verified, it has no checksums (written by an older ppdreambooth): it is used "
            "unverified") in caplog.text


def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path):
    # An earlier, longer run left checkpoints 2, 4 and 6; this run resumed from checkpoint-2 and was stopped at 3.
    for step in (2, 4, 6):
        write_checkpoint(tmp_path / f"checkpoint-{step}", step)
    just_written = write_checkpoint(tmp_path / "checkpoint-3", 3)
    for limit in (1, 2, 3):
        doomed = checkpoints_to_delete(str(tmp_path), limit, keep=just_written)
        assert just_written not in doomed and len(doomed) == 4 - limit
    assert [os.path.basename(c) for c in checkpoints_to_delete(str(tmp_path), 2, keep=just_written)] == [
        "checkpoint-2", "checkpoint-4"]


# ----- 2. one run per output folder --------------------------------------------------------------------------
def start_holder(folder, hold_lock=True):
    """A separate process holding `folder`'s lock (through run_lock, loaded without paddle) until killed."""
    code = (
        "import importlib.util, sys, time\n"
        f"spec = importlib.util.spec_from_file_location('run_lock', {RUN_LOCK_FILE!r})\n"
        "run_lock = importlib.util.module_from_spec(spec); spec.loader.exec_module(run_lock)\n"
        f"run_lock.acquire({str(folder)!r}) if {hold_lock} else None\n"
        "print('ready', flush=True); time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_a_folder_held_by_a_live_run_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path, caplog):
    folder = tmp_path / "out"
    holder = start_holder(folder)
    try:
        with pytest.raises(run_lock.OutputDirBusy, match=rf"--output_dir {folder} is in use by another run: process "
                                                         rf"{holder.pid} on .*kill -TERM {holder.pid}"):
            run_lock.acquire(str(folder))
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding it: its record stays, the kernel drops the flock
        holder.wait()
    assert json.loads((folder / run_lock.LOCK_NAME).read_text())["pid"] == holder.pid
    with caplog.at_level(logging.WARNING):
        run_lock.acquire(str(folder))
    assert f"left by process {holder.pid}" in caplog.text and "no longer running" in caplog.text
    assert json.loads((folder / run_lock.LOCK_NAME).read_text())["pid"] == os.getpid()
    run_lock.release(str(folder))
    assert not (folder / run_lock.LOCK_NAME).exists()


def test_without_working_file_locks_a_live_recorded_holder_still_counts(tmp_path):
    folder = tmp_path / "out"
    os.makedirs(folder)
    sleeper = start_holder(folder, hold_lock=False)  # alive, recorded, but holding no flock
    try:
        record = {"pid": sleeper.pid, "host": os.uname().nodename, "start_ticks": run_lock._process_start(sleeper.pid)}
        (folder / run_lock.LOCK_NAME).write_text(json.dumps(record))
        with pytest.raises(run_lock.OutputDirBusy, match=f"process {sleeper.pid}"):
            run_lock.acquire(str(folder))
    finally:
        sleeper.kill()
        sleeper.wait()


def test_the_holder_record_hides_secrets():
    assert run_lock.redacted(["train", "--hub_token", "hf_abc", "--wandb_api_key=k1", "--seed", "7"]) == [
        "train", "--hub_token", "***", "--wandb_api_key=***", "--seed", "7"]


@pytest.mark.slow
def test_a_second_run_on_the_same_output_dir_stops_before_loading_any_model(tiny_model, photos, tmp_path):
    out = tmp_path / "out"
    run_lock.acquire(str(out))  # this test process plays the first run
    try:
        started = time.monotonic()
        result = run_module(["-m", "ppdreambooth.train", *train_argv(tiny_model, photos, out, steps=2)])
        elapsed = time.monotonic() - started
    finally:
        run_lock.release(str(out))
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"--output_dir {out} is in use by another run: process {os.getpid()} on" in result.stderr
    assert "Traceback" not in result.stderr
    output = result.stdout + result.stderr
    assert "Loading weights file" not in output and "Number of trainable parameters" not in output  # no model
    # nothing written; the lock file is gone (and the folder the lock made, now empty, with it)
    assert not out.exists() or sorted(os.listdir(out)) == [], f"{elapsed:.1f} s"


# ----- 1. SIGTERM / SIGINT ---------------------------------------------------------------------------------
def test_signals_a_second_one_exits_at_once_and_close_repeats_count_once(monkeypatch):
    class Exited(Exception):
        pass

    exits, released = [], []

    def fake_exit(status):
        exits.append(status)
        raise Exited

    monkeypatch.setattr(signals.os, "_exit", fake_exit)
    before = signal.getsignal(signal.SIGTERM)
    with signals.graceful_stop() as stop:
        with pytest.raises(signals.TrainingInterrupted, match="stopped by SIGINT before training began"):
            os.kill(os.getpid(), signal.SIGINT)  # before training: stop at once, nothing to save
            time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) is before
    with signals.graceful_stop() as stop:
        stop.before_exit.append(lambda: released.append(True))
        stop.enter(signals.TRAINING)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.signum == signal.SIGTERM and not exits  # recorded: the step goes on
        os.kill(os.getpid(), signal.SIGTERM)  # a launcher's repeat within the window: the same request
        time.sleep(0.05)
        assert not exits
        stop._first_at -= signals.REPEAT_WINDOW
        with pytest.raises(Exited):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert exits == [130] and released == [True]


def signal_mid_step(argv, step, sig, tmp_path):
    """Start training in a fresh process, send `sig` from here while it is in the middle of `step`, wait.
    Returns (exit status, seconds from the signal to the exit, output)."""
    pause, log_path = tmp_path / f"paused-{step}", tmp_path / f"signalled-{step}.log"
    env = dict(os.environ, PYTHONPATH=ROOT, PAUSE_AT=str(step), PAUSE_FILE=str(pause))
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, os.path.join(HELPERS, "signal_entry.py"), *argv], cwd=ROOT,
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not pause.exists():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.05)
        sent = time.monotonic()
        proc.send_signal(sig)
        status = proc.wait(timeout=300)
        return status, time.monotonic() - sent, log_path.read_text()


@pytest.fixture(scope="module")
def references(tiny_model, tmp_path_factory):
    """The final weights of uninterrupted runs, full fine-tuning and LoRA (made when first asked for)."""
    from helpers.photos import write_photos

    tmp = tmp_path_factory.mktemp("uninterrupted")
    photos = write_photos(tmp / "instance")
    made = {}

    def get(lora: bool):
        if lora not in made:
            out = tmp / ("lora" if lora else "full")
            result = run_module(["-m", "ppdreambooth.train",
                                 *train_argv(tiny_model, photos, out, STEPS, EXTRA + (LORA if lora else []))])
            assert result.returncode == 0, result.stderr[-3000:]
            made[lora] = final_weights(out, lora)
        return photos, made[lora]

    return get


def stop_then_resume(tiny_model, references, tmp_path, sig, step, lora=False, damage_the_stop_checkpoint=False):
    photos, expected = references(lora)
    out = tmp_path / "out"
    argv = train_argv(tiny_model, photos, out, STEPS, EXTRA + (LORA if lora else []))
    status, seconds, output = signal_mid_step(argv, step, sig, tmp_path)
    name, checkpoint = signal.Signals(sig).name, out / f"checkpoint-{step}"
    assert status == 128 + sig, f"step {step}: {output[-3000:]}"
    assert (f"stopped by {name} after step {step} of {STEPS}; checkpoint written to {checkpoint}. Run the same "
            "command with --resume_from_checkpoint latest") in output, output[-3000:]
    assert "Traceback" not in output
    check = verify_checkpoint(str(checkpoint))
    assert check.ok and check.verified, check
    assert str(checkpoint) in complete_checkpoints(str(out))  # rotation kept it
    assert not (out / "model_index.json").exists() and not (out / LORA_WEIGHTS_NAME).exists()
    assert not (out / run_lock.LOCK_NAME).exists()
    assert seconds < 60, f"{seconds:.1f} s from the signal to the exit"

    if damage_the_stop_checkpoint:  # then `latest` names it, falls back to the one before, and still ends exact
        flip_a_byte(checkpoint / "model_state.pdparams")
    resumed = run_module(["-m", "ppdreambooth.train", *argv, "--resume_from_checkpoint", "latest"])
    assert resumed.returncode == 0, f"step {step}: {resumed.stderr[-3000:]}"
    if damage_the_stop_checkpoint:
        assert f"checkpoint-{step} is damaged: model_state.pdparams differs from its checksum" in resumed.stderr
    assert_same_weights(final_weights(out, lora), expected)
    return step, seconds


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sigterm_at_a_random_step_then_resume_latest_equals_uninterrupted(tiny_model, references, tmp_path, lora):
    stop_then_resume(tiny_model, references, tmp_path, signal.SIGTERM, random_step(), lora=lora)


@pytest.mark.slow
def test_ctrl_c_then_resume_latest_skips_a_damaged_checkpoint_and_equals_uninterrupted(tiny_model, references,
                                                                                         tmp_path):
    # from step 3 on, so that an intact checkpoint (checkpoint-2) comes before the damaged one
    stop_then_resume(tiny_model, references, tmp_path, signal.SIGINT, random_step(low=3),
                     damage_the_stop_checkpoint=True)


# ----- 3. a sick rank stops the whole job ---------------------------------------------------------------------
def launch_two_ranks(tiny_model, photos, tmp_path, fault, steps=STEPS, env=None):
    out, logs, outcomes = tmp_path / "dp", tmp_path / "launch_logs", tmp_path / "outcomes"
    argv = ["-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(logs),
            os.path.join(HELPERS, "rank_fault_entry.py"),
            *train_argv(tiny_model, photos, out, steps=steps, extra=["--checkpointing_steps", "2"])]
    started = time.monotonic()
    result = run_module(argv, env={"FAULT": fault, "FAULT_RANK": "1", "OUTCOME_DIR": str(outcomes), **(env or {})},
                        timeout=300)
    elapsed = time.monotonic() - started
    # each rank's console, and its log file in the output folder where the run keeps one
    rank_logs = ["".join(path.read_text(errors="replace") for path in (
        logs / f"workerlog.{r}", out / ("train.log" if r == 0 else f"train-rank{r}.log")) if path.exists())
        for r in (0, 1)]
    files = {r: outcomes / f"rank-{r}.exit" for r in (0, 1)}
    status = {r: int(path.read_text()) for r, path in files.items() if path.exists()}
    ended = {r: path.stat().st_mtime for r, path in files.items() if path.exists()}  # when each rank exited
    return out, result, rank_logs, status, ended, elapsed


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_every_rank_at_that_step(tiny_model, photos, tmp_path):
    out, result, rank_logs, status, ended, elapsed = launch_two_ranks(tiny_model, photos, tmp_path, "nan_in_step:3")
    assert status == {0: 3, 1: 3}, rank_logs[0][-3000:]  # both ranks ended through the NaN path, none killed
    assert abs(ended[0] - ended[1]) < 5 and elapsed < 120, (ended, elapsed)
    assert result.returncode == 3
    for log in rank_logs:
        assert ("the loss is nan at step 3 on rank 1; the optimizer skipped that step (never applied it) and "
                "every rank stopped before saving anything") in log, log[-3000:]
        assert "global_step: 3" not in log  # the NaN step was never applied
    assert [os.path.basename(c) for c in complete_checkpoints(str(out))] == ["checkpoint-2"]
    assert verify_checkpoint(str(out / "checkpoint-2")).verified
    assert not (out / "model_index.json").exists() and not (out / run_lock.LOCK_NAME).exists()


@pytest.mark.slow
def test_a_rank_still_shutting_down_when_the_launcher_stops_the_job_exits_cleanly(tiny_model, photos, tmp_path):
    """The launcher SIGTERMs every rank still running once one has exited with a non-zero status; a rank that is
    already shutting down (here made 2 s slower at it) must not die of that signal (Paddle's handler aborts it:
    exit -6, launcher status 250) but end with its own status."""
    out, result, rank_logs, status, ended, elapsed = launch_two_ranks(tiny_model, photos, tmp_path, "nan_in_step:3",
                                                                      env={"SLOW_EXIT_RANK": "0"})
    assert status == {0: 3, 1: 3} and result.returncode == 3, (result.returncode, rank_logs[0][-3000:])
    for log in rank_logs:
        assert "Termination signal" not in log and "Aborted" not in log, log[-3000:]


@pytest.mark.slow
def test_an_exception_on_one_rank_does_not_leave_the_other_hanging(tiny_model, photos, tmp_path):
    out, result, rank_logs, status, ended, elapsed = launch_two_ranks(tiny_model, photos, tmp_path, "raise_in_step:2")
    assert result.returncode != 0 and status.get(1) == 1 and elapsed < 120, elapsed
    assert "RuntimeError: injected fault" in rank_logs[1]
    assert "rank 1 failed at step 2: RuntimeError: injected fault" in rank_logs[0], rank_logs[0][-3000:]
    assert "stopping rank 0 as well" in rank_logs[0]
    assert "global_step: 2" not in rank_logs[0]
    assert not (out / run_lock.LOCK_NAME).exists()
