"""Non-leaking augmentation (common.augment): EDM's AugmentPipe as the paper's CIFAR-10 base model uses it (p = 0.12,
x-flip multiplier 1e8, y-flip, isotropic scale, rotation, anisotropic scale, fractional translation), its 9-value
conditioning vector in EDM's order, one affine resampling, and zero draws as the identity (docs/method.md,
"Non-leaking augmentation")."""
import math

import numpy as np
import pytest
import torch

import common

DRAWS = len(common.AUGMENT_DRAWS)


def images(n=6, size=16, channels=1, seed=0, dtype=torch.float32):
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2 - 1


def only(n, dtype=torch.float32, **values):
    """Draws (n, 8) with the named columns of common.AUGMENT_DRAWS set, the others zero."""
    params = torch.zeros(n, DRAWS, dtype=dtype)
    for name, value in values.items():
        params[:, common.AUGMENT_DRAWS.index(name)] = value
    return params


# --- EDM's operations, written out as its augment.py composes them (3x3 matrices, centred pixel coordinates) ---

def translate2d(tx, ty):
    return np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]], np.float64)


def scale2d(sx, sy):
    return np.array([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], np.float64)


def rotate2d(theta):
    return np.array([[math.cos(theta), math.sin(-theta), 0], [math.sin(theta), math.cos(theta), 0], [0, 0, 1]])


def translate2d_inv(tx, ty):
    return translate2d(-tx, -ty)


def scale2d_inv(sx, sy):
    return scale2d(1 / sx, 1 / sy)


def rotate2d_inv(theta):
    return rotate2d(-theta)


def edm_matrix(z, w, z_a, r, tx, ty, H, W):
    """EDM's G_inv: each enabled transform multiplies its inverse onto the right, in the pipeline's order."""
    s, s_a = 2 ** (z * 0.2), 2 ** (z_a * 0.2)
    G_inv = np.eye(3)
    G_inv = G_inv @ scale2d_inv(s, s)                                                   # isotropic scale
    G_inv = G_inv @ rotate2d_inv(-w)                                                    # fractional rotation
    G_inv = G_inv @ rotate2d_inv(r) @ scale2d_inv(s_a, 1 / s_a) @ rotate2d_inv(-r)      # anisotropic scale
    G_inv = G_inv @ translate2d_inv(tx * W * 0.125, ty * H * 0.125)                     # fractional translation
    return G_inv


def reflect(i, n):
    """An integer index reflected into [0, n) about the edge pixels (numpy's and torch's 'reflect' padding)."""
    period = 2 * (n - 1)
    i = i % period
    return i if i < n else period - i


def resample_by_loops(image, G_inv):
    """Output pixel (row i, column j) = the input bilinearly interpolated at G_inv (j - cx, i - cy) + centre,
    reading reflected indices outside the image."""
    C, H, W = image.shape
    cx, cy = (W - 1) / 2, (H - 1) / 2
    out = np.zeros((C, H, W))
    for i in range(H):
        for j in range(W):
            x, y, _ = G_inv @ np.array([j - cx, i - cy, 1.0])
            x, y = x + cx, y + cy
            x0, y0 = math.floor(x), math.floor(y)
            fx, fy = x - x0, y - y0
            for dy, wy in ((0, 1 - fy), (1, fy)):
                for dx, wx in ((0, 1 - fx), (1, fx)):
                    out[:, i, j] += wy * wx * image[:, reflect(y0 + dy, H), reflect(x0 + dx, W)]
    return out


def test_the_affine_map_is_edms_composition_of_scale_rotation_anisotropic_scale_and_translation():
    cases = [(0.7, 0.4, -1.1, 2.0, 0.3, -0.8), (-1.5, -2.9, 0.9, -0.6, -1.2, 0.5), (0, 0, 1.3, 0, 0, 0),
             (0.0, 1.0, 0.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0, 0.0, 1.0, 2.0)]
    params = torch.tensor([[0, 0, *c] for c in cases], dtype=torch.float64)
    got = common.augment_matrix(params, 6, 5).numpy()
    for k, case in enumerate(cases):
        np.testing.assert_allclose(got[k], edm_matrix(*case, H=6, W=5), rtol=0, atol=1e-12)


def test_one_bilinear_resampling_with_reflection_as_written_out_by_loops():
    x = images(4, size=6, channels=2, seed=1, dtype=torch.float64)[..., :5]          # 6 rows, 5 columns
    cases = [(1, 0, 0.7, 0.4, -1.1, 2.0, 0.3, -0.8), (0, 1, -1.5, -2.9, 0.9, -0.6, -1.2, 0.5),
             (1, 1, 0, 0, 0, 0, 0, 0), (0, 0, 3.0, 0.2, 0, 0, 0.9, 0.1)]
    params = torch.tensor(cases, dtype=torch.float64)
    y = common.apply_augmentation(x, params)
    for k, (xflip, yflip, *geometric) in enumerate(cases):
        image = x[k].numpy()
        image = image[:, :, ::-1] if xflip else image                                  # pixel blitting first
        image = image[:, ::-1, :] if yflip else image
        np.testing.assert_allclose(y[k].numpy(), resample_by_loops(image, edm_matrix(*geometric, H=6, W=5)),
                                   rtol=0, atol=1e-12)


def test_the_conditioning_vector_has_edms_nine_values_in_its_order():
    z, w, z_a, r, tx, ty = 0.7, 2.5, -1.1, -2.0, 0.3, -0.8
    params = torch.tensor([[1, 1, z, w, z_a, r, tx, ty], [0] * 8], dtype=torch.float64)
    labels = common.augment_labels(params)
    expected = [1, 1, z, math.cos(w) - 1, math.sin(w), z_a * math.cos(r), z_a * math.sin(r), tx, ty]
    assert labels.shape == (2, common.AUGMENT_DIM) == (2, 9) and labels.dtype == torch.float32
    torch.testing.assert_close(labels[0], torch.tensor(expected, dtype=torch.float32))
    assert not labels[1].any(), "no transform: the zero vector"


