"""The 2D toy study (docs/method.md, "2D toy", panels (a)-(h)): points on a circle, half of them training
points; the model is the optimal denoiser of the training points, made error-prone by smearing the data
with N(0, delta^2).

    python toy2d.py all                      # every panel, paper settings, about 30 s on a CPU
    python toy2d.py delta --deltas 2 1.5 1   # one panel, other settings

Each experiment writes `DIR/EXPERIMENT.npz` (`KEYS`) and its figure `DIR/EXPERIMENT.png` (and `.pdf`) into
`--out`; flags left unset take the paper's settings of each experiment (`DEFAULTS`); the flags in detail: `NOTES`.
"""
import argparse
import functools
import json
import os
import time

import plumbing  # first: it sets OpenMP's wait policy, which torch reads when it loads, and the Ctrl-C hook
import common
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from common import check  # noqa: E402

# the flags in detail, rendered into docs/reference.md
NOTES = """\
Each experiment writes `DIR/EXPERIMENT.npz` and `DIR/EXPERIMENT.png` (and `.pdf`) into the folder `--out`. Flags
left unset take the paper's settings of each experiment (`DEFAULTS`); `all` gives every experiment the same flags.
The points lie at angles 2 pi (k/N + 0.01), or at seeded random angles (`--random`; always in `samples`), even k
training and odd k validation points. Each point has one fixed set of `--samples-per-point` noise draws, reused at
every sigma. The gap curves use the EDM schedule of `--steps` steps as their sigma grid unless `--sigmas` is
given; `flow` takes its (three) `--sigmas` as they are, `field` and `manifold` take the first, `field` snapped to
the nearest grid sigma. `--threads` is 1 by default: the toy's operations are too small to gain from more threads,
and on cores shared with other jobs two threads made the `samples` panel 10x slower than one. `all` runs `--jobs`
experiments at once on a CPU with one thread, one process each on Linux (default: one per core), the longest
(`samples`) first. On mps the toy runs on the CPU (it needs float64).
"""
# the keys of each EXPERIMENT.npz (K deltas, or weights in guidance, or circle sizes in density; S sigmas, T
# samples, A angles, R seeds, G grid points per axis, P training points, J noise draws per point), rendered into
# docs/reference.md
KEYS = {
    'every file':
        '`args` (JSON, with `experiment`), `script`, `format`; all but density.npz `train`, `val` (the points, of '
        'the first seed in samples) and `radius`',
    'flow.npz (a)':
        '`sigmas`, `delta`, `axis` (G,), `field` (3, G, G, 2) = y_delta(x) - x on the plane, `noisy`, `pred` (3, '
        "P, J, 2): noisy training points and the model's predictions of them",
    'delta.npz (b)': '`sigmas` (S,), `deltas` (K,), `e_train`, `e_val`, `gap` (K, S)',
    'density.npz (c)': '`sigmas`, `n_points`, `n_train` (K,), `delta`, `e_train`, `e_val`, `gap` (K, S)',
    'field.npz (d)':
        '`sigma`, `deltas`, `axis` (G,), `gap` (K, G, G): the relative gap of each point of the plane against the '
        'training points',
    'manifold.npz (e)':
        '`sigma`, `draws`, `deltas`, `angles` (A,) along a half circle from training point 0, `error` (K, A) = '
        'E(theta), `e_train` (K,) = mean E_train, `rel_gap` (K, A) = (E(theta) - mean E_train) / mean E_train, '
        '`rel_gap_train`, `rel_gap_val` (the same at each training / validation point), `train_angles`, '
        '`val_angles`',
    'guidance.npz (f)': '`sigmas`, `weights` (K,), `delta_pos`, `delta_neg`, `e_train`, `e_val`, `gap` (K, S)',
    'trajectories.npz (g)':
        '`deltas`, `endpoints` (K, T, 2), `nn_dist` (K, T) (endpoint to nearest training point), `mean_nn_dist` '
        '(K,), `paths` (the first 32 trajectories)',
    'samples.npz (h)':
        '`deltas` (K,), `seeds` (R,), `num_samples`, `d_ref` (R,) = mean distance of a validation point to its '
        'nearest training point; `d_train`, `d_val` (R, K) = mean distance of a sample to its nearest training / '
        'validation point; `ratio` = d_train / d_ref, `ratio_on_circle` (the samples moved onto the circle '
        'first), `train_over_val` = d_train / d_val (R, K), each also as `_mean` and `_std` (K,) over the seeds',
}
SCRIPT = os.path.basename(__file__)  # stored in every result file (plumbing.save_npz)
EXPERIMENTS = ["flow", "delta", "density", "field", "manifold", "guidance", "trajectories", "samples"]
# Circle radii the toy takes: with the noise levels of plumbing.SIGMA_BOUNDS, squared distances over sigma^2 stay
# finite (a radius of 1e200 overflowed them)
RADIUS_BOUNDS = (1e-3, 1e3)
RENAMED = {"fd": "samples"}  # old experiment names: stopped with a message that names the new one

