"""Throughput of common.optimal_denoiser against a straightforward NumPy version.

(a) the toy delta sweep (docs/method.md, toy panel (b)): 11 deltas x 120 sigmas x (10 train + 10 val points)
    x 50 noise draws, 10 training points in 2D, float64, one call per delta;
(b) an image-sized case: N = 60000 training vectors of d = 784, 512 queries, float32.
The NumPy version builds the (queries x N x d) difference array; in (b) it runs on a few
queries and is scaled up. Times are the best of --repeats runs after a warm-up run. GFLOP/s
counts the two matmuls (4 B N d flops) and is set against torch's own matmul rate measured
in the same run.

    python benchmarks/bench_optimal.py
"""
from benchlib import best_time, fix_mmap_threshold, matmul_gflops, parser, peak_extra_mb, start  # first: as common
import common
import plumbing
import numpy as np
import torch
import toy2d


def numpy_optimal(x, sigma, data):
    """Straightforward y*: full (B, N, d) difference array, then a softmax over N."""
    d2 = ((x[:, None, :] - data[None, :, :]) ** 2).sum(-1)
    logits = -d2 / (2 * np.asarray(sigma).reshape(-1, 1) ** 2)
    logits -= logits.max(1, keepdims=True)
    w = np.exp(logits)
    return (w / w.sum(1, keepdims=True)) @ data


def numpy_error_prone(x, sigma, data, delta):
    s2, d2 = sigma ** 2, delta ** 2
    return (d2 * x + s2[:, None] * numpy_optimal(x, np.sqrt(s2 + d2), data)) / (s2 + d2)[:, None]


def bench_toy(repeats):
    train, val, _ = toy2d.circle_data(20, 10.0, random=False, seed=0)   # the symmetric circle of toy2d.py
    points = torch.cat([train, val])
    sigmas = common.edm_sigmas(120)[:-1]
    noise = toy2d.fixed_noise(len(points), 50, seed=0)
    x = (points[None, :, None] + sigmas[:, None, None, None] * noise[None]).reshape(-1, 2)
    sig = sigmas[:, None, None].expand(120, 20, 50).reshape(-1)
    deltas = np.linspace(2.2, 1.2, 11)
    x_np, sig_np, train_np = x.numpy(), sig.numpy(), train.numpy()
    t_torch = best_time(lambda: [common.error_prone_denoiser(x, sig, train, d) for d in deltas], repeats)
    t_numpy = best_time(lambda: [numpy_error_prone(x_np, sig_np, train_np, d) for d in deltas], repeats)
    err = np.abs(common.error_prone_denoiser(x, sig, train, 1.6).numpy() - numpy_error_prone(x_np, sig_np, train_np, 1.6)).max()
    print(f"(a) toy delta sweep: {len(x) * len(deltas):,} queries x 10 points x d=2, float64")
    print(f"    optimal_denoiser {t_torch * 1e3:8.1f} ms   NumPy {t_numpy * 1e3:8.1f} ms   "
          f"speed-up {t_numpy / t_torch:5.1f}x   max |difference| {err:.1e}")


def bench_images(n, d, queries, numpy_queries, repeats):
    g = torch.Generator().manual_seed(0)
    data = torch.rand(n, d, generator=g) * 2 - 1
    noise = torch.randn(queries, d, generator=g)
    flops = 4 * queries * n * d
    print(f"(b) images: {queries} queries x N={n:,} x d={d}, float32 (NumPy on {numpy_queries} queries, scaled); "
          f"each case against torch's 2048^3 matmul rate measured right before it")
    # queries at noise 0.5 and 1 around data points with sigma 1: weights nearly one-hot (most far below
    # rounding); sigma 20: many points share the weight
    for scale, sigma in ((0.5, 1.0), (1.0, 1.0), (0.5, 20.0)):
        x = data[:queries] + scale * noise
        peak = matmul_gflops(2048, 2048, 2048, torch.float32)  # beside each case: robust to a busy machine
        t_torch = best_time(lambda: common.optimal_denoiser(x, sigma, data), repeats)
        t_numpy = best_time(lambda: numpy_optimal(x[:numpy_queries].numpy(), sigma, data.numpy()), 1)
        t_numpy *= queries / numpy_queries
        ref = common.optimal_denoiser(x[:4].double(), sigma, data.double())
        err = (common.optimal_denoiser(x[:4], sigma, data).double() - ref).abs().max().item()
        rate = flops / t_torch / 1e9
        print(f"    noise {scale:g}, sigma {sigma:4g}: optimal_denoiser {t_torch * 1e3:8.1f} ms = {rate:6.1f} GFLOP/s "
              f"= {rate / peak:5.1%} of matmul ({peak:.0f})   NumPy {t_numpy:7.2f} s ({t_numpy / t_torch:5.1f}x)   "
              f"max |float32 - float64| {err:.1e}")
    x = data[:queries] + 0.5 * noise
    fixed = fix_mmap_threshold()  # last, since it slows later allocations: count live memory only
    extra = peak_extra_mb(lambda: common.optimal_denoiser(x, 1.0, data))
    print(f"    peak working memory beyond the data: {extra:6.1f} MB{'' if fixed else ' (glibc caching included)'} "
          f"(data itself: {n * d * 4 / 2**20:.0f} MB)")


def main():
    p = parser(__doc__, repeats=5)
    p.add_argument("--n", type=plumbing.positive_int, default=60000, help="training vectors in (b)")
    p.add_argument("--d", type=plumbing.positive_int, default=784, help="dimension in (b)")
    p.add_argument("--queries", type=plumbing.positive_int, default=512, help="queries in (b)")
    p.add_argument("--numpy-queries", type=plumbing.positive_int, default=2,
                   help="queries the NumPy version runs in (b)")
    args = p.parse_args()
    common.check(args.numpy_queries <= args.queries, f"--numpy-queries {args.numpy_queries} is more than --queries "
                                                     f"{args.queries}")
    start(args)
    bench_toy(args.repeats)
    bench_images(args.n, args.d, args.queries, args.numpy_queries, args.repeats)


if __name__ == "__main__":
    plumbing.run_cli(main)
