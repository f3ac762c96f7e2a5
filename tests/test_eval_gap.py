"""eval_gap.py: E(sigma), the gap and the onset of snapshots and of the optimal denoiser; fixed
noise, guidance, reuse of earlier results, torchrun sharding and bad input; the windowed denoisers and the
correlation radius."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import plumbing
from conftest import exit_status, one_line, perturbed, write_fashion_mnist
import eval_gap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_TRAIN, N_VAL, N_SUBSET, RES = 40, 20, 16, 8
SIGMAS = ["0.002", "0.05", "0.5", "2", "10"]
JACOBIAN = ["--jacobian-sigmas", "0.5", "0.05", "--jacobian-images", "3", "--jacobian-pixels", "8"]
F64 = torch.float64


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A tiny synthetic Fashion-MNIST: 40 training and 20 validation images of 28x28."""
    return write_fashion_mnist(tmp_path_factory.mktemp("data"), N_TRAIN, N_VAL)


def make_snapshot(path, data_dir, images_seen, net_seed, run_seed=0, num_classes=10, model="unet", resolution=RES):
    """A class-conditional (num_classes 0: unconditional) tiny U-Net (or DiT) snapshot with random (not
    zero-initialised) weights, in the layout train_image.py writes, on the subset train_image.py would choose."""
    images, classes = plumbing.load_images("fashion-mnist", "train", data_dir)
    subset = plumbing.choose_subset(len(images), N_SUBSET, run_seed)
    torch.manual_seed(net_seed)
    net = common.build_network(model, "tiny", resolution, 1, num_classes=num_classes, channels=8)
    states = []
    for _ in range(2):  # raw and EMA weights differ
        perturbed(net)
        states.append({k: v.clone() for k, v in net.state_dict().items()})
    args = dict(data="fashion-mnist", data_dir=data_dir, resolution=resolution, n=N_SUBSET, model=model, size="tiny",
                channels=8, cond="class" if num_classes else "none", seed=run_seed, steps=100,
                out=os.path.dirname(path))
    plumbing.save_checkpoint(dict(kind=plumbing.CHECKPOINT_KIND, net=states[0], ema=states[1], opt={},
                                  step=images_seen // 8, images_seen=images_seen, args=args, network=net.config,
                                  subset=torch.tensor(subset),
                                  labels=torch.tensor(classes[subset]) if num_classes else None,
                                  dataset="fashion-mnist", resolution=resolution,
                                  kmeans_centroids=None, rng=[]), path)
    return str(path)


@pytest.fixture(scope="module")
def run_dir(data_dir, tmp_path_factory):
    """A run folder with three snapshots (80, 160, 240 images seen)."""
    root = tmp_path_factory.mktemp("run")
    for i, seen in enumerate((80, 160, 240)):
        make_snapshot(root / f"snapshot-{seen:09d}.pt", data_dir, seen, net_seed=i)
    return str(root)


def snap(run_dir, seen):
    return os.path.join(run_dir, f"snapshot-{seen:09d}.pt")


def evaluate(data_dir, out, *extra):
    """Run eval_gap on small settings and return its output."""
    eval_gap.main(["--data-dir", data_dir, "--num-images", "20", "--sigmas", *SIGMAS, "--batch", "200",
                   "--device", "cpu", "--out", str(out), *extra])
    return plumbing.load_npz(str(out))


def test_identity_error_is_sigma_squared_noise_power_and_oracle_error_is_zero(data_dir):
    source = plumbing.TrainingSource("fashion-mnist", RES, np.arange(8), data_dir=data_dir)
    train, val = eval_gap.eval_splits(source, num_images=20, seed=0)
    sigmas = torch.tensor([0.01, 1.0, 30.0], dtype=torch.float64)
    for split in (train, val):
        oracle_split = split._replace(labels=torch.arange(len(split.y)))  # the "label" names the image
        oracle = lambda x, s, c, y=split.y: y[c]  # noqa: E731
        e = eval_gap.split_errors(oracle, oracle, oracle_split, sigmas, [0.0, 1.0], batch=7)
        assert e.shape == (2, 3, len(split.y)) and np.abs(e).max() == 0  # per image
        e_id = eval_gap.split_errors(lambda x, s, c: x, None, split, sigmas, [0.0], batch=7)[0].mean(-1)
        power = split.noise.double().square().mean().item()
        np.testing.assert_allclose(e_id, sigmas.numpy() ** 2 * power, rtol=1e-5)


def test_fixed_noise_is_seeded_by_dataset_index_and_validation_draws_differ_from_training(data_dir):
    source = plumbing.TrainingSource("fashion-mnist", RES, np.array([3, 5, 7, 11]), data_dir=data_dir)
    train, val = eval_gap.eval_splits(source, num_images=20, seed=0)
    again, _ = eval_gap.eval_splits(source, num_images=20, seed=0)
    assert torch.equal(train.noise, again.noise)
    torch.testing.assert_close(train.noise, common.image_noise([3, 5, 7, 11], (1, RES, RES)), rtol=0, atol=0)
    torch.testing.assert_close(val.noise, common.image_noise(N_TRAIN + np.arange(N_VAL), (1, RES, RES)), rtol=0, atol=0)
    assert not torch.equal(val.noise[3], common.image_noise([3], (1, RES, RES))[0])


def test_curves_are_identical_across_calls_and_snapshot_order(data_dir, run_dir, tmp_path):
    a, b = snap(run_dir, 80), snap(run_dir, 240)
    ab = evaluate(data_dir, tmp_path / "ab.npz", a, b)
    ba = evaluate(data_dir, tmp_path / "ba.npz", b, a)
    for key in ("e_train", "e_val", "gap"):
        np.testing.assert_array_equal(ab[key], ba[key][::-1])
    assert list(ab["images_seen"]) == [80, 240] and list(ba["images_seen"]) == [240, 80]
    again = evaluate(data_dir, tmp_path / "ab.npz", a, b, "--force")
    for key in set(ab) - {"args"}:
        np.testing.assert_array_equal(again[key], ab[key])


