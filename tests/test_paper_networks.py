"""The networks: DDPM++ U-Net and DiT presets wrapped in EDM preconditioning (docs/method.md, "Formulas"
and "The image studies")."""
import shutil

import pytest
import torch
import torch.nn.functional as F

import common
import plumbing
import eval_gap
from conftest import one_line

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


@pytest.mark.parametrize("model", MODELS)
def test_zero_augmentation_parameters_have_exactly_no_effect_and_others_change_the_output(model):
    # the augment map has random non-zero weights; without bias, a = 0 adds exactly zero to the conditioning
    with_map = perturbed(common.build_network(model, "tiny", 16, 1, num_classes=3, augment_dim=common.AUGMENT_DIM))
    without = common.build_network(model, "tiny", 16, 1, num_classes=3).eval()
    state = with_map.state_dict()
    assert state["net.augment_embed.weight"].abs().min() > 0 and "net.augment_embed.bias" not in state
    without.load_state_dict({k: v for k, v in state.items() if "augment_embed" not in k})
    x, sigma, labels = torch.randn(4, 1, 16, 16), torch.tensor([0.1, 0.5, 1.0, 5.0]), torch.tensor([0, 1, 2, 3])
    _, params = common.augment(x, 0.5, torch.Generator().manual_seed(0))
    params[0] = 0
    with torch.no_grad():
        plain = without(x, sigma, labels)
        assert torch.equal(with_map(x, sigma, labels, torch.zeros(4, common.AUGMENT_DIM)), plain)
        assert torch.equal(with_map(x, sigma, labels), plain)
        moved = with_map(x, sigma, labels, params) - plain
    assert moved[0].abs().max() == 0 and (moved[1:].flatten(1).abs().amax(1) > 1e-3).all()


def test_augment_labels_of_the_wrong_width_are_refused():
    denoiser = common.build_network("unet", "tiny", 16, 1)
    with pytest.raises(ValueError, match="augment_dim 0"):
        denoiser(torch.zeros(2, 1, 16, 16), 1.0, None, torch.zeros(2, common.AUGMENT_DIM))


def test_a_network_config_without_augment_dim_builds_without_the_augment_map():
    config = common.build_network("unet", "tiny", 16, 1, channels=8).config
    assert config["augment_dim"] == 0
    del config["augment_dim"]
    rebuilt = common.build_network(**config)
    assert rebuilt.config["augment_dim"] == 0 and rebuilt.net.augment_embed is None


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
        windowed = eval_gap.windowed_denoiser(denoiser, 12, multiple=denoiser.size_multiple)  # on the grid
        assert windowed(torch.randn(2, 1, 16, 16), torch.tensor([0.1, 2.0])).shape == (2, 1, 16, 16)
        with pytest.raises(common.UserError, match="off the network's 4-pixel down-sampling grid"):
            eval_gap.windowed_denoiser(denoiser, 10, multiple=denoiser.size_multiple)(torch.randn(2, 1, 16, 16), 0.5)


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


def test_attention_written_out_on_a_cpu_is_torchs_kernel_in_every_dtype_and_gradient():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 64, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v)  # multi-head (B, heads, tokens, d), as in the DiT
    out = common.attention(q, k, v)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    cot = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), cot), torch.autograd.grad(ref, (q, k, v), cot)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    q32, k32, v32 = (t.detach().float() for t in (q, k, v))
    torch.testing.assert_close(common.attention(q32, k32, v32).double(), ref.detach(), atol=2e-6, rtol=0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 inputs, float32 inside
        q16, k16, v16 = (t.bfloat16() for t in (q32, k32, v32))
        low, fused = common.attention(q16, k16, v16), F.scaled_dot_product_attention(q16, k16, v16)
        exact = F.scaled_dot_product_attention(q16.double(), k16.double(), v16.double())
    assert low.dtype == torch.bfloat16
    assert (low.double() - exact).abs().max() <= 1.01 * (fused.double() - exact).abs().max(), "as accurate"


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


# ---------------------------------------------------------------------------
# Inference: plumbing.network_denoiser, eager or compiled (--forward-mode)
# ---------------------------------------------------------------------------

def test_compile_mode_auto_compiles_with_cuda_graphs_on_one_cuda_device_only():
    assert plumbing.compile_mode("auto", cuda=False, world=1) == ("eager", False)
    assert plumbing.compile_mode("auto", cuda=True, world=1) == ("compile", True)
    assert plumbing.compile_mode("auto", cuda=True, world=2) == ("eager", False)
    assert plumbing.compile_mode("compile", cuda=True, world=2) == ("compile", False)
    assert plumbing.compile_mode("compile", cuda=False, world=1) == ("compile", False)
    assert plumbing.compile_mode("eager", cuda=True, world=1) == ("eager", False)
    assert plumbing.compile_mode("auto", cuda=False, world=1, cpu_pays=True) == ("compile", False), "no graphs on CPU"
    assert plumbing.compile_mode("auto", cuda=False, world=2, cpu_pays=True) == ("eager", False)
    assert plumbing.compile_mode("eager", cuda=False, world=1, cpu_pays=True) == ("eager", False)


def failing_backend(gm, inputs):
    """A torch.compile backend that cannot build anything, as inductor without its C++ compiler or Triton."""
    raise RuntimeError("no compiler here\nsecond line")


def test_auto_forward_mode_survives_a_failing_compile_with_the_eager_outputs(monkeypatch, capsys):
    # The compiled path in mode auto (as on one CUDA device), its backend raising at the first call: one line,
    # the eager output of that call, and every later call eager (the backend is not asked again).
    real, attempts = torch.compile, []

    def backend(gm, inputs):
        attempts.append(1)
        return failing_backend(gm, inputs)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, dynamic=kw["dynamic"], backend=backend))
    monkeypatch.setattr(plumbing, "compile_mode", lambda requested, cuda, world: ("compile", False))
    denoiser, x, sigma, labels = small_denoiser()
    torch._dynamo.reset()
    with torch.no_grad():
        denoise = plumbing.network_denoiser(denoiser, "cpu", "auto", "fp32")
        outputs = [denoise(x, sigma, labels), denoise(x[:4], 0.7), denoise(x.double(), sigma)]
        expected = [denoiser(x, sigma, labels), denoiser(x[:4], torch.tensor(0.7)), denoiser(x.double(), sigma)]
    for out, eager in zip(outputs, expected):
        assert torch.equal(out, eager)
    one_line(capsys.readouterr().out, "torch.compile failed", "no compiler here", "running eager")
    assert len(attempts) == 1


