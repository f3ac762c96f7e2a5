"""Draw the paper's figures from the .npz files that the other scripts write, and print a summary.

    python figures.py results/quick                  # every figure it has data for -> results/quick/figures
    python figures.py results/quick --out figs

It recognises each file by the script that wrote it and draws every figure its inputs allow, as PNG and PDF,
skipping the others with a note; the figures and tables in detail: `NOTES`.
"""
import argparse
import json
import math
import os
import warnings

import plumbing  # first: a Ctrl-C while the libraries load is one line (plumbing sets the hook)
import common
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common import check  # noqa: E402

# the flags in detail, rendered into docs/reference.md
NOTES = """\
It reads every .npz below RESULTS_DIR and recognises it by the script that wrote it (its `script` entry; files of
another version of the project are skipped with a note):

- `eval_gap.py` (`e_train`, `e_val`, `gap`, `images_seen`): E over training time with the overfitting onset (paper
  Fig. 1), G(sigma) coloured by images seen with the onset curve (Fig. 2), the optimal denoiser beside the
  network, G(sigma) across runs coloured by model size, dataset size n, conditioning granularity k, augmentation
  probability p, guidance weight w and window size (`--windows`: restricted receptive field; the other figures
  show the whole image), and (with `radius_train`) how far D looks: the correlation radius over sigma beside G;
- `sample_memorize.py` (`nn_ratio`, `memorized_fraction`): memorized fraction, Fréchet gap of samples and where
  trajectories live (LLR overlap) over images seen, the Fréchet gap against the early-stopping sigma, the LLR
  distributions of trajectory states and noisy training and validation images per probe sigma, sample grids;
- `train_image.py` (`train_log.npz`): loss and probe E_train / E_val over images seen;
- `toy2d.py` (`delta`, `density`, `guidance`): G(sigma) sweeps (toy2d.py draws every toy panel itself).

Each figure is written into `--out` (default `RESULTS_DIR/figures`) as PNG and PDF, named after what it shows; a
figure whose inputs are missing or unexpected is skipped with a note saying why. With eval_gap.py results the
summary table (per run: parameters, n, images seen, peak G with its interval and sigma, copies, the trajectory
score at sigma near 1.2 and at the gap's peak probe with the null there, Fréchet gaps) is printed and written to
`summary.txt`; snapshots that have both an eval_gap.py and an unguided sample_memorize.py result also give
`claim3_map.png` and its table `claim3_map.txt` (copies and the trajectory scores against the peak of G, per run,
merging only results that differ in the training seed alone), `fcos_over_training.png` (the authors' feature
measure), and, where runs differ in one factor of claim 5 (model size, conditioning) or a snapshot was guided at
several weights, `factor_size.png`, `factor_conditioning.png`, `factor_guidance.png` and their table
`factors.txt`. `--seed` and `--device` are accepted for a uniform command line and unused: figures are
deterministic and need no device. `--threads` figures are drawn at once, one process each on Linux (default: one
per core).
"""
GAP_LABEL = "relative gap G(sigma)"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],  # the docstring's first paragraph
                                epilog="Flags and result keys in full: docs/reference.md",
                                formatter_class=plumbing.HelpFormatter)
    p.add_argument("results", metavar="RESULTS_DIR", help="folder searched (recursively) for .npz files")
    plumbing.add_run_args(p, seed="unused: figures are deterministic (kept for a uniform command line)",
                          device="unused: figures need no device (kept for a uniform command line)",
                          out="figure folder (default: RESULTS_DIR/figures)")
    p.add_argument("--threads", type=plumbing.non_negative_int, default=0, help="figures drawn at once, one process "
                   "each, on Linux (0: one per core, as torch's threads: OMP_NUM_THREADS, else the cores)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------
# Reading results
# ---------------------------------------------------------------------------

KINDS = {"eval_gap.py": "gap", "sample_memorize.py": "memorization", "train_image.py": "train_log",
         "toy2d.py": "toy"}  # the script that wrote a result file -> what figures.py draws from it


def kind_of(data):
    """Which figures a result file feeds, from the script that wrote it (plumbing.result_script); None for
    files of other programs and for toy2d.py experiments other than the G(sigma) sweeps."""
    kind = KINDS.get(plumbing.result_script(data))
    if kind == "toy" and (data.get("args") or {}).get("experiment") not in ("delta", "density", "guidance"):
        return None
    return kind


def find_results(root):
    """{kind: [(name, data)]} for every recognised .npz below root, in path order."""
    found = {}
    for folder, _, files in sorted(os.walk(root)):
        for file in sorted(files):
            if not file.endswith(".npz"):
                continue
            path = os.path.join(folder, file)
            try:
                data = plumbing.load_npz(path)
            except common.UserError as err:
                print(f"note: skipping {path}: {err}")
                continue
            problem = plumbing.format_problem(data)
            if problem and plumbing.result_script(data) in KINDS:
                print(f"note: skipping {path}: {problem}; remake it with {plumbing.result_script(data)}")
                continue
            kind = kind_of(data)
            if kind is None and plumbing.result_script(data) is None:
                print(f"note: skipping {path}: not a result of {', '.join(KINDS)}")
            if kind is not None:
                name = os.path.splitext(os.path.relpath(path, root))[0].replace(os.sep, "_")
                found.setdefault(kind, []).append((name, data))
    return found


def json_key(data, key):
    return json.loads(str(data[key])) if key in data else {}


def whole_image(array, data):
    """Drop the leading window axis (eval_gap.py --windows) of a per-model array: keep the whole image, its
    last entry."""
    return array[-1] if "windows" in data else array


def first_weight(array, data):
    """The unrestricted, unguided rows of a per-model array: drop the leading window axis (whole_image) and
    the guidance axis (keep w = first weight)."""
    array = whole_image(array, data)
    return array[0] if "guidance_weights" in data and array.ndim >= 2 else array


def run_factors(data):
    """Model size (parameters, without the map of the augmentation parameters: conditioning, not size),
    dataset size n, conditioning granularity k and augmentation probability p of an eval_gap result."""
    run, network = json_key(data, "run_args"), json_key(data, "network")
    cond = run.get("cond", "none")
    k = run.get("k") if cond == "kmeans" else (plumbing.DATASETS.get(run.get("data"), {}).get("num_classes")
                                               if cond == "class" else 1)
    augment_map = network.get("augment_dim", 0) * network.get("channels", 0)  # Linear(augment_dim, channels)
    return dict(params=int(data["params"]) - augment_map if "params" in data else None, n=run.get("n"), k=k,
                augment_p=run.get("augment_p", 0.0), model=run.get("model"), data=run.get("data"),
                resolution=run.get("resolution"))


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------

def fig_errors_over_training(data):
    """Paper Fig. 1: E_train and E_val at the final gap's peak sigma over images seen, onset marked."""
    seen, gap = data["images_seen"], first_weight(data["gap"], data)
    j = int(common.peak_index(gap[-1]))
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
    plumbing.plot_sweep(sigmas, gap, np.maximum(seen, 1), "training images seen", "G(sigma) over training",
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


def fig_correlation_radius(data):
    """How far D(x)_p looks (eval_gap.correlation_radius, in pixels) on noisy training and validation images over
    sigma, every snapshot (earlier ones faded); beside it, the last snapshot's r_train - r_val with G(sigma)."""
    sigmas, seen = data["jacobian_sigmas"], data["images_seen"]
    r_train, r_val = first_weight(data["radius_train"], data), first_weight(data["radius_val"], data)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    last = len(r_train) - 1
    for c in range(last + 1):
        faded = dict(alpha=1.0, lw=2) if c == last else dict(alpha=0.15 + 0.45 * c / max(last, 1), lw=1)
        tag = lambda what: f"{what} ({seen[c]:,} images seen)" if c == last else None  # noqa: E731
        axes[0].plot(sigmas, r_train[c], "o-", color="tab:blue", label=tag("training images"), **faded)
        axes[0].plot(sigmas, r_val[c], "s--", color="tab:orange", label=tag("validation images"), **faded)
        if c < last:
            axes[0].annotate(f"{seen[c]:,}", (sigmas[-1], r_val[c, -1]), xytext=(4, -3), textcoords="offset points",
                             fontsize=7, color="gray")
    axes[0].set(xscale="log", xlabel="noise level sigma", ylabel="correlation radius of D (pixels)",
                title="how far D(x)_p looks (faded: earlier snapshots)", ylim=(0, None))
    axes[0].margins(x=0.1)  # room for the images seen of the faded curves
    axes[0].legend(fontsize=7)
    axes[1].plot(sigmas, r_train[-1] - r_val[-1], "o-", color="k", label="r_train - r_val (last snapshot)")
    axes[1].axhline(0, color="gray", lw=0.5)
    axes[1].set(xscale="log", xlabel="noise level sigma", ylabel="radius difference (pixels)",
                title="training minus validation radius, and G(sigma)")
    gap_axis = axes[1].twinx()
    gap_axis.plot(data["sigmas"], first_weight(data["gap"], data)[-1], color="tab:red", alpha=0.6,
                  label="G(sigma) (right axis)")
    gap_axis.set(yscale="symlog", ylabel=GAP_LABEL)
    axes[1].legend(handles=axes[1].lines[:1] + gap_axis.lines, fontsize=7)
    return fig


def factor_groups(gap_results):
    """{figure name: (label, [(value, data)])}: for each factor (model size, n, k, augmentation p), the runs equal
    in the others that differ in it, by value, for G(sigma) of each run's last snapshot coloured by the factor."""
    runs = [(name, data, run_factors(data)) for name, data in gap_results
            if "run_args" in data and "guidance_weights" not in data and "windows" not in data]
    labels = {"params": "model parameters", "n": "training set size n", "k": "conditioning granularity k",
              "augment_p": "augmentation probability p"}
    found = {}
    for factor, label in labels.items():
        groups = {}
        for name, data, f in runs:
            if f[factor] is None:
                continue
            rest = tuple((key, f[key]) for key in (*labels, "data", "resolution") if key != factor)
            groups.setdefault(rest, []).append((f[factor], data))
        for i, members in enumerate(g for g in groups.values() if len({v for v, _ in g}) > 1):
            found[f"gap_by_{factor}" + (f"_{i + 1}" if i else "")] = (label, sorted(members, key=lambda m: m[0]))
    return found


def fig_gap_by_factor(label, members):
    """G(sigma) of the last snapshot of runs that differ in one factor, coloured by it."""
    values = [v for v, _ in members]
    return plumbing.plot_sweep(members[0][1]["sigmas"], [d["gap"][-1] for _, d in members], values, label,
                               f"G(sigma) by {label}", ylabel=GAP_LABEL, log_values=min(values) > 0)


def fig_gap_by_guidance(data):
    """G(sigma) of the last snapshot coloured by the guidance weight w."""
    weights = data["guidance_weights"]
    return plumbing.plot_sweep(data["sigmas"], whole_image(data["gap"], data)[:, -1], weights, "guidance weight w",
                               "G(sigma) by guidance weight", ylabel=GAP_LABEL)


def fig_gap_by_window(data):
    """Restricted receptive field: G(sigma) of the last snapshot (unguided) per window size, the whole image
    last (eval_gap.py --windows)."""
    windows, gap = data["windows"], data["gap"]                       # (W,), (W, [G,] C, S)
    gap = gap[:, 0] if "guidance_weights" in data else gap
    settings = json_key(data, "eval_settings")
    merged = {"average": "averaged", "cut": "cut"}.get(settings.get("window_mode"), settings.get("window_mode"))
    how = f", {settings['window_steps']} per axis, {merged}" if "window_steps" in settings else ""
    fig = plumbing.plot_sweep(data["sigmas"], gap[:, -1], windows,
                              f"window size (pixels a side; whole image: {windows[-1]})",
                              f"G(sigma) by window size{how}\n(last snapshot, {int(data['images_seen'][-1]):,} "
                              "images seen)", ylabel=GAP_LABEL + " (symlog)")
    fig.axes[0].set_xlabel("noise level sigma (pixel values in [-1, 1])")
    fig.axes[0].set_yscale("symlog", linthresh=0.1)
    return fig


def network_configs(data):
    """Indices of the configurations that are network snapshots (not the optimal denoiser)."""
    return [i for i, seen in enumerate(data["images_seen"]) if seen >= 0]


FIXED_PROBE = 1.2  # the fixed probe sigma of the summary and the map's second score panel: the paper's 1.2


def middle_probe(data):
    """Index of the fixed probe sigma nearest FIXED_PROBE in log sigma (the middle one of sample_memorize's
    defaults: 1.09 with 18 steps)."""
    return int(np.abs(np.log(data["probe_sigmas"]) - np.log(FIXED_PROBE)).argmin())


def interval_bars(ax, x, y, ci, color, valid=None):
    """Error bars of a (M, 2) interval around y; points whose trajectory states do not look like noisy data
    (valid False: sample_memorize's traj_valid) drawn hollow."""
    ci = np.asarray(ci, np.float64)
    ax.errorbar(x, y, yerr=np.abs(ci.T - y), fmt="none", capsize=3, color=color, lw=0.8)
    if valid is not None and not np.all(valid):
        bad = ~np.asarray(valid, bool)
        ax.plot(np.asarray(x)[bad], np.asarray(y)[bad], "o", mfc="white", color=color, zorder=3)


def fig_memorization_over_training(mem_results):
    """Over images seen: memorized fraction, Frechet gap of samples (with the gap of held-out validation
    images as its noise level), and where trajectories live at the middle probe sigma: traj_train_overlap
    beside the level of fresh data (heldout_train_overlap), traj_heldout_score (0: like noisy fresh images,
    1: like noisy training images) with the reference samplers (optimal, Gaussian denoiser) as dotted lines,
    and the authors' measure, the mean 1-NN cosine similarity of D(trajectory state) to the training and
    the validation reference in feature space. Bars: 95% intervals (samples and reference draws); hollow
    points: trajectory states that do not look like noisy data (the score says nothing there)."""
    fig, axes = plt.subplots(1, 5, figsize=(25, 4.2), layout="constrained")
    drawn = False
    for name, data in mem_results:
        idx, mid = network_configs(data), middle_probe(data)
        if "traj_heldout_score" in data:
            for i in (i for i in range(len(data["configs"])) if i not in idx):
                axes[3].axhline(data["traj_heldout_score"][i, mid], ls=":", color="gray", lw=1)
                axes[3].annotate(str(data["configs"][i]), (0.02, data["traj_heldout_score"][i, mid]),
                                 xycoords=("axes fraction", "data"), fontsize=6, va="bottom", color="gray")
        if not idx:
            continue
        seen = np.maximum(data["images_seen"][idx], 1)
        valid = data["traj_valid"][idx, mid] if "traj_valid" in data else None
        frac = data["memorized_fraction"][idx]
        line, = axes[0].plot(seen, frac, "o-", label=name)
        color = line.get_color()
        interval_bars(axes[0], seen, frac, data["memorized_ci"][idx], color)
        if "fd_gap" in data:
            axes[1].plot(seen, data["fd_gap"][idx], "o-", color=color, label=name)
        if "fd_gap_heldout" in data and np.isfinite(data["fd_gap_heldout"][idx]).any():
            axes[1].plot(seen, data["fd_gap_heldout"][idx], ":", color=color)
        probe = f"sigma {data['probe_sigmas'][mid]:.2f}" if "probe_sigmas" in data else ""
        for ax, key, fresh in ((axes[2], "traj_train_overlap", "heldout_train_overlap"),
                               (axes[3], "traj_heldout_score", None)):
            if key not in data:
                continue
            ax.plot(seen, data[key][idx, mid], "o-", color=color, label=f"{name} ({probe})")
            if f"{key}_ci" in data:
                interval_bars(ax, seen, data[key][idx, mid], data[f"{key}_ci"][idx, mid], color, valid)
            if fresh in data:
                ax.plot(seen, data[fresh][idx, mid], "--", color=color)
        if "fcos_traj_train_peak" in data:  # the authors' figure: at each model's peak probe
            for query, style, what in (("traj", "o-", "D(trajectory state)"),
                                       ("train", "s--", "D(noisy training image)"),
                                       ("val", "^:", "D(noisy validation image)")):
                axes[4].plot(seen, np.nanmean(data[f"fcos_{query}_train_peak"][idx], -1), style, color=color,
                             mfc="white" if query != "traj" else None, label=f"{name}: {what}")
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    axes[0].set(xscale="log", xlabel="training images seen", ylabel="memorized fraction (d1/d2 < 1/3)",
                ylim=(-0.02, 1.02), title="copies among samples (95% interval)")
    axes[1].set(xscale="log", xlabel="training images seen", ylabel="(FD_val - FD_train) / FD_train",
                title="Frechet gap of samples (dotted: held-out images)")
    axes[2].set(xscale="log", xlabel="training images seen", ylim=(-0.02, 1.02),
                ylabel="share of states with LLR >= 10th pct.\nof noisy training images' (0.9: like them)",
                title="LLR overlap of trajectory states (dashed: fresh data)")
    axes[2].axhline(0.9, color="black", lw=0.6)
    axes[3].set(xscale="log", xlabel="training images seen",
                ylabel="LLR score of trajectory states\n(0: noisy fresh images, 1: noisy training images)",
                title="where trajectories live (95% intervals; dotted: reference samplers)")
    for level in (0, 1):
        axes[3].axhline(level, color="black", lw=0.6)
    axes[4].set(xscale="log", xlabel="training images seen",
                ylabel="mean 1-NN cosine similarity\nto the training reference (features)",
                title="the authors' measure at the gap's peak probe")
    for ax in axes:
        ax.legend(fontsize=7)
    return fig


def snapshot_keys(data, i):
    """How sample_stats may name snapshot i of an eval_gap.py result: by its digest, else by its path."""
    path = os.path.normpath(str(data["checkpoints"][i]))
    return ([("digest", str(data["digests"][i]))] if "digests" in data else []) + [("path", path)]


def recipe(run):
    """How a run was trained apart from n, the seed and the network: 'plain', 'base' (the authors' base model:
    class-conditional, EDM's augmentation at p = 0.12, dropout 0.13), or the settings that differ from plain."""
    parts = [run.get("cond") if run.get("cond") != "kmeans" else f"kmeans{run.get('k')}"] if run.get(
        "cond", "none") != "none" else []
    parts += [f"aug {run['augment_p']:g}"] if run.get("augment_p") else []
    parts += [f"dropout {run['dropout']:g}"] if run.get("dropout") else []
    parts += [f"{run['augment']} data"] if run.get("augment", "none") != "none" else []
    parts += [f"label dropout {run['label_dropout']:g}"] if run.get("label_dropout") else []
    return "base" if parts == ["class", "aug 0.12", "dropout 0.13"] else ", ".join(parts) or "plain"


def map_eligible(data):
    """Whether an eval_gap.py result gives points of the claim-3 map: per-snapshot rows with intervals of the
    whole image, unguided (results of --windows, --jacobian or --guidance-weights are other studies)."""
    settings = json_key(data, "eval_settings")
    return ("peak_gap_ci" in data and "run_args" in data and "windows" not in data and "guidance_weights" not in data
            and not settings.get("jacobian_sigmas"))


def snapshot_points(gap_results, mem_results):
    """One point per snapshot and settings that has both an eval_gap.py (map_eligible) and an unguided
    sample_memorize.py result with intervals (paired as sample_stats pairs them): its run (the training
    arguments but the seed), the eval_gap.py and sample_memorize.py settings, the training seed, n, recipe,
    images seen, the peak of G with its interval over evaluation images, the copies and the trajectory scores
    at the fixed probe and at the gap's peak probe with their intervals and validity. A snapshot met twice with
    the same settings (the same results in two files) counts once, with a note."""
    memo = {}  # snapshot key -> {sample settings: stats}
    for name, data in mem_results:
        if "traj_heldout_score_ci" in data and not np.any(data["guidance_weights"]):  # guided: another study
            for key, stats in sample_stats(data)[0].items():
                found = memo.setdefault(key, {})
                if str(data.get("settings", "")) in found:
                    print(f"note: claim-3 map: {name} repeats the sample results of {key[1]} with the same settings; "
                          "counted once")
                found.setdefault(str(data.get("settings", "")), stats)
    points, seen_before = [], set()
    for name, data in gap_results:
        if not map_eligible(data):
            continue
        run, peak, peak_ci = json_key(data, "run_args"), first_weight(data["peak_gap"], data), first_weight(
            data["peak_gap_ci"], data)
        group = json.dumps({k: v for k, v in run.items() if k != "seed"}, sort_keys=True)
        for i in range(len(data["checkpoints"])):
            found = next((memo[key] for key in snapshot_keys(data, i) if key in memo), {})
            for sample_settings, stats in found.items():
                identity = (snapshot_keys(data, i)[0], str(data.get("eval_settings", "")), sample_settings)
                if identity in seen_before:
                    print(f"note: claim-3 map: {name} repeats the results of {identity[0][1]} with the same settings; "
                          "counted once")
                    continue
                seen_before.add(identity)
                points.append(dict(run=(group, str(data.get("eval_settings", "")), sample_settings),
                                   seed=run.get("seed", 0), n=run.get("n"), recipe=recipe(run), run_args=run,
                                   params=run_factors(data)["params"],
                                   images_seen=int(data["images_seen"][i]), peak=float(peak[i]), peak_ci=peak_ci[i],
                                   copies=stats["memorized"], copies_ci=stats["ci"], **{
                                       k: stats[k] for k in MAP_SCORES + tuple(f"{k}_ci" for k in MAP_SCORES)},
                                   valid=stats["valid"], valid_peak=stats["valid_peak"],
                                   peak_probe=stats["peak_probe"]))
    return points


# per-snapshot measures of sample_stats merged across seeds: the score at the fixed probe, at the gap's peak probe and
# the null's there; the mean 1-NN cosine of D(trajectory state) at the peak probe to the training and validation
# references in feature space (the authors' measure)
MAP_SCORES = ("score", "score_peak", "null_peak", "fcos_train", "fcos_val")


def across_seeds(points):
    """Points of runs that differ only in the training seed (the same run arguments otherwise, evaluated and sampled
    with the same settings), merged per images seen: the mean of the seeds' values, an interval from the smallest
    lower to the largest upper bound of the seeds' intervals (so it holds the spread between seeds and each
    seed's own sampling and reference-draw noise), the number of seeds, valid only where every seed's states look
    like data, and the peak probe sigmas met. Sorted by recipe, n, images seen."""
    groups = {}
    for p in points:
        groups.setdefault((p["run"], p["images_seen"]), []).append(p)
    merged = []
    for (_, seen), group in groups.items():
        first = group[0]
        row = dict(n=first["n"], recipe=first["recipe"], run=first["run"], run_args=first["run_args"],
                   params=first["params"],
                   images_seen=seen, seeds=len({p["seed"] for p in group}), valid=all(p["valid"] for p in group),
                   valid_peak=all(p["valid_peak"] for p in group),
                   peak_probes=sorted({p["peak_probe"] for p in group if np.isfinite(p["peak_probe"])}))
        for key in ("peak", "copies") + MAP_SCORES:
            cis = np.array([p[f"{key}_ci"] for p in group], np.float64)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a key no seed has (NaN): stays NaN
                row[key] = float(np.nanmean([p[key] for p in group]))
                row[f"{key}_ci"] = (float(np.nanmin(cis[:, 0])), float(np.nanmax(cis[:, 1])))
        merged.append(row)
    return sorted(merged, key=lambda r: (r["recipe"] != "plain", r["recipe"], r["n"] or 0, r["run"], r["images_seen"]))


def map_labels(rows):
    """A legend label per run group of across_seeds' rows: recipe and n, and the network and precision where the
    map holds more than one of them."""
    extra = [key for key in ("model", "size", "channels", "blocks", "precision")
             if len({json.dumps(r["run_args"].get(key)) for r in rows}) > 1]
    return {r["run"]: ", ".join([f"{r['recipe']} n = {r['n']}"] + [f"{k} {r['run_args'].get(k)}" for k in extra])
            for r in rows}


def fig_claim3_map(points):
    """Where "memorize in training, generalize in inference" holds: copies among samples, the LLR score of
    trajectory states at each snapshot's peak probe (the grid sigma nearest its peak of G, as the authors probe)
    and at the fixed probe nearest 1.2, against the peak of G; one curve per run (n and recipe; points: snapshots
    in order of images seen; training seeds merged by across_seeds), with 95% intervals on both axes. The claim
    holds where G grows while copies stay near 0 and the scores near 0 (fresh data)."""
    rows = across_seeds(points)
    if not rows:
        return None
    labels, colors = map_labels(rows), {}
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8), layout="constrained")
    styles = {"plain": ("o", "-"), "base": ("s", "--")}
    for run in dict.fromkeys(r["run"] for r in rows):
        group = [r for r in rows if r["run"] == run]
        n = group[0]["n"]
        colors.setdefault(n, f"C{len(colors) % 10}")
        marker, line = styles.get(group[0]["recipe"], ("^", ":"))
        peak = np.array([r["peak"] for r in group])
        xerr = np.abs(np.array([r["peak_ci"] for r in group]).T - peak)
        seeds = max(r["seeds"] for r in group)
        for ax, key, valid in zip(axes, ("copies", "score_peak", "score"), (None, "valid_peak", "valid")):
            y = np.array([r[key] for r in group])
            ax.plot(peak, y, marker=marker, ls=line, color=colors[n],
                    label=f"{labels[run]} ({seeds} seed{'s' if seeds > 1 else ''})")
            ax.errorbar(peak, y, xerr=xerr, fmt="none", color=colors[n], lw=0.8, capsize=2)
            interval_bars(ax, peak, y, [r[f"{key}_ci"] for r in group], colors[n],
                          None if valid is None else [r[valid] for r in group])
    for ax in axes:
        ax.set_xscale("symlog", linthresh=0.1)
        ax.axhline(0, color="black", lw=0.6)
        ax.axvspan(0, 0.35, color="gold", alpha=0.12, lw=0, label="the paper's regime: G up to 0.35")
        ax.set_xlabel("peak of the relative gap G over sigma (symlog)")
    axes[0].legend(fontsize=6)
    axes[0].set(ylabel="memorized fraction (d1/d2 < 1/3)", title="copies among samples vs the gap")
    score = "LLR score of trajectory states\n(0: noisy fresh images, 1: noisy training images)"
    axes[1].set(ylabel=score, title="trajectories at the gap's peak probe")
    axes[2].set(ylabel=score, title=f"trajectories at the fixed probe nearest sigma {FIXED_PROBE}")
    for ax in axes[1:]:
        ax.axhline(1, color="black", lw=0.6)
    return fig


