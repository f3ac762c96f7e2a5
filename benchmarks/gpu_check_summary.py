"""The summary table of benchmarks/gpu_check.sh: for every stage with results in OUT, the rate eager and in the
default mode (--step-mode/--forward-mode auto), the ratio, a note (the share of the bf16 matmul peak measured in
the same run, or of the bare forward pass; what the default mode ran), and the largest difference between the
two modes' results; then the time of each stage's last run.

    python benchmarks/gpu_check_summary.py results/gpu_check
"""
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import plumbing  # noqa: E402  (before numpy and torch, as every script)
import common

import numpy as np  # noqa: E402

MODES = ("eager", "default")


def text(out, name):
    """OUT/NAME.txt, the output gpu_check.sh kept of one command ('' when missing)."""
    path = os.path.join(out, f"{name}.txt")
    return open(path, errors="replace").read() if os.path.isfile(path) else ""


def number(pattern, source):
    """The first group of pattern in source as a float (thousands separators dropped), or None."""
    found = re.search(pattern, source, re.M)
    return float(found.group(1).replace(",", "")) if found else None


def npz(out, name):
    path = os.path.join(out, name)
    return plumbing.load_npz(path) if os.path.isfile(path) else None


def largest_relative(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) / np.asarray(b, np.float64) - 1)))


def rows(out):
    """(stage, what, unit, {mode: rate}, note, difference) rows of the results in out."""
    found = []
    benches = {mode: npz(out, f"bench-{mode}.npz") for mode in MODES}
    sizes = next((list(t["size"]) for t in benches.values() if t is not None), [])
    for size in sizes:
        rate, note = {}, ""
        for mode, table in benches.items():
            if table is not None and size in list(table["size"]):
                i = list(table["size"]).index(size)
                rate[mode] = float(table["images_per_s"][i])
                note = (f"{table['flops_per_s'][i] / table['peak_matmul_flops_per_s'][i]:.0%} of the "
                        f"{table['precision'][i]} matmul peak ({mode}: {table['mode'][i]})")
        found.append(("bench", f"bench_train U-Net {size}", "img/s", rate, note, ""))

    train = {mode: text(out, f"train-{mode}") for mode in MODES}
    if any(train.values()):
        rate = {m: number(r"images seen, ([\d,.]+) images/s", t) for m, t in train.items() if t}
        ran = re.search(r"training step: ([^(]+) \(--precision (\w+)\)", train["default"] or train["eager"])
        logs = {m: npz(out, os.path.join(f"run-{m}", "train_log.npz")) for m in MODES}
        diff = ""
        if all(log is not None for log in logs.values()):
            a, b = logs["default"], logs["eager"]
            diff = (f"loss at step 1 {largest_relative(a['loss'][:1], b['loss'][:1]):.1e}, "
                    f"last E_val {largest_relative(a['E_val'][-1], b['E_val'][-1]):.1e}")
        found.append(("train", "train_image.py", "img/s", rate, f"default ran: {ran.group(1)}" if ran else "", diff))

    bench_eval = {mode: text(out, f"bench-eval-{mode}") for mode in MODES}
    if any(bench_eval.values()):
        loop = {m: number(r"eval_gap loop +([\d.]+)", t) for m, t in bench_eval.items() if t}
        share = {m: number(r"loop / bare +([\d.]+)%", t) for m, t in bench_eval.items() if t}
        ran = re.search(r"forward passes (.+)$", bench_eval["default"] or bench_eval["eager"], re.M)
        note = ", ".join(f"{m} {s:.0f}%" for m, s in share.items() if s is not None) + " of the bare forward pass"
        found.append(("eval", "bench_eval: eval_gap's loop", "img*sigma/s", loop, note, ""))
        sampler = {m: number(r"sampler +([\d.]+)", t) for m, t in bench_eval.items() if t}
        found.append(("eval", "bench_eval: the sampler", "img*eval/s", sampler,
                      f"default ran: {ran.group(1)}" if ran else "", ""))
    gaps = {mode: npz(out, f"gap-{mode}.npz") for mode in MODES}
    if any(g is not None for g in gaps.values()):
        diff = ""
        if all(g is not None for g in gaps.values()):
            diff = "E(sigma) " + ", ".join(f"{key} {largest_relative(gaps['default'][key], gaps['eager'][key]):.1e}"
                                           for key in ("e_train", "e_val"))
        found.append(("eval", "eval_gap.py", "", {}, "", diff))
    samples = {mode: npz(out, f"memorize-{mode}.npz") for mode in MODES}
    if any(s is not None for s in samples.values()):
        diff = ""
        if all(s is not None for s in samples.values()):
            a, b = (samples[m]["samples"].astype(np.float32) for m in ("default", "eager"))
            copies = [float(np.mean(samples[m]["memorized_fraction"])) for m in ("default", "eager")]
            diff = f"samples |default - eager| <= {np.abs(a - b).max():.2e}; copies {copies[0]:.0%} vs {copies[1]:.0%}"
        found.append(("sample", "sample_memorize.py", "", {}, "", diff))
    return found


def stage_times(out):
    """{stage: seconds} of each stage's last run (OUT/stage_times.txt, which gpu_check.sh appends to)."""
    return {stage: int(seconds) for stage, seconds in (line.split() for line in text(out, "stage_times").splitlines())}


def main():
    common.check(len(sys.argv) == 2, "usage: gpu_check_summary.py OUT (the --out folder of gpu_check.sh)")
    out = sys.argv[1]
    table = rows(out)
    print(f"summary of {out} (default: --step-mode/--forward-mode auto)")
    header = ("stage", "what", "unit", "eager", "default", "default/eager", "note", "largest difference")
    print("{:<7} {:<28} {:<12} {:>10} {:>10} {:>13}  {}  |  {}".format(*header))
    for stage, what, unit, rate, note, diff in table:
        cells = [f"{rate[m]:10.1f}" if rate.get(m) is not None else f"{'-':>10}" for m in MODES]
        ratio = (f"{rate['default'] / rate['eager']:12.2f}x" if rate.get("default") and rate.get("eager")
                 else f"{'-':>13}")
        print(f"{stage:<7} {what:<28} {unit:<12} {cells[0]} {cells[1]} {ratio}  {note or '-'}  |  {diff or '-'}")
    times = stage_times(out)
    print("stage times: " + (", ".join(f"{stage} {seconds} s" for stage, seconds in times.items()) or "none yet"))


if __name__ == "__main__":
    plumbing.run_cli(main)
