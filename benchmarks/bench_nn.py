"""Throughput and memory of common.nearest_neighbours (the memorization test of docs/method.md).

N = 60000 training vectors of d = 784 (Fashion-MNIST size), 10000 queries, k = 2, float32 data.
GFLOP/s counts the search matmul (2 M N d flops) and is set against torch's own float32 matmul
rate measured in the same run: the bare products of the search (same blocks, interleaved with
the timed calls so that both see the same machine load), and a 2048^3 product. Peak working
memory is VmHWM above the resident level before the call (after resetting it through
/proc/self/clear_refs), with glibc's mmap threshold fixed so that freed memory is not counted.
Correctness: a few queries are checked against float64 torch.cdist.

    python benchmarks/bench_nn.py                    # full size
    python benchmarks/bench_nn.py --queries 1000     # quicker
"""
from benchlib import fix_mmap_threshold, matmul_gflops, parser, peak_extra_mb, start, wall_time  # first: as common
import common
import plumbing
import torch


def main():
    p = parser(__doc__, repeats=2)
    p.add_argument("--n", type=plumbing.positive_int, default=60000, help="training vectors")
    p.add_argument("--d", type=plumbing.positive_int, default=784, help="dimension")
    p.add_argument("--queries", type=plumbing.positive_int, default=10000, help="query vectors")
    p.add_argument("--k", type=plumbing.positive_int, default=2, help="neighbours per query")
    p.add_argument("--chunk-size", type=plumbing.non_negative_int, default=0,
                   help="data rows per chunk (0: the function's)")
    args = p.parse_args()
    common.check(args.k <= args.n, f"--k {args.k} neighbours need as many training vectors, got --n {args.n}")
    start(args)
    fixed = fix_mmap_threshold()

    g = torch.Generator().manual_seed(0)
    data = torch.rand(args.n, args.d, generator=g) * 2 - 1
    queries = data[torch.randint(args.n, (args.queries,), generator=g)] + 0.3 * torch.randn(args.queries, args.d,
                                                                                            generator=g)
    run = lambda: common.nearest_neighbours(queries, data, args.k, args.chunk_size or None)  # noqa: E731
    chunk = args.chunk_size or min(args.n, 4096)
    block = max(1, min(args.queries, common.NN_BLOCK_SCORES // chunk))

    def matmuls():
        """The bare products of the search, same blocks: (block x d) @ (d x chunk) over all of data."""
        for b0 in range(0, args.queries, block):
            for c0 in range(0, args.n, chunk):
                queries[b0:b0 + block] @ data[c0:c0 + chunk].T

    result = []
    extra = peak_extra_mb(lambda: result.append(run()))  # also the warm-up
    t, t_mm = float("inf"), float("inf")
    for _ in range(args.repeats):  # interleaved, so that both see the same machine load
        t, t_mm = min(t, wall_time(run)), min(t_mm, wall_time(matmuls))
    square = matmul_gflops(2048, 2048, 2048, repeats=4)
    flops = 2 * args.queries * args.n * args.d
    rate, mm_rate = flops / t / 1e9, flops / t_mm / 1e9

    dist, index = result[0]
    ref = torch.cdist(queries[:16].double(), data.double(), compute_mode="donot_use_mm_for_euclid_dist")
    ref_d, ref_i = ref.sort(dim=1, stable=True)
    ok = torch.equal(index[:16], ref_i[:, :args.k]) and torch.allclose(dist[:16], ref_d[:, :args.k], rtol=1e-12, atol=0)
    print(f"nearest_neighbours: {args.queries} queries x N={args.n:,} x d={args.d}, k={args.k}, float32 search, "
          f"float64 re-ranking")
    print(f"    time {t:7.2f} s = {rate:6.1f} GFLOP/s   bare torch matmuls ({block}x{args.d}x{chunk} blocks) "
          f"{t_mm:7.2f} s = {mm_rate:6.1f} GFLOP/s   ratio {rate / mm_rate:5.1%} (target >= 50%)")
    print(f"    torch matmul 2048^3: {square:6.1f} GFLOP/s   ratio {rate / square:5.1%}")
    print(f"    peak working memory beyond the data: {extra:6.1f} MB{'' if fixed else ' (glibc caching included)'} (data itself: "
          f"{args.n * args.d * 4 / 2**20:.0f} MB, queries {args.queries * args.d * 4 / 2**20:.0f} MB)   "
          f"matches float64 cdist on 16 queries: {ok}")


if __name__ == "__main__":
    plumbing.run_cli(main)