def fig_fcos_over_training(points):
    """The authors' trajectory figure: the mean 1-NN cosine similarity, in feature space, of D(trajectory state) at
    each snapshot's peak probe to the training reference (solid) and to the validation reference (dashed, hollow),
    against training images seen; one panel per recipe, one colour per n (seeds merged, 95% intervals)."""
    rows = [r for r in across_seeds(points) if np.isfinite(r["fcos_train"])]
    if not rows:
        return None
    recipes, labels = list(dict.fromkeys(r["recipe"] for r in rows)), map_labels(rows)
    fig, axes = plt.subplots(1, len(recipes), figsize=(6.5 * len(recipes), 4.4), squeeze=False, layout="constrained")
    colors = {n: f"C{i % 10}" for i, n in enumerate(sorted({r["n"] for r in rows}))}
    for ax, name in zip(axes[0], recipes):
        for run in dict.fromkeys(r["run"] for r in rows if r["recipe"] == name):
            group = [r for r in rows if r["run"] == run]
            seen = np.array([r["images_seen"] for r in group])
            for key, style in (("fcos_train", dict(ls="-", marker="o")), ("fcos_val", dict(ls="--", marker="s",
                                                                                          mfc="white"))):
                y = np.array([r[key] for r in group])
                ax.plot(seen, y, color=colors[group[0]["n"]], label=f"{labels[run]}: to the "
                        f"{'training' if key == 'fcos_train' else 'validation'} reference", **style)
                interval_bars(ax, seen, y, [r[f"{key}_ci"] for r in group], colors[group[0]["n"]])
        ax.set(xscale="log", xlabel="training images seen", title=f"{name}: D(trajectory state) at the peak probe",
               ylabel="mean 1-NN cosine similarity (classifier features)")
        ax.legend(fontsize=6)
    return fig