# Paper settings per experiment; command-line flags override them.
DEFAULTS = {
    "flow": dict(n_points=[20], sigmas=[28.0, 2.8, 0.63], deltas=[0.0]),
    "delta": dict(n_points=[20], deltas=list(np.round(np.linspace(2.2, 1.2, 11), 2))),
    "density": dict(n_points=list(range(16, 31, 2)), deltas=[1.6]),
    "field": dict(n_points=[20], sigmas=[1.1], deltas=[2.2, 1.8, 1.4, 1.0]),
    "manifold": dict(n_points=[20], sigmas=[1.0], deltas=[2.0, 1.6, 1.2], draws=500),
    "guidance": dict(n_points=[20], deltas=[1.8, 2.2], weights=[0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]),
    "trajectories": dict(n_points=[20], radius=1.0, deltas=[0.2, 0.1, 0.05]),
    "samples": dict(n_points=[1000], random=True, deltas=[0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 3.0]),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],  # the docstring's first paragraph
                                epilog="Flags and result keys in full: docs/reference.md",
                                formatter_class=plumbing.HelpFormatter)
    p.add_argument("experiment", metavar="EXPERIMENT", help="one of " + ", ".join(EXPERIMENTS + ["all"]))
    p.add_argument("--deltas", type=float, nargs="+", help="model errors delta (guidance: delta_pos delta_neg); "
                   "default: the paper's per experiment")
    p.add_argument("--n-points", type=int, nargs="+", help="points on the circle, half of them training points "
                   "(density sweeps the list); default: the paper's per experiment")
    p.add_argument("--guidance-weights", type=float, nargs="+", help="guidance weights w (default 0, 0.25, ..., 2)")
    p.add_argument("--sigmas", type=plumbing.sigma_float, nargs="+", help="noise levels: the sigma grid of the gap "
                   "curves (default: the 120-step EDM schedule), or the sigmas of flow, field and manifold")
    p.add_argument("--radius", type=plumbing.float_between(*RADIUS_BOUNDS, "a radius"),
                   help="circle radius (default 10; trajectories: 1)")
    p.add_argument("--random", action="store_true", help="random instead of equally spaced angles (samples: always)")
    p.add_argument("--samples-per-point", type=int, help="fixed noise draws per point (default 50; manifold: "
                   "500, the paper's)")
    p.add_argument("--num-samples", type=int, default=1000, help="ODE samples for trajectories and samples")
    p.add_argument("--num-seeds", type=int, default=4, help="samples: seeds SEED, SEED+1, ... (each a new random "
                   "circle and new samples); the panel shows their mean and standard deviation")
    p.add_argument("--steps", type=int, default=120, help="EDM schedule steps (sigma grid and sampler)")
    p.add_argument("--force", action="store_true", help="replace EXPERIMENT.npz files in --out that toy2d.py did "
                   "not write or made with other settings (refused otherwise)")
    plumbing.add_run_args(p, seed="seed of noise draws, random angles and samples", out="output folder",
                          out_default="results/toy2d", device="auto (cuda, then cpu: the toy needs float64, which mps "
                          "lacks), cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of torch while it runs (0: torch's own "
                   "choice; the toy's small operations gain nothing from more)")
    p.add_argument("--jobs", type=plumbing.non_negative_int, default=0, help="all: experiments run at once on a "
                   "CPU with --threads 1, one process each, on Linux (0: one per core, as torch's threads: "
                   "OMP_NUM_THREADS, else the cores)")
    args = p.parse_args(argv)
    check(args.experiment not in RENAMED, f"experiment {args.experiment!r} is now "
          f"{RENAMED.get(args.experiment)!r} (a Fréchet distance of 2D samples could not tell memorizing "
          f"from generalizing samplers)")
    check(args.experiment in EXPERIMENTS + ["all"], f"invalid choice: {args.experiment!r} (choose from "
          f"{', '.join(EXPERIMENTS + ['all'])})")
    check(args.num_seeds >= 1, "--num-seeds must be at least 1")
    check(args.threads >= 0, "--threads must be >= 0")
    check(args.samples_per_point is None or args.samples_per_point >= 1, "--samples-per-point must be at least 1")
    check(args.num_samples >= 2, "--num-samples must be at least 2")
    check(args.steps >= 2, "--steps must be at least 2")
    for name in ("deltas", "sigmas", "n_points", "guidance_weights"):
        values = getattr(args, name)
        if values is not None:
            check(all(np.isfinite(values)), f"--{name.replace('_', '-')} must be finite numbers")
    check(args.deltas is None or min(args.deltas) >= 0, "--deltas must be >= 0")
    check(args.n_points is None or min(args.n_points) >= 2, "--n-points must be at least 2 (one training "
          "and one validation point)")
    return args


