"""The benchmark scripts run end to end on small cases and report what they promise."""
import functools
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import plumbing
from conftest import one_line, run_tiny_script, write_fashion_mnist

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
    assert all(float(err) < 1e-5 for *_, err in cases), cases
    # the share of matmul is a timing: on a busy machine a case this small rounds to 0.0%, so only its form is checked
    assert all(0 <= float(share) <= 100 for _, _, share, _ in cases), cases
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


def test_bench_train_times_train_images_compiled_step_in_both_precisions(monkeypatch, capsys, tmp_path):
    # In-process, with torch.compile's graph capture on the aot_eager backend (no C++ build).
    import train_image
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    out_file = tmp_path / "train.npz"
    calls = run_bench_train(monkeypatch, "--compile", "--repeats", "2", "--threads", "1", "--out", str(out_file))
    out = capsys.readouterr().out
    units = ", ".join(plumbing.cpu_bf16_units()) or "none (bf16 is emulated)"
    assert "training step (--step-mode compile)" in out and f"fp32 and bf16 on CPU; CPU bf16 units: {units}" in out
    for precision in ("fp32", "bf16"):
        assert re.search(rf"^\s+tiny\s+{precision}\s+compile\s+0\.\d+M", out, re.M), out
        assert re.search(rf"^peak matmul rate in this run, {precision}: \S+ TFLOP/s", out, re.M), out
    assert calls == 2 * (1 + train_image.WARM_UP_STEPS + 2), "per precision: FLOP count, warm-up, timed steps"
    table = plumbing.load_npz(str(out_file))
    assert table["args"]["step_mode"] == "compile" and list(table["size"]) == ["tiny", "tiny"]
    assert list(table["precision"]) == ["fp32", "bf16"] and list(table["mode"]) == ["compile", "compile"]
    assert str(table["cpu_bf16_units"]) == units
    assert (table["images_per_s"] > 0).all() and (table["flops_per_image"] > 1e6).all()
    assert (table["threads"] == 1).all() and (table["warm_up_seconds"] > 0).all()
    assert (table["peak_matmul_flops_per_s"] > 0).all() and (table["cpu_seconds_per_step"] > 0).all()


def test_bench_train_default_step_times_eager_steps_when_compile_fails(monkeypatch, capsys):
    import train_image

    def failing_backend(gm, inputs):
        raise RuntimeError("no compiler here")
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=failing_backend))
    monkeypatch.setattr(train_image, "step_mode", lambda *args: ("compile", False))  # auto compiles, as on CUDA
    torch._dynamo.reset()
    run_bench_train(monkeypatch, "--repeats", "1", "--precision", "fp32")
    out = capsys.readouterr().out
    assert "torch.compile failed (BackendCompilerFailed" in out and "no compiler here); running eager" in out
    assert re.search(r"^tiny fp32 eager \(compile failed\): \S+ ms per step", out, re.M), out


def test_bench_train_background_load_runs_one_busy_process_and_stops_it(monkeypatch, capsys):
    monkeypatch.syspath_prepend(BENCH)
    import bench_train
    started, real_popen = [], subprocess.Popen

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]
    monkeypatch.setattr(bench_train.subprocess, "Popen", popen)
    run_bench_train(monkeypatch, "--background-load", "--repeats", "2", "--step-mode", "eager", "--precision", "fp32")
    out = capsys.readouterr().out
    assert "one busy process alongside" in out, out
    assert re.search(r"^tiny fp32 eager: \S+ ms per step \(median \S+ ms; CPU time \S+ ms, median \S+ ms\), "
                     r"warm-up \S+ s, 1 CPU thread\(s\)$", out, re.M), "automatic: one thread"
    assert len(started) == 1 and started[0].poll() is not None, "the busy process ran and was stopped"


@pytest.mark.slow
def test_gpu_check_stages_run_one_by_one_on_cpu_into_one_log_each_ending_with_the_summary(tmp_path):
    data, out = write_fashion_mnist(tmp_path, 40, 20), tmp_path / "check"
    root = os.path.dirname(BENCH)
    bad = subprocess.run(["bash", os.path.join(BENCH, "gpu_check.sh"), "--stage", "fit"], capture_output=True,
                         text=True, cwd=root)
    assert bad.returncode == 2
    one_line(bad.stderr, "error: ", "--stage fit", "bench, train, eval, sample or all")
    rows = {"bench": r"^bench +bench_train U-Net tiny +img/s +[\d.]+ +[\d.]+ +[\d.]+x +\d+% of the "
                     rf"{plumbing.choose_precision('auto', 'cpu')} matmul peak",
            "train": r"^train +train_image.py +img/s +[\d.]+ +[\d.]+ +[\d.]+x +default ran: eager, "
                     r"(bf16 autocast|float32) +\| +loss at step 1 0.0e\+00, last E_val 0.0e\+00$",
            "eval": r"^eval +eval_gap.py .*\| +E\(sigma\) e_train 0.0e\+00, e_val 0.0e\+00$",
            "sample": r"^sample +sample_memorize.py .*\| +samples \|default - eager\| <= 0.00e\+00; copies"}
    for i, stage in enumerate(rows):  # on a CPU the default mode runs eager: the two modes agree exactly
        summary = run_tiny_script("benchmarks/gpu_check.sh", out, data, "--stage", stage, timeout=600)
        for earlier in list(rows)[:i + 1]:
            assert re.search(rows[earlier], summary, re.M), (stage, earlier, summary[-3000:])
        assert re.search(rf"^stage times: .*{stage} \d+ s", summary, re.M)
    assert re.search(r"^eval +bench_eval: eval_gap's loop +img\*sigma/s +[\d.]+ +[\d.]+ .* of the bare forward pass",
                     summary, re.M)
    log = (out / "gpu_check.log").read_text()
    for stage in rows:
        assert len(re.findall(rf"^gpu_check --stage {stage} on cpu \(tiny\)", log, re.M)) == 1
        assert re.search(rf"^=== stage {stage}: \d+ s$", log, re.M) and f"gpu_check --stage {stage} done" in log
    assert "FAILED" not in log and re.search(r"images seen, [\d,.]+ images/s", log)
    # --eager runs the eager commands only; without the default run the eager run stands in for it
    shutil.rmtree(out / "run-default")
    eager = run_tiny_script("benchmarks/gpu_check.sh", out, data, "--stage", "sample", "--eager", timeout=600)
    assert "--- sample-default" not in eager and re.search(r"^--- sample-eager: .*sample_memorize.py \S+/run-eager/"
                                                           r"snapshot-\d+\.pt .*--forward-mode eager", eager, re.M)
    assert f"python: {sys.executable} with torch" in log, "the interpreter the check ran (run_tiny_script's PYTHON)"