def test_run_folder_gives_all_snapshots_in_order_with_documented_keys_and_shapes(data_dir, run_dir, tmp_path):
    r = evaluate(data_dir, tmp_path / "gap.npz", run_dir)
    S = len(SIGMAS)
    assert list(r["images_seen"]) == [80, 160, 240]
    assert [os.path.basename(p) for p in r["checkpoints"]] == [f"snapshot-{s:09d}.pt" for s in (80, 160, 240)]
    assert r["e_train"].shape == r["e_val"].shape == r["gap"].shape == (3, S)
    assert r["onset_images_seen"].shape == (S,) and r["peak_sigma"].shape == (3,)
    np.testing.assert_allclose(r["gap"], (r["e_val"] - r["e_train"]) / r["e_train"])
    assert r["peak_gap_ci"].shape == (3, 2) and np.array_equal(r["peak_gap"], r["gap"].max(1))
    assert (r["peak_gap_ci"][:, 0] <= r["peak_gap"]).all() and (r["peak_gap"] <= r["peak_gap_ci"][:, 1]).all()
    np.testing.assert_array_equal(r["sigmas"], np.array(SIGMAS, float))
    assert str(r["weights"]) == "ema" and r["args"]["num_images"] == 20
    raw = evaluate(data_dir, tmp_path / "raw.npz", run_dir, "--weights", "raw")
    assert not np.array_equal(raw["e_val"], r["e_val"]), "raw and EMA weights differ"


def test_optimal_denoiser_training_error_vanishes_as_sigma_falls_while_validation_does_not(data_dir, tmp_path):
    r = evaluate(data_dir, tmp_path / "opt.npz", "--optimal", "--n", str(N_SUBSET), "--resolution", str(RES))
    e_train, e_val = r["e_train_optimal"][0], r["e_val_optimal"][0]
    assert "precision" not in json.loads(str(r["eval_settings"])), "no network ran: --precision changes nothing"
    np.testing.assert_array_equal(r["e_train"], r["e_train_optimal"])
    assert list(r["checkpoints"]) == ["optimal"] and r["e_train"].shape == (1, len(SIGMAS))
    assert e_train[0] < 1e-12 and e_train[1] < 1e-6
    assert np.all(np.diff(e_train) >= 0), "the optimal denoiser's training error grows with sigma"
    assert e_val[0] > 0.01 and np.all(e_val > e_train)


def test_optimal_beside_snapshots_uses_their_subset_and_labels(data_dir, run_dir, tmp_path):
    both = evaluate(data_dir, tmp_path / "both.npz", run_dir, "--optimal")
    alone = evaluate(data_dir, tmp_path / "alone.npz", "--optimal", "--n", str(N_SUBSET), "--resolution", str(RES),
                     "--cond", "class")
    unconditional = evaluate(data_dir, tmp_path / "uncond.npz", "--optimal", "--n", str(N_SUBSET),
                             "--resolution", str(RES))
    assert both["e_train"].shape == (3, len(SIGMAS)) and both["e_val_optimal"].shape == (1, len(SIGMAS))
    for key in ("e_train_optimal", "e_val_optimal"):
        np.testing.assert_array_equal(both[key], alone[key])
    assert not np.array_equal(both["e_val_optimal"], unconditional["e_val_optimal"])


def test_guidance_with_zero_weight_equals_unguided_and_adds_a_leading_axis(data_dir, run_dir, tmp_path):
    snaps = [snap(run_dir, 80), snap(run_dir, 240)]
    plain = evaluate(data_dir, tmp_path / "plain.npz", *snaps)
    cfg = evaluate(data_dir, tmp_path / "cfg.npz", *snaps, "--guidance-weights", "0", "1.5")
    auto = evaluate(data_dir, tmp_path / "auto.npz", *snaps, "--guidance-weights", "0", "1.5",
                    "--neg", snap(run_dir, 80))
    assert cfg["e_train"].shape == (2, 2, len(SIGMAS)) and cfg["peak_sigma"].shape == (2, 2)
    assert cfg["onset_images_seen"].shape == (2, len(SIGMAS))
    np.testing.assert_array_equal(cfg["guidance_weights"], [0, 1.5])
    for r in (cfg, auto):
        np.testing.assert_array_equal(r["e_val"][0], plain["e_val"])
        assert not np.allclose(r["e_val"][1], plain["e_val"])
    assert np.array_equal(auto["e_val"][1][0], plain["e_val"][0]), "guiding a model by itself changes nothing"


