"""Training throughput of the network presets: images/s and achieved FLOP/s of train_image.py's own
training step (train_image.train_step: noise draws, EDM loss, backward, Adam, EMA), against torch's
matmul rate measured in the same run, in each --precision.

FLOPs are counted by torch.utils.flop_counter.FlopCounterMode over the first step, run eagerly; then the
warm-up steps run (compilation, CUDA-graph recording: their time is printed), and the step time is the fastest
(and the median) of --repeats timed steps, with this process's CPU time beside it (on a shared machine: the time
the step computed, not waiting for a core). The step runs in the step mode (--step-mode auto: as train_image.py
chooses it for a run as long as the benchmark's, with its fallback to eager) and with the CPU threads that
train_image.py would use (--threads). The matmul rate is the fastest of a few square matmuls in the precision's
dtype (float32, on CUDA TF32; bf16), measured before and after each preset; the fraction is taken against the
fastest matmul of that dtype in the whole run, so that a busy machine cannot inflate it. CUDA runs with
channels-last tensors. The header names the CPU's bf16 units (plumbing.cpu_bf16_units), which decide --precision
auto on a CPU. --background-load runs one busy single-threaded process alongside the timed steps, as another job
on a shared machine would.

    python benchmarks/bench_train.py                          # unet tiny..m at batch 128, fp32 and bf16
    python benchmarks/bench_train.py --model dit --sizes s,l --device cuda --precision bf16
    python benchmarks/bench_train.py --sizes tiny --batch 32 --resolution 16 --channels 1 --net-channels 24 \
        --threads 1 --step-mode eager       # the quick reproduction's step (--step-mode compile: compiled)
"""
import contextlib
import copy
import os
import subprocess
import sys
import time

from benchlib import matmul_gflops, parser, start, wall_time  # first: sets OpenMP's wait policy (common)
import common
import plumbing
import train_image

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode


def parse_args():
    p = parser(__doc__, repeats=1, device=True)
    p.add_argument("--model", default="unet", choices=sorted(common.NETWORK_PRESETS))
    p.add_argument("--sizes", default="auto", help="comma-separated presets; auto: all on CUDA, "
                   "all but l on CPU")
    p.add_argument("--batch", type=plumbing.positive_int, default=128, help="images per training step")
    p.add_argument("--resolution", type=plumbing.positive_int, default=32, help="image size")
    p.add_argument("--channels", type=plumbing.positive_int, default=3, help="image channels")
    p.add_argument("--net-channels", type=plumbing.positive_int, default=None,
                   help="override the presets' base channels (train_image.py --channels)")
    plumbing.add_mode_arg(p, "--step-mode", "as train_image.py --step-mode, the training step")
    p.add_argument("--compile", dest="step_mode", action="store_const", const="compile",
                   help="same as --step-mode compile")
    p.add_argument("--precision", default="fp32,bf16", help="comma-separated train_image.py --precision "
                   "values to time each preset in (auto, fp32, bf16)")
    p.add_argument("--background-load", action="store_true", help="run one busy single-threaded process "
                   "while the steps are timed")
    p.add_argument("--matmul-size", type=plumbing.positive_int, default=None, help="side of the square matmul; "
                   "default 8192 on CUDA, 2048 on CPU")
    p.add_argument("--seed", type=plumbing.non_negative_int, default=0, help="seed of the weights and images")
    p.add_argument("--out", default=None, help="optional .npz for the table (with the arguments)")
    return p.parse_args()


@contextlib.contextmanager
def background_load(enabled):
    """One busy single-threaded process (a Python loop) while the block runs, if enabled."""
    if not enabled:
        yield
        return
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        busy.kill()
        busy.wait()


def bench_preset(args, size, precision, device):
    """(parameters, FLOPs per step, CPU threads, step mode run, warm-up seconds, (wall, CPU) seconds of each timed
    step) of one preset's training step in `precision` (fp32 or bf16)."""
    cuda = device.type == "cuda"
    torch.manual_seed(args.seed)
    net = common.build_network(args.model, size, args.resolution, args.channels, channels=args.net_channels)
    flops = train_image.step_flops(net, args.batch)
    threads = plumbing.choose_threads(flops, args.threads)
    net = net.to(device).train()
    if cuda:
        net = net.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = train_image.adam(net, 1e-4, device)
    gen = torch.Generator(device).manual_seed(args.seed)
    y = torch.rand(args.batch, args.channels, args.resolution, args.resolution, device=device) * 2 - 1
    y = y.contiguous(memory_format=torch.channels_last if cuda else torch.contiguous_format)
    autocast = device.type if precision == "bf16" else None
    mode, graphs = train_image.step_mode(args.step_mode, device, 1, flops, train_image.WARM_UP_STEPS + args.repeats)

    def step(loss_fn):
        train_image.train_step(loss_fn, net, ema, opt, y, None, 1e-4, 0.999, common.P_MEAN, common.P_STD, gen)

    eager_fn = train_image.loss_function(net, autocast)
    with FlopCounterMode(display=False) as counter:
        step(eager_fn)
    loss_fn = train_image.loss_function(net, autocast, True, graphs) if mode == "compile" else eager_fn
    guard = plumbing.CompileGuard(args.step_mode == "compile", "--step-mode", tries=train_image.WARM_UP_STEPS)
    warm_up = wall_time(lambda: [guard.run(lambda: step(loss_fn), lambda: step(eager_fn))
                                 for _ in range(train_image.WARM_UP_STEPS if mode == "compile" else 1)], device)
    if guard.failed:
        mode, loss_fn = "eager (compile failed)", eager_fn
    times = []  # (wall, CPU) seconds of each timed step
    with background_load(args.background_load):
        for _ in range(args.repeats):
            cpu = time.process_time()
            times.append((wall_time(lambda: step(loss_fn), device), time.process_time() - cpu))
    return common.count_parameters(net), counter.get_total_flops(), threads, mode, warm_up, times