# ---------------------------------------------------------------------------
# Toy data, error and gap
# ---------------------------------------------------------------------------

def circle_data(n_points, radius, random, seed):
    """Points on a circle: angles 2 pi (k/N + 0.01) (or seeded uniform); even k train, odd k validation."""
    if random:
        angles = torch.rand(n_points, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 * np.pi
    else:
        angles = 2 * np.pi * (torch.arange(n_points, dtype=torch.float64) / n_points + 0.01)
    points = radius * torch.stack([angles.cos(), angles.sin()], 1)
    return points[0::2], points[1::2], angles


def fixed_noise(num_points, draws, seed):
    """One fixed set of noise draws per point, reused for every sigma: (P, J, 2)."""
    return torch.randn(num_points, draws, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def toy_error(denoise, points, noise, sigmas):
    """Toy error per sigma and point: mean over draws of ||D(y + sigma n; sigma) - y|| (L2, not squared).
    denoise(x, sigma) takes (Q, 2) queries and (Q,) sigmas; returns (S, P)."""
    S, (P, J, _) = len(sigmas), noise.shape
    x = points[None, :, None] + sigmas[:, None, None, None] * noise[None]            # (S, P, J, 2)
    sig = sigmas[:, None, None].expand(S, P, J).reshape(-1)
    pred = denoise(x.reshape(-1, 2), sig).reshape(S, P, J, 2)
    return (pred - points[None, :, None]).norm(dim=-1).mean(-1)


def delta_model(train, delta):
    """The error-prone toy model y_delta of the training points (docs/method.md)."""
    return lambda x, sigma: common.error_prone_denoiser(x, sigma, train, delta)


def gap_curves(denoise, train, val, noise_train, noise_val, sigmas):
    """E_train(sigma), E_val(sigma) and the relative gap G = (E_val - E_train) / E_train."""
    e_train = toy_error(denoise, train, noise_train, sigmas).mean(1)
    e_val = toy_error(denoise, val, noise_val, sigmas).mean(1)
    return e_train, e_val, (e_val - e_train) / e_train


class Toy:
    """The settings of one experiment: circle data, fixed noise and sigma grid."""

    def __init__(self, args, name, n_points=None, seed=None):
        d = DEFAULTS[name]
        seed = args.seed if seed is None else seed
        self.args = args
        self.deltas = args.deltas if args.deltas is not None else d.get("deltas", [0.0])
        self.n_points = args.n_points if args.n_points is not None else d["n_points"]
        self.radius = args.radius if args.radius is not None else d.get("radius", 10.0)
        self.random = args.random or d.get("random", False)
        n = n_points if n_points is not None else self.n_points[0]
        self.train, self.val, self.angles = circle_data(n, self.radius, self.random, seed)
        self.train, self.val = self.train.to(args.device), self.val.to(args.device)
        self.draws = args.samples_per_point if args.samples_per_point is not None else d.get("draws", 50)
        self.noise_train = fixed_noise(len(self.train), self.draws, seed + 1).to(args.device)
        self.noise_val = fixed_noise(len(self.val), self.draws, seed + 2).to(args.device)
        if args.sigmas is not None and name not in ("flow", "field", "manifold"):
            grid = torch.tensor(sorted(args.sigmas), dtype=torch.float64)
        else:
            grid = common.edm_sigmas(args.steps)[:-1].flip(0)
        self.grid = grid.to(args.device)
        self.sigmas = args.sigmas if args.sigmas is not None else d.get("sigmas")

    def nearest_grid_sigma(self, sigma):
        """The sigma of the EDM grid closest (in log) to the one asked for."""
        return float(self.grid[(self.grid.log() - np.log(sigma)).abs().argmin()])

    def gap(self, denoise):
        return gap_curves(denoise, self.train, self.val, self.noise_train, self.noise_val, self.grid)

    def common_keys(self):
        return dict(train=self.train.cpu().numpy(), val=self.val.cpu().numpy(), radius=self.radius)


# ---------------------------------------------------------------------------
# Experiments: each returns the arrays of its .npz and draws its figure
# ---------------------------------------------------------------------------

show_bars = True  # False in the processes of `all --jobs`, whose bars would overwrite each other


def progress(items, desc):
    """A progress bar over items, left off the screen when done (none when show_bars is False)."""
    return tqdm(items, desc=desc, leave=False, disable=not show_bars)


def mark_data(ax, out, legend=False, train_color="k", val_color="tab:green"):
    """The experiment's training points (dots) and validation points (crosses) on a panel of the plane, with
    the legend of everything drawn on it so far when `legend` (the first panel)."""
    ax.scatter(*out["train"].T, s=20, c=train_color, edgecolors="k", label="train")
    ax.scatter(*out["val"].T, s=20, c=val_color, marker="x", label="validation")
    if legend:
        ax.legend(loc="lower left", fontsize=7)


def exp_flow(args):
    """(a) Flow field y* - x with predictions of noisy training points at three sigmas."""
    toy = Toy(args, "flow")
    delta = toy.deltas[0]
    lim = 1.5 * toy.radius
    axis = torch.linspace(-lim, lim, 41, dtype=torch.float64, device=args.device)
    gx, gy = torch.meshgrid(axis, axis, indexing="xy")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
    fields, preds, noisy = [], [], []
    model = delta_model(toy.train, delta)
    for sigma in toy.sigmas:
        fields.append((model(grid, sigma) - grid).reshape(len(axis), len(axis), 2))
        x = toy.train[:, None] + sigma * toy.noise_train                            # (P, J, 2)
        noisy.append(x)
        preds.append(model(x.reshape(-1, 2), sigma).reshape(x.shape))
    out = dict(sigmas=np.array(toy.sigmas), delta=delta, axis=axis.cpu().numpy(),
               field=torch.stack(fields).cpu().numpy(), noisy=torch.stack(noisy).cpu().numpy(),
               pred=torch.stack(preds).cpu().numpy(), **toy.common_keys())
    fig, axes = plt.subplots(1, len(toy.sigmas), figsize=(4.2 * len(toy.sigmas), 4), squeeze=False, layout="constrained")
    for ax, sigma, field, pred in zip(axes[0], toy.sigmas, out["field"], out["pred"]):
        speed = np.linalg.norm(field, axis=-1)
        stream = ax.streamplot(out["axis"], out["axis"], field[..., 0], field[..., 1], color=speed,
                               cmap="viridis", density=1.1, linewidth=0.8, arrowsize=0.7)
        ax.scatter(*pred.reshape(-1, 2).T, s=2, c="tab:orange", alpha=0.4, label="D(noisy train)")
        mark_data(ax, out, legend=ax is axes[0, 0], val_color="tab:red")  # red stands out on the streamlines
        ax.set(title=f"sigma = {sigma:g}", xlabel="x1", ylabel="x2", aspect="equal", xlim=(-lim, lim),
               ylim=(-lim, lim))
        fig.colorbar(stream.lines, ax=ax, label="|D(x) - x|")
    fig.suptitle(f"(a) flow field of the {'optimal' if delta == 0 else f'delta={delta:g}'} denoiser")
    return out, fig


def exp_delta(args):
    """(b) G(sigma) for model errors delta (symmetric circle, N = 20)."""
    toy = Toy(args, "delta")
    curves = [toy.gap(delta_model(toy.train, d)) for d in progress(toy.deltas, "delta")]
    e_train, e_val, gap = (torch.stack(c).cpu().numpy() for c in zip(*curves))
    out = dict(sigmas=toy.grid.cpu().numpy(), deltas=np.array(toy.deltas), e_train=e_train, e_val=e_val, gap=gap,
               **toy.common_keys())
    fig = plumbing.plot_sweep(out["sigmas"], gap, toy.deltas, "model error delta", "(b) gap vs model error")
    return out, fig


def exp_density(args):
    """(c) G(sigma) for denser support: N points on the circle, N/2 training points, fixed delta."""
    toy = Toy(args, "density")
    gaps, e_trains, e_vals, n_train = [], [], [], []
    for n in progress(toy.n_points, "density"):
        t = Toy(args, "density", n_points=n)
        e_train, e_val, gap = t.gap(delta_model(t.train, toy.deltas[0]))
        gaps.append(gap), e_trains.append(e_train), e_vals.append(e_val), n_train.append(len(t.train))
    out = dict(sigmas=toy.grid.cpu().numpy(), n_points=np.array(toy.n_points), n_train=np.array(n_train),
               delta=toy.deltas[0], e_train=torch.stack(e_trains).cpu().numpy(),
               e_val=torch.stack(e_vals).cpu().numpy(), gap=torch.stack(gaps).cpu().numpy())
    fig = plumbing.plot_sweep(out["sigmas"], out["gap"], n_train, "training points",
                       f"(c) gap vs data density (delta = {toy.deltas[0]:g})")
    return out, fig


def exp_field(args):
    """(d) Gap field: relative gap of every point in the plane to the training points at one sigma."""
    toy = Toy(args, "field")
    sigma = toy.nearest_grid_sigma(toy.sigmas[0])
    lim = 1.4 * toy.radius
    axis = torch.linspace(-lim, lim, 71, dtype=torch.float64, device=args.device)
    gx, gy = torch.meshgrid(axis, axis, indexing="xy")
    plane = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
    noise = toy.noise_train[:1].expand(len(plane), -1, -1)   # the same draws for every point in the plane
    sig = torch.tensor([sigma], dtype=torch.float64, device=args.device)
    fields = []
    for delta in progress(toy.deltas, "field"):
        model = delta_model(toy.train, delta)
        e_train = toy_error(model, toy.train, toy.noise_train, sig).mean()
        e_plane = toy_error(model, plane, noise, sig)[0]
        fields.append(((e_plane - e_train) / e_train).reshape(len(axis), len(axis)))
    out = dict(sigma=sigma, deltas=np.array(toy.deltas), axis=axis.cpu().numpy(),
               gap=torch.stack(fields).cpu().numpy(), **toy.common_keys())
    k = len(toy.deltas)
    fig, axes = plt.subplots(1, k, figsize=(3.8 * k, 3.6), squeeze=False, layout="constrained")
    for ax, delta, field in zip(axes[0], toy.deltas, out["gap"]):
        mesh = ax.pcolormesh(out["axis"], out["axis"], field, cmap="magma", vmin=-0.5, vmax=3, shading="auto")
        ax.contour(out["axis"], out["axis"], field, levels=[0.5], colors="cyan", linewidths=1.2)
        mark_data(ax, out, legend=ax is axes[0, 0], train_color="w")  # white stands out on the dark map
        ax.set(title=f"delta = {delta:g}", xlabel="x1", ylabel="x2", aspect="equal")
        fig.colorbar(mesh, ax=ax, label="relative gap to training points")
    fig.suptitle(f"(d) gap field at sigma = {sigma:.2f}; cyan: gap = 0.5")
    return out, fig


def on_circle(angles, radius, noise):
    """Points at `angles` on the circle and the draws noise (J, 2), read in each point's own
    (radial, tangential) frame: (A, 2) points and (A, J, 2) noise. Isotropic noise so rotated is
    still N(0, I) at every point, and points that the layout's symmetry maps onto one another get
    exactly the same error."""
    radial = torch.stack([angles.cos(), angles.sin()], 1)                        # (A, 2)
    tangential = torch.stack([-angles.sin(), angles.cos()], 1)
    return radius * radial, noise[None, :, :1] * radial[:, None] + noise[None, :, 1:] * tangential[:, None]


def exp_manifold(args):
    """(e) Relative gap (E(theta) - mean E_train) / mean E_train along a half circle from a training
    point, at one sigma (paper: 1.0, 500 draws, N = 10 training points), for several delta; the
    draws are the same at every angle, in the point's own frame (on_circle)."""
    toy = Toy(args, "manifold")
    sigma = toy.sigmas[0]                                                        # the first of --sigmas
    dev = args.device
    draws = fixed_noise(1, toy.draws, args.seed + 1)[0].to(dev)                  # (J, 2), radial and tangential
    start = float(toy.angles[0])
    angles = start + torch.linspace(0, np.pi, 181, dtype=torch.float64, device=dev)
    train_angles, val_angles = toy.angles[0::2].to(dev), toy.angles[1::2].to(dev)
    sig = torch.tensor([sigma], dtype=torch.float64, device=dev)
    error, e_train, e_at_train, e_at_val = [], [], [], []
    for delta in progress(toy.deltas, "manifold"):
        model = delta_model(toy.train, delta)
        error.append(toy_error(model, *on_circle(angles, toy.radius, draws), sig)[0])
        e_at_train.append(toy_error(model, *on_circle(train_angles, toy.radius, draws), sig)[0])
        e_at_val.append(toy_error(model, *on_circle(val_angles, toy.radius, draws), sig)[0])
        e_train.append(e_at_train[-1].mean())
    error, e_train = torch.stack(error).cpu().numpy(), torch.stack(e_train).cpu().numpy()
    relative = lambda e: (e - e_train[:, None]) / e_train[:, None]  # noqa: E731
    out = dict(sigma=sigma, draws=toy.draws, deltas=np.array(toy.deltas), angles=angles.cpu().numpy(),
               error=error, e_train=e_train, rel_gap=relative(error),
               rel_gap_train=relative(torch.stack(e_at_train).cpu().numpy()),
               rel_gap_val=relative(torch.stack(e_at_val).cpu().numpy()),
               train_angles=train_angles.cpu().numpy(), val_angles=val_angles.cpu().numpy(), **toy.common_keys())

    degrees = np.degrees(out["angles"])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8.5, 5.6), sharex=True, layout="constrained")
    for delta, gap, err, e_mean in zip(toy.deltas, out["rel_gap"], error, e_train):
        line, = top.plot(degrees, gap, label=f"delta = {delta:g}")
        bottom.plot(degrees, err, color=line.get_color())
        bottom.axhline(e_mean, color=line.get_color(), lw=0.8, ls=":")
    for kind, marks, style in (("train", out["train_angles"], dict(color="k", lw=0.7)),
                               ("validation", out["val_angles"], dict(color="tab:green", lw=0.7, ls="--"))):
        inside = np.degrees(start + (marks - start) % (2 * np.pi))
        for ax in (top, bottom):
            for i, a in enumerate(inside[inside <= degrees[-1] + 1e-9]):
                ax.axvline(a, **style, label=f"{kind} point" if ax is top and i == 0 else None)
    top.axhline(0, color="gray", lw=0.5)
    top.set(ylabel="relative gap\n(E(theta) - Ē_train) / Ē_train")
    fig.legend(*top.get_legend_handles_labels(), loc="outside right upper", fontsize=8)
    top.set_title(f"(e) along a half circle: sigma = {sigma:g}, {toy.draws} draws, {len(toy.train)} training points")
    bottom.set(xlabel="angle on the circle (degrees)", ylabel="error E(theta)\n(dotted: Ē_train)")
    return out, fig


