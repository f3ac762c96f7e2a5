"""Train an EDM denoiser (U-Net or DiT) on a seeded subset of n training images, keeping snapshots along the
way and a log of E_train and E_val at a few noise levels (docs/method.md, the image studies).

    python train_image.py --model unet --n 1000 --steps 200000              # paper scale, GPU
    python train_image.py --model unet --size tiny --resolution 16 --n 32 --steps 1000 \\
        --batch 32 --lr-rampup 0 --eval-every 3200                           # CPU, minutes
    torchrun --nproc_per_node=K -- train_image.py --n 1000 ...               # data parallel
    # (the -- keeps torchrun from reading --n as its own option)

It trains with EDM's loss, an Adam step and an EMA per step (`train_step`), resumes exactly from the last
snapshot when rerun, and writes snapshots and a log of E_train and E_val into the run folder (`KEYS`); the flags in
detail: `NOTES`.
"""
import argparse
import copy
import dataclasses
import functools
import json
import math
import os
import random
import shutil
import time

import plumbing  # first: it sets OpenMP's wait policy, which torch reads when it loads
import common

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

# the flags in detail, rendered into docs/reference.md
NOTES = """\
One training step is `train_step`: the EDM loss at ln(sigma) ~ N(`--p-mean`, `--p-std`^2), an Adam step at the
learning rate `--lr` (ramped up linearly over `--lr-rampup` images) and the EMA update (half-life
`--ema-half-life` images, at most `--ema-rampup` times the images seen so far). `--batch` is the global batch,
split across the processes. The step's forward pass, loss and backward pass run as `--step-mode` says: eager, or
compiled (torch.compile; on CUDA with one process in mode reduce-overhead, with CUDA graphs; an explicit compile
that cannot work stops at the start); auto compiles on CUDA with one process and on a CPU for steps below 50 GFLOP
in runs of 20,000 steps or more (`CPU_COMPILE_BELOW_FLOPS`, `CPU_COMPILE_MIN_STEPS`: small steps gain from
inductor's fusion, but compiling takes minutes on a small CPU), runs eager otherwise, and goes on eager after one
line when compiling fails. `--compile` is `--step-mode compile`. `--precision` sets the step's arithmetic: fp32
(on CUDA with TF32 matmuls), or bf16 autocast (weights, optimizer and EMA stay float32); auto is bf16 on CUDA and
on CPUs with bf16 units (AMX-BF16 or AVX512-BF16, `plumbing.cpu_bf16_units`) and fp32 elsewhere, and a resumed run
keeps its snapshot's precision. The E_train / E_val evaluations run in float32 either way. On a CPU, `--threads 0`
runs steps below `plumbing.ONE_THREAD_BELOW_FLOPS` on one thread (`plumbing.choose_threads`).

Augmentation: `--augment xflip` flips half the training images left-right as part of the data (EDM's dataset
x-flip); the network is not told, so the flip leaks into generated images, which is harmless for data with that
symmetry. `--augment-p p` is EDM's non-leaking augmentation (AugmentPipe; the paper: 0.12): x-flip (with
probability 1/2 whenever p > 0), y-flip, isotropic scaling, rotation, anisotropic scaling and translation, each
with probability p, and the network is conditioned on EDM's 9-value parameter vector, which is zero at sampling
and evaluation (`common.augment`). Both may be used together. `--label-dropout` replaces a label by the null label
with that probability (conditional runs only), which classifier-free guidance needs.

Snapshots are written at the image counts that `--snapshots` names (`log:K`: K counts log-spaced from one batch to
the end; `every:N`: each time another N images have been seen; the last step always). Rerunning a command with the
same `--out` resumes from its last snapshot (bit for bit on a CPU); `--no-resume` starts from step 0 and replaces
the snapshots and `train_log.npz` already in `--out` when it writes its first snapshot. E_train and E_val are
measured every `--eval-every` images (and at the start and the end) with the EMA network on fixed probe sets of
`--probe-images` images per split, each image with one fixed noise draw.
"""
# the files written into --out (default runs/<data>-r<R>-n<n>-<model>-<size>-<cond>-seed<seed>), rendered into
# docs/reference.md
KEYS = {
    'snapshot-<images seen>.pt':
        'at least 9 digits; a plain dict of tensors and plain values (`torch.load(path, weights_only=True)` reads '
        "it) with `plumbing.CHECKPOINT_KEYS`: `kind` (`edm-denoiser-snapshot`), `net` (the optimizer's weights), "
        "`ema` (the moving average), `opt` (Adam's state), `step`, `images_seen`, `args` (the arguments, a dict), "
        "`network` (the network's config), `subset` (the training subset's indices in the training split), "
        '`labels` (its conditioning labels, or None), `dataset`, `resolution`, `kmeans_centroids` (or None), '
        "`rng` (every process's random-number-generator states); and `format`, `log` (the log below, so far), "
        '`code` and `code_history` (the code identity that wrote it, and [step, identity] of each code it was '
        "trained with) and `data_digests` (`plumbing.data_digests`: content digests of the training subset's "
        'images and of the validation split, and the folder they were read from, against which a resumed run, '
        '`eval_gap.py` and `sample_memorize.py` check the images they read)',
    'train_log.npz':
        'L logged steps, E evaluations, Q evaluation sigmas: `args`, `script`, `format`, `code`, `images_seen`, '
        '`loss` (L,) (the loss of each step), `eval_images` (E,) (images seen at each evaluation), `eval_sigmas` '
        '(Q,), `E_train`, `E_val` (E, Q), `snapshot_images` (images seen at each snapshot), `subset` (n,), '
        "`probe_train` (the training probe images' indices in the training split), `probe_val` (the validation "
        "probe images' indices in the validation split)",
}
SCRIPT = os.path.basename(__file__)  # stored in train_log.npz (plumbing.save_npz)
FLUSH_EVERY = 20  # steps between loss read-outs; each one waits for the device
EVAL_BATCH = 64  # (image, sigma) pairs per forward pass of the evaluations: small, so their progress bar moves
PLAN_AFTER = 10  # seconds of training (or FLUSH_EVERY steps) after which the time and disk estimate is printed
CPU_SCALE = "--size tiny --resolution 16 --n 256 --batch 32 --steps 600"  # as quick.sh
WARM_UP_STEPS = 2  # steps left out of the images/s figure: compilation, then CUDA graph recording
# --step-mode auto on a CPU compiles training steps of fewer FLOPs than this, in runs of at least
# CPU_COMPILE_MIN_STEPS steps: small steps are bound by memory traffic and per-operation overhead, which inductor's
# fusion cuts (by tens of ms per step of the quick reproduction), but compiling the step takes minutes on a small
# CPU, which only long runs win back (docs/benchmarks.md, "Precision and compilation on a CPU").
CPU_COMPILE_BELOW_FLOPS = 50e9
CPU_COMPILE_MIN_STEPS = 20_000


