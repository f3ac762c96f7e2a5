"""Shared code for the study: EDM schedule and preconditioning, loss, samplers,
optimal and error-prone denoisers, networks, data, checkpoints and helpers.

Formulas follow Karras et al. 2022 (EDM, variance exploding) as used by
Kaiser & Kollmann 2026; each function names the formula it implements.
Read top to bottom like the paper's method section.
"""
import json
import math
import os
import sys
import tempfile
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

SIGMA_DATA = 0.5
P_MEAN, P_STD = -1.2, 1.2
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0


class UserError(ValueError):
    """Bad input from the user: the scripts print the message alone and exit 2."""


def check(condition, message):
    """Raise UserError(message) unless condition holds."""
    if not condition:
        raise UserError(message)


# ---------------------------------------------------------------------------
# EDM schedule and preconditioning
# ---------------------------------------------------------------------------

def precond_coeffs(sigma, sigma_data=SIGMA_DATA):
    """EDM preconditioning: c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2),
    c_in = 1/sqrt(s^2+sd^2), c_noise = ln(s)/4."""
    sigma = torch.as_tensor(sigma)
    var = sigma ** 2 + sigma_data ** 2
    c_skip = sigma_data ** 2 / var
    c_out = sigma * sigma_data / var.sqrt()
    c_in = 1 / var.sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def loss_weight(sigma, sigma_data=SIGMA_DATA):
    """EDM loss weight lambda(sigma) = (s^2 + sd^2) / (s sd)^2, so lambda c_out^2 = 1."""
    sigma = torch.as_tensor(sigma)
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def sample_training_sigma(n, p_mean=P_MEAN, p_std=P_STD, generator=None, device=None):
    """EDM training noise levels: ln(sigma) ~ N(P_mean, P_std^2), shape (n,)."""
    z = torch.randn(n, generator=generator, device=device)
    return (z * p_std + p_mean).exp()


def edm_loss(denoiser, y, labels=None, p_mean=P_MEAN, p_std=P_STD, sigma_data=SIGMA_DATA,
             generator=None):
    """EDM loss per image: lambda(sigma) * mean over pixels of (D(y + sigma n; sigma) - y)^2."""
    sigma = sample_training_sigma(y.shape[0], p_mean, p_std, generator, y.device)
    noise = torch.randn(y.shape, generator=generator, device=y.device)
    s = sigma.view(-1, *[1] * (y.ndim - 1))
    denoised = denoiser(y + s * noise, sigma, labels)
    err = (denoised.float() - y).square().flatten(1).mean(1)
    return loss_weight(sigma, sigma_data) * err


