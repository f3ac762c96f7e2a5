"""Timing, memory and command-line helpers shared by the benchmark scripts."""
import argparse
import ctypes
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import plumbing  # noqa: E402  (before torch: it sets OpenMP's wait policy, which torch reads when it loads)

import numpy as np  # noqa: E402
import torch  # noqa: E402


def sync(device="cpu"):
    """Wait for queued CUDA work, so that wall time counts it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def wall_time(fn, device="cpu"):
    """Wall time of one call of fn."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def best_time(fn, repeats, device="cpu"):
    """Smallest wall time of `repeats` calls, after one warm-up call."""
    fn()
    return min(wall_time(fn, device) for _ in range(repeats))


def matmul_gflops(m, k, n, dtype=torch.float32, device="cpu", repeats=5):
    """torch's own matmul rate for an (m x k) @ (k x n) product, in GFLOP/s (best of repeats)."""
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    return 2 * m * k * n / best_time(lambda: a @ b, repeats, device) / 1e9


def fix_mmap_threshold(size=128 * 1024):
    """glibc: serve every allocation above `size` by mmap and return it on free (mallopt
    M_MMAP_THRESHOLD), so that VmHWM measures live memory rather than freed-but-cached heap."""
    try:
        return ctypes.CDLL("libc.so.6").mallopt(-3, size) == 1
    except OSError:
        return False


def peak_extra_mb(fn):
    """Peak resident memory above the level before fn() (Linux: VmHWM after resetting it), in MB."""
    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return float("nan")
    base = status("VmRSS:")
    fn()
    return status("VmHWM:") - base


def cpu_name():
    """The CPU's model name and widest vector extension (Linux /proc/cpuinfo), e.g. 'AMD EPYC 7B13, AVX2'."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or platform.machine()
    flags = set(info.get("flags", "").split())
    isa = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"), ("asimd", "NEON"))
                if flag in flags), platform.machine())
    return f"{info.get('model name', platform.machine())}, {isa}"


def machine(device="cpu"):
    """One line naming the software and hardware a benchmark ran on."""
    device = torch.device(device)
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (f"torch {torch.__version__}, numpy {np.__version__}, {cpu_name()}, {os.cpu_count()} CPUs "
            f"(load average {os.getloadavg()[0]:.1f}), {torch.get_num_threads()} torch threads{gpu}")


def parser(doc, repeats, device=False):
    """The benchmark's argument parser with the shared --repeats, --threads (and --device) flags. Numbers are
    checked as the scripts check theirs (plumbing.positive_int, ...), and main() runs through plumbing.run_cli: bad
    input is one line 'error: ...' or argparse's usage error, exit status 2."""
    p = argparse.ArgumentParser(description=doc, formatter_class=plumbing.HelpFormatter)
    p.add_argument("--repeats", type=plumbing.positive_int, default=repeats,
                   help="timed repeats (the best is reported)")
    p.add_argument("--threads", type=plumbing.non_negative_int, default=0, help=plumbing.THREADS_HELP)
    if device:
        p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:N, mps")
    return p


def start(args):
    """Apply --threads, pick --device (when the benchmark has one), print the machine line; -> device."""
    plumbing.choose_threads(None, args.threads)
    device = plumbing.pick_device(getattr(args, "device", "cpu"))
    print(machine(device))
    return device
