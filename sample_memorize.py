"""Generate samples, measure how many copy the training set, and where sampling trajectories go
(PAPER.md claims 1 and 3: the optimal denoiser memorizes; trained denoisers overfit in the denoising
loss, yet their samples do not, because trajectories avoid the overfit regions).

  python sample_memorize.py runs/RUN                          # every snapshot of a run
  python sample_memorize.py runs/RUN/snapshot-000512000.pt --guidance-weights 0 1 2 --neg uncond
  python sample_memorize.py --optimal --data fashion-mnist --n 64 --resolution 16 --num-samples 256
  torchrun --nproc_per_node=K sample_memorize.py ...           # samples sharded by seed

A configuration is a denoiser (a snapshot, or the optimal denoiser of a seeded subset chosen exactly
as train_image.py chooses it) and a guidance weight w. Sample i starts from its own seed --seed + i
(x_init ~ N(0, 80^2 I) and its label), so it is the same whatever the batch size or number of
processes, and is integrated by the deterministic Heun sampler of common.py.

Writes --out (.npz; C configurations, M samples, P probe sigmas, T stop sigmas):
  args, configs (C,) names, checkpoints (C,), images_seen (C,) (-1: optimal), guidance_weights (C,),
  seeds (M,), labels (C, M) (-1: unconditional), samples (C, M, ch, R, R) float16, sampler_sigmas;
  memorization of the samples: nn_ratio = d1/d2 (common.memorization_ratio), d_train = d1 (nearest
  training image), d_val (nearest validation image), nn_train_index (C, M) (its index in the
  training split), memorized_fraction (C,) = share with nn_ratio < 1/3, memorized_ci (C, 2) (95%
  bootstrap interval);
  Frechet distances in --features space to equally many training and validation images:
  fd_train, fd_val, fd_gap = (fd_val - fd_train) / fd_train (C,), fd_reference_size (C,); for
  samples stopped early (jump to D at the first grid sigma <= each --stop-sigma): stop_sigmas (T,),
  fd_stop_train, fd_stop_val, fd_stop_gap (C, T);
  trajectory overlap at probe_sigmas (P,) (grid sigmas): D(trajectory state), D(noisy training
  image), D(noisy validation image), all with the configuration's denoiser: distance to the nearest
  training image nn_traj, nn_train, nn_val, cosine similarity to it cos_traj, cos_train, cos_val,
  and disagreement with the optimal denoiser of the training set at the same input (mean squared
  difference per pixel) dis_traj, dis_train, dis_val, each (C, P, M).
and, in the folder named like --out without .npz, samples-CONFIG.png (a grid of the first samples)
and nn-CONFIG.png (samples above their nearest training images, with their ratio).
"""
import argparse
import contextlib
import dataclasses
import functools
import math
import os
import time
from typing import Callable

import matplotlib
matplotlib.use("Agg")
import common  # noqa: E402  (before torch: it sets OpenMP's wait policy, which torch reads when it loads)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from common import check  # noqa: E402