def parse_args(argv=None):
    """The command line; every default shows in --help."""
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],  # the docstring's first paragraph
                                epilog="Flags and result keys in full: docs/reference.md",
                                formatter_class=plumbing.HelpFormatter)
    plumbing.add_data_args(p, seed_flag="--seed")
    p.add_argument("--model", default="unet", help="unet or dit")
    p.add_argument("--size", default="m", help="preset: tiny, xs, s, m, l (l = the paper's CIFAR U-Net)")
    p.add_argument("--channels", type=plumbing.positive_int, default=None,
                   help="override the preset's base channels")
    p.add_argument("--blocks", type=plumbing.positive_int, default=None,
                   help="override the preset's blocks per level / depth")
    p.add_argument("--dropout", type=plumbing.non_negative_float, default=None,
                   help="override the preset's dropout")
    p.add_argument("--patch", type=plumbing.positive_int, default=None,
                   help="DiT patch size (overrides the preset)")
    p.add_argument("--label-dropout", type=plumbing.non_negative_float, default=0.0,
                   help="probability of replacing a label by the null label (for guidance)")
    p.add_argument("--steps", type=plumbing.positive_int, default=200000,
                   help="training steps (optimizer updates)")
    p.add_argument("--lr", type=plumbing.non_negative_float, default=1e-3, help="Adam learning rate")
    p.add_argument("--lr-rampup", type=plumbing.non_negative_int, default=10_000_000,
                   help="linear lr ramp-up, in images (0: none)")
    p.add_argument("--ema-half-life", type=plumbing.non_negative_int, default=500_000,
                   help="EMA half-life in images")
    p.add_argument("--ema-rampup", type=plumbing.non_negative_float, default=0.05,
                   help="EMA half-life at most this fraction of the images seen so far (0: off)")
    p.add_argument("--p-mean", type=plumbing.finite_float, default=common.P_MEAN, help="training ln(sigma) mean")
    p.add_argument("--p-std", type=plumbing.positive_float, default=common.P_STD, help="training ln(sigma) std")
    p.add_argument("--augment", default="none", choices=["none", "xflip"],
                   help="xflip: flip half the training images left-right, as part of the data (it leaks into "
                   "samples; --augment-p does not)")
    p.add_argument("--augment-p", type=plumbing.non_negative_float, default=0.0,
                   help="EDM's non-leaking augmentation: each transformation's probability (the paper: "
                   "0.12; 0: off)")
    p.add_argument("--snapshots", default="log:32,every:20000000",
                   help="when to write snapshots: log:K = K log-spaced image counts, every:N = every N images; "
                   "and the last step")
    p.add_argument("--eval-every", type=plumbing.positive_int, default=1_000_000,
                   help="images between E_train/E_val evaluations (also at the start and the end)")
    p.add_argument("--eval-sigmas", type=plumbing.sigma_float, nargs="+", default=[0.5, 1.0, 2.0],
                   help="noise levels of the E_train/E_val evaluations")
    p.add_argument("--probe-images", type=plumbing.positive_int, default=256,
                   help="images per split in the fixed probe set of the evaluations")
    plumbing.add_run_args(p, seed="seed of subset, initialisation and noise",
                          batch=(512, "global batch (split across processes)"),
                          out="run folder (default: runs/<data>-r<R>-n<n>-<model>-<size>-<cond>-seed<seed>)")
    plumbing.add_mode_arg(p, "--step-mode", "the training step", " and on a CPU for small steps in long runs")
    p.add_argument("--compile", dest="step_mode", action="store_const", const="compile",
                   help="same as --step-mode compile")
    plumbing.add_precision_arg(p, "the training step's arithmetic", " (resuming: the snapshot's)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: automatic; one for small steps)")
    p.add_argument("--no-resume", action="store_true",
                   help="start from step 0; the snapshots and train_log.npz in --out are replaced at the "
                   "first snapshot")
    p.add_argument("--resume-changed-code", action="store_true",
                   help="resume a run whose snapshot was made by other code (an edited train_image.py or common.py) "
                   "with this code; without it such a resume stops")
    return p.parse_args(argv)


