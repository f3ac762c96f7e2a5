"""Generate samples, measure how many copy the training set, and where sampling trajectories go
(docs/method.md, claims 1 and 3: the optimal denoiser memorizes; trained denoisers overfit in the denoising
loss, yet their samples do not, because trajectories avoid the overfit regions).

    python sample_memorize.py runs/RUN                          # every snapshot of a run
    python sample_memorize.py runs/RUN/snapshot-000512000.pt --guidance-weights 0 1 2 --neg uncond
    python sample_memorize.py --optimal --data fashion-mnist --n 64 --resolution 16 --num-samples 256
    torchrun --nproc_per_node=K sample_memorize.py ...           # samples sharded by seed

A configuration is a denoiser (a snapshot, or a reference sampler of a training subset: `--optimal`
memorizes, `--gaussian` generalizes) and a guidance weight w. It writes one `.npz` (`KEYS`), rewritten after every
configuration, whose finished configurations a rerun reuses, and sample grids beside it; the flags in detail:
`NOTES`.
"""
import argparse
import collections
import dataclasses
import json
import math
import os
import time
from typing import Callable

import plumbing  # first: it sets OpenMP's wait policy, which torch reads when it loads, and the Ctrl-C hook
import common
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from common import check  # noqa: E402

# the flags in detail, rendered into docs/reference.md
NOTES = """\
A configuration is a denoiser and a guidance weight w. The denoiser is a snapshot (with its `--weights`), or a
reference sampler of a seeded training subset chosen exactly as train_image.py chooses it (`--data`, `--n`,
`--resolution`, `--cond`, `--k`, `--subset-seed`): its optimal denoiser (`--optimal`, which memorizes), or the
denoiser of a Gaussian (`--gaussian`, `gaussian_denoiser`, unconditional: a sampler that generalizes, the
reference that a memorization measure must tell apart from `--optimal`). `--gaussian-fit split` fits the Gaussian
to the whole training split (it knows nothing particular of the subset: its states are like fresh data); `subset`
fits it to the training subset (with n below the pixel count its covariance spans the subset's images, which pulls
its samples towards them). With `--guidance-weights`, D_w = D + w (D - D_neg), where D_neg (`--neg`) is `uncond`,
the same network with the null label (classifier-free guidance), or a snapshot file: an unconditional network
(classifier-free guidance as the paper's) or a weaker one (autoguidance); w = 0 is unguided.

Sampling: sample i starts from its own seed `--seed` + i (x_init ~ N(0, 80^2 I) and its label), so it is the same
whatever the batch size or number of processes, and is integrated by the deterministic Heun sampler of common.py
on the EDM grid of `--steps` steps (2 steps - 1 evaluations). `--label` conditions the samples: `random` (uniform
over the labels of the training subset, per seed), `null` (unconditional), or a label number. The networks'
forward passes run as `--forward-mode` says: eager, or compiled (torch.compile; on CUDA with one process in mode
reduce-overhead, with CUDA graphs; an explicit compile that cannot work stops at the start); auto compiles on CUDA
with one process, runs eager otherwise, and goes on eager after one line when compiling fails. `--precision` is
the networks' arithmetic: bf16 autocast or float32 (auto: bf16 on CUDA and on CPUs with bf16 units, as
train_image.py; stored as chosen in `args` and the settings where a network runs); the sampler's state, the
reference samplers, the LLR and the features stay float32/float64. `--batch` samples go through the sampler at a
time per process; `--threads 0` lets `plumbing.choose_threads` choose. Snapshots of different runs are refused
unless `--allow-mixed`.

Measures (docs/results.md, "Measures, and why they can fail"). Copies: a sample copies when d1/d2 < 1/3 to its
nearest and second-nearest distinct training image (`--bootstrap` resamples give the interval). Fréchet distances
in the `--features` space: `classifier` (a small CNN trained once on the dataset, cached), `builtin` (a fixed
random network) or the path of a TorchScript Inception-v3 (`plumbing.FEATURE_HELP`); inputs are quantized to 8
bits, as FID tools do. Where trajectories live: at the probe sigmas (`--probe-sigmas`, snapped to the sampler
grid; default: the grid sigma nearest 1.2 and its two neighbours), the log-likelihood ratio of the noisy training
subset's and validation reference's empirical distributions, under `--ref-draws` seeded draws of the references
(the validation reference, the held-out images, and the training reference where the subset is larger than the
validation reference): the trajectory measures are averaged over the draws, and their spread is part of the
intervals. Each snapshot is also probed where its gap peaks (`--gap`, default gap.npz in its run folder;
`--peak-sigma` in its place; `PEAK_RULES`), and the null images are scored beside the trajectory states. Early
stopping (`--stop-sigma`): the Fréchet distance of D(x_k; sigma_k) at the first grid sigma_k <= each value.

Writes `--out` (.npz; C configurations, M samples, D reference draws, P probe sigmas, T stop sigmas). Its default
is `RUN_DIR/memorize[-raw][-guided].npz` for a run folder, `RUN_DIR/memorize-SNAPSHOT[-raw][-guided].npz` for one
snapshot file `RUN_DIR/SNAPSHOT.pt` (so that it leaves the run's file alone), and
`results/memorize-<optimal|gaussian[-subset]>-<data>-r<R>-n<n>-<none|class|kmeans<k>>-seed<subset
seed>[-guided].npz` for `--optimal` or `--gaussian`; several run folders or snapshot files need `--out`.

Beside it, in the folder named like `--out` without `.npz`: `samples-CONFIG.png` (a grid of the first samples) and
`nn-CONFIG.png` (samples above their nearest training images, with their ratio). `--out` is rewritten after every
configuration, and configurations already in it made with the same settings (by an earlier or a killed run) are
reused unless `--force`; an `--out` that sample_memorize.py did not write (another script's result, a foreign
file), made with other settings or holding configurations not asked for here is not replaced unless `--force`
(`plumbing.check_kept`), and one process at a time writes it.
"""
# The keys of --out (C configurations, M samples, D reference draws, P probe sigmas, T stop sigmas), rendered
# into docs/reference.md
KEYS = {
    'args, script, format, code, settings':
        'the arguments, the script, the file format, the code identity and the arguments that change the numbers '
        '(JSON)',
    'configs, config_keys, digests, checkpoints, images_seen, guidance_weights':
        "(C,) per configuration: its name, its key (a digest of the model and w), the model's digest "
        "(`plumbing.snapshot_digest`, as eval_gap.py's, by which figures.py pairs the two), the snapshot path, "
        'images seen (-1: a reference sampler) and the weight w',
    'seeds, labels, samples, sampler_sigmas':
        '(M,), (C, M) (-1: unconditional), (C, M, channels, R, R) float16, the grid',
    'nn_ratio, d_train, d_val, nn_train_index':
        '(C, M): d1/d2 (`memorization_ratio`), d1 (the nearest training image), the distance to the nearest '
        "validation image, the nearest training image's index in the training split",
    'memorized_fraction, memorized_ci':
        '(C,), (C, 2): the share with `nn_ratio` < 1/3 and its 95% bootstrap interval',
    'fd_train, fd_val, fd_gap, fd_reference_size':
        '(C,): the Fréchet distance of the samples to `--fd-subsets` training subsets of the validation '
        "reference's size R (their mean), to the validation reference, (fd_val - fd_train) / fd_train, and R",
    'fd_noise, fd_shift, fd_gap_heldout':
        '(C,): the calibration baselines: FD between the validation reference and R other validation images '
        '(sampling noise), between training subsets and the validation reference (shift), and the gap of '
        '`--num-samples` held-out validation images (a sampler that generalizes perfectly)',
    'stop_sigmas, fd_stop_train, fd_stop_val, fd_stop_gap':
        '(T,), (C, T): the same for samples stopped early (jump to D at the first grid sigma <= each '
        '`--stop-sigma`)',
    'probe_sigmas': '(P,) the fixed probe sigmas (grid sigmas)',
    'llr_SET':
        '(C, D, P, M): log p_train(x | sigma) - log p_val(x | sigma) of the noisy reference images (per label '
        'when conditional: `llr_conditional` (C,)) under each reference draw, for SET = traj (trajectory states '
        'x_k), train and val (noisy training and validation reference images), heldout (noisy validation images '
        'in neither reference: fresh data) and null (other such images)',
    'traj_train_overlap, heldout_train_overlap, traj_train_score, traj_heldout_score, null_heldout_score':
        '(C, P), means over the draws, each with its 95% interval over samples and draws KEY_ci (C, P, 2): the '
        'share of trajectory states (of held-out images) whose LLR reaches the 10th percentile of the noisy '
        "training images'; (median llr_traj - median llr_val) / (median llr_train - median llr_val); (median "
        'llr_traj - median llr_heldout) / (median llr_train - median llr_heldout) (0: like fresh data, 1: like '
        'noisy training images); the same of the null images (0 up to chance)',
    'logp_traj, logp_heldout, traj_typical, traj_valid':
        "(C, P, M), (C, P): the log density of trajectory states and noisy held-out images under the first draw's "
        "pooled references; the share of states that reach the 1st percentile of the held-out images'; "
        'traj_typical >= 0.5 (a score means something only for states like noisy data)',
    'fcos_SET_train, fcos_SET_val, feature_space':
        "(C, P, M): the authors' measure, the 1-NN cosine similarity in `--features` space of D(x) to the "
        'training and to the validation 1-NN reference, for SET = traj, train, val; of the final samples '
        'fcos_samples_REF (C, M) and of the early-stopped ones fcos_stop_REF (C, T, M); which features',
    'nn_SET, cos_SET, dis_SET':
        "(C, P, M): in pixel space, D(x)'s distance to the nearest training image, its cosine similarity to it "
        'and the mean squared difference per pixel from the optimal denoiser at the same x',
    'peak_probe_sigma, feature_peak_probe_sigma, gap_peak_sigma, peak_probe_rule':
        "(C,): the grid sigmas of the peak probes (NaN: none), the gap's peak before snapping, the rule that "
        'chose it (`PEAK_RULES`)',
    'KEY_peak, KEY_peak_ci, KEY_feature_peak, KEY_feature_peak_ci':
        '(C, ...): each measure of PEAK_KEYS (the overlaps and scores with their intervals, traj_typical, '
        "traj_valid, fcos_SET_REF) at the peak probe and at the feature gap's peak probe (NaN, or False, where "
        'there is none)',
}
SCRIPT = os.path.basename(__file__)  # stored in the result file (plumbing.save_npz)
PROBE_NEAR = 1.2  # the paper's intermediate noise level for the trajectory overlap
TRAIN_SALT = 1_000_003  # added to a draw's seed for its training reference, so that it differs from the validation one
NULL_SALT, FCOS_SALT = 2_000_003, 3_000_017  # ... for the split of the held-out images and of the 1-NN references
TYPICAL_QUANTILE = 0.01  # states whose log density under the pooled reference reaches this quantile of fresh data's
# Arguments besides the model and w that change a configuration's numbers; cached configurations are
# reused only when they all match (with the --neg model's digest).
SETTINGS = ("num_samples", "steps", "label", "stop_sigma", "probe_sigmas", "features", "bootstrap", "fd_subsets",
            "ref_draws", "seed", "data_dir")