def exp_guidance(args):
    """(f) Autoguidance: D_w = D_pos + w (D_pos - D_neg) with delta_pos < delta_neg."""
    toy = Toy(args, "guidance")
    weights = args.guidance_weights if args.guidance_weights is not None else DEFAULTS["guidance"]["weights"]
    pos, neg = (delta_model(toy.train, d) for d in toy.deltas)
    curves = [toy.gap(common.guided_denoiser(pos, neg, w))
              for w in progress(weights, "guidance")]
    e_train, e_val, gap = (torch.stack(c).cpu().numpy() for c in zip(*curves))
    out = dict(sigmas=toy.grid.cpu().numpy(), weights=np.array(weights), delta_pos=toy.deltas[0],
               delta_neg=toy.deltas[1], e_train=e_train, e_val=e_val, gap=gap, **toy.common_keys())
    fig = plumbing.plot_sweep(out["sigmas"], gap, weights, "guidance weight w",
                       f"(f) autoguidance, delta_pos = {toy.deltas[0]:g}, delta_neg = {toy.deltas[1]:g}")
    return out, fig


def sample_toy(model, num, steps, seed, device, record=False):
    """ODE samples of a toy model from N(0, sigma_max^2 I), seeded."""
    x_init = common.SIGMA_MAX * torch.randn(num, 2, generator=torch.Generator().manual_seed(seed),
                                            dtype=torch.float64).to(device)
    return common.sample_ode(model, x_init, common.edm_sigmas(steps).to(device), return_trajectory=record)


