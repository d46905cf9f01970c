"""Two data-parallel CPU processes (paddle.distributed.launch): same weights, different noise per rank."""
import json
import os

import numpy as np
import pytest

from conftest import ROOT, run_module, train_argv

pytestmark = pytest.mark.slow


def test_two_ranks_end_identical_and_draw_their_own_noise(tiny_model, photos, tmp_path):
    out = tmp_path / "dp"
    argv = ["-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(tmp_path / "launch_logs"),
            os.path.join(ROOT, "tests", "helpers", "record_rank_entry.py"),
            *train_argv(tiny_model, photos, out, steps=3, extra=["--random_flip"])]
    result = run_module(argv)
    logs = "".join(open(os.path.join(tmp_path / "launch_logs", f)).read()
                   for f in os.listdir(tmp_path / "launch_logs"))
    assert result.returncode == 0, logs[-4000:]

    w0, w1 = np.load(out / "rank-0-weights.npz"), np.load(out / "rank-1-weights.npz")
    assert set(w0.files) == set(w1.files)
    for k in w0.files:
        assert np.array_equal(w0[k], w1[k]), k
    t0, t1 = (json.load(open(out / f"rank-{r}-timesteps.json")) for r in (0, 1))
    assert len(t0) == len(t1) == 3
    assert [s["timesteps"] for s in t0] != [s["timesteps"] for s in t1]
    assert all(a["noise_sum"] != b["noise_sum"] for a, b in zip(t0, t1))
    assert (out / "model_index.json").is_file()  # rank 0 wrote the pipeline
