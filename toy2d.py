"""The 2D toy study (PAPER.md, "The 2D toy study", panels (a)-(h)).

Points on a circle, half of them training points; the model is the optimal
denoiser of the training points, made error-prone by smearing the data with
N(0, delta^2). Each experiment writes DIR/EXPERIMENT.npz and DIR/EXPERIMENT.png.

    python toy2d.py all                      # every panel, paper settings, < 2 min on a CPU
    python toy2d.py delta --deltas 2 1.5 1   # one panel, other settings
"""
import argparse
import os
import time

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import common  # noqa: E402
from common import check  # noqa: E402

EXPERIMENTS = ["flow", "delta", "density", "field", "manifold", "guidance", "trajectories", "fd"]

# Paper settings per experiment; command-line flags override them.
DEFAULTS = {
    "flow": dict(n_points=[20], sigmas=[28.0, 2.8, 0.63], deltas=[0.0]),
    "delta": dict(n_points=[20], deltas=list(np.round(np.linspace(2.2, 1.2, 11), 2))),
    "density": dict(n_points=list(range(16, 31, 2)), deltas=[1.6]),
    "field": dict(n_points=[20], sigmas=[1.1], deltas=[2.2, 1.8, 1.4, 1.0]),
    "manifold": dict(n_points=[20], sigmas=[1.2], deltas=[2.0, 1.6, 1.2]),
    "guidance": dict(n_points=[20], deltas=[1.8, 2.2], weights=[0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]),
    "trajectories": dict(n_points=[20], radius=1.0, deltas=[0.2, 0.1, 0.05]),
    "fd": dict(n_points=[1000], random=True, deltas=list(np.round(np.geomspace(0.05, 3.0, 10), 3))),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("experiment", choices=EXPERIMENTS + ["all"], metavar="EXPERIMENT",
                   help="one of " + ", ".join(EXPERIMENTS + ["all"]))
    p.add_argument("--out", default="results/toy2d", help="output folder")
    p.add_argument("--deltas", type=float, nargs="+", help="model errors delta (guidance: delta_pos delta_neg); "
                   "default: the paper's per experiment")
    p.add_argument("--n-points", type=int, nargs="+", help="points on the circle, half of them training points "
                   "(density sweeps the list); default: the paper's per experiment")
    p.add_argument("--weights", type=float, nargs="+", help="guidance weights w (default 0, 0.25, ..., 2)")
    p.add_argument("--sigmas", type=float, nargs="+", help="noise levels: the sigma grid of the gap curves "
                   "(default: the 120-step EDM schedule), or the sigmas of flow, field and manifold")
    p.add_argument("--radius", type=float, help="circle radius (default 10; trajectories: 1)")
    p.add_argument("--random", action="store_true", help="random instead of equally spaced angles (fd: always)")
    p.add_argument("--samples-per-point", type=int, default=50, help="fixed noise draws per point")
    p.add_argument("--num-samples", type=int, default=1000, help="ODE samples for trajectories and fd")
    p.add_argument("--steps", type=int, default=120, help="EDM schedule steps (sigma grid and sampler)")
    p.add_argument("--seed", type=int, default=0, help="seed of noise draws, random angles and samples")
    p.add_argument("--device", default="auto", help="auto (cuda, then cpu: the toy needs float64, which mps "
                   "lacks), cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: automatic, common.choose_threads)")
    args = p.parse_args(argv)
    check(args.samples_per_point >= 1, "--samples-per-point must be at least 1")
    check(args.num_samples >= 2, "--num-samples must be at least 2")
    check(args.steps >= 2, "--steps must be at least 2")
    for name in ("deltas", "sigmas", "n_points", "weights"):
        values = getattr(args, name)
        if values is not None:
            check(all(np.isfinite(values)), f"--{name.replace('_', '-')} must be finite numbers")
    check(args.deltas is None or min(args.deltas) >= 0, "--deltas must be >= 0")
    check(args.sigmas is None or min(args.sigmas) > 0, "--sigmas must be positive")
    check(args.n_points is None or min(args.n_points) >= 2, "--n-points must be at least 2 (one training "
          "and one validation point)")
    check(args.radius is None or args.radius > 0, "--radius must be positive")
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
    """The error-prone toy model y_delta of the training points (PAPER.md)."""
    return lambda x, sigma: common.error_prone_denoiser(x, sigma, train, delta)


def gap_curves(denoise, train, val, noise_train, noise_val, sigmas):
    """E_train(sigma), E_val(sigma) and the relative gap G = (E_val - E_train) / E_train."""
    e_train = toy_error(denoise, train, noise_train, sigmas).mean(1)
    e_val = toy_error(denoise, val, noise_val, sigmas).mean(1)
    return e_train, e_val, (e_val - e_train) / e_train


class Toy:
    """The settings of one experiment: circle data, fixed noise and sigma grid."""

    def __init__(self, args, name, n_points=None):
        d = DEFAULTS[name]
        self.args = args
        self.deltas = args.deltas if args.deltas is not None else d.get("deltas", [0.0])
        self.n_points = args.n_points if args.n_points is not None else d["n_points"]
        self.radius = args.radius if args.radius is not None else d.get("radius", 10.0)
        self.random = args.random or d.get("random", False)
        n = n_points if n_points is not None else self.n_points[0]
        self.train, self.val, self.angles = circle_data(n, self.radius, self.random, args.seed)
        self.train, self.val = self.train.to(args.device), self.val.to(args.device)
        self.noise_train = fixed_noise(len(self.train), args.samples_per_point, args.seed + 1).to(args.device)
        self.noise_val = fixed_noise(len(self.val), args.samples_per_point, args.seed + 2).to(args.device)
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
        ax.scatter(*out["train"].T, s=25, c="k", marker="o", label="train")
        ax.scatter(*out["val"].T, s=25, c="tab:red", marker="x", label="validation")
        ax.set(title=f"sigma = {sigma:g}", xlabel="x1", ylabel="x2", aspect="equal", xlim=(-lim, lim),
               ylim=(-lim, lim))
        fig.colorbar(stream.lines, ax=ax, label="|D(x) - x|")
    axes[0, 0].legend(loc="lower left", fontsize=7)
    fig.suptitle(f"(a) flow field of the {'optimal' if delta == 0 else f'delta={delta:g}'} denoiser")
    return out, fig


def exp_delta(args):
    """(b) G(sigma) for model errors delta (symmetric circle, N = 20)."""
    toy = Toy(args, "delta")
    curves = [toy.gap(delta_model(toy.train, d)) for d in tqdm(toy.deltas, desc="delta", leave=False)]
    e_train, e_val, gap = (torch.stack(c).cpu().numpy() for c in zip(*curves))
    out = dict(sigmas=toy.grid.cpu().numpy(), deltas=np.array(toy.deltas), e_train=e_train, e_val=e_val, gap=gap,
               **toy.common_keys())
    fig = common.plot_sweep(out["sigmas"], gap, toy.deltas, "model error delta", "(b) gap vs model error")
    return out, fig


def exp_density(args):
    """(c) G(sigma) for denser support: N points on the circle, N/2 training points, fixed delta."""
    toy = Toy(args, "density")
    gaps, e_trains, e_vals, n_train = [], [], [], []
    for n in tqdm(toy.n_points, desc="density", leave=False):
        t = Toy(args, "density", n_points=n)
        e_train, e_val, gap = t.gap(delta_model(t.train, toy.deltas[0]))
        gaps.append(gap), e_trains.append(e_train), e_vals.append(e_val), n_train.append(len(t.train))
    out = dict(sigmas=toy.grid.cpu().numpy(), n_points=np.array(toy.n_points), n_train=np.array(n_train),
               delta=toy.deltas[0], e_train=torch.stack(e_trains).cpu().numpy(),
               e_val=torch.stack(e_vals).cpu().numpy(), gap=torch.stack(gaps).cpu().numpy())
    fig = common.plot_sweep(out["sigmas"], out["gap"], n_train, "training points",
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
    for delta in tqdm(toy.deltas, desc="field", leave=False):
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
        ax.scatter(*out["train"].T, s=16, c="w", edgecolors="k", label="train")
        ax.scatter(*out["val"].T, s=20, c="tab:green", marker="x", label="validation")
        ax.set(title=f"delta = {delta:g}", xlabel="x1", ylabel="x2", aspect="equal")
        fig.colorbar(mesh, ax=ax, label="relative gap to training points")
    axes[0, 0].legend(loc="lower left", fontsize=7)
    fig.suptitle(f"(d) gap field at sigma = {sigma:.2f}; cyan: gap = 0.5")
    return out, fig


def exp_manifold(args):
    """(e) Error along the circle, between training points, for several delta."""
    toy = Toy(args, "manifold")
    sigma = toy.nearest_grid_sigma(toy.sigmas[0])
    angles = torch.linspace(0, 2 * np.pi, 361, dtype=torch.float64, device=args.device)
    ring = toy.radius * torch.stack([angles.cos(), angles.sin()], 1)
    noise = toy.noise_train[:1].expand(len(ring), -1, -1)
    sig = torch.tensor([sigma], dtype=torch.float64, device=args.device)
    errors = torch.stack([toy_error(delta_model(toy.train, d), ring, noise, sig)[0] for d in toy.deltas])
    out = dict(sigma=sigma, deltas=np.array(toy.deltas), angles=angles.cpu().numpy(), error=errors.cpu().numpy(),
               train_angles=toy.angles[0::2].numpy() % (2 * np.pi), val_angles=toy.angles[1::2].numpy() % (2 * np.pi),
               **toy.common_keys())
    fig, ax = plt.subplots(figsize=(7, 3.6), layout="constrained")
    for delta, err in zip(toy.deltas, out["error"]):
        ax.plot(np.degrees(out["angles"]), err, label=f"delta = {delta:g}")
    for a in out["train_angles"]:
        ax.axvline(np.degrees(a), color="k", lw=0.6, ls="-")
    for a in out["val_angles"]:
        ax.axvline(np.degrees(a), color="tab:green", lw=0.6, ls="--")
    ax.set(xlabel="angle on the circle (degrees); black: train, green dashed: validation",
           ylabel="toy error ||D(y + sigma n) - y||", title=f"(e) error along the circle, sigma = {sigma:.2f}")
    ax.legend(fontsize=8)
    return out, fig


def exp_guidance(args):
    """(f) Autoguidance: D_w = D_pos + w (D_pos - D_neg) with delta_pos < delta_neg."""
    toy = Toy(args, "guidance")
    check(len(toy.deltas) == 2, "guidance needs --deltas DELTA_POS DELTA_NEG")
    weights = args.weights if args.weights is not None else DEFAULTS["guidance"]["weights"]
    pos, neg = (delta_model(toy.train, d) for d in toy.deltas)
    curves = [toy.gap(common.guided_denoiser(pos, neg, w))
              for w in tqdm(weights, desc="guidance", leave=False)]
    e_train, e_val, gap = (torch.stack(c).cpu().numpy() for c in zip(*curves))
    out = dict(sigmas=toy.grid.cpu().numpy(), weights=np.array(weights), delta_pos=toy.deltas[0],
               delta_neg=toy.deltas[1], e_train=e_train, e_val=e_val, gap=gap, **toy.common_keys())
    fig = common.plot_sweep(out["sigmas"], gap, weights, "guidance weight w",
                       f"(f) autoguidance, delta_pos = {toy.deltas[0]:g}, delta_neg = {toy.deltas[1]:g}")
    return out, fig


def sample_toy(model, num, steps, seed, device, record=False):
    """ODE samples of a toy model from N(0, sigma_max^2 I), seeded."""
    x_init = common.SIGMA_MAX * torch.randn(num, 2, generator=torch.Generator().manual_seed(seed),
                                            dtype=torch.float64).to(device)
    return common.sample_ode(model, x_init, common.edm_sigmas(steps).to(device), return_trajectory=record)


def nearest_distance(points, data):
    """Distance of each point to its nearest data point."""
    return torch.cdist(points, data).amin(1)


def exp_trajectories(args):
    """(g) ODE trajectories from N(0, 80^2 I) for small delta, and their endpoints' distance to the data."""
    toy = Toy(args, "trajectories")
    endpoints, dists, paths = [], [], []
    for delta in tqdm(toy.deltas, desc="trajectories", leave=False):
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
        ax.scatter(*out["train"].T, s=20, c="k", label="train")
        ax.scatter(*out["val"].T, s=20, c="tab:green", marker="x", label="validation")
        ax.set(title=f"delta = {delta:g}", xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", xlabel="x1",
               ylabel="x2")
    axes[0, 0].legend(loc="lower left", fontsize=7)
    axes[0, -1].plot(out["deltas"], out["mean_nn_dist"], "o-")
    axes[0, -1].set(xscale="log", yscale="log", xlabel="model error delta",
                    ylabel="mean endpoint distance\nto nearest training point", title="memorization")
    fig.suptitle(f"(g) sampling trajectories, radius {toy.radius:g}")
    return out, fig


def exp_fd(args):
    """(h) Fréchet distance of toy samples to the training and validation points as delta varies."""
    toy = Toy(args, "fd")
    fd_train, fd_val, dists = [], [], []
    for delta in tqdm(toy.deltas, desc="fd", leave=False):
        samples = sample_toy(delta_model(toy.train, delta), args.num_samples, args.steps, args.seed, args.device)
        fd_train.append(common.frechet_distance(samples, toy.train))
        fd_val.append(common.frechet_distance(samples, toy.val))
        dists.append(nearest_distance(samples, toy.train).mean().item())
    fd_train, fd_val = np.array(fd_train), np.array(fd_val)
    out = dict(deltas=np.array(toy.deltas), fd_train=fd_train, fd_val=fd_val, gap=(fd_val - fd_train) / fd_train,
               mean_nn_dist=np.array(dists), fd_train_val=common.frechet_distance(toy.train, toy.val),
               **toy.common_keys())
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    axes[0].plot(out["deltas"], fd_train, "o-", label="to training points")
    axes[0].plot(out["deltas"], fd_val, "s-", label="to validation points")
    axes[0].axhline(out["fd_train_val"], color="gray", ls=":", label="train vs validation")
    axes[0].set(xscale="log", yscale="log", xlabel="model error delta", ylabel="Fréchet distance (squared units)")
    axes[0].legend(fontsize=8)
    axes[1].plot(out["deltas"], out["gap"], "o-")
    axes[1].set(xscale="log", xlabel="model error delta", ylabel="(FD_val - FD_train) / FD_train")
    fig.suptitle(f"(h) Fréchet distance of {args.num_samples} samples, {len(toy.train)} training points")
    return out, fig


RUNNERS = {name: globals()[f"exp_{name}"] for name in EXPERIMENTS}


def main(argv=None):
    args = parse_args(argv)
    common.choose_threads(None, args.threads)
    device = common.pick_device(args.device)
    args.device = "cpu" if device.type == "mps" else str(device)
    names = EXPERIMENTS if args.experiment == "all" else [args.experiment]
    for name in tqdm(names, desc="toy2d", disable=len(names) == 1):
        start = time.time()
        out, fig = RUNNERS[name](args)
        npz = common.save_npz(os.path.join(args.out, f"{name}.npz"), args=vars(args) | {"experiment": name}, **out)
        png = common.save_figure(fig, os.path.join(args.out, f"{name}.png"))
        summary = ""
        if "gap" in out and np.ndim(out["gap"]) == 2:
            g = out["gap"]
            i, j = np.unravel_index(np.argmax(g), g.shape)
            summary = f"; largest gap {g[i, j]:.2f} at sigma = {out['sigmas'][j]:.2f}"
        tqdm.write(f"{name}: wrote {npz} and {png} ({time.time() - start:.1f} s{summary})")


if __name__ == "__main__":
    common.run_cli(main)
