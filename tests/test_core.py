"""The paper's EDM formulas and the optimal / error-prone denoisers (docs/method.md, "Formulas"); file and
command-line helpers."""
import math
import os
import random
import sys

import numpy as np
import pytest
import torch

import common
import plumbing

F64 = torch.float64


def brute_force_optimal(x, sigma, data):
    """Reference y*: softmax over the full (B, N) squared-distance table."""
    d2 = (x[:, None, :] - data[None, :, :]).square().sum(-1)
    return torch.softmax(-d2 / (2 * sigma ** 2), dim=1) @ data


# --- preconditioning and loss weight ---------------------------------------

def test_c_skip_tends_to_one_and_c_out_to_zero_as_sigma_vanishes():
    c_skip, c_out, c_in, _ = common.precond_coeffs(torch.tensor(1e-8, dtype=F64))
    assert c_skip == pytest.approx(1, abs=1e-12)
    assert c_out == pytest.approx(0, abs=1e-7)
    assert c_in == pytest.approx(1 / common.SIGMA_DATA)


def test_c_skip_tends_to_zero_and_c_out_to_sigma_data_as_sigma_grows():
    c_skip, c_out, c_in, _ = common.precond_coeffs(torch.tensor(1e8, dtype=F64))
    assert c_skip == pytest.approx(0, abs=1e-12)
    assert c_out == pytest.approx(common.SIGMA_DATA, rel=1e-9)
    assert c_in == pytest.approx(1e-8, rel=1e-9)


def test_c_noise_is_quarter_log_sigma_and_input_has_unit_variance():
    sigma = torch.tensor([0.01, 0.5, 3.0, 80.0], dtype=F64)
    _, _, c_in, c_noise = common.precond_coeffs(sigma)
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    # Var(y + sigma n) = sd^2 + sigma^2, so c_in scales the noisy input to unit variance.
    torch.testing.assert_close(c_in ** 2 * (common.SIGMA_DATA ** 2 + sigma ** 2), torch.ones_like(sigma))


def test_loss_weight_times_c_out_squared_is_one():
    sigma = torch.logspace(-3, 2, 50, dtype=F64)
    _, c_out, _, _ = common.precond_coeffs(sigma)
    torch.testing.assert_close(common.loss_weight(sigma) * c_out ** 2, torch.ones_like(sigma))


def test_training_sigma_is_lognormal_with_paper_parameters():
    g = torch.Generator().manual_seed(0)
    log_sigma = common.sample_training_sigma(200_000, generator=g).log()
    assert log_sigma.mean().item() == pytest.approx(-1.2, abs=0.01)
    assert log_sigma.std().item() == pytest.approx(1.2, abs=0.01)


def test_edm_loss_of_perfect_denoiser_is_zero_and_of_identity_is_lambda_sigma_squared():
    y = torch.rand(64, 1, 4, 4) * 2 - 1
    perfect = lambda x, sigma, labels: y  # noqa: E731
    assert common.edm_loss(perfect, y).abs().max().item() == 0
    g = torch.Generator().manual_seed(1)
    loss = common.edm_loss(lambda x, s, l: x, y, generator=g)
    g = torch.Generator().manual_seed(1)
    sigma = common.sample_training_sigma(64, generator=g)
    noise = torch.randn(y.shape, generator=g)
    expected = common.loss_weight(sigma) * (sigma.view(-1, 1, 1, 1) * noise).square().flatten(1).mean(1)
    torch.testing.assert_close(loss, expected)


# --- sigma grids -----------------------------------------------------------

def test_edm_sigmas_decrease_from_sigma_max_to_sigma_min_then_zero():
    s = common.edm_sigmas(18)
    assert s.shape == (19,) and s.dtype == F64
    assert s[0].item() == pytest.approx(80) and s[-2].item() == pytest.approx(0.002) and s[-1] == 0
    assert bool((s[:-1] > s[1:]).all())
    # rho = 7: sigma_i^(1/7) is linear in i
    root = s[:-1] ** (1 / 7)
    torch.testing.assert_close(root.diff(), root.diff()[:1].expand(17))


def test_log_sigmas_are_log_spaced_with_paper_ends():
    s = common.log_sigmas()
    assert s.shape == (64,)
    assert s[0].item() == pytest.approx(2e-3) and s[-1].item() == pytest.approx(80)
    torch.testing.assert_close(s.log().diff(), s.log().diff()[:1].expand(63))