PROBE_NEAR = 1.2  # the paper's intermediate noise level for the trajectory overlap


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("inputs", nargs="*", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="run folders (all their snapshot-*.pt) or snapshot files written by train_image.py")
    p.add_argument("--optimal", action="store_true", help="sample the optimal denoiser of a training subset "
                   "(--data, --n, --resolution, --cond, --subset-seed) instead of snapshots")
    p.add_argument("--data", default="fashion-mnist", help="--optimal: dataset, one of " + ", ".join(common.DATASETS))
    p.add_argument("--data-dir", default=None, help="folder with the dataset files (default: the snapshot's, "
                   "else the system folder or the user cache)")
    p.add_argument("--n", type=int, default=64, help="--optimal: training subset size")
    p.add_argument("--resolution", type=int, default=32, help="--optimal: image size R x R (R divides 32)")
    p.add_argument("--cond", default="none", choices=["none", "class", "kmeans"],
                   help="--optimal: class-conditional on dataset classes or k-means clusters, or not")
    p.add_argument("--k", type=int, default=10, help="--optimal: clusters for --cond kmeans")
    p.add_argument("--subset-seed", type=int, default=0, help="--optimal: seed of the subset and k-means, "
                   "as train_image.py --seed")
    p.add_argument("--weights", default="ema", choices=["ema", "net"], help="snapshot weights to sample")
    p.add_argument("--num-samples", type=int, default=1024, help="samples per configuration")
    p.add_argument("--steps", type=int, default=18, help="Heun sampler steps (EDM grid; 2 steps - 1 evaluations)")
    p.add_argument("--label", default="random", help="conditioning of the samples: random (uniform over the "
                   "labels of the training subset, per seed), null (unconditional), or a label number")
    p.add_argument("--guidance-weights", type=float, nargs="+", default=[0.0],
                   help="guidance weights w: D_w = D + w (D - D_neg); 0 is unguided")
    p.add_argument("--neg", default="uncond", help="D_neg: uncond (the same network with the null label: "
                   "classifier-free guidance) or a snapshot file (autoguidance)")
    p.add_argument("--stop-sigma", type=float, nargs="*", default=[5.0, 2.0, 1.0, 0.5, 0.2],
                   help="early stopping: FD of D(x_k; sigma_k) at the first grid sigma_k <= each value")
    p.add_argument("--probe-sigmas", type=float, nargs="+", default=None,
                   help="sigmas of the trajectory overlap, snapped to the sampler grid "
                   f"(default: the grid sigma nearest {PROBE_NEAR} and its two neighbours)")
    p.add_argument("--features", default="builtin", help="feature space of the Frechet distances: builtin "
                   "(no download) or the path of a TorchScript Inception-v3 (see common.FEATURE_HELP)")
    p.add_argument("--batch", type=int, default=256, help="samples per batch (per process)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the memorized fraction")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed --seed + i; also the seed of the "
                   "probe and reference images and of the bootstrap")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: automatic, common.choose_threads)")
    p.add_argument("--out", default="results/memorize.npz", help="result file; figures go to the folder "
                   "of the same name without .npz")
    args = p.parse_args(argv)
    check(args.optimal != bool(args.inputs), "give run folders or snapshot files, or --optimal (not both)")
    check(args.num_samples >= 2, f"--num-samples must be at least 2 (Frechet distances), got {args.num_samples}")
    check(args.batch >= 1 and args.bootstrap >= 1, "--batch and --bootstrap must be positive")
    check(args.steps >= 2, f"--steps must be at least 2, got {args.steps}")
    check(args.seed >= 0 and args.subset_seed >= 0, "--seed and --subset-seed must not be negative")
    check(all(map(math.isfinite, args.guidance_weights)), "--guidance-weights must be finite")
    check(all(s > 0 for s in args.stop_sigma + (args.probe_sigmas or [])),
          "--stop-sigma and --probe-sigmas must be positive")
    check(args.label in ("random", "null") or args.label.isdigit(),
          f"--label must be random, null or a label number, got {args.label!r}")
    check(args.out.endswith(".npz"), f"--out must end with .npz, got {args.out}")
    check(args.neg == "uncond" or os.path.isfile(args.neg), f"--neg must be uncond or a snapshot file; "
          f"{args.neg} does not exist")
    return args


# ---------------------------------------------------------------------------
# Training sets and denoisers
# ---------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class TrainingSet:
    """A training subset (what a denoiser learned from) and the validation split, at one resolution."""
    index: np.ndarray            # (N,) indices into the training split
    x: torch.Tensor              # (N, C, R, R) float32 on the device
    labels: torch.Tensor | None  # (N,) conditioning labels as trained, or None
    num_classes: int             # labels are 0..num_classes-1; num_classes is the null label
    val_x: torch.Tensor          # (V, C, R, R) the whole validation split
    val_labels: torch.Tensor | None
    distinct: torch.Tensor       # (U,) positions of the first copy of each distinct training image

    @functools.cached_property
    def x64(self):
        return self.x.double()

    @torch.no_grad()
    def optimal(self, x, sigma, labels=None):
        """Optimal denoiser y*(x, sigma) of this set, in float64, conditional on each query's label;
        the null label (or no labels) sums over the whole set."""
        x64, sigma = x.double(), sigma.double().expand(len(x))
        null = torch.ones(len(x), dtype=torch.bool, device=x.device)
        if labels is not None and self.labels is not None:
            null = labels == self.num_classes
        out = torch.empty_like(x64)
        if null.any():
            out[null] = common.optimal_denoiser(x64[null], sigma[null], self.x64)
        if not null.all():
            out[~null] = common.optimal_denoiser(x64[~null], sigma[~null], self.x64, labels[~null], self.labels)
        return out.to(x.dtype)