SHARED_KEYS = ("seeds", "sampler_sigmas", "stop_sigmas", "probe_sigmas", "settings", "code", "format", "args",
               "script")  # the rest: one row per config


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],  # the docstring's first paragraph
                                epilog="Flags and result keys in full: docs/reference.md",
                                formatter_class=plumbing.HelpFormatter)
    p.add_argument("inputs", nargs="*", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="run folders (all their snapshot-*.pt) or snapshot files written by train_image.py")
    p.add_argument("--optimal", action="store_true", help="sample the optimal denoiser of a training subset "
                   "(--data, --n, --resolution, --cond, --subset-seed) instead of snapshots")
    p.add_argument("--gaussian", action="store_true", help="sample the denoiser of a Gaussian fitted to "
                   "--gaussian-fit (a sampler that generalizes; unconditional)")
    p.add_argument("--gaussian-fit", default="split", choices=["split", "subset"],
                   help="--gaussian: fit it to the whole training split or to the training subset")
    plumbing.add_data_args(p, applies="--optimal, --gaussian: ")
    plumbing.add_weights_arg(p)
    p.add_argument("--num-samples", type=plumbing.at_least_two_int, default=1024,
                   help="samples per configuration (at least 2, for the Frechet distances)")
    p.add_argument("--steps", type=plumbing.at_least_two_int, default=18,
                   help="Heun sampler steps (EDM grid; 2 steps - 1 evaluations)")
    p.add_argument("--label", default="train", help="conditioning of the samples: train (as often as in the "
                   "training subset), random (its labels uniformly), null, or a label number")
    p.add_argument("--guidance-weights", type=plumbing.finite_float, nargs="+", default=[0.0],
                   help="guidance weights w: D_w = D + w (D - D_neg); 0 is unguided")
    p.add_argument("--neg", default="uncond", help="D_neg: uncond (the network with the null label) or a "
                   "snapshot file")
    p.add_argument("--stop-sigma", type=plumbing.positive_float, nargs="*", default=[5.0, 2.0, 1.0, 0.5, 0.2],
                   help="early stopping: FD of D(x_k; sigma_k) at the first grid sigma_k <= each value")
    p.add_argument("--probe-sigmas", type=plumbing.positive_float, nargs="+", default=None,
                   help="sigmas of the trajectory overlap, snapped to the grid (default: the grid sigma nearest "
                   f"{PROBE_NEAR} and its neighbours)")
    p.add_argument("--gap", default=None, help="eval_gap.py result whose peaks of G give each snapshot's peak probe "
                   "(default: gap.npz in its run folder, if there)")
    p.add_argument("--peak-sigma", type=plumbing.positive_float, default=None,
                   help="probe here instead of at the gap's peak (e.g. a reference sampler)")
    p.add_argument("--features", default="classifier", help="feature space of the Frechet distances and the 1-NN "
                   "cosine: classifier, builtin or a TorchScript Inception-v3 file")
    p.add_argument("--bootstrap", type=plumbing.positive_int, default=1000,
                   help="bootstrap resamples of the memorized fraction")
    p.add_argument("--ref-draws", type=plumbing.positive_int, default=5,
                   help="seeded draws of the LLR references that the trajectory measures average over")
    p.add_argument("--fd-subsets", type=plumbing.positive_int, default=10,
                   help="training subsets of the validation reference's size that fd_train averages over")
    plumbing.add_run_args(
        p, seed="sample i uses seed --seed + i; also the seed of probe and reference images and the bootstrap",
        batch=(256, "samples per batch (per process)"), threads=True,
        out="result .npz (default: RUN_DIR/memorize[-raw][-guided].npz for a run folder; see docs/reference.md "
            "for the others); figures go to the folder of that name without .npz")
    plumbing.add_result_args(p, SCRIPT, "configurations")
    args = p.parse_args(argv)
    check(args.optimal + args.gaussian + bool(args.inputs) == 1,
          "give run folders or snapshot files, or --optimal, or --gaussian (one of them)")
    check(not args.gaussian or args.cond == "none", "--gaussian fits one unconditional Gaussian: use --cond none")
    check(args.label in ("train", "random", "null") or args.label.isdigit(),
          f"--label must be train, random, null or a label number, got {args.label!r}")
    check(args.gap is None or os.path.isfile(args.gap), f"--gap {args.gap} does not exist: give an eval_gap.py "
          "result, or leave --gap out (gap.npz in each run folder, if there)")
    check(args.out is None or args.out.endswith(".npz"), f"--out must end with .npz, got {args.out}")
    check(args.neg == "uncond" or os.path.isfile(args.neg), f"--neg must be uncond or a snapshot file; "
          f"{args.neg} does not exist")
    return args


# ---------------------------------------------------------------------------
# Reference formulas (docs/method.md, "Formulas"): the Gaussian denoiser, noisy empirical densities, the LLR
# ---------------------------------------------------------------------------

def gaussian_denoiser(data):
    """The denoiser of a Gaussian fitted to data (mean mu, covariance C = V diag(l) V^T), a linear map that
    generalizes: D(x; sigma) = mu + V diag(l / (l + sigma^2)) V^T (x - mu). Returns D(x (B, ...), sigma)."""
    y = data.reshape(data.shape[0], -1).double()
    mu = y.mean(0)
    evals, evecs = torch.linalg.eigh(torch.cov(y.T).reshape(y.shape[1], -1))
    evals = evals.clamp_min(0)

    def denoise(x, sigma):
        sig = common.per_query(sigma, x, "sigma").double()
        q = x.reshape(x.shape[0], -1).double() - mu
        shrink = evals / (evals + sig[:, None] ** 2)                  # (B or 1, d)
        return (mu + ((q @ evecs) * shrink) @ evecs.T).to(x.dtype).reshape(x.shape)
    return denoise


def noisy_log_density(x, sigma, data, x_labels=None, data_labels=None, chunk_size=None):
    """log p_S(x | sigma) = log (1/|S|) sum_{y in S} N(x; y, sigma^2 I), the density of the set S = data
    after adding noise of std sigma (with labels: S holds the points with the query's label): (B,)."""
    sig = common.per_query(sigma, x, "sigma")
    check(bool((sig > 0).all()), "sigma must be positive")
    variance = sig.square()
    _, log2_sum = common.softmax_stream(x, variance, data, x_labels, data_labels, chunk_size, mean=False)
    q = x.reshape(x.shape[0], -1)
    count = torch.full_like(log2_sum, data.shape[0])
    if x_labels is not None:
        labels = torch.as_tensor(data_labels, device=q.device).flatten()
        present, per_label = labels.unique(return_counts=True)
        x_labels = torch.as_tensor(x_labels, device=q.device).flatten()
        count = per_label[torch.searchsorted(present, x_labels).clamp_max(len(present) - 1)].to(q.dtype)
    # the stream's logits leave out -||x||^2 / (2 s^2); log N(x; y, s^2 I) also has -d/2 log(2 pi s^2)
    return (math.log(2) * log2_sum - q.square().sum(1) / (2 * variance) - count.log()
            - q.shape[1] / 2 * torch.log(2 * math.pi * variance))


def log_likelihood_ratio(x, sigma, data_a, data_b, x_labels=None, labels_a=None, labels_b=None):
    """LLR(x) = log p_A(x | sigma) - log p_B(x | sigma) of two noisy empirical distributions
    (noisy_log_density): high where noisy points of A lie, low where those of B lie. (B,)"""
    return (noisy_log_density(x, sigma, data_a, None if labels_a is None else x_labels, labels_a)
            - noisy_log_density(x, sigma, data_b, None if labels_b is None else x_labels, labels_b))


# ---------------------------------------------------------------------------
# Training sets and denoisers
# ---------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class TrainingSet:
    """A training subset (what a denoiser learned from) and the validation split, loaded at its resolution."""
    source: plumbing.TrainingSource  # dataset, resolution, subset indices, labels, centroids
    x: torch.Tensor              # (N, C, R, R) float32 on the device
    labels: torch.Tensor | None  # (N,) conditioning labels as trained, or None
    val_x: torch.Tensor          # (V, C, R, R) the whole validation split
    val_labels: torch.Tensor | None
    distinct: torch.Tensor       # (U,) positions of the first copy of each distinct training image
    optimal: Callable            # its optimal denoiser (x, sigma, labels=None), exact (float64; float32 on MPS)

    @property
    def num_classes(self):
        """Labels are 0..num_classes-1; num_classes is the null label."""
        return self.source.num_classes