def test_correlation_radius_is_written_per_snapshot_from_the_gaps_images_and_fresh_noise_per_sigma(data_dir, run_dir,
                                                                                                  tmp_path):
    r = evaluate(data_dir, tmp_path / "jac.npz", run_dir, "--optimal", *JACOBIAN)
    plain = evaluate(data_dir, tmp_path / "plain.npz", run_dir, "--optimal")
    np.testing.assert_array_equal(r["jacobian_sigmas"], [0.05, 0.5])
    assert r["radius_train"].shape == r["radius_val"].shape == (3, 2) and "radius_train_optimal" not in r
    for key in ("e_train", "e_val", "e_val_optimal"):
        np.testing.assert_array_equal(r[key], plain[key])
    assert np.all((r["radius_val"] > 0) & (r["radius_val"] < np.hypot(RES - 1, RES - 1)))
    # the last snapshot at sigma 0.5 (the second) on the first 3 images of each split, recomputed directly with
    # fresh noise: a draw of its own per image and sigma, seeded by the image's dataset index, never E's fixed one
    train, val = eval_gap.eval_splits(eval_gap.read_snapshot(snap(run_dir, 240))["source"], num_images=20, seed=0)
    model = plumbing.network_denoiser(plumbing.load_denoiser(snap(run_dir, 240))[0], "cpu", precision="fp32")
    for split, key in ((train, "radius_train"), (val, "radius_val")):
        noise = eval_gap.radius_noise(split.index[:3], (1, RES, RES), 0, 1)
        assert not torch.equal(noise, split.noise[:3])
        assert not torch.equal(noise, eval_gap.radius_noise(split.index[:3], (1, RES, RES), 0, 0))
        direct = eval_gap.correlation_radius(model, split.y[:3] + 0.5 * noise, 0.5, split.labels[:3], pixels=8, seed=0)
        assert r[key][2, 1] == pytest.approx(direct.mean().item(), rel=1e-6)
        fixed = eval_gap.correlation_radius(model, split.y[:3] + 0.5 * split.noise[:3], 0.5, split.labels[:3],
                                            pixels=8, seed=0)
        assert r[key][2, 1] != pytest.approx(fixed.mean().item(), rel=1e-6), "not E's fixed noise"
    fewer = evaluate(data_dir, tmp_path / "fewer.npz", snap(run_dir, 240), *JACOBIAN, "--jacobian-pixels", "4")
    assert fewer["radius_train"][0, 1] != r["radius_train"][2, 1], "other radius settings, other rows"
    guided = evaluate(data_dir, tmp_path / "guided.npz", snap(run_dir, 240), *JACOBIAN, "--guidance-weights", "0", "2")
    assert guided["radius_val"].shape == (2, 1, 2)
    np.testing.assert_allclose(guided["radius_val"][0, 0], r["radius_val"][2], rtol=1e-6)
    assert not np.allclose(guided["radius_val"][1, 0], r["radius_val"][2], rtol=1e-3)


def test_jacobian_defaults_are_the_authors_settings(run_dir):
    args = eval_gap.parse_args([str(run_dir), "--jacobian"])
    np.testing.assert_allclose(args.jacobian_sigmas, np.logspace(np.log10(2e-3), np.log10(80), 16), rtol=1e-12)
    assert args.jacobian_images == 32 and args.jacobian_pixels is None, "32 images per split, all pixels"
    assert eval_gap.parse_args([str(run_dir)]).jacobian_sigmas is None, "off unless asked for"
    assert eval_gap.parse_args([str(run_dir), "--jacobian-sigmas", "2", "0.5"]).jacobian_sigmas == [0.5, 2]


def test_correlation_radius_of_the_optimal_denoiser_alone_is_refused(tmp_path, capsys):
    status, err = run_cli(["--optimal", *JACOBIAN, "--out", str(tmp_path / "g.npz")], capsys)
    assert status == 2, err
    one_line(err, "error: ", "--jacobian needs snapshots", "optimal denoiser")


@pytest.mark.parametrize("model", ["snapshot", "optimal"])
def test_classifier_free_guidance_of_an_unconditional_model_is_refused(data_dir, tmp_path, capsys, model):
    if model == "snapshot":
        models = [make_snapshot(tmp_path / "snapshot-000000008.pt", data_dir, 8, net_seed=0, num_classes=0)]
        name = models[0]
    else:
        models, name = ["--optimal", "--n", str(N_SUBSET), "--resolution", str(RES)], "the optimal denoiser"
    small = ["--data-dir", data_dir, "--num-images", "20", "--sigmas", *SIGMAS, "--device", "cpu"]
    status, err = run_cli([*models, *small, "--guidance-weights", "0", "1", "--out", str(tmp_path / "g.npz")], capsys)
    assert status == 2 and err.startswith(f"error: --neg uncond needs a class-conditional denoiser, but {name}")
    assert err.count("\n") == 1 and not os.path.exists(tmp_path / "g.npz")
    r = evaluate(data_dir, tmp_path / "g.npz", *models, "--guidance-weights", "0")  # unguided: nothing to refuse
    assert r["e_val"].shape[0] == 1


def test_neg_snapshot_that_does_not_fit_the_optimal_denoiser_is_refused(data_dir, run_dir, tmp_path, capsys):
    status, err = run_cli(["--optimal", "--n", str(N_SUBSET), "--resolution", str(2 * RES), "--cond", "class",
                           "--data-dir", data_dir, "--guidance-weights", "1", "--neg", snap(run_dir, 80),
                           "--device", "cpu", "--out", str(tmp_path / "g.npz")], capsys)
    assert status == 2 and err.startswith(f"error: --neg {snap(run_dir, 80)} does not fit the optimal denoiser of "
                                          f"--data fashion-mnist --resolution {2 * RES} --cond class"), err