def load_training_set(dataset, data_dir, resolution, index, labels, num_classes, cond, centroids, device):
    """The subset `index` of a dataset's training split with its labels, and the validation split
    labelled the way the denoiser sees it (classes, or the nearest k-means centroid)."""
    images, _ = common.load_images(dataset, "train", data_dir)
    val_images, val_classes = common.load_images(dataset, "val", data_dir)
    index = np.asarray(index, np.int64)
    check(len(index) >= 1 and int(index.max()) < len(images),
          f"the subset indices do not fit the {len(images)} training images of {dataset}")
    x = common.images_to_tensor(images[index], resolution)
    val_x = common.images_to_tensor(val_images, resolution)
    val_labels = {"class": val_classes, "kmeans": None, "none": None}[cond]
    if cond == "kmeans":
        val_labels = common.assign_clusters(val_x, centroids)
    _, inverse = torch.unique(x.flatten(1), dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), len(x)).scatter_reduce(0, inverse, torch.arange(len(x)), "amin")
    as_labels = lambda a: None if a is None else torch.tensor(np.asarray(a), dtype=torch.long, device=device)  # noqa: E731
    return TrainingSet(index, x.to(device), as_labels(labels), int(num_classes), val_x.to(device), as_labels(val_labels), first.sort().values.to(device))


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


def optimal_model(args, device):
    """The optimal denoiser of the --n images that train_image.py --seed SUBSET_SEED trains on."""
    index, labels, centroids = common.training_subset(args.data, args.n, args.subset_seed, args.cond, args.k,
                                                      args.resolution, args.data_dir)
    num_classes = common.num_condition_classes(args.data, args.cond, args.k)
    train = load_training_set(args.data, args.data_dir, args.resolution, index, labels, num_classes, args.cond,
                              centroids, device)
    name = f"optimal-{args.data}-r{args.resolution}-n{args.n}" + ("" if args.cond == "none" else f"-{args.cond}")
    return Model(name, train.optimal, train, num_classes, torch.float64, path="optimal")


def network_model(path, args, device, train_cache):
    """A snapshot's network (bf16 autocast on CUDA) and its training set (shared between snapshots)."""
    net, ckpt = common.load_denoiser(path, args.weights, device)
    num_classes = ckpt["network"]["num_classes"]
    run_args = ckpt["args"] if isinstance(ckpt["args"], dict) else {}
    key = (ckpt["dataset"], ckpt["resolution"], np.asarray(ckpt["subset"]).tobytes(), num_classes)
    if key not in train_cache:
        train_cache[key] = load_training_set(
            ckpt["dataset"], args.data_dir or run_args.get("data_dir"), ckpt["resolution"], ckpt["subset"],
            ckpt["labels"], num_classes, run_args.get("cond", "none"), ckpt["kmeans_centroids"], device)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def denoise(x, sigma, labels=None):
        with autocast:
            return net(x.float(), sigma.float(), labels).to(x.dtype)
    run = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return Model(f"{run}-{os.path.basename(path).removesuffix('.pt')}", denoise, train_cache[key], num_classes,
                 torch.float32, os.fspath(path), int(ckpt["images_seen"]))