def load_training_set(source, device):
    """The training images of a source (plumbing.TrainingSource) with their labels, and the validation split
    labelled the way a denoiser trained on it reads it (classes, or the nearest k-means centroid)."""
    x = source.images()
    val_images, val_classes = plumbing.load_images(source.dataset, "val", source.data_dir)
    val_x = plumbing.images_to_tensor(val_images, source.resolution)
    val_labels = source.validation_labels(val_classes, val_x)
    _, inverse = torch.unique(x.flatten(1), dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), len(x)).scatter_reduce(0, inverse, torch.arange(len(x)), "amin")
    as_labels = lambda a: None if a is None else torch.tensor(np.asarray(a), dtype=torch.long, device=device)  # noqa: E731
    labels = as_labels(source.labels)
    optimal = common.labelled_optimal_denoiser(x.to(device, common.exact_dtype(device)), labels,
                                               null_label=source.num_classes, note=plumbing.say)
    return TrainingSet(source, x.to(device), labels, val_x.to(device), as_labels(val_labels),
                       first.sort().values.to(device), optimal)


@dataclasses.dataclass
class Model:
    """A denoiser D(x; sigma (B,), labels) and the training set it learned from."""
    name: str
    denoise: Callable
    train: TrainingSet
    num_classes: int
    dtype: torch.dtype
    path: str = ""
    images_seen: int = -1


def optimal_model(source, device, kind="optimal"):
    """The reference sampler `kind` (reference_kind) of a training subset (plumbing.TrainingSource): its optimal
    denoiser, or the denoiser of a Gaussian fitted to the subset's whole training split ('gaussian') or to the
    subset itself ('gaussian-subset')."""
    train = load_training_set(source, device)
    name = (f"{kind}-{source.dataset}-r{source.resolution}-n{len(source.subset)}"
            + ("" if source.cond == "none" else f"-{source.cond}"))
    denoise = train.optimal
    if kind != "optimal":
        fit = train.x if kind == "gaussian-subset" else plumbing.images_to_tensor(
            plumbing.load_images(source.dataset, "train", source.data_dir)[0], source.resolution).to(device)
        gauss = gaussian_denoiser(fit)
        denoise = lambda x, sigma, labels=None: gauss(x, sigma)  # noqa: E731
    return Model(name, denoise, train, source.num_classes, common.exact_dtype(device), path=kind)


def network_model(path, weights, data_dir, device, train_cache, mode="auto", precision="auto"):
    """A snapshot's network (plumbing.network_denoiser in --forward-mode `mode` and --precision `precision`) with
    its `weights` (ema or raw) and its training set (data_dir None: the run's; shared between snapshots of the
    same source through train_cache)."""
    net, ckpt = plumbing.load_denoiser(path, weights, device)
    num_classes = ckpt["network"]["num_classes"]
    source = plumbing.TrainingSource.of_checkpoint(ckpt, data_dir, path)
    key = source.digest() + str(source.data_dir)
    if key not in train_cache:
        train_cache[key] = load_training_set(source, device)
    run = os.path.basename(os.path.dirname(os.path.abspath(path)))
    denoise = plumbing.network_denoiser(net, device, mode, precision)
    return Model(f"{run}-{os.path.basename(path).removesuffix('.pt')}", denoise, train_cache[key], num_classes,
                 torch.float32, os.fspath(path), int(ckpt["images_seen"]))


# ---------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------

def label_choices(model, label):
    """Labels a sample may get, each as likely: those of the training images (train: so each label as often as
    in the training subset), the distinct ones (random), [null], [L]; None if unconditional."""
    if model.num_classes == 0:
        check(label in ("train", "random"), f"--label {label} needs a class-conditional denoiser, but {model.name} "
              "is unconditional")
        return None
    if label == "null":
        return [model.num_classes]
    present = sorted(set(model.train.labels.tolist()))
    if label == "train":
        return model.train.labels.tolist()
    if label == "random":
        return present
    check(int(label) in present, f"--label {label} does not occur in the training subset of {model.name} "
          f"(its labels: {present})")
    return [int(label)]


def initial_state(seeds, shape, choices, dtype, device):
    """x_init = 80 n and a label drawn uniformly from `choices`, each from its own seed's generator."""
    xs, labels = [], []
    for seed in seeds:
        g = torch.Generator().manual_seed(int(seed))
        xs.append(torch.randn(shape, generator=g) * common.SIGMA_MAX)
        if choices is not None:
            labels.append(choices[int(torch.randint(len(choices), (1,), generator=g))])
    labels = None if choices is None else torch.tensor(labels, dtype=torch.long, device=device)
    return torch.stack(xs).to(device, dtype), labels


def sample(denoise, x_init, labels, sigmas):
    """Heun sampler (common.sample_ode) from x_init: the samples and the trajectory record."""
    def d(x, s):
        return denoise(x, torch.full((len(x),), s, dtype=x.dtype, device=x.device), labels)
    return common.sample_ode(d, x_init, sigmas, return_trajectory=True)


def stop_steps(sigmas, stops):
    """Grid steps of the early stops, each once, in order: the first sigma_k <= s of each s (common.sample_ode's
    rule; on a coarse grid several stop sigmas share one)."""
    grid = sigmas[:-1]
    for s in stops:
        check(s >= float(grid[-1]), f"--stop-sigma {s} is below the smallest grid sigma {float(grid[-1]):.3g}")
    return sorted({int((grid <= s).nonzero()[0]) for s in stops})


def probe_steps(sigmas, probes):
    """Grid steps of the probe sigmas, nearest in log sigma; default: the one nearest 1.2 and its neighbours."""
    logs = sigmas[:-1].log()
    if probes is None:
        k = int((logs - math.log(PROBE_NEAR)).abs().argmin())
        return [i for i in (k - 1, k, k + 1) if 0 <= i < len(logs)]
    return sorted({int((logs - math.log(p)).abs().argmin()) for p in probes})


@dataclasses.dataclass(frozen=True, eq=False)
class Grid:
    """The sampler's noise levels and where on them the early stops and the probes lie."""
    sigmas: torch.Tensor  # (steps + 1,) common.edm_sigmas, ending in 0
    stops: list           # grid step of each --stop-sigma (stop_steps)
    probes: list          # grid steps of the probe sigmas (probe_steps)


@dataclasses.dataclass(frozen=True, eq=False)
class Sampling:
    """Which samples a configuration draws: sample i of num_samples starts from seed + i with --label `label`;
    this process draws those of `shard`."""
    num_samples: int
    seed: int
    shard: np.ndarray  # this process's share of 0..num_samples-1
    label: str         # random, null or a label number (label_choices)


# The peak probe: besides the fixed probe sigmas, each configuration is probed where its own gap peaks, as the
# authors probe each model (docs/method.md): at the grid sigma nearest the peak of G(sigma) from eval_gap.py, and
# nearest the peak of the feature-space gap where eval_gap.py measured one. PEAK_RULES says how the peak was found.
PEAK_SLOTS = ("peak", "feature_peak")  # result keys KEY_peak, KEY_feature_peak hold the measures there
PEAK_RULES = {"own": "its own peak of G, whose 95% interval there excludes 0",
              "later": "its own peak is not clear: the peak of the next later snapshot of its run whose peak is",
              "unclear": "no snapshot from it on has a clear peak: its own argmax of G still",
              "given": "--peak-sigma", "none": "no gap result of it: no peak probe"}


def gap_peaks(data, digest, weight=0.0):
    """Where the snapshot with this digest overfits most, from an eval_gap.py result `data` (a load_npz dict, or
    None): (the sigma where its G peaks, the rule of PEAK_RULES that chose it, the sigma where its feature-space
    gap peaks or NaN). The rows used are those of the whole image (without --windows) and of guidance weight
    `weight` (else w = 0); rule 'none' (NaN) when the file holds no such row of the snapshot."""
    none = (math.nan, "none", math.nan)
    if data is None or "digests" not in data:
        return none
    weights = [float(w) for w in data.get("guidance_weights", [weight])]
    g = weights.index(weight) if weight in weights else weights.index(0.0) if 0.0 in weights else None
    digests = [str(d) for d in data["digests"]]
    if g is None or digest not in digests:
        return none

    def rows(key):  # the snapshots' (C, ...) rows of a per-model array, whole image, weight g
        array = data[key][-1] if "windows" in data else data[key]
        return array[g] if "guidance_weights" in data else array
    c, gap, sigmas, seen = digests.index(digest), rows("gap"), data["sigmas"], data["images_seen"]
    ci = rows("gap_ci") if "gap_ci" in data else None
    run = [os.path.dirname(str(path)) for path in data["checkpoints"]]
    peak = lambda i: int(common.peak_index(gap[i]))  # noqa: E731
    clear = lambda i: ci is not None and np.isfinite(gap[i, peak(i)]) and ci[i, peak(i), 0] > 0  # noqa: E731
    later = [i for i in np.argsort(seen, kind="stable") if seen[i] > seen[c] and run[i] == run[c] and clear(i)]
    if clear(c):
        sigma, rule = sigmas[peak(c)], "own"
    elif later:
        sigma, rule = sigmas[peak(later[0])], "later"
    else:
        sigma, rule = sigmas[peak(c)] if np.isfinite(gap[c, peak(c)]) else math.nan, "unclear"
    feature = math.nan
    if "feature_gap" in data:
        fg = rows("feature_gap")[c]
        k = int(common.peak_index(fg))
        feature = float(data["feature_sigmas"][k]) if np.isfinite(fg[k]) else math.nan
    return float(sigma), rule, feature