def test_earlier_rows_are_reused_per_snapshot_and_force_recomputes(data_dir, run_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "gap.npz"
    evaluate(data_dir, out, snap(run_dir, 80), snap(run_dir, 160))
    fresh = plumbing.load_npz(str(out))
    planted = dict(fresh)
    planted["e_train"] = fresh["e_train"].copy()
    planted["e_train"][0, 0] = 123.0                 # a marker that only a reused row can carry
    plumbing.save_npz(str(out), **planted)

    loaded = []
    real = plumbing.load_denoiser
    monkeypatch.setattr(plumbing, "load_denoiser", lambda path, *a, **k: loaded.append(path) or real(path, *a, **k))
    r = evaluate(data_dir, out, run_dir)
    assert [os.path.basename(p) for p in loaded] == ["snapshot-000000240.pt"]
    assert r["e_train"][0, 0] == 123.0 and r["e_train"].shape == (3, len(SIGMAS))
    np.testing.assert_array_equal(r["e_val"][:2], fresh["e_val"])

    loaded.clear()
    r = evaluate(data_dir, out, run_dir, "--force")
    assert len(loaded) == 3 and r["e_train"][0, 0] == fresh["e_train"][0, 0]


def test_out_with_other_settings_or_rows_this_call_would_leave_out_is_kept_unless_force(data_dir, run_dir, tmp_path,
                                                                                       capsys):
    out, free = tmp_path / "gap.npz", tmp_path / "gap-2.npz"
    base = ["--data-dir", data_dir, "--num-images", "20", "--sigmas", *SIGMAS, "--batch", "200", "--device", "cpu",
            "--out", str(out)]
    eval_gap.main([*base, run_dir, "--optimal", "--precision", "fp32"])
    before, _ = out.read_bytes(), capsys.readouterr()
    elsewhere = shutil.copytree(data_dir, tmp_path / "elsewhere")  # the same images in another folder
    base += ["--precision", "fp32"]
    for argv, reason in [
            ([run_dir, "--optimal", "--num-images", "8"], "was made with other settings (num_images 20 -> 8)"),
            ([run_dir, "--optimal", "--precision", "bf16"], "was made with other settings (precision fp32 -> bf16)"),
            ([run_dir, "--optimal", "--data-dir", str(elsewhere)], "was made with other settings (data_dir)"),
            ([snap(run_dir, 240), "--optimal"], "holds 2 row(s) of models not given here (other snapshots, or "
                                                "--optimal) that this call would leave out"),
            ([run_dir], "holds 1 row(s) of models not given here (other snapshots, or --optimal) that this call "
                        "would leave out")]:
        status, err = run_cli([*base, *argv], capsys)
        assert status == 2, err
        one_line(err, "error: ", f"--out {out} {reason}", f"--out {free}", "--force")
        assert out.read_bytes() == before, "the earlier result is untouched"
    eval_gap.main([*base, run_dir, "--num-images", "8", "--out", str(free)])
    assert plumbing.load_npz(str(free))["args"]["num_images"] == 8 and out.read_bytes() == before
    eval_gap.main([*base, run_dir, "--force"])
    assert "e_train_optimal" not in plumbing.load_npz(str(out)), "--force replaces the file"


def test_precision_is_stored_resolved_and_rows_of_another_precision_are_not_reused_unasked(data_dir, run_dir,
                                                                                          tmp_path, capsys):
    # --precision auto is stored as what it chose for this machine; a row made in float32 is reused by --precision
    # fp32 and refused to bf16 (naming the change), as any other setting.
    out = tmp_path / "gap.npz"
    r = evaluate(data_dir, out, snap(run_dir, 80))
    chosen = plumbing.choose_precision("auto", "cpu")
    assert r["args"]["precision"] == chosen and json.loads(str(r["eval_settings"]))["precision"] == chosen
    r = evaluate(data_dir, out, snap(run_dir, 80), "--precision", "fp32", "--force")
    marked = dict(r, e_train=r["e_train"].copy())
    marked["e_train"][0, 0] = 123.0  # a marker that only a reused row can carry
    plumbing.save_npz(str(out), **{k: v for k, v in marked.items() if k != "format"})
    assert evaluate(data_dir, out, snap(run_dir, 80), "--precision", "fp32")["e_train"][0, 0] == 123.0
    status, err = run_cli(["--data-dir", data_dir, "--num-images", "20", "--sigmas", *SIGMAS, "--device", "cpu",
                           "--out", str(out), "--precision", "bf16", snap(run_dir, 80)], capsys)
    assert status == 2 and "was made with other settings (precision fp32 -> bf16)" in err, err


def test_forward_mode_compile_gives_the_eager_rows_and_either_reuses_the_others_rows(data_dir, run_dir, tmp_path,
                                                                                    monkeypatch):
    # The compiled path of plumbing.network_denoiser (batches of 64 and 36 pairs, the last padded to 64), with
    # torch.compile standing aside: test_networks checks the graph capture itself.
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(kw) or fn)
    snaps = snap(run_dir, 80), snap(run_dir, 240)
    eager = evaluate(data_dir, tmp_path / "eager.npz", *snaps, "--batch", "64", "--forward-mode", "eager")
    assert compiled == []
    fast = evaluate(data_dir, tmp_path / "fast.npz", *snaps, "--batch", "64", "--forward-mode", "compile")
    assert compiled == [dict(dynamic=False)] * 3, "the check at start (plumbing.check_compile), then one per snapshot"
    for key in ("e_train", "e_val"):
        np.testing.assert_allclose(fast[key], eager[key], rtol=1e-5, atol=0)
    loaded = []
    monkeypatch.setattr(plumbing, "load_denoiser", lambda path, *a, **k: loaded.append(path))
    evaluate(data_dir, tmp_path / "fast.npz", *snaps, "--forward-mode", "eager")
    assert loaded == [], "the rows of --forward-mode compile are reused by eager"


def test_killed_run_keeps_its_finished_rows_and_the_rerun_ends_byte_identical(data_dir, run_dir, tmp_path, capsys,
                                                                              monkeypatch):
    out = tmp_path / "gap.npz"
    evaluate(data_dir, out, run_dir, "--optimal")
    uninterrupted = out.read_bytes()
    out.unlink()
    loaded, real = [], plumbing.load_denoiser

    def load(path, *a, **k):
        loaded.append(os.path.basename(path))
        if loaded == ["snapshot-000000080.pt", "snapshot-000000160.pt", "snapshot-000000240.pt"] and kill:
            raise KeyboardInterrupt
        return real(path, *a, **k)
    monkeypatch.setattr(plumbing, "load_denoiser", load)
    kill = True
    status, err = run_cli(["--data-dir", data_dir, "--num-images", "20", "--sigmas", *SIGMAS, "--batch", "200",
                           "--device", "cpu", "--out", str(out), run_dir, "--optimal"], capsys)
    assert status == 130 and err.endswith(f"interrupted after 2 of 4 evaluations: {out} keeps the finished rows, "
                                          "which rerunning the same command reuses\n"), err
    assert list(plumbing.load_npz(str(out))["images_seen"]) == [80, 160]
    loaded.clear()
    kill = False
    evaluate(data_dir, out, run_dir, "--optimal")
    assert loaded == ["snapshot-000000240.pt"] and out.read_bytes() == uninterrupted