def negative_denoiser(pos, neg):
    """D_neg of guidance for model pos: with neg 'uncond', D_pos with the null label (classifier-free
    guidance); with neg a Model, that model's denoiser (autoguidance)."""
    if neg == "uncond":
        check(pos.num_classes > 0, f"--neg uncond needs a class-conditional denoiser, but {pos.name} is "
              "unconditional: give --neg SNAPSHOT (autoguidance) or --guidance-weights 0")
        return lambda x, s, c: pos.denoise(x, s, torch.full_like(c, pos.num_classes))
    check(neg.num_classes in (0, pos.num_classes), f"the --neg snapshot has {neg.num_classes} classes but "
          f"{pos.name} has {pos.num_classes}: it must be unconditional or use the same labels")
    return lambda x, s, c: neg.denoise(x, s, c if neg.num_classes else None)


# ---------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------

def label_choices(model, label):
    """Labels a sample may get: those of the training subset (random), [null], [L]; None if unconditional."""
    if model.num_classes == 0:
        return None
    if label == "null":
        return [model.num_classes]
    present = sorted(set(model.train.labels.tolist()))
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
    """Grid step of each early stop: the first sigma_k <= s (common.sample_ode's rule)."""
    grid = sigmas[:-1]
    for s in stops:
        check(s >= float(grid[-1]), f"--stop-sigma {s} is below the smallest grid sigma {float(grid[-1]):.3g}")
    return [int((grid <= s).nonzero()[0]) for s in stops]


def probe_steps(sigmas, probes):
    """Grid steps of the probe sigmas, nearest in log sigma; default: the one nearest 1.2 and its neighbours."""
    logs = sigmas[:-1].log()
    if probes is None:
        k = int((logs - math.log(PROBE_NEAR)).abs().argmin())
        return [i for i in (k - 1, k, k + 1) if 0 <= i < len(logs)]
    return sorted({int((logs - math.log(p)).abs().argmin()) for p in probes})


def probe_images(count, candidates, seed):
    """Image (from `candidates`) and noise draw number of each of `count` probes: a seeded choice
    without repeats while there are enough images, else every image in turn with further draws."""
    if count <= len(candidates):
        return candidates[common.choose_subset(len(candidates), count, seed)], np.zeros(count, np.int64)
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
# Measurements
# ---------------------------------------------------------------------------

def batches(n, size):
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def memorization(samples, train):
    """d1, d2 to the nearest and second-nearest distinct training image, nn_ratio = d1/d2
    (common.memorization_ratio), and which training image is nearest."""
    distinct = train.x[train.distinct]
    dist, idx = common.nearest_neighbours(samples, distinct, k=min(2, len(distinct)))
    d2 = dist[:, 1] if dist.shape[1] > 1 else torch.full_like(dist[:, 0], math.inf)
    position = train.distinct[idx[:, 0]]
    return dict(d_train=dist[:, 0], d2=d2, nn_ratio=common.memorization_ratio(dist[:, 0], d2),
                nn_position=position, nn_train_index=torch.as_tensor(train.index)[position.cpu()])


def overlap_stats(train, x, d, sigma, labels, batch):
    """For inputs x at noise level sigma and the model's D(x): distance of D to the nearest training
    image, cosine similarity to it, and the mean squared disagreement with the optimal denoiser at x."""
    dist, idx = common.nearest_neighbours(d, train.x, k=1)
    cos = F.cosine_similarity(d.flatten(1).double(), train.x[idx[:, 0]].flatten(1).double(), dim=1)
    sig = torch.tensor([sigma], device=x.device)
    opt = torch.cat([train.optimal(x[b], sig, None if labels is None else labels[b]) for b in batches(len(x), batch)])
    return dist[:, 0], cos, (d.double() - opt.double()).square().flatten(1).mean(1)