def check_args(args):
    """UserError for arguments that cannot make a run (parse_args' types check each number alone)."""
    check = common.check
    check(args.data in plumbing.DATASETS, f"unknown dataset {args.data!r}: choose one of {', '.join(plumbing.DATASETS)}")
    check(args.label_dropout < 1, f"--label-dropout must lie in [0, 1), got {args.label_dropout}")
    check(args.cond != "none" or args.label_dropout == 0, "--label-dropout needs a conditional run (--cond "
          "class or kmeans): an unconditional network has no labels to drop")
    check(args.threads >= 0, f"--threads must not be negative, got {args.threads}")
    check(args.augment_p <= 1, f"--augment-p is a probability in [0, 1], got {args.augment_p}")
    snapshot_steps(args.snapshots, args.steps, args.batch)


def default_out(args):
    """runs/<data>-r<R>-n<n>-<model>-<size>-<cond>-seed<seed>: one folder per experiment."""
    cond = {"none": "uncond", "class": "class", "kmeans": f"kmeans{args.k}"}[args.cond]
    cond += f"-{args.cluster_space}" if args.cond == "kmeans" and args.cluster_space != "pixels" else ""
    return os.path.join("runs", f"{args.data}-r{args.resolution}-n{args.n}-{args.model}-{args.size}-"
                                f"{cond}-seed{args.seed}")


def snapshot_steps(spec, steps, batch):
    """Steps after which a snapshot is written: 'log:K' = K image counts log-spaced from one
    batch to the end, 'every:N' = each time another N images have been seen; the last step."""
    chosen = {steps}
    for part in filter(None, spec.replace(" ", "").split(",")):
        kind, _, value = part.partition(":")
        common.check(kind in ("log", "every") and value.isdigit() and int(value) >= 1,
                     f"bad --snapshots part {part!r}: use log:K and/or every:N (N in images), "
                     "comma-separated, e.g. log:32,every:20000000")
        if kind == "log":
            chosen.update(int(s) for s in np.round(np.geomspace(1, steps, int(value))))
        else:
            chosen.update(s for s in range(1, steps + 1) if s * batch // int(value) > (s - 1) * batch // int(value))
    return chosen


def derived_seed(*keys):
    """Seed of an independent random stream named by non-negative integers (seed, stream, rank, ...)."""
    return int(np.random.SeedSequence(keys).generate_state(1)[0])


class EpochOrder:
    """Training order: a seeded permutation of the n subset images per epoch, epochs back to
    back; the images at any position of the stream are known without state, so resuming is exact."""

    def __init__(self, n, seed, device="cpu"):
        self.n, self.seed, self.device, self.cached = n, seed, device, (None, None)

    def permutation(self, epoch):
        if self.cached[0] != epoch:
            g = torch.Generator().manual_seed(derived_seed(self.seed, 2, epoch))
            self.cached = (epoch, torch.randperm(self.n, generator=g).to(self.device))
        return self.cached[1]

    def indices(self, start, count):
        """Subset positions at stream positions start .. start + count - 1."""
        parts = []
        while count > 0:
            epoch, offset = divmod(start, self.n)
            take = min(count, self.n - offset)
            parts.append(self.permutation(epoch)[offset:offset + take])
            start, count = start + take, count - take
        return torch.cat(parts)


def probe_set(images, labels, index, noise_index, resolution, seed, device):
    """Fixed probe (y_i, n_i, c_i): images with ONE noise draw each, seeded by the image's dataset
    index (validation image j: training-split size + j, as eval_gap.py), reused at every evaluation."""
    y = plumbing.images_to_tensor(images[index], resolution)
    noise = common.image_noise(noise_index, y.shape[1:], seed)
    return y.to(device), noise.to(device), None if labels is None else torch.as_tensor(labels).to(device)


def latest_snapshot(out):
    """The snapshot in out with the most images seen, or None."""
    return (plumbing.snapshot_files(out) or [None])[-1]


def check_same_run(saved, current, path):
    """UserError naming the arguments that differ from those that made the snapshot."""
    keys = sorted((set(saved) | set(current)) - plumbing.RESUMABLE_ARGS)
    diff = [f"--{k.replace('_', '-')} {saved.get(k)} (snapshot) vs {current.get(k)} (now)"
            for k in keys if saved.get(k) != current.get(k)]
    common.check(not diff, f"{path} was made with different arguments: {'; '.join(diff)}. Rerun with the "
                           "snapshot's arguments, choose another --out, or pass --no-resume to start over")


def check_same_code(ckpt, code, path, resume_changed_code, say):
    """The code history (a list of [step, code identity]) of a run resumed from the snapshot `ckpt` at `path` with
    the code `code` (plumbing.code_identity): the snapshot's, with this code appended when it differs. UserError
    when the code differs from the code that made the snapshot, naming the files, unless resume_changed_code."""
    history = [list(entry) for entry in ckpt.get("code_history") or [[0, ckpt.get("code")]]]
    changed = plumbing.code_changes(ckpt.get("code"), code)
    if not changed:
        return history
    common.check(resume_changed_code, f"{path} was made by other code: {changed} changed since. Rerun with "
                 "--no-resume to train again with this code, choose another --out, or pass --resume-changed-code "
                 "to go on from the snapshot with this code")
    say(f"note: {changed} changed since {path} was written: going on with this code (--resume-changed-code); "
        "the snapshots' code_history says from which step")
    return history + [[int(ckpt["step"]), code]]


def duration(seconds):
    """A duration for people: 0.42 s, 17 min, 3.5 h, 2.1 days."""
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.2g} {unit}" if unit != "min" else f"{seconds / size:.0f} min"
    return f"{seconds:.2g} s" if seconds < 10 else f"{seconds:.0f} s"


