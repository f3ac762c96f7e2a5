"""gpu.sh, the one-GPU study, runs end to end on a CPU at tiny settings."""
import os
import re
import subprocess

import numpy as np
import pytest

from conftest import write_fashion_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_study_tiny_runs_every_stage_on_cpu(tmp_path):
    (tmp_path / "data").mkdir()
    data_dir = write_fashion_mnist(tmp_path / "data", 64, 40)
    out = tmp_path / "study"
    env = dict(os.environ, OMP_NUM_THREADS="1", DATA_DIR=data_dir)
    done = subprocess.run(["bash", os.path.join(ROOT, "gpu.sh"), "--device", "cpu", "--tiny", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = (out / "gpu.log").read_text()
    runs = ["unet-tiny-n16", "unet-tiny-n32", "unet-tiny-n32-kmeans4"]
    for stage in runs + ["windows", "jacobian", "1. grid", "2. windows and jacobian", "3. figures"]:
        assert re.search(rf"^=== {re.escape(stage)}: \d+ s$", log, re.M), stage
    assert "gpu.sh done" in log and "FAILED" not in log
    for run in runs:
        assert np.load(out / "samples" / f"{run}.npz")["memorized_fraction"].shape[-1] == 2, "two snapshots"
        if "kmeans" not in run:
            assert np.load(out / "gap" / f"{run}.npz")["gap"].shape == (2, 4), "two snapshots x four sigmas"
    guided = np.load(out / "gap" / "unet-tiny-n32-kmeans4.npz")  # the last snapshot, three guidance weights
    assert list(guided["guidance_weights"]) == [0, 1, 2] and guided["gap"].shape == (3, 1, 4)
    assert list(np.load(out / "gap" / "windows.npz")["windows"]) == [8, 10, 12, 14, 16]
    jacobian = np.load(out / "gap" / "jacobian.npz")
    assert jacobian["radius_train"].shape == jacobian["radius_val"].shape == (2, 2)
    figures = os.listdir(out / "figures")
    assert any(f.startswith("gap_by_n") and f.endswith(".png") for f in figures), figures