def nearest_distance(points, data):
    """Distance of each point to its nearest data point."""
    return common.nearest_neighbours(points, data, k=1)[0][:, 0]


def exp_trajectories(args):
    """(g) ODE trajectories from N(0, 80^2 I) for small delta, and their endpoints' distance to the data."""
    toy = Toy(args, "trajectories")
    endpoints, dists, paths = [], [], []
    for delta in progress(toy.deltas, "trajectories"):
        end, traj = sample_toy(delta_model(toy.train, delta), args.num_samples, args.steps, args.seed,
                               args.device, record=True)
        endpoints.append(end)
        dists.append(nearest_distance(end, toy.train))
        paths.append(torch.cat([traj["states"][:, :32], end[None, :32]]).transpose(0, 1))
    out = dict(deltas=np.array(toy.deltas), endpoints=torch.stack(endpoints).cpu().numpy(),
               nn_dist=torch.stack(dists).cpu().numpy(), paths=torch.stack(paths).cpu().numpy(),
               **toy.common_keys())
    out["mean_nn_dist"] = out["nn_dist"].mean(1)
    k = len(toy.deltas)
    fig, axes = plt.subplots(1, k + 1, figsize=(3.8 * (k + 1), 3.6), squeeze=False, layout="constrained")
    lim = 1.8 * toy.radius
    for ax, delta, path, end in zip(axes[0], toy.deltas, out["paths"], out["endpoints"]):
        for p in path:
            ax.plot(*p.T, lw=0.5, color="tab:blue", alpha=0.5)
        ax.scatter(*end.T, s=2, c="tab:orange", label="endpoints")
        mark_data(ax, out, legend=ax is axes[0, 0])
        ax.set(title=f"delta = {delta:g}", xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", xlabel="x1",
               ylabel="x2")
    axes[0, -1].plot(out["deltas"], out["mean_nn_dist"], "o-")
    axes[0, -1].set(xscale="log", yscale="log", xlabel="model error delta",
                    ylabel="mean endpoint distance\nto nearest training point", title="memorization")
    fig.suptitle(f"(g) sampling trajectories, radius {toy.radius:g}")
    return out, fig