def megabytes(size):
    """A size in bytes for people: 1.3 MB, 2.1 GB."""
    return f"{size / 1e9:.3g} GB" if size >= 1e9 else f"{size / 1e6:.3g} MB"


def snapshot_bytes(net, ema):
    """Size of one snapshot, about: the tensors of the network and its EMA, and Adam's two moments per
    parameter (known before its first step too)."""
    tensors = [*net.state_dict().values(), *ema.state_dict().values(), *net.parameters(), *net.parameters()]
    return sum(t.numel() * t.element_size() for t in tensors)


def check_disk(out, first, snapshot_size, num_snapshots, say):
    """Before training: UserError when the disk of the run folder `out` has no room for the `first` snapshot
    file (about snapshot_size bytes), a warning when it lacks room for all num_snapshots."""
    free = shutil.disk_usage(out).free
    common.check(snapshot_size <= free, f"cannot write {first}: no space left on device ({megabytes(snapshot_size)} "
                                        f"needed, {megabytes(free)} free in {out})")
    if num_snapshots * snapshot_size > free:
        say(f"warning: {num_snapshots} snapshots of about {megabytes(snapshot_size)} need "
            f"{megabytes(num_snapshots * snapshot_size)}, but {out} has {megabytes(free)} free")


def plan_line(args, step, step_seconds, eval_seconds, warm_up_seconds, num_snapshots, snapshot_size):
    """Time left (steps, and evaluations when their time is known) and the disk the snapshots need, from the
    time per step after the warm-up steps (compilation, CUDA-graph recording), whose time is shown apart."""
    B, left = args.batch, args.steps - step
    evals = args.steps * B // args.eval_every - step * B // args.eval_every + bool(args.steps * B % args.eval_every)
    seconds = left * step_seconds + (evals * eval_seconds if eval_seconds is not None else 0)
    os.makedirs(args.out, exist_ok=True)
    need, free = num_snapshots * snapshot_size, shutil.disk_usage(args.out).free
    evals_text = f" and {evals} evaluation(s) of {duration(eval_seconds)}" if eval_seconds is not None else ""
    return (f"{duration(step_seconds)} per step after {WARM_UP_STEPS} warm-up steps of {duration(warm_up_seconds)}: "
            f"about {duration(seconds)} left for {left:,} steps{evals_text}; "
            f"{num_snapshots} snapshots of about {megabytes(snapshot_size)}: {megabytes(need)} in {args.out} "
            f"({megabytes(free)} free{', NOT ENOUGH' if need > free else ''})")


def arithmetic(device, threads):
    """Where a run computes, as each snapshot stores it: the device (a GPU by its name) and the CPU threads."""
    name = f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type
    return dict(device=name, cpu_threads=threads)


def note_other_arithmetic(ckpt, now, say):
    """One note when a run resumes on another device, or on a CPU with another thread count, than its snapshot
    `ckpt` was made with (arithmetic; now: this run's): kernels that add in another order round differently, so
    the run then matches an uninterrupted one only up to rounding (plumbing.RESUMABLE_ARGS)."""
    names = dict(device="device", cpu_threads="CPU threads") if now["device"] == "cpu" else dict(device="device")
    changed = [f"{name} {ckpt[key]} -> {now[key]}" for key, name in names.items()
               if ckpt.get(key, now[key]) != now[key]]  # a snapshot without them: not known
    if changed:
        say(f"note: resuming with {' and '.join(changed)} (the snapshot's -> now): the run goes on, but matches an "
            "uninterrupted run only up to rounding")


def interrupted_note(args, steps_done, last_snapshot):
    """How far training got and how to go on, for the one line printed on Ctrl-C."""
    where = f"after {steps_done:,} of {args.steps:,} steps ({steps_done * args.batch:,} images seen)"
    if last_snapshot is None:
        return f"{where}, before the first snapshot of this run: rerun the same command to start again"
    again = "the command without --no-resume" if args.no_resume else "the same command"
    return f"{where}; last snapshot {last_snapshot}: rerun {again} to resume from it"
def step_flops(denoiser, batch):
    """FLOPs of a training step of `batch` images: 3x the forward pass (the backward pass costs about
    twice the forward), counted on one image."""
    cfg = denoiser.config
    x = torch.zeros(1, cfg["img_channels"], cfg["img_resolution"], cfg["img_resolution"])
    training = denoiser.training
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        denoiser.eval()(x, torch.ones(1))
    denoiser.train(training)
    return 3 * batch * counter.get_total_flops()


def loss_function(model, autocast=None, compiled=False, cuda_graphs=False):
    """The batch's mean EDM loss, loss(y, labels, sigma, noise, augment_labels=None), through `model`: in bf16
    autocast on the device type `autocast` (--precision bf16: cuda or cpu), in float32 where it is None.
    compiled: torch.compile'd (the forward pass and, through autograd, the backward pass), with CUDA
    graphs (mode reduce-overhead) if cuda_graphs."""
    def loss(y, labels, sigma, noise, augment_labels=None):
        with torch.autocast(autocast or "cpu", torch.bfloat16, enabled=autocast is not None):
            return common.edm_loss(model, y, labels, sigma=sigma, noise=noise, augment_labels=augment_labels).mean()
    if not compiled:
        return loss
    fast_loss = torch.compile(loss, **({"mode": "reduce-overhead"} if cuda_graphs else {}))
    if not cuda_graphs:
        return fast_loss

    def graphed_loss(*args):
        torch.compiler.cudagraph_mark_step_begin()  # a new step: the last step's graph outputs may be reused
        return fast_loss(*args)
    return graphed_loss