def edm_sigmas(num_steps, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO):
    """EDM sampling grid sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho,
    i = 0..N-1, then sigma_N = 0; float64, shape (N+1,)."""
    check(num_steps >= 2, f"num_steps must be at least 2, got {num_steps}")
    check(0 < sigma_min < sigma_max, f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    i = torch.arange(num_steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + i / (num_steps - 1) * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def log_sigmas(num=64, lo=2e-3, hi=80.0):
    """Evaluation grid: num sigmas log-spaced in [lo, hi] (paper: 64 in [2e-3, 80]), float64."""
    check(num >= 1 and 0 < lo <= hi, f"need num >= 1 and 0 < lo <= hi, got {num}, {lo}, {hi}")
    return torch.logspace(math.log10(lo), math.log10(hi), num, dtype=torch.float64)


# ---------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------

def sample_ode(denoise, x_init, sigmas, heun=True, stop_at=None, return_trajectory=False):
    """Deterministic EDM sampler for dx/dsigma = (x - D(x; sigma)) / sigma.

    Euler steps with Heun's second-order correction on every step but the last
    (sigma_N = 0). The state is integrated in float64; `denoise(x, sigma)` gets x
    in x_init's dtype and sigma as a Python float. With `stop_at`, sampling stops
    early at the first grid sigma_k <= stop_at and returns D(x_k; sigma_k).
    With `return_trajectory`, also returns a dict of `sigmas` (K,), `states`
    (K, B, ...) = x_k and `denoised` (K, B, ...) = D(x_k; sigma_k).
    """
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten().tolist()
    check(len(sigmas) >= 2 and sigmas[-1] == 0 and all(a > b for a, b in zip(sigmas, sigmas[1:])),
          "sigmas must decrease strictly and end with 0 (see edm_sigmas)")
    dtype = x_init.dtype
    D = lambda x, s: denoise(x.to(dtype), s).to(torch.float64)  # noqa: E731
    x = x_init.to(torch.float64)
    record = {"sigmas": [], "states": [], "denoised": []}
    for i, (s_cur, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        den = D(x, s_cur)
        if return_trajectory:
            record["sigmas"].append(s_cur)
            record["states"].append(x.to(dtype))
            record["denoised"].append(den.to(dtype))
        if stop_at is not None and s_cur <= stop_at:
            x = den
            break
        d_cur = (x - den) / s_cur
        x_next = x + (s_next - s_cur) * d_cur
        if heun and s_next > 0:
            d_next = (x_next - D(x_next, s_next)) / s_next
            x_next = x + (s_next - s_cur) * (d_cur + d_next) / 2
        x = x_next
    out = x.to(dtype)
    if not return_trajectory:
        return out
    traj = {"sigmas": torch.tensor(record["sigmas"], dtype=torch.float64),
            "states": torch.stack(record["states"]), "denoised": torch.stack(record["denoised"])}
    return out, traj


def guided(d_pos, d_neg, w):
    """Guidance (CFG and autoguidance alike): D_w = D_pos + w (D_pos - D_neg); w = 0 is unguided."""
    return d_pos + w * (d_pos - d_neg)


# ---------------------------------------------------------------------------
# Optimal and error-prone denoisers
# ---------------------------------------------------------------------------

def _per_query(value, batch, like, name):
    """A float or tensor broadcast to shape (batch,), in like's dtype and device."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device).flatten()
    check(value.numel() in (1, batch), f"{name} must be a scalar or have one value per query "
          f"({batch}), got {value.numel()} values")
    return value.expand(batch)


def optimal_denoiser(x, sigma, data, x_labels=None, data_labels=None, chunk_size=None):
    """Optimal (Bayes) denoiser y*(x, sigma) = sum_i y_i softmax_i(-||x - y_i||^2 / (2 sigma^2)).

    x: (B, ...) queries; sigma: float or (B,); data: (N, ...) training points.
    With labels, the sum runs over the points with the query's label only.
    A streaming log-sum-exp over chunks of `data` keeps memory at O(B chunk + B d):
    no (B, N, d) tensor is built. float64 is exact down to sigma = 1e-3; float32
    is fast but loses the order of nearly equidistant points at tiny sigma.
    """
    check(x.ndim >= 1 and data.ndim >= 1, "x and data need a leading batch dimension")
    check(x.shape[1:] == data.shape[1:],
          f"x has point shape {tuple(x.shape[1:])} but data has {tuple(data.shape[1:])}")
    check(data.shape[0] >= 1, "data is empty")
    check((x_labels is None) == (data_labels is None), "give both x_labels and data_labels, or neither")
    B, N = x.shape[0], data.shape[0]
    q = x.reshape(B, -1)
    y = data.reshape(N, -1).to(q)
    sig = _per_query(sigma, B, q, "sigma")
    check(bool((sig > 0).all()), "sigma must be positive")
    scale = 1 / (2 * sig.square())                                    # (B,)
    if chunk_size is None:  # logits of at most ~2^24 elements per chunk
        chunk_size = max(1, min(N, 2 ** 24 // max(B, 1)))
    if x_labels is not None:
        x_labels = torch.as_tensor(x_labels, device=q.device).flatten()
        data_labels = torch.as_tensor(data_labels, device=q.device).flatten()
        check(x_labels.numel() == B and data_labels.numel() == N, "one label per query and per data point")
    run_max = q.new_full((B,), -math.inf)
    run_sum = q.new_zeros(B)
    acc = q.new_zeros(q.shape)
    for start in range(0, N, chunk_size):
        yc = y[start:start + chunk_size]
        # -||x - y||^2 / 2s^2 up to a per-query constant: (2 x.y - ||y||^2) / 2s^2
        logits = (2 * q @ yc.T - yc.square().sum(1)) * scale[:, None]
        if x_labels is not None:
            logits = logits.masked_fill(x_labels[:, None] != data_labels[None, start:start + chunk_size],
                                        -math.inf)
        new_max = torch.maximum(run_max, logits.amax(1))
        safe_max = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
        rescale = torch.exp(run_max - safe_max)
        w = torch.exp(logits - safe_max[:, None])
        run_sum = run_sum * rescale + w.sum(1)
        acc = acc * rescale[:, None] + w @ yc
        run_max = new_max
    check(bool((run_sum > 0).all()), "some queries have a label that no data point carries")
    return (acc / run_sum[:, None]).reshape(x.shape)


def error_prone_denoiser(x, sigma, data, delta, x_labels=None, data_labels=None, chunk_size=None):
    """Error-prone model (toy): optimal denoiser of data smeared by N(0, delta^2),
    y_delta(x, sigma) = (delta^2 x + sigma^2 y*(x, s~)) / (sigma^2 + delta^2), s~^2 = sigma^2 + delta^2.
    sigma and delta: floats or (B,); delta = 0 gives y*."""
    B = x.shape[0]
    q = x.reshape(B, -1)
    sig = _per_query(sigma, B, q, "sigma")
    dlt = _per_query(delta, B, q, "delta")
    check(bool((dlt >= 0).all()), "delta must be >= 0")
    check(bool((sig > 0).all()), "sigma must be positive")
    s2, d2 = sig.square(), dlt.square()
    y_star = optimal_denoiser(x, (s2 + d2).sqrt(), data, x_labels, data_labels, chunk_size).reshape(B, -1)
    out = (d2[:, None] * q + s2[:, None] * y_star) / (s2 + d2)[:, None]
    return out.reshape(x.shape)


# ---------------------------------------------------------------------------
# Networks: EDM-preconditioned U-Net (DDPM++ style) and Transformer (DiT style)
# ---------------------------------------------------------------------------

# (networks section)


# ---------------------------------------------------------------------------
# Data: dataset readers, subsets, conditioning labels
# ---------------------------------------------------------------------------

# (data section)


# ---------------------------------------------------------------------------
# Checkpoint I/O
# ---------------------------------------------------------------------------

# (checkpoint section)


# ---------------------------------------------------------------------------
# Fréchet distance and nearest neighbours
# ---------------------------------------------------------------------------

def frechet_distance(a, b):
    """Fréchet distance between Gaussians fitted to feature sets a (M, d) and b (K, d):
    ||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2), in float64."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    check(a.ndim == 2 and b.ndim == 2 and a.shape[1] == b.shape[1], "features must be (M, d) and (K, d)")
    check(a.shape[0] >= 2 and b.shape[0] >= 2, "need at least 2 samples per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    evals, evecs = torch.linalg.eigh(cov_a)
    root_a = evecs @ torch.diag(evals.clamp(min=0).sqrt()) @ evecs.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


# ---------------------------------------------------------------------------
# Devices, seeds and command-line plumbing
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
    check(device.type != "cuda" or torch.cuda.is_available(), f"--device {name}: CUDA is not available here")
    return device


def run_cli(main):
    """Run a script's main(); a UserError prints 'error: ...' and exits with status 2."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def save_npz(path, args=None, **arrays):
    """Write an .npz atomically (temp file, then rename) and byte-reproducibly (fixed zip
    timestamps); `args` (a dict or argparse.Namespace) is stored as a JSON string under 'args'."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if args is not None:
        arrays["args"] = np.array(json.dumps(vars(args) if hasattr(args, "__dict__") else args,
                                             sort_keys=True, default=str))
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
            for key, value in arrays.items():
                info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
                with zf.open(info, "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asarray(value), allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def load_npz(path):
    """Read an .npz written by save_npz into a dict; 'args' comes back as a dict."""
    check(os.path.isfile(path), f"{path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            out = {key: f[key] for key in f.files}
    except Exception as err:
        raise UserError(f"{path} is not a readable .npz file ({err}); rerun the script that writes it")
    if "args" in out:
        out["args"] = json.loads(str(out["args"]))
    return out