def sample_distances(samples, train, val, radius):
    """How far samples lie from the training points, against how far unseen data lies (toy (h)).

    d_ref = mean distance of a validation point to its nearest training point; ratio = mean distance
    of a sample to its nearest training point / d_ref (-> 0: copies of training points; about 1: as
    far from them as unseen data; > 1: off the data); ratio_on_circle: the same with the samples
    first moved radially onto the circle, so that only their placement along it counts (-> 1 for
    any sampler that spreads them like the data); train_over_val = mean distance to the nearest
    training point / mean distance to the nearest validation point (-> 0: copies; 1: no preference)."""
    d_train = nearest_distance(samples, train).mean()
    d_ref = nearest_distance(val, train).mean()
    on_circle = radius * samples / samples.norm(dim=1, keepdim=True).clamp_min(torch.finfo(samples.dtype).tiny)
    d_val = nearest_distance(samples, val).mean()
    return {"d_train": float(d_train), "d_val": float(d_val), "d_ref": float(d_ref),
            "ratio": float(d_train / d_ref),
            "ratio_on_circle": float(nearest_distance(on_circle, train).mean() / d_ref),
            "train_over_val": float(d_train / d_val)}


def exp_samples(args):
    """(h) Samples vs training and validation points as delta varies (1000 random points on the
    circle, half train): sample_distances of ODE samples of y_delta, for --num-seeds seeds."""
    toy = Toy(args, "samples")
    seeds = list(range(args.seed, args.seed + args.num_seeds))
    rows = []
    for seed in progress(seeds, "samples"):
        t = toy if seed == args.seed else Toy(args, "samples", seed=seed)
        for delta in toy.deltas:
            samples = sample_toy(delta_model(t.train, delta), args.num_samples, args.steps, seed, args.device)
            rows.append(sample_distances(samples, t.train, t.val, t.radius))
    R, K = len(seeds), len(toy.deltas)
    out = dict(deltas=np.array(toy.deltas), seeds=np.array(seeds), num_samples=args.num_samples,
               d_ref=np.array([rows[r * K]["d_ref"] for r in range(R)]), **toy.common_keys())
    for key in ("d_train", "d_val", "ratio", "ratio_on_circle", "train_over_val"):
        per_seed = np.array([row[key] for row in rows]).reshape(R, K)
        out[key] = per_seed
        if key not in ("d_train", "d_val"):
            out[f"{key}_mean"] = per_seed.mean(0)
            out[f"{key}_std"] = per_seed.std(0, ddof=1) if R > 1 else np.zeros(K)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    xscale = dict(value="log") if min(toy.deltas) > 0 else dict(value="symlog", linthresh=min(
        [d for d in toy.deltas if d > 0] or [1.0]))
    spread = f"mean and standard deviation over {R} seeds" if R > 1 else "one seed"
    ax = axes[0]
    for per_seed in out["ratio"]:
        ax.plot(out["deltas"], per_seed, ".", color="tab:blue", alpha=0.3, ms=4)
    ax.errorbar(out["deltas"], out["ratio_mean"], yerr=out["ratio_std"], fmt="o-", color="tab:blue", capsize=3,
                label="ratio")
    ax.axhline(1, color="gray", ls=":", label="as far as validation points")
    ax.set_xscale(**xscale)
    ax.set(yscale="log", xlabel="model error delta", ylabel="ratio = mean d_nn(sample, train)\n"
           "/ mean d_nn(validation point, train)", title="distance to the nearest training point")
    ax.legend(fontsize=8)
    ax = axes[1]
    for key, label, marker in (("ratio_on_circle", "ratio, samples moved onto the circle", "o-"),
                               ("train_over_val", "to nearest training / nearest validation point", "s-")):
        ax.errorbar(out["deltas"], out[f"{key}_mean"], yerr=out[f"{key}_std"], fmt=marker, capsize=3, label=label)
    ax.axhline(1, color="gray", ls=":")
    ax.set_xscale(**xscale)
    ax.set(ylim=(0, 1.2), xlabel="model error delta", ylabel="ratio (0: copies, 1: like unseen data)",
           title="placement along the data")
    ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"(h) {args.num_samples} ODE samples vs {len(toy.train)} training and {len(toy.val)} validation "
                 f"points ({spread})")
    return out, fig


