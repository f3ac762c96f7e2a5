"""The paper's EDM method (docs/method.md, "Formulas"): preconditioning at its limits, the loss weight, the
training noise, the sampling grids, the Heun sampler's order and early stopping, and guidance."""
import math

import pytest
import torch

import common

F64 = torch.float64


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