def test_explicit_forward_mode_compile_that_cannot_work_stops_with_one_line(monkeypatch):
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, dynamic=kw["dynamic"], backend=failing_backend))
    with pytest.raises(common.UserError, match=r"^--forward-mode compile: torch.compile failed \(BackendCompilerFailed"
                       r": .*\); --forward-mode eager \(or auto\) runs without it$"):
        plumbing.check_compile("compile", "cpu", "--forward-mode")
    plumbing.check_compile("auto", "cpu", "--forward-mode")  # auto and eager need no check
    denoiser, x, sigma, labels = small_denoiser()
    torch._dynamo.reset()
    with torch.no_grad(), pytest.raises(common.UserError, match="--forward-mode compile: torch.compile failed"):
        plumbing.network_denoiser(denoiser, "cpu", "compile", "fp32")(x, sigma, labels)


def small_denoiser():
    """A class-conditional (3 classes) 8x8 U-Net of 8 channels and one block per level with perturbed weights,
    and a batch of 6 inputs: x, sigma (6,), labels (6,) (3: the null label)."""
    torch.manual_seed(0)
    denoiser = perturbed(common.build_network("unet", "tiny", 8, 1, num_classes=3, channels=8, blocks=1))
    return denoiser, torch.randn(6, 1, 8, 8), torch.linspace(0.1, 5, 6), torch.tensor([0, 1, 2, 3, 0, 1])


@pytest.mark.slow
@pytest.mark.skipif(not any(map(shutil.which, ("c++", "g++", "clang++"))),
                    reason="torch.compile's CPU backend needs a C++ compiler")
def test_compiled_network_denoiser_gives_the_eager_outputs_on_cpu():
    # torch.compile's own backend (inductor: C++ on CPU); a minute or more while its compile cache is cold.
    denoiser, x, sigma, labels = small_denoiser()
    torch._dynamo.reset()
    with torch.inference_mode():
        eager, compiled = (plumbing.network_denoiser(denoiser, "cpu", mode, "fp32") for mode in ("eager", "compile"))
        torch.testing.assert_close(compiled(x, sigma, labels), eager(x, sigma, labels), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled(x[:4], 0.7), eager(x[:4], 0.7), rtol=1e-5, atol=1e-5)


def test_compiled_network_denoiser_pads_a_smaller_batch_and_gives_exactly_its_rows(monkeypatch):
    # Graph capture as torch.compile does it, run by a backend that counts its compilations and runs the
    # captured graph as it is: the smaller batches reuse the first batch's graph and shape (dynamic=False).
    calls, compiles, real = [], [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(kw) or real(
        fn, dynamic=kw["dynamic"], backend=lambda gm, inputs: compiles.append(1) or gm.forward))
    denoiser, x, sigma, labels = small_denoiser()
    torch._dynamo.reset()
    with torch.inference_mode():
        denoise = plumbing.network_denoiser(denoiser, "cpu", "compile", "fp32")
        full, part, null = denoise(x, sigma, labels), denoise(x[:4], sigma[:4], labels[:4]), denoise(x[:3], 0.3)
        assert calls == [dict(dynamic=False)] and len(compiles) == 1, "no CUDA graphs on CPU; one shape, one graph"
        torch.testing.assert_close(full, denoiser(x, sigma, labels), rtol=0, atol=0)
        # exactly the rows of the padded batch (its last row repeated); within rounding of the batch run alone
        # (some CPUs' convolution kernels round differently by batch size: AVX2, not AVX-512)
        for out, args in ((part, (x[:4], sigma[:4], labels[:4])),
                          (null, (x[:3], torch.full((3,), 0.3), torch.full((3,), 3)))):
            padded = denoiser(*(plumbing.pad_rows(a, len(x)) for a in args))
            torch.testing.assert_close(out, padded[:len(out)], rtol=0, atol=0)
            torch.testing.assert_close(out, denoiser(*args), rtol=1e-5, atol=1e-6)
    assert part.shape == (4, 1, 8, 8) and null.shape == (3, 1, 8, 8)


