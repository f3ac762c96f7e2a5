"""Per-noise-level denoising error E(sigma) on training and validation images, the relative
generalization gap G(sigma) = (E_val - E_train) / E_train and the overfitting onset, for the
snapshots of a run or for the optimal denoiser of a training subset (PAPER.md, "Formulas").

  python eval_gap.py runs/RUN                          # all snapshots of a run -> runs/RUN/gap.npz
  python eval_gap.py runs/RUN --optimal                # ... with the optimal denoiser's curves beside them
  python eval_gap.py --optimal --data fashion-mnist --n 64 --resolution 16   # the memorizing reference
  python eval_gap.py runs/RUN --guidance-weights 0 0.5 1 2 --neg uncond      # classifier-free guidance
  python eval_gap.py runs/RUN --guidance-weights 0 1 --neg runs/SMALL/snapshot-000100000.pt  # autoguidance
  torchrun --nproc_per_node=K eval_gap.py runs/RUN     # the images are sharded over K processes

Splits: a snapshot's training subset (all of it when n <= --num-images, else a seeded sample)
and the validation split (--num-images of it, or all). Each image has one fixed noise draw,
common.image_noise(index, seed=--seed), reused at every sigma and for every snapshot; training
image i has index i and validation image j has index len(training split) + j, so no training
and validation image share a draw. Conditional networks get their own labels: the dataset's
classes, or k-means clusters (validation images go to the nearest stored centroid).

Writes --out (.npz): sigmas (S,), images_seen (C,), checkpoints (C,) paths, digests (C,), run_args and
network (JSON of the first snapshot's training arguments and network config), params,
weights, e_train, e_val, gap (C, S), onset_images_seen (S,) = images seen where E_val(sigma) is
smallest, peak_sigma (C,) = sigma where G is largest, args and eval_settings (JSON). With
--optimal also e_train_optimal, e_val_optimal, gap_optimal (1, S) and optimal_digest; without
snapshots the optimal denoiser is the only row (images_seen 0, checkpoint 'optimal'); its E_train
is exactly 0 at small sigma, where its relative gap is inf. With --features: feature_sigmas (K,),
fd_train, fd_val, feature_gap (C, K) (and *_optimal); the training split has min(n, --num-images)
images, so for small n its Frechet distances come from fewer images than the validation ones.
With --guidance-weights every per-model array gains a leading axis (G, ...) and guidance_weights
(G,) is stored. Rows of --out already computed with the same settings are reused unless --force.
"""
import argparse
import collections
import contextlib
import hashlib
import json
import os

import common  # first: it sets OpenMP's wait policy, which torch reads when it loads
import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from common import check

# train_image.py arguments that a resumed run may change: they do not tell two runs apart.
RUN_ARGS_IGNORED = {"steps", "snapshots", "eval_every", "device", "step_mode", "compile", "threads", "out",
                    "data_dir", "no_resume"}
# Arguments that change the numbers of a row; a cached row is reused only when they all match.
SETTINGS = ("num_images", "seed", "guidance_weights", "neg", "features", "feature_sigmas", "data_dir")
ROW_KEYS = ("e_train", "e_val", "fd_train", "fd_val")
WEIGHTS_KEY = {"ema": "ema", "raw": "net"}  # --weights -> checkpoint key