def test_bad_grids_raise_user_error():
    with pytest.raises(common.UserError):
        common.edm_sigmas(1)
    with pytest.raises(common.UserError):
        common.edm_sigmas(10, sigma_min=-1)
    with pytest.raises(common.UserError):
        common.log_sigmas(10, lo=0)


# --- optimal denoiser --------------------------------------------------------

@pytest.mark.parametrize("sigma", [1e-3, 0.05, 0.7, 5.0, 1e3])
def test_optimal_denoiser_equals_brute_force_softmax(sigma):
    g = torch.Generator().manual_seed(0)
    data = torch.randn(37, 5, generator=g, dtype=F64)
    x = data[torch.randint(37, (23,), generator=g)] + sigma * torch.randn(23, 5, generator=g, dtype=F64)
    got = common.optimal_denoiser(x, sigma, data, chunk_size=8)
    torch.testing.assert_close(got, brute_force_optimal(x, sigma, data), rtol=0, atol=1e-10)


def test_optimal_denoiser_returns_nearest_training_point_as_sigma_vanishes():
    g = torch.Generator().manual_seed(1)
    data = torch.randn(50, 784, generator=g, dtype=F64)
    x = data[:10] + 0.3 * torch.randn(10, 784, generator=g, dtype=F64)
    nearest = data[torch.cdist(x, data).argmin(1)]
    got = common.optimal_denoiser(x, 1e-3, data)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, nearest, rtol=0, atol=1e-12)


def test_optimal_denoiser_returns_data_mean_as_sigma_grows():
    g = torch.Generator().manual_seed(2)
    data = torch.randn(40, 3, generator=g, dtype=F64)
    x = torch.randn(8, 3, generator=g, dtype=F64)
    got = common.optimal_denoiser(x, 1e6, data)
    torch.testing.assert_close(got, data.mean(0).expand(8, 3), rtol=0, atol=1e-8)


def test_optimal_denoiser_is_independent_of_chunk_size_and_accepts_image_shapes():
    g = torch.Generator().manual_seed(3)
    data = torch.randn(100, 1, 4, 4, generator=g, dtype=F64)
    x = torch.randn(7, 1, 4, 4, generator=g, dtype=F64)
    sigma = torch.rand(7, generator=g, dtype=F64) + 0.1
    ref = common.optimal_denoiser(x, sigma, data, chunk_size=100)
    assert ref.shape == x.shape
    for chunk in (1, 3, 64):
        torch.testing.assert_close(common.optimal_denoiser(x, sigma, data, chunk_size=chunk), ref,
                                   rtol=0, atol=1e-13)


def test_optimal_denoiser_accepts_one_sigma_per_query():
    g = torch.Generator().manual_seed(4)
    data = torch.randn(20, 2, generator=g, dtype=F64)
    x = torch.randn(3, 2, generator=g, dtype=F64)
    sigmas = [0.1, 1.0, 10.0]
    got = common.optimal_denoiser(x, torch.tensor(sigmas, dtype=F64), data)
    for i, s in enumerate(sigmas):
        torch.testing.assert_close(got[i:i + 1], brute_force_optimal(x[i:i + 1], s, data), rtol=0, atol=1e-12)


def test_class_conditional_optimal_denoiser_uses_only_points_with_the_query_label():
    g = torch.Generator().manual_seed(5)
    data = torch.randn(30, 4, generator=g, dtype=F64)
    data_labels = torch.arange(30) % 3
    x = torch.randn(9, 4, generator=g, dtype=F64)
    x_labels = torch.arange(9) % 3
    got = common.optimal_denoiser(x, 0.8, data, x_labels, data_labels, chunk_size=7)
    for i in range(9):
        same = data[data_labels == x_labels[i]]
        torch.testing.assert_close(got[i:i + 1], brute_force_optimal(x[i:i + 1], 0.8, same), rtol=0, atol=1e-12)
    # at huge sigma it is the class mean, not the global mean
    far = common.optimal_denoiser(x, 1e6, data, x_labels, data_labels)
    torch.testing.assert_close(far[0], data[data_labels == 0].mean(0), rtol=0, atol=1e-8)


def test_class_conditional_optimal_denoiser_streams_past_chunks_without_the_query_label():
    # Data sorted by label, so whole chunks hold other labels only, before and after the
    # query's; each query sits next to a point of another label.
    g = torch.Generator().manual_seed(11)
    data = torch.randn(12, 3, generator=g, dtype=F64)
    data_labels = torch.arange(12) // 4
    x = data[[0, 5, 11]] + 0.01 * torch.randn(3, 3, generator=g, dtype=F64)
    x_labels = torch.tensor([2, 0, 1])
    for chunk in (1, 2, 5, 12):
        got = common.optimal_denoiser(x, 0.05, data, x_labels, data_labels, chunk_size=chunk)
        for i in range(3):
            same = data[data_labels == x_labels[i]]
            torch.testing.assert_close(got[i:i + 1], brute_force_optimal(x[i:i + 1], 0.05, same),
                                       rtol=0, atol=1e-12)


