"""gpu.sh, the one-GPU study, runs end to end on a CPU at tiny settings."""
import os
import re
import sys

import numpy as np
import pytest

import plumbing
from conftest import run_tiny_script, write_fashion_mnist


@pytest.mark.slow
def test_gpu_study_tiny_runs_every_stage_on_cpu(tmp_path):
    (tmp_path / "data").mkdir()
    out = tmp_path / "study"
    run_tiny_script("gpu.sh", out, write_fashion_mnist(tmp_path / "data", 64, 40), "--eager")
    log = (out / "gpu.log").read_text()
    runs = ["unet-tiny-n16", "unet-tiny-n32", "unet-tiny-n32-kmeans4"]
    stages = ["unet-tiny-n32-uncond-short", "unet-tiny-n32-kmeans4-neg-short", "windows", "jacobian", "0. data",
              "1. grid", "2. guidance", "3. windows and jacobian", "4. figures"]
    for stage in runs + stages:
        assert re.search(rf"^=== {re.escape(stage)}: \d+ s$", log, re.M), stage
    assert log.index("=== 0. data") < log.index("=== unet-tiny-n16: started"), "the dataset is read before the jobs"
    threads = max(1, len(os.sched_getaffinity(0)) // 2)  # the cores (nproc) shared out among --jobs 2
    assert (f"2 runs at once; --precision auto; --step-mode eager --forward-mode eager; "
            f"TORCHINDUCTOR_COMPILE_THREADS={threads}") in log
    for run in runs:
        assert "training step: eager" in (out / "logs" / f"{run}.log").read_text()
    assert "study.sh done" in log and "FAILED" not in log
    assert f"python: {sys.executable} with torch" in log, "the interpreter the study ran (run_tiny_script's PYTHON)"
    for run in runs:
        assert np.load(out / "samples" / f"{run}.npz")["memorized_fraction"].shape[-1] == 2, "two snapshots"
        if "kmeans" not in run:
            assert np.load(out / "gap" / f"{run}.npz")["gap"].shape == (2, 4), "two snapshots x four sigmas"
    # the last snapshot at w = 0 (unguided) and the paper's 0.2 to 2.0, guided by the null label and by an
    # unconditional run trained 10x shorter
    short = plumbing.load_checkpoint(sorted((out / "runs" / "unet-tiny-n32-uncond-short").glob("snapshot-*.pt"))[-1])
    long = plumbing.load_checkpoint(sorted((out / "runs" / "unet-tiny-n32-kmeans4").glob("snapshot-*.pt"))[-1])
    assert short["network"]["num_classes"] == 0 and short["images_seen"] * 10 == long["images_seen"]
    for name in ("unet-tiny-n32-kmeans4", "unet-tiny-n32-kmeans4-neg-short"):
        guided = np.load(out / "gap" / f"{name}.npz")
        np.testing.assert_allclose(guided["guidance_weights"], np.arange(11) * 0.2, rtol=0, atol=1e-12)
        assert guided["gap"].shape == (11, 1, 4)
    assert "unet-tiny-n32-uncond-short" in plumbing.load_npz(str(out / "gap" / "unet-tiny-n32-kmeans4-neg-short.npz"))[
        "args"]["neg"]
    assert list(np.load(out / "gap" / "windows.npz")["windows"]) == [8, 12, 16], "on the U-Net's 4-pixel grid"
    jacobian = np.load(out / "gap" / "jacobian.npz")
    assert jacobian["radius_train"].shape == jacobian["radius_val"].shape == (1, 2), "the last snapshot"
    figures = os.listdir(out / "figures")
    assert any(f.startswith("gap_by_n") and f.endswith(".png") for f in figures), figures


@pytest.mark.slow
def test_cpu_study_tiny_trains_every_seed_of_the_headline_sizes_and_the_base_model_and_draws_the_map(tmp_path):
    (tmp_path / "data").mkdir()
    out = tmp_path / "study"
    run_tiny_script("study.sh", out, write_fashion_mnist(tmp_path / "data", 64, 40), "--scale", "cpu")
    log = (out / "cpu.log").read_text()
    runs = ["unet-c8-n16-seed0", "unet-c8-n16-seed1", "unet-c8-n32-seed0",  # seeds 0 1 for the headline n = 16
            "base-c8-n16-seed0", "base-c8-n16-seed1"]                      # the base model: every seed
    for stage in runs + ["1. grid", "4. figures"]:
        assert re.search(rf"^=== {re.escape(stage)}: \d+ s$", log, re.M), stage
    assert "study.sh done" in log and "FAILED" not in log and "seed2" not in log
    for run in runs:
        gap = np.load(out / "gap" / f"{run}.npz")
        assert gap["peak_gap_ci"].shape == (2, 2) and "gap_optimal" in gap.files, "two snapshots and the optimal"
        samples = np.load(out / "samples" / f"{run}.npz")
        assert samples["traj_heldout_score_ci"].shape == (2, 1, 2) and samples["traj_heldout_score_peak_ci"].shape == (2, 2)
    base = plumbing.load_checkpoint(out / "runs" / "base-c8-n16-seed0" / "snapshot-000000160.pt")["args"]
    assert (base["cond"], base["augment_p"], base["dropout"]) == ("class", 0.12, 0.13)
    table = (out / "figures" / "claim3_map.txt").read_text()
    for run, seeds in (("plain n = 16", 2), ("plain n = 32", 1), ("base n = 16", 2)):
        assert re.search(rf"^{run} +160 +{seeds} ", table, re.M), table
    assert (out / "figures" / "claim3_map.png").exists()


@pytest.mark.slow
def test_cpu_factor_study_tiny_varies_size_conditioning_and_guidance_and_draws_each_factor(tmp_path):
    (tmp_path / "data").mkdir()
    out = tmp_path / "study"
    run_tiny_script("study.sh", out, write_fashion_mnist(tmp_path / "data", 64, 40), "--scale", "cpu", "--factors",
                    "--seeds", "0")
    log = (out / "cpu-factors.log").read_text()
    runs = ["unet-c4-n16-seed0", "unet-c8-n16-seed0", "class-c8-n16-seed0", "kmeans4-c8-n16-seed0",
            "kmeans16-c8-n16-seed0", "kmeans4feat-c8-n16-seed0", "none-short-c8-n16-seed0", "class-short-c8-n16-seed0",
            "guidance-cfg", "guidance-auto", "guidance-cfg-8", "guidance-auto-8"]  # -8: at a third of training
    for stage in runs + ["1. grid", "2. guidance", "4. figures"]:
        assert re.search(rf"^=== {re.escape(stage)}: \d+ s$", log, re.M), stage
    assert "study.sh done" in log and "FAILED" not in log
    networks = {run: plumbing.load_checkpoint(sorted((out / "runs" / run).glob("snapshot-*.pt"))[-1]) for run in runs[:6]}
    assert [networks[run]["network"]["channels"] for run in runs[:2]] == [4, 8]
    assert networks["kmeans4feat-c8-n16-seed0"]["args"]["cluster_space"] == "classifier"
    assert networks["kmeans4feat-c8-n16-seed0"]["kmeans_centroids"].shape == (4, 128)
    guided = np.load(out / "samples" / "guidance-auto.npz")
    np.testing.assert_allclose(guided["guidance_weights"], np.arange(11) * 0.2, rtol=0, atol=1e-12)
    table = (out / "figures" / "factors.txt").read_text()
    assert "size: " in table and "conditioning: k-means in classifier k = 4" in table
    assert "conditioning: k-means in pixels k = 16" in table and "guidance: class-short-c8-n16-seed0" in table
    guided_at = {int(line.split()[2].replace(",", "")) for line in table.splitlines() if line.startswith("guidance: ")
                 and "short" in line}
    assert guided_at == {8, 160}, guided_at
    for figure in ("factor_size", "factor_conditioning", "factor_guidance"):
        assert (out / "figures" / f"{figure}.png").exists(), figure
