"""The method of the paper, in the order of docs/method.md: nothing here reads files, parses arguments or
knows a script (plumbing.py holds that).

Formulas follow Karras et al. 2022 (EDM, variance exploding) as used by Kaiser & Kollmann 2026; each function
names the formula it implements. Contents: the EDM schedule, preconditioning and loss; the non-leaking
augmentation; the Heun sampler and guidance; the optimal and error-prone denoisers; E(sigma) and the peak of the
gap; the Fréchet distance and exact nearest neighbours; k-means labels (conditioning granularity); the U-Net and
DiT networks with their EMA.
"""
import contextlib
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


# ---------------------------------------------------------------------------
# EDM schedule, preconditioning and loss (docs/method.md, "Formulas")
# ---------------------------------------------------------------------------

SIGMA_DATA = 0.5


P_MEAN, P_STD = -1.2, 1.2


SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0


class UserError(ValueError):
    """Bad input from the user: the scripts print the message alone and exit 2."""


def check(condition, message):
    """Raise UserError(message) unless condition holds."""
    if not condition:
        raise UserError(message)


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


# ---------------------------------------------------------------------------
# Non-leaking augmentation (docs/method.md, "Non-leaking augmentation")
# ---------------------------------------------------------------------------

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
# Sampler and guidance
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
    carries gets the unconditional y* (the conditional one is undefined there). note(text), if given, is told
    once per such label other than the null label."""
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
        if missing and note is not None:
            note(f"note: no training image has label {', '.join(map(str, sorted(missing)))}: the optimal denoiser "
                 "is unconditional for queries with that label")
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
# Per-noise-level denoising error E(sigma) and the peak of the gap
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
# Conditioning granularity: k-means labels
# ---------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------
# Networks: EDM-preconditioned U-Net (DDPM++ style) and Transformer (DiT style), and their EMA
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
    """EDM-preconditioned U-Net or DiT from a named preset with optional overrides; augment_dim > 0 (AUGMENT_DIM)
    adds the conditioning on augmentation parameters. build_network(**denoiser.config) rebuilds the same
    architecture."""
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


def ema_beta(batch, half_life_images):
    """EMA decay per step for a half-life counted in images: beta = 0.5 ** (batch / half_life)."""
    return 0.5 ** (batch / half_life_images) if half_life_images > 0 else 0.0


@torch.no_grad()
def update_ema(ema, net, beta):
    """Exponential moving average of weights: ema <- beta ema + (1 - beta) net; buffers are copied."""
    torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - beta)
    for b_ema, b in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b)