def test_labelled_optimal_denoiser_is_unconditional_for_no_label_the_null_label_and_a_label_the_data_lacks():
    g = torch.Generator().manual_seed(6)
    data, data_labels = torch.randn(12, 3, generator=g, dtype=F64), torch.arange(12) % 2   # labels 0 and 1 only
    x, sigma = torch.randn(5, 3, generator=g, dtype=F64), torch.full((5,), 0.7, dtype=F64)
    notes = []
    denoise = common.labelled_optimal_denoiser(data, data_labels, null_label=3, note=notes.append)
    labels = torch.tensor([0, 1, 3, 2, 2])  # known, known, null, missing, missing
    got = denoise(x.float(), sigma, labels)
    assert got.dtype == F64, "computed and returned in the data's dtype"
    unconditional = common.optimal_denoiser(x, sigma, data)
    conditional = common.optimal_denoiser(x[:2], sigma[:2], data, labels[:2], data_labels)
    torch.testing.assert_close(got[:2], conditional, rtol=0, atol=1e-6)   # x was rounded to float32
    torch.testing.assert_close(got[2:], unconditional[2:], rtol=0, atol=1e-6)
    torch.testing.assert_close(denoise(x, 0.7), unconditional, rtol=0, atol=0)
    denoise(x, 0.7, torch.tensor([2, 3, 0, 0, 0]))
    assert notes == ["note: no training image has label 2: the optimal denoiser is unconditional for queries "
                     "with that label"], "one note per missing label, none for the null label"


def test_float32_optimal_denoiser_matches_float64_where_most_weights_underflow():
    # At sigma 0.3 in d = 64 nearly all weights exp(logit - max) lie below float32's range.
    g = torch.Generator().manual_seed(12)
    data = torch.randn(300, 64, generator=g, dtype=F64)
    x = data[:6] + 0.5 * torch.randn(6, 64, generator=g, dtype=F64)
    ref = common.optimal_denoiser(x, 0.3, data)
    got = common.optimal_denoiser(x.float(), 0.3, data.float(), chunk_size=50)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5)


def test_optimal_denoiser_rejects_bad_input_with_user_error():
    data = torch.randn(5, 2)
    with pytest.raises(common.UserError, match="sigma must be positive"):
        common.optimal_denoiser(torch.randn(3, 2), 0.0, data)
    with pytest.raises(common.UserError, match="point shape"):
        common.optimal_denoiser(torch.randn(3, 3), 1.0, data)
    with pytest.raises(common.UserError, match="label that no data point carries"):
        common.optimal_denoiser(torch.randn(1, 2), 1.0, data, torch.tensor([7]), torch.zeros(5, dtype=torch.long))


def test_float32_posterior_weights_far_below_rounding_are_dropped_without_changing_results():
    # nearly one-hot weights (noise 0.5 at sigma 1 in d = 784): every weight but one lies far below 2^-63
    g = torch.Generator().manual_seed(23)
    data = torch.rand(500, 784, generator=g, dtype=F64) * 2 - 1
    x = data[:8] + 0.5 * torch.randn(8, 784, generator=g, dtype=F64)
    got = common.optimal_denoiser(x.float(), 1.0, data.float(), chunk_size=64)
    torch.testing.assert_close(got.double(), brute_force_optimal(x, 1.0, data), rtol=0, atol=1e-6)


# --- error-prone denoiser and guidance -------------------------------------

def test_error_prone_denoiser_with_zero_delta_equals_optimal():
    g = torch.Generator().manual_seed(6)
    data = torch.randn(12, 2, generator=g, dtype=F64)
    x = torch.randn(9, 2, generator=g, dtype=F64) * 3
    torch.testing.assert_close(common.error_prone_denoiser(x, 0.9, data, 0.0),
                               common.optimal_denoiser(x, 0.9, data), rtol=0, atol=1e-14)