def read_gap_result(path, explicit, say):
    """The eval_gap.py result at `path` (load_npz) for the peak probes, or None with one line saying why
    (no such file, another script's file, another version's); an explicit --gap that cannot be used is a
    UserError."""
    why = None
    if not os.path.isfile(path):
        why = "does not exist (eval_gap.py on the run writes it)"
    else:
        data = plumbing.load_npz(path)
        script, problem = plumbing.result_script(data), plumbing.format_problem(data)
        why = (f"is not an eval_gap.py result (it holds results of {script or 'another program'})"
               if script != "eval_gap.py" else problem)
    check(not (explicit and why), f"--gap {path} {why}: give an eval_gap.py result of the snapshots")
    if why:
        say(f"note: {path} {why}: probing the fixed sigmas only")
        return None
    return data


def nearest_step(sigmas, sigma):
    """The grid step whose sigma is nearest `sigma` in log sigma (probe_steps), or None for NaN."""
    return probe_steps(sigmas, [sigma])[0] if np.isfinite(sigma) else None


def peak_key(key, slot):
    """The result key of a measure at a peak probe: KEY_SLOT, and for an interval KEY_SLOT_ci."""
    return f"{key[:-3]}_{slot}_ci" if key.endswith("_ci") else f"{key}_{slot}"


def with_peak_probes(res, fixed, slots):
    """A configuration's results computed at the fixed probes and then at the extra probes of `slots` (one grid
    step or None per PEAK_SLOTS, in that order), as results at the fixed probes (arrays with a probe axis cut to
    the first `fixed`) and, for the measures in PEAK_KEYS, KEY_SLOT at each slot's probe (NaN, or False, where a
    slot has none)."""
    out, extra = dict(res), iter(range(fixed, fixed + sum(step is not None for step in slots)))
    at = {slot: next(extra) if step is not None else None for slot, step in zip(PEAK_SLOTS, slots)}
    for key, value in res.items():
        if key not in PROBED_KEYS:
            continue
        axis = 1 if key.startswith("llr_") else 0
        value = np.asarray(value)
        out[key] = np.take(value, range(fixed), axis=axis)
        if key not in PEAK_KEYS:
            continue
        for slot, index in at.items():
            out[peak_key(key, slot)] = (np.take(value, index, axis=axis) if index is not None else
                                    np.zeros(value.shape[1:], bool) if value.dtype == bool else
                                    np.full(value.shape[1:], np.nan))
    return out


def probe_images(count, candidates, seed):
    """Image (from `candidates`) and noise draw number of each of `count` probes: a seeded choice
    without repeats while there are enough images, else every image in turn with further draws."""
    if count <= len(candidates):
        return candidates[plumbing.choose_subset(len(candidates), count, seed)], np.zeros(count, np.int64)
    j = np.arange(count)
    return candidates[j % len(candidates)], j // len(candidates)


def noisy(images, dataset_index, draws, sigma):
    """y + sigma n with the fixed draws of common.image_noise (seeded by dataset index and draw number)."""
    noise = torch.empty_like(images)
    for draw in np.unique(draws):
        at = np.flatnonzero(draws == draw)
        noise[at] = common.image_noise(dataset_index[at], images.shape[1:], seed=int(draw)).to(images)
    return images + sigma * noise


# ---------------------------------------------------------------------------
# Copies (docs/method.md, "Formulas"): the memorization ratio and bootstrap intervals
# ---------------------------------------------------------------------------

COPY_RATIO = 1 / 3  # a generated sample is a copy when d1 / d2 < 1/3 (docs/method.md, "Formulas")
def memorization_ratio(d1, d2):
    """Memorization ratio of generated samples: d1 / d2, the distances to the nearest and the
    second-nearest DISTINCT training image (copy: ratio < COPY_RATIO = 1/3).

    Rules: measure d2 after removing exact duplicates from the training set (a copy of a duplicated
    image is still a copy, not d1 = d2 and ratio 1); 0 / 0 = 0 (an exact copy); with a single distinct
    training image there is no second one, d2 = inf and the ratio is 0 (every sample is attributed
    to that image). Returns float64 with d1's shape."""
    d1, d2 = torch.as_tensor(d1, dtype=torch.float64), torch.as_tensor(d2, dtype=torch.float64)
    check(d1.shape == d2.shape, f"d1 {tuple(d1.shape)} and d2 {tuple(d2.shape)} differ in shape")
    check(bool((d1 >= 0).all()) and bool((d2 >= d1).all()), "need 0 <= d1 <= d2 (nearest, then second nearest)")
    return torch.where(d2 > 0, d1 / d2, torch.zeros_like(d1))


