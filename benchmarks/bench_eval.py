"""Throughput of eval_gap's E(sigma) loop against the bare forward pass of the same network, and of
sample_memorize's sampler, with the network run as those scripts run it (plumbing.network_denoiser in
--forward-mode: on CUDA by default compiled, with CUDA graphs).

Loop and bare pass run the same (image, sigma) pairs in batches of the same size, in inference mode (in
--precision: auto is bf16 autocast on CUDA and on CPUs with bf16 units): the loop through
eval_gap.split_errors (which batches mixed sigmas, forms y + sigma n, and reduces the per-image errors), the
bare pass as network calls on inputs made beforehand. Throughput counts images x sigmas per second; the loop
should stay within 15% of the bare pass. The sampler (sample_memorize.sample: Heun, 2 --steps - 1 network
evaluations) runs --images samples in batches of --batch; its throughput counts images x evaluations per
second. Each timing is the best of --repeats after one warm-up run (compilation, CUDA graph recording). The
default (tiny U-Net, 16x16) runs in about a minute on a 2-core CPU.

    python benchmarks/bench_eval.py
    python benchmarks/bench_eval.py --size s --resolution 32 --images 2048 --sigmas 64 --batch 1024  # GPU
    python benchmarks/bench_eval.py --device cuda --forward-mode eager                                # GPU, eager
"""
from benchlib import best_time, parser, start  # first: common's OpenMP wait policy and Ctrl-C hook, before torch
import common
import plumbing
import torch
import eval_gap
import sample_memorize


def main():
    p = parser(__doc__, repeats=3, device=True)
    p.add_argument("--model", default="unet", help="unet or dit")
    p.add_argument("--size", default="tiny", help="network preset")
    p.add_argument("--resolution", type=plumbing.positive_int, default=16, help="image size")
    p.add_argument("--channels", type=plumbing.positive_int, default=1, help="image channels")
    p.add_argument("--images", type=plumbing.positive_int, default=128, help="images in the split")
    p.add_argument("--sigmas", type=plumbing.positive_int, default=8, help="noise levels")
    p.add_argument("--batch", type=plumbing.positive_int, default=128,
                   help="(image, sigma) pairs or samples per forward pass")
    p.add_argument("--steps", type=plumbing.at_least_two_int, default=18,
                   help="Heun steps of the sampler (sample_memorize.py --steps)")
    plumbing.add_mode_arg(p, "--forward-mode", "the network's forward passes, as eval_gap.py and sample_memorize.py "
                          "--forward-mode")
    plumbing.add_precision_arg(p, "the network's forward passes, as eval_gap.py and sample_memorize.py --precision")
    args = p.parse_args()
    device = start(args)
    plumbing.check_compile(args.forward_mode, device, "--forward-mode")
    torch.manual_seed(0)
    net = common.build_network(args.model, args.size, args.resolution, args.channels)
    with torch.no_grad():  # random output layers, so the network does real work on every path
        for p_ in net.parameters():
            p_.add_(0.02 * torch.randn_like(p_))
    net = net.to(device).eval().requires_grad_(False)
    precision = plumbing.choose_precision(args.precision, device)
    model = plumbing.network_denoiser(net, device, args.forward_mode, precision)
    mode, graphs = plumbing.compile_mode(args.forward_mode, device.type == "cuda", 1)

    shape = (args.channels, args.resolution, args.resolution)
    y = (torch.rand(args.images, *shape) * 2 - 1).to(device)
    noise = common.image_noise(range(args.images), shape).to(device)
    sigmas = common.log_sigmas(args.sigmas)
    split = eval_gap.Split(y, noise, None, args.images, fd=None, index=torch.arange(args.images))  # E(sigma) alone
    pairs = args.images * args.sigmas
    flat_sigma = sigmas.repeat_interleave(args.images).float().to(device)
    flat_x = y.repeat(args.sigmas, 1, 1, 1) + flat_sigma.view(-1, 1, 1, 1) * noise.repeat(args.sigmas, 1, 1, 1)
    batches = [(flat_x[i:i + args.batch], flat_sigma[i:i + args.batch]) for i in range(0, pairs, args.batch)]

    def loop():
        eval_gap.split_errors(model, None, split, sigmas, [0.0], args.batch)

    def bare():
        for x, s in batches:
            model(x, s, None)

    x_init = torch.randn(args.images, *shape, generator=torch.Generator().manual_seed(1)).to(device) * common.SIGMA_MAX
    sampler_sigmas, evaluations = common.edm_sigmas(args.steps), args.images * (2 * args.steps - 1)

    def sampler():
        for i in range(0, args.images, args.batch):
            sample_memorize.sample(model, x_init[i:i + args.batch], None, sampler_sigmas)

    print(f"{args.model} {args.size} ({common.count_parameters(net):,} parameters) at {args.resolution}x"
          f"{args.resolution}x{args.channels}; {args.images} images x {args.sigmas} sigmas = {pairs:,} pairs, "
          f"batch {args.batch}; forward passes {mode}{' with CUDA graphs' if graphs else ''} in {precision}")
    with torch.inference_mode():
        t_loop = best_time(loop, args.repeats, device)
        t_bare = best_time(bare, args.repeats, device)
        t_sampler = best_time(sampler, args.repeats, device)
    ratio = (pairs / t_loop) / (pairs / t_bare)
    print(f"  eval_gap loop   {pairs / t_loop:10.1f} images*sigmas/s   ({t_loop:.3f} s)")
    print(f"  bare forward    {pairs / t_bare:10.1f} images*sigmas/s   ({t_bare:.3f} s)")
    print(f"  loop / bare     {ratio:10.1%}   ({'within' if ratio >= 0.85 else 'NOT within'} 15% of the bare pass)")
    print(f"  sampler         {evaluations / t_sampler:10.1f} images*evaluations/s   ({t_sampler:.3f} s; "
          f"{2 * args.steps - 1} evaluations per sample)")


if __name__ == "__main__":
    plumbing.run_cli(main)