def test_error_prone_denoiser_is_posterior_mean_of_smeared_data_for_one_point():
    # One training point y0 smeared by N(0, delta^2): the posterior mean of a Gaussian prior
    # N(y0, delta^2) under noise sigma is (delta^2 x + sigma^2 y0) / (sigma^2 + delta^2).
    y0 = torch.tensor([[1.0, -2.0]], dtype=F64)
    x = torch.randn(5, 2, dtype=F64)
    sigma, delta = 0.7, 1.3
    expected = (delta ** 2 * x + sigma ** 2 * y0) / (sigma ** 2 + delta ** 2)
    torch.testing.assert_close(common.error_prone_denoiser(x, sigma, y0, delta), expected)


def test_error_prone_denoiser_accepts_one_sigma_and_delta_per_query():
    g = torch.Generator().manual_seed(13)
    data = torch.randn(15, 2, generator=g, dtype=F64)
    x = torch.randn(4, 2, generator=g, dtype=F64) * 2
    sigmas, deltas = [0.05, 0.5, 1.5, 20.0], [0.0, 1.2, 0.3, 2.2]
    got = common.error_prone_denoiser(x, torch.tensor(sigmas, dtype=F64), data, torch.tensor(deltas, dtype=F64))
    for i, (s, d) in enumerate(zip(sigmas, deltas)):
        smeared = brute_force_optimal(x[i:i + 1], (s ** 2 + d ** 2) ** 0.5, data)
        expected = (d ** 2 * x[i:i + 1] + s ** 2 * smeared) / (s ** 2 + d ** 2)
        torch.testing.assert_close(got[i:i + 1], expected, rtol=0, atol=1e-12)


def test_error_prone_denoiser_rejects_negative_delta():
    with pytest.raises(common.UserError, match="delta"):
        common.error_prone_denoiser(torch.randn(2, 2), 1.0, torch.randn(3, 2), -0.1)


def test_guidance_with_zero_weight_is_unguided_and_extrapolates_linearly():
    pos, neg = torch.randn(4, 3), torch.randn(4, 3)
    torch.testing.assert_close(common.guided(pos, neg, 0.0), pos)
    torch.testing.assert_close(common.guided(pos, neg, 2.0), pos + 2 * (pos - neg))


def test_guided_denoiser_passes_every_argument_and_skips_the_negative_at_zero_weight():
    calls = []

    def d_pos(x, sigma, labels):
        return x * sigma + labels

    def d_neg(x, sigma, labels):
        calls.append(labels)
        return x - sigma

    x, sigma, labels = torch.randn(3, 2), torch.tensor(0.7), torch.ones(3, 2)
    assert common.guided_denoiser(d_pos, d_neg, 0.0) is d_pos and not calls
    got = common.guided_denoiser(d_pos, d_neg, 1.5)(x, sigma, labels)
    torch.testing.assert_close(got, common.guided(d_pos(x, sigma, labels), d_neg(x, sigma, labels), 1.5))
    assert all(c is labels for c in calls)


def test_negative_of_classifier_free_guidance_drops_the_labels_and_autoguidance_must_fit():
    seen = []
    d_neg = common.negative_denoiser(lambda x, sigma, labels: seen.append(labels) or x)
    d_neg(torch.zeros(2), 1.0, torch.tensor([0, 1]))
    assert seen == [None]
    other = lambda x, sigma, labels=None: x  # noqa: E731
    assert common.negative_denoiser(None, other) is other
    common.check_guidance("m", (1, 8, 8), 3)
    common.check_guidance("m", (1, 8, 8), 3, ("small.pt", (1, 8, 8), 0))
    with pytest.raises(common.UserError, match="--neg uncond needs a class-conditional denoiser, but m"):
        common.check_guidance("m", (1, 8, 8), 0)
    for neg in (("small.pt", (1, 16, 16), 0), ("small.pt", (3, 8, 8), 3), ("small.pt", (1, 8, 8), 10)):
        with pytest.raises(common.UserError, match="--neg small.pt does not fit m: it needs the same image size"):
            common.check_guidance("m", (1, 8, 8), 3, neg)


# --- sampler ---------------------------------------------------------------

def test_heun_sampler_on_optimal_denoiser_of_one_point_returns_that_point():
    y0 = torch.tensor([[3.0, -1.0, 0.5]], dtype=F64)
    x_init = 80 * torch.randn(6, 3, generator=torch.Generator().manual_seed(7), dtype=F64)
    out = common.sample_ode(lambda x, s: common.optimal_denoiser(x, s, y0), x_init, common.edm_sigmas(18))
    torch.testing.assert_close(out, y0.expand(6, 3), rtol=0, atol=1e-9)


