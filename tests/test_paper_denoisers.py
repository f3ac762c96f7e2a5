"""The optimal and error-prone denoisers against brute force and their limits, E(sigma) with its fixed noise, the
restricted receptive field (windowed denoisers) and the correlation radius (docs/method.md)."""
import math

import numpy as np
import pytest
import torch

import common
import eval_gap
import plumbing
from conftest import perturbed

F64 = torch.float64


def brute_force_optimal(x, sigma, data):
    """Reference y*: softmax over the full (B, N) squared-distance table."""
    d2 = (x[:, None, :] - data[None, :, :]).square().sum(-1)
    return torch.softmax(-d2 / (2 * sigma ** 2), dim=1) @ data


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


def pixel_index_image(batch, size):
    """Images (batch, 1, size, size) whose pixel (i, j) holds i * size + j."""
    return torch.arange(size * size, dtype=F64).view(1, 1, size, size).repeat(batch, 1, 1, 1)


def top_left_of_crop(x, sigma, labels=None):
    """A denoiser that fills each crop with the value of its top-left pixel (which names where the crop lies)."""
    return x[..., :1, :1].expand(x.shape).clone()


def test_window_offsets_are_evenly_spaced_from_edge_to_edge_and_must_cover_the_image():
    assert eval_gap.window_offsets(16, 10) == [0, 6] and eval_gap.window_offsets(16, 8) == [0, 8]
    assert eval_gap.window_offsets(7, 3, steps=3) == [0, 2, 4] and eval_gap.window_offsets(16, 16, steps=3) == [0]
    assert eval_gap.window_offsets(10, 4, steps=4) == [0, 2, 4, 6]
    with pytest.raises(common.UserError, match="give at least 2 positions per axis"):
        eval_gap.window_offsets(16, 10, steps=1)
    with pytest.raises(common.UserError, match="give at least 6 positions per axis"):
        eval_gap.window_offsets(16, 3, steps=5)
    with pytest.raises(common.UserError, match="1 to 16 pixels"):
        eval_gap.window_offsets(16, 17)


@pytest.mark.parametrize("mode", eval_gap.WINDOW_MODES)
def test_a_window_of_the_whole_image_gives_the_whole_image_prediction(mode):
    denoiser = perturbed(common.build_network("unet", "tiny", 8, 1, num_classes=3, channels=8))
    x, sigma, labels = torch.randn(5, 1, 8, 8), torch.rand(5) + 0.1, torch.tensor([0, 1, 2, 3, 0])
    with torch.no_grad():
        full = denoiser(x, sigma, labels)
        windowed = eval_gap.windowed_denoiser(denoiser, 8, steps=2, mode=mode)(x, sigma, labels)
    assert torch.equal(windowed, full)


def test_averaging_gives_each_pixel_the_mean_of_the_windows_that_hold_it():
    # windows of 10 at offsets 0 and 6 per axis: rows 0-5 lie in the first, 10-15 in the second, 6-9 in both
    x = pixel_index_image(3, 16)
    out = eval_gap.windowed_denoiser(top_left_of_crop, 10, steps=2, mode="average")(x, 1.0)
    holding = lambda i: [t for t in (0, 6) if t <= i < t + 10]  # noqa: E731
    expected = torch.tensor([[np.mean([t * 16 + l for t in holding(i) for l in holding(j)]) for j in range(16)]
                             for i in range(16)], dtype=F64)
    assert torch.equal(out, expected.expand(3, 1, 16, 16))
    assert out[0, 0, 7, 7] == (0 + 6 + 6 * 16 + 6 * 16 + 6) / 4, "the centre pixel lies in all four windows"


