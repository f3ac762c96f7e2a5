"""The benchmark scripts run end to end on small cases and report what they promise."""
import functools
import os
import re
import subprocess
import sys

import pytest
import torch

import common

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


def test_bench_eval_compares_the_loop_with_the_bare_forward_pass():
    out = run_bench("bench_eval", "--images", "8", "--sigmas", "2", "--batch", "8", "--repeats", "1",
                    "--device", "cpu")
    assert "8 images x 2 sigmas = 16 pairs, batch 8" in out
    rates = {name: (float(rate), float(seconds)) for name, rate, seconds in
             re.findall(r"^  (eval_gap loop|bare forward) +(\S+) images\*sigmas/s +\((\S+) s\)$", out, re.M)}
    assert sorted(rates) == ["bare forward", "eval_gap loop"], out
    for rate, seconds in rates.values():  # each rate is the 16 pairs over the time shown (to the ms)
        assert rate > 0 and 16 / rate == pytest.approx(seconds, abs=6e-4)
    share, verdict = re.search(r"loop / bare +(\S+)% +\((within|NOT within) 15%", out).groups()
    assert float(share) == pytest.approx(100 * rates["eval_gap loop"][0] / rates["bare forward"][0], abs=0.1)
    assert (verdict == "within") == (float(share) >= 85)


def test_bench_train_counts_flops_and_times_the_compiled_step(monkeypatch, capsys, tmp_path):
    # In-process, with torch.compile's graph capture on the aot_eager backend (no C++ build).
    monkeypatch.syspath_prepend(BENCH)
    import bench_train
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    out_file = tmp_path / "train.npz"
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--sizes", "tiny", "--batch", "4", "--resolution", "16",
                                      "--channels", "1", "--matmul-size", "128", "--device", "cpu", "--compile",
                                      "--out", str(out_file)])
    bench_train.main()
    out = capsys.readouterr().out
    assert "(compiled)" in out and re.search(r"^\s+tiny\s+0\.\d+M", out, re.M), out
    table = common.load_npz(str(out_file))
    assert table["args"]["compile"] and list(table["size"]) == ["tiny"]
    assert table["images_per_s"][0] > 0 and table["flops_per_image"][0] > 1e6