def adam(net, lr, device):
    """Adam over the network's parameters, fused (one kernel for all tensors) on CUDA and on a CPU: on a CPU,
    3 ms instead of 10-16 ms per step of the quick reproduction's 0.71M-parameter U-Net (docs/benchmarks.md)."""
    return torch.optim.Adam(net.parameters(), lr=lr, fused=device.type in ("cuda", "cpu") or None)


def step_mode(requested, device, world, flops, steps=None):
    """--step-mode resolved (plumbing.compile_mode): auto compiles on one CUDA device, and on a CPU for steps of
    fewer than CPU_COMPILE_BELOW_FLOPS in runs of at least CPU_COMPILE_MIN_STEPS steps (steps None: any)."""
    cpu_pays = (device.type == "cpu" and flops < CPU_COMPILE_BELOW_FLOPS
                and (steps is None or steps >= CPU_COMPILE_MIN_STEPS))
    return plumbing.compile_mode(requested, device.type == "cuda", world, cpu_pays)


def train_step(loss_fn, net, ema, opt, y, labels, lr, ema_beta, p_mean, p_std, gen, augment_labels=None):
    """One training step: draw sigma and the noise from `gen`, the mean EDM loss through loss_fn
    (see loss_function; y augmented by augment_labels, if given), its backward pass, an Adam step at
    learning rate lr and the EMA update with decay ema_beta. Returns the loss, detached (a copy: CUDA
    graphs reuse their outputs)."""
    sigma = common.sample_training_sigma(y.shape[0], p_mean, p_std, gen, y.device)
    noise = torch.randn(y.shape, generator=gen, device=y.device)
    for group in opt.param_groups:
        group["lr"] = lr
    loss = loss_fn(y, labels, sigma, noise, augment_labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    common.update_ema(ema, net, ema_beta)
    return loss.detach().clone()


def main(argv=None):
    """Train (or resume) one run as the command line says."""
    args = parse_args(argv)
    check_args(args)
    args.out = args.out or default_out(args)
    if args.data_dir is not None:  # stored in the snapshots: the other scripts find it from any working directory
        args.data_dir = os.path.abspath(os.path.expanduser(args.data_dir))
    plumbing.check_writable(args.out, folder=True)
    with plumbing.exclusive(args.out, folder=True):  # one process per run folder; no live writer has a temp file in it
        plumbing.remove_temp_files(args.out, r"snapshot-\d+\.pt|train_log\.npz")
        plumbing.run_distributed(train, args)


def resume_point(args, code, say):
    """What this call starts from: (the snapshot dict to resume, its path, the snapshot files of an earlier run that
    --no-resume replaces, the code history (a list of [step, code identity]) to store). UserError when the last
    snapshot in --out is of another run, of other code (check_same_code) or past --steps."""
    last_path, old_run = latest_snapshot(args.out), []
    if last_path is not None and args.no_resume:  # removed once this run has a snapshot of its own
        old_run, last_path = plumbing.snapshot_files(args.out), None
        say(f"--no-resume: the {len(old_run)} snapshot(s) of the earlier run in {args.out} are removed once this "
            "run writes its first snapshot")
    if last_path is None:
        return None, None, old_run, [[0, code]]
    ckpt = plumbing.load_checkpoint(last_path)
    if args.precision == "auto":  # a resumed run keeps its precision, whatever this machine's choice
        args.precision = ckpt["args"]["precision"]
    if args.data_dir is None:  # and reads the folder it read (--data-dir's default for a snapshot)
        args.data_dir = ckpt["args"].get("data_dir")
    check_same_run(ckpt["args"], vars(args), last_path)
    history = check_same_code(ckpt, code, last_path, args.resume_changed_code, say)
    common.check(ckpt["step"] <= args.steps, f"{last_path} is at step {ckpt['step']}, past --steps {args.steps}; "
                 "pass a larger --steps or another --out")
    return ckpt, last_path, old_run, history


@dataclasses.dataclass
class Data:
    """A run's training images and labels on the device, and its fixed probe sets of the E_train / E_val log."""
    source: object        # plumbing.TrainingSource: the subset, its labels and k-means centroids
    x: torch.Tensor       # (n, C, R, R)
    labels: torch.Tensor  # (n,) or None
    probes: list          # [(y, noise, labels) of the training probes, of the validation probes]
    probe_index: tuple    # (training probes' indices in the training split, validation probes' in its split)
    digests: dict         # plumbing.data_digests


def training_data(args, ckpt, last_path, device):
    """The Data of a run: the snapshot's subset and labels when resuming (the images checked against its digests),
    else those that --seed draws."""
    images, _ = plumbing.load_images(args.data, "train", args.data_dir)
    source = (plumbing.TrainingSource.of_checkpoint(ckpt, args.data_dir, last_path) if ckpt else
              plumbing.TrainingSource.drawn(args.data, args.n, args.seed, args.cond, args.k, args.resolution,
                                            args.data_dir, args.cluster_space))
    subset, labels = source.subset, source.labels
    val_images, val_classes = plumbing.load_images(args.data, "val", args.data_dir)
    probe_train = plumbing.choose_subset(args.n, min(args.probe_images, args.n), args.seed)
    probe_val = plumbing.choose_subset(len(val_images), min(args.probe_images, len(val_images)), args.seed)
    val_labels = source.validation_labels(val_classes[probe_val],
                                          plumbing.images_to_tensor(val_images[probe_val], args.resolution))
    probes = [probe_set(images, None if labels is None else labels[probe_train], subset[probe_train],
                        subset[probe_train], args.resolution, args.seed, device),
              probe_set(val_images, val_labels, probe_val, len(images) + probe_val, args.resolution, args.seed,
                        device)]
    x = plumbing.images_to_tensor(images[subset], args.resolution).to(device)
    return Data(source, x, None if labels is None else torch.as_tensor(labels).to(device), probes,
                (subset[probe_train], probe_val), plumbing.data_digests(args.data, subset, args.data_dir))


def training_state(args, net, ckpt, device, rank, world, say):
    """The network on the device, its EMA, Adam and the random streams (each process its own, from --seed and its
    rank; the noise's in a generator): (ema, opt, gen, start step, log), as the snapshot `ckpt` left them."""
    net.to(device)
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)  # rng_state saves the current CUDA device's generator
        net.to(memory_format=torch.channels_last)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = adam(net, args.lr, device)
    gen = torch.Generator(device).manual_seed(derived_seed(args.seed, 0, rank))
    torch.manual_seed(derived_seed(args.seed, 1, rank))  # dropout
    random.seed(derived_seed(args.seed, 3, rank))  # python's and numpy's: unused, but saved in every snapshot
    np.random.seed(derived_seed(args.seed, 4, rank))
    if ckpt is None:
        return ema, opt, gen, 0, dict(images_seen=[], loss=[], eval_images=[], E_train=[], E_val=[], snapshot_images=[])
    net.load_state_dict(ckpt["net"])
    ema.load_state_dict(ckpt["ema"])
    opt.load_state_dict(ckpt["opt"])
    if len(ckpt["rng"]) == world:
        plumbing.set_rng_state(ckpt["rng"][rank], noise=gen)
    else:
        say(f"note: the snapshot was made by {len(ckpt['rng'])} processes, this run has {world}: fresh random "
            "streams, so the result differs from an uninterrupted run")
        gen.manual_seed(derived_seed(args.seed, 0, rank, ckpt["step"]))
        torch.manual_seed(derived_seed(args.seed, 1, rank, ckpt["step"]))
    return ema, opt, gen, ckpt["step"], ckpt["log"]