def probe_sets(model, args, shard, p_sigmas, denoise, device):
    """This process's share `shard` of --num-samples noisy training and validation images at every
    probe sigma: {'train': (x (P, B, ...), D(x) (P, B, ...), labels), 'val': ...}. Validation images
    are drawn from the labels the training subset has (the optimal denoiser needs them)."""
    train = model.train
    val_pool = np.arange(len(train.val_x))
    if train.val_labels is not None:
        val_pool = torch.isin(train.val_labels, train.labels).nonzero().flatten().cpu().numpy()
        check(len(val_pool) > 0, f"no validation image has a label of the training subset of {model.name}")
    sets = {}
    for name, images, labels, split_index, pool in (
            ("train", train.x, train.labels, train.index, np.arange(len(train.x))),
            ("val", train.val_x, train.val_labels, np.arange(len(train.val_x)), val_pool)):
        pos, draws = (a[shard] for a in probe_images(args.num_samples, pool, args.seed))
        at = torch.as_tensor(pos, device=device)
        lab = None
        if model.num_classes:
            lab = torch.full((len(pos),), model.num_classes, device=device) if args.label == "null" else labels[at]
        xs, ds = [], []
        for s in p_sigmas:
            x = noisy(images[at], split_index[pos], draws, s).to(model.dtype)
            sig = torch.full((len(x),), s, dtype=x.dtype, device=device)
            xs.append(x)
            ds.append(torch.cat([denoise(x[b], sig[b], None if lab is None else lab[b])
                                 for b in batches(len(x), args.batch)]).float())
        sets[name] = (torch.stack(xs), torch.stack(ds), lab)
    return sets


@torch.no_grad()
def run_configuration(model, denoise, shard, args, sigmas, stops, probes, features, device, show):
    """Everything per sample for this process's seeds --seed + shard: samples, memorization, features,
    features of the early-stopped samples, and the trajectory overlap at the probe sigmas."""
    choices, shape, parts = label_choices(model, args.label), model.train.x.shape[1:], []
    for b in tqdm(batches(len(shard), args.batch), desc=model.name, unit="batch", disable=not show, leave=False):
        x_init, labels = initial_state(args.seed + shard[b], shape, choices, model.dtype, device)
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
    p_sigmas = sigmas[probes].tolist()
    sets = dict(traj=(cat("traj_x", 1), cat("traj_d", 1), labels), **probe_sets(model, args, shard, p_sigmas,
                                                                                denoise, device))
    for name, (x, d, lab) in sets.items():
        stats = [overlap_stats(model.train, x[p], d[p], s, lab, args.batch) for p, s in enumerate(p_sigmas)]
        for i, kind in enumerate(("nn", "cos", "dis")):
            res[f"{kind}_{name}"] = torch.stack([st[i] for st in stats])
    return {k: v.cpu() for k, v in res.items()}


def frechet_gap(sample_feats, ref_train, ref_val):
    """FD of samples to training and validation features, and the relative gap (FD_val - FD_train) / FD_train;
    NaN when a reference set has fewer than 2 images."""
    if min(len(ref_train), len(ref_val)) < 2:
        return math.nan, math.nan, math.nan
    fd_train = common.frechet_distance(sample_feats, ref_train)
    fd_val = common.frechet_distance(sample_feats, ref_val)
    return fd_train, fd_val, (fd_val - fd_train) / fd_train if fd_train > 0 else math.nan


def reference_features(train, features, seed):
    """Features of equally many training and validation images (the smaller split's size), seeded."""
    size = min(len(train.x), len(train.val_x))
    pick = lambda n: torch.as_tensor(common.choose_subset(n, size, seed), device=train.x.device)  # noqa: E731
    return features(train.x[pick(len(train.x))]), features(train.val_x[pick(len(train.val_x))])


def summarize(res, refs, args):
    """Memorized fraction with its bootstrap interval and the Frechet distances of one configuration."""
    copies = (res["nn_ratio"] < common.COPY_RATIO).double().numpy()
    low, high = common.bootstrap_ci(copies, n_boot=args.bootstrap, seed=args.seed)
    fd_stop = [frechet_gap(f, *refs) for f in res["stop_features"]]
    return dict(memorized_fraction=float(copies.mean()), memorized_ci=(low, high),
                fd=frechet_gap(res["features"], *refs), fd_stop=np.array(fd_stop, np.float64).reshape(-1, 3))


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------