def test_at_p_0_12_about_71_percent_of_images_get_a_non_zero_vector():
    # EDM's rule: transform k is applied with probability min(1, p * multiplier_k); a flip then flips with
    # probability 1/2. All zero: no x-flip (1/2), no y-flip (1 - p/2) and none of the four other transforms
    p, n = 0.12, 100_000
    _, labels = common.augment(torch.zeros(n, 1, 2, 2), p, torch.Generator().manual_seed(3))
    expected = 1 - 0.5 * (1 - p / 2) * (1 - p) ** 4                                    # 0.718
    tolerance = lambda q: 4 * math.sqrt(q * (1 - q) / n)  # noqa: E731  (4 standard errors of a share of n)
    share = labels.ne(0).any(1).double().mean().item()
    assert expected == pytest.approx(0.718, abs=1e-3) and share == pytest.approx(expected, abs=tolerance(expected))
    per_column = labels.ne(0).double().mean(0)
    # z_a sin r is non-zero only for the half of the anisotropic scalings whose axis is rotated (r != 0)
    rates = [0.5, p / 2, p, p, p, p, p / 2, p, p]
    for column, rate in enumerate(rates):
        assert per_column[column].item() == pytest.approx(rate, abs=tolerance(rate)), column


def test_zero_draws_return_the_image_bit_for_bit_and_probability_zero_draws_none():
    x = images(6, channels=3)
    assert torch.equal(common.apply_augmentation(x, torch.zeros(6, DRAWS)), x)
    y, labels = common.augment(x, 0.0, torch.Generator().manual_seed(1))
    assert torch.equal(y, x) and labels.shape == (6, 9) and not labels.any()
    params = common.augment_parameters(200, 0.12, torch.Generator().manual_seed(2))
    untouched = params.eq(0).all(1)
    assert 0 < untouched.sum() < 200
    y = common.apply_augmentation(images(200, size=8), params)
    assert torch.equal(y[untouched], images(200, size=8)[untouched])


def test_flips_are_exact_and_quarter_turns_and_integer_shifts_come_out_of_the_affine_map():
    x = images(3, size=8, dtype=torch.float64)
    assert torch.equal(common.apply_augmentation(x, only(3, xflip=1)), x.flip(3))
    assert torch.equal(common.apply_augmentation(x, only(3, yflip=1)), x.flip(2))
    quarter = common.apply_augmentation(x, only(3, torch.float64, rotate=math.pi / 2))
    torch.testing.assert_close(quarter, x.rot90(1, (2, 3)), rtol=0, atol=1e-12)
    one_pixel = 1 / (8 * common.AUGMENT_TRANSLATE_STD)                                  # a shift of one pixel
    shifted = common.apply_augmentation(x, only(3, torch.float64, translate_x=one_pixel, translate_y=-2 * one_pixel))
    rows, cols = [reflect(i + 2, 8) for i in range(8)], [reflect(j - 1, 8) for j in range(8)]
    torch.testing.assert_close(shifted, x[:, :, rows][:, :, :, cols], rtol=0, atol=1e-12)  # right 1, up 2


def test_scaling_magnifies_about_the_centre_and_keeps_a_constant_image():
    x = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    x[0, 0, 6:10, 6:10] = 1                                                            # 4x4 around (7.5, 7.5)
    y = common.apply_augmentation(x, only(1, torch.float64, scale=1 / common.AUGMENT_SCALE_STD))[0, 0]  # s = 2
    assert y.sum().item() == pytest.approx(4 * x.sum().item(), rel=0.1), "area grows by s^2"
    grid = torch.arange(16.0, dtype=torch.float64)
    assert (y.sum(1) * grid).sum() / y.sum() == pytest.approx(7.5) and (y.sum(0) * grid).sum() / y.sum() == 7.5
    constant = torch.full((2, 1, 16, 16), 0.3)
    params = common.augment_parameters(2, 1.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(common.apply_augmentation(constant, params), constant)


def test_a_batch_is_augmented_like_each_image_alone():
    x = images(32)
    params = common.augment_parameters(32, 0.7, torch.Generator().manual_seed(5))
    y = common.apply_augmentation(x, params)
    alone = torch.cat([common.apply_augmentation(x[i:i + 1], params[i:i + 1]) for i in range(32)])
    torch.testing.assert_close(alone, y, rtol=0, atol=1e-5)  # float32 matrix products: rounding only


def test_same_seed_gives_the_same_augmentation_and_the_draws_do_not_depend_on_p():
    x = images(16, channels=3)
    first = common.augment(x, 0.5, torch.Generator().manual_seed(6))
    again = common.augment(x, 0.5, torch.Generator().manual_seed(6))
    other = common.augment(x, 0.5, torch.Generator().manual_seed(7))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[1], other[1])
    states = []
    for p in (0.0, 0.12, 1.0):
        g = torch.Generator().manual_seed(8)
        common.augment(x, p, g)
        states.append(g.get_state())
    assert all(torch.equal(s, states[0]) for s in states), "a resumed run draws the same stream whatever p"


def test_augmentation_refuses_tiny_images_and_wrong_draws():
    with pytest.raises(common.UserError, match="at least 2x2"):
        common.augment(torch.zeros(2, 1, 1, 8), 0.5)
    with pytest.raises(common.UserError, match="draws of shape"):
        common.apply_augmentation(torch.zeros(2, 1, 8, 8), torch.zeros(2, DRAWS + 1))