def format_map(points):
    """The table behind fig_claim3_map: one line per run (recipe, n) and snapshot (seeds merged), each value with
    its 95% interval: the peak of G, copies, the score at the gap's peak probe (and that probe's sigmas), the null
    there, and the score at the fixed probe nearest 1.2."""
    rows = across_seeds(points)
    labels = map_labels(rows)
    head = (f"{'run':24s} {'images':>8s} {'seeds':>5s} {'peak G [95% CI]':>22s} {'copies [95% CI]':>20s} "
            f"{'score@peak [95% CI]':>21s} {'peak sigma':>10s} {'null@peak [95% CI]':>20s} "
            f"{'score@~' + str(FIXED_PROBE) + ' [95% CI]':>21s} {'fcos tr/val':>11s}")
    lines = [head, "-" * len(head)]

    def ci(r, key, spec):
        if not np.isfinite(r[key]):
            return "-"
        return f"{r[key]:{spec}} [{r[key + '_ci'][0]:{spec}}, {r[key + '_ci'][1]:{spec}}]"
    for r in rows:
        sigmas = "/".join(f"{s:.3g}" for s in r["peak_probes"]) or "-"
        lines.append(f"{labels[r['run']][:24]:24s} {r['images_seen']:8,d} {r['seeds']:5d} {ci(r, 'peak', '.2f'):>22s} "
                     f"{ci(r, 'copies', '.1%'):>20s} "
                     f"{ci(r, 'score_peak', '.2f') + ('' if r['valid_peak'] else ' *'):>21s} "
                     f"{sigmas:>10s} {ci(r, 'null_peak', '.2f'):>20s} "
                     f"{ci(r, 'score', '.2f') + ('' if r['valid'] else ' *'):>21s} "
                     f"{r['fcos_train']:5.3f}/{r['fcos_val']:5.3f}")
    note = (["* trajectory states unlike noisy data: the score says nothing there"]
            if not all(r["valid"] and r["valid_peak"] for r in rows) else [])
    return "\n".join(lines + note)