def bootstrap_ci(values, statistic=np.mean, n_boot=1000, seed=0, level=0.95):
    """Percentile bootstrap interval (low, high) of statistic(values): n_boot resamples with
    replacement, seeded; statistic(x, axis=-1) reduces the last axis, like np.mean or np.median."""
    values = np.asarray(values, dtype=np.float64).ravel()
    check(values.size >= 1, "bootstrap_ci needs at least one value")
    check(n_boot >= 1 and 0 < level < 1, f"need n_boot >= 1 and 0 < level < 1, got {n_boot}, {level}")
    rng, n = np.random.default_rng(seed), values.size
    rows = max(1, 2 ** 22 // n)
    stats = np.concatenate([statistic(values[rng.integers(0, n, (min(rows, n_boot - b), n))], axis=-1)
                            for b in range(0, n_boot, rows)])
    low, high = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


# ---------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------

def batches(n, size):
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def memorization(samples, train):
    """d1, d2 to the nearest and second-nearest distinct training image, nn_ratio = d1/d2
    (memorization_ratio), and which training image is nearest."""
    distinct = train.x[train.distinct]
    dist, idx = common.nearest_neighbours(samples, distinct, k=min(2, len(distinct)))
    d2 = dist[:, 1] if dist.shape[1] > 1 else torch.full_like(dist[:, 0], math.inf)
    position = train.distinct[idx[:, 0]]
    return dict(d_train=dist[:, 0], d2=d2, nn_ratio=memorization_ratio(dist[:, 0], d2),
                nn_position=position, nn_train_index=torch.as_tensor(train.source.subset)[position.cpu()])


def overlap_stats(train, x, d, sigma, labels, batch):
    """For inputs x at noise level sigma and the model's D(x): distance of D to the nearest training
    image, cosine similarity to it, and the mean squared disagreement with the optimal denoiser at x."""
    dist, idx = common.nearest_neighbours(d, train.x, k=1)
    cos = F.cosine_similarity(d.flatten(1).double(), train.x[idx[:, 0]].flatten(1).double(), dim=1)
    sig = torch.tensor([sigma], device=x.device)
    opt = torch.cat([train.optimal(x[b], sig, None if labels is None else labels[b]) for b in batches(len(x), batch)])
    return dist[:, 0], cos, (d.double() - opt.double()).square().flatten(1).mean(1)


def probe_inputs(model, split, pool, shard, p_sigmas, num_samples, seed, null_label=False, device="cpu"):
    """This process's share `shard` of num_samples noisy images of a split ('train': the training subset,
    'val': the validation split) drawn from its positions `pool` (probe_images: seeded choice and noise draws),
    at every probe sigma: x (P, B, ...) and labels (None, the null label when null_label, or their own)."""
    train = model.train
    images, labels, split_index = ((train.x, train.labels, train.source.subset) if split == "train"
                                   else (train.val_x, train.val_labels, np.arange(len(train.val_x))))
    pos, draws = (a[shard] for a in probe_images(num_samples, pool, seed))
    at = torch.as_tensor(pos, device=device)
    lab = None
    if model.num_classes:
        lab = torch.full((len(pos),), model.num_classes, device=device) if null_label else labels[at]
    return torch.stack([noisy(images[at], split_index[pos], draws, s).to(model.dtype) for s in p_sigmas]), lab


def probe_sets(model, refs, shard, p_sigmas, denoise, num_samples, seed, null_label=False, batch=256, device="cpu"):
    """Noisy training and validation images drawn from the reference images `refs` (probe_inputs) with D(x)
    computed in batches: {'train': (x (P, B, ...), D(x) (P, B, ...), labels), 'val': ...}."""
    sets = {}
    for name, pool in (("train", refs.query_train_pos), ("val", refs.query_val_pos)):
        x, lab = probe_inputs(model, name, pool, shard, p_sigmas, num_samples, seed, null_label, device)
        ds = [torch.cat([denoise(x[p, b], torch.full((len(x[p, b]),), s, dtype=x.dtype, device=device),
                                 None if lab is None else lab[b]) for b in batches(x.shape[1], batch)]).float()
              for p, s in enumerate(p_sigmas)]
        sets[name] = (x, torch.stack(ds), lab)
    return sets


@torch.no_grad()
def run_configuration(model, denoise, ref_draws, features, grid, sampling, *, batch, device, show=False):
    """Everything per sample for this process's seeds seed + shard (of num_samples) with --label `label`
    (`sampling`), on the sampler grid `grid`, in batches: samples, memorization, features, features of the
    early-stopped samples, and where the trajectories live at the probe sigmas: D-based measures against the
    first reference draw (probe_sets), the LLR of every probe set under each draw of ref_draws (reference_draws),
    and the log density of trajectory states and noisy held-out images under the first draw's pooled references
    (the score's validity check)."""
    sigmas, stops, probes = grid.sigmas, grid.stops, grid.probes
    shard, seed, num_samples, label = sampling.shard, sampling.seed, sampling.num_samples, sampling.label
    refs = ref_draws[0]
    choices, shape, parts = label_choices(model, label), model.train.x.shape[1:], []
    for b in tqdm(batches(len(shard), batch), desc=model.name, unit="batch", disable=not show, leave=False):
        x_init, labels = initial_state(seed + shard[b], shape, choices, model.dtype, device)
        final, traj = sample(denoise, x_init, labels, sigmas)
        stopped = [features(traj["denoised"][k].float()) for k in stops]
        parts.append(dict(samples=final.float(), labels=labels, traj_x=traj["states"][probes],
                          traj_d=traj["denoised"][probes].float(),
                          stop_features=torch.stack(stopped) if stopped else torch.zeros(0, len(final), 0)))
    cat = lambda key, dim=0: torch.cat([p[key] for p in parts], dim)  # noqa: E731
    samples, labels = cat("samples"), None if choices is None else cat("labels")
    res = memorization(samples, model.train)
    res.update(samples=samples, labels=torch.full((len(shard),), -1) if labels is None else labels,
               d_val=common.nearest_neighbours(samples, model.train.val_x, k=1)[0][:, 0],
               features=features(samples), stop_features=cat("stop_features", 1))
    for ref in ("train", "val"):
        res[f"fcos_samples_{ref}"] = nearest_cosine(res["features"], refs.features[ref])
        res[f"fcos_stop_{ref}"] = torch.stack([nearest_cosine(f, refs.features[ref]) for f in res["stop_features"]]
                                              ) if len(stops) else torch.zeros(0, len(shard))
    p_sigmas, null = sigmas[probes].tolist(), label == "null"
    sets = dict(traj=(cat("traj_x", 1), cat("traj_d", 1), labels),
                **probe_sets(model, refs, shard, p_sigmas, denoise, num_samples, seed, null, batch, device))
    for name, (x, d, lab) in sets.items():
        stats = [overlap_stats(model.train, x[p], d[p], s, lab, batch) for p, s in enumerate(p_sigmas)]
        for i, kind in enumerate(("nn", "cos", "dis")):
            res[f"{kind}_{name}"] = torch.stack([st[i] for st in stats])
        feats = [features(d[p]) for p in range(len(p_sigmas))]
        for ref in ("train", "val"):
            res[f"fcos_{name}_{ref}"] = torch.stack([nearest_cosine(f, refs.features[ref]) for f in feats])
    # where trajectories live: the LLR of trajectory states, of noisy reference images, of noisy held-out
    # validation images (fresh data, where a perfectly generalizing sampler's states lie) and of other such images
    # (the null: scored like trajectory states, they must score 0) under each draw
    llr, traj = collections.defaultdict(list), (sets["traj"][0], sets["traj"][2])
    for draw in ref_draws:
        inputs = dict(traj=traj, **{name: probe_inputs(model, split, pool, shard, p_sigmas, num_samples, seed,
                                                       null, device)
                                    for name, split, pool in (("train", "train", draw.query_train_pos),
                                                              ("val", "val", draw.query_val_pos),
                                                              ("heldout", "val", draw.heldout_pos),
                                                              ("null", "val", draw.null_pos))
                                    if draw is not refs or name in ("heldout", "null")})
        if draw is refs:  # the first draw's noisy training and validation images are those of probe_sets
            inputs.update({name: (sets[name][0], sets[name][2]) for name in ("train", "val")})
        for name, (x, lab) in inputs.items():
            llr[name].append(torch.stack([draw.llr(x[p], s, lab, batch) for p, s in enumerate(p_sigmas)]))
        if draw is refs:  # do the states look like noisy data at all? (trajectory_typicality)
            for name in ("traj", "heldout"):
                res[f"logp_{name}"] = torch.stack([refs.log_density(inputs[name][0][p], s, batch)
                                                   for p, s in enumerate(p_sigmas)])
    res.update({f"llr_{name}": torch.stack(values) for name, values in llr.items()})  # (D, P, B)
    return {k: v.cpu() for k, v in res.items()}


# ---------------------------------------------------------------------------
# References: where trajectories live (LLR), feature-space overlap, Frechet baselines
# ---------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class References:
    """The training subset and as many validation reference images (per label when conditional): the
    pools of the probe images, the LLR's two noisy empirical distributions and the Frechet references; and the
    authors' 1-NN cosine references, half of the training reference and as many validation reference images,
    whose probe images come from the other halves, so that no probe's own image is in the reference it is
    compared with."""
    train: TrainingSet
    train_pos: np.ndarray         # (n,) positions in train.x: all of them (or R of them)
    val_pos: np.ndarray           # (R,) positions in train.val_x
    heldout_pos: np.ndarray       # validation images in neither reference: fresh data, the score's 0
    null_pos: np.ndarray          # other such images: scored like trajectory states, the score's exact null
    conditional: bool             # LLR per label (the query's label only)
    fcos_train_pos: np.ndarray    # half of train_pos: the 1-NN cosine reference of training images
    fcos_val_pos: np.ndarray      # as many of val_pos: that of validation images
    query_train_pos: np.ndarray   # the rest of train_pos: noisy training images probed
    query_val_pos: np.ndarray     # the rest of val_pos: noisy validation images probed
    features: dict = dataclasses.field(default_factory=dict)  # 'train', 'val': features of the 1-NN references

    @classmethod
    def split(cls, train, train_pos, val_pos, heldout_pos, conditional, seed):
        """References whose held-out images are split into seeded halves (held-out and null images) and whose
        training and validation references are split into a seeded 1-NN cosine reference and the probes' pool
        (half of the training reference, and as many validation images; a reference of one image is the pool)."""
        def halves(positions, count, salt):
            chosen = np.sort(positions[plumbing.choose_subset(len(positions), count, seed + salt)]) if count else \
                positions[:0]
            return chosen, np.setdiff1d(positions, chosen)
        heldout, null = halves(heldout_pos, len(heldout_pos) // 2 if len(heldout_pos) > 1 else 0, NULL_SALT)
        fcos_train, query_train = halves(train_pos, len(train_pos) // 2, FCOS_SALT)
        fcos_val, query_val = halves(val_pos, min(len(fcos_train), len(val_pos) - 1), FCOS_SALT + 1)
        return cls(train, train_pos, val_pos, null if len(heldout) == 0 else heldout, null, conditional,
                   fcos_train, fcos_val, query_train, query_val)

    def llr(self, x, sigma, labels, batch):
        """LLR(x) = log p_train(x | sigma) - log p_val(x | sigma) of the noisy reference images, (B,) float64
        (float32 on MPS). Conditional when the references are and the query has a label (not null)."""
        t, dtype = self.train, common.exact_dtype(x.device)
        ref_t, ref_v = t.x[self.train_pos].to(dtype), t.val_x[self.val_pos].to(dtype)
        lab_t = lab_v = None
        if self.conditional and labels is not None and bool((labels < t.num_classes).all()):
            lab_t, lab_v = t.labels[self.train_pos], t.val_labels[self.val_pos]
        return torch.cat([log_likelihood_ratio(
            x[b].to(dtype), sigma, ref_t, ref_v, None if lab_t is None else labels[b], lab_t, lab_v)
            for b in batches(len(x), batch)]).double()

    def log_density(self, x, sigma, batch):
        """log p(x | sigma) of both references' images pooled (noisy_log_density), (B,) float64:
        whether x looks like noisy data at all."""
        t, dtype = self.train, common.exact_dtype(self.train.x.device)
        pooled = torch.cat([t.x[self.train_pos], t.val_x[self.val_pos]]).to(dtype)
        return torch.cat([noisy_log_density(x[b].to(dtype), sigma, pooled)
                          for b in batches(len(x), batch)]).double()


def reference_pair(train, seed):
    """References (without features) of a training set, of equal size R per label: as many seeded validation
    images as the training subset holds (per label when the set is conditional and every label of the subset
    has validation images, else unconditional), at most half the validation split (per label), so that the
    other half stays out as held-out images; and the whole training subset, or a seeded subset of R of it
    when it holds more (docs/method.md: the LLR compares two empirical distributions of equal size). Another
    seed is another draw of both (--ref-draws)."""
    def pick(positions, count, salt):
        return np.sort(positions[plumbing.choose_subset(len(positions), count, seed + salt)])
    t_all, v_all = np.arange(len(train.x)), np.arange(len(train.val_x))
    if train.labels is not None and train.val_labels is not None:
        t_lab, v_lab = train.labels.cpu().numpy(), train.val_labels.cpu().numpy()
        counts = {c: min(int((t_lab == c).sum()), int((v_lab == c).sum()) // 2) for c in np.unique(t_lab)}
        if min(counts.values()) > 0:
            v_pos = np.sort(np.concatenate([pick(v_all[v_lab == c], r, int(c)) for c, r in counts.items()]))
            t_pos = np.sort(np.concatenate([pick(t_all[t_lab == c], r, TRAIN_SALT + int(c))
                                            for c, r in counts.items()]))
            held = np.setdiff1d(v_all[np.isin(v_lab, list(counts))], v_pos)  # labels of the subset only
            return References.split(train, t_pos, v_pos, held, True, seed)
    check(len(v_all) >= 2, f"the validation split has {len(v_all)} images: at least 2 are needed for a reference")
    R = min(len(t_all), len(v_all) // 2)
    v_pos = pick(v_all, R, 0)
    return References.split(train, pick(t_all, R, TRAIN_SALT), v_pos, np.setdiff1d(v_all, v_pos), False, seed)


def reference_draws(train, seed, draws):
    """`draws` seeded reference pairs (reference_pair with seeds seed, seed + 1, ...): the LLR measures are
    averaged over them, and their spread enters the intervals (overlap_intervals)."""
    return [reference_pair(train, seed + d) for d in range(draws)]


def nearest_cosine(feats, ref_feats, block=1024):
    """1-NN cosine similarity of each feature vector to a reference set (the authors' overlap measure): (M,)."""
    ref = F.normalize(ref_feats.double(), dim=1)
    q = F.normalize(feats.double(), dim=1)
    if len(ref) == 0:  # a training subset of one image has no 1-NN reference apart from the probes' pool
        return torch.full((len(q),), math.nan, dtype=torch.float64)
    return torch.cat([(q[i:i + block] @ ref.T).amax(1) for i in range(0, len(q), block)]) if len(q) else q[:, 0]


def frechet_references(refs, features, num_samples, subsets, seed):
    """Frechet references of a training set: features of `subsets` seeded training subsets of the
    validation reference's size R (fd_train averages over them) and of the validation reference;
    calibration baselines fd_noise = FD(validation reference, R other validation images) (sampling
    noise), fd_shift = mean FD(training subset, validation reference) (train/val shift) and
    fd_gap_heldout, the relative gap of num_samples held-out validation images (a sampler that
    generalizes perfectly); NaN where the validation split is too small. A training subset no larger than R
    is its own only subset of size R: it is used once."""
    t, R = refs.train, len(refs.val_pos)
    if len(t.x) <= R:
        subsets = 1
        plumbing.say(f"note: the training subset ({len(t.x)} images) is no larger than the validation reference "
                     f"({R}), so fd_train and the LLR use all of it: --fd-subsets and the training side of "
                     "--ref-draws have nothing to average")
    train_sets = [features(t.x[torch.as_tensor(plumbing.choose_subset(len(t.x), R, seed + k), device=t.x.device)])
                  for k in range(subsets)]
    at = lambda images, positions: features(images[torch.as_tensor(positions, device=t.x.device)])  # noqa: E731
    val_ref = at(t.val_x, refs.val_pos)
    refs.features.update(train=at(t.x, refs.fcos_train_pos), val=at(t.val_x, refs.fcos_val_pos))
    pool = np.union1d(refs.heldout_pos, refs.null_pos)  # every validation image in neither reference
    held = lambda count, salt: at(t.val_x, pool[plumbing.choose_subset(len(pool), count, seed + salt)])  # noqa: E731
    fd = lambda a, b: common.frechet_distance(a, b) if min(len(a), len(b)) >= 2 else math.nan  # noqa: E731
    noise = fd(val_ref, held(R, 1)) if len(pool) >= R else math.nan
    out = dict(train_sets=train_sets, val=val_ref, fd_noise=noise,
               fd_shift=float(np.mean([fd(s, val_ref) for s in train_sets])), fd_gap_heldout=math.nan)
    if len(pool) >= num_samples:
        out["fd_gap_heldout"] = frechet_gap(held(num_samples, 2), out)[2]
    return out


def frechet_gap(sample_feats, fd_refs):
    """fd_train (mean FD to the training subsets), fd_val (FD to the validation reference) and the
    relative gap (fd_val - fd_train) / fd_train; NaN when a set has fewer than 2 images."""
    if min(len(sample_feats), len(fd_refs["val"])) < 2:
        return math.nan, math.nan, math.nan
    fd_train = float(np.mean([common.frechet_distance(sample_feats, s) for s in fd_refs["train_sets"]]))
    fd_val = common.frechet_distance(sample_feats, fd_refs["val"])
    return fd_train, fd_val, (fd_val - fd_train) / fd_train if fd_train > 0 else math.nan


OVERLAP_KEYS = ("traj_train_overlap", "heldout_train_overlap", "traj_train_score", "traj_heldout_score",
                "null_heldout_score")


def trajectory_overlap(llr_traj, llr_train, llr_val, llr_heldout, llr_null):
    """Where trajectory states live at each probe sigma, from the LLR (..., M) of trajectory states and of
    noisy training, validation (reference), held-out validation and null images, as (...) arrays:
    traj_train_overlap, the share of trajectory states whose LLR reaches the 10th percentile of the
    noisy training images' (0.9 for a sampler whose states are noisy training images);
    heldout_train_overlap, the same share of noisy held-out images (what a sampler that generalizes
    perfectly reaches: its states are noisy fresh images); traj_train_score = (median LLR_traj - median
    LLR_val) / (median LLR_train - median LLR_val) (1: like noisy training images; about 0.5 for fresh
    data, which no reference holds); traj_heldout_score = (median LLR_traj - median LLR_heldout) /
    (median LLR_train - median LLR_heldout) (0: like fresh data, 1: like noisy training images);
    null_heldout_score, the same score of the null images (other fresh images) in place of the trajectory
    states: 0 by construction, up to the noise that the interval must hold."""
    traj, train, val, held, null = (torch.as_tensor(a, dtype=torch.float64)
                                    for a in (llr_traj, llr_train, llr_val, llr_heldout, llr_null))
    threshold = torch.quantile(train, 0.1, dim=-1, keepdim=True)
    med = lambda a: a.median(-1).values  # noqa: E731
    score = lambda a: ((med(a) - med(held)) / (med(train) - med(held))).numpy()  # noqa: E731
    return dict(traj_train_overlap=(traj >= threshold).double().mean(-1).numpy(),
                heldout_train_overlap=(held >= threshold).double().mean(-1).numpy(),
                traj_train_score=((med(traj) - med(val)) / (med(train) - med(val))).numpy(),
                traj_heldout_score=score(traj), null_heldout_score=score(null))


def overlap_intervals(llr_traj, llr_train, llr_val, llr_heldout, llr_null, n_boot=1000, seed=0, level=0.95):
    """Point values and percentile bootstrap intervals of the trajectory_overlap measures from the LLR
    (D, P, M) of each set under D reference draws: a point value is the mean over the draws; each
    bootstrap resample picks one draw at random and resamples every set's probes with replacement (the
    same trajectories or images at every probe sigma), so that the interval holds both the sampling noise
    of the M probes and the spread between reference draws. Returns {key: (P,), key_ci: (P, 2)}."""
    sets = [np.asarray(a, np.float64) for a in (llr_traj, llr_train, llr_val, llr_heldout, llr_null)]
    draws, probes = sets[0].shape[:2]
    rng, stats = np.random.default_rng(seed), {key: [] for key in OVERLAP_KEYS}
    rows = max(1, 2 ** 20 // (probes * max(a.shape[-1] for a in sets)))
    for start in range(0, n_boot, rows):
        count = min(rows, n_boot - start)
        pick = rng.integers(0, draws, count)
        resampled = [np.take_along_axis(a[pick], rng.integers(0, a.shape[-1], (count, 1, a.shape[-1])), axis=2)
                     for a in sets]
        for key, value in trajectory_overlap(*resampled).items():
            stats[key].append(value)
    out = {key: value.mean(0) for key, value in trajectory_overlap(*sets).items()}
    for key, values in stats.items():
        out[f"{key}_ci"] = np.quantile(np.concatenate(values), [(1 - level) / 2, (1 + level) / 2], axis=0).T
    return out


def trajectory_typicality(logp_traj, logp_heldout, quantile=TYPICAL_QUANTILE):
    """Do the trajectory states look like noisy data at all? The share of states (P, M) whose log density
    under the pooled references (References.log_density) reaches the `quantile` of the noisy held-out
    images' (about 1 - quantile for states like noisy fresh data; near 0 for states that look like nothing
    the references hold, whose LLR score says nothing about training vs validation): traj_typical (P,), and
    traj_valid (P,) = traj_typical >= 0.5."""
    logp_traj, logp_heldout = np.asarray(logp_traj, np.float64), np.asarray(logp_heldout, np.float64)
    typical = (logp_traj >= np.quantile(logp_heldout, quantile, axis=-1, keepdims=True)).mean(-1)
    return dict(traj_typical=typical, traj_valid=typical >= 0.5)


def summarize(res, fd_refs, n_boot, seed):
    """Memorized fraction with its bootstrap interval, Frechet distances and trajectory overlap (point values
    averaged over the reference draws, intervals over samples and draws) of one configuration."""
    copies = (res["nn_ratio"] < COPY_RATIO).double().numpy()
    low, high = bootstrap_ci(copies, n_boot=n_boot, seed=seed)
    fd_stop = [frechet_gap(f, fd_refs) for f in res["stop_features"]]
    return dict(memorized_fraction=float(copies.mean()), memorized_ci=(low, high),
                fd=frechet_gap(res["features"], fd_refs), fd_stop=np.array(fd_stop, np.float64).reshape(-1, 3),
                fd_baselines=(fd_refs["fd_noise"], fd_refs["fd_shift"], fd_refs["fd_gap_heldout"]),
                **overlap_intervals(res["llr_traj"], res["llr_train"], res["llr_val"], res["llr_heldout"],
                                    res["llr_null"], n_boot, seed),
                **trajectory_typicality(res["logp_traj"], res["logp_heldout"]))


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------

def save_grid(path, samples, cols=8):
    """The first cols^2 samples as one PNG grid with 1-pixel gaps, pixels enlarged to >= 64 per image."""
    grid = plumbing.image_grid(samples[:cols * cols], cols, gap=1, scale=max(1, 64 // samples.shape[-1]))
    plumbing.atomic_write(path, lambda f: plt.imsave(f, grid, cmap="gray", vmin=0, vmax=1, format="png"))


def save_neighbours(path, samples, nearest, ratio, title):
    """Samples (top) above their nearest training images (bottom), each titled with d1/d2."""
    count = len(samples)
    fig, axes = plt.subplots(2, count, figsize=(1.1 * count, 2.6), squeeze=False)
    for i in range(count):
        for row, img in enumerate((samples[i], nearest[i])):
            axes[row, i].imshow(plumbing.image_grid(img[None], 1), cmap="gray", vmin=0, vmax=1)
            axes[row, i].set_xticks([])
            axes[row, i].set_yticks([])
        axes[0, i].set_title(f"{ratio[i]:.2f}" + (" copy" if ratio[i] < COPY_RATIO else ""), fontsize=7)
    axes[0, 0].set_ylabel("sample", fontsize=8)
    axes[1, 0].set_ylabel("nearest\ntrain", fontsize=8)
    fig.suptitle(f"{title}: d1/d2 above each sample (a copy when < 1/3)", fontsize=9)
    try:
        plumbing.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
    finally:
        plt.close(fig)


def save_figures(out, name, res, train, count=12):
    folder = os.path.splitext(out)[0]
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, f"samples-{name}.png"), os.path.join(folder, f"nn-{name}.png")]
    save_grid(paths[0], res["samples"])
    save_neighbours(paths[1], res["samples"][:count], train.x[res["nn_position"][:count].to(train.x.device)].cpu(),
                    res["nn_ratio"][:count].numpy(), name)
    return paths


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

PROBE_SETS = ("traj", "train", "val")
FCOS_KEYS = tuple(f"fcos_{b}_{r}" for b in PROBE_SETS for r in ("train", "val"))
# per-sample results whose sample axis is the second (after probe sigmas or stop sigmas)
SAMPLE_AXIS_1 = ({"stop_features", "fcos_stop_train", "fcos_stop_val", "logp_traj", "logp_heldout"}
                 | {f"{a}_{b}" for a in ("nn", "cos", "dis") for b in PROBE_SETS}
                 | {f"fcos_{b}_{r}" for b in PROBE_SETS for r in ("train", "val")})
SAMPLE_AXIS_2 = {f"llr_{b}" for b in PROBE_SETS + ("heldout", "null")}  # (reference draws, probe sigmas, samples)
# results with a probe-sigma axis (the second for llr_*, else the first), and those also kept at the peak probes
PROBED_KEYS = ((SAMPLE_AXIS_1 - {"stop_features", "fcos_stop_train", "fcos_stop_val"}) | SAMPLE_AXIS_2
               | set(OVERLAP_KEYS) | {f"{key}_ci" for key in OVERLAP_KEYS} | {"traj_typical", "traj_valid"})
PEAK_KEYS = set(OVERLAP_KEYS) | {f"{key}_ci" for key in OVERLAP_KEYS} | {"traj_typical", "traj_valid"} | set(FCOS_KEYS)


def gather(local, world, device):
    """Per-sample results of all processes in seed order (on every process)."""
    return {key: plumbing.gather_rows(value, world, device, 2 if key in SAMPLE_AXIS_2 else int(key in SAMPLE_AXIS_1))
            for key, value in local.items()}


def reference_kind(args):
    """optimal, gaussian (fitted to the split) or gaussian-subset: the reference sampler of --optimal/--gaussian."""
    return ("gaussian" + ("" if args.gaussian_fit == "split" else "-subset")) if args.gaussian else "optimal"


def default_out(args):
    """--out when not given (see the module docstring)."""
    guided = "-guided" if any(args.guidance_weights) else ""
    if args.inputs:
        return plumbing.default_result_path(args.inputs, "memorize", ("-raw" if args.weights == "raw" else "") + guided)
    subset = plumbing.subset_name(args.data, args.n, args.subset_seed, args.cond, args.k, args.resolution,
                                     args.cluster_space)
    kind = reference_kind(args)
    return os.path.join("results", f"memorize-{kind}-{subset}{guided}.npz")


def model_key(ckpt, args, reference=None):
    """Digest of what a model's samples depend on besides the settings: a snapshot's network, weights and
    training subset (plumbing.snapshot_digest of a load_checkpoint dict, as eval_gap.py's digests), or (ckpt None)
    the reference sampler's kind and its subset `reference` with the images found for it."""
    if ckpt is None:
        return plumbing.digest(reference_kind(args), reference.content_digest())
    return plumbing.snapshot_digest(ckpt, args.weights)


def peak_probes(args, paths, digests, keys, sigmas, say):
    """{configuration key: (the sigma of the gap's peak, its rule, the grid steps of PEAK_SLOTS)} (gap_peaks) from
    --gap or the gap.npz of each snapshot's run folder (each file read once); a note where a file holds no row of
    a snapshot; --peak-sigma in place of the gap's peak."""
    files, out = {}, {}
    for path, digest, path_keys in zip(paths, digests, keys):
        data = None
        if path is not None:
            file = args.gap or os.path.join(os.path.dirname(os.path.abspath(path)), "gap.npz")
            if file not in files:
                files[file] = read_gap_result(file, args.gap is not None, say)
            data = files[file]
        for w, key in zip(args.guidance_weights, path_keys):
            sigma, rule, feature = gap_peaks(data, digest, float(w))
            if data is not None and rule == "none" and w == args.guidance_weights[0]:
                say(f"note: {file} holds no eval_gap.py row of {path} (made from other weights?): probing its fixed "
                    "sigmas only")
            if args.peak_sigma is not None:
                sigma, rule = args.peak_sigma, "given"
            out[key] = sigma, rule, (nearest_step(sigmas, sigma), nearest_step(sigmas, feature))
    return out


def same_probes(row, peak, sigmas):
    """Whether a cached configuration `row` was probed at the peak probes `peak` (peak_probes) asks for."""
    wanted = [math.nan if step is None else float(sigmas[step]) for step in peak[2]]
    had = [float(row.get(f"{slot}_probe_sigma", math.nan)) for slot in PEAK_SLOTS]
    return all(a == b or math.isnan(a) and math.isnan(b) for a, b in zip(had, wanted))


def main(argv=None):
    args = parse_args(argv)
    args.out = args.out or default_out(args)
    plumbing.check_writable(args.out)
    plumbing.check_writable(os.path.splitext(args.out)[0], folder=True, option="the figure folder of --out")
    plumbing.choose_threads(None, args.threads)
    with plumbing.exclusive(args.out):  # one process per result file (and its figures): none loses another's rows
        plumbing.remove_temp_files(os.path.splitext(args.out)[0], r".*\.png")
        plumbing.run_distributed(evaluate, args)


@dataclasses.dataclass
class Plan:
    """What one call samples (plan): configurations, a model and a guidance weight each, and how."""
    paths: list           # snapshot files, or [None] for the reference sampler of --optimal or --gaussian
    digests: list         # model_key of each
    keys: list            # per path, the configuration key of each guidance weight
    grid: Grid
    sampling: Sampling
    settings: dict        # the arguments that change the numbers (SETTINGS), with the negative's digest
    neg: object           # 'uncond', or the Model of --neg
    reference: object     # the TrainingSource of the reference sampler, or None

    @property
    def order(self):
        return [key for path_keys in self.keys for key in path_keys]


def plan(args, device, world, rank, train_cache):
    """The Plan of a call: its snapshots (of one run, unless --allow-mixed) or reference sampler, the sampler grid
    with its stops and probes, this process's samples and the guidance negative."""
    networks = bool(args.inputs) or args.neg != "uncond"  # else --precision has nothing to run
    args.precision = plumbing.choose_precision(args.precision, device) if networks else None  # as stored in --out
    paths = plumbing.find_snapshots(args.inputs) if args.inputs else [None]
    sigmas = common.edm_sigmas(args.steps)
    grid = Grid(sigmas, stop_steps(sigmas, args.stop_sigma), probe_steps(sigmas, args.probe_sigmas))
    sampling = Sampling(args.num_samples, args.seed, np.array_split(np.arange(args.num_samples), world)[rank],
                        args.label)
    neg = "uncond" if args.neg == "uncond" else network_model(args.neg, args.weights, args.data_dir, device,
                                                              train_cache, args.forward_mode, args.precision)
    settings = json.loads(json.dumps({key: getattr(args, key) for key in SETTINGS + ("precision",) * networks}))
    settings["neg"] = "uncond" if neg == "uncond" else model_key(plumbing.load_checkpoint(args.neg), args)
    reference = None if args.inputs else plumbing.TrainingSource.drawn(
        args.data, args.n, args.subset_seed, args.cond, args.k, args.resolution, args.data_dir, args.cluster_space)
    digests, runs = [], []  # of each model (model_key), and (path, run_identity) of each snapshot
    for path in paths:
        ckpt = None if path is None else plumbing.load_checkpoint(path)
        digests.append(model_key(ckpt, args, reference))
        runs += [] if ckpt is None else [(path, plumbing.run_identity(ckpt))]
    plumbing.check_same_run(runs, args.allow_mixed)
    keys = [[plumbing.digest(model, float(w)) for w in args.guidance_weights] for model in digests]
    return Plan(paths, digests, keys, grid, sampling, settings, neg, reference)


def load_model(path, p, args, device, train_cache, shape=None):
    """The Model of a snapshot (or, path None, of the reference sampler), checked: its images of `shape` (the
    first model's), guidance by the negative, and --label."""
    model = (optimal_model(p.reference, device, reference_kind(args)) if path is None else
             network_model(path, args.weights, args.data_dir, device, train_cache, args.forward_mode, args.precision))
    shape = shape or model.train.x.shape[1:]
    check(model.train.x.shape[1:] == shape, f"{model.name} makes images of shape {tuple(model.train.x.shape[1:])}, "
          f"unlike the first configuration's {tuple(shape)}")
    neg_fits = None if p.neg == "uncond" else (args.neg, p.neg.train.x.shape[1:], p.neg.num_classes)
    if neg_fits is not None or any(args.guidance_weights):
        common.check_guidance(model.name, shape, model.num_classes, neg_fits)
    if len(model.train.distinct) < 2:
        plumbing.say(f"note: the training set of {model.name} has one distinct image, so d2 = inf and every sample "
                     "counts as a copy of it (memorization_ratio)")
    label_choices(model, args.label)  # a --label the model cannot take stops before any sampling
    return model


def sample_configuration(model, denoise, name, peak, refs, features, p, args, world, rank, device):
    """One configuration: its samples and trajectories (run_configuration, at the fixed probes and the peak
    probes `peak`: (gap peak sigma, rule, grid steps)) with every measure and summary (rank 0; None elsewhere)."""
    draws, fd_refs = refs
    sigma, rule, steps = peak
    probed = dataclasses.replace(p.grid, probes=p.grid.probes + [step for step in steps if step is not None])
    res = gather(run_configuration(dataclasses.replace(model, name=name), denoise, draws, features, probed,
                                   p.sampling, batch=args.batch, device=device, show=rank == 0), world, device)
    if rank != 0:
        return None
    res.update(summarize(res, fd_refs, args.bootstrap, args.seed))
    res = with_peak_probes(res, len(p.grid.probes), steps)
    res.update(name=name, path=model.path, images_seen=model.images_seen, fd_size=len(draws[0].val_pos),
               conditional_llr=draws[0].conditional, feature_space=features.description, gap_peak_sigma=sigma,
               peak_probe_rule=rule, **{f"{slot}_probe_sigma": math.nan if step is None else float(p.grid.sigmas[step])
                                        for slot, step in zip(PEAK_SLOTS, steps)})
    return res


def evaluate(args, rank, world, device):
    """Sample the configurations of the call that --out does not hold yet (plan), rewriting --out after each."""
    check(args.num_samples >= world, f"--num-samples {args.num_samples} is fewer than the {world} processes")
    plumbing.check_compile(args.forward_mode, device, "--forward-mode")
    plumbing.earlier_result(args.out, SCRIPT, args.force)  # a file it must not replace stops it before any work
    say, features_of, train_cache, ref_cache = plumbing.say, feature_spaces(args, device), {}, {}
    p = plan(args, device, world, rank, train_cache)
    code = plumbing.code_identity(__file__, common.__file__, plumbing.__file__)
    rows = plumbing.reusable_rows(args.out, SCRIPT, args.force, p.settings, code, p.order, (("", "config_keys"),),
                                  lambda key: key not in SHARED_KEYS, 0, "configuration(s) not asked for here (other "
                                  "snapshots or guidance weights)")
    peaks = peak_probes(args, p.paths, p.digests, p.keys, p.grid.sigmas, say)
    moved = [key for key in set(rows) & set(peaks) if not same_probes(rows[key], peaks[key], p.grid.sigmas)]
    if moved:
        say(f"note: the gap's peak of {len(moved)} configuration(s) in {args.out} moved (the gap result changed): "
            "they are sampled again")
    rows = {key: row for key, row in rows.items() if key not in moved}
    todo = [0, len(set(p.order) - set(rows))]  # configurations done, and to do
    say(f"{args.num_samples} samples per configuration from seed {args.seed}, {args.steps} Heun steps, {world} "
        f"process(es) on {device}{f' (networks in {args.precision})' if args.precision else ''}; stop sigmas "
        f"{np.round(p.grid.sigmas[p.grid.stops].numpy(), 3).tolist()}, probe sigmas "
        f"{np.round(p.grid.sigmas[p.grid.probes].numpy(), 3).tolist()}, features {args.features}; "
        f"{len(p.order) - todo[1]} of {len(p.order)} configuration(s) reused from {args.out}")
    plumbing.on_interrupt(lambda: f"after {todo[0]} of {todo[1]} configurations: {args.out} keeps the finished ones, "
                                  "which rerunning the same command reuses")
    write, shape = lambda: write_results(args, [rows[k] for k in p.order if k in rows], p.grid, p.settings, code), None
    for path, model_digest, path_keys in zip(p.paths, p.digests, p.keys):
        if all(key in rows for key in path_keys):
            continue
        model = load_model(path, p, args, device, train_cache, shape)
        shape, d_neg = model.train.x.shape[1:], common.negative_denoiser(
            model.denoise, None if p.neg == "uncond" else p.neg.denoise)
        for w, key in zip(args.guidance_weights, path_keys):
            if key in rows:
                continue
            name, start, features = f"{model.name}-w{w:g}", time.perf_counter(), features_of(model.train.source)
            if id(model.train) not in ref_cache:  # the same on every process
                draws = reference_draws(model.train, args.seed, args.ref_draws)
                ref_cache[id(model.train)] = draws, frechet_references(draws[0], features, args.num_samples,
                                                                      args.fd_subsets, args.seed)
            res = sample_configuration(model, common.guided_denoiser(model.denoise, d_neg, w), name, peaks[key],
                                       ref_cache[id(model.train)], features, p, args, world, rank, device)
            rows[key] = None if res is None else dict(result_row(dict(res, w=w), key), digests=np.array(model_digest))
            if res is not None:  # rank 0: --out after every configuration, so that a rerun reuses the finished ones
                figs, todo[0] = save_figures(args.out, name, res, model.train), todo[0] + 1
                write()
                say(summary_line(res, p.grid, time.perf_counter() - start) + f"; figures {', '.join(figs)}")
    if rank == 0:
        say(f"wrote {args.out}: {len(p.order)} configuration(s) x {args.num_samples} samples, keys "
            f"{', '.join(sorted(write()))}")


def feature_spaces(args, device):
    """features_of(source): the --features map of a training source's dataset, resolution and folder (the
    classifier is trained on each), made once; a bad --features stops here, before any sampling."""
    extractors = {}

    def features_of(source):
        key = (source.dataset, source.resolution, source.data_dir) if args.features == "classifier" else args.features
        if key not in extractors:
            extractors[key] = plumbing.load_feature_extractor(args.features, device, source)
        return extractors[key]
    if args.features != "classifier":
        extractors[args.features] = plumbing.load_feature_extractor(args.features, device, None)
    return features_of


def summary_line(res, grid, seconds):
    """One line per configuration: copies, nearest distances, FD gap, the trajectory measures at the middle probe
    and at the gap's peak (traj_train_overlap, traj_heldout_score and the null's score), each LLR measure with its
    95% interval (samples and reference draws)."""
    sigmas, probes = grid.sigmas, grid.probes
    mid, (low, high), fd = len(probes) // 2, res["memorized_ci"], res["fd"]

    def at(key, slot):  # a measure at the middle probe, or at a peak probe
        return res[peak_key(key, slot)] if slot else res[key][mid]

    def ci(key, fmt, slot=""):
        value, (lo, hi) = at(key, slot), at(key + "_ci", slot)
        return f"{value:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"

    def probe(slot=""):
        valid, typical = at("traj_valid", slot), at("traj_typical", slot)
        note = "" if valid else f" (states unlike noisy data: only {typical:.0%} typical, so the score says nothing)"
        return (f"traj_train_overlap {ci('traj_train_overlap', '.2f', slot=slot)} (noisy training images 0.9, "
                f"held-out {ci('heldout_train_overlap', '.2f', slot=slot)}), traj_heldout_score "
                f"{ci('traj_heldout_score', '.2f', slot=slot)}{note} "
                f"(null {ci('null_heldout_score', '.2f', slot=slot)})")
    peak = ("no peak probe" if np.isnan(res["peak_probe_sigma"]) else
            f"at the gap's peak sigma {res['peak_probe_sigma']:.3g} ({res['peak_probe_rule']}): {probe('peak')}")
    return (f"{res['name']}: memorized {res['memorized_fraction']:.1%} [{low:.1%}, {high:.1%}], median d_train "
            f"{res['d_train'].median():.3f} d_val {res['d_val'].median():.3f}; FD train {fd[0]:.4g} val {fd[1]:.4g} "
            f"gap {fd[2]:+.3f} (held-out images: {res['fd_baselines'][2]:+.3f}); at sigma "
            f"{float(sigmas[probes[mid]]):.3g}: {probe()}; {peak} ({seconds:.1f} s)")


def result_row(res, key):
    """One configuration's entries of --out: row c of each (C, ...) array (keys in the module docstring)."""
    f64 = lambda value: np.asarray(value, np.float64)  # noqa: E731
    fd, fd_stop, base = f64(res["fd"]), f64(res["fd_stop"]), f64(res["fd_baselines"])
    return dict(
        config_keys=np.array(key), configs=np.array(res["name"]), checkpoints=np.array(res["path"]),
        images_seen=np.int64(res["images_seen"]), guidance_weights=np.float64(res["w"]),
        labels=np.asarray(res["labels"], np.int64), samples=np.asarray(res["samples"], np.float16),
        nn_ratio=f64(res["nn_ratio"]), d_train=f64(res["d_train"]), d_val=f64(res["d_val"]),
        nn_train_index=np.asarray(res["nn_train_index"], np.int64),
        memorized_fraction=f64(res["memorized_fraction"]), memorized_ci=f64(res["memorized_ci"]),
        fd_train=fd[0], fd_val=fd[1], fd_gap=fd[2], fd_reference_size=np.int64(res["fd_size"]),
        fd_stop_train=fd_stop[:, 0], fd_stop_val=fd_stop[:, 1], fd_stop_gap=fd_stop[:, 2],
        fd_noise=base[0], fd_shift=base[1], fd_gap_heldout=base[2],
        **{k: f64(res[k]) for k in OVERLAP_KEYS + tuple(f"{key}_ci" for key in OVERLAP_KEYS) + ("traj_typical",)},
        traj_valid=np.asarray(res["traj_valid"], bool),
        llr_conditional=np.bool_(res["conditional_llr"]), feature_space=np.array(res["feature_space"]),
        gap_peak_sigma=f64(res["gap_peak_sigma"]), peak_probe_rule=np.array(res["peak_probe_rule"]),
        **{f"{slot}_probe_sigma": f64(res[f"{slot}_probe_sigma"]) for slot in PEAK_SLOTS},
        **{peak_key(k, slot): np.asarray(res[peak_key(k, slot)]) for k in sorted(PEAK_KEYS) for slot in PEAK_SLOTS},
        **{k: f64(res[k]) for k in sorted((SAMPLE_AXIS_1 | SAMPLE_AXIS_2) - {"stop_features"}) + ["fcos_samples_train",
                                                                                "fcos_samples_val"]})


def write_results(args, rows, grid, settings, code):
    """Write --out from the rows of the configurations at hand (result_row); returns its arrays."""
    arrays = {key: np.stack([row[key] for row in rows]) for key in sorted(rows[0])}
    arrays.update(seeds=np.arange(args.seed, args.seed + args.num_samples, dtype=np.int64),
                  sampler_sigmas=grid.sigmas.numpy(), stop_sigmas=grid.sigmas[grid.stops].numpy(),
                  probe_sigmas=grid.sigmas[grid.probes].numpy(), settings=np.array(json.dumps(settings)),
                  code=np.array(json.dumps(code, sort_keys=True)))
    plumbing.save_npz(args.out, args=args, script=SCRIPT, **arrays)
    return arrays


if __name__ == "__main__":
    plumbing.run_cli(main)
