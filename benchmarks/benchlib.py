"""Timing and memory helpers shared by the benchmark scripts."""
import ctypes
import os
import platform
import time

import numpy as np
import torch


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


def machine():
    """One line naming the software and hardware a benchmark ran on."""
    return (f"torch {torch.__version__}, numpy {np.__version__}, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads")
