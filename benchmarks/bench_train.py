"""Training throughput of the network presets: images/s and achieved FLOP/s of one full
training step (EDM loss, backward, Adam), against torch's matmul rate measured in the same run.

FLOPs are counted by torch.utils.flop_counter.FlopCounterMode over the first (warm-up) step;
the step time is the fastest of --repeats timed steps. The matmul rate is the fastest of a few
square matmuls in the same dtype, measured before and after each preset; the fraction is taken
against the fastest matmul of the whole run, so that a busy machine cannot inflate it.
CUDA runs in bf16 autocast with channels-last tensors; CPU runs in float32.

    python benchmarks/bench_train.py                          # unet tiny..m at batch 128
    python benchmarks/bench_train.py --model dit --sizes s,l --device cuda
"""
import os

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchlib import matmul_gflops, parser, start, wall_time
import common


def parse_args():
    p = parser(__doc__, repeats=1, device=True)
    p.add_argument("--model", default="unet", choices=sorted(common.NETWORK_PRESETS))
    p.add_argument("--sizes", default="auto", help="comma-separated presets; auto: all on CUDA, "
                   "all but l on CPU")
    p.add_argument("--batch", type=int, default=128, help="images per training step")
    p.add_argument("--resolution", type=int, default=32, help="image size")
    p.add_argument("--channels", type=int, default=3, help="image channels")
    p.add_argument("--compile", action="store_true", help="time the torch.compile'd network (FLOPs are "
                   "counted on the eager one)")
    p.add_argument("--matmul-size", type=int, default=None, help="side of the square matmul; "
                   "default 8192 on CUDA, 2048 on CPU")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and images")
    p.add_argument("--out", default=None, help="optional .npz for the table (with the arguments)")
    return p.parse_args()


def bench_preset(args, size, device):
    """(parameters, FLOPs per step, fastest step time in s) of one preset's training step."""
    cuda = device.type == "cuda"
    denoiser = common.build_network(args.model, size, args.resolution, args.channels).to(device).train()
    memory_format = torch.channels_last if cuda else torch.contiguous_format
    denoiser = denoiser.to(memory_format=memory_format)
    opt = torch.optim.Adam(denoiser.parameters(), lr=1e-4, fused=True if cuda else None)
    y = torch.rand(args.batch, args.channels, args.resolution, args.resolution, device=device) * 2 - 1
    y = y.contiguous(memory_format=memory_format)

    def step(model):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = common.edm_loss(model, y).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with FlopCounterMode(display=False) as counter:
        step(denoiser)
    model = denoiser
    if args.compile:
        model = torch.compile(denoiser)
        step(model)  # compiles
    best = min(wall_time(lambda: step(model), device) for _ in range(args.repeats))
    return common.count_parameters(denoiser), counter.get_total_flops(), best


def main():
    args = parse_args()
    common.check_writable(args.out)
    device = start(args)
    torch.manual_seed(args.seed)
    cuda = device.type == "cuda"
    presets = list(common.NETWORK_PRESETS[args.model])
    sizes = [s for s in presets if cuda or s != "l"] if args.sizes == "auto" else args.sizes.split(",")
    for s in sizes:
        common.check(s in presets, f"unknown size {s!r} for {args.model}: choose from {', '.join(presets)}")
    common.check(args.batch >= 1, "--batch must be positive")
    dtype = torch.bfloat16 if cuda else torch.float32
    n = args.matmul_size or (8192 if cuda else 2048)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.model} training step{' (compiled)' if args.compile else ''}, batch {args.batch}, "
          f"{args.channels}x{args.resolution}x{args.resolution}, {str(dtype).split('.')[-1]} on {name}")
    rates, rows = [matmul_gflops(n, n, n, dtype, device) * 1e9], []
    for size in sizes:
        try:
            params, flops, seconds = bench_preset(args, size, device)
        except torch.cuda.OutOfMemoryError:
            print(f"{size}: does not fit in GPU memory at batch {args.batch}")
            torch.cuda.empty_cache()
            continue
        rates.append(matmul_gflops(n, n, n, dtype, device) * 1e9)
        rows.append(dict(size=size, params=params, flops_per_image=flops / args.batch,
                         images_per_s=args.batch / seconds, flops_per_s=flops / seconds,
                         matmul_flops_per_s=max(rates[-2:])))
        print(f"{size}: {seconds:.2f} s per step", flush=True)
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