# ---------------------------------------------------------------------------
# Claim 5: one factor at a time (study.sh --scale cpu --factors)
# ---------------------------------------------------------------------------

FACTOR_KEYS = {"size": ("model", "size", "channels", "blocks"),  # run arguments that make each factor
               "conditioning": ("cond", "k", "cluster_space")}


def factor_variants(rows, factor):
    """The groups of across_seeds rows whose runs differ only in the run arguments of `factor` (FACTOR_KEYS), with
    at least two variants: [{variant (its values of those arguments): rows in order of images seen}]."""
    keys, groups = FACTOR_KEYS[factor], {}
    for r in rows:
        rest = json.dumps({k: v for k, v in r["run_args"].items() if k not in keys and k != "seed"}, sort_keys=True)
        variant = tuple((k, r["run_args"].get(k)) for k in keys)
        groups.setdefault((rest, r["run"][1:]), {}).setdefault(variant, []).append(r)
    return [variants for variants in groups.values() if len(variants) > 1]


def conditioning_label(variant):
    """How a run is conditioned, as the figures name it, and its number of labels (1: unconditional)."""
    v = dict(variant)
    if v["cond"] == "kmeans":
        return f"k-means in {v.get('cluster_space') or 'pixels'}", v["k"]
    return ("classes", 10) if v["cond"] == "class" else ("unconditional", 1)


