"""The benchmark scripts run end to end on small cases and report what they promise."""
import functools
import os
import re
import subprocess
import sys

import pytest
import torch

import common
from conftest import run_tiny_script, write_fashion_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


def run_bench(name, *argv):
    """Run benchmarks/<name>.py in its own process (some benchmarks tune the allocator); -> stdout."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, os.path.join(BENCH, f"{name}.py"), *argv], env=env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_bench_optimal_reports_speed_up_and_agreement_with_numpy():
    out = run_bench("bench_optimal", "--n", "300", "--d", "16", "--queries", "8", "--repeats", "1")
    assert "(a) toy delta sweep" in out and "(b) images: 8 queries x N=300 x d=16" in out
    assert float(re.search(r"max \|difference\| (\S+)", out).group(1)) < 1e-10
    cases = re.findall(r"noise (\S+), sigma +(\S+): .*= +(\S+)% of matmul .*max \|float32 - float64\| (\S+)", out)
    assert [(noise, sigma) for noise, sigma, _, _ in cases] == [("0.5", "1"), ("1", "1"), ("0.5", "20")]
    assert all(float(share) > 0 and float(err) < 1e-5 for _, _, share, err in cases)
    assert "peak working memory beyond the data" in out


def test_bench_nn_finds_the_exact_neighbours():
    out = run_bench("bench_nn", "--n", "500", "--d", "16", "--queries", "50", "--repeats", "1")
    assert "matches float64 cdist on 16 queries: True" in out


def test_bench_eval_compares_the_loop_with_the_bare_forward_pass_and_times_the_sampler():
    out = run_bench("bench_eval", "--images", "8", "--sigmas", "2", "--batch", "8", "--repeats", "1", "--steps", "3",
                    "--device", "cpu")
    assert "8 images x 2 sigmas = 16 pairs, batch 8; forward passes eager" in out, "auto: eager on a CPU"
    rates = {name: (float(rate), float(seconds)) for name, rate, seconds in
             re.findall(r"^  (eval_gap loop|bare forward) +(\S+) images\*sigmas/s +\((\S+) s\)$", out, re.M)}
    assert sorted(rates) == ["bare forward", "eval_gap loop"], out
    for rate, seconds in rates.values():  # each rate is the 16 pairs over the time shown (to the ms)
        assert rate > 0 and 16 / rate == pytest.approx(seconds, abs=6e-4)
    share, verdict = re.search(r"loop / bare +(\S+)% +\((within|NOT within) 15%", out).groups()
    assert float(share) == pytest.approx(100 * rates["eval_gap loop"][0] / rates["bare forward"][0], abs=0.1)
    assert (verdict == "within") == (float(share) >= 85)
    rate, seconds = re.search(r"^  sampler +(\S+) images\*evaluations/s +\((\S+) s; 5 evaluations per sample\)$",
                              out, re.M).groups()
    assert 8 * 5 / float(rate) == pytest.approx(float(seconds), abs=6e-4)


@pytest.mark.parametrize("name, argv, message", [
    ("bench_nn", ["--n", "3", "--d", "4", "--queries", "10", "--k", "5"],
     "error: --k 5 neighbours need as many training vectors, got --n 3"),
    ("bench_eval", ["--images", "0"], "error: argument --images: must be a positive integer, got '0'"),
    ("bench_optimal", ["--n", "-1"], "error: argument --n: must be a positive integer, got '-1'"),
    ("bench_train", ["--batch", "0"], "error: argument --batch: must be a positive integer, got '0'"),
])
def test_bad_arguments_of_a_benchmark_stop_with_one_error_line_and_status_2(name, argv, message):
    done = subprocess.run([sys.executable, os.path.join(BENCH, f"{name}.py"), *argv], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.splitlines()[-1].endswith(message), done.stderr


def run_bench_train(monkeypatch, *argv):
    """bench_train.main() in this process on a tiny U-Net (batch 4, 16x16x1); -> (stdout, number of
    train_image.train_step calls). Restores the test's one CPU thread afterwards."""
    monkeypatch.syspath_prepend(BENCH)
    import bench_train
    import train_image
    calls, real = [0], train_image.train_step

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)
    monkeypatch.setattr(train_image, "train_step", counted)
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--sizes", "tiny", "--batch", "4", "--resolution", "16",
                                      "--channels", "1", "--matmul-size", "128", "--device", "cpu", *argv])
    try:
        bench_train.main()
    finally:
        torch.set_num_threads(1)
    return calls[0]


def test_bench_train_times_train_images_compiled_step(monkeypatch, capsys, tmp_path):
    # In-process, with torch.compile's graph capture on the aot_eager backend (no C++ build).
    import train_image
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    out_file = tmp_path / "train.npz"
    calls = run_bench_train(monkeypatch, "--compile", "--repeats", "2", "--threads", "1", "--out", str(out_file))
    out = capsys.readouterr().out
    assert "training step (compile)" in out and re.search(r"^\s+tiny\s+0\.\d+M", out, re.M), out
    assert calls == 1 + train_image.WARM_UP_STEPS + 2, "FLOP count, warm-up, timed steps: all train_image's step"
    table = common.load_npz(str(out_file))
    assert table["args"]["step_mode"] == "compile" and list(table["size"]) == ["tiny"]
    assert table["images_per_s"][0] > 0 and table["flops_per_image"][0] > 1e6 and table["threads"][0] == 1


def test_bench_train_background_load_runs_one_busy_process_and_stops_it(monkeypatch, capsys):
    monkeypatch.syspath_prepend(BENCH)
    import bench_train
    started, real_popen = [], subprocess.Popen

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]
    monkeypatch.setattr(bench_train.subprocess, "Popen", popen)
    run_bench_train(monkeypatch, "--background-load", "--repeats", "2", "--step-mode", "eager")
    out = capsys.readouterr().out
    assert "one busy process alongside" in out and "tiny: " in out, out
    assert re.search(r"tiny: \S+ s per step \(median \S+ s\), 1 CPU thread\(s\)", out), "automatic: one thread"
    assert len(started) == 1 and started[0].poll() is not None, "the busy process ran and was stopped"


@pytest.mark.slow
def test_gpu_check_tiny_runs_every_stage_on_cpu_and_logs_it(tmp_path):
    (tmp_path / "data").mkdir()
    out = tmp_path / "check"
    run_tiny_script("benchmarks/gpu_check.sh", out, write_fashion_mnist(tmp_path / "data", 40, 20), timeout=600)
    log = (out / "gpu_check.log").read_text()
    for stage in ("bench unet eager", "bench unet auto", "bench dit eager", "bench dit auto", "bench eval eager",
                  "bench eval auto", "train", "eval_gap", "sample_memorize", "eval_gap eager", "sample_memorize eager",
                  "compare forward modes"):
        assert re.search(rf"^=== {stage}: \d+ s$", log, re.M), stage
    assert re.search(r"images seen, [\d,.]+ images/s", log) and "gpu_check done" in log
    assert f"python: {sys.executable} with torch" in log, "the interpreter the check ran (run_tiny_script's PYTHON)"
    assert len(re.findall(r"^  sampler +\S+ images\*evaluations/s", log, re.M)) == 2
    for key in ("e_train", "e_val"):  # on a CPU the default forward passes are the eager ones
        assert f"{key}: largest relative difference default/eager 0.00e+00" in log
    assert {"gap.npz", "memorize.npz", "gap-eager.npz", "memorize-eager.npz", "bench-unet-auto.npz",
            "run"} <= set(os.listdir(out))