def test_heun_sampler_converges_at_second_order_and_euler_at_first_on_gaussian_data():
    # Data N(0, s0^2): D(x, s) = s0^2 x / (s0^2 + s^2); the ODE maps x_T to x_T s0 / sqrt(s0^2 + s_max^2).
    s0 = 0.5
    denoise = lambda x, s: s0 ** 2 * x / (s0 ** 2 + s ** 2)  # noqa: E731
    x_init = torch.full((1, 1), 80.0, dtype=F64)
    exact = 80 * s0 / math.sqrt(s0 ** 2 + 80 ** 2)
    err = lambda n, heun: abs(common.sample_ode(denoise, x_init, common.edm_sigmas(n), heun=heun).item() - exact)  # noqa: E731
    assert err(64, True) / err(256, True) > 12      # ~16 for second order
    assert 3 < err(64, False) / err(256, False) < 5  # ~4 for first order
    assert err(256, True) < 1e-3 * exact


def test_sampler_counts_two_evaluations_per_step_but_the_last():
    calls = []
    common.sample_ode(lambda x, s: calls.append(s) or x * 0, torch.zeros(2, 2), common.edm_sigmas(18))
    assert len(calls) == 35


def test_early_stopping_at_sigma_max_returns_denoised_initial_state():
    data = torch.randn(5, 2, dtype=F64)
    denoise = lambda x, s: common.optimal_denoiser(x, s, data)  # noqa: E731
    x_init = 80 * torch.randn(4, 2, dtype=F64)
    out = common.sample_ode(denoise, x_init, common.edm_sigmas(18), stop_at=80.0)
    torch.testing.assert_close(out, denoise(x_init, 80.0))


def test_trajectory_records_states_and_predictions_per_step():
    data = torch.randn(5, 2, dtype=F64)
    denoise = lambda x, s: common.optimal_denoiser(x, s, data)  # noqa: E731
    sigmas = common.edm_sigmas(10)
    x_init = 80 * torch.randn(3, 2, dtype=F64)
    out, traj = common.sample_ode(denoise, x_init, sigmas, return_trajectory=True)
    assert traj["states"].shape == (10, 3, 2) and traj["denoised"].shape == (10, 3, 2)
    torch.testing.assert_close(traj["sigmas"], sigmas[:-1])
    torch.testing.assert_close(traj["states"][0], x_init)
    torch.testing.assert_close(out, traj["denoised"][-1])  # the last step jumps to D
    stopped, part = common.sample_ode(denoise, x_init, sigmas, stop_at=1.0, return_trajectory=True)
    assert part["sigmas"][-1] <= 1.0 < part["sigmas"][-2]
    torch.testing.assert_close(stopped, part["denoised"][-1])


def test_sampler_rejects_grids_that_do_not_end_in_zero():
    with pytest.raises(common.UserError):
        common.sample_ode(lambda x, s: x, torch.zeros(1, 1), torch.tensor([80.0, 1.0]))


# --- Fréchet distance --------------------------------------------------------

def test_frechet_distance_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    a = torch.randn(500, 4, generator=torch.Generator().manual_seed(8), dtype=F64)
    assert common.frechet_distance(a, a) == pytest.approx(0, abs=1e-8)
    assert common.frechet_distance(a, a + 1) == pytest.approx(4.0, rel=1e-8)
    assert common.frechet_distance(a, a + 2) > common.frechet_distance(a, a + 1)


def test_frechet_distance_matches_an_independent_computation_for_non_commuting_covariances():
    # tr (C_a C_b)^1/2 = sum of the square roots of the eigenvalues of the product C_a C_b (real and
    # non-negative: it is similar to C_a^1/2 C_b C_a^1/2), where frechet_distance takes eigenvalues of
    # C_a^1/2 C_b C_a^1/2 built from C_a's eigendecomposition
    g = torch.Generator().manual_seed(10)
    mix_a, mix_b = torch.randn(4, 4, generator=g, dtype=F64), torch.randn(4, 4, generator=g, dtype=F64)
    a = torch.randn(300, 4, generator=g, dtype=F64) @ mix_a
    b = torch.randn(200, 4, generator=g, dtype=F64) @ mix_b + torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=F64)
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    assert (ca @ cb - cb @ ca).abs().max() > 1, "the covariances do not commute"
    cross = torch.linalg.eigvals(ca @ cb).real.clamp(min=0).sqrt().sum()
    expected = (a.mean(0) - b.mean(0)).square().sum() + ca.trace() + cb.trace() - 2 * cross
    assert common.frechet_distance(a, b) == pytest.approx(expected.item(), rel=1e-9)
    assert common.frechet_distance(b, a) == pytest.approx(expected.item(), rel=1e-9)


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    g = torch.Generator().manual_seed(9)
    a = torch.randn(4000, 2, generator=g, dtype=F64)
    b = torch.randn(4000, 2, generator=g, dtype=F64) * 2
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    # closed form for commuting covariances: ||dmu||^2 + sum (sqrt(ea) - sqrt(eb))^2 approx.
    fd = common.frechet_distance(a, b)
    assert fd == pytest.approx((a.mean(0) - b.mean(0)).square().sum().item()
                               + (ca.diagonal().sqrt() - cb.diagonal().sqrt()).square().sum().item(), rel=0.02)