Split = collections.namedtuple("Split", "y noise labels count")  # this process's shard; count: all processes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("snapshots", nargs="*", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="run folders (all their snapshot-*.pt, by images seen) or snapshot files")
    p.add_argument("--weights", default="ema", choices=["ema", "raw"], help="snapshot weights to evaluate")
    p.add_argument("--optimal", action="store_true", help="also (or, without snapshots, only) evaluate the "
                   "optimal denoiser of the snapshots' training subset, or of the subset --data/--n/--seed")
    p.add_argument("--data", default="fashion-mnist", help="--optimal without snapshots: dataset: "
                   + ", ".join(common.DATASETS))
    p.add_argument("--n", type=int, default=1000, help="--optimal without snapshots: subset size, drawn with "
                   "--seed as train_image.py draws it")
    p.add_argument("--resolution", type=int, default=32, help="--optimal without snapshots: image size")
    p.add_argument("--cond", default="none", choices=["none", "class", "kmeans"],
                   help="--optimal without snapshots: conditioning of the optimal denoiser")
    p.add_argument("--k", type=int, default=10, help="--optimal without snapshots: clusters of --cond kmeans")
    p.add_argument("--data-dir", default=None, help="folder with the dataset files (default: the run's, "
                   "then the system folder, the user cache, or a download)")
    p.add_argument("--num-images", type=int, default=8192, help="images per split (or all available)")
    p.add_argument("--sigmas", type=float, nargs="+", default=None, help="noise levels (default: "
                   "--num-sigmas log-spaced in [2e-3, 80])")
    p.add_argument("--num-sigmas", type=int, default=64, help="number of log-spaced noise levels")
    p.add_argument("--guidance-weights", type=float, nargs="+", default=None,
                   help="guidance weights w: D_w = D + w (D - D_neg); adds a leading axis to the outputs")
    p.add_argument("--neg", default="uncond", help="guidance negative: 'uncond' (the same model with the null "
                   "label: classifier-free guidance) or a snapshot file (autoguidance)")
    p.add_argument("--features", default=None, help="also the reconstruction gap in a feature space: "
                   "'builtin' or an Inception TorchScript file (common.load_feature_extractor)")
    p.add_argument("--feature-sigmas", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0, 4.0],
                   help="noise levels of the feature-space reconstruction gap")
    p.add_argument("--batch", type=int, default=512, help="(image, sigma) pairs per forward pass")
    p.add_argument("--allow-mixed", action="store_true", help="accept snapshots of different runs")
    p.add_argument("--force", action="store_true", help="recompute rows already in --out")
    p.add_argument("--seed", type=int, default=0, help="seed of the fixed noise, of the image samples and "
                   "(--optimal without snapshots) of the subset")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: automatic, common.choose_threads)")
    p.add_argument("--out", default=None, help="output .npz (default: RUN_DIR/gap[-raw][-guided].npz, or "
                   "results/gap-optimal-<data>-r<R>-n<n>-<cond>-seed<seed>.npz)")
    args = p.parse_args(argv)
    check(args.snapshots or args.optimal, "nothing to evaluate: give run folders or snapshot files, "
                                          "and/or --optimal (see --help)")
    check(args.num_images >= 2 and args.batch >= 1, "--num-images must be at least 2 and --batch positive")
    check(args.num_sigmas >= 1, f"--num-sigmas must be positive, got {args.num_sigmas}")
    for name in ("sigmas", "feature_sigmas"):
        values = getattr(args, name)
        check(values is None or all(np.isfinite(values)) and min(values) > 0,
              f"--{name.replace('_', '-')} must be positive numbers, got {values}")
    check(args.guidance_weights is None or all(np.isfinite(args.guidance_weights)),
          "--guidance-weights must be finite numbers")
    check(args.seed >= 0, f"--seed must not be negative, got {args.seed}")
    return args


# ---------------------------------------------------------------------------
# The gap, the onset and the peak (PAPER.md, "Formulas")
# ---------------------------------------------------------------------------