def training_batch(data, order, step, args, gen, rank, local, num_classes):
    """The images, labels and augmentation parameters of this process's share of a step's batch, drawn in a fixed
    order from `gen` (the x-flip, the non-leaking augmentation, the label dropout), and the step's learning rate
    and EMA decay (both ramped up over images seen)."""
    seen, B = (step - 1) * args.batch, args.batch
    idx = order.indices(seen + rank * local, local)
    y, c, a = data.x[idx], None if data.labels is None else data.labels[idx], None
    if args.augment == "xflip":
        y = torch.where(torch.rand(local, 1, 1, 1, generator=gen, device=y.device) < 0.5, y.flip(3), y)
    if args.augment_p > 0:
        y, a = common.augment(y, args.augment_p, gen)  # a: (local, AUGMENT_DIM)
    if c is not None and args.label_dropout > 0:
        c = c.masked_fill(torch.rand(local, generator=gen, device=y.device) < args.label_dropout, num_classes)
    if y.device.type == "cuda":
        y = y.contiguous(memory_format=torch.channels_last)
    lr = args.lr * min(1.0, (seen + B) / args.lr_rampup) if args.lr_rampup else args.lr
    half_life = min(args.ema_half_life, args.ema_rampup * (seen + B)) if args.ema_rampup else args.ema_half_life
    return y, c, a, lr, common.ema_beta(B, half_life)


@dataclasses.dataclass
class Keeper:
    """What a run writes: snapshots (atomically, the earlier run's removed after the first with --no-resume),
    train_log.npz and the E_train / E_val evaluations in its log (rank 0)."""
    args: argparse.Namespace
    net: torch.nn.Module
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    gen: torch.Generator
    data: Data
    log: dict
    code: dict
    code_history: list
    old_run: list
    rank: int = 0
    world: int = 1
    arithmetic: dict = dataclasses.field(default_factory=dict)  # where it runs (arithmetic), stored in each snapshot

    def path(self, step):
        return os.path.join(self.args.out, f"snapshot-{step * self.args.batch:09d}.pt")

    def evaluate(self, seen):
        """E_train and E_val of the EMA network on the probe sets at the --eval-sigmas (common.denoising_errors)."""
        if self.rank != 0:
            return
        self.log["eval_images"].append(seen)
        pairs = len(self.args.eval_sigmas) * sum(len(y) for y, _, _ in self.data.probes)
        with tqdm(total=pairs, desc=f"E_train, E_val at {seen:,} images", unit="eval", leave=False,
                  dynamic_ncols=True) as bar:
            for key, (y, noise, c) in zip(("E_train", "E_val"), self.data.probes):
                errors = common.denoising_errors(self.ema, y, noise, self.args.eval_sigmas, c, EVAL_BATCH, bar)
                self.log[key].append(errors.mean(1).tolist())

    def write_log(self):
        log, m, subset = self.log, len(self.args.eval_sigmas), self.data.source.subset
        return plumbing.save_npz(
            os.path.join(self.args.out, "train_log.npz"), args=vars(self.args), script=SCRIPT,
            code=np.array(json.dumps(self.code, sort_keys=True)), images_seen=np.array(log["images_seen"], np.int64),
            loss=np.array(log["loss"], np.float64), eval_images=np.array(log["eval_images"], np.int64),
            eval_sigmas=np.array(self.args.eval_sigmas, np.float64),
            E_train=np.array(log["E_train"], np.float64).reshape(-1, m),
            E_val=np.array(log["E_val"], np.float64).reshape(-1, m),
            snapshot_images=np.array(log["snapshot_images"], np.int64), subset=subset,
            probe_train=self.data.probe_index[0], probe_val=self.data.probe_index[1])

    def snapshot(self, step):
        """Write the snapshot of this step (every process's random state in it) and the log; returns its path."""
        states = [plumbing.rng_state(noise=self.gen)] * self.world
        if self.world > 1:
            dist.all_gather_object(states, states[0])
        path, source, args = self.path(step), self.data.source, self.args
        if self.rank == 0:
            as_tensor = lambda a: None if a is None else torch.tensor(np.asarray(a))  # noqa: E731  (save_checkpoint)
            self.log["snapshot_images"].append(step * args.batch)
            plumbing.save_checkpoint(dict(
                kind=plumbing.CHECKPOINT_KIND, net=self.net.state_dict(), ema=self.ema.state_dict(),
                opt=self.opt.state_dict(), step=step, images_seen=step * args.batch, args=vars(args),
                network=self.net.config, subset=as_tensor(source.subset), labels=as_tensor(source.labels),
                dataset=args.data, resolution=args.resolution, kmeans_centroids=as_tensor(source.centroids),
                data_digests=self.data.digests, rng=states, log=self.log, code=self.code,
                code_history=self.code_history, **self.arithmetic), path)
            for old in self.old_run:
                if old != path:
                    os.remove(old)
            self.old_run.clear()
            self.write_log()
        return path