def size_label(rows):
    return f"{rows[0]['params'] / 1e6:.2f}M parameters" if rows[0]["params"] else str(rows[0]["run_args"].get("size"))


PANELS = (("peak", "peak of G over sigma"), ("copies", "memorized fraction (d1/d2 < 1/3)"),
          ("score_peak", "LLR score at the gap's peak probe\n(0: fresh data, 1: training images)"))


def fig_factor_size(points):
    """Claim 5, model size (the paper's Fig. 2): the peak of G, copies and the score at the peak probe against
    training images seen, one curve per network size (seeds merged, 95% intervals)."""
    groups = factor_variants(across_seeds(points), "size")
    if not groups:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.4), layout="constrained")
    for variants in groups:
        for rows in sorted(variants.values(), key=lambda rows: rows[0]["params"] or 0):
            seen = np.array([r["images_seen"] for r in rows])
            for ax, (key, label) in zip(axes, PANELS):
                y = np.array([r[key] for r in rows])
                line, = ax.plot(seen, y, "o-", label=f"{size_label(rows)}, n = {rows[0]['n']} ({rows[0]['seeds']} "
                                f"seed{'s' * (rows[0]['seeds'] > 1)})")
                interval_bars(ax, seen, y, [r[f"{key}_ci"] for r in rows], line.get_color())
                ax.set(xscale="log", xlabel="training images seen", ylabel=label)
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap
    axes[0].set_yscale("symlog", linthresh=0.1)
    axes[0].legend(fontsize=7)
    fig.suptitle("model size: the gap, copies and trajectories over training (95% intervals)")
    return fig


def fig_factor_conditioning(points):
    """Claim 5, conditioning granularity: the peak of G, copies and the score at the peak probe against the number
    of labels (1: unconditional, the dataset's classes, k-means clusters in pixels or in classifier features), at
    the last snapshot (top) and at the last of at most a third of its images (bottom, where G is still in the
    paper's regime), seeds merged, 95% intervals."""
    groups = factor_variants(across_seeds(points), "conditioning")
    if not groups:
        return None
    counts = {r["images_seen"] for variants in groups for rows in variants.values() for r in rows}
    early = [c for c in counts if c <= max(counts) / 3]
    stages = [max(counts)] + ([max(early)] if early else [])
    fig, axes = plt.subplots(len(stages), 3, figsize=(17, 4.4 * len(stages)), layout="constrained", squeeze=False)
    markers = {"unconditional": "D", "classes": "s", "k-means in pixels": "o", "k-means in classifier": "^"}
    for row_axes, seen in zip(axes, stages):
        for variants in groups:
            series = {}
            for variant, rows in variants.items():
                name, k = conditioning_label(variant)
                series.setdefault(name, []).extend((k, r) for r in rows if r["images_seen"] == seen)
            for name, found in series.items():
                found.sort(key=lambda item: item[0])
                k = np.array([item[0] for item in found])
                for ax, (key, label) in zip(row_axes, PANELS):
                    y = np.array([r[key] for _, r in found])
                    line, = ax.plot(k, y, marker=markers.get(name, "x"), ls="-" if len(k) > 1 else "none", label=name)
                    interval_bars(ax, k, y, [r[f"{key}_ci"] for _, r in found], line.get_color())
                    ax.set(xscale="log", xlabel="number of conditioning labels (1: unconditional)", ylabel=label)
        row_axes[0].set_yscale("symlog", linthresh=0.1)
        row_axes[0].legend(fontsize=7, title=f"{seen:,} images seen", title_fontsize=8)
    fig.suptitle("conditioning granularity at the last snapshot"
                 + (f" (top) and at {stages[1]:,} images (bottom)" if len(stages) > 1 else "") + " (95% intervals)")
    return fig