def test_cut_takes_every_pixel_whole_from_the_window_with_the_nearest_integer_centre_first_on_ties():
    # the authors' rule: a window from top to bottom (bottom = top + w, past its last pixel) has its centre at
    # the integer (top + bottom) // 2; each pixel comes from the window whose centre is nearest, the first on ties
    def owners(size, window, steps):
        offsets = eval_gap.window_offsets(size, window, steps)
        centres = [(top + (top + window)) // 2 for top in offsets]
        return [min((abs(i - c), k) for k, (top, c) in enumerate(zip(offsets, centres))
                    if top <= i < top + window)[1] for i in range(size)], offsets

    # 7 pixels, windows of 3 at offsets 0, 2, 4 (centres 1, 3, 5): pixels 2 and 4 are ties, taken by the first
    owner, offsets = owners(7, 3, 3)
    assert [offsets[k] for k in owner] == [0, 0, 0, 2, 2, 4, 4]
    corners, weights = eval_gap.window_weights((7, 7), 3, steps=3, mode="cut")
    assert len(corners) == 9 and torch.equal(weights.sum(0), torch.ones(7, 7, dtype=F64))
    assert set(weights.unique().tolist()) == {0.0, 1.0}, "one window per pixel"
    out = eval_gap.windowed_denoiser(top_left_of_crop, 3, steps=3, mode="cut")(pixel_index_image(2, 7), 0.5)
    expected = torch.tensor([[offsets[owner[i]] * 7 + offsets[owner[j]] for j in range(7)] for i in range(7)],
                            dtype=F64)
    assert torch.equal(out, expected.expand(2, 1, 7, 7))
    # 16 pixels, windows of 12 at 0 and 4 (centres 6 and 10, not 5.5 and 9.5): pixel 8 is a tie, so rows 0-8
    # come from the first window and 9-15 from the second; and windows of 10 at 0 and 6 (centres 5 and 11)
    for window, split in ((12, 9), (10, 9)):
        owner, offsets = owners(16, window, 2)
        assert owner == [0] * split + [1] * (16 - split)
        out = eval_gap.windowed_denoiser(top_left_of_crop, window, mode="cut")(pixel_index_image(1, 16), 0.5)[0, 0]
        first = (torch.arange(16) < split)
        top = torch.where(first, 0.0, float(offsets[1])).double()
        assert torch.equal(out, top[:, None] * 16 + top)


@pytest.mark.parametrize("mode", eval_gap.WINDOW_MODES)
def test_a_pointwise_denoiser_gives_the_same_output_windowed_and_whole(mode):
    pointwise = lambda x, sigma, labels=None: torch.tanh(x) / (1 + sigma.view(-1, 1, 1, 1) ** 2)  # noqa: E731
    x, sigma = torch.randn(4, 2, 12, 12, dtype=F64), torch.tensor([0.1, 0.5, 1.0, 3.0], dtype=F64)
    for window, steps in ((5, 3), (7, 2), (4, 3)):
        torch.testing.assert_close(eval_gap.windowed_denoiser(pointwise, window, steps, mode)(x, sigma),
                                   pointwise(x, sigma), rtol=1e-15, atol=0)


def test_windowed_denoiser_passes_sigma_and_labels_and_calls_once_per_window_position():
    calls = []

    def denoise(x, sigma, labels):
        calls.append((tuple(x.shape), sigma, labels))
        return x
    x, sigma, labels = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 0.2, 0.3]), torch.tensor([2, 0, 1])
    eval_gap.windowed_denoiser(denoise, 6, steps=3)(x, sigma, labels)
    assert len(calls) == 9 and all(shape == (3, 1, 6, 6) and s is sigma and c is labels for shape, s, c in calls)


def test_a_network_sees_only_windows_on_its_downsampling_grid_unpadded():
    # a network whose down-sampling needs multiples of 4 (the U-Net presets) gets windows of 8 and 12 of a
    # 16-pixel image as they are, at offsets 0, 8 and 0, 4; windows of 10 or 14 (offsets 6, 2) are refused
    assert eval_gap.grid_windows(16, 4) == [8, 12] and eval_gap.grid_windows(32, 4) == [16, 20, 24, 28]
    assert eval_gap.grid_windows(32, 4, steps=3) == [16, 24] and eval_gap.grid_windows(16, 1) == list(range(8, 16))
    seen = []

    def denoise(x, sigma, labels=None):
        seen.append(x.clone())
        return 2 * x
    x = torch.randn(2, 1, 16, 16)
    for window, offsets in ((8, [0, 8]), (12, [0, 4])):
        seen.clear()
        assert eval_gap.window_offsets(16, window, multiple=4) == offsets
        assert torch.equal(eval_gap.windowed_denoiser(denoise, window, multiple=4)(x, 0.5), 2 * x)
        corners = [(t, l) for t in offsets for l in offsets]
        assert len(seen) == 4 and all(torch.equal(crop, x[..., t:t + window, l:l + window])
                                      for crop, (t, l) in zip(seen, corners)), "each crop as it is, no padding"
    for window in (10, 14):
        with pytest.raises(common.UserError, match=rf"a window of {window} pixels (at offsets .* )?is off the "
                                                   r"network's 4-pixel down-sampling grid; on it, with 2 position\(s\) "
                                                   r"per axis of a 16-pixel image: 8, 12 pixels"):
            eval_gap.windowed_denoiser(denoise, window, multiple=4)(x, 0.5)
    with pytest.raises(common.UserError, match="offsets 0, 6, 12 is off .* 16, 24 pixels"):
        eval_gap.window_offsets(32, 20, steps=3, multiple=4)             # 20 is a multiple of 4, 6 is not