def finite_losses(pending, world, first, batch, last_snapshot):
    """The losses of the steps since the last read-out (first: the first one's step), averaged over processes, as
    floats; UserError naming the step and the last good snapshot at the first that is not finite."""
    values = torch.stack(pending).float()
    if world > 1:
        dist.all_reduce(values)
        values /= world
    values = values.tolist()
    for i, v in enumerate(values):
        common.check(math.isfinite(v), f"loss became {v} at step {first + i} (images seen {(first + i) * batch:,}); "
                     f"the last good snapshot is {last_snapshot or 'none (none was written yet)'}; try a lower --lr")
    return values


def train(args, rank, world, device):
    """EDM's training loop with EMA, snapshots and the E_train / E_val log; this process is `rank` of `world`."""
    # Checks, and the snapshot to resume from.
    common.check(args.batch % world == 0, f"--batch {args.batch} must be divisible by the {world} processes")
    plumbing.check_compile(args.step_mode, device, "--step-mode")
    say, local, B = plumbing.say, args.batch // world, args.batch
    sizes = list(common.NETWORK_PRESETS.get(args.model, ()))
    if device.type == "cpu" and args.size in sizes and sizes.index(args.size) >= sizes.index("m"):
        say(f"warning: the {args.size} preset is sized for GPUs (on a CPU one step of batch {B} can take minutes); "
            f"for a CPU-scale run try {CPU_SCALE} (as quick.sh)")
    code = plumbing.code_identity(__file__, common.__file__, plumbing.__file__)
    ckpt, last_snapshot, old_run, code_history = resume_point(args, code, say)

    # Network (initialised from --seed, the same on every process), data, optimizer, EMA and random streams.
    num_classes = plumbing.num_condition_classes(args.data, args.cond, args.k)
    torch.manual_seed(args.seed)
    net = common.build_network(args.model, args.size, args.resolution, plumbing.DATASETS[args.data]["shape"][-1],
                               num_classes, args.channels, args.blocks, args.dropout, args.patch,
                               augment_dim=common.AUGMENT_DIM if args.augment_p > 0 else 0)
    flops = step_flops(net, local)
    threads = plumbing.choose_threads(flops, args.threads)
    where = arithmetic(device, threads)
    if ckpt is not None:
        note_other_arithmetic(ckpt, where, say)
    args.precision = plumbing.choose_precision(args.precision, device)  # stored in the snapshots and the log
    data = training_data(args, ckpt, last_snapshot, device)
    ema, opt, gen, start, log = training_state(args, net, ckpt, device, rank, world, say)
    say(f"{args.model} {args.size}: {common.count_parameters(net):,} parameters; {args.n} {args.data} images "
        f"at {args.resolution}x{args.resolution}, cond {args.cond} ({num_classes} classes); "
        f"{world} process(es) on {device}, {threads} CPU thread(s) each; run folder {args.out}")
    if ckpt is not None:
        say(f"resuming from {last_snapshot} (step {start}, {start * B:,} images seen)")
    if args.lr_rampup > args.steps * B / 2:
        say(f"note: --lr-rampup {args.lr_rampup} images is over half of this run's {args.steps * B} images, "
            f"so the learning rate stays below {args.lr * min(1, args.steps * B / args.lr_rampup):.3g}")

    # The training step: eager, or compiled with a way back to eager (CompileGuard).
    model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else net
    mode, graphs = step_mode(args.step_mode, device, world, flops, args.steps - start)
    autocast = device.type if args.precision == "bf16" else None
    eager_loss = loss_function(model, autocast)
    loss_fn = loss_function(model, autocast, True, graphs) if mode == "compile" else eager_loss
    guard = plumbing.CompileGuard(args.step_mode == "compile", "--step-mode", tries=WARM_UP_STEPS)

    def saved_rng():  # the random streams a failed compiled step may have drawn from, put back before it runs eager
        state = plumbing.rng_state(noise=gen)
        return lambda: plumbing.set_rng_state(state, noise=gen)
    say(f"training step: {mode}{' with CUDA graphs' if graphs else ''}, "
        f"{'bf16 autocast' if autocast else 'float32'} (--precision {args.precision})")

    # Training loop, in images seen: steps of B images, evaluations every --eval-every, snapshots at --snapshots.
    snapshots, order = snapshot_steps(args.snapshots, args.steps, B), EpochOrder(args.n, args.seed, device)
    keeper = Keeper(args, net, ema, opt, gen, data, log, code, code_history, old_run, rank, world, where)
    if rank == 0:
        later = sorted(s for s in snapshots if s > start)
        os.makedirs(args.out, exist_ok=True)
        check_disk(args.out, keeper.path(later[0]) if later else args.out, snapshot_bytes(net, ema), len(later), say)
    clock, done = Clock(start, B, rank != 0), [start]
    plumbing.on_interrupt(lambda: interrupted_note(args, done[0], last_snapshot))
    if start == 0:
        clock.time_evaluation(lambda: keeper.evaluate(0))
    pending = []
    with tqdm(total=args.steps, initial=start, unit="step", disable=rank != 0, dynamic_ncols=True) as bar:
        for step in range(start + 1, args.steps + 1):
            y, c, a, lr, beta = training_batch(data, order, step, args, gen, rank, local, num_classes)
            step_with = functools.partial(train_step, net=net, ema=ema, opt=opt, y=y, labels=c, lr=lr, ema_beta=beta,
                                          p_mean=args.p_mean, p_std=args.p_std, gen=gen, augment_labels=a)
            pending.append(step_with(loss_fn) if mode == "eager" else
                           guard.run(lambda: step_with(loss_fn), lambda: step_with(eager_loss), save=saved_rng))
            bar.update()
            done[0], seen = step, step * B
            clock.plan(bar, step, device, lambda *timing: plan_line(args, step, *timing, len(snapshots),
                                                                    snapshot_bytes(net, ema)))
            is_snapshot = step in snapshots
            is_eval = step == args.steps or seen // args.eval_every > (seen - B) // args.eval_every
            if not (is_snapshot or is_eval or step % FLUSH_EVERY == 0 or step == start + WARM_UP_STEPS):
                continue
            values = finite_losses(pending, world, step - len(pending) + 1, B, last_snapshot)
            log["images_seen"] += [(step - len(pending) + 1 + i) * B for i in range(len(values))]
            log["loss"] += values
            pending.clear()
            bar.set_postfix(loss=f"{np.mean(values):.4f}", img_s=f"{clock.read_out(step, seen):.0f}")
            if is_eval:
                keeper.evaluate(seen)
            if is_snapshot:
                last_snapshot = keeper.snapshot(step)
            clock.restart(step, seen)

    # Done: the log, and one summary line.
    if rank == 0:
        log_path, tail = keeper.write_log(), log["loss"][-100:]
        say(f"done: {args.steps:,} steps, {args.steps * B:,} images seen, {clock.rate()} (after {WARM_UP_STEPS} "
            f"warm-up steps, without evaluations and snapshots), final loss {np.mean(tail):.4g} "
            f"(mean of the last {len(tail)} steps)")
        for s, e_train, e_val in zip(args.eval_sigmas, log["E_train"][-1], log["E_val"][-1]):
            say(f"  sigma {s:g}: E_train {e_train:.4g}, E_val {e_val:.4g}, gap {(e_val - e_train) / e_train:+.3f}")
        say(f"wrote {len(log['snapshot_images'])} snapshots (last: {last_snapshot}) and {log_path}")