def test_one_snapshot_gets_its_own_default_out_beside_the_runs_file(data_dir, run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    small = ["--num-images", "20", "--sigmas", *SIGMAS, "--device", "cpu"]
    eval_gap.main([str(run), *small])
    eval_gap.main([str(run / "snapshot-000000160.pt"), *small])
    capsys.readouterr()
    whole, one = plumbing.load_npz(str(run / "gap.npz")), plumbing.load_npz(str(run / "gap-snapshot-000000160.npz"))
    assert list(whole["images_seen"]) == [80, 160, 240] and list(one["images_seen"]) == [160]
    np.testing.assert_array_equal(one["e_val"][0], whole["e_val"][1])
    status, err = run_cli([str(run / "snapshot-000000080.pt"), str(run / "snapshot-000000160.pt"), *small], capsys)
    assert status == 2 and err.startswith("error: 2 run folders or snapshot files: give --out"), err


@pytest.mark.parametrize("foreign", ["npz", "sample_memorize", "text"])
def test_out_that_another_program_wrote_is_not_replaced_unless_force(data_dir, run_dir, tmp_path, capsys, foreign):
    out = tmp_path / "x.npz"
    if foreign == "npz":
        np.savez(out, e_train=np.ones(3), digests=np.array(["a"]))
    elif foreign == "sample_memorize":
        plumbing.save_npz(str(out), args={}, script="sample_memorize.py", nn_ratio=np.ones(2))
    else:
        out.write_text("notes")
    before = out.read_bytes()
    status, err = run_cli([snap(run_dir, 80), "--data-dir", data_dir, "--num-images", "20", "--sigmas", *SIGMAS,
                           "--device", "cpu", "--out", str(out)], capsys)
    assert status == 2 and err.startswith(f"error: --out {out} exists and ") and "--force" in err, err
    assert err.count("\n") == 1 and out.read_bytes() == before
    assert list(evaluate(data_dir, out, snap(run_dir, 80), "--force")["images_seen"]) == [80]


def test_feature_space_reconstruction_gap_of_the_optimal_denoiser(data_dir, tmp_path):
    r = evaluate(data_dir, tmp_path / "fd.npz", "--optimal", "--n", str(N_SUBSET), "--resolution", str(RES),
                 "--features", "builtin", "--feature-sigmas", "0.002", "10")
    assert r["fd_train"].shape == r["fd_val"].shape == (1, 2)
    assert abs(r["fd_train"][0, 0]) < 1e-6, "the optimal denoiser returns the training images at tiny sigma"
    assert r["fd_val"][0, 0] > 1e3 * abs(r["fd_train"][0, 0]) and r["fd_val"][0, 0] > 0.01
    assert r["fd_train"][0, 1] > r["fd_val"][0, 0], "at sigma 10 every image is denoised to near the mean"
    np.testing.assert_array_equal(r["feature_gap"], eval_gap.relative_gap(r["fd_train"], r["fd_val"]))
    np.testing.assert_array_equal(r["feature_sigmas"], [0.002, 10])


def test_feature_gap_compares_equally_many_images_of_both_splits_and_is_near_zero_for_equal_quality(
        tmp_path, monkeypatch):
    # 48 training images and up to 512 validation images requested: the Frechet distance's 1/count bias
    # would make the validation distance smaller; an untrained network (D = c_skip x) treats both alike
    (tmp_path / "data").mkdir()
    data = write_fashion_mnist(tmp_path / "data", 96, 512, seed=2)
    images, _ = plumbing.load_images("fashion-mnist", "train", data)
    net = common.build_network("unet", "tiny", RES, 1, channels=8)  # zero output layer
    args = dict(data="fashion-mnist", data_dir=data, resolution=RES, n=48, model="unet", size="tiny", channels=8,
                cond="none", seed=0, steps=1, out=str(tmp_path))
    plumbing.save_checkpoint(dict(kind=plumbing.CHECKPOINT_KIND, net=net.state_dict(), ema=net.state_dict(), opt={},
                                  step=1, images_seen=8, args=args, network=net.config,
                                  subset=torch.tensor(plumbing.choose_subset(len(images), 48, 0)), labels=None,
                                  dataset="fashion-mnist", resolution=RES, kmeans_centroids=None, rng=[]),
                             tmp_path / "snapshot-000000008.pt")
    sizes, frechet = [], common.frechet_distance
    monkeypatch.setattr(common, "frechet_distance", lambda a, b: sizes.append((len(a), len(b))) or frechet(a, b))
    r = evaluate(data, tmp_path / "gap.npz", str(tmp_path), "--num-images", "512", "--features", "builtin",
                 "--feature-sigmas", "0.5", "1", "2")
    assert sizes == [(48, 48)] * 6
    assert np.abs(r["feature_gap"]).max() < 0.15


def test_feature_sigmas_all_computes_the_feature_gap_at_every_evaluated_sigma(data_dir, tmp_path):
    r = evaluate(data_dir, tmp_path / "fd.npz", "--optimal", "--n", str(N_SUBSET), "--resolution", str(RES),
                 "--features", "builtin", "--feature-sigmas", "all")
    np.testing.assert_array_equal(r["feature_sigmas"], r["sigmas"])
    assert r["fd_train"].shape == (1, len(SIGMAS)) and np.isfinite(r["feature_gap"][:, 2:]).all()


def test_train_image_run_with_kmeans_labels_matches_optimal_on_the_same_subset(data_dir, tmp_path):
    import train_image
    run = tmp_path / "run"
    train_image.main(["--data-dir", data_dir, "--out", str(run), "--model", "unet", "--size", "tiny", "--channels",
                      "8", "--resolution", str(RES), "--n", str(N_SUBSET), "--batch", "8", "--steps", "4",
                      "--cond", "kmeans", "--k", "3", "--snapshots", "every:16", "--eval-every", "1000",
                      "--probe-images", "4", "--device", "cpu"])
    r = evaluate(data_dir, tmp_path / "gap.npz", str(run), "--optimal")
    alone = evaluate(data_dir, tmp_path / "alone.npz", "--optimal", "--n", str(N_SUBSET), "--resolution", str(RES),
                     "--cond", "kmeans", "--k", "3")
    assert list(r["images_seen"]) == [16, 32] and np.isfinite(r["gap"]).all()
    np.testing.assert_array_equal(r["e_val_optimal"], alone["e_val_optimal"])

    source = eval_gap.read_snapshot(os.path.join(run, "snapshot-000000032.pt"))["source"]
    train, val = eval_gap.eval_splits(source, num_images=20, seed=0)
    nearest = torch.cdist(val.y.flatten(1), torch.as_tensor(source.centroids)).argmin(1)
    assert torch.equal(val.labels, nearest), "validation images get the label of the nearest stored centroid"
    np.testing.assert_array_equal(train.labels.numpy(), source.labels)
    assert source.cond == "kmeans" and source.num_classes == 3


def test_two_gloo_processes_give_the_same_curves_as_one(data_dir, run_dir, tmp_path):
    one = evaluate(data_dir, tmp_path / "one.npz", run_dir, "--optimal", *JACOBIAN)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "eval_gap.py"), run_dir, "--optimal", "--data-dir", data_dir, "--num-images", "20",
           "--sigmas", *SIGMAS, "--batch", "50", "--device", "cpu", "--out", str(tmp_path / "two.npz"), *JACOBIAN]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = plumbing.load_npz(str(tmp_path / "two.npz"))
    for key in ("e_train", "e_val", "e_train_optimal", "e_val_optimal", "radius_train", "radius_val"):
        np.testing.assert_allclose(two[key], one[key], rtol=1e-5)


