"""The networks: DDPM++ U-Net and DiT presets wrapped in EDM preconditioning (docs/method.md, "Formulas"
and "The image studies")."""
import pytest
import torch
import torch.nn.functional as F

import common

MODELS = sorted(common.NETWORK_PRESETS)
SIZES = ["tiny", "xs", "s", "m", "l"]


def perturbed(denoiser, scale=0.05, seed=0):
    """The denoiser with every parameter moved off its (partly zero) initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in denoiser.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return denoiser.eval()


def smooth_images(n, resolution, channels=1, seed=0):
    """n random smooth images in [-1, 1]: 4x4 random grids upsampled bilinearly."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, channels, 4, 4, generator=g) * 2 - 1
    return F.interpolate(coarse, size=resolution, mode="bilinear", align_corners=True)


@pytest.mark.parametrize("model", MODELS)
def test_presets_are_named_tiny_to_l_and_grow_in_parameters(model):
    assert list(common.NETWORK_PRESETS[model]) == SIZES
    counts = [common.count_parameters(common.build_network(model, s, 16, 3, 10)) for s in SIZES[:-1]]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    assert 1e5 < counts[0] < 1e6  # tiny: a few hundred thousand parameters


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("size", SIZES[:-1])  # l: see the parameter-count tests below
def test_every_preset_maps_images_to_images_of_the_same_shape(model, size):
    denoiser = perturbed(common.build_network(model, size, 16, 3, num_classes=10), scale=0.01)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = denoiser(x, torch.tensor([0.5, 2.0]), torch.tensor([1, 10]))
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()


def test_largest_unet_preset_is_the_papers_56M_parameter_cifar_model():
    denoiser = common.build_network("unet", "l", 32, 3, num_classes=10)
    assert abs(common.count_parameters(denoiser) - 56e6) < 0.1 * 56e6
    assert denoiser.config["channels"] == 128 and denoiser.config["blocks"] == 4
    assert denoiser.config["dropout"] == pytest.approx(0.13)


def test_largest_dit_preset_is_about_dit_s_size():
    denoiser = common.build_network("dit", "l", 32, 3, num_classes=10)
    assert 25e6 < common.count_parameters(denoiser) < 40e6  # DiT-S/2: 33M


@pytest.mark.parametrize("model", MODELS)
def test_preconditioned_denoiser_at_init_returns_c_skip_times_x(model):
    denoiser = common.build_network(model, "tiny", 16, 3, num_classes=10)
    x = torch.randn(4, 3, 16, 16) * 3
    sigma = torch.tensor([0.01, 0.5, 3.0, 80.0])
    c_skip = common.precond_coeffs(sigma)[0].view(-1, 1, 1, 1)
    torch.testing.assert_close(denoiser(x, sigma, torch.tensor([0, 4, 9, 10])), c_skip * x)


@pytest.mark.parametrize("model", MODELS)
def test_denoiser_output_variance_at_init_matches_the_sigma_data_scaling(model):
    denoiser = common.build_network(model, "tiny", 16, 1)
    sd = common.SIGMA_DATA
    for sigma in (0.2, 1.0, 5.0):
        y = torch.randn(32, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * sd
        x = y + sigma * torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
        expected = sd ** 4 / (sd ** 2 + sigma ** 2)  # Var(c_skip x) with Var(y) = sd^2
        assert denoiser(x, sigma).var().item() == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("model", MODELS)
def test_labels_change_the_output_and_none_means_the_null_label(model):
    denoiser = perturbed(common.build_network(model, "tiny", 16, 1, num_classes=3))
    x, sigma = torch.randn(2, 1, 16, 16), 1.0
    with torch.no_grad():
        a = denoiser(x, sigma, torch.tensor([0, 0]))
        b = denoiser(x, sigma, torch.tensor([1, 1]))
        null = denoiser(x, sigma, torch.tensor([3, 3]))
        torch.testing.assert_close(denoiser(x, sigma), null)
    assert (a - b).abs().max() > 1e-3 and (a - null).abs().max() > 1e-3


@pytest.mark.parametrize("model", MODELS)
def test_unconditional_network_has_no_label_embedding(model):
    denoiser = common.build_network(model, "tiny", 16, 1, num_classes=0)
    assert not any("label" in name for name, _ in denoiser.named_parameters())
    with_labels = common.build_network(model, "tiny", 16, 1, num_classes=10)
    assert with_labels.net.label_embed.num_embeddings == 11  # ten classes and the null label


@pytest.mark.parametrize("model,overrides", [("unet", dict(channels=24, blocks=2, dropout=0.1)),
                                             ("dit", dict(channels=96, blocks=3, patch=4))])
def test_build_network_from_its_config_rebuilds_the_same_architecture(model, overrides):
    denoiser = perturbed(common.build_network(model, "tiny", 16, 3, num_classes=5, **overrides))
    config = denoiser.config
    assert all(type(v) in (str, int, float, type(None)) for v in config.values())
    assert {k: config[k] for k in overrides} == overrides
    rebuilt = common.build_network(**config).eval()
    assert rebuilt.config == config
    shapes = {k: v.shape for k, v in denoiser.state_dict().items()}
    assert shapes == {k: v.shape for k, v in rebuilt.state_dict().items()}
    rebuilt.load_state_dict(denoiser.state_dict())
    x, labels = torch.randn(2, 3, 16, 16), torch.tensor([0, 5])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x, 0.8, labels), denoiser(x, 0.8, labels))


