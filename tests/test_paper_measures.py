"""The measures, each on cases with a known answer: the gap's intervals and onset, exact nearest neighbours, the
memorization ratio, bootstrap intervals, the Frechet distance, noisy empirical densities and the log-likelihood
ratio, the references and their draws, the trajectory score with its intervals, validity and null, the peak probe's
rule and the 1-NN cosine references (docs/method.md, "Measures of the image studies")."""
import math

import numpy as np
import pytest
import torch

import common
import eval_gap
import plumbing
import sample_memorize
from conftest import write_fashion_mnist

F64 = torch.float64
R = 16  # image resolution of the synthetic sets


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A tiny synthetic Fashion-MNIST: 24 training and 12 validation images of 28x28, 3 classes."""
    return write_fashion_mnist(tmp_path_factory.mktemp("data"), 24, 12, classes=3)


def source(data_dir, subset, labels=None):
    """The training subset `subset` of the synthetic data at resolution R (plumbing.TrainingSource)."""
    return plumbing.TrainingSource("fashion-mnist", R, np.asarray(subset), labels, data_dir=data_dir)


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


def test_gap_intervals_cover_the_true_peak_and_curve_and_narrow_with_more_images():
    # per-image errors with known means: E_train = 1 at every sigma, E_val = 1 + G with G peaking at 2
    rng, true_gap = np.random.default_rng(0), np.array([0.5, 2.0, 1.0])
    def errors(n, mean):  # exponential errors with the given mean per sigma: (S, n)
        return rng.exponential(1.0, (len(mean), n)) * np.asarray(mean)[:, None]
    widths = []
    for n in (64, 1024):
        e_train, e_val = errors(n, np.ones(3)), errors(n, 1 + true_gap)
        curve = eval_gap.relative_gap(e_train.mean(1), e_val.mean(1))
        (low, high), pointwise = eval_gap.gap_intervals(e_train, e_val, n_boot=400, seed=1)
        assert low < eval_gap.peak_gap(curve) < high and low < 2.0 < high
        assert pointwise.shape == (3, 2) and (pointwise[:, 0] < curve).all() and (curve < pointwise[:, 1]).all()
        widths.append([high - low, *np.diff(pointwise, axis=1)[:, 0]])
    assert (np.array(widths[1]) < np.array(widths[0]) / 2).all()  # about 1 / sqrt(n)
    again = eval_gap.gap_intervals(e_train, e_val, n_boot=400, seed=1)
    assert tuple(again[0]) == (low, high) and np.array_equal(again[1], pointwise)  # seeded
    # the optimal denoiser at small sigma: E_train = 0 gives G = inf, left out like peak_index leaves it out
    zero = np.zeros((1, 8))
    (low, high), pointwise = eval_gap.gap_intervals(np.vstack([zero, np.ones((1, 8))]), np.full((2, 8), 3.0),
                                                    n_boot=50)
    assert low == high == 2.0 and np.isnan(pointwise[0]).all() and (pointwise[1] == 2.0).all()
    assert all(np.isnan(a).all() for a in eval_gap.gap_intervals(zero, np.ones((1, 8)), n_boot=10))


def test_overfitting_onset_is_images_seen_at_smallest_validation_error_per_sigma():
    seen = np.array([10, 20, 40, 80])
    e_val = np.array([[5.0, 1.0, 3.0],
                      [4.0, 2.0, 2.0],
                      [3.0, 3.0, 1.0],
                      [4.5, 4.0, 1.0]])                 # sigma 0: U-shape, 1: rising, 2: falling, then flat
    np.testing.assert_array_equal(eval_gap.overfitting_onset(seen, e_val), [40, 10, 40])
    e_val[2, 0] = np.nan
    assert eval_gap.overfitting_onset(seen, e_val)[0] == 20, "NaN entries are skipped"
    stacked = np.stack([e_val, e_val[:, ::-1]])        # a leading guidance axis
    np.testing.assert_array_equal(eval_gap.overfitting_onset(seen, stacked)[1], [40, 10, 20])


def test_peak_sigma_is_where_the_relative_gap_is_largest():
    sigmas = np.geomspace(0.01, 10, 31)
    e_train = 0.1 * np.ones(31)
    bump = lambda centre: e_train * (1 + np.exp(-np.log(sigmas / centre) ** 2))  # noqa: E731
    gap = eval_gap.relative_gap(e_train, np.stack([bump(1.2), bump(0.1)]))
    np.testing.assert_allclose(gap.max(1), 1, rtol=1e-2)
    peaks = eval_gap.peak_sigma(sigmas, gap)
    assert np.all(np.abs(np.log(peaks / [1.2, 0.1])) < np.log(sigmas[1] / sigmas[0]))
    gap[0, 20] = np.nan
    assert np.array_equal(eval_gap.peak_sigma(sigmas, gap), peaks), "NaN entries are skipped"
    gap[1, 0] = np.inf  # E_train = 0, as for the optimal denoiser at small sigma
    assert np.array_equal(eval_gap.peak_sigma(sigmas, gap), peaks), "inf entries are skipped"
    assert common.peak_index([np.nan, np.inf]) == 0
    assert np.isinf(eval_gap.relative_gap([0.0, 1.0], [0.5, 1.0])[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nearest_neighbours_equal_brute_force_cdist_for_any_chunk_size(dtype):
    g = torch.Generator().manual_seed(1)
    queries, data = torch.randn(37, 3, 4, generator=g, dtype=dtype), torch.randn(90, 3, 4, generator=g, dtype=dtype)
    ref = torch.cdist(queries.flatten(1).double(), data.flatten(1).double(), compute_mode="donot_use_mm_for_euclid_dist")
    ref_dist, ref_index = ref.sort(dim=1, stable=True)
    for k in (1, 2, 11):
        for chunk in (1, 7, 90, 1000, None):
            dist, index = common.nearest_neighbours(queries, data, k, chunk)
            assert dist.dtype == torch.float64 and index.dtype == torch.int64 and dist.shape == (37, k)
            assert torch.equal(index, ref_index[:, :k])
            torch.testing.assert_close(dist, ref_dist[:, :k], rtol=1e-12, atol=0)


def test_nearest_neighbours_break_ties_by_index_even_with_many_duplicates():
    g = torch.Generator().manual_seed(2)
    data = torch.randn(40, 6, generator=g)
    data[10:30] = data[5]  # 21 copies: more than the candidates of the float32 search
    queries = torch.stack([data[5], data[5] + 1e-3, data[0]])
    dist, index = common.nearest_neighbours(queries, data, k=3)
    assert index[0].tolist() == [5, 10, 11] and index[1].tolist() == [5, 10, 11]
    assert dist[0].tolist() == [0.0, 0.0, 0.0] and dist[2, 0] == 0 and index[2, 0] == 0


def test_memorization_ratio_rules_for_copies_duplicates_and_a_single_image():
    ratio = sample_memorize.memorization_ratio([0.0, 1.0, 0.0, 2.0, 3.0], [4.0, 4.0, 0.0, 2.0, float("inf")])
    assert ratio.tolist() == [0.0, 0.25, 0.0, 1.0, 0.0]
    with pytest.raises(common.UserError):
        sample_memorize.memorization_ratio([2.0], [1.0])


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_more_data():
    rng = np.random.default_rng(0)
    small, large = rng.random(30) < 0.3, rng.random(3000) < 0.3
    for values in (small, large):
        low, high = sample_memorize.bootstrap_ci(values, seed=1)
        assert low <= values.mean() <= high and low < high
    assert np.ptp(sample_memorize.bootstrap_ci(large)) < np.ptp(sample_memorize.bootstrap_ci(small)) / 4
    assert sample_memorize.bootstrap_ci(small, seed=3) == sample_memorize.bootstrap_ci(small, seed=3)
    assert sample_memorize.bootstrap_ci(np.zeros(10)) == (0.0, 0.0)
    low, high = sample_memorize.bootstrap_ci(rng.normal(size=200), statistic=np.median, level=0.5)
    assert low < high


def brute_force_log_density(x, sigma, data):
    """Reference log p_S(x | sigma): log of the mean of N(x; y, sigma^2 I) over the full (B, N) table."""
    d2 = (x[:, None, :] - data[None, :, :]).square().sum(-1)
    log_pdf = -d2 / (2 * sigma ** 2) - x.shape[1] / 2 * math.log(2 * math.pi * sigma ** 2)
    return torch.logsumexp(log_pdf, dim=1) - math.log(len(data))


@pytest.mark.parametrize("sigma", [1e-2, 0.3, 2.0, 50.0])
def test_noisy_log_density_equals_brute_force_gaussian_mixture(sigma):
    g = torch.Generator().manual_seed(20)
    data = torch.randn(41, 6, generator=g, dtype=F64)
    x = data[torch.randint(41, (17,), generator=g)] + sigma * torch.randn(17, 6, generator=g, dtype=F64)
    for chunk in (1, 8, None):
        got = sample_memorize.noisy_log_density(x, sigma, data, chunk_size=chunk)
        torch.testing.assert_close(got, brute_force_log_density(x, sigma, data), rtol=1e-12, atol=1e-9)


def test_noisy_log_density_with_labels_is_the_mixture_of_the_points_with_the_query_label():
    g = torch.Generator().manual_seed(21)
    data, data_labels = torch.randn(30, 4, generator=g, dtype=F64), torch.arange(30) % 3
    x, x_labels = torch.randn(9, 4, generator=g, dtype=F64), torch.tensor([0, 1, 2] * 3)
    sigmas = torch.linspace(0.2, 3, 9, dtype=F64)
    got = sample_memorize.noisy_log_density(x, sigmas, data, x_labels, data_labels, chunk_size=4)
    want = torch.stack([brute_force_log_density(x[i:i + 1], float(sigmas[i]), data[data_labels == x_labels[i]])[0]
                        for i in range(9)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-9)


def test_log_likelihood_ratio_separates_noisy_training_from_noisy_validation_points_and_vanishes_at_large_sigma():
    g = torch.Generator().manual_seed(22)
    train, val = torch.randn(64, 16, generator=g, dtype=F64), torch.randn(64, 16, generator=g, dtype=F64)
    noise = torch.randn(64, 16, generator=g, dtype=F64)
    llr_train = sample_memorize.log_likelihood_ratio(train + 0.8 * noise, 0.8, train, val)
    llr_val = sample_memorize.log_likelihood_ratio(val + 0.8 * noise, 0.8, train, val)
    assert (llr_train > 0).float().mean() > 0.95 and (llr_val < 0).float().mean() > 0.95
    # fresh points from the same distribution score in between, near 0 on average
    fresh = torch.randn(256, 16, generator=g, dtype=F64)
    llr_fresh = sample_memorize.log_likelihood_ratio(fresh + 0.8 * torch.randn(256, 16, generator=g, dtype=F64), 0.8,
                                                     train, val)
    assert llr_val.median() < llr_fresh.median() < llr_train.median() and abs(float(llr_fresh.median())) < 2
    far = sample_memorize.log_likelihood_ratio(train + 1e4 * noise, 1e4, train, val)
    assert far.abs().max() < 1e-3


def test_float32_log_density_drops_weights_far_below_rounding_without_changing_results():
    # nearly one-hot weights (noise 0.5 at sigma 1 in d = 784): every weight but one lies far below 2^-63
    g = torch.Generator().manual_seed(23)
    data = torch.rand(500, 784, generator=g, dtype=F64) * 2 - 1
    x = data[:8] + 0.5 * torch.randn(8, 784, generator=g, dtype=F64)
    torch.testing.assert_close(sample_memorize.noisy_log_density(x.float(), 1.0, data.float(), chunk_size=64).double(),
                               brute_force_log_density(x, 1.0, data), rtol=1e-6, atol=0)


def test_references_hold_equally_many_training_and_validation_images_per_label(data_dir):
    subset = plumbing.choose_subset(24, 12, 0)
    model = sample_memorize.optimal_model(source(data_dir, subset, subset % 3), torch.device("cpu"))
    refs = sample_memorize.reference_pair(model.train, seed=0)
    t_lab, v_lab = model.train.labels[refs.train_pos], model.train.val_labels[refs.val_pos]
    assert refs.conditional
    # 4 training and 4 validation images per class: half the validation images are kept out, and the
    # training reference is a seeded subset of as many training images of the class
    assert [int((v_lab == c).sum()) for c in range(3)] == [int((t_lab == c).sum()) for c in range(3)] == [2, 2, 2]
    assert not set(refs.heldout_pos) & set(refs.val_pos)
    other = sample_memorize.reference_pair(model.train, seed=1)
    assert not np.array_equal(other.train_pos, refs.train_pos) or not np.array_equal(other.val_pos, refs.val_pos)


def test_a_training_subset_larger_than_the_validation_reference_is_subsampled_to_its_size_in_every_draw(data_dir):
    # n = 20 training images, 12 validation images: references of 6 each, the training one drawn anew per draw
    model = sample_memorize.optimal_model(source(data_dir, plumbing.choose_subset(24, 20, 0)), torch.device("cpu"))
    draws = sample_memorize.reference_draws(model.train, seed=0, draws=4)
    assert [len(d.train_pos) for d in draws] == [len(d.val_pos) for d in draws] == [6] * 4
    assert len({tuple(d.train_pos) for d in draws}) == 4 and len({tuple(d.val_pos) for d in draws}) == 4
    # the 6 validation images in neither reference: half are the held-out images, half the null's
    assert all(len(d.heldout_pos) == len(d.null_pos) == 3 and not set(d.heldout_pos) & set(d.null_pos)
               and not (set(d.heldout_pos) | set(d.null_pos)) & set(d.val_pos) for d in draws)
    # the authors' way written out: the LLR of equal-size references, here the brute-force log-mean-exp
    x, s = model.train.x[:3].double() + 0.5, 0.7
    ref_t, ref_v = model.train.x[draws[1].train_pos].double(), model.train.val_x[draws[1].val_pos].double()
    log_p = lambda ref: torch.logsumexp(-((x[:, None] - ref[None]) ** 2).flatten(2).sum(2) / (2 * s * s), 1)  # noqa
    torch.testing.assert_close(draws[1].llr(x, s, None, 2), log_p(ref_t) - log_p(ref_v))
    # with n no larger than the reference there is nothing to draw on the training side
    small = sample_memorize.optimal_model(source(data_dir, plumbing.choose_subset(24, 5, 0)), torch.device("cpu"))
    assert all(d.train_pos.tolist() == list(range(5)) for d in sample_memorize.reference_draws(small.train, 0, 3))


def test_samples_of_a_sampler_that_ignores_the_training_set_do_not_score_like_noisy_training_images(data_dir):
    # the optimal denoiser of held-out validation images: its samples copy images the model never trained on
    model = sample_memorize.optimal_model(source(data_dir, plumbing.choose_subset(24, 6, 0)), torch.device("cpu"))
    refs = sample_memorize.reference_pair(model.train, seed=0)
    held = model.train.val_x[refs.heldout_pos].double()
    other = lambda x, s, labels: common.optimal_denoiser(x.double(), s.double(), held).to(x.dtype)  # noqa: E731
    sigmas = common.edm_sigmas(8)
    probe = sample_memorize.probe_steps(sigmas, [0.3])[0]  # sigma 0.27: noisy images of 16x16 noise separate well
    llr = {}
    for name, denoise in (("memorizing", model.denoise), ("other", other)):
        x_init, _ = sample_memorize.initial_state(np.arange(12), (1, R, R), None, torch.float64, "cpu")
        _, traj = sample_memorize.sample(denoise, x_init, None, sigmas)
        llr[name] = refs.llr(traj["states"][probe], float(sigmas[probe]), None, 12)
    s = float(sigmas[probe])
    sets = sample_memorize.probe_sets(model, refs, np.arange(12), [s], model.denoise, num_samples=12, seed=0,
                                      batch=12)
    llr_train, llr_val = (refs.llr(sets[k][0][0], s, None, 12) for k in ("train", "val"))
    fresh, null = (refs.llr(sample_memorize.noisy(model.train.val_x[pos], pos, np.zeros(len(pos), np.int64), s), s,
                            None, 6) for pos in (refs.heldout_pos, refs.null_pos))
    stats = {k: sample_memorize.trajectory_overlap(v[None], llr_train[None], llr_val[None], fresh[None], null[None])
             for k, v in llr.items()}
    assert stats["memorizing"]["traj_train_overlap"] >= 0.9 and stats["memorizing"]["traj_heldout_score"] > 0.8
    assert stats["memorizing"]["traj_train_score"] > 0.8
    # in between the splits, at the level of noisy fresh images: where a sampler that generalizes lies
    assert stats["other"]["traj_train_overlap"] <= 0.1 and 0.2 < stats["other"]["traj_train_score"] < 0.8
    assert stats["other"]["heldout_train_overlap"] <= 0.2 and abs(stats["other"]["traj_heldout_score"]) < 0.3


def test_overlap_intervals_hold_the_spread_of_reference_draws_and_narrow_with_more_samples():
    rng = np.random.default_rng(0)

    def llr(m, shift):  # (D, P, M) LLRs: training images at +4, held-out and null at 0, validation at -4, states at
        offsets = np.array([-0.3, 0.0, 0.3])[:, None, None]  # shift; the draws move every set a little
        return [rng.normal(mean, 1.0, (3, 1, m)) + offsets * (k == 0) for k, mean in enumerate((shift, 4, -4, 0, 0))]
    widths = []
    for m in (64, 2048):
        sets = llr(m, 1.0)
        out = sample_memorize.overlap_intervals(*sets, n_boot=500, seed=0)
        per_draw = sample_memorize.trajectory_overlap(*sets)["traj_heldout_score"]  # (D, P)
        np.testing.assert_allclose(out["traj_heldout_score"], per_draw.mean(0))
        low, high = out["traj_heldout_score_ci"][0]
        assert low < 0.25 < high  # the truth: (1 - 0) / (4 - 0)
        assert low <= per_draw.min() and per_draw.max() <= high, "the interval holds every draw's value"
        widths.append(high - low)
    assert widths[1] < widths[0]
    # draws that disagree widen the interval beyond the sampling noise of one draw
    one = sample_memorize.overlap_intervals(*[a[:1] for a in sets], n_boot=500, seed=0)["traj_heldout_score_ci"][0]
    assert one[1] - one[0] < 0.5 * widths[1]
    # a sampler whose states are noisy fresh data: the interval holds 0, as the null's does
    sets = llr(512, 0.0)
    out = sample_memorize.overlap_intervals(*sets, n_boot=500, seed=0)
    for key in ("traj_heldout_score_ci", "null_heldout_score_ci"):
        low, high = out[key][0]
        assert low < 0 < high, key


def test_typicality_tells_states_like_noisy_data_from_states_unlike_anything_in_the_references():
    rng = np.random.default_rng(0)
    held = rng.normal(-400, 20, (2, 500))  # log densities of noisy held-out images
    like = sample_memorize.trajectory_typicality(rng.normal(-400, 20, (2, 500)), held)
    unlike = sample_memorize.trajectory_typicality(rng.normal(-600, 20, (2, 500)), held)
    assert (like["traj_typical"] > 0.95).all() and like["traj_valid"].all()
    assert (unlike["traj_typical"] < 0.05).all() and not unlike["traj_valid"].any()


def gap_result(gaps, cis, seen=(100, 200, 300), sigmas=(0.1, 0.3, 1.0, 3.0), **extra):
    """An eval_gap.py result as load_npz reads it: snapshots d0, d1, ... of one run with these G curves (C, S) and
    their pointwise intervals (C, S, 2)."""
    return dict(digests=np.array([f"d{i}" for i in range(np.shape(gaps)[-2])]), gap=np.array(gaps, float),
                gap_ci=np.array(cis, float), sigmas=np.array(sigmas), images_seen=np.array(seen),
                checkpoints=np.array([f"run/snapshot-{s:09d}.pt" for s in seen]), **extra)


def test_the_peak_probe_is_a_clear_own_peak_else_the_next_clear_peak_of_the_run_else_the_own_argmax():
    clear, unclear = lambda g: [(v - 0.1, v + 0.1) for v in g], lambda g: [(v - 9, v + 9) for v in g]  # noqa: E731
    gaps = [[0.05, 0.02, 0.01, 0.08], [0.2, 0.9, 0.1, 0.0], [0.3, 2.0, 5.0, 1.0]]
    data = gap_result(gaps, [unclear(gaps[0]), clear(gaps[1]), clear(gaps[2])])
    assert sample_memorize.gap_peaks(data, "d0")[:2] == (0.3, "later")  # d1's clear peak, not d0's noise at 3.0
    assert sample_memorize.gap_peaks(data, "d1")[:2] == (0.3, "own")
    assert sample_memorize.gap_peaks(data, "d2")[:2] == (1.0, "own")
    flat = gap_result(gaps, [unclear(g) for g in gaps])
    assert sample_memorize.gap_peaks(flat, "d0")[:2] == (3.0, "unclear")  # no clear peak from it on: its argmax
    assert sample_memorize.gap_peaks(flat, "d9")[1] == "none" and sample_memorize.gap_peaks(None, "d0")[1] == "none"
    # another run's snapshots in the same file (--allow-mixed) do not lend their peaks
    mixed = dict(data, checkpoints=np.array(["run/a.pt", "other/b.pt", "other/c.pt"]))
    assert sample_memorize.gap_peaks(mixed, "d0")[:2] == (3.0, "unclear")
    # guidance: the row of the configuration's weight, else w = 0; windows: the whole image (the last entry)
    guided = gap_result(np.stack([gaps, np.array(gaps)[:, ::-1]]), [[clear(g) for g in gaps], [clear(g[::-1]) for g in gaps]],
                        guidance_weights=np.array([0.0, 1.0]))
    assert sample_memorize.gap_peaks(guided, "d1", 1.0)[0] == 1.0 and sample_memorize.gap_peaks(guided, "d1", 2.0)[0] == 0.3
    windowed = dict(gap_result(np.stack([np.zeros((3, 4)), gaps]), np.stack([[clear(g) for g in gaps]] * 2)),
                    windows=np.array([8, 16]))
    assert sample_memorize.gap_peaks(windowed, "d2")[:2] == (1.0, "own")
    features = dict(data, feature_gap=np.array([[0.1, 0.5], [0.2, 0.1], [np.nan, np.nan]]),
                    feature_sigmas=np.array([0.5, 2.0]))
    assert [sample_memorize.gap_peaks(features, d)[2] for d in ("d0", "d1")] == [2.0, 0.5]
    assert math.isnan(sample_memorize.gap_peaks(features, "d2")[2])


def test_one_nn_cosine_probes_never_meet_their_own_image_in_the_reference(data_dir):
    model = sample_memorize.optimal_model(source(data_dir, plumbing.choose_subset(24, 12, 0)), torch.device("cpu"))
    for seed in range(3):
        refs = sample_memorize.reference_pair(model.train, seed)
        assert not set(refs.query_train_pos) & set(refs.fcos_train_pos)
        assert not set(refs.query_val_pos) & set(refs.fcos_val_pos)
        assert set(refs.query_train_pos) | set(refs.fcos_train_pos) == set(refs.train_pos)
        assert len(refs.fcos_train_pos) == len(refs.fcos_val_pos) == len(refs.train_pos) // 2
    # the clean images of the training probes: their nearest reference image is never themselves
    features = plumbing.load_feature_extractor("builtin")
    ref = features(model.train.x[refs.fcos_train_pos])
    own = sample_memorize.nearest_cosine(features(model.train.x[refs.fcos_train_pos]), ref)
    others = sample_memorize.nearest_cosine(features(model.train.x[refs.query_train_pos]), ref)
    assert torch.allclose(own, torch.ones_like(own)) and (others < 1 - 1e-6).all()
    # one training image: no reference to compare with, NaN
    one = sample_memorize.optimal_model(source(data_dir, [3]), torch.device("cpu"))
    refs = sample_memorize.reference_pair(one.train, 0)
    assert len(refs.fcos_train_pos) == 0 and list(refs.query_train_pos) == [0]
    assert torch.isnan(sample_memorize.nearest_cosine(torch.ones(2, 3), torch.zeros(0, 3))).all()