def test_windows_add_a_leading_axis_whose_last_entry_is_the_whole_image(data_dir, run_dir, tmp_path, monkeypatch):
    snaps = [snap(run_dir, 80), snap(run_dir, 240)]
    plain = evaluate(data_dir, tmp_path / "plain.npz", *snaps, "--optimal")
    r = evaluate(data_dir, tmp_path / "win.npz", *snaps, "--optimal", "--windows", "4")  # on the tiny U-Net's grid
    S = len(SIGMAS)
    np.testing.assert_array_equal(r["windows"], [4, RES])
    assert r["e_train"].shape == r["e_val"].shape == r["gap"].shape == (2, 2, S)
    assert r["e_val_optimal"].shape == r["gap_optimal"].shape == (2, 1, S)
    assert r["onset_images_seen"].shape == (2, S) and r["peak_sigma"].shape == (2, 2)
    assert r["peak_gap_ci"].shape == (2, 2, 2) and r["peak_gap_ci_optimal"].shape == (2, 1, 2)
    for key in ("e_train", "e_val", "gap", "onset_images_seen", "peak_sigma", "peak_gap", "peak_gap_ci",
                "e_train_optimal", "e_val_optimal"):
        np.testing.assert_array_equal(r[key][-1], plain[key])
    assert not np.allclose(r["e_val"][0], plain["e_val"]), "windows change the network's predictions"
    assert not np.allclose(r["e_val_optimal"][0], plain["e_val_optimal"])
    assert np.all(r["e_train_optimal"][:, 0, 0] < 1e-12), "the windowed optimal denoiser memorizes training crops"
    settings = json.loads(str(r["eval_settings"]))
    assert (settings["windows"], settings["window_steps"], settings["window_mode"]) == ([4, RES], 2, "average")

    loaded, real = [], plumbing.load_denoiser
    monkeypatch.setattr(plumbing, "load_denoiser", lambda path, *a, **k: loaded.append(path) or real(path, *a, **k))
    again = evaluate(data_dir, tmp_path / "win.npz", *snaps, "--optimal", "--windows", "4")
    assert loaded == [] and np.array_equal(again["e_val"], r["e_val"]), "the same windows reuse the rows"
    cut = evaluate(data_dir, tmp_path / "cut.npz", *snaps, "--optimal", "--windows", "4", "--window-mode", "cut")
    assert len(loaded) == 2, "another window mode, other rows"
    for w in (0, 1):  # 4x4 windows at 2 positions (and the whole image) do not overlap: cut = average
        np.testing.assert_array_equal(cut["e_val"][w], r["e_val"][w])


def test_the_optimal_denoiser_alone_takes_windows_off_any_grid(data_dir, tmp_path):
    optimal = ("--optimal", "--data", "fashion-mnist", "--n", "16", "--resolution", str(RES))
    r = evaluate(data_dir, tmp_path / "avg.npz", *optimal, "--windows", "6", "5")
    cut = evaluate(data_dir, tmp_path / "cut.npz", *optimal, "--windows", "6", "5", "--window-mode", "cut")
    np.testing.assert_array_equal(r["windows"], [5, 6, RES])
    assert not np.array_equal(cut["e_val"][1], r["e_val"][1]), "6x6 windows at offsets 0 and 2 overlap"
    np.testing.assert_array_equal(cut["e_val"][2], r["e_val"][2])