RUNNERS = {name: globals()[f"exp_{name}"] for name in EXPERIMENTS}


# Arguments that do not change an experiment's numbers (compared with those of the files it would replace)
NOT_SETTINGS = ("out", "force", "device", "threads", "jobs")


def settings(args):
    """What changes an experiment's numbers: its stored arguments (a dict) but NOT_SETTINGS, as save_npz writes them."""
    return json.loads(json.dumps({k: v for k, v in args.items() if k not in NOT_SETTINGS}, sort_keys=True, default=str))


def check_experiments(args, names):
    """UserError for arguments that one of the experiments to run cannot use, before the first one runs."""
    shared = " (all: every experiment gets the same flags)" if len(names) > 1 else ""
    check("guidance" not in names or args.deltas is None or len(args.deltas) == 2,
          f"guidance needs --deltas DELTA_POS DELTA_NEG (two values), got {len(args.deltas or ())}{shared}")


def main(argv=None):
    args = parse_args(argv)
    plumbing.check_writable(args.out, folder=True)
    device = plumbing.pick_device(args.device)
    args.device = "cpu" if device.type == "mps" else str(device)
    names = EXPERIMENTS if args.experiment == "all" else [args.experiment]
    check_experiments(args, names)
    with plumbing.exclusive(args.out, folder=True):  # one process per output folder; no live writer has temp files
        plumbing.remove_temp_files(args.out, rf"({'|'.join(EXPERIMENTS)})\.(npz|png|pdf)")
        for name in names:  # each run replaces its own EXPERIMENT.npz of the same settings, nothing else unasked
            old = plumbing.earlier_result(os.path.join(args.out, f"{name}.npz"), SCRIPT, args.force)
            if old is not None:
                plumbing.check_kept(args.out, settings(old["args"]), settings(vars(args) | {"experiment": name}))
        threads = torch.get_num_threads()
        if args.threads:
            torch.set_num_threads(args.threads)
        try:
            processes = (args.jobs or plumbing.DEFAULT_THREADS) if args.device == "cpu" and args.threads == 1 else 1
            if processes > 1:  # the longest first; each process prints its lines, without progress bars
                order = sorted(names, key=lambda name: name != "samples")
                plumbing.in_processes([functools.partial(run_experiment, name, args, False) for name in order],
                                      processes)
            else:
                for name in tqdm(names, desc="toy2d", disable=len(names) == 1):
                    run_experiment(name, args)
        finally:
            torch.set_num_threads(threads)


