"""Per-noise-level denoising error E(sigma) on training and validation images, the relative generalization gap
G(sigma) = (E_val - E_train) / E_train and the overfitting onset, for the snapshots of a run or for the optimal
denoiser of a training subset (docs/method.md, "Formulas").

    python eval_gap.py runs/RUN                          # all snapshots of a run -> runs/RUN/gap.npz
    python eval_gap.py runs/RUN --optimal                # ... with the optimal denoiser's curves beside them
    python eval_gap.py --optimal --data fashion-mnist --n 64 --resolution 16   # the memorizing reference
    python eval_gap.py runs/RUN --guidance-weights 0 0.5 1 2 --neg uncond      # classifier-free guidance
    python eval_gap.py runs/RUN --guidance-weights 0 1 --neg runs/SMALL/snapshot-000100000.pt  # autoguidance
    python eval_gap.py runs/RUN --windows 8 12 --optimal  # the denoisers see only windows of the noisy image
    python eval_gap.py runs/RUN/snapshot-LAST.pt --jacobian  # how far D looks: the correlation radius
    torchrun --nproc_per_node=K eval_gap.py runs/RUN     # the images are sharded over K processes

Each model's errors use the same evaluation images with one fixed noise draw each, so that curves of snapshots and
runs compare; guidance, a feature-space gap, the correlation radius and windows are options (`NOTES`). It writes one
`.npz` (`KEYS`), rewritten after every model, whose finished rows a rerun reuses.
"""
import argparse
import collections
import dataclasses
import itertools
import json
import math
import os
import warnings

import plumbing  # first: it sets OpenMP's wait policy, which torch reads when it loads
import common
import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from common import check

# the flags in detail, rendered into docs/reference.md
NOTES = """\
Splits: a snapshot's training subset (all of it when n <= `--num-images`, else a seeded sample) and the validation
split (`--num-images` of it, or all). Each image has one fixed noise draw, `common.image_noise(index,
seed=--seed)`, reused at every sigma and for every snapshot; training image i has index i and validation image j
has index len(training split) + j, so no training and validation image share a draw. Conditional networks get
their own labels: the dataset's classes, or k-means clusters (validation images go to the nearest stored
centroid). The noise levels are `--sigmas`, else `--num-sigmas` log-spaced in [2e-3, 80]. `--optimal` adds the
optimal denoiser of the snapshots' training subset, or, without snapshots, evaluates only the optimal denoiser of
the subset that `--data`, `--n`, `--resolution`, `--cond`, `--k` and `--subset-seed` name (drawn as
`train_image.py --seed` draws it). `--bootstrap` resamples of both splits' images give the interval of the peak of
G.

Guidance: with `--guidance-weights`, each model D is evaluated as D_w = D + w (D - D_neg) for each weight w, where
D_neg (`--neg`) is `uncond`, the same model with the null label (classifier-free guidance; it needs
class-conditional models), or a snapshot file: an unconditional network (classifier-free guidance as the paper's)
or a weaker one (autoguidance).

Feature space: with `--features` (`classifier`, `builtin` or an Inception TorchScript file,
`plumbing.load_feature_extractor`) also the reconstruction gap in that feature space (the paper's rFID): the
Fréchet distance between the features of D(y + sigma n) and of the clean images of each split, at
`--feature-sigmas` (`all`: every evaluated sigma). Both splits use equally many images (the first min(n,
`--num-images`) of each), since the distance's bias grows as 1/count; reconstructions and clean images are
quantized to 8 bits before the features (as FID tools do).

Correlation radius: with `--jacobian` (or `--jacobian-sigmas`), the radius in pixels of D(y + sigma n)
(`correlation_radius`: how far each output pixel looks into its channel of the input, from the channel-diagonal
blocks of the Jacobian), averaged over all output pixels (or `--jacobian-pixels` ones, seeded by `--seed`) and
channels and the first `--jacobian-images` images of each split, with fresh noise at each sigma (`radius_noise`).
The defaults are the authors' settings: 16 sigmas log-spaced in [2e-3, 80], 32 images per split, all pixels; they
evaluate the last snapshot (pass it alone). Snapshots only (the optimal denoiser's streaming code has no
gradients).

Restricted receptive field (`--windows`, docs/method.md): every model, its guidance negative included, also sees
only windows of the noisy image of each given size: `--window-steps` positions per axis, evenly spaced from edge
to edge, their predictions merged per pixel (`--window-mode average`: the mean over the windows that hold it;
`cut`: the window whose integer centre (top + bottom) // 2 is nearest). The optimal denoiser is then the windowed
one whose data are the training images cropped to the same window (`windowed_optimal_denoiser`); `--features`
works per window as well. U-Nets take only windows on their down-sampling grid, as the paper's: the window size
and every offset a multiple of 2^(levels - 1) (4 for every preset: 8 and 12 of 16x16 images, 16, 20, 24 and 28 of
32x32, with 2 positions), so that each crop goes in unpadded, in the place on the grid it had in the whole image
(`window_offsets`, `grid_windows`); the optimal denoiser alone takes any window. DiTs are refused, since their
position embeddings are fixed to the whole image.

Running: the networks' forward passes run as `--forward-mode` says: eager, or compiled (torch.compile; on CUDA
with one process in mode reduce-overhead, with CUDA graphs; an explicit compile that cannot work stops at the
start); auto compiles on CUDA with one process, runs eager otherwise, and goes on eager after one line when
compiling fails. `--precision` is the networks' arithmetic: bf16 autocast or float32 (auto: bf16 on CUDA and on
CPUs with bf16 units, as train_image.py; stored as chosen in `args` and the settings where a network runs); the
errors E, the optimal denoiser and the intervals stay float32/float64, and gradients (the correlation radius)
float32. `--batch` (image, sigma) pairs go through a forward pass at a time; `--threads 0` lets
`plumbing.choose_threads` choose. Snapshots of different runs are refused unless `--allow-mixed`.

Its default is `RUN_DIR/gap[-raw][-guided][-windows].npz` for a run folder,
`RUN_DIR/gap-SNAPSHOT[-raw][-guided][-windows].npz` for one snapshot file `RUN_DIR/SNAPSHOT.pt` (so that it leaves
the run's file alone), and `results/gap-optimal-<data>-r<R>-n<n>-<none|class|kmeans<k>>-seed<subset
seed>[-guided][-windows].npz` for `--optimal` alone; several run folders or snapshot files need `--out`. `--out`
is rewritten after every evaluated model, and rows already in it computed with the same settings (by an earlier or
a killed run) are reused unless `--force`; an `--out` that eval_gap.py did not write (another script's result, a
foreign file), made with other settings or holding rows of models not given here is not replaced unless `--force`
(`plumbing.check_kept`, which names a free file name), and one process at a time writes it (`plumbing.exclusive`).
"""
# The keys of --out (C models, S sigmas, K feature sigmas, J radius sigmas), rendered into docs/reference.md
KEYS = {
    'sigmas': '(S,) the noise levels',
    'images_seen, checkpoints, digests': '(C,) of each snapshot: images seen, path, `plumbing.snapshot_digest`',
    'run_args, network, params':
        "the first snapshot's training arguments and network config (JSON) and parameter count",
    'weights, args, eval_settings, code, script, format':
        '`--weights`; the arguments and the settings that change the numbers (JSON); the code identity (JSON, '
        '`plumbing.code_identity`); the script; the file format',
    'e_train, e_val, gap': '(C, S) E_train(sigma), E_val(sigma) and G(sigma)',
    'gap_ci': '(C, S, 2) the pointwise 95% percentile bootstrap interval of G over the evaluation images',
    'onset_images_seen': '(S,) the images seen where E_val(sigma) is smallest',
    'peak_sigma, peak_gap, peak_gap_ci':
        '(C,), (C,), (C, 2) the sigma where G is largest, its value and its 95% interval over the evaluation '
        'images',
    'KEY_optimal, optimal_digest':
        'with `--optimal`: the per-model keys of the optimal denoiser ((1, ...)); without snapshots it is the '
        'only row (`images_seen` 0, checkpoint `optimal`); its E_train is 0 or at the rounding level of E_val '
        '(`ROUNDING`) at small sigma, where its G is inf',
    'feature_sigmas, fd_train, fd_val, feature_gap, feature_space':
        'with `--features`: (K,), (C, K) (and `_optimal`), which features',
    'jacobian_sigmas, radius_train, radius_val': 'with `--jacobian`: (J,), (C, J)',
    'guidance_weights': 'with `--guidance-weights`: (G,); every per-model array gains a leading axis (G, ...)',
    'windows':
        'with `--windows`: (W,) the window sizes, smallest first, the whole image R last (its rows are the '
        'unrestricted ones); every per-model array (`onset_images_seen` and `peak_sigma` too) gains a leading '
        'window axis before the guidance axis (W, [G,] ...)',
}
SCRIPT = os.path.basename(__file__)  # stored in the result file (plumbing.save_npz)
# Arguments that change the numbers of a row; a cached row is reused only when they all match.
SETTINGS = ("num_images", "seed", "guidance_weights", "neg", "features", "feature_sigmas", "data_dir", "bootstrap")
# ... and, only when their option is given, these
OPTIONAL_SETTINGS = {"windows": ("windows", "window_steps", "window_mode"),
                     "jacobian_sigmas": ("jacobian_sigmas", "jacobian_images", "jacobian_pixels")}