def relative_gap(e_train, e_val):
    """Relative generalization gap G(sigma) = (E_val - E_train) / E_train (inf where E_train = 0)."""
    e_train, e_val = np.asarray(e_train, np.float64), np.asarray(e_val, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (e_val - e_train) / e_train


def overfitting_onset(images_seen, e_val):
    """Overfitting onset per sigma: the images seen of the checkpoint where E_val(sigma) is smallest
    (first one on ties; NaN rows ignored). e_val (..., C, S) -> (..., S)."""
    e_val = np.asarray(e_val, np.float64)
    best = np.where(np.isnan(e_val), np.inf, e_val).argmin(axis=-2)
    return np.asarray(images_seen)[best]


def peak_index(gap):
    """Index of the largest gap along the last axis (first one on ties; NaN ignored)."""
    gap = np.asarray(gap, np.float64)
    return np.where(np.isnan(gap), -np.inf, gap).argmax(axis=-1)


def peak_sigma(sigmas, gap):
    """The sigma where the gap G(sigma) is largest. gap (..., S) -> (...)."""
    return np.asarray(sigmas)[peak_index(gap)]


# ---------------------------------------------------------------------------
# Snapshots, sources (what a model was trained on) and evaluation images
# ---------------------------------------------------------------------------

def digest(*parts):
    """Short content hash of arrays, tensors, dicts of tensors and plain values."""
    h = hashlib.blake2b(digest_size=12)
    for part in parts:
        if isinstance(part, dict):
            for key, value in part.items():
                h.update(key.encode())
                h.update(digest(value).encode())
        elif isinstance(part, torch.Tensor):
            h.update(str((part.dtype, tuple(part.shape))).encode())
            h.update(part.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(part, np.ndarray):
            h.update(str((part.dtype.str, part.shape)).encode())
            h.update(np.ascontiguousarray(part).tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()


def snapshot_source(ckpt, data_dir):
    """What the snapshot's network was trained on: dataset, resolution, subset, labels, centroids."""
    as_array = lambda a: None if a is None else np.asarray(a)  # noqa: E731
    return dict(dataset=ckpt["dataset"], resolution=int(ckpt["resolution"]), subset=np.asarray(ckpt["subset"]),
                labels=as_array(ckpt["labels"]), centroids=as_array(ckpt["kmeans_centroids"]),
                data_dir=data_dir or ckpt["args"].get("data_dir"))


def subset_source(args):
    """The subset train_image.py trains on for --data/--n/--seed/--cond/--k, for --optimal alone."""
    subset, labels, centroids = common.training_subset(args.data, args.n, args.seed, args.cond, args.k,
                                                       args.resolution, args.data_dir)
    centroids = None if centroids is None else centroids.numpy()
    return dict(dataset=args.data, resolution=args.resolution, subset=subset, labels=labels,
                centroids=centroids, data_dir=args.data_dir)


def source_digest(source):
    return digest(source["dataset"], source["resolution"], source["subset"], source["labels"], source["centroids"])


def read_snapshot(path, args):
    """Metadata of a snapshot: path, images seen, run identity, network config, source and a digest
    of everything its rows depend on (the evaluated weights and the source)."""
    ckpt = common.load_checkpoint(path)
    weights = ckpt[WEIGHTS_KEY[args.weights]]
    source = snapshot_source(ckpt, args.data_dir)
    run = {k: v for k, v in ckpt["args"].items() if k not in RUN_ARGS_IGNORED}
    return dict(path=path, images_seen=int(ckpt["images_seen"]), run=run, network=ckpt["network"], source=source,
                params=sum(int(t.numel()) for t in weights.values()),
                digest=digest(ckpt["network"], weights, source_digest(source)))


def check_same_run(snapshots, allow_mixed):
    """UserError when the snapshots come from different runs (unless allowed)."""
    first = snapshots[0]
    for other in snapshots[1:]:
        keys = sorted(set(first["run"]) | set(other["run"]))
        diff = [f"--{k.replace('_', '-')} {first['run'].get(k)} vs {other['run'].get(k)}"
                for k in keys if first["run"].get(k) != other["run"].get(k)]
        check(allow_mixed or not diff, f"{first['path']} and {other['path']} come from different runs "
              f"({'; '.join(diff)}): evaluate each run on its own, or pass --allow-mixed")


def split_counts(source, num_images):
    """Number of training and validation evaluation images of a source."""
    val_images, _ = common.load_images(source["dataset"], "val", source["data_dir"])
    return min(num_images, len(source["subset"])), min(num_images, len(val_images))


def eval_splits(source, args, rank, world, device):
    """This process's shard of the training and validation evaluation images: images, their fixed
    noise (seeded by dataset index; validation image j is index len(training split) + j), labels."""
    train_images, _ = common.load_images(source["dataset"], "train", source["data_dir"])
    val_images, val_classes = common.load_images(source["dataset"], "val", source["data_dir"])
    subset, labels, R = source["subset"], source["labels"], source["resolution"]
    n_train, n_val = split_counts(source, args.num_images)
    pos = common.choose_subset(len(subset), n_train, args.seed)[rank::world]
    val_index = common.choose_subset(len(val_images), n_val, args.seed)[rank::world]
    y_train = common.images_to_tensor(train_images[subset[pos]], R)
    y_val = common.images_to_tensor(val_images[val_index], R)
    if labels is None:
        train_labels = val_labels = None
    else:
        train_labels = labels[pos]
        val_labels = (val_classes[val_index] if source["centroids"] is None
                      else common.assign_clusters(y_val, source["centroids"]))
    shape = y_train.shape[1:]

    def split(y, indices, c, count):
        noise = common.image_noise(indices, shape, args.seed)
        c = None if c is None else torch.as_tensor(np.asarray(c), dtype=torch.long).to(device)
        return Split(y.to(device), noise.to(device), c, count)
    return (split(y_train, subset[pos], train_labels, n_train),
            split(y_val, len(train_images) + val_index, val_labels, n_val))


# ---------------------------------------------------------------------------
# Models: denoise(x, sigma (B,), labels (B,) or None = unconditional)
# ---------------------------------------------------------------------------

def network_model(denoiser, device):
    """A snapshot's network in inference mode, bf16 autocast on CUDA."""
    cuda = device.type == "cuda"
    if cuda:
        denoiser.to(memory_format=torch.channels_last)

    def denoise(x, sigma, labels):
        with torch.autocast("cuda", torch.bfloat16) if cuda else contextlib.nullcontext():
            return denoiser(x, sigma, labels)
    return denoise


def optimal_model(source, device, say=print):
    """The optimal denoiser of the source's subset, in float64 (float32 on MPS, which lacks float64).
    With labels it is class/cluster-conditional; images whose label no subset image carries get the
    unconditional one (the conditional is undefined there), with a note."""
    dtype = torch.float32 if device.type == "mps" else torch.float64
    images, _ = common.load_images(source["dataset"], "train", source["data_dir"])
    data = common.images_to_tensor(images[source["subset"]], source["resolution"]).to(device, dtype)
    data_labels = None if source["labels"] is None else torch.as_tensor(source["labels"]).to(device)
    noted = set()

    def denoise(x, sigma, labels):
        x, sigma = x.to(dtype), sigma.to(dtype)
        if labels is None or data_labels is None:
            return common.optimal_denoiser(x, sigma, data)
        known = torch.isin(labels, data_labels)
        if bool(known.all()):
            return common.optimal_denoiser(x, sigma, data, labels, data_labels)
        missing = set(labels[~known].tolist()) - noted
        if missing:
            say(f"note: no training image has label {', '.join(map(str, sorted(missing)))}: the optimal "
                "denoiser is unconditional for images with that label")
            noted.update(missing)
        out = common.optimal_denoiser(x, sigma, data)
        if bool(known.any()):
            out[known] = common.optimal_denoiser(x[known], sigma[known], data, labels[known], data_labels)
        return out
    return denoise


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
# Evaluation: E(sigma) per split and the feature-space reconstruction gap
# ---------------------------------------------------------------------------

def all_sum(tensor, world, device):
    """Sum of a tensor over all processes (the tensor itself with one process)."""
    if world == 1:
        return tensor
    total = tensor.to(device)
    dist.all_reduce(total)
    return total.cpu()


def gather_rows(tensor, world, device):
    """Rows of every process's tensor, concatenated (shards may differ by a few rows)."""
    if world == 1:
        return tensor
    size = torch.tensor([len(tensor)], device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    padded = tensor.new_zeros(max(sizes), *tensor.shape[1:]).to(device)
    padded[:len(tensor)] = tensor.to(device)
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:s] for part, s in zip(parts, sizes)]).cpu()


def split_errors(denoise, neg, split, sigmas, weights, batch, world=1, device="cpu", bar=None):
    """E(sigma) of PAPER.md on one split for each guidance weight, averaged over the images of
    every process: float64 (G, S)."""
    totals = torch.stack([
        common.denoising_errors(counted(common.guided_denoiser(denoise, neg, w), bar), split.y, split.noise,
                                sigmas, split.labels, batch).sum(1)
        for w in weights])
    return (all_sum(totals, world, device) / split.count).numpy()


def features_of(images, extractor, batch, world, device):
    """Features of a stack of images, in batches, gathered over processes: float64 (N, F)."""
    feats = [extractor(images[i:i + batch]).double().cpu() for i in range(0, len(images), batch)]
    return gather_rows(torch.cat(feats), world, device)


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
            common.denoising_errors(capture, split.y, split.noise, [sigma], split.labels, batch)
            out[g, k] = common.frechet_distance(gather_rows(torch.cat(feats), world, device), clean)
    return out


class Evaluator:
    """Rows (e_train, e_val (G, S), fd_train, fd_val (G, K)) of models on the evaluation images of
    their source; the images (and clean features) of the last source are kept for the next model."""

    def __init__(self, args, sigmas, weights, neg, extractor, rank, world, device, bar):
        self.args, self.sigmas, self.weights, self.neg = args, sigmas, weights, neg
        self.extractor, self.rank, self.world, self.device, self.bar = extractor, rank, world, device, bar
        self.source_key, self.splits, self.clean = None, None, None

    def load(self, source):
        key = source_digest(source) + str(source["data_dir"])
        if key != self.source_key:
            self.splits = eval_splits(source, self.args, self.rank, self.world, self.device)
            if self.extractor is not None:
                self.clean = [features_of(s.y, self.extractor, self.args.batch, self.world, self.device)
                              for s in self.splits]
            self.source_key = key
        return self.splits

    def rows(self, denoise, source):
        splits, a, neg = self.load(source), self.args, self.neg or (lambda x, s, c: denoise(x, s, None))
        out = {}
        for name, split in zip(("train", "val"), splits):
            out[f"e_{name}"] = split_errors(denoise, neg, split, self.sigmas, self.weights, a.batch,
                                            self.world, self.device, self.bar)
        if self.extractor is not None:
            for name, split, clean in zip(("train", "val"), splits, self.clean):
                out[f"fd_{name}"] = feature_distances(denoise, neg, split, clean, self.extractor,
                                                      a.feature_sigmas, self.weights, a.batch, self.world,
                                                      self.device, self.bar)
        return out


# ---------------------------------------------------------------------------
# Reuse of rows already in --out
# ---------------------------------------------------------------------------

def eval_settings(args, sigmas, neg_digest):
    """Everything besides the model that changes a row's numbers."""
    settings = {key: getattr(args, key) for key in SETTINGS}
    settings.update(sigmas=[float(s) for s in sigmas], neg=neg_digest)
    return json.loads(json.dumps(settings))


def cached_rows(path, settings, guided, say):
    """Rows of an earlier output with the same settings, by model digest ({} if none)."""
    if not os.path.isfile(path):
        return {}
    try:
        old = common.load_npz(path)
    except common.UserError:
        say(f"note: {path} is unreadable; recomputing it")
        return {}
    if "digests" not in old or "eval_settings" not in old or json.loads(str(old["eval_settings"])) != settings:
        say(f"note: {path} was made with other evaluation settings; recomputing every row")
        return {}
    rows = {}
    for suffix, digests in (("", old["digests"]), ("_optimal", old.get("optimal_digest", np.array([])).reshape(-1))):
        for c, key in enumerate(digests):
            row = {k: old[k + suffix] for k in ROW_KEYS if k + suffix in old}
            rows[str(key)] = {k: (v if guided else v[None])[:, c] for k, v in row.items()}
    return rows


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def default_out(args, snapshots):
    if not snapshots:
        return os.path.join("results", f"gap-optimal-{args.data}-r{args.resolution}-n{args.n}-{args.cond}"
                                       f"-seed{args.seed}.npz")
    tags = ("-raw" if args.weights == "raw" else "") + ("-guided" if args.guidance_weights else "")
    return os.path.join(os.path.dirname(snapshots[0]["path"]) or ".", f"gap{tags}.npz")


def negative_model(args, snapshots, device):
    """The guidance negative: None for 'uncond' (the model with the null label), else a network."""
    if args.neg == "uncond":
        return None, "uncond"
    info = read_snapshot(args.neg, args)
    net, _ = common.load_denoiser(args.neg, WEIGHTS_KEY[args.weights], device)
    for s in snapshots:
        same = all(s["network"][k] == info["network"][k] for k in ("img_resolution", "img_channels"))
        check(same and info["network"]["num_classes"] in (0, s["network"]["num_classes"]),
              f"--neg {args.neg} does not fit {s['path']}: it needs the same image size and channels, and "
              "no labels or the same labels")
    return network_model(net, device), info["digest"]


def curves(rows, guided, sigmas=None, images_seen=None):
    """Per-model rows stacked to (G, C, ...) (or (C, ...) without guidance), with the gaps and,
    given the checkpoints' images seen, the onset and the peak sigma."""
    out = {k: np.stack([r[k] for r in rows], axis=1) for k in ROW_KEYS if k in rows[0]}
    out = out if guided else {k: v[0] for k, v in out.items()}
    out["gap"] = relative_gap(out["e_train"], out["e_val"])
    if "fd_train" in out:
        out["feature_gap"] = relative_gap(out["fd_train"], out["fd_val"])
    if images_seen is not None:
        out["onset_images_seen"] = overfitting_onset(images_seen, out["e_val"])
        out["peak_sigma"] = peak_sigma(sigmas, out["gap"])
    return out


def main(argv=None):
    args = parse_args(argv)
    common.choose_threads(None, args.threads)
    common.run_distributed(evaluate, args)


@torch.inference_mode()
def evaluate(args, rank, world, device):
    say = print if rank == 0 else (lambda *a, **k: None)
    snapshots = [read_snapshot(path, args) for path in common.find_snapshots(args.snapshots)]
    if snapshots:
        check_same_run(snapshots, args.allow_mixed)
    opt_source = None
    if args.optimal:
        if snapshots:
            keys = {source_digest(s["source"]) for s in snapshots}
            check(len(keys) == 1, "--optimal with snapshots of different training subsets or labels: "
                                  "evaluate the optimal denoiser of each run on its own")
            opt_source = snapshots[0]["source"]
        else:
            opt_source = subset_source(args)
    sigmas = (torch.tensor(sorted(args.sigmas), dtype=torch.float64) if args.sigmas
              else common.log_sigmas(args.num_sigmas))
    guided = args.guidance_weights is not None
    weights = args.guidance_weights if guided else [0.0]
    neg, neg_digest = negative_model(args, snapshots, device) if guided else (None, "uncond")
    extractor = common.load_feature_extractor(args.features, device) if args.features else None
    out_path = args.out or default_out(args, snapshots)
    settings = eval_settings(args, sigmas, neg_digest)
    cache = {} if args.force else cached_rows(out_path, settings, guided, say)

    models = [(s["digest"], s["source"], s["path"]) for s in snapshots]
    if opt_source is not None:
        models.append(("optimal-" + source_digest(opt_source), opt_source, None))
    todo = {key: (source, path) for key, source, path in models if key not in cache}
    K = len(args.feature_sigmas) if extractor is not None else 0
    total = 0
    for source, _ in todo.values():
        count = sum(len(range(rank, n, world)) for n in split_counts(source, args.num_images))
        total += len(weights) * (len(sigmas) + K) * count
    say(f"{len(snapshots)} snapshot(s){' + the optimal denoiser' if opt_source is not None else ''}: "
        f"{len(models) - len(todo)} reused from {out_path}, {len(todo)} to evaluate on {device}"
        f"{f' ({world} processes)' if world > 1 else ''}")
    rows = dict(cache)
    with tqdm(total=total, unit="eval", unit_scale=True, disable=rank != 0 or not todo, dynamic_ncols=True) as bar:
        evaluator = Evaluator(args, sigmas, weights, neg, extractor, rank, world, device, bar)
        for i, (key, (source, path)) in enumerate(todo.items()):
            bar.set_description(f"{i + 1}/{len(todo)} {os.path.basename(path) if path else 'optimal'}")
            if path is None:
                model = optimal_model(source, device, tqdm.write if rank == 0 else lambda *a: None)
            else:
                model = network_model(common.load_denoiser(path, WEIGHTS_KEY[args.weights], device)[0], device)
            rows[key] = evaluator.rows(model, source)
    if rank != 0:
        return

    sig = sigmas.numpy()
    result = dict(sigmas=sig, weights=np.array(args.weights), eval_settings=np.array(json.dumps(settings)))
    if guided:
        result["guidance_weights"] = np.array(weights, np.float64)
    if K:
        result["feature_sigmas"] = np.array(args.feature_sigmas, np.float64)
    if snapshots:
        result.update(images_seen=np.array([s["images_seen"] for s in snapshots], np.int64),
                      checkpoints=np.array([s["path"] for s in snapshots]),
                      digests=np.array([s["digest"] for s in snapshots]),
                      run_args=np.array(json.dumps(snapshots[0]["run"], sort_keys=True, default=str)),
                      network=np.array(json.dumps(snapshots[0]["network"], sort_keys=True)),
                      params=np.int64(snapshots[0]["params"]))
        main_rows = [rows[s["digest"]] for s in snapshots]
    else:
        result.update(images_seen=np.zeros(1, np.int64), checkpoints=np.array(["optimal"]),
                      digests=np.array([models[-1][0]]))
        main_rows = [rows[models[-1][0]]]
    result.update(curves(main_rows, guided, sig, result["images_seen"]))
    if opt_source is not None:
        result.update({k + "_optimal": v for k, v in curves([rows[models[-1][0]]], guided).items()})
        result["optimal_digest"] = np.array([models[-1][0]])
    common.save_npz(out_path, args=vars(args), **result)
    summarize(result, weights if guided else None, snapshots, opt_source is not None, say)
    shape = "x".join(str(d) for d in result["e_train"].shape)
    say(f"wrote {out_path}: e_train, e_val, gap ({shape}), onset_images_seen, peak_sigma"
        + (", *_optimal" if opt_source is not None else "") + (", fd_train, fd_val, feature_gap" if K else ""))


def summarize(result, weights, snapshots, optimal, say):
    """One line per guidance weight: the last snapshot's peak gap, its sigma and the onset there;
    the optimal denoiser's peak gap and the sigmas where it memorizes (E_train < 1e-3)."""
    sigmas = result["sigmas"]
    for g, w in enumerate(weights if weights is not None else [None]):
        pick = lambda key: (result[key] if w is None else result[key][g])[-1]  # noqa: E731  (last row)
        parts = [] if w is None else [f"w = {w:g}"]
        if snapshots:
            seen, gap = result["images_seen"], pick("gap")
            j = peak_index(gap)
            onset = (result["onset_images_seen"] if w is None else result["onset_images_seen"][g])[j]
            parts.append(f"last snapshot ({seen[-1]:,} images seen): peak gap {gap[j]:.3g} at sigma {sigmas[j]:.3g}, "
                         f"where E_val is smallest at {onset:,} images seen"
                         + (" (no onset yet)" if len(seen) > 1 and onset == seen[-1] else ""))
        if optimal:
            gap, e_train = pick("gap_optimal"), pick("e_train_optimal")
            text = f"optimal denoiser: peak gap {gap[peak_index(gap)]:.3g} at sigma {sigmas[peak_index(gap)]:.3g}"
            memorized = np.flatnonzero(np.cumprod(e_train < 1e-3))  # from the smallest sigma up
            if len(memorized):
                text += f", E_train < 1e-3 up to sigma {sigmas[memorized[-1]]:.3g}"
            parts.append(text)
        say("; ".join(parts))


if __name__ == "__main__":
    common.run_cli(main)