class Clock:
    """The training loop's timing: images/s over the steps after the warm-up steps (compilation, CUDA-graph
    recording), without evaluations and snapshots, and the plan_line printed once the step time is known."""

    def __init__(self, start, batch, planned=False):
        self.start, self.tick, self.tick_images = start, time.perf_counter(), start * batch
        self.loop_start, self.warm, self.planned = self.tick, None, planned  # warm: (time, step) after the warm-up
        self.timed_seconds, self.timed_images, self.eval_seconds = 0.0, 0, None

    def time_evaluation(self, evaluate):
        tick = time.perf_counter()
        evaluate()
        self.eval_seconds = time.perf_counter() - tick
        self.tick = self.loop_start = time.perf_counter()

    def plan(self, bar, step, device, line):
        """Once FLUSH_EVERY steps or PLAN_AFTER seconds after the warm-up have passed: print line(step seconds,
        evaluation seconds, warm-up seconds)."""
        warm = self.warm
        if self.planned or not warm or (step - warm[1] < FLUSH_EVERY and time.perf_counter() - warm[0] < PLAN_AFTER):
            return
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        bar.write(line((time.perf_counter() - warm[0]) / (step - warm[1]), self.eval_seconds,
                       warm[0] - self.loop_start))
        self.planned = True

    def read_out(self, step, seen):
        """Images/s since the last read-out; the time counts towards the rate after the warm-up steps."""
        now = time.perf_counter()
        if step > self.start + WARM_UP_STEPS:
            self.timed_seconds, self.timed_images = self.timed_seconds + now - self.tick, self.timed_images + \
                seen - self.tick_images
        return (seen - self.tick_images) / (now - self.tick)

    def restart(self, step, seen):
        self.tick, self.tick_images = time.perf_counter(), seen
        if step == self.start + WARM_UP_STEPS:
            self.warm = self.tick, step

    def rate(self):
        return (f"{self.timed_images / self.timed_seconds:,.1f} images/s" if self.timed_seconds > 0
                else "images/s not timed")


if __name__ == "__main__":
    plumbing.run_cli(main)