JACOBIAN_SIGMAS = 16  # the authors' radius: 16 sigmas log-spaced in [2e-3, 80]
ROW_KEYS = ("e_train", "e_val", "peak_gap_ci", "gap_ci", "fd_train", "fd_val", "radius_train", "radius_val")
ROUNDING = np.finfo(np.float64).eps  # E_train at most this share of E_val is rounding: G is inf there

# this process's shard; count: images of all processes; fd: the shard's images in the Frechet subset
Split = collections.namedtuple("Split", "y noise labels count fd index")  # index: dataset indices (CPU)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],  # the docstring's first paragraph
                                epilog="Flags and result keys in full: docs/reference.md",
                                formatter_class=plumbing.HelpFormatter)
    p.add_argument("snapshots", nargs="*", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="run folders (all their snapshot-*.pt, by images seen) or snapshot files")
    plumbing.add_weights_arg(p)
    p.add_argument("--optimal", action="store_true", help="also (without snapshots: only) the optimal denoiser of "
                   "the snapshots' training subset, or of the subset --data, --n, ... name")
    plumbing.add_data_args(p, applies="--optimal alone: ")
    p.add_argument("--num-images", type=plumbing.at_least_two_int, default=8192,
                   help="images per split (or all available)")
    p.add_argument("--sigmas", type=plumbing.sigma_float, nargs="+", default=None, help="noise levels (default: "
                   "--num-sigmas log-spaced in [2e-3, 80])")
    p.add_argument("--num-sigmas", type=plumbing.positive_int, default=64, help="number of log-spaced noise levels")
    p.add_argument("--guidance-weights", type=plumbing.finite_float, nargs="+", default=None,
                   help="guidance weights w: D_w = D + w (D - D_neg); adds a leading axis")
    p.add_argument("--neg", default="uncond", help="guidance negative D_neg: uncond (the model with the null label) "
                   "or a snapshot file")
    p.add_argument("--features", default=None, help="also the reconstruction gap in a feature space: classifier, "
                   "builtin or an Inception TorchScript file")
    p.add_argument("--feature-sigmas", nargs="+", default=["0.25", "0.5", "1", "2", "4"],
                   help="noise levels of the feature-space gap, or 'all' (every evaluated sigma)")
    p.add_argument("--jacobian", action="store_true",
                   help="also the snapshots' correlation radius (how far D looks), at "
                        f"{JACOBIAN_SIGMAS} sigmas log-spaced in [2e-3, 80]")
    p.add_argument("--jacobian-sigmas", type=plumbing.sigma_float, nargs="+", default=None,
                   help="the radius at these noise levels instead (implies --jacobian)")
    p.add_argument("--jacobian-images", type=plumbing.positive_int, default=32,
                   help="--jacobian: images per split (the first evaluation images)")
    p.add_argument("--jacobian-pixels", type=plumbing.positive_int, default=None,
                   help="--jacobian: output pixels per image, seeded by --seed (default: all)")
    p.add_argument("--windows", type=plumbing.positive_int, nargs="+", default=None, metavar="PIXELS",
                   help="also evaluate every model seeing only windows of these sizes (U-Nets: on their "
                        "down-sampling grid, e.g. 8 12 at 16x16); adds a leading window axis")
    p.add_argument("--window-steps", type=plumbing.positive_int, default=2,
                   help="--windows: window positions per axis, evenly spaced")
    p.add_argument("--window-mode", choices=WINDOW_MODES, default="average",
                   help="--windows: merge the windows' predictions per pixel by average, or cut (the nearest "
                        "window's)")
    p.add_argument("--bootstrap", type=plumbing.positive_int, default=1000,
                   help="bootstrap resamples for the interval of the peak of G")
    plumbing.add_run_args(
        p, seed="seed of the images' fixed noise and of the splits' samples",
        batch=(512, "(image, sigma) pairs per forward pass"), threads=True,
        out="output .npz (default: RUN_DIR/gap[-raw][-guided][-windows].npz for a run folder; "
            "see docs/reference.md for the others)")
    plumbing.add_result_args(p, SCRIPT, "rows")
    args = p.parse_args(argv)
    check(args.snapshots or args.optimal, "nothing to evaluate: give run folders or snapshot files, "
                                          "and/or --optimal (see --help)")
    check(args.snapshots or not (args.jacobian or args.jacobian_sigmas), "--jacobian needs snapshots: the optimal "
          "denoiser has no correlation radius here (its code has no gradients)")
    if args.jacobian and not args.jacobian_sigmas:
        args.jacobian_sigmas = common.log_sigmas(JACOBIAN_SIGMAS).tolist()
    args.jacobian_sigmas = sorted(args.jacobian_sigmas) if args.jacobian_sigmas else None
    if args.feature_sigmas == ["all"]:
        args.feature_sigmas = "all"
    else:
        try:
            args.feature_sigmas = [plumbing.sigma_float(s) for s in args.feature_sigmas]
        except argparse.ArgumentTypeError as err:
            raise common.UserError(f"--feature-sigmas takes noise levels or 'all': each {err}") from None
    return args


# ---------------------------------------------------------------------------
# The gap, the onset and the peak (docs/method.md, "Formulas")
# ---------------------------------------------------------------------------

def relative_gap(e_train, e_val):
    """Relative generalization gap G(sigma) = (E_val - E_train) / E_train; inf where E_train is 0 or at the
    rounding level of E_val (at most ROUNDING E_val), as for the optimal denoiser at small sigma, whose E_train
    of about 1e-270 would otherwise give G of about 1e267."""
    e_train, e_val = np.asarray(e_train, np.float64), np.asarray(e_val, np.float64)
    e_train = np.where(e_train <= ROUNDING * np.abs(e_val), 0.0, e_train)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (e_val - e_train) / e_train


