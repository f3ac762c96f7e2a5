"""Shared test fixtures: the repository on sys.path, one torch thread, synthetic Fashion-MNIST files."""
import contextlib
import gzip
import os
import resource
import subprocess
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs a whole pipeline (-m 'not slow' leaves it out; CI runs it)")


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One intra-op thread: the tests use tiny tensors, for which a second (spinning) thread only
    costs time, up to 50x on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """A user cache of the test session's own (XDG_CACHE_HOME, also for the scripts the tests start), so that the
    classifier feature networks trained on synthetic data never land in, or come from, the real one."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = old


def write_idx(path, array):
    """A gzipped IDX file of uint8 (the MNIST / Fashion-MNIST format)."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fashion_mnist(root, n_train, n_val, classes=10, seed=0):
    """Random 28x28 images in Fashion-MNIST's file names and format; labels cycle through `classes`."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("t10k", n_val)):
        write_idx(os.path.join(root, f"{split}-images-idx3-ubyte.gz"), rng.integers(0, 256, (count, 28, 28)))
        write_idx(os.path.join(root, f"{split}-labels-idx1-ubyte.gz"), np.arange(count) % classes)
    return str(root)


@contextlib.contextmanager
def file_size_limit(size):
    """Files of this process can grow to `size` bytes only (as ulimit -f: writes beyond fail with EFBIG, Python
    ignoring SIGXFSZ), while the block runs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def run_tiny_script(script, out, data_dir, *extra, timeout=900):
    """Run a shell script of the repository (path relative to it) with --device cpu --tiny --out OUT and the
    `extra` options on the synthetic Fashion-MNIST in data_dir, one thread, with the Python that runs the tests
    (PYTHON: the one that has torch, also in a virtual environment that is not activated); assert it succeeded;
    -> its stdout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", DATA_DIR=str(data_dir), PYTHON=sys.executable)
    done = subprocess.run(["bash", os.path.join(root, script), "--device", "cpu", "--tiny", "--out", str(out), *extra],
                          env=env, capture_output=True, text=True, timeout=timeout, cwd=root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def perturbed(net):
    """net with 0.1 * N(0, 1) (global generator) added to every weight, so that its zero-initialised output
    layers give a non-trivial denoiser; in place, returned."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def one_line(text, *words):
    """Assert that a message is one line (a trailing newline allowed) that names each of words: its key words
    (flags, paths, numbers, what to do), not its wording."""
    assert text.count("\n") <= 1 and "\n" not in text.rstrip("\n"), text
    missing = [word for word in words if word not in text]
    assert not missing, f"{missing} not in: {text}"


def exit_status(main, capsys):
    """(exit status, stderr) of main() under plumbing.run_cli, as a script ends: stderr of this call alone."""
    import plumbing  # here, not above: the scripts import it before torch, which conftest imports first
    capsys.readouterr()  # what earlier calls printed
    with pytest.raises(SystemExit) as exit_info:
        plumbing.run_cli(main)
    return exit_info.value.code, capsys.readouterr().err