def test_correlation_radius_per_window_looks_no_further_than_the_window(data_dir, run_dir, tmp_path):
    one = snap(run_dir, 240)
    whole = evaluate(data_dir, tmp_path / "j.npz", one, *JACOBIAN)
    r = evaluate(data_dir, tmp_path / "wj.npz", one, "--windows", "4", *JACOBIAN)
    assert r["radius_train"].shape == r["radius_val"].shape == (2, 1, 2), "(window, snapshot, sigma)"
    np.testing.assert_allclose(r["radius_val"][-1], whole["radius_val"], rtol=1e-6)
    # 4x4 windows at 2 positions do not overlap: an output pixel sees only its own window
    assert np.all((r["radius_val"][0] > 0) & (r["radius_val"][0] <= np.hypot(3, 3)))
    assert np.all(r["radius_val"][0] < r["radius_val"][1])


def test_windows_combine_with_guidance_and_features(data_dir, run_dir, tmp_path):
    one = snap(run_dir, 240)
    windowed = evaluate(data_dir, tmp_path / "w.npz", one, "--windows", "4")
    r = evaluate(data_dir, tmp_path / "wg.npz", one, "--windows", "4", "--guidance-weights", "0", "1",
                 "--features", "builtin", "--feature-sigmas", "0.5")
    assert r["e_val"].shape == (2, 2, 1, len(SIGMAS)) and r["fd_val"].shape == r["feature_gap"].shape == (2, 2, 1, 1)
    assert r["onset_images_seen"].shape == (2, 2, len(SIGMAS)) and r["peak_sigma"].shape == (2, 2, 1)
    np.testing.assert_array_equal(r["e_val"][:, 0], windowed["e_val"])
    assert not np.allclose(r["e_val"][:, 1], windowed["e_val"])
    assert eval_gap.default_out(eval_gap.parse_args([str(run_dir), "--windows", "4"])) == os.path.join(
        run_dir, "gap-windows.npz")


@pytest.mark.parametrize("change, words", [
    (["--windows", "4", str(RES)], [f"--windows must be smaller than the {RES}x{RES} images", f"got {RES}"]),
    (["--windows", "4", "--window-steps", "1"], ["--windows 4 with --window-steps 1", "at least 2 positions"]),
    (["--windows", "3"], ["--windows 3 with --window-steps 2", "a window of 3 pixels is off the network's 4-pixel "
                          "down-sampling grid", "8-pixel image: 4 pixels"]),
    (["--windows", "6"], ["--windows 6 with --window-steps 2 for", "(U-Net tiny at 8x8): a window of 6 pixels is "
                          "off the network's 4-pixel down-sampling grid", "8-pixel image: 4 pixels"]),
    (["--windows", "4", "dit"], ["is a DiT, whose position embeddings are fixed to the whole 8x8 image"]),
])
def test_bad_windows_exit_2_with_one_clear_message_before_any_evaluation(data_dir, run_dir, tmp_path, capsys,
                                                                         change, words):
    models = [snap(run_dir, 80)]
    if "dit" in change:
        change = change[:-1]
        models = [make_snapshot(tmp_path / "snapshot-000000008.pt", data_dir, 8, net_seed=0, model="dit")]
    status, err = run_cli([*models, "--data-dir", data_dir, "--device", "cpu", "--out", str(tmp_path / "o.npz"),
                           *change], capsys)
    assert status == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert all(w in err for w in words), err
    assert not os.path.exists(tmp_path / "o.npz")


def test_the_advice_of_each_windows_error_when_followed_gives_a_result(data_dir, tmp_path, capsys):
    # 16x16 images: a window of 3 pixels is off the U-Net's 4-pixel grid; 4 pixels need 4 positions per axis
    model = make_snapshot(tmp_path / "snapshot-000000008.pt", data_dir, 8, net_seed=0, resolution=16)
    argv = [model, "--data-dir", data_dir, "--num-images", "4", "--sigmas", "1", "--device", "cpu", "--out",
            str(tmp_path / "w.npz")]
    status, err = run_cli([*argv, "--windows", "3"], capsys)
    assert status == 2 and "off the network's 4-pixel down-sampling grid" in err and ": 8, 12 pixels" in err, err
    eval_gap.main([*argv, "--windows", "8", "--force"])
    assert list(plumbing.load_npz(str(tmp_path / "w.npz"))["windows"]) == [8, 16]
    status, err = run_cli([*argv, "--windows", "4"], capsys)
    assert status == 2 and "give at least 4 positions per axis" in err, err
    eval_gap.main([*argv, "--windows", "4", "--window-steps", "4", "--force"])
    assert list(plumbing.load_npz(str(tmp_path / "w.npz"))["windows"]) == [4, 16]


def test_relative_gap_is_inf_where_e_train_is_at_rounding_level_and_the_summary_says_so():
    e_train, e_val = np.array([1e-270, 1e-3, 0.25]), np.array([4e-6, 1e-2, 0.5])
    gap = eval_gap.relative_gap(e_train, e_val)
    assert np.isposinf(gap[0]) and gap[1:] == pytest.approx([9, 1])
    assert np.isnan(eval_gap.relative_gap([0.0], [0.0])[0])
    lines = []
    result = dict(sigmas=np.array([0.002, 0.5, 2.0]), gap_optimal=gap[None], e_train_optimal=e_train[None])
    eval_gap.summarize(result, None, None, [], True, lines.append)
    assert lines[0].startswith("optimal denoiser: peak gap 9 at sigma 0.5 (G = inf at 1 sigma(s), where E_train is "
                               "0 or at rounding level, at most 2.2e-16 E_val)"), lines