def overfitting_onset(images_seen, e_val):
    """Overfitting onset per sigma: the images seen of the checkpoint where E_val(sigma) is smallest
    (first one on ties; NaN rows ignored). e_val (..., C, S) -> (..., S)."""
    e_val = np.asarray(e_val, np.float64)
    best = np.where(np.isnan(e_val), np.inf, e_val).argmin(axis=-2)
    return np.asarray(images_seen)[best]


def peak_gap(gap):
    """The largest finite value of G(sigma) (common.peak_index; NaN when none is finite). gap (..., S) -> (...)."""
    gap = np.asarray(gap, np.float64)
    peak = np.take_along_axis(gap, common.peak_index(gap)[..., None], axis=-1)[..., 0]
    return np.where(np.isfinite(peak), peak, np.nan)


def gap_intervals(err_train, err_val, n_boot=1000, seed=0, level=0.95):
    """Percentile bootstrap intervals of the peak of G over sigma and of G at each sigma, from the per-image errors
    (S, N_train) and (S, N_val) of one model: each resample draws both splits' images with replacement (the same
    images at every sigma) and takes the resampled means' G(sigma) and its largest finite value. Returns
    (peak (2,), pointwise (S, 2)) as (low, high) pairs; NaN where no resample has a finite value (E_train = 0)."""
    rng, peaks, curves = np.random.default_rng(seed), [], []
    errs = [np.asarray(e, np.float64) for e in (err_train, err_val)]
    rows = max(1, 2 ** 22 // max(e.shape[1] for e in errs))
    for start in range(0, n_boot, rows):
        count = min(rows, n_boot - start)
        # multinomial counts instead of index arrays: (count, N) weights, never (S, count, N)
        e_train, e_val = (e @ rng.multinomial(e.shape[1], np.full(e.shape[1], 1 / e.shape[1]), count).T
                          / e.shape[1] for e in errs)
        curves.append(relative_gap(e_train, e_val).T)                   # (count, S)
        peaks.append(peak_gap(curves[-1]))
    quantiles = [(1 - level) / 2, (1 + level) / 2]

    def interval(values):  # (n_boot, ...) -> (..., 2), over the finite values only
        values = np.where(np.isfinite(values), values, np.nan)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # All-NaN slices: NaN, as documented
            return np.moveaxis(np.nanquantile(values, quantiles, axis=0), 0, -1)
    return interval(np.concatenate(peaks)), interval(np.concatenate(curves))


def peak_sigma(sigmas, gap):
    """The sigma where the gap G(sigma) is largest (common.peak_index: finite values only). gap (..., S) -> (...)."""
    return np.asarray(sigmas)[common.peak_index(gap)]


# ---------------------------------------------------------------------------
# Snapshots, sources (what a model was trained on) and evaluation images
# ---------------------------------------------------------------------------

def read_snapshot(path, weights="ema", data_dir=None):
    """Metadata of a snapshot: path, images seen, run identity, network config, source (plumbing.TrainingSource;
    data_dir None: the run's) and a digest of everything its rows depend on (the `weights` and the source)."""
    ckpt = plumbing.load_checkpoint(path)
    return dict(path=path, images_seen=int(ckpt["images_seen"]), run=plumbing.run_identity(ckpt),
                network=ckpt["network"], source=plumbing.TrainingSource.of_checkpoint(ckpt, data_dir, path),
                params=sum(int(t.numel()) for t in ckpt[plumbing.WEIGHTS[weights]].values()),
                digest=plumbing.snapshot_digest(ckpt, weights))


def split_counts(source, num_images):
    """Number of training and validation evaluation images of a source."""
    val_images, _ = plumbing.load_images(source.dataset, "val", source.data_dir)
    return min(num_images, len(source.subset)), min(num_images, len(val_images))


def leading(count, length, rank=0, world=1, device="cpu"):
    """Positions in this process's shard (`length` images; its image j is image rank + world j of the split)
    of the split's first `count` images."""
    return torch.as_tensor(np.flatnonzero(rank + world * np.arange(length) < count), device=device)


def eval_splits(source, num_images, seed, rank=0, world=1, device="cpu"):
    """This process's shard of the training and validation evaluation images of a source (num_images of each,
    or all; a seeded sample when there are more): images, their fixed noise (seeded by dataset index and
    `seed`; validation image j is index len(training split) + j), labels."""
    train_images, _ = plumbing.load_images(source.dataset, "train", source.data_dir)
    val_images, val_classes = plumbing.load_images(source.dataset, "val", source.data_dir)
    subset, labels, R = source.subset, source.labels, source.resolution
    n_train, n_val = split_counts(source, num_images)
    pos = plumbing.choose_subset(len(subset), n_train, seed)[rank::world]
    val_index = plumbing.choose_subset(len(val_images), n_val, seed)[rank::world]
    y_train = plumbing.images_to_tensor(train_images[subset[pos]], R)
    y_val = plumbing.images_to_tensor(val_images[val_index], R)
    train_labels = None if labels is None else labels[pos]
    val_labels = source.validation_labels(val_classes[val_index], y_val)
    shape = y_train.shape[1:]

    fd_count = min(n_train, n_val)  # equally many images in both splits' Frechet distances

    def split(y, indices, c, count):
        noise = common.image_noise(indices, shape, seed)
        c = None if c is None else torch.as_tensor(np.asarray(c), dtype=torch.long).to(device)
        return Split(y.to(device), noise.to(device), c, count, leading(fd_count, len(y), rank, world, device),
                     torch.as_tensor(np.asarray(indices), dtype=torch.int64))
    return (split(y_train, subset[pos], train_labels, n_train),
            split(y_val, len(train_images) + val_index, val_labels, n_val))


# ---------------------------------------------------------------------------
# Restricted receptive field: windowed denoisers (docs/method.md, "Restricted receptive field")
# ---------------------------------------------------------------------------

WINDOW_MODES = ("average", "cut")  # how windowed_denoiser merges the windows' predictions (window_weights)


def window_offsets(size, window, steps=2, multiple=1):
    """Offsets of `steps` windows of `window` pixels along an image axis of `size` pixels: evenly spaced from
    0 to size - window (stride (size - window) / (steps - 1), rounded half up; a repeated offset counts once).
    UserError unless they cover every pixel and, for a network whose down-sampling grid has cells of `multiple`
    pixels (common.Denoiser.size_multiple), the window and its offsets lie on that grid (multiples of it), so
    that no crop needs padding (grid_windows lists the sizes that do)."""
    check(1 <= window <= size, f"a window must have 1 to {size} pixels (the image size), got {window}")
    check(steps >= 1, f"need at least one window position per axis, got {steps}")
    on_grid = lambda: ", ".join(map(str, grid_windows(size, multiple, steps))) or "none"  # noqa: E731
    check(window % multiple == 0, f"a window of {window} pixels is off the network's {multiple}-pixel down-sampling "
          f"grid; on it, with {steps} position(s) per axis of a {size}-pixel image: {on_grid()} pixels")
    offsets = _evenly_spaced(size, window, steps)
    needed = 1 + -(-(size - window) // window)                        # 1 + ceil((size - window) / window)
    check(offsets[-1] + window >= size and all(b - a <= window for a, b in zip(offsets, offsets[1:])),
          f"{steps} window position(s) per axis leave pixels of a {size}-pixel image outside every window of "
          f"{window} pixels: give at least {needed} positions per axis, or a larger window")
    check(not any(o % multiple for o in offsets), f"a window of {window} pixels at offsets "
          f"{', '.join(map(str, offsets))} is off the network's {multiple}-pixel down-sampling grid; on it, with "
          f"{steps} position(s) per axis of a {size}-pixel image: {on_grid()} pixels")
    return offsets


def _evenly_spaced(size, window, steps):
    """The offsets of window_offsets, unchecked."""
    return sorted({(2 * k * (size - window) + steps - 1) // (2 * (steps - 1)) for k in range(steps)}
                  if steps > 1 else {0})


def grid_windows(size, multiple, steps=2):
    """Window sizes below `size` whose `steps` evenly spaced offsets per axis (window_offsets) lie on a
    down-sampling grid of `multiple` pixels and cover the image: the windows a network with that size_multiple
    sees without padding (the U-Net presets: multiple 4, so with 2 positions 8 and 12 of 16 pixels and 16, 20, 24
    and 28 of 32)."""
    fits = []
    for window in range(multiple, size, multiple):
        offsets = _evenly_spaced(size, window, steps)
        if (all(o % multiple == 0 for o in offsets) and offsets[-1] + window >= size
                and all(b - a <= window for a, b in zip(offsets, offsets[1:]))):
            fits.append(window)
    return fits


def window_weights(shape, window, steps=2, mode="average", multiple=1):
    """Where each window sits and what share of each pixel it gives: the windows' corners [(top, left)], row by
    row, and weights (P, H, W) that sum to 1 at every pixel. "average": the windows that contain a pixel share
    it equally; "cut": it is taken whole from the window whose integer centre, ((top + bottom) // 2,
    (left + right) // 2) with bottom = top + window and right = left + window (past the window's last pixel), is
    nearest in L1 distance (the first, in corner order, on ties). window_offsets checks the windows (and the
    grid of `multiple` pixels)."""
    check(mode in WINDOW_MODES, f"window mode must be one of {', '.join(WINDOW_MODES)}, got {mode!r}")
    H, W = shape
    corners = [(t, l) for t in window_offsets(H, window, steps, multiple)
               for l in window_offsets(W, window, steps, multiple)]
    rows, cols = torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64)
    inside = torch.stack([((rows >= t) & (rows < t + window))[:, None] & ((cols >= l) & (cols < l + window))
                          for t, l in corners])                        # (P, H, W)
    if mode == "cut":
        centre = lambda start: (start + start + window) // 2  # noqa: E731  (top + bottom) // 2
        dist = torch.stack([(rows - centre(t)).abs()[:, None] + (cols - centre(l)).abs() for t, l in corners])
        owner = dist.masked_fill(~inside, math.inf).argmin(0)          # first on ties
        inside = owner == torch.arange(len(corners))[:, None, None]
    weights = inside.double()
    return corners, weights / weights.sum(0)


def windowed_denoiser(denoise, window, steps=2, mode="average", multiple=1):
    """Restricted receptive field: D sees only window x window crops of x, `steps` positions per axis
    (window_offsets), D_win(x)_p = sum_k a_kp D(crop_k x)_p with the weights a of window_weights (average over
    the windows holding pixel p, or "cut": the one whose centre is nearest). Returns denoise(x (B, C, H, W),
    sigma, labels=None); each crop keeps its image's sigma and label, and each call of D gets the crops of one
    window position (B of them), so memory stays that of the whole-image call. A window of the whole image
    gives D itself. For a network whose down-sampling needs sides that are multiples of `multiple`
    (common.Denoiser.size_multiple), only windows on that grid are accepted (window_offsets: the size and every offset
    multiples of it, as the paper's windows are), so every crop goes in as it is, in the place on the grid that it
    had in the whole image, and nothing is padded."""
    return _windowed(lambda top, left: denoise, window, steps, mode, multiple)


def windowed_optimal_denoiser(data, window, data_labels=None, steps=2, mode="average", note=None):
    """The memorizing reference under a restricted receptive field: windowed_denoiser where each window's
    denoiser is the optimal one of the data (N, ..., H, W) cropped to that window
    (common.labelled_optimal_denoiser: data in common.exact_dtype, conditional on data_labels when given; its
    notes go to note, default plumbing.say, once each, not once per window)."""
    made, note = {}, plumbing.once(note or plumbing.say)

    def at(top, left):
        if (top, left) not in made:
            crop = data[..., top:top + window, left:left + window].contiguous()
            made[top, left] = common.labelled_optimal_denoiser(crop, data_labels, note=note)
        return made[top, left]
    return _windowed(at, window, steps, mode)


def _windowed(denoiser_at, window, steps, mode, multiple=1):
    """The windowed denoiser of windowed_denoiser, with denoiser_at(top, left) the denoiser of each window."""
    check(window >= 1, f"windows must have at least 1 pixel a side, got {window}")
    check(mode in WINDOW_MODES, f"window mode must be one of {', '.join(WINDOW_MODES)}, got {mode!r}")

    def denoise(x, sigma, labels=None):
        corners, weights = window_weights(tuple(x.shape[-2:]), window, steps, mode, multiple)
        out = None
        for (top, left), a in zip(corners, weights):                    # float64 on the CPU (MPS has no float64)
            a = a[top:top + window, left:left + window]
            if not bool(a.any()):                                       # "cut": a window that owns no pixel
                continue
            den = denoiser_at(top, left)(x[..., top:top + window, left:left + window], sigma, labels)
            out = torch.zeros(x.shape, dtype=den.dtype, device=den.device) if out is None else out
            out[..., top:top + window, left:left + window] += a.to(den.dtype).to(den.device) * den
        return out
    return denoise


# ---------------------------------------------------------------------------
# Models: denoise(x, sigma (B,), labels (B,) or None = unconditional)
# ---------------------------------------------------------------------------

def optimal_models(source, device, windows=(None,), steps=2, mode="average"):
    """The optimal denoiser of the source's subset, exact (common.exact_dtype), conditional on its labels when
    it has them; images whose label no subset image carries get the unconditional one, with a note
    (common.labelled_optimal_denoiser). One per window size (None: the whole image), seeing only windows of
    that size, each with the subset cropped to the window (windowed_optimal_denoiser)."""
    images, note = source.images().to(device, common.exact_dtype(device)), plumbing.once(plumbing.say)
    return [common.labelled_optimal_denoiser(images, source.labels, note=note) if w is None
            else windowed_optimal_denoiser(images, w, source.labels, steps, mode, note) for w in windows]


def network_models(net, device, windows=(None,), steps=2, mode="average", forward_mode="auto", precision="auto"):
    """A network (common.Denoiser) for inference (plumbing.network_denoiser in --forward-mode `forward_mode` and
    --precision `precision`), seen through windows of each size (windowed_denoiser, on the grid of the network's
    size_multiple; None: the whole image)."""
    denoise = plumbing.network_denoiser(net, device, forward_mode, precision)
    return [denoise if w is None else windowed_denoiser(denoise, w, steps, mode, net.size_multiple)
            for w in windows]


def window_sizes(windows, steps, models):
    """The window axis of --windows: its sizes, smallest first, then the whole image R. UserError unless the
    models, given as (name, network config; for the optimal denoiser {"model": "optimal", "img_resolution": R}),
    make images of one size R, the windows are smaller than R, `steps` positions per axis cover the image, each
    window and offset lies on every U-Net's down-sampling grid (window_offsets), and no model is a DiT (its
    position embeddings are fixed to the whole image)."""
    sizes = sorted({config["img_resolution"] for _, config in models})
    check(len(sizes) == 1, f"--windows needs models of one image size, got {', '.join(map(str, sizes))} pixels")
    R = sizes[0]
    for name, config in models:
        check(config["model"] != "dit", f"--windows needs convolutional denoisers, but {name} is a DiT, whose "
              f"position embeddings are fixed to the whole {R}x{R} image: evaluate U-Net runs or the optimal denoiser")
    too_big = [w for w in windows if w >= R]
    check(not too_big, f"--windows must be smaller than the {R}x{R} images (the whole image is always evaluated, "
          f"as the last entry), got {', '.join(map(str, too_big))}")
    for w in windows:
        for name, config in models:
            unet = config["model"] == "unet"
            try:
                window_offsets(R, w, steps, grid_multiple(config) if unet else 1)
            except common.UserError as err:
                whose = f" for {name} (U-Net {config['size']} at {R}x{R})" if unet else ""
                raise common.UserError(f"--windows {w} with --window-steps {steps}{whose}: {err}") from None
    return sorted(set(windows)) + [R]


def grid_multiple(network):
    """The cell of a network config's down-sampling grid in pixels (common.Denoiser.size_multiple), from the
    network built without memory."""
    with torch.device("meta"):
        return common.build_network(**network).size_multiple


def counted(denoise, bar):
    """denoise that advances the progress bar by its batch size."""
    if bar is None:
        return denoise

    def fn(x, sigma, labels):
        out = denoise(x, sigma, labels)
        bar.update(len(x))
        return out
    return fn


# ---------------------------------------------------------------------------
# How far the denoiser looks: the correlation radius of the input Jacobian (docs/method.md)
# ---------------------------------------------------------------------------

def correlation_radius(denoise, x, sigma, labels=None, pixels=None, seed=0, batch_size=256):
    """How far D looks (the authors' measure): per image, the mean over output pixels p and channels c of the
    correlation radius r_pc = sum_q |p - q| J_pq / sum_q J_pq of the channel-diagonal block of the input Jacobian,
    J_pq = |dD(x)_{c,p} / dx_{c,q}| (input and output in the same channel c; the other channels' entries do not
    count), |p - q| the Euclidean distance of the pixel positions, in pixels, q over all pixels. p runs over all
    H W pixels (pixels None or >= H W) or over `pixels` positions drawn by plumbing.choose_subset(H W, pixels, seed),
    the same for every image.

    The rows J_p come from vector-Jacobian products with one-hot cotangents, one per (output pixel, channel),
    up to batch_size (image, cotangent) rows per backward pass; nothing larger than one pass's gradients is
    kept. denoise(x, sigma (B,), labels) must be differentiable torch code that treats images independently
    (as the networks and their plumbing.network_denoiser wrapper do). x (B, C, H, W), sigma float or (B,)
    -> float64 (B,); a (pixel, channel) whose row is all 0 (an output that does not depend on its channel of x)
    is left out of the mean.
    """
    check(x.ndim == 4, f"x must be images (B, C, H, W), got shape {tuple(x.shape)}")
    check((pixels is None or pixels >= 1) and batch_size >= 1,
          f"pixels and batch_size must be positive, got {pixels}, {batch_size}")
    B, C, H, W = x.shape
    per_pass = max(1, min(B, batch_size))                                            # images per forward pass
    with torch.inference_mode(False), torch.enable_grad():  # tensors made here are normal, even in inference mode
        chosen = H * W if pixels is None else min(pixels, H * W)
        where = torch.as_tensor(plumbing.choose_subset(H * W, chosen, seed), device=x.device)  # (P,) positions
        pos = torch.stack(torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij"), -1).reshape(-1, 2)
        dist = torch.cdist(pos.to(x.device)[where].double(), pos.to(x.device).double())  # (P, H W)
        K = len(where) * C                              # cotangent k: pixel k // C, channel k % C
        radius = torch.full((B, K), torch.nan, dtype=torch.float64, device=x.device)    # r_pc per image
        sig = common.per_query(sigma, x, "sigma").expand(B).clone()
        for i in range(0, B, per_pass):
            xi = x[i:i + per_pass].clone().requires_grad_(True)
            out = denoise(xi, sig[i:i + per_pass], None if labels is None else labels[i:i + per_pass].clone())
            check(out.requires_grad, "the denoiser gives no gradient with respect to its input: the correlation "
                  "radius needs differentiable torch code (not run under torch.no_grad or inference_mode)")
            check(out.shape == xi.shape, f"the denoiser maps {tuple(xi.shape)} to {tuple(out.shape)}, not to "
                  "images of the same shape")
            chunk = max(1, batch_size // len(xi))                                      # cotangents per pass
            for k0 in range(0, K, chunk):
                k = torch.arange(k0, min(k0 + chunk, K), device=x.device)
                p, c, rows = k // C, k % C, torch.arange(len(k), device=x.device)
                v = torch.zeros(len(k), len(xi), C, H * W, dtype=out.dtype, device=x.device)
                v[rows, :, c, where[p]] = 1                                            # one-hot at (c, p)
                grad, = torch.autograd.grad(out, xi, v.view(len(k), *out.shape), retain_graph=k0 + chunk < K,
                                            is_grads_batched=True)
                J = grad.flatten(3)[rows, :, c].abs().double()                         # (k, b, H W): channel c only
                num, den = (J * dist[p, None]).sum(-1), J.sum(-1)                       # (k, b)
                radius[i:i + per_pass, k0:k0 + len(k)] = torch.where(den > 0, num / den, torch.nan).T
        return radius.nanmean(1).cpu()


# ---------------------------------------------------------------------------
# Evaluation: E(sigma) per split and the feature-space reconstruction gap
# ---------------------------------------------------------------------------

def all_sum(tensor, world, device):
    """Sum of a tensor over all processes (the tensor itself with one process)."""
    if world == 1:
        return tensor
    total = tensor.to(device)
    dist.all_reduce(total)
    return total.cpu()


def split_errors(denoise, neg, split, sigmas, weights, batch, world=1, device="cpu", bar=None):
    """Per-image errors of E(sigma) (docs/method.md) on one split for each guidance weight, of the images of
    every process (in shard order): float64 (G, S, N); E(sigma) is their mean over images."""
    errors = torch.stack([
        common.denoising_errors(counted(common.guided_denoiser(denoise, neg, w), bar), split.y, split.noise,
                                sigmas, split.labels, batch)
        for w in weights])
    return plumbing.gather_rows(errors, world, device, dim=2).numpy()


def features_of(images, extractor, batch, world, device):
    """Features of a stack of images, in batches, gathered over processes: float64 (N, F)."""
    feats = [extractor(images[i:i + batch]).double().cpu() for i in range(0, len(images), batch)]
    return plumbing.gather_rows(torch.cat(feats), world, device)


def feature_distances(denoise, neg, split, clean, extractor, feature_sigmas, weights, batch, world=1,
                      device="cpu", bar=None):
    """Reconstruction gap in a feature space (the paper's rFID/rFDD): Frechet distance between the
    features of D(y + sigma n) and those of the clean images `clean`, per weight and sigma: (G, K)."""
    out = np.zeros((len(weights), len(feature_sigmas)))
    for g, w in enumerate(weights):
        for k, sigma in enumerate(feature_sigmas):
            feats, model = [], counted(common.guided_denoiser(denoise, neg, w), bar)

            def capture(x, s, labels):
                den = model(x, s, labels)
                feats.append(extractor(den.to(x.dtype)).double().cpu())
                return den
            common.denoising_errors(capture, split.y[split.fd], split.noise[split.fd], [sigma],
                                    None if split.labels is None else split.labels[split.fd], batch)
            out[g, k] = common.frechet_distance(plumbing.gather_rows(torch.cat(feats), world, device), clean)
    return out


def radius_noise(index, shape, seed, j):
    """The fresh noise of the correlation radius at its j-th sigma (the authors draw new noise at each sigma): one
    N(0, I) draw per image from a generator seeded by numpy's SeedSequence((seed, j + 1, dataset index)), so a
    stream of its own for every image and sigma, apart from the fixed draw of E(sigma) (common.image_noise), and
    the same for every snapshot and guidance weight: (len(index), *shape)."""
    seeds = [int(np.random.SeedSequence((seed, j + 1, int(i))).generate_state(1)[0]) for i in index]
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(s)) for s in seeds])


def split_radius(denoise, neg, split, sigmas, weights, images, pixels, seed, batch, rank=0, world=1, device="cpu",
                 bar=None):
    """Correlation radius of D(y + sigma n) in pixels (correlation_radius over all output pixels, or
    `pixels` seeded by `seed`), n fresh at each sigma (radius_noise), averaged over the first `images` images of a
    split (of all processes), per weight and sigma: (G, J)."""
    first = leading(images, len(split.y), rank, world, device)
    y, index = split.y[first], split.index[first.cpu()]
    labels = None if split.labels is None else split.labels[first]
    totals = torch.zeros(len(weights), len(sigmas), dtype=torch.float64)
    for j, sigma in enumerate(sigmas):
        x = y + sigma * radius_noise(index, y.shape[1:], seed, j).to(y.device, y.dtype)
        for g, w in enumerate(weights):
            model = common.guided_denoiser(denoise, neg, w)
            totals[g, j] = correlation_radius(model, x, sigma, labels, pixels, seed, batch).sum()
            if bar is not None:  # one vector-Jacobian product per image, output pixel and channel
                bar.update(len(first) * min(pixels or y[0, 0].numel(), y[0, 0].numel()) * y.shape[1])
    return (all_sum(totals, world, device) / min(images, split.count)).numpy()


class Evaluator:
    """Rows (e_train, e_val (W, G, S), fd_train, fd_val (W, G, K), radius_train, radius_val (W, G, J)) of models
    seen through W windows (W = 1: the whole image) on the evaluation images of their source; the images (and
    clean features) of the last source are kept for the next model. negs: the guidance negative seen through
    each window (None: the model itself with the null label, common.negative_denoiser)."""

    def __init__(self, sigmas, weights, negs, num_images, seed, batch, extractor=None, feature_sigmas=(), rank=0,
                 world=1, device="cpu", bar=None, jacobian_sigmas=(), jacobian_images=32, jacobian_pixels=None,
                 n_boot=1000):
        self.sigmas, self.weights, self.negs, self.num_images, self.seed, self.batch = (sigmas, weights, negs,
                                                                                        num_images, seed, batch)
        self.extractor, self.feature_sigmas = extractor, feature_sigmas
        self.jacobian_sigmas, self.jacobian_images, self.jacobian_pixels = (jacobian_sigmas, jacobian_images,
                                                                            jacobian_pixels)
        self.rank, self.world, self.device, self.bar, self.n_boot = rank, world, device, bar, n_boot
        self.source_key, self.splits, self.clean = None, None, None

    def load(self, source):
        key = source.digest() + str(source.data_dir)
        if key != self.source_key:
            self.splits = eval_splits(source, self.num_images, self.seed, self.rank, self.world, self.device)
            if self.extractor is not None:
                self.clean = [features_of(s.y[s.fd], self.extractor, self.batch, self.world, self.device)
                              for s in self.splits]
            self.source_key = key
        return self.splits

    def rows(self, models, source, jacobian=True):
        """models: the model seen through each window, one per entry of negs; jacobian False leaves out the
        radius (for models without gradients)."""
        splits, out = self.load(source), collections.defaultdict(list)
        for denoise, neg in zip(models, self.negs):
            neg = common.negative_denoiser(denoise, neg)
            errors = [split_errors(denoise, neg, split, self.sigmas, self.weights, self.batch, self.world,
                                   self.device, self.bar) for split in splits]
            for name, err in zip(("train", "val"), errors):
                out[f"e_{name}"].append(err.mean(-1))
            intervals = [gap_intervals(e_train, e_val, self.n_boot, self.seed) for e_train, e_val in zip(*errors)]
            out["peak_gap_ci"].append(np.array([peak for peak, _ in intervals]))
            out["gap_ci"].append(np.array([pointwise for _, pointwise in intervals]))
            if self.extractor is not None:
                for name, split, clean in zip(("train", "val"), splits, self.clean):
                    out[f"fd_{name}"].append(feature_distances(denoise, neg, split, clean, self.extractor,
                                                               self.feature_sigmas, self.weights, self.batch,
                                                               self.world, self.device, self.bar))
            if jacobian and len(self.jacobian_sigmas):
                for name, split in zip(("train", "val"), splits):
                    out[f"radius_{name}"].append(split_radius(
                        denoise, neg, split, self.jacobian_sigmas, self.weights, self.jacobian_images,
                        self.jacobian_pixels, self.seed, self.batch, self.rank, self.world, self.device, self.bar))
        return {key: np.stack(values) for key, values in out.items()}


# ---------------------------------------------------------------------------
# Reuse of rows already in --out
# ---------------------------------------------------------------------------

def eval_settings(args, sigmas, neg_digest):
    """Everything besides the model that changes a row's numbers."""
    optional = [key for option, keys in OPTIONAL_SETTINGS.items() if getattr(args, option) for key in keys]
    settings = {key: getattr(args, key) for key in SETTINGS + tuple(optional)}
    settings.update(sigmas=[float(s) for s in sigmas], neg=neg_digest)
    if args.precision is not None:  # a network runs (else --precision changes nothing)
        settings["precision"] = args.precision
    return json.loads(json.dumps(settings))


def with_model_axes(array, windowed, guided):
    """A per-model array of --out with its window and guidance axes, each of length 1 where the file has none:
    (W, G, ...)."""
    array = array if guided else np.expand_dims(array, 1 if windowed else 0)
    return array if windowed else array[None]


def without_model_axes(array, windowed, guided):
    """The inverse of with_model_axes: (W, G, ...) -> the array as --out holds it."""
    array = array if guided else array[:, 0]
    return array if windowed else array[0]


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def default_out(args):
    """--out when not given (see the module docstring)."""
    tags = ("-guided" if args.guidance_weights else "") + ("-windows" if args.windows else "")
    if not args.snapshots:
        subset = plumbing.subset_name(args.data, args.n, args.subset_seed, args.cond, args.k, args.resolution,
                                     args.cluster_space)
        return os.path.join("results", f"gap-optimal-{subset}{tags}.npz")
    return plumbing.default_result_path(args.snapshots, "gap", ("-raw" if args.weights == "raw" else "") + tags)


def image_shape(network):
    """(channels, resolution, resolution) of the images of a network config."""
    return network["img_channels"], network["img_resolution"], network["img_resolution"]


def negative_model(neg, weights, guidance_weights, models, device):
    """The guidance negative of --neg and its digest: None for 'uncond' (each model with the null label,
    common.negative_denoiser) or a snapshot's network (common.Denoiser); UserError unless it fits each of the
    models, given as (name, image shape, number of classes) (common.check_guidance)."""
    info = None if neg == "uncond" else read_snapshot(neg, weights)
    fits = None if info is None else (neg, image_shape(info["network"]), info["network"]["num_classes"])
    if fits is not None or any(guidance_weights):
        for name, shape, num_classes in models:
            common.check_guidance(name, shape, num_classes, fits)
    if info is None:
        return None, "uncond"
    return plumbing.load_denoiser(neg, weights, device)[0], info["digest"]


def curves(rows, windowed, guided, sigmas=None, images_seen=None):
    """Per-model rows (W, G, ...) stacked to (W, G, C, ...) (without windows or guidance, without that axis),
    with the gaps and, given the checkpoints' images seen, the onset and the peak sigma."""
    out = {k: without_model_axes(np.stack([r[k] for r in rows], axis=2), windowed, guided)
           for k in ROW_KEYS if k in rows[0]}
    out["gap"] = relative_gap(out["e_train"], out["e_val"])
    out["peak_gap"] = peak_gap(out["gap"])
    if "fd_train" in out:
        out["feature_gap"] = relative_gap(out["fd_train"], out["fd_val"])
    if images_seen is not None:
        out["onset_images_seen"] = overfitting_onset(images_seen, out["e_val"])
        out["peak_sigma"] = peak_sigma(sigmas, out["gap"])
    return out


def main(argv=None):
    args = parse_args(argv)
    args.out = args.out or default_out(args)
    plumbing.check_writable(args.out)
    check(args.out.endswith(".npz"), f"--out must end with .npz, got {args.out}")
    plumbing.choose_threads(None, args.threads)
    with plumbing.exclusive(args.out):  # one process per result file: none loses another's rows
        plumbing.run_distributed(evaluate, args)


@dataclasses.dataclass
class Plan:
    """What one call evaluates, and how (plan)."""
    snapshots: list      # read_snapshot of each snapshot, in order of images seen
    optimal: object      # the TrainingSource of --optimal, or None
    sigmas: torch.Tensor
    weights: list        # the guidance weights; [0.0] without --guidance-weights
    restrictions: list   # the window sizes of --windows, None for the whole image (the last)
    negs: list           # the guidance negative seen through each window (None: the model with the null label)
    settings: dict       # eval_settings
    models: list         # (row key, TrainingSource, snapshot path or None for the optimal denoiser)


def plan(args, device):
    """The Plan of a call: its snapshots (of one run, unless --allow-mixed) and optimal denoiser, sigmas, guidance
    negative and windows, each checked against the others (UserError when they do not fit)."""
    snapshots = [read_snapshot(path, args.weights, args.data_dir) for path in plumbing.find_snapshots(args.snapshots)]
    plumbing.check_same_run([(s["path"], s["run"]) for s in snapshots], args.allow_mixed)
    networks = bool(snapshots) or args.guidance_weights is not None and args.neg != "uncond"
    args.precision = plumbing.choose_precision(args.precision, device) if networks else None  # as stored in --out
    optimal = None
    if args.optimal and snapshots:
        check(len({s["source"].digest() for s in snapshots}) == 1, "--optimal with snapshots of different training "
              "subsets or labels: evaluate the optimal denoiser of each run on its own")
        optimal = snapshots[0]["source"]
    elif args.optimal:
        optimal = plumbing.TrainingSource.drawn(args.data, args.n, args.subset_seed, args.cond, args.k, args.resolution,
                                                args.data_dir, args.cluster_space)
    sigmas = (torch.tensor(sorted(args.sigmas), dtype=torch.float64) if args.sigmas
              else common.log_sigmas(args.num_sigmas))
    args.feature_sigmas = sigmas.tolist() if args.feature_sigmas == "all" else args.feature_sigmas
    neg, neg_digest = None, "uncond"
    if args.guidance_weights is not None:
        made = [(s["path"], image_shape(s["network"]), s["network"]["num_classes"]) for s in snapshots]
        made += [] if optimal is None else [(f"the optimal denoiser of --data {optimal.dataset} --resolution "
                                             f"{optimal.resolution} --cond {optimal.cond}", optimal.image_shape,
                                             optimal.num_classes)]
        neg, neg_digest = negative_model(args.neg, args.weights, args.guidance_weights, made, device)
    if args.windows is not None:
        kinds = [(s["path"], s["network"]) for s in snapshots]
        kinds += [] if optimal is None else [("the optimal denoiser", dict(model="optimal",
                                                                           img_resolution=optimal.resolution))]
        kinds += [] if neg is None else [(f"--neg {args.neg}", neg.config)]
        args.windows = window_sizes(args.windows, args.window_steps, kinds)
    restrictions = args.windows[:-1] + [None] if args.windows is not None else [None]
    negs = ([None] * len(restrictions) if neg is None else
            network_models(neg, device, restrictions, args.window_steps, args.window_mode, args.forward_mode,
                           args.precision))
    models = [(s["digest"], s["source"], s["path"]) for s in snapshots]
    models += [] if optimal is None else [("optimal-" + optimal.content_digest(), optimal, None)]
    return Plan(snapshots, optimal, sigmas, args.guidance_weights or [0.0], restrictions, negs,
                eval_settings(args, sigmas, neg_digest), models)


def work(todo, plan, args, extractor, rank, world):
    """The progress bar's total for the models `todo` of this process: (image, sigma) pairs of the errors and the
    feature-space gap, and vector-Jacobian products of the correlation radius."""
    total, K = 0, len(args.feature_sigmas) if extractor is not None else 0
    for _, source, path in todo:
        counts = split_counts(source, args.num_images)
        count, fd_count = sum(len(range(rank, n, world)) for n in counts), len(range(rank, min(counts), world))
        total += len(plan.restrictions) * len(plan.weights) * (len(plan.sigmas) * count + K * 2 * fd_count)
        if path is not None and args.jacobian_sigmas:
            C, H, W = source.image_shape
            images = sum(len(range(rank, min(n, args.jacobian_images), world)) for n in counts)
            total += (len(plan.restrictions) * len(plan.weights) * len(args.jacobian_sigmas) * images
                      * min(args.jacobian_pixels or H * W, H * W) * C)
    return total


@torch.no_grad()  # not inference_mode: the correlation radius differentiates the models (and their weights)
def evaluate(args, rank, world, device):
    """Evaluate the models of the call that --out does not hold yet (plan, Evaluator), rewriting --out after each
    one, then print the summary."""
    say, windowed, guided = plumbing.say, args.windows is not None, args.guidance_weights is not None
    plumbing.check_compile(args.forward_mode, device, "--forward-mode")
    plumbing.earlier_result(args.out, SCRIPT, args.force)  # a file it must not replace stops it before any work
    p = plan(args, device)
    code = plumbing.code_identity(__file__, common.__file__, plumbing.__file__)
    cached = plumbing.reusable_rows(args.out, SCRIPT, args.force, p.settings, code, [key for key, *_ in p.models],
                                    (("", "digests"), ("_optimal", "optimal_digest")), ROW_KEYS.__contains__,
                                    windowed + guided, "row(s) of models not given here (other snapshots, or "
                                    "--optimal)", "eval_settings")
    rows = {key: {k: with_model_axes(v, windowed, guided) for k, v in row.items()} for key, row in cached.items()}
    todo = [model for model in p.models if model[0] not in rows]
    extractor = None  # one dataset and resolution: the models are of one run (check_same_run)
    if args.features:
        extractor = plumbing.load_feature_extractor(args.features, device, p.models[0][1])
        args.feature_space = extractor.description  # stored as feature_space
    say(f"{len(p.snapshots)} snapshot(s){' + the optimal denoiser' if p.optimal is not None else ''}: "
        f"{len(p.models) - len(todo)} reused from {args.out}, {len(todo)} to evaluate on {device}"
        f"{f' (networks in {args.precision})' if args.precision else ''}{f' ({world} processes)' if world > 1 else ''}")
    opt_key, done = p.models[-1][0] if p.optimal is not None else None, [0]
    plumbing.on_interrupt(lambda: f"after {done[0]} of {len(todo)} evaluations: {args.out} keeps the finished rows, "
                                  "which rerunning the same command reuses")

    def write():
        result = result_arrays(args, p.settings, code, p.sigmas, p.snapshots, opt_key, rows)
        if rank == 0 and result is not None:
            plumbing.save_npz(args.out, args=vars(args), script=SCRIPT, **result)
        return result
    with tqdm(total=work(todo, p, args, extractor, rank, world), unit="eval", unit_scale=True,
              disable=rank != 0 or not todo, dynamic_ncols=True) as bar:
        evaluator = Evaluator(p.sigmas, p.weights, p.negs, args.num_images, args.seed, args.batch, extractor,
                              args.feature_sigmas, rank, world, device, bar, args.jacobian_sigmas or (),
                              args.jacobian_images, args.jacobian_pixels, args.bootstrap)
        for i, (key, source, path) in enumerate(todo):
            bar.set_description(f"{i + 1}/{len(todo)} {os.path.basename(path) if path else 'optimal'}")
            models = (optimal_models(source, device, p.restrictions, args.window_steps, args.window_mode)
                      if path is None else
                      network_models(plumbing.load_denoiser(path, args.weights, device)[0], device, p.restrictions,
                                     args.window_steps, args.window_mode, args.forward_mode, args.precision))
            rows[key] = evaluator.rows(models, source, jacobian=path is not None)
            result, done[0] = write(), done[0] + 1  # after every model: a rerun after a kill reuses the finished rows
    if rank == 0:
        result = write() if not todo else result
        summarize(result, args.windows, p.weights if guided else None, p.snapshots, p.optimal is not None, say)
        say(f"wrote {args.out}: e_train, e_val, gap ({'x'.join(map(str, result['e_train'].shape))}), "
            "onset_images_seen, peak_sigma, peak_gap, peak_gap_ci, gap_ci" + (", *_optimal" if p.optimal is not None else "")
            + (", fd_train, fd_val, feature_gap" if extractor is not None else "")
            + (", radius_train, radius_val" if args.jacobian_sigmas else ""))


def result_arrays(args, settings, code, sigmas, snapshots, opt_key, rows):
    """The arrays of --out from the rows at hand: the snapshots that have one, in order, and the optimal
    denoiser (key opt_key) once it has one, as its only row without snapshots; None before any row."""
    windowed, guided, sig = args.windows is not None, args.guidance_weights is not None, sigmas.numpy()
    result = dict(sigmas=sig, weights=np.array(args.weights), eval_settings=np.array(json.dumps(settings)),
                  code=np.array(json.dumps(code, sort_keys=True)))
    if windowed:
        result["windows"] = np.array(args.windows, np.int64)
    if guided:
        result["guidance_weights"] = np.array(args.guidance_weights, np.float64)
    if args.features:
        result["feature_sigmas"] = np.array(args.feature_sigmas, np.float64)
        result["feature_space"] = np.array(args.feature_space)
    if args.jacobian_sigmas:
        result["jacobian_sigmas"] = np.array(args.jacobian_sigmas, np.float64)
    done, optimal = [s for s in snapshots if s["digest"] in rows], rows.get(opt_key)
    if done:
        result.update(images_seen=np.array([s["images_seen"] for s in done], np.int64),
                      checkpoints=np.array([s["path"] for s in done]),
                      digests=np.array([s["digest"] for s in done]),
                      run_args=np.array(json.dumps(snapshots[0]["run"], sort_keys=True, default=str)),
                      network=np.array(json.dumps(snapshots[0]["network"], sort_keys=True)),
                      params=np.int64(snapshots[0]["params"]))
        main_rows = [rows[s["digest"]] for s in done]
    elif snapshots or optimal is None:
        return None
    else:
        result.update(images_seen=np.zeros(1, np.int64), checkpoints=np.array(["optimal"]),
                      digests=np.array([opt_key]))
        main_rows = [optimal]
    result.update(curves(main_rows, windowed, guided, sig, result["images_seen"]))
    if optimal is not None:
        result.update({k + "_optimal": v for k, v in curves([optimal], windowed, guided).items()})
        result["optimal_digest"] = np.array([opt_key])
    return result


def summarize(result, windows, weights, snapshots, optimal, say):
    """One line per window size and guidance weight (None: no such axis): the last snapshot's peak gap, its
    sigma and the onset there; the optimal denoiser's peak gap and the sigmas where it memorizes
    (E_train < 1e-3); the last snapshot's correlation radii."""
    sigmas, windowed, guided = result["sigmas"], windows is not None, weights is not None
    for (v, window), (g, w) in itertools.product(enumerate(windows or [None]), enumerate(weights or [None])):
        at = lambda key: with_model_axes(result[key], windowed, guided)[v, g]  # noqa: E731
        pick = lambda key: at(key)[-1]  # noqa: E731  (last row)
        parts = [] if window is None else [f"{window}x{window} windows" if v < len(windows) - 1
                                           else f"whole {window}x{window} image"]
        parts += [] if w is None else [f"w = {w:g}"]
        if snapshots:
            seen, gap = result["images_seen"], pick("gap")
            j = common.peak_index(gap)
            onset = at("onset_images_seen")[j]
            low, high = pick("peak_gap_ci")
            parts.append(f"last snapshot ({seen[-1]:,} images seen): peak gap {gap[j]:.3g} [95% interval over the "
                         f"evaluation images {low:.3g}, {high:.3g}] at sigma {sigmas[j]:.3g}, "
                         f"where E_val is smallest at {onset:,} images seen"
                         + (" (no onset yet)" if len(seen) > 1 and onset == seen[-1] else ""))
        if optimal:
            gap, e_train = pick("gap_optimal"), pick("e_train_optimal")
            j = common.peak_index(gap)
            text = f"optimal denoiser: peak gap {gap[j]:.3g} at sigma {sigmas[j]:.3g}"
            exact = int(np.isposinf(gap).sum())
            if exact:
                text += (f" (G = inf at {exact} sigma(s), where E_train is 0 or at rounding level, at most "
                         f"{ROUNDING:.2g} E_val)")
            memorized = np.flatnonzero(np.cumprod(e_train < 1e-3))  # from the smallest sigma up
            if len(memorized):
                text += f", E_train < 1e-3 up to sigma {sigmas[memorized[-1]]:.3g}"
            parts.append(text)
        if "radius_train" in result:
            r_train, r_val = pick("radius_train"), pick("radius_val")
            parts.append("last snapshot's correlation radius in pixels (training / validation) at sigma " + ", ".join(
                f"{s:.3g}: {a:.2f} / {b:.2f}" for s, a, b in zip(result["jacobian_sigmas"], r_train, r_val)))
        say("; ".join(parts))


if __name__ == "__main__":
    plumbing.run_cli(main)