def main():
    args = parse_args()
    plumbing.check_writable(args.out)
    device = start(args)
    all_threads = torch.get_num_threads()
    cuda = device.type == "cuda"
    presets = list(common.NETWORK_PRESETS[args.model])
    sizes = [s for s in presets if cuda or s != "l"] if args.sizes == "auto" else args.sizes.split(",")
    for s in sizes:
        common.check(s in presets, f"unknown size {s!r} for {args.model}: choose from {', '.join(presets)}")
    common.check(args.batch >= 1, "--batch must be positive")
    requested = args.precision.split(",")
    for p in requested:
        common.check(p in plumbing.PRECISIONS, f"unknown --precision {p!r}: choose from {', '.join(plumbing.PRECISIONS)}")
    precisions = list(dict.fromkeys(plumbing.choose_precision(p, device) for p in requested))
    plumbing.check_compile(args.step_mode, device, "--step-mode")
    n = args.matmul_size or (8192 if cuda else 2048)
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    net_channels = f", {args.net_channels} base channels" if args.net_channels else ""
    units = ", ".join(plumbing.cpu_bf16_units()) or "none (bf16 is emulated)"
    print(f"{args.model} training step (--step-mode {args.step_mode}), batch {args.batch}, "
          f"{args.channels}x{args.resolution}x{args.resolution}{net_channels}, {' and '.join(precisions)} on {name}"
          f"{', one busy process alongside' if args.background_load else ''}; CPU bf16 units: {units}")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    rates = {p: [matmul_gflops(n, n, n, dtypes[p], device) * 1e9] for p in precisions}
    rows = []
    for size in sizes:
        for precision in precisions:
            try:
                params, flops, threads, mode, warm_up, times = bench_preset(args, size, precision, device)
            except torch.cuda.OutOfMemoryError:
                print(f"{size} {precision}: does not fit in GPU memory at batch {args.batch}")
                torch.cuda.empty_cache()
                continue
            torch.set_num_threads(all_threads)  # the matmul rate with all the threads
            rates[precision].append(matmul_gflops(n, n, n, dtypes[precision], device) * 1e9)
            wall, cpu = np.array(times).T
            seconds, median = wall.min(), float(np.median(wall))
            rows.append(dict(size=size, precision=precision, mode=mode, params=params,
                             flops_per_image=flops / args.batch, threads=threads, warm_up_seconds=warm_up,
                             seconds_per_step=seconds, median_seconds_per_step=median,
                             cpu_seconds_per_step=cpu.min(), median_cpu_seconds_per_step=float(np.median(cpu)),
                             images_per_s=args.batch / seconds, flops_per_s=flops / seconds,
                             matmul_flops_per_s=max(rates[precision][-2:])))
            print(f"{size} {precision} {mode}: {seconds * 1e3:.1f} ms per step (median {median * 1e3:.1f} ms; CPU time "
                  f"{cpu.min() * 1e3:.1f} ms, median {np.median(cpu) * 1e3:.1f} ms), warm-up {warm_up:.1f} s, "
                  f"{threads} CPU thread(s)", flush=True)
    peaks = {p: max(r) for p, r in rates.items()}
    for r in rows:
        r["peak_matmul_flops_per_s"] = peaks[r["precision"]]
    header = ("size", "precision", "mode", "params", "GFLOP/img", "img/s", "TFLOP/s", "matmul TFLOP/s",
              "of peak matmul")
    print("{:>5} {:>9} {:>8} {:>9} {:>10} {:>9} {:>8} {:>15} {:>15}".format(*header))
    for r in rows:
        print(f"{r['size']:>5} {r['precision']:>9} {r['mode'].split()[0]:>8} {r['params'] / 1e6:8.2f}M "
              f"{r['flops_per_image'] / 1e9:10.2f} {r['images_per_s']:9.1f} {r['flops_per_s'] / 1e12:8.3f} "
              f"{r['matmul_flops_per_s'] / 1e12:15.3f} {r['flops_per_s'] / r['peak_matmul_flops_per_s']:14.0%}")
    for p, peak in peaks.items():
        print(f"peak matmul rate in this run, {p}: {peak / 1e12:.3f} TFLOP/s ({n}x{n}); matmul TFLOP/s is the rate "
              "measured around each preset")
    if args.out and rows:
        columns = {key: np.array([row[key] for row in rows]) for key in rows[0]}
        path = plumbing.save_npz(args.out, **columns, device=name, cpu_bf16_units=units, args=args,
                                 script=os.path.basename(__file__))
        print(f"wrote the table to {path}")


if __name__ == "__main__":
    plumbing.run_cli(main)