def to_image(x):
    """(C, R, R) in [-1, 1] -> (R, R) or (R, R, 3) in [0, 1] for matplotlib."""
    img = ((x.float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    return img[..., 0] if img.shape[2] == 1 else img


def save_grid(path, samples, cols=8):
    """The first cols^2 samples as one PNG grid with 1-pixel gaps, pixels enlarged to >= 64 per image."""
    scale = max(1, 64 // samples.shape[-1])
    x = samples[:cols * cols].float().repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    rows, (c, r, _) = math.ceil(len(x) / cols), x.shape[1:]
    grid = torch.ones(c, rows * (r + 1) + 1, cols * (r + 1) + 1)
    for i, img in enumerate(x):
        top, left = 1 + (i // cols) * (r + 1), 1 + (i % cols) * (r + 1)
        grid[:, top:top + r, left:left + r] = img
    plt.imsave(path, to_image(grid), cmap="gray", vmin=0, vmax=1)


def save_neighbours(path, samples, nearest, ratio, title):
    """Samples (top) above their nearest training images (bottom), each titled with d1/d2."""
    count = len(samples)
    fig, axes = plt.subplots(2, count, figsize=(1.1 * count, 2.6), squeeze=False)
    for i in range(count):
        for row, img in enumerate((samples[i], nearest[i])):
            axes[row, i].imshow(to_image(img), cmap="gray", vmin=0, vmax=1)
            axes[row, i].set_xticks([])
            axes[row, i].set_yticks([])
        axes[0, i].set_title(f"{ratio[i]:.2f}" + (" copy" if ratio[i] < common.COPY_RATIO else ""), fontsize=7)
    axes[0, 0].set_ylabel("sample", fontsize=8)
    axes[1, 0].set_ylabel("nearest\ntrain", fontsize=8)
    fig.suptitle(f"{title}: d1/d2 above each sample (a copy when < 1/3)", fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
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

SAMPLE_AXIS_1 = {"stop_features"} | {f"{a}_{b}" for a in ("nn", "cos", "dis") for b in ("traj", "train", "val")}


def gather(local, world):
    """Per-sample results of all processes on rank 0 in seed order (None on the other ranks)."""
    if world == 1:
        return local
    parts = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object(local, parts, dst=0)
    return None if parts is None else {k: torch.cat([p[k] for p in parts], int(k in SAMPLE_AXIS_1)) for k in local}


def main(argv=None):
    args = parse_args(argv)
    common.choose_threads(None, args.threads)
    common.run_distributed(evaluate, args)


def evaluate(args, rank, world, device):
    check(args.num_samples >= world, f"--num-samples {args.num_samples} is fewer than the {world} processes")
    say = print if rank == 0 else (lambda *a, **k: None)
    features = common.load_feature_extractor(args.features, device)
    paths = [] if args.optimal else common.find_snapshots(args.inputs)
    sigmas = common.edm_sigmas(args.steps)
    stops, probes = stop_steps(sigmas, args.stop_sigma), probe_steps(sigmas, args.probe_sigmas)
    shard = np.array_split(np.arange(args.num_samples), world)[rank]
    train_cache, ref_cache, results, shape = {}, {}, [], None
    neg = "uncond" if args.neg == "uncond" else network_model(args.neg, args, device, train_cache)
    say(f"{args.num_samples} samples per configuration from seed {args.seed}, {args.steps} Heun steps, {world} "
        f"process(es) on {device}; stop sigmas {np.round(sigmas[stops].numpy(), 3).tolist()}, probe sigmas "
        f"{np.round(sigmas[probes].numpy(), 3).tolist()}, features {args.features}")
    for path in paths or [None]:
        model = optimal_model(args, device) if path is None else network_model(path, args, device, train_cache)
        shape = shape or model.train.x.shape[1:]
        check(model.train.x.shape[1:] == shape, f"{model.name} makes images of shape "
              f"{tuple(model.train.x.shape[1:])}, unlike the first configuration's {tuple(shape)}")
        check(neg == "uncond" or neg.train.x.shape[1:] == shape, f"--neg {args.neg} makes images of shape "
              f"{tuple(neg.train.x.shape[1:]) if neg != 'uncond' else ''}, but {model.name} makes {tuple(shape)}")
        if len(model.train.distinct) < 2:
            say(f"note: the training set of {model.name} has one distinct image, so d2 = inf and every sample "
                "counts as a copy of it (common.memorization_ratio)")
        d_neg = negative_denoiser(model, neg) if any(args.guidance_weights) else None
        for w in args.guidance_weights:
            name, start = f"{model.name}-w{w:g}", time.perf_counter()
            denoise = common.guided_denoiser(model.denoise, d_neg, w)
            res = gather(run_configuration(dataclasses.replace(model, name=name), denoise, shard, args, sigmas,
                                           stops, probes, features, device, rank == 0), world)
            if rank != 0:
                continue
            if id(model.train) not in ref_cache:
                ref_cache[id(model.train)] = reference_features(model.train, features, args.seed)
            refs = ref_cache[id(model.train)]
            res.update(summarize(res, refs, args), name=name, path=model.path, images_seen=model.images_seen,
                       w=w, fd_size=len(refs[0]))
            figs = save_figures(args.out, name, res, model.train)
            results.append(res)
            say(summary_line(res, sigmas, probes, time.perf_counter() - start) + f"; figures {', '.join(figs)}")
    if rank == 0:
        write_results(args, results, sigmas, stops, probes)


def summary_line(res, sigmas, probes, seconds):
    """One line per configuration: copies, nearest distances, FD gap, trajectory overlap at the middle probe."""
    mid, (low, high), fd = len(probes) // 2, res["memorized_ci"], res["fd"]
    return (f"{res['name']}: memorized {res['memorized_fraction']:.1%} [{low:.1%}, {high:.1%}], median d_train "
            f"{res['d_train'].median():.3f} d_val {res['d_val'].median():.3f}; FD train {fd[0]:.4g} val {fd[1]:.4g} "
            f"gap {fd[2]:+.3f}; at sigma {float(sigmas[probes[mid]]):.3g} median nn distance traj "
            f"{res['nn_traj'][mid].median():.3f} train {res['nn_train'][mid].median():.3f} val "
            f"{res['nn_val'][mid].median():.3f} ({seconds:.1f} s)")


def write_results(args, results, sigmas, stops, probes):
    """The .npz of all configurations (keys in the module docstring)."""
    stack = lambda key, dtype=np.float64: np.stack([np.asarray(r[key], dtype) for r in results])  # noqa: E731
    fd, fd_stop = stack("fd"), stack("fd_stop")
    arrays = dict(
        configs=np.array([r["name"] for r in results]), checkpoints=np.array([r["path"] for r in results]),
        images_seen=stack("images_seen", np.int64), guidance_weights=stack("w"),
        seeds=np.arange(args.seed, args.seed + args.num_samples, dtype=np.int64), labels=stack("labels", np.int64),
        samples=stack("samples", np.float16), sampler_sigmas=sigmas.numpy(),
        nn_ratio=stack("nn_ratio"), d_train=stack("d_train"), d_val=stack("d_val"),
        nn_train_index=stack("nn_train_index", np.int64), memorized_fraction=stack("memorized_fraction"),
        memorized_ci=stack("memorized_ci"), fd_train=fd[:, 0], fd_val=fd[:, 1], fd_gap=fd[:, 2],
        fd_reference_size=stack("fd_size", np.int64), stop_sigmas=sigmas[stops].numpy(),
        fd_stop_train=fd_stop[..., 0], fd_stop_val=fd_stop[..., 1], fd_stop_gap=fd_stop[..., 2],
        probe_sigmas=sigmas[probes].numpy(),
        **{f"{kind}_{name}": stack(f"{kind}_{name}") for kind in ("nn", "cos", "dis") for name in ("traj", "train", "val")})
    path = common.save_npz(args.out, args=args, **arrays)
    print(f"wrote {path}: {len(results)} configuration(s) x {args.num_samples} samples, keys "
          f"{', '.join(sorted(arrays))}")


if __name__ == "__main__":
    common.run_cli(main)