def guidance_rows(gap_results, mem_results):
    """Claim 5, guidance: per guided eval_gap.py result of one snapshot (the whole image) and its negative, per
    weight w: the peak of G and its interval, E_train and E_val at the unguided peak sigma, and, from a guided
    sample_memorize.py result of the same snapshot and negative, copies and the score at the peak probe."""
    samples = {}
    for _, data in mem_results:
        if "traj_heldout_score_peak_ci" not in data:
            continue
        neg = (data.get("args") or {}).get("neg")
        for i, (digest, w) in enumerate(zip(data["digests"], data["guidance_weights"])):
            samples[str(digest), os.path.basename(os.path.dirname(str(neg))), float(w)] = (data, i)
    rows = []
    for name, data in gap_results:
        if "guidance_weights" not in data or "windows" in data or "digests" not in data:
            continue
        neg = (data.get("args") or {}).get("neg")
        negative = "null label" if neg == "uncond" else os.path.basename(os.path.dirname(str(neg)))
        j = int(common.peak_index(data["gap"][0, -1]))  # the unguided peak sigma of the last snapshot
        for g, w in enumerate(data["guidance_weights"]):
            row = dict(name=name, negative=negative, images_seen=int(data["images_seen"][-1]), w=float(w),
                       peak=float(data["peak_gap"][g, -1]),
                       peak_ci=data["peak_gap_ci"][g, -1], sigma=float(data["sigmas"][j]),
                       e_train=float(data["e_train"][g, -1, j]), e_val=float(data["e_val"][g, -1, j]))
            found = samples.get((str(data["digests"][-1]), negative, float(w)))
            if found is not None:
                mem, i = found
                row.update(copies=float(mem["memorized_fraction"][i]), copies_ci=mem["memorized_ci"][i],
                           score_peak=float(mem["traj_heldout_score_peak"][i]),
                           score_peak_ci=mem["traj_heldout_score_peak_ci"][i])
            rows.append(row)
    return rows


def fig_factor_guidance(rows):
    """Claim 5, guidance: against the weight w, per negative and guided snapshot, the peak of G, E_train and E_val
    at the unguided peak sigma, copies and the score at the peak probe (95% intervals)."""
    if not rows:
        return None
    fig, axes = plt.subplots(1, 4, figsize=(22, 4.4), layout="constrained")
    for negative, seen in dict.fromkeys((r["negative"], r["images_seen"]) for r in rows):
        mine = [r for r in rows if (r["negative"], r["images_seen"]) == (negative, seen)]
        w, label = np.array([r["w"] for r in mine]), f"negative: {negative}, at {seen:,} images"
        line, = axes[0].plot(w, [r["peak"] for r in mine], "o-", label=label)
        color = line.get_color()
        interval_bars(axes[0], w, np.array([r["peak"] for r in mine]), [r["peak_ci"] for r in mine], color)
        axes[1].plot(w, [r["e_train"] for r in mine], "o-", color=color,
                     label=f"{label}: training (sigma {mine[0]['sigma']:.3g})")
        axes[1].plot(w, [r["e_val"] for r in mine], "s--", color=color, mfc="white", label=f"{label}: validation")
        for ax, key in ((axes[2], "copies"), (axes[3], "score_peak")):
            have = [r for r in mine if key in r]
            if have:
                x, y = np.array([r["w"] for r in have]), np.array([r[key] for r in have])
                ax.plot(x, y, "o-", color=color, label=label)
                interval_bars(ax, x, y, [r[f"{key}_ci"] for r in have], color)
    axes[0].set(ylabel="peak of G over sigma", yscale="symlog")
    axes[1].set(ylabel="E(sigma) at the unguided peak sigma", yscale="log")
    axes[2].set(ylabel=PANELS[1][1])
    axes[3].set(ylabel=PANELS[2][1])
    for ax in axes:
        ax.set_xlabel("guidance weight w (D_w = D + w (D - D_neg))")
        ax.legend(fontsize=7)
    axes[1].legend(fontsize=6, loc="upper left")  # E grows with w: the upper left stays free
    fig.suptitle("guidance: the gap and the samples against the weight (95% intervals)")
    return fig


def format_factors(points, guidance):
    """The tables behind the factor figures: size and conditioning (per variant and snapshot, seeds merged) and
    guidance (per negative and weight), each value with its 95% interval."""
    def ci(r, key, spec):
        if key not in r or not np.isfinite(r[key]):
            return "-"
        return f"{r[key]:{spec}} [{r[key + '_ci'][0]:{spec}}, {r[key + '_ci'][1]:{spec}}]"
    values = lambda r: (f"{ci(r, 'peak', '.2f'):>22s} {ci(r, 'copies', '.1%'):>20s} "  # noqa: E731
                        f"{ci(r, 'score_peak', '.2f'):>20s}")
    head = f"{'peak G [95% CI]':>22s} {'copies [95% CI]':>20s} {'score@peak [95% CI]':>20s}"
    rows, lines = across_seeds(points), []
    for factor, label in (("size", lambda v, rows: size_label(rows)),
                          ("conditioning", lambda v, rows: "{} k = {}".format(*conditioning_label(v)))):
        for variants in factor_variants(rows, factor):
            lines += [f"{factor}: {'variant':30s} {'images':>8s} {'seeds':>5s} {head}"]
            for variant, mine in variants.items():
                lines += [f"{factor}: {label(variant, mine)[:30]:30s} {r['images_seen']:8,d} {r['seeds']:5d} "
                          f"{values(r)}" for r in mine]
            lines.append("")
    if guidance:
        lines += [f"guidance: {'negative':30s} {'images':>8s} {'w':>5s} {head} {'E_train':>9s} {'E_val':>9s}"]
        lines += [f"guidance: {r['negative'][:30]:30s} {r['images_seen']:8,d} {r['w']:5.1f} {values(r)} "
                  f"{r['e_train']:9.4g} {r['e_val']:9.4g}" for r in guidance]
    return "\n".join(lines).strip()


def fig_fd_vs_stop_sigma(data):
    """Frechet gap of samples against the sigma where sampling stops early (jump to D)."""
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for i, config in enumerate(data["configs"]):
        ax.plot(data["stop_sigmas"], data["fd_stop_gap"][i], "o-", label=str(config))
    ax.set(xscale="log", xlabel="sigma where sampling stops (jump to D)", ylabel="(FD_val - FD_train) / FD_train",
           title="Frechet gap of early-stopped samples")
    ax.legend(fontsize=7)
    return fig


