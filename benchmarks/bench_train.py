"""Training throughput of the network presets: images/s and achieved FLOP/s of train_image.py's own
training step (train_image.train_step: noise draws, EDM loss, backward, Adam, EMA), against torch's
matmul rate measured in the same run.

FLOPs are counted by torch.utils.flop_counter.FlopCounterMode over the first (warm-up) step, run
eagerly; the step time is the fastest (and the median) of --repeats timed steps, in the step mode and with the CPU
threads that train_image.py would use (--step-mode, --threads). The matmul rate is the fastest of a
few square matmuls in the same dtype, measured before and after each preset; the fraction is taken
against the fastest matmul of the whole run, so that a busy machine cannot inflate it.
CUDA runs in bf16 autocast with channels-last tensors; CPU runs in float32. --background-load runs
one busy single-threaded process alongside the timed steps, as another job on a shared machine would.

    python benchmarks/bench_train.py                          # unet tiny..m at batch 128
    python benchmarks/bench_train.py --model dit --sizes s,l --device cuda
    python benchmarks/bench_train.py --sizes tiny --batch 32 --resolution 16 --channels 1 --background-load
"""
import contextlib
import copy
import os
import subprocess
import sys

from benchlib import matmul_gflops, parser, start, wall_time  # first: sets OpenMP's wait policy (common)
import common
import train_image

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode


def parse_args():
    p = parser(__doc__, repeats=1, device=True)
    p.add_argument("--model", default="unet", choices=sorted(common.NETWORK_PRESETS))
    p.add_argument("--sizes", default="auto", help="comma-separated presets; auto: all on CUDA, "
                   "all but l on CPU")
    p.add_argument("--batch", type=common.positive_int, default=128, help="images per training step")
    p.add_argument("--resolution", type=common.positive_int, default=32, help="image size")
    p.add_argument("--channels", type=common.positive_int, default=3, help="image channels")
    p.add_argument("--net-channels", type=common.positive_int, default=None,
                   help="override the presets' base channels (train_image.py --channels)")
    common.add_mode_arg(p, "--step-mode", "as train_image.py --step-mode, the training step")
    p.add_argument("--compile", dest="step_mode", action="store_const", const="compile",
                   help="same as --step-mode compile")
    p.add_argument("--background-load", action="store_true", help="run one busy single-threaded process "
                   "while the steps are timed")
    p.add_argument("--matmul-size", type=common.positive_int, default=None, help="side of the square matmul; "
                   "default 8192 on CUDA, 2048 on CPU")
    p.add_argument("--seed", type=common.non_negative_int, default=0, help="seed of the weights and images")
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


def bench_preset(args, size, device):
    """(parameters, FLOPs per step, CPU threads, step times in s) of one preset's training step."""
    cuda = device.type == "cuda"
    net = common.build_network(args.model, size, args.resolution, args.channels, channels=args.net_channels)
    threads = common.choose_threads(train_image.step_flops(net, args.batch), args.threads)
    net = net.to(device).train()
    if cuda:
        net = net.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, fused=True if cuda else None)
    gen = torch.Generator(device).manual_seed(args.seed)
    y = torch.rand(args.batch, args.channels, args.resolution, args.resolution, device=device) * 2 - 1
    y = y.contiguous(memory_format=torch.channels_last if cuda else torch.contiguous_format)
    mode, graphs = common.compile_mode(args.step_mode, cuda, 1)

    def step(loss_fn):
        train_image.train_step(loss_fn, net, ema, opt, y, None, 1e-4, 0.999, common.P_MEAN, common.P_STD, gen)

    with FlopCounterMode(display=False) as counter:
        step(train_image.loss_function(net, cuda=cuda))
    loss_fn = train_image.loss_function(net, mode == "compile", cuda, graphs)
    for _ in range(train_image.WARM_UP_STEPS if mode == "compile" else 1):
        step(loss_fn)  # compilation, CUDA graph recording
    with background_load(args.background_load):
        times = [wall_time(lambda: step(loss_fn), device) for _ in range(args.repeats)]
    return common.count_parameters(net), counter.get_total_flops(), threads, times


def main():
    args = parse_args()
    common.check_writable(args.out)
    device = start(args)
    all_threads = torch.get_num_threads()
    torch.manual_seed(args.seed)
    cuda = device.type == "cuda"
    presets = list(common.NETWORK_PRESETS[args.model])
    sizes = [s for s in presets if cuda or s != "l"] if args.sizes == "auto" else args.sizes.split(",")
    for s in sizes:
        common.check(s in presets, f"unknown size {s!r} for {args.model}: choose from {', '.join(presets)}")
    dtype = torch.bfloat16 if cuda else torch.float32
    n = args.matmul_size or (8192 if cuda else 2048)
    mode, graphs = common.compile_mode(args.step_mode, cuda, 1)
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    net_channels = f", {args.net_channels} base channels" if args.net_channels else ""
    print(f"{args.model} training step ({mode}{' with CUDA graphs' if graphs else ''}), batch {args.batch}, "
          f"{args.channels}x{args.resolution}x{args.resolution}{net_channels}, {str(dtype).split('.')[-1]} on {name}"
          f"{', one busy process alongside' if args.background_load else ''}")
    rates, rows = [matmul_gflops(n, n, n, dtype, device) * 1e9], []
    for size in sizes:
        try:
            params, flops, threads, times = bench_preset(args, size, device)
        except torch.cuda.OutOfMemoryError:
            print(f"{size}: does not fit in GPU memory at batch {args.batch}")
            torch.cuda.empty_cache()
            continue
        torch.set_num_threads(all_threads)  # the matmul rate with all the threads
        rates.append(matmul_gflops(n, n, n, dtype, device) * 1e9)
        seconds, median = min(times), float(np.median(times))
        rows.append(dict(size=size, params=params, flops_per_image=flops / args.batch, threads=threads,
                         seconds_per_step=seconds, median_seconds_per_step=median, images_per_s=args.batch / seconds,
                         flops_per_s=flops / seconds, matmul_flops_per_s=max(rates[-2:])))
        print(f"{size}: {seconds:.3f} s per step (median {median:.3f} s), {threads} CPU thread(s)", flush=True)
    peak = max(rates)
    header = ("size", "params", "GFLOP/img", "img/s", "TFLOP/s", "matmul TFLOP/s", "of peak matmul")
    print("{:>5} {:>9} {:>10} {:>9} {:>8} {:>15} {:>15}".format(*header))
    for r in rows:
        print(f"{r['size']:>5} {r['params'] / 1e6:8.2f}M {r['flops_per_image'] / 1e9:10.2f} "
              f"{r['images_per_s']:9.1f} {r['flops_per_s'] / 1e12:8.3f} {r['matmul_flops_per_s'] / 1e12:15.3f} "
              f"{r['flops_per_s'] / peak:14.0%}")
    print(f"peak matmul rate in this run: {peak / 1e12:.3f} TFLOP/s ({n}x{n}, {str(dtype).split('.')[-1]}); "
          f"matmul TFLOP/s is the rate measured around each preset")
    if args.out and rows:
        columns = {key: np.array([row[key] for row in rows]) for key in rows[0]}
        path = common.save_npz(args.out, **columns, peak_matmul_flops_per_s=peak, device=name, args=args,
                               script=os.path.basename(__file__))
        print(f"wrote the table to {path}")


if __name__ == "__main__":
    common.run_cli(main)
