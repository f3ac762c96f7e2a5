"""Draw the paper's figures from the .npz files that the other scripts write, and print a summary.

    python figures.py results/quick                  # every figure it has data for -> results/quick/figures
    python figures.py results/quick --out figs

It reads every .npz below RESULTS_DIR and recognises it by its keys:
  eval_gap.py      (e_train, e_val, gap, images_seen): E over training time with the overfitting onset
                   (paper Fig. 1), G(sigma) coloured by images seen with the onset curve (Fig. 2), the
                   optimal denoiser beside the network, and G(sigma) across runs coloured by model size,
                   dataset size n, conditioning granularity k and guidance weight w;
  sample_memorize.py (nn_ratio, memorized_fraction): memorized fraction and Frechet gap of samples over
                   images seen, the Frechet gap against the early-stopping sigma, trajectory overlap,
                   sample grids (beside their nearest training images when stored);
  train_image.py   (train_log.npz): loss and probe E_train / E_val over images seen;
  toy2d.py         (delta, density, guidance): G(sigma) sweeps (toy2d.py draws every toy panel itself).
Each figure is written as PNG and PDF, named after what it shows; inputs it lacks are skipped with a note.
"""
import argparse
import json
import os

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from common import check  # noqa: E402

GAP_LABEL = "relative gap G(sigma)"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("results", metavar="RESULTS_DIR", help="folder searched (recursively) for .npz files")
    p.add_argument("--out", help="figure folder (default: RESULTS_DIR/figures)")
    p.add_argument("--seed", type=int, default=0, help="unused: figures are deterministic (kept for a uniform CLI)")
    p.add_argument("--device", default="cpu", help="unused: figures need no device (kept for a uniform CLI)")
    p.add_argument("--threads", type=int, default=0, help="unused: figures need no torch threads (kept for a "
                   "uniform CLI)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------
# Reading results
# ---------------------------------------------------------------------------

def kind_of(data):
    """Which script wrote an .npz, from its keys."""
    keys = set(data)
    if {"e_train", "e_val", "gap", "images_seen", "sigmas"} <= keys:
        return "gap"
    if {"nn_ratio", "memorized_fraction"} <= keys:
        return "memorization"
    if {"loss", "eval_images", "E_train", "E_val"} <= keys:
        return "train_log"
    if isinstance(data.get("args"), dict) and data["args"].get("experiment") in ("delta", "density", "guidance"):
        return "toy"
    return None


def find_results(root):
    """{kind: [(name, data)]} for every recognised .npz below root, in path order."""
    found = {}
    for folder, _, files in sorted(os.walk(root)):
        for file in sorted(files):
            if not file.endswith(".npz"):
                continue
            path = os.path.join(folder, file)
            try:
                data = common.load_npz(path)
            except common.UserError as err:
                print(f"note: skipping {path}: {err}")
                continue
            kind = kind_of(data)
            if kind is not None:
                name = os.path.splitext(os.path.relpath(path, root))[0].replace(os.sep, "_")
                found.setdefault(kind, []).append((name, data))
    return found


def json_key(data, key):
    return json.loads(str(data[key])) if key in data else {}


def first_weight(array, data):
    """Drop the leading guidance axis (keep w = first weight) of a per-model array."""
    return array[0] if "guidance_weights" in data and array.ndim >= 2 else array


def run_factors(data):
    """Model size (parameters), dataset size n and conditioning granularity k of an eval_gap result."""
    run = json_key(data, "run_args")
    cond = run.get("cond", "none")
    k = run.get("k") if cond == "kmeans" else (common.DATASETS.get(run.get("data"), {}).get("num_classes")
                                               if cond == "class" else 1)
    return dict(params=int(data["params"]) if "params" in data else None, n=run.get("n"), k=k,
                model=run.get("model"), data=run.get("data"), resolution=run.get("resolution"))


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------

def fig_errors_over_training(data):
    """Paper Fig. 1: E_train and E_val at the final gap's peak sigma over images seen, onset marked."""
    seen, gap = data["images_seen"], first_weight(data["gap"], data)
    j = int(np.nanargmax(np.where(np.isfinite(gap[-1]), gap[-1], -np.inf)))
    sigma = data["sigmas"][j]
    e_train, e_val = first_weight(data["e_train"], data)[:, j], first_weight(data["e_val"], data)[:, j]
    onset = first_weight(data["onset_images_seen"], data)[j]
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    ax.plot(seen, e_train, "o-", label="training images")
    ax.plot(seen, e_val, "s-", label="validation images")
    ax.axvline(onset, color="gray", ls="--", label=f"overfitting onset ({onset:,} images)")
    ax.set(xscale="log", yscale="log", xlabel="training images seen",
           ylabel="denoising error E(sigma) (per pixel, [-1, 1] scale)", title=f"E at sigma = {sigma:.2f}")
    ax.legend(fontsize=8)
    return fig


def fig_gap_over_training(data):
    """Paper Fig. 2: G(sigma) coloured by images seen, and G over (images seen, sigma) with the onset curve."""
    seen, sigmas, gap = data["images_seen"], data["sigmas"], first_weight(data["gap"], data)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
    common.plot_sweep(sigmas, gap, np.maximum(seen, 1), "training images seen", "G(sigma) over training",
                      ylabel=GAP_LABEL, ax=axes[0], log_values=len(seen) > 1 and seen.min() > 0)
    finite = gap[np.isfinite(gap)]
    vmax = np.percentile(finite, 99) if finite.size else 1
    mesh = axes[1].pcolormesh(sigmas, np.maximum(seen, 1), np.clip(gap, -vmax, vmax), shading="nearest",
                              cmap="magma", vmin=min(0, finite.min() if finite.size else 0), vmax=vmax)
    onset = first_weight(data["onset_images_seen"], data)
    axes[1].plot(sigmas, np.maximum(onset, 1), "c.-", label="overfitting onset (min of E_val)")
    axes[1].set(xscale="log", yscale="log", xlabel="noise level sigma", ylabel="training images seen",
                title="G over training")
    axes[1].legend(fontsize=8, loc="lower left")
    fig.colorbar(mesh, ax=axes[1], label=GAP_LABEL)
    return fig


def fig_optimal_vs_network(data):
    """E(sigma) and G(sigma) of the last snapshot beside the optimal denoiser of its training set."""
    sigmas = data["sigmas"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for suffix, label, style in (("", "network (last snapshot)", "-"), ("_optimal", "optimal denoiser", "--")):
        e_train = first_weight(data["e_train" + suffix], data)[-1]
        e_val = first_weight(data["e_val" + suffix], data)[-1]
        axes[0].plot(sigmas, e_train, style, color="tab:blue", label=f"{label}, training")
        axes[0].plot(sigmas, e_val, style, color="tab:orange", label=f"{label}, validation")
        axes[1].plot(sigmas, first_weight(data["gap" + suffix], data)[-1], style, color="k", label=label)
    axes[0].set(xscale="log", yscale="log", xlabel="noise level sigma", ylabel="denoising error E(sigma)")
    axes[1].set(xscale="log", yscale="symlog", xlabel="noise level sigma", ylabel=GAP_LABEL)
    for ax in axes:
        ax.legend(fontsize=7)
    return fig


def figs_by_factor(gap_results):
    """G(sigma) of each run's last snapshot, coloured by one factor, for runs equal in the others."""
    runs = [(name, data, run_factors(data)) for name, data in gap_results
            if "run_args" in data and "guidance_weights" not in data]
    labels = {"params": "model parameters", "n": "training set size n", "k": "conditioning granularity k"}
    figures = {}
    for factor, label in labels.items():
        groups = {}
        for name, data, f in runs:
            if f[factor] is None:
                continue
            rest = tuple((key, f[key]) for key in ("params", "n", "k", "data", "resolution") if key != factor)
            groups.setdefault(rest, []).append((f[factor], data))
        for i, members in enumerate(g for g in groups.values() if len({v for v, _ in g}) > 1):
            members.sort(key=lambda m: m[0])
            values = [v for v, _ in members]
            fig = common.plot_sweep(members[0][1]["sigmas"], [d["gap"][-1] for _, d in members], values, label,
                                    f"G(sigma) by {label}", ylabel=GAP_LABEL, log_values=min(values) > 0)
            figures[f"gap_by_{factor}" + (f"_{i + 1}" if i else "")] = fig
    return figures


def fig_gap_by_guidance(data):
    """G(sigma) of the last snapshot coloured by the guidance weight w."""
    weights = data["guidance_weights"]
    return common.plot_sweep(data["sigmas"], data["gap"][:, -1], weights, "guidance weight w",
                             "G(sigma) by guidance weight", ylabel=GAP_LABEL)


def network_configs(data):
    """Indices of the configurations that are network snapshots (not the optimal denoiser)."""
    return [i for i, seen in enumerate(data["images_seen"]) if seen >= 0]


def fig_memorization_over_training(mem_results):
    """Memorized fraction (with its bootstrap interval) and Frechet gap of samples over images seen."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    drawn = False
    for name, data in mem_results:
        idx = network_configs(data)
        if not idx:
            continue
        seen = np.maximum(data["images_seen"][idx], 1)
        frac, ci = data["memorized_fraction"][idx], data["memorized_ci"][idx]
        axes[0].errorbar(seen, frac, yerr=np.abs(ci.T - frac), fmt="o-", capsize=3, label=name)
        if "fd_gap" in data:
            axes[1].plot(seen, data["fd_gap"][idx], "o-", label=name)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    axes[0].set(xscale="log", xlabel="training images seen", ylabel="memorized fraction (d1/d2 < 1/3)",
                ylim=(-0.02, 1.02), title="copies among samples")
    axes[1].set(xscale="log", xlabel="training images seen", ylabel="(FD_val - FD_train) / FD_train",
                title="Frechet gap of samples")
    for ax in axes:
        ax.legend(fontsize=7)
    return fig


def fig_fd_vs_stop_sigma(data):
    """Frechet gap of samples against the sigma where sampling stops early (jump to D)."""
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for i, config in enumerate(data["configs"]):
        ax.plot(data["stop_sigmas"], data["fd_stop_gap"][i], "o-", label=str(config))
    ax.set(xscale="log", xlabel="sigma where sampling stops (jump to D)", ylabel="(FD_val - FD_train) / FD_train",
           title="Frechet gap of early-stopped samples")
    ax.legend(fontsize=7)
    return fig


def fig_trajectory_overlap(data, config):
    """Nearest-neighbour distance to the training set of D(trajectory), D(noisy train), D(noisy val)."""
    probes = data["probe_sigmas"]
    fig, axes = plt.subplots(1, len(probes), figsize=(4.2 * len(probes), 3.8), squeeze=False, layout="constrained")
    for p, ax in enumerate(axes[0]):
        sets = [("D(trajectory state)", data["nn_traj"]), ("D(noisy training image)", data["nn_train"]),
                ("D(noisy validation image)", data["nn_val"])]
        values = [s[config, p] for _, s in sets]
        bins = np.histogram_bin_edges(np.concatenate(values), bins=30)
        for (label, _), v in zip(sets, values):
            ax.hist(v, bins=bins, histtype="step", lw=1.5, label=f"{label}: median {np.median(v):.2f}")
        ax.set(xlabel="L2 distance to nearest training image", ylabel="count", title=f"sigma = {probes[p]:.2f}")
        ax.legend(fontsize=7)
    fig.suptitle(f"trajectory overlap, {data['configs'][config]}")
    return fig


def image_grid(images, rows):
    """(K, C, H, W) in [-1, 1] -> one (rows*H, cols*W, C) array in [0, 1] for imshow."""
    k, c, h, w = images.shape
    cols = int(np.ceil(k / rows))
    grid = np.ones((rows * h, cols * w, c), np.float32)
    for i, img in enumerate(images):
        r, col = divmod(i, cols)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = (np.transpose(img, (1, 2, 0)) + 1) / 2
    return np.clip(grid.squeeze(-1) if c == 1 else grid, 0, 1)


def fig_samples(data, config, count=16):
    """The first samples of a configuration, above their nearest training images when stored."""
    samples = data["samples"][config, :count].astype(np.float32)
    rows = [("samples", samples)]
    if "nn_images" in data:
        rows.append(("nearest training images", data["nn_images"][config, :count].astype(np.float32)))
    fig, axes = plt.subplots(len(rows), 1, figsize=(0.8 * len(samples), 1.2 * len(rows) + 0.4), squeeze=False,
                             layout="constrained")
    for ax, (label, images) in zip(axes[:, 0], rows):
        ax.imshow(image_grid(images, 1), cmap="gray", vmin=0, vmax=1)
        ax.set(xticks=[], yticks=[], ylabel=label)
    ratio = data["nn_ratio"][config, :count]
    axes[0, 0].set_title(f"{data['configs'][config]}: d1/d2 = " + " ".join(f"{r:.2f}" for r in ratio), fontsize=7)
    return fig


def fig_train_log(data):
    """Training loss and probe E_train / E_val at the evaluation sigmas over images seen."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    loss, seen = data["loss"], data["images_seen"]
    window = max(1, len(loss) // 50)
    smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
    axes[0].plot(seen[window - 1:], smooth)
    axes[0].set(xscale="log", yscale="log", xlabel="training images seen", ylabel="EDM loss (moving average)")
    for j, sigma in enumerate(data["eval_sigmas"]):
        line, = axes[1].plot(data["eval_images"], data["E_train"][:, j], "-", label=f"train, sigma {sigma:g}")
        axes[1].plot(data["eval_images"], data["E_val"][:, j], "--", color=line.get_color(),
                     label=f"validation, sigma {sigma:g}")
    axes[1].set(xscale="symlog", yscale="log", xlabel="training images seen", ylabel="probe E(sigma)")
    axes[1].legend(fontsize=7)
    return fig


def fig_toy(data):
    """A toy G(sigma) sweep (toy2d.py delta, density or guidance), redrawn."""
    experiment = data["args"]["experiment"]
    values, label = {"delta": (data.get("deltas"), "model error delta"),
                     "density": (data.get("n_train"), "training points"),
                     "guidance": (data.get("weights"), "guidance weight w")}[experiment]
    return common.plot_sweep(data["sigmas"], data["gap"], values, label, f"toy: G(sigma) by {label}",
                             ylabel=GAP_LABEL)


# ---------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------

def summary_rows(gap_results, mem_results):
    """Per run: parameters, n, images seen, peak gap and its sigma (last snapshot), memorized fraction."""
    fractions = {}  # last snapshot path -> memorized fraction of its unguided samples
    for _, data in mem_results:
        for path, seen, w, frac in zip(data["checkpoints"], data["images_seen"], data["guidance_weights"],
                                       data["memorized_fraction"]):
            if seen >= 0 and w == 0:
                fractions[os.path.normpath(str(path))] = float(frac)
    rows = []
    for name, data in gap_results:
        gap = first_weight(data["gap"], data)[-1]
        finite = np.where(np.isfinite(gap), gap, -np.inf)
        j = int(np.argmax(finite))
        f = run_factors(data) if "run_args" in data else {}
        last = os.path.normpath(str(data["checkpoints"][-1])) if "checkpoints" in data else ""
        rows.append(dict(run=name, params=f.get("params"), n=f.get("n"), images_seen=int(data["images_seen"][-1]),
                         peak_gap=float(gap[j]), peak_sigma=float(data["sigmas"][j]),
                         memorized=fractions.get(last)))
    return rows


def format_summary(rows):
    head = f"{'run':40s} {'params':>9s} {'n':>6s} {'images':>10s} {'peak G':>8s} {'at sigma':>9s} {'copies':>7s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
        lines.append(f"{r['run'][:40]:40s} {fmt(r['params'], ',d'):>9s} {fmt(r['n'], 'd'):>6s} "
                     f"{r['images_seen']:>10,d} {r['peak_gap']:>8.2f} {r['peak_sigma']:>9.3f} "
                     f"{fmt(r['memorized'], '.0%'):>7s}")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    check(os.path.isdir(args.results), f"{args.results} is not a folder; give the folder the scripts wrote to")
    out = args.out or os.path.join(args.results, "figures")
    found = find_results(args.results)
    check(found, f"no results (.npz from toy2d.py, eval_gap.py, sample_memorize.py or train_image.py) "
                 f"below {args.results}")
    gap_results, mem_results = found.get("gap", []), found.get("memorization", [])
    figures = {}

    def add(name, make, *inputs):
        try:
            fig = make(*inputs)
        except KeyError as err:
            print(f"note: {name} skipped: its input lacks {err}")
            return
        if fig is not None:
            figures[name] = fig

    for name, data in gap_results:
        if len(data["images_seen"]) > 1:
            add(f"errors_over_training_{name}", fig_errors_over_training, data)
            add(f"gap_over_training_{name}", fig_gap_over_training, data)
        if "e_train_optimal" in data:
            add(f"optimal_vs_network_{name}", fig_optimal_vs_network, data)
        if "guidance_weights" in data:
            add(f"gap_by_guidance_{name}", fig_gap_by_guidance, data)
    figures.update(figs_by_factor(gap_results))
    add("memorization_over_training", fig_memorization_over_training, mem_results)
    for name, data in mem_results:
        if "fd_stop_gap" in data and data["fd_stop_gap"].size:
            add(f"fd_vs_stop_sigma_{name}", fig_fd_vs_stop_sigma, data)
        last = len(data["configs"]) - 1
        if "nn_traj" in data and data["nn_traj"].size:
            add(f"trajectory_overlap_{name}", fig_trajectory_overlap, data, last)
        if "samples" in data:
            add(f"samples_{name}", fig_samples, data, last)
    for name, data in found.get("train_log", []):
        add(f"training_{name}", fig_train_log, data)
    for name, data in found.get("toy", []):
        add(f"toy_{name}", fig_toy, data)
    for missing, what in (("gap", "eval_gap.py"), ("memorization", "sample_memorize.py")):
        if missing not in found:
            print(f"note: no {what} results below {args.results}: their figures are skipped")

    for name, fig in figures.items():
        print(f"wrote {common.save_figure(fig, os.path.join(out, name + '.png'))} (and .pdf)")
    if gap_results:
        table = format_summary(summary_rows(gap_results, mem_results))
        with open(os.path.join(out, "summary.txt"), "w") as f:
            f.write(table + "\n")
        print(table)
    print(f"{len(figures)} figures in {out}")


if __name__ == "__main__":
    common.run_cli(main)