def fig_trajectory_llr(data, config):
    """Where trajectories live: distributions of LLR = log p_train(x | sigma) - log p_val(x | sigma) of
    trajectory states, noisy training images and noisy validation images, one panel per probe sigma."""
    probes = data["probe_sigmas"]
    fig, axes = plt.subplots(1, len(probes), figsize=(4.2 * len(probes), 3.8), squeeze=False, layout="constrained")
    for p, ax in enumerate(axes[0]):
        sets = [("trajectory states", data["llr_traj"]), ("noisy training images", data["llr_train"]),
                ("noisy validation images", data["llr_val"])]
        if "llr_heldout" in data:
            sets.append(("noisy held-out images (fresh data)", data["llr_heldout"]))
        values = [s[config, 0, p] if s.ndim == 4 else s[config, p] for _, s in sets]  # the first reference draw
        bins = np.histogram_bin_edges(np.concatenate(values), bins=30)
        for (label, _), v in zip(sets, values):
            ax.hist(v, bins=bins, histtype="step", lw=1.5, label=f"{label}: median {np.median(v):.1f}")
        ax.set(xlabel="LLR = log p_train(x|sigma) - log p_val(x|sigma) (nats)", ylabel="count",
               title=f"sigma = {probes[p]:.2f}: overlap {data['traj_train_overlap'][config, p]:.2f}")
        ax.legend(fontsize=7)
    fig.suptitle(f"where trajectories live, {data['configs'][config]}")
    return fig


def fig_samples(data, config, count=16):
    """The first samples of a configuration, titled with their d1/d2 (a copy when < 1/3)."""
    samples = data["samples"][config, :count].astype(np.float32)
    fig, ax = plt.subplots(figsize=(0.8 * len(samples), 1.6), layout="constrained")
    ax.imshow(plumbing.image_grid(samples, cols=len(samples)), cmap="gray", vmin=0, vmax=1)
    ax.set(xticks=[], yticks=[], ylabel="samples")
    ratio = data["nn_ratio"][config, :count]
    ax.set_title(f"{data['configs'][config]}: d1/d2 = " + " ".join(f"{r:.2f}" for r in ratio), fontsize=7)
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
    return plumbing.plot_sweep(data["sigmas"], data["gap"], values, label, f"toy: G(sigma) by {label}",
                               ylabel=GAP_LABEL)


# ---------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------

def sample_stats(data):
    """Statistics of the unguided configurations of a sample_memorize.py result: ({snapshot: stats}, [summary
    rows of the reference samplers: optimal, Gaussian]). A snapshot is named by its digest (digests, as
    eval_gap.py's), so that the paths by which the two scripts were given it do not matter. The trajectory
    measures are at the fixed probe nearest 1.2 (score) and at the gap's peak probe (score_peak, null_peak); NaN
    where the file has no such measure (no peak probe)."""
    memo, refs = {}, []
    mid, nan2 = middle_probe(data), (math.nan, math.nan)
    keys = [("digest", str(d)) for d in data["digests"]]
    for i, (key, seen, w) in enumerate(zip(keys, data["images_seen"], data["guidance_weights"])):
        if w != 0:
            continue
        at = lambda key, default=math.nan: data[key][i] if key in data else default  # noqa: E731
        stats = dict(memorized=float(data["memorized_fraction"][i]), ci=data["memorized_ci"][i],
                     score=float(at("traj_heldout_score")[mid]), score_ci=at("traj_heldout_score_ci")[mid],
                     valid=bool(at("traj_valid")[mid]), score_peak=float(at("traj_heldout_score_peak")),
                     score_peak_ci=at("traj_heldout_score_peak_ci", nan2), valid_peak=bool(at("traj_valid_peak", True)),
                     null_peak=float(at("null_heldout_score_peak")),
                     null_peak_ci=at("null_heldout_score_peak_ci", nan2),
                     peak_probe=float(at("peak_probe_sigma")), fd_gap=float(data["fd_gap"][i]),
                     fd_heldout=float(data["fd_gap_heldout"][i]))
        for ref in ("train", "val"):  # the mean over samples and a bootstrap interval of it
            cos = np.asarray(at(f"fcos_traj_{ref}_peak", np.array([math.nan])), np.float64)
            finite = cos[np.isfinite(cos)]
            stats[f"fcos_{ref}"] = float(finite.mean()) if finite.size else math.nan
            stats[f"fcos_{ref}_ci"] = bootstrap_mean(finite) if finite.size else nan2
        if seen >= 0:
            memo[key] = stats
        else:
            refs.append(dict(run=str(data["configs"][i]), params=None, n=(data.get("args") or {}).get("n"),
                             images_seen=None, peak_gap=None, peak_ci=None, peak_sigma=None, **stats))
    return memo, refs