def test_a_snapshot_evaluated_on_other_images_under_the_same_file_names_is_refused(data_dir, run_dir, tmp_path,
                                                                                   capsys):
    ckpt = torch.load(snap(run_dir, 80), weights_only=True)
    ckpt["data_digests"] = plumbing.data_digests("fashion-mnist", ckpt["subset"].numpy(), data_dir)
    path = tmp_path / "run" / "snapshot-000000080.pt"
    plumbing.save_checkpoint(ckpt, path)
    (tmp_path / "other").mkdir()
    other = write_fashion_mnist(tmp_path / "other", N_TRAIN, N_VAL, seed=1)  # as MNIST beside Fashion-MNIST
    argv = [str(path), "--num-images", "20", "--sigmas", *SIGMAS, "--device", "cpu", "--out", str(tmp_path / "g.npz")]
    status, err = run_cli([*argv, "--data-dir", other], capsys)
    assert status == 2, err
    one_line(err, "error: ", str(path), f"other images than those in {other}", str(data_dir), "--data-dir")
    assert not os.path.exists(tmp_path / "g.npz")
    eval_gap.main(argv)  # the run's own folder
    assert list(plumbing.load_npz(str(tmp_path / "g.npz"))["images_seen"]) == [80]


def run_cli(argv, capsys):
    """Exit status and stderr of the script's entry point."""
    return exit_status(lambda: eval_gap.main(argv), capsys)


@pytest.mark.parametrize("case, words", [
    ("empty folder", ["no snapshot-*.pt in"]),
    ("missing path", ["neither a run folder nor a snapshot file"]),
    ("corrupted", ["corrupted"]),
    ("foreign", ["not a denoiser snapshot"]),
    ("mixed runs", ["different runs", "--seed 0 vs 1", "--allow-mixed"]),
    ("nothing", ["nothing to evaluate"]),
])
def test_bad_input_exits_2_with_one_clear_message(data_dir, run_dir, tmp_path, capsys, case, words):
    bad = tmp_path / "snapshot-000000008.pt"
    argv = {"empty folder": [str(tmp_path)], "missing path": [str(tmp_path / "nowhere")],
            "corrupted": [run_dir, str(bad)], "foreign": [str(bad)], "mixed runs": [run_dir, str(bad)],
            "nothing": []}[case]
    if case == "corrupted":
        bad.write_bytes(b"not a torch file")
    elif case == "foreign":
        torch.save({"model": {}}, bad)
    elif case == "mixed runs":
        make_snapshot(bad, data_dir, 8, net_seed=5, run_seed=1)
    status, err = run_cli(["--data-dir", data_dir, "--device", "cpu", "--out", str(tmp_path / "o.npz"), *argv], capsys)
    assert status == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert all(w in err for w in words), err
    assert not os.path.exists(tmp_path / "o.npz")
    if case == "mixed runs":
        r = evaluate(data_dir, tmp_path / "o.npz", snap(run_dir, 80), str(bad), "--allow-mixed")
        assert list(r["images_seen"]) == [80, 8]


def test_out_that_is_a_folder_stops_before_any_evaluation(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(eval_gap, "evaluate", None)  # reached only after the check
    status, err = run_cli([run_dir, "--out", str(tmp_path)], capsys)
    assert status == 2, err
    one_line(err, "error: ", f"--out {tmp_path}", "folder")


@pytest.mark.parametrize("change, message", [
    (["--n", "1"], "argument --n: must be an integer of at least 2, got '1'"),
    (["--num-images", "1"], "argument --num-images: must be an integer of at least 2, got '1'"),
    (["--sigmas", "0.5", "nan"], "argument --sigmas: must be a noise level in [0.0001, 10000], got 'nan'"),
    (["--seed", "-1"], "argument --seed: must be a non-negative integer, got '-1'"),
    (["--resolution", "0"], "argument --resolution: must be a positive integer, got '0'"),
    (["--jacobian-sigmas", "0"], "argument --jacobian-sigmas: must be a noise level in [0.0001, 10000], got '0'"),
    (["--jacobian-sigmas", "1e30"], "argument --jacobian-sigmas: must be a noise level in [0.0001, 10000], got "
                                    "'1e30'"),
    (["--feature-sigmas", "1e-300"], "--feature-sigmas takes noise levels or 'all': each must be a noise level in "
                                     "[0.0001, 10000], got '1e-300'"),
    (["--jacobian-pixels", "0"], "argument --jacobian-pixels: must be a positive integer, got '0'"),
    (["--jacobian-images", "1.5"], "argument --jacobian-images: must be a positive integer, got '1.5'"),
    (["--windows", "4", "0"], "argument --windows: must be a positive integer, got '0'"),
    (["--window-steps", "0"], "argument --window-steps: must be a positive integer, got '0'"),
])
def test_bad_numbers_are_refused_by_the_parser_naming_the_option(tmp_path, capsys, change, message):
    status, err = run_cli(["--optimal", "--out", str(tmp_path / "g.npz"), *change], capsys)
    assert status == 2 and err.endswith(f"error: {message}\n") and "Traceback" not in err, err


def test_default_out_names_the_subset_of_the_optimal_denoiser_and_guidance_and_out_must_be_npz(tmp_path, capsys):
    args = eval_gap.parse_args(["--optimal", "--cond", "kmeans", "--k", "5", "--guidance-weights", "0", "1", "--neg",
                                "x.pt"])
    assert eval_gap.default_out(args) == os.path.join("results", "gap-optimal-fashion-mnist-r32-n1000-kmeans5-seed0"
                                                                 "-guided.npz")
    status, err = run_cli(["--optimal", "--out", str(tmp_path / "gap")], capsys)
    assert status == 2, err
    one_line(err, "error: ", "--out", ".npz", str(tmp_path / "gap"))


# --- restricted receptive field: windowed denoisers -------------------------


# --- correlation radius of the input Jacobian ---------------------------------