@pytest.mark.parametrize("kwargs,words", [
    (dict(model="resnet"), ["resnet", "unet", "dit"]),
    (dict(model="unet", size="xl"), ["xl", "tiny", "l"]),
    (dict(model="dit", size="huge"), ["huge", "tiny", "l"]),
    (dict(model="unet", patch=2), ["patch"]),
    (dict(model="unet", img_resolution=18), ["18"]),
    (dict(model="dit", img_resolution=18, patch=4), ["patch 4", "18"]),
    (dict(model="dit", channels=90), ["90", "heads"]),
    (dict(model="dit", channels=7), ["7", "divisible by 4"]),
    (dict(model="unet", channels=7), ["channels must be even", "7"]),
    (dict(model="unet", dropout=1.5), ["dropout"]),
])
def test_bad_network_arguments_raise_a_user_error_naming_the_problem(kwargs, words):
    with pytest.raises(common.UserError) as err:
        common.build_network(**kwargs)
    assert all(word in str(err.value) for word in words)


@pytest.mark.parametrize("channels", [2, 6, 10, 14, 22, 34, 66])
def test_unet_builds_and_runs_for_any_even_width(channels):
    denoiser = common.build_network("unet", "tiny", 16, 1, num_classes=3, channels=channels)
    out = denoiser(torch.randn(2, 1, 16, 16), torch.tensor([0.5, 2.0]), torch.tensor([0, 3]))
    assert out.shape == (2, 1, 16, 16)


def test_unet_takes_any_size_its_downsampling_can_halve_and_names_them_otherwise():
    denoiser = perturbed(common.build_network("unet", "tiny", 16, 1, channels=8))
    assert denoiser.size_multiple == 4
    with torch.no_grad():
        assert denoiser(torch.randn(2, 1, 8, 12), torch.tensor([0.1, 2.0])).shape == (2, 1, 8, 12)
        with pytest.raises(common.UserError, match=r"multiples of 4 \(4, 8, 12, ...\), got 10x10"):
            denoiser(torch.randn(2, 1, 10, 10), 0.5)
        windowed = common.windowed_denoiser(denoiser, 10, multiple=denoiser.size_multiple)
        assert windowed(torch.randn(2, 1, 16, 16), torch.tensor([0.1, 2.0])).shape == (2, 1, 16, 16)


@pytest.mark.parametrize("model", MODELS)
def test_channels_last_and_bf16_autocast_agree_with_float32(model):
    denoiser = perturbed(common.build_network(model, "tiny", 16, 3, num_classes=4))
    x, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 4])
    with torch.no_grad():
        ref = denoiser(x, 0.7, labels)
        denoiser = denoiser.to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(denoiser(x_cl, 0.7, labels), ref, atol=1e-4, rtol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = denoiser(x_cl, 0.7, labels)
    assert low.dtype == torch.float32
    assert (low - ref).abs().max() < 0.05 * ref.abs().max()


def test_denoiser_keeps_float64_inputs_in_float64():
    denoiser = common.build_network("unet", "tiny", 16, 1)
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    out = denoiser(x, torch.tensor(0.3, dtype=torch.float64))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, common.precond_coeffs(torch.tensor(0.3, dtype=torch.float64))[0] * x)


@pytest.mark.parametrize("model,steps", [("unet", 120), ("dit", 400)])
def test_tiny_network_overfits_four_images(model, steps):
    torch.manual_seed(0)
    denoiser = common.build_network(model, "tiny", 16, 1)
    y = smooth_images(4, 16)

    def probe_loss():  # the same noise levels and draws before and after training
        with torch.no_grad():
            g = torch.Generator().manual_seed(1)
            return common.edm_loss(denoiser, y.repeat(16, 1, 1, 1), generator=g).mean().item()

    before = probe_loss()
    opt = torch.optim.Adam(denoiser.parameters(), lr=4e-3)
    for _ in range(steps):  # batches of the four images, each with fresh noise
        loss = common.edm_loss(denoiser, y).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert probe_loss() < before / 3