def bootstrap_mean(values, n_boot=1000, seed=0, level=0.95):
    """Percentile bootstrap interval of the mean of values (1-D), seeded."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (n_boot, len(values)))].mean(1)
    return tuple(np.quantile(means, [(1 - level) / 2, (1 + level) / 2]))


def gap_row(name, data, memo):
    """The summary row of an eval_gap.py result (its last snapshot), with the sample statistics of that
    snapshot from `memo` (sample_stats: by its digest); a note when there are sample statistics but none of this
    snapshot."""
    gap = first_weight(data["gap"], data)[-1]
    j = int(common.peak_index(gap))
    f = run_factors(data) if "run_args" in data else {}
    last = str(data["checkpoints"][-1]) if "checkpoints" in data else "optimal"
    keys = snapshot_keys(data, -1) if "checkpoints" in data else [("path", last)]
    stats = next((memo[key] for key in keys if key in memo), None)
    if stats is None and memo and last != "optimal":  # the optimal denoiser's samples are reference rows
        print(f"note: no sample_memorize.py result holds the last snapshot of {name} (paired by its digest): "
              "its sample columns stay empty")
    params = int(data["params"]) if "params" in data else None  # all of them
    peak_ci = first_weight(data["peak_gap_ci"], data)[-1] if "peak_gap_ci" in data else None
    return dict(run=name, params=params, n=f.get("n"), images_seen=int(data["images_seen"][-1]),
                peak_gap=float(gap[j]), peak_ci=peak_ci, peak_sigma=float(data["sigmas"][j]), **(stats or {}))


def summary_rows(gap_results, mem_results):
    """Per run (last snapshot): parameters, n, images seen, peak gap and its sigma, memorized fraction with
    its interval, traj_heldout_score at the fixed probe nearest 1.2 and at the gap's peak probe (with its sigma
    and the null's score there), Frechet gap of samples and of held-out validation images (its noise level);
    then the reference samplers (optimal, Gaussian) of the sample files. A file whose row cannot be made is left
    out with a note."""
    memo, refs = {}, []
    for name, data in mem_results:
        memo_refs = attempt(f"summary of {name}", sample_stats, data)
        if memo_refs is not None:
            memo.update(memo_refs[0])
            refs += memo_refs[1]
    rows = [attempt(f"summary row of {name}", gap_row, name, data, memo) for name, data in gap_results]
    return [row for row in rows if row is not None] + refs


def format_row(r):
    fmt = lambda v, spec: format(v, spec) if v is not None and np.isfinite(v) else "-"  # noqa: E731

    def with_ci(value, ci, spec, valid=True):
        if value is None or not np.isfinite(value):
            return "-"
        return (fmt(value, spec) + ("" if ci is None else f" [{fmt(ci[0], spec)}, {fmt(ci[1], spec)}]")
                + ("" if valid else " *"))
    copies = "-" if r.get("memorized") is None else f"{r['memorized']:.0%} [{r['ci'][0]:.0%}, {r['ci'][1]:.0%}]"
    return (f"{r['run'][:34]:34s} {fmt(r['params'], ',d'):>9s} {fmt(r['n'], 'd'):>5s} "
            f"{fmt(r['images_seen'], ',d'):>8s} {with_ci(r['peak_gap'], r.get('peak_ci'), '.2f'):>20s} "
            f"{fmt(r['peak_sigma'], '.3f'):>8s} {copies:>16s} "
            f"{with_ci(r.get('score'), r.get('score_ci'), '.2f', r.get('valid', True)):>20s} "
            f"{with_ci(r.get('score_peak'), r.get('score_peak_ci'), '.2f', r.get('valid_peak', True)):>20s} "
            f"{fmt(r.get('peak_probe'), '.3f'):>6s} {with_ci(r.get('null_peak'), r.get('null_peak_ci'), '.2f'):>20s} "
            f"{fmt(r.get('fd_gap'), '+.2f'):>7s} {fmt(r.get('fd_heldout'), '+.2f'):>8s}")


def format_summary(rows):
    head = (f"{'run':34s} {'params':>9s} {'n':>5s} {'images':>8s} {'peak G [95% CI]':>20s} {'at sigma':>8s} "
            f"{'copies [95% CI]':>16s} {'score@~' + str(FIXED_PROBE) + ' [95% CI]':>20s} "
            f"{'score@peak [95% CI]':>20s} {'peak':>6s} {'null@peak [95% CI]':>20s} {'FD gap':>7s} {'held-out':>8s}")
    lines = [line for line in (attempt(f"summary row of {r['run']}", format_row, r) for r in rows) if line is not None]
    note = ["* trajectory states unlike noisy data: the score says nothing there"] if any(
        line.endswith("*") or " * " in line for line in lines) else []
    return "\n".join([head, "-" * len(head)] + lines + note)


def attempt(what, make, *inputs):
    """make(*inputs); when it fails (a result file with unexpected contents), None and one line
    'note: WHAT skipped: why' instead of a traceback, with the figures it opened closed."""
    before = set(plt.get_fignums())
    try:
        return make(*inputs)
    except Exception as err:  # any failure of one figure or row must not stop the others
        for number in set(plt.get_fignums()) - before:
            plt.close(number)
        reason = (f"its input lacks {err}" if isinstance(err, KeyError)
                  else f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}")
        print(f"note: {what} skipped: {reason}")
        return None


def main(argv=None):
    args = parse_args(argv)
    check(os.path.isdir(args.results), f"{args.results} is not a folder; give the folder the scripts wrote to")
    out = args.out or os.path.join(args.results, "figures")
    plumbing.check_writable(out, folder=True)
    found = find_results(args.results)
    check(found, f"no results (.npz from toy2d.py, eval_gap.py, sample_memorize.py or train_image.py) "
                 f"below {args.results}")
    with plumbing.exclusive(out):  # one process per figure folder; then no live writer has a temp file in it
        plumbing.remove_temp_files(out, r".*\.(png|pdf)|summary\.txt")
        write_figures(args.results, out, found, args.threads or plumbing.DEFAULT_THREADS)


def write_figures(results, out, found, processes=1):
    """Every figure the results in `found` (find_results of the folder `results`) allow, and the summary, into
    the folder `out`; the figures drawn by up to `processes` processes at once (plumbing.in_processes)."""
    gap_results, mem_results = found.get("gap", []), found.get("memorization", [])
    jobs = []  # one per figure: draw it, save it, say so; its PNG path, or None where it was skipped

    def draw(name, make, *inputs):
        def make_and_save():
            fig = make(*inputs)
            return None if fig is None else plumbing.save_figure(fig, os.path.join(out, name + ".png"))

        def job():
            path = attempt(name, make_and_save)
            if path is not None:
                print(f"wrote {path} (and .pdf)")
            return path
        jobs.append(job)

    for name, data in gap_results:
        if np.size(data.get("images_seen")) > 1:
            draw(f"errors_over_training_{name}", fig_errors_over_training, data)
            draw(f"gap_over_training_{name}", fig_gap_over_training, data)
        if "e_train_optimal" in data:
            draw(f"optimal_vs_network_{name}", fig_optimal_vs_network, data)
        if "guidance_weights" in data:
            draw(f"gap_by_guidance_{name}", fig_gap_by_guidance, data)
        if "radius_train" in data:
            draw(f"correlation_radius_{name}", fig_correlation_radius, data)
        if "windows" in data:
            draw(f"gap_by_window_{name}", fig_gap_by_window, data)
    for name, (label, members) in (attempt("G(sigma) by factor", factor_groups, gap_results) or {}).items():
        draw(name, fig_gap_by_factor, label, members)
    draw("memorization_over_training", fig_memorization_over_training, mem_results)
    points = attempt("claim-3 map", snapshot_points, gap_results, mem_results) or []
    if points:
        draw("claim3_map", fig_claim3_map, points)
        draw("fcos_over_training", fig_fcos_over_training, points)
        draw("factor_size", fig_factor_size, points)
        draw("factor_conditioning", fig_factor_conditioning, points)
    guidance = attempt("guidance rows", guidance_rows, gap_results, mem_results) or []
    if guidance:
        draw("factor_guidance", fig_factor_guidance, guidance)
    for name, data in mem_results:
        if "fd_stop_gap" in data and data["fd_stop_gap"].size:
            draw(f"fd_vs_stop_sigma_{name}", fig_fd_vs_stop_sigma, data)
        if "llr_traj" in data and data["llr_traj"].size:
            draw(f"trajectory_llr_{name}", fig_trajectory_llr, data, -1)  # the last configuration
        if "samples" in data:
            draw(f"samples_{name}", fig_samples, data, -1)
    for name, data in found.get("train_log", []):
        draw(f"training_{name}", fig_train_log, data)
    for name, data in found.get("toy", []):
        draw(f"toy_{name}", fig_toy, data)
    written = [path for path in plumbing.in_processes(jobs, processes) if path is not None]
    for missing, what in (("gap", "eval_gap.py"), ("memorization", "sample_memorize.py")):
        if missing not in found:
            print(f"note: no {what} results below {results}: their figures are skipped")

    if gap_results:
        table = format_summary(summary_rows(gap_results, mem_results))
        path = plumbing.atomic_write(os.path.join(out, "summary.txt"), lambda f: f.write((table + "\n").encode()))
        print(table)
        print(f"wrote {path}")
    tables = [("claim3_map.txt", format_map, points)] if points else []
    tables += [("factors.txt", lambda p: format_factors(p, guidance), points)] if points or guidance else []
    for name, make, inputs in tables:
        table = attempt(name, make, inputs)
        if table:
            path = plumbing.atomic_write(os.path.join(out, name), lambda f: f.write((table + "\n").encode()))
            print(table)
            print(f"wrote {path}")
    print(f"{len(written)} figures in {out}")


if __name__ == "__main__":
    plumbing.run_cli(main)