def test_windowed_optimal_denoiser_stitches_crops_of_different_training_images():
    # a query made of the left half of training image 0 and the right half of image 1: at small sigma the
    # whole-image optimal denoiser returns one training image; the one restricted to the four 4x4 quadrants
    # returns in each the nearest training crop, so the query itself
    g = torch.Generator().manual_seed(3)
    data = torch.rand(6, 1, 8, 8, generator=g, dtype=F64) * 2 - 1
    query = torch.cat([data[0, :, :, :4], data[1, :, :, 4:]], dim=-1)[None]
    whole = common.labelled_optimal_denoiser(data)(query, 0.01)
    assert min((whole - data[i]).abs().max().item() for i in range(2)) < 1e-9
    windowed = eval_gap.windowed_optimal_denoiser(data, 4, steps=2)(query, 0.01)
    torch.testing.assert_close(windowed, query, rtol=0, atol=1e-9)
    same = eval_gap.windowed_optimal_denoiser(data, 8, data_labels=torch.arange(6) % 2)(query, 0.3, torch.tensor([1]))
    torch.testing.assert_close(same, common.optimal_denoiser(query, 0.3, data[1::2]), rtol=0, atol=1e-12)


def brute_force_radius(H, W, positions, weight):
    """Mean over the flat positions p of sum_q |p - q| w(p, q) / sum_q w(p, q), by loops over the pixels."""
    radii = []
    for p in positions:
        i, j = divmod(int(p), W)
        pairs = [(math.hypot(i - k, j - m), weight(i, j, k, m)) for k in range(H) for m in range(W)]
        radii.append(sum(d * w for d, w in pairs) / sum(w for _, w in pairs))
    return sum(radii) / len(radii)


def shift_right(x):
    """Each pixel takes its left neighbour's value; the first column gets 0."""
    return torch.nn.functional.pad(x, (1, 0))[..., :-1]


def test_correlation_radius_of_a_pointwise_map_is_zero_even_when_it_mixes_channels():
    x = torch.randn(3, 3, 5, 4, generator=torch.Generator().manual_seed(0))
    scale = torch.tensor([1.0, -2.0, 0.5])[:, None, None]
    mix = lambda x, s, c: torch.tanh(scale * x + x.sum(1, keepdim=True))  # noqa: E731
    r = eval_gap.correlation_radius(mix, x, 0.5)
    assert r.shape == (3,) and r.dtype == F64 and r.abs().max() == 0


def test_correlation_radius_of_global_averaging_is_the_mean_pixel_distance():
    H, W = 5, 4
    x = torch.randn(2, 1, H, W, generator=torch.Generator().manual_seed(1))
    average = lambda x, s, c: x.mean((2, 3), keepdim=True).expand_as(x) * 2  # noqa: E731
    everywhere = lambda i, j, k, m: 1.0  # noqa: E731
    r = eval_gap.correlation_radius(average, x, 1.0, pixels=H * W)
    torch.testing.assert_close(r, torch.full((2,), brute_force_radius(H, W, range(H * W), everywhere), dtype=F64))
    some = plumbing.choose_subset(H * W, 7, 3)                # a seeded subset of the output pixels
    r = eval_gap.correlation_radius(average, x, 1.0, pixels=7, seed=3)
    torch.testing.assert_close(r, torch.full((2,), brute_force_radius(H, W, some, everywhere), dtype=F64))


def test_correlation_radius_of_a_one_pixel_shift_is_one_and_only_the_channel_diagonal_blocks_count():
    x = torch.randn(4, 1, 6, 5, generator=torch.Generator().manual_seed(2))
    r = eval_gap.correlation_radius(lambda x, s, c: shift_right(x), x, 0.1, batch_size=3)
    torch.testing.assert_close(r, torch.ones(4, dtype=F64))   # the first column (no input) is left out

    # out_0 = x_0 - shift(x_0): |J| = 1 at p and at its left neighbour, so r = 1/2 but in the first column, where
    # r = 0 (4/5 of the pixels at 1/2); out_1 = x_1 + shift(x_0): its diagonal block is the identity, r = 0, and
    # the shifted x_0 lies in an off-diagonal block, which does not count: the mean over both channels is 0.2
    def pair(x, s, c):
        return torch.cat([x[:, :1] - shift_right(x[:, :1]), x[:, 1:] + shift_right(x[:, :1])], 1)
    x2 = torch.randn(2, 2, 3, 5, generator=torch.Generator().manual_seed(3))
    r = eval_gap.correlation_radius(pair, x2, 0.1)
    torch.testing.assert_close(r, torch.full((2,), (0.5 * 4 / 5 + 0) / 2, dtype=F64))


