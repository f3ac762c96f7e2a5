"""gpu.sh, the one-GPU study, runs end to end on a CPU at tiny settings."""
import os
import re

import numpy as np
import pytest

from conftest import run_tiny_script, write_fashion_mnist


@pytest.mark.slow
def test_gpu_study_tiny_runs_every_stage_on_cpu(tmp_path):
    (tmp_path / "data").mkdir()
    out = tmp_path / "study"
    run_tiny_script("gpu.sh", out, write_fashion_mnist(tmp_path / "data", 64, 40), "--eager")
    log = (out / "gpu.log").read_text()
    runs = ["unet-tiny-n16", "unet-tiny-n32", "unet-tiny-n32-kmeans4"]
    for stage in runs + ["windows", "jacobian", "0. data", "1. grid", "2. windows and jacobian", "3. figures"]:
        assert re.search(rf"^=== {re.escape(stage)}: \d+ s$", log, re.M), stage
    assert log.index("=== 0. data") < log.index("=== unet-tiny-n16: started"), "the dataset is read before the jobs"
    threads = max(1, len(os.sched_getaffinity(0)) // 2)  # the cores (nproc) shared out among --jobs 2
    assert f"2 runs at once; --step-mode eager --forward-mode eager; TORCHINDUCTOR_COMPILE_THREADS={threads}" in log
    for run in runs:
        assert "training step: eager" in (out / "logs" / f"{run}.log").read_text()
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