# --- device --------------------------------------------------------------

@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_pick_device_auto_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert plumbing.pick_device("auto") == torch.device(expected)


def test_pick_device_refuses_unknown_names_and_every_absent_device_alike(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    assert plumbing.pick_device("cpu") == torch.device("cpu")
    with pytest.raises(common.UserError, match="unknown device 'abacus'"):
        plumbing.pick_device("abacus")
    for name in ("cuda", "cuda:1", "mps", "xpu", "meta"):
        with pytest.raises(common.UserError, match=f"--device {name}: {name} is not available here \\(use cpu or auto"):
            plumbing.pick_device(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert plumbing.pick_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(common.UserError, match="--device cuda:1: cuda:1 is not available here \\(use cuda, cpu"):
        plumbing.pick_device("cuda:1")


def _gather_in_gloo_group(rank, world, init):
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        cpu, n = torch.device("cpu"), 2 + rank  # shards of different sizes
        shard = torch.arange(3 * n * 2, dtype=F64).view(3, n, 2) + 100 * rank
        rows = plumbing.gather_rows(shard, world, cpu, dim=1)
        assert rows.shape == (3, 5, 2) and torch.equal(rows[:, :2], torch.arange(12, dtype=F64).view(3, 2, 2))
        assert torch.equal(rows[:, 2:], torch.arange(18, dtype=F64).view(3, 3, 2) + 100)
        assert plumbing.gather_rows(torch.full((n,), rank), world, cpu).tolist() == [0, 0, 1, 1, 1]
        assert plumbing.gather_rows(torch.zeros(0, n, 0), world, cpu, dim=1).shape == (0, 5, 0)
        assert plumbing.is_main_process() == (rank == 0)
    finally:
        torch.distributed.destroy_process_group()


def test_gather_rows_concatenates_uneven_shards_of_two_gloo_processes_in_rank_order(tmp_path):
    torch.multiprocessing.spawn(_gather_in_gloo_group, args=(2, f"file://{tmp_path / 'init'}"), nprocs=2)
    shard = torch.ones(2, 3)
    assert plumbing.gather_rows(shard, 1, torch.device("cpu"), dim=1) is shard


# --- per-noise-level error ---------------------------------------------------

def test_image_noise_is_fixed_per_dataset_index_whatever_the_order():
    a = common.image_noise([5, 9, 2], (1, 4, 4))
    b = common.image_noise([2, 5], (1, 4, 4))
    torch.testing.assert_close(a[2], b[0])
    torch.testing.assert_close(a[0], b[1])
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(common.image_noise([5], (1, 4, 4), seed=1)[0], a[0])


def test_denoising_error_of_the_identity_is_sigma_squared_times_the_noise_power():
    images = torch.rand(10, 1, 4, 4) * 2 - 1
    noise = common.image_noise(range(10), (1, 4, 4))
    sigmas = torch.tensor([0.1, 1.0, 10.0], dtype=F64)
    e_id = common.denoising_errors(lambda x, s, c: x, images, noise, sigmas, batch_size=7)
    expected = sigmas[:, None] ** 2 * noise.double().square().flatten(1).mean(1)[None]
    torch.testing.assert_close(e_id, expected, rtol=1e-6, atol=0)


def test_denoising_error_is_zero_for_a_denoiser_that_knows_the_clean_images():
    images = torch.rand(6, 1, 3, 3, dtype=F64) * 2 - 1
    noise = common.image_noise(range(6), (1, 3, 3)).double()
    labels = torch.arange(6)                      # here the "label" identifies the image
    oracle = lambda x, s, c: images[c]            # noqa: E731
    err = common.denoising_errors(oracle, images, noise, [0.01, 1.0, 80.0], labels=labels, batch_size=4)
    assert err.shape == (3, 6) and err.abs().max().item() == 0


def test_optimal_denoiser_training_error_vanishes_as_sigma_falls_while_validation_does_not():
    g = torch.Generator().manual_seed(10)
    train = torch.rand(16, 1, 4, 4, generator=g, dtype=F64) * 2 - 1
    val = torch.rand(16, 1, 4, 4, generator=g, dtype=F64) * 2 - 1
    opt = lambda x, s, c: common.optimal_denoiser(x, s, train)  # noqa: E731
    sigmas = [0.002, 0.01, 1.0]
    e_train = common.denoising_errors(opt, train, common.image_noise(range(16), (1, 4, 4)).double(), sigmas).mean(1)
    e_val = common.denoising_errors(opt, val, common.image_noise(range(16, 32), (1, 4, 4)).double(), sigmas).mean(1)
    assert e_train[0] < 1e-12 and e_train[1] < 1e-10
    assert e_val[0] > 0.05 and e_val[2] > e_train[2]


# --- files ---------------------------------------------------------------------

def test_temp_files_a_killed_writer_left_for_the_same_target_go_under_its_lock(tmp_path):
    stale, other = tmp_path / ".a.npz.12345.tmp", tmp_path / ".b.npz.12345.tmp"
    stale.write_bytes(b"x" * 100)
    other.write_bytes(b"x")
    with plumbing.exclusive(tmp_path / "a.npz"):  # atomic_write alone leaves them: they may be a live writer's
        plumbing.save_npz(tmp_path / "a.npz", x=np.zeros(3))
    assert sorted(os.listdir(tmp_path)) == [".b.npz.12345.tmp", "a.npz"]


def test_atomic_write_leaves_no_temp_file_when_the_writer_fails(tmp_path):
    def fail(f):
        f.write(b"partial")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        plumbing.atomic_write(tmp_path / "a.pt", fail)
    assert os.listdir(tmp_path) == []


def test_atomic_write_gives_the_files_the_umasks_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        npz = plumbing.save_npz(tmp_path / "a.npz", x=np.zeros(3))
        pt = plumbing.save_checkpoint({"a": 1}, tmp_path / "a.pt")
        os.umask(0o077)
        private = plumbing.save_npz(tmp_path / "b.npz", x=np.zeros(3))
    finally:
        os.umask(old)
    assert [os.stat(p).st_mode & 0o777 for p in (npz, pt, private)] == [0o644, 0o644, 0o600]


def test_unreadable_checkpoint_says_permission_denied_without_telling_to_delete_it(tmp_path, monkeypatch):
    path = plumbing.save_checkpoint({"kind": plumbing.CHECKPOINT_KIND}, tmp_path / "snapshot-000000008.pt")

    def denied(f, *args, **kwargs):
        raise PermissionError(13, "Permission denied", os.fspath(f))
    monkeypatch.setattr(torch, "load", denied)
    with pytest.raises(common.UserError) as err:
        plumbing.load_checkpoint(path)
    assert str(err.value) == f"cannot read {path}: Permission denied"


def test_npz_passed_as_a_checkpoint_is_named_as_such_and_not_called_corrupted(tmp_path):
    path = plumbing.save_npz(tmp_path / "gap.npz", x=np.zeros(3))
    with pytest.raises(common.UserError, match=r"gap\.npz is an \.npz file .*not a torch checkpoint") as err:
        plumbing.load_checkpoint(path)
    assert "delete" not in str(err.value) and "corrupted" not in str(err.value)


def test_garbage_checkpoint_is_called_corrupted_or_foreign(tmp_path):
    path = tmp_path / "snapshot-000000008.pt"
    path.write_bytes(b"not a torch file")
    with pytest.raises(common.UserError, match="corrupted .*or not a torch checkpoint"):
        plumbing.load_checkpoint(path)


class Pickled:
    """An object that only unpickling with code from the file could rebuild."""


def test_checkpoint_with_pickled_objects_is_refused_without_running_them(tmp_path):
    path = plumbing.save_checkpoint({"kind": plumbing.CHECKPOINT_KIND, "net": Pickled()}, tmp_path / "snap.pt")
    with pytest.raises(common.UserError, match="holds objects other than tensors, numpy arrays and plain") as err:
        plumbing.load_checkpoint(path)
    assert "\n" not in str(err.value)


def test_rng_state_is_tensors_and_plain_values_and_restores_every_generator(tmp_path):
    g = torch.Generator().manual_seed(3)
    state = plumbing.rng_state(noise=g)
    torch.save(state, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)
    draws = lambda: (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=g).item())  # noqa: E731
    first = draws()
    plumbing.set_rng_state(loaded, noise=g)
    assert draws() == first


# --- command line ----------------------------------------------------------------

def test_check_writable_names_files_where_folders_are_expected_and_back(tmp_path):
    (tmp_path / "file").write_text("x")
    plumbing.check_writable(tmp_path / "new" / "deeper" / "a.npz")
    plumbing.check_writable(tmp_path / "new" / "run", folder=True)
    plumbing.check_writable(tmp_path, folder=True)
    plumbing.check_writable(None)
    for path, folder, words in [(tmp_path / "file", True, "is an existing file, not a folder"),
                                (tmp_path, False, "is a folder, not a file name"),
                                (tmp_path / "file" / "a.npz", False, "is a file, not a folder"),
                                (tmp_path / "file" / "run", True, "is a file, not a folder")]:
        with pytest.raises(common.UserError, match=words):
            plumbing.check_writable(path, folder)


def test_check_writable_reports_a_folder_without_write_permission(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: os.fspath(path) != str(tmp_path))
    with pytest.raises(common.UserError, match=f"--out {tmp_path}/run/a.npz cannot be written: permission "
                                               f"denied in {tmp_path}$"):
        plumbing.check_writable(tmp_path / "run" / "a.npz")


def test_ctrl_c_prints_one_line_with_the_registered_progress_and_exits_130(capsys):
    def main(progress):
        if progress:
            plumbing.on_interrupt(lambda: "after 3 of 9 steps")
        raise KeyboardInterrupt
    for progress, line in ((True, "interrupted after 3 of 9 steps\n"), (False, "interrupted\n")):
        with pytest.raises(SystemExit) as exit_info:
            plumbing.run_cli(lambda: main(progress))
        assert exit_info.value.code == 130 and capsys.readouterr().err == line


def test_result_files_name_their_script_and_other_programs_files_are_not_replaced_unasked(tmp_path):
    path = str(tmp_path / "gap.npz")
    plumbing.save_npz(path, args={"n": 2}, script="eval_gap.py", x=np.zeros(3))
    data = plumbing.load_npz(path)
    assert data["script"] == "eval_gap.py" and plumbing.result_script(data) == "eval_gap.py"
    assert plumbing.earlier_result(path, "eval_gap.py")["args"] == {"n": 2}
    assert plumbing.earlier_result(path, "sample_memorize.py", force=True) is None
    assert plumbing.earlier_result(str(tmp_path / "new.npz"), "eval_gap.py") is None
    with pytest.raises(common.UserError, match="holds results of eval_gap.py, so sample_memorize.py would replace "
                                               "it: give another --out, or --force to replace it"):
        plumbing.earlier_result(path, "sample_memorize.py")
    np.savez(tmp_path / "foreign.npz", e_train=np.zeros(2))
    with pytest.raises(common.UserError, match="foreign.npz exists and was not written by it"):
        plumbing.earlier_result(str(tmp_path / "foreign.npz"), "eval_gap.py")
    (tmp_path / "notes.npz").write_text("not an npz")
    with pytest.raises(common.UserError, match="is not a result file it can read"):
        plumbing.earlier_result(str(tmp_path / "notes.npz"), "eval_gap.py")
    np.savez(tmp_path / "args.npz", args=np.array("not json"))
    with pytest.raises(common.UserError, match="'args' entry that is not the JSON"):
        plumbing.load_npz(str(tmp_path / "args.npz"))


def test_in_processes_gives_each_jobs_result_and_print_in_order_from_other_processes_and_raises_its_error(capsys):
    def job(i):
        def run():
            print(f"job {i}")
            return i * i, os.getpid(), torch.get_num_threads()
        return run
    results = plumbing.in_processes([job(i) for i in range(5)], 2)
    assert [square for square, _, _ in results] == [0, 1, 4, 9, 16]
    assert capsys.readouterr().out == "".join(f"job {i}\n" for i in range(5))
    pids = {pid for _, pid, _ in results}
    if sys.platform == "linux":  # forked: other processes, of one torch thread each
        assert os.getpid() not in pids and len(pids) <= 2 and {t for _, _, t in results} == {1}
    else:
        assert pids == {os.getpid()}
    assert {pid for _, pid, _ in plumbing.in_processes([job(0), job(1)], 1)} == {os.getpid()}  # one process: here

    def fails():
        raise ValueError("a broken figure")
    with pytest.raises(ValueError, match="a broken figure"):
        plumbing.in_processes([job(0), fails, job(2)], 2)