def test_correlation_radius_of_a_network_is_the_authors_computation_from_the_full_jacobian():
    # the authors' way, written out: the whole input Jacobian of D per image, its channel-diagonal blocks
    # |dD_c / dx_c|, per (p, c) the |J|-weighted mean Euclidean pixel distance over all pixels q, then the mean
    # over all pixels and channels
    torch.manual_seed(0)
    net = perturbed(common.build_network("unet", "tiny", 8, 3, num_classes=2, channels=8))
    net.eval()
    x, sigma, labels = torch.randn(2, 3, 8, 8, dtype=F64), torch.tensor([0.3, 2.0]), torch.tensor([0, 1])
    net.double()
    denoise = lambda x, s, c: net(x, s, c)  # noqa: E731
    got = eval_gap.correlation_radius(denoise, x, sigma, labels, batch_size=50)
    grid = torch.stack(torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij"), -1).reshape(64, 2)
    distance = torch.cdist(grid, grid).double()                      # (p, q) in pixels
    expected, summed = [], []
    for i in range(2):
        J = torch.autograd.functional.jacobian(lambda xi: net(xi[None], sigma[i:i + 1], labels[i:i + 1])[0], x[i])
        J = J.abs().reshape(3, 64, 3, 64)                            # (c out, p, c in, q)
        radii = [(distance * J[c, :, c]).sum(1) / J[c, :, c].sum(1) for c in range(3)]
        expected.append(torch.stack(radii).mean())
        everything = J.sum((0, 2))                                   # the channel pairs summed, for contrast
        summed.append(((distance * everything).sum(1) / everything.sum(1)).mean())
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-7, atol=0)  # float64: rounding only
    assert not torch.allclose(got, torch.stack(summed), rtol=1e-3), "the off-diagonal blocks would move it"


def test_correlation_radius_of_a_box_blur_matches_brute_force_on_the_seeded_pixels():
    H, W = 6, 7
    x = torch.randn(3, 2, H, W, generator=torch.Generator().manual_seed(4))
    blur = lambda x, s, c: torch.nn.functional.avg_pool2d(x, 3, 1, 1)  # noqa: E731  (zero padding)
    near = lambda i, j, k, m: float(abs(i - k) <= 1 and abs(j - m) <= 1)  # noqa: E731
    interior = (4 + 4 * math.sqrt(2)) / 9
    r = eval_gap.correlation_radius(blur, x, 0.3, pixels=9, seed=5)
    expected = brute_force_radius(H, W, plumbing.choose_subset(H * W, 9, 5), near)
    torch.testing.assert_close(r, torch.full((3,), expected, dtype=F64))
    again = eval_gap.correlation_radius(blur, x, 0.3, pixels=9, seed=5, batch_size=2)
    other = eval_gap.correlation_radius(blur, x, 0.3, pixels=9, seed=6)
    torch.testing.assert_close(again, r)
    assert not torch.allclose(other, r), "another seed picks other pixels (the border ones differ)"
    full = eval_gap.correlation_radius(blur, x, 0.3)                          # all pixels, the default
    torch.testing.assert_close(full, torch.full((3,), brute_force_radius(H, W, range(H * W), near), dtype=F64))
    torch.testing.assert_close(eval_gap.correlation_radius(blur, x, 0.3, pixels=1000), full)
    assert full[0] < interior, "border pixels look less far"


def test_correlation_radius_of_a_network_is_the_same_in_any_chunking_and_in_inference_mode():
    torch.manual_seed(0)
    net = perturbed(common.build_network("unet", "tiny", 8, 1, num_classes=3, channels=8))
    net.eval().requires_grad_(False)
    denoise = plumbing.network_denoiser(net, "cpu", precision="fp32")
    x, labels = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 3, 1])
    sigma = torch.tensor([0.1, 0.5, 1.0, 2.0, 5.0])
    whole = eval_gap.correlation_radius(denoise, x, sigma, labels, pixels=6, batch_size=10_000)
    with torch.inference_mode():
        chunked = eval_gap.correlation_radius(denoise, x, sigma, labels, pixels=6, batch_size=4)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    alone = eval_gap.correlation_radius(denoise, x[3:4], sigma[3:4], labels[3:4], pixels=6)
    torch.testing.assert_close(alone, whole[3:4], rtol=1e-5, atol=1e-6)
    assert bool(((whole > 0) & (whole < math.hypot(7, 7))).all())


def test_correlation_radius_of_a_denoiser_without_gradients_is_a_user_error():
    data = torch.randn(4, 1, 3, 3, dtype=F64)
    optimal = common.labelled_optimal_denoiser(data)              # streaming code under torch.no_grad
    with pytest.raises(common.UserError, match="no gradient with respect to its input"):
        eval_gap.correlation_radius(optimal, torch.randn(2, 1, 3, 3, dtype=F64), 1.0)
    with pytest.raises(common.UserError, match="images"):
        eval_gap.correlation_radius(lambda x, s, c: x, torch.randn(2, 9), 1.0)