def test_cuda_graph_outputs_are_copied_out_behind_a_step_marker(monkeypatch):
    # The CUDA-graph path on CPU: a stand-in for the graph that returns the same output memory on every call,
    # as a CUDA graph replay does. What a caller keeps must survive the next call.
    modes, marks = [], []
    monkeypatch.setattr(plumbing, "compile_mode", lambda requested, cuda, world: ("compile", True))
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))

    def graph_compile(fn, dynamic, mode=None):
        modes.append(mode)
        memory = []

        def replay(*inputs):
            out = fn(*inputs)
            memory[:] = memory or [torch.empty_like(out)]
            return memory[0].copy_(out)
        return replay
    monkeypatch.setattr(torch, "compile", graph_compile)
    denoiser, x, sigma, labels = small_denoiser()
    with torch.no_grad():
        denoise = plumbing.network_denoiser(denoiser, "cpu", "auto", "fp32")
        first, second = denoise(x, sigma, labels), denoise(x.flip(0), sigma, labels)
        torch.testing.assert_close(first, denoiser(x, sigma, labels), rtol=0, atol=0)
        torch.testing.assert_close(second, denoiser(x.flip(0), sigma, labels), rtol=0, atol=0)
    assert modes == ["reduce-overhead"] and len(marks) == 2


def test_compiled_network_denoiser_runs_eager_when_gradients_are_wanted(monkeypatch):
    # The correlation radius differentiates D: a CUDA graph cannot replay a backward pass per output pixel, so
    # such calls bypass the compiled function and give the eager radius.
    replays = []
    monkeypatch.setattr(plumbing, "compile_mode", lambda requested, cuda, world: ("compile", True))
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: None)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: lambda *inputs: replays.append(1) or fn(*inputs))
    denoiser, x, sigma, labels = small_denoiser()
    denoise = plumbing.network_denoiser(denoiser, "cpu", "auto", "fp32")
    radius = eval_gap.correlation_radius(denoise, x, sigma, labels, pixels=8, seed=0)
    assert replays == [], "no call that needs gradients went through the compiled function"
    eager = eval_gap.correlation_radius(lambda *a: denoiser(*a), x, sigma, labels, pixels=8, seed=0)
    torch.testing.assert_close(radius, eager, rtol=0, atol=0)
    with torch.no_grad():
        denoise(x, sigma, labels)
    assert replays == [1], "inference calls still use it"


def test_network_denoiser_runs_the_network_in_the_precision_asked_for_and_differentiates_in_float32():
    # --precision of eval_gap and sample_memorize: bf16 autocast rounds the network's arithmetic (D differs from
    # float32 by rounding, about 2^-8 of D - x), fp32 gives the network's own output, and a call that wants
    # gradients (the correlation radius) runs in float32 either way, so that no bf16 rounding floor lies under
    # small |dD/dx|. D keeps x's dtype; float64 inputs keep their skip path c_skip x unrounded.
    denoiser, x, sigma, labels = small_denoiser()
    with torch.no_grad():
        exact = denoiser(x, sigma, labels)
        fp32 = plumbing.network_denoiser(denoiser, "cpu", "eager", "fp32")(x, sigma, labels)
        bf16 = plumbing.network_denoiser(denoiser, "cpu", "eager", "bf16")(x, sigma, labels)
        bf16_64 = plumbing.network_denoiser(denoiser, "cpu", "eager", "bf16")(x.double(), sigma.double(), labels)
    assert torch.equal(fp32, exact)
    assert bf16.dtype == torch.float32 and bf16_64.dtype == torch.float64
    rounding = ((bf16 - exact).norm() / (exact - x).norm()).item()
    assert 0 < rounding < 0.03, rounding
    torch.testing.assert_close(bf16_64.float(), bf16, rtol=0, atol=1e-5)

    def jacobian_row(denoise):
        z = x.clone().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(denoise(z, sigma, labels)[:, :, 3, 4].sum(), z)
        return grad
    assert torch.equal(jacobian_row(plumbing.network_denoiser(denoiser, "cpu", "eager", "bf16")),
                       jacobian_row(lambda *a: denoiser(*a)))