def run_experiment(name, args, bars=True):
    """Run one experiment, write its .npz and figure, print what it wrote and its headline numbers (with its
    progress bars unless `bars` is False)."""
    start = time.time()
    global show_bars
    show_bars = bars
    out, fig = RUNNERS[name](args)
    npz = plumbing.save_npz(os.path.join(args.out, f"{name}.npz"), args=vars(args) | {"experiment": name},
                            script=SCRIPT, **out)
    png = plumbing.save_figure(fig, os.path.join(args.out, f"{name}.png"))
    summary = ""
    if "gap" in out and np.ndim(out["gap"]) == 2:
        g = out["gap"]
        i, j = np.unravel_index(np.argmax(g), g.shape)
        summary = f"; largest gap {g[i, j]:.2f} at sigma = {out['sigmas'][j]:.2f}"
    if "ratio_mean" in out:
        summary = "; ratio " + ", ".join(f"{r:.2f} (delta {d:g})" for d, r in zip(out["deltas"], out["ratio_mean"]))
    if "rel_gap_val" in out:
        summary = "; relative gap at validation points " + ", ".join(
            f"{g:.2f} (delta {d:g})" for d, g in zip(out["deltas"], out["rel_gap_val"].mean(1)))
    tqdm.write(f"{name}: wrote {npz} and {png} ({time.time() - start:.1f} s{summary})")


if __name__ == "__main__":
    plumbing.run_cli(main)
