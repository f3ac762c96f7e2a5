"""The 2D toy study (docs/method.md, "2D toy"): data, error, gap and each experiment's outputs."""
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import plumbing
import toy2d
from conftest import one_line

FAST = ["--samples-per-point", "8", "--steps", "24", "--num-samples", "64"]


def run(tmp_path, *argv):
    toy2d.main([*argv, "--out", str(tmp_path), *FAST])
    return plumbing.load_npz(tmp_path / f"{argv[0]}.npz")


def test_symmetric_circle_alternates_train_and_validation_points():
    train, val, angles = toy2d.circle_data(20, 10.0, random=False, seed=0)
    assert train.shape == val.shape == (10, 2)
    torch.testing.assert_close(train.norm(dim=1), torch.full((10,), 10.0, dtype=torch.float64))
    torch.testing.assert_close(angles[:2], 2 * np.pi * torch.tensor([0.01, 0.06], dtype=torch.float64))
    torch.testing.assert_close(train[1], 10 * torch.stack([angles[2].cos(), angles[2].sin()]))


def test_random_circle_is_seeded():
    a = toy2d.circle_data(10, 1.0, random=True, seed=3)[2]
    assert torch.equal(a, toy2d.circle_data(10, 1.0, random=True, seed=3)[2])
    assert not torch.equal(a, toy2d.circle_data(10, 1.0, random=True, seed=4)[2])


def test_toy_error_is_mean_l2_norm_over_fixed_draws():
    points = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    noise = toy2d.fixed_noise(2, 5, seed=0)
    sigmas = torch.tensor([0.5, 2.0], dtype=torch.float64)
    identity = lambda x, s: x  # noqa: E731  error = sigma * |n|
    err = toy2d.toy_error(identity, points, noise, sigmas)
    torch.testing.assert_close(err, sigmas[:, None] * noise.norm(dim=-1).mean(-1)[None])


def test_gap_peaks_near_sigma_one_and_grows_as_delta_falls():
    train, val, _ = toy2d.circle_data(20, 10.0, random=False, seed=0)
    nt, nv = toy2d.fixed_noise(10, 50, 1), toy2d.fixed_noise(10, 50, 2)
    sigmas = common.edm_sigmas(120)[:-1].flip(0)
    i = int((sigmas - 1.2).abs().argmin())
    gaps = {d: toy2d.gap_curves(toy2d.delta_model(train, d), train, val, nt, nv, sigmas)[2] for d in (1.2, 2.2)}
    assert gaps[1.2][i] > 0.5 and gaps[1.2][i] > 3 * gaps[2.2][i] > 0
    assert 0.5 < sigmas[gaps[1.2].argmax()] < 2.5          # peak at intermediate sigma
    assert gaps[1.2][0].abs() < 0.05 and gaps[1.2][-1].abs() < 0.05   # vanishes at the ends


def test_optimal_toy_model_has_zero_training_error_at_tiny_sigma_but_not_validation():
    train, val, _ = toy2d.circle_data(20, 10.0, random=False, seed=0)
    nt, nv = toy2d.fixed_noise(10, 20, 1), toy2d.fixed_noise(10, 20, 2)
    e_train, e_val, _ = toy2d.gap_curves(toy2d.delta_model(train, 0.0), train, val, nt, nv,
                                         torch.tensor([0.01], dtype=torch.float64))
    assert e_train.item() < 1e-12 and e_val.item() > 1.0


def test_delta_experiment_writes_documented_keys_and_shapes(tmp_path):
    out = run(tmp_path, "delta", "--deltas", "2.0", "1.2")
    assert out["deltas"].shape == (2,) and out["sigmas"].shape == (24,)
    for key in ("e_train", "e_val", "gap"):
        assert out[key].shape == (2, 24)
    np.testing.assert_allclose(out["gap"], (out["e_val"] - out["e_train"]) / out["e_train"])
    assert out["args"]["experiment"] == "delta" and out["args"]["deltas"] == [2.0, 1.2]
    assert (tmp_path / "delta.png").stat().st_size > 0 and (tmp_path / "delta.pdf").exists()


def test_denser_support_gives_smaller_gap(tmp_path):
    out = run(tmp_path, "density", "--n-points", "16", "30")
    assert list(out["n_train"]) == [8, 15] and out["gap"].shape == (2, 24)
    assert out["gap"][1].max() < 0.5 * out["gap"][0].max()


def test_guidance_with_zero_weight_equals_unguided_positive_model(tmp_path):
    guid = run(tmp_path, "guidance", "--guidance-weights", "0", "2")
    delta = run(tmp_path, "delta", "--deltas", "1.8")
    np.testing.assert_allclose(guid["gap"][0], delta["gap"][0], rtol=1e-12)
    assert guid["gap"][1].max() > guid["gap"][0].max()       # guidance sharpens the model: larger gap


def test_trajectory_endpoints_approach_training_points_as_delta_falls(tmp_path):
    out = run(tmp_path, "trajectories", "--deltas", "0.2", "0.05")
    assert out["endpoints"].shape == (2, 64, 2) and out["nn_dist"].shape == (2, 64)
    np.testing.assert_allclose(out["mean_nn_dist"], out["nn_dist"].mean(1))
    assert out["mean_nn_dist"][1] < 0.5 * out["mean_nn_dist"][0]


@pytest.mark.parametrize("experiment", ["flow", "field", "manifold", "samples"])
def test_other_experiments_write_their_arrays(tmp_path, experiment):
    out = run(tmp_path, experiment, *(["--deltas", "1.6", "1.2"] if experiment != "flow" else []))
    assert (tmp_path / f"{experiment}.png").exists()
    if experiment == "flow":
        assert out["field"].shape == (3, 41, 41, 2) and out["pred"].shape == (3, 10, 8, 2)
    if experiment == "field":
        assert out["gap"].shape == (2, 71, 71) and np.isfinite(out["gap"]).all()
        assert (out["gap"][0] <= 0.5).sum() > (out["gap"][1] <= 0.5).sum()   # region shrinks as delta falls
        pixel = lambda x, y: (np.abs(out["axis"] - y).argmin(), np.abs(out["axis"] - x).argmin())  # noqa: E731
        at_train, at_val = ([[field[pixel(*p)] for p in out[s]] for field in out["gap"]] for s in ("train", "val"))
        at_train, at_val = np.mean(at_train, 1), np.mean(at_val, 1)
        assert (at_train < at_val).all() and at_val[1] > at_val[0]   # off the training points, and more so as delta falls
        assert (out["gap"][:, 35, 35] > at_val).all()                 # the centre is farther from the data still
    if experiment == "manifold":
        assert out["error"].shape == out["rel_gap"].shape == (2, 181) and out["rel_gap_val"].shape == (2, 10)
    if experiment == "samples":
        assert out["ratio"].shape == out["ratio_on_circle"].shape == out["train_over_val"].shape == (4, 2)
        np.testing.assert_allclose(out["ratio_mean"], out["ratio"].mean(0))
        np.testing.assert_allclose(out["ratio_std"], out["ratio"].std(0, ddof=1))
        np.testing.assert_allclose(out["ratio"], out["d_train"] / out["d_ref"][:, None])
        assert list(out["seeds"]) == [0, 1, 2, 3] and len(set(out["d_ref"])) == 4   # a new circle per seed


def test_sample_distances_tell_copies_from_fresh_data():
    train, val, _ = toy2d.circle_data(2000, 10.0, random=True, seed=0)
    fresh = toy2d.circle_data(2000, 10.0, random=True, seed=1)[0]           # unseen points from the same circle
    copies = train[torch.arange(0, 1000, 2)]
    measures = {name: toy2d.sample_distances(x, train, val, 10.0) for name, x in (("fresh", fresh), ("copies", copies))}
    assert measures["copies"]["ratio"] == measures["copies"]["train_over_val"] == 0
    assert measures["copies"]["ratio_on_circle"] < 1e-12                        # rounding of the move onto the circle
    for key in ("ratio", "ratio_on_circle", "train_over_val"):
        assert 0.85 < measures["fresh"][key] < 1.15, (key, measures["fresh"][key])
    pushed_out = toy2d.sample_distances(fresh * 1.05, train, val, 10.0)   # off the circle, same angles
    assert pushed_out["ratio"] > 3
    assert pushed_out["ratio_on_circle"] == pytest.approx(measures["fresh"]["ratio_on_circle"])


def test_samples_of_the_optimal_denoiser_copy_and_of_a_large_delta_do_not(tmp_path):
    toy2d.main(["samples", "--out", str(tmp_path), "--deltas", "0", "0.02", "1.0", "--n-points", "200",
                "--num-samples", "200", "--steps", "32", "--num-seeds", "2"])
    out = plumbing.load_npz(tmp_path / "samples.npz")
    assert out["ratio"].shape == (2, 3) and out["train"].shape == (100, 2)
    copies, small, large = out["ratio_mean"]
    assert copies < 0.01 and out["ratio_on_circle_mean"][0] < 0.01 and out["train_over_val_mean"][0] < 0.01
    assert copies < small < 0.5 < 1 < large                                # delta = 1: far off the training points
    assert 0.8 < out["ratio_on_circle_mean"][2] < 1.25 and 0.8 < out["train_over_val_mean"][2] < 1.25


def test_manifold_relative_gap_vanishes_at_training_points_and_peaks_between_them(tmp_path):
    toy2d.main(["manifold", "--out", str(tmp_path), "--samples-per-point", "200"])
    out = plumbing.load_npz(tmp_path / "manifold.npz")
    assert out["sigma"] == 1.0 and list(out["deltas"]) == [2.0, 1.6, 1.2] and out["angles"].shape == (181,)
    np.testing.assert_allclose(out["rel_gap"], (out["error"] - out["e_train"][:, None]) / out["e_train"][:, None])
    # symmetric layout: the half circle runs from training point 0 in 1-degree steps; points every 18 degrees
    on_train, on_val = np.arange(0, 181, 36), np.arange(18, 181, 36)
    np.testing.assert_allclose(np.degrees(out["angles"][on_train] - out["train_angles"][:6]), 0, atol=1e-9)
    np.testing.assert_allclose(np.degrees(out["angles"][on_val] - out["val_angles"][:5]), 0, atol=1e-9)
    assert np.abs(out["rel_gap"][:, on_train]).max() < 1e-6 and np.abs(out["rel_gap_train"]).max() < 1e-6
    between = np.setdiff1d(np.arange(181), on_train)
    assert (out["rel_gap"][:, between] > 0).all()
    np.testing.assert_allclose(out["rel_gap"][:, on_val], out["rel_gap_val"][:, :5])
    at_val = out["rel_gap_val"].mean(1)
    assert at_val[2] > 2 * at_val[1] > 4 * at_val[0] > 0.2              # smaller delta, larger gap off the data


def test_threads_are_set_for_the_run_and_restored_after(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        toy2d.main(["manifold", "--out", str(tmp_path), "--threads", "1", *FAST])
        assert torch.get_num_threads() == 2
        assert plumbing.load_npz(tmp_path / "manifold.npz")["args"]["threads"] == 1
    finally:
        torch.set_num_threads(before)


def test_same_seed_gives_same_npz_and_figure_bytes_and_another_seed_does_not(tmp_path):
    def output_bytes(seed):  # --force: another seed's delta.npz is replaced only when asked
        toy2d.main(["delta", "--out", str(tmp_path), "--seed", str(seed), "--force", *FAST])
        return [(tmp_path / f"delta.{ext}").read_bytes() for ext in ("npz", "png", "pdf")]
    first = output_bytes(0)
    assert output_bytes(0) == first, "the PDF has no creation date"
    assert output_bytes(1)[0] != first[0]


@pytest.mark.parametrize("argv, message", [
    (["nonsense"], "invalid choice"),
    (["fd"], "experiment 'fd' is now 'samples'"),
    (["samples", "--num-seeds", "0"], "--num-seeds must be at least 1"),
    (["delta", "--threads", "-1"], "--threads must be >= 0"),
    (["delta", "--deltas", "-1"], "--deltas must be >= 0"),
    (["delta", "--sigmas", "0"], "argument --sigmas: must be a noise level in [0.0001, 10000], got '0'"),
    (["delta", "--sigmas", "1e-300", "1"], "argument --sigmas: must be a noise level in [0.0001, 10000], got '1e-300'"),
    (["delta", "--radius", "1e200"], "argument --radius: must be a radius in [0.001, 1000], got '1e200'"),
    (["density", "--n-points", "1"], "--n-points must be at least 2"),
    (["guidance", "--deltas", "1.0"], "guidance needs --deltas DELTA_POS DELTA_NEG"),
    (["delta", "--seed", "-1"], "argument --seed: must be a non-negative integer, got '-1'"),
])
def test_bad_input_stops_with_one_clear_message(tmp_path, argv, message):
    proc = subprocess.run([sys.executable, "toy2d.py", *argv, "--out", str(tmp_path)], capture_output=True,
                          text=True, cwd=toy2d.__file__.rsplit("/", 1)[0])
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_out_that_is_an_existing_file_stops_before_any_experiment(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(toy2d, "RUNNERS", {})  # reached only after the check
    (tmp_path / "toy").write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        plumbing.run_cli(lambda: toy2d.main(["all", "--out", str(tmp_path / "toy")]))
    assert exit_info.value.code == 2
    one_line(capsys.readouterr().err, "error: ", f"--out {tmp_path / 'toy'}", "existing file")


@pytest.mark.parametrize("argv, message", [
    (["all", "--deltas", "2", "1.5", "1"], "guidance needs --deltas DELTA_POS DELTA_NEG (two values), got 3 (all:"),
    (["all", "--n-points", "1"], "--n-points must be at least 2"),
])
def test_all_checks_every_experiments_arguments_before_the_first_runs(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        plumbing.run_cli(lambda: toy2d.main([*argv, "--out", str(tmp_path), *FAST]))
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_file_another_program_wrote_in_out_is_not_replaced_unless_force(tmp_path, capsys):
    plumbing.save_npz(tmp_path / "samples.npz", args={}, script="eval_gap.py", gap=np.ones(2))
    before = (tmp_path / "samples.npz").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        plumbing.run_cli(lambda: toy2d.main(["all", "--out", str(tmp_path), *FAST]))
    assert exit_info.value.code == 2 and capsys.readouterr().err == (
        f"error: --out {tmp_path / 'samples.npz'} exists and holds results of eval_gap.py, so toy2d.py would replace it: "
        "give another --out, or --force to replace it\n")
    assert (tmp_path / "samples.npz").read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["samples.npz"]
    run(tmp_path, "delta")
    run(tmp_path, "delta")  # its own file: replaced
    run(tmp_path, "samples", "--force", "--num-seeds", "1")
    assert plumbing.load_npz(str(tmp_path / "samples.npz"))["script"] == "toy2d.py"


def test_all_in_two_processes_writes_what_one_process_writes_and_says_so_longest_first(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(toy2d, "EXPERIMENTS", ["delta", "samples"])
    lines = {}
    for jobs in ("1", "2"):
        toy2d.main(["all", "--jobs", jobs, "--num-seeds", "1", "--out", str(tmp_path / jobs), *FAST])
        lines[jobs] = [line.split(":")[0] for line in capsys.readouterr().out.splitlines()]
    forked = sys.platform == "linux"  # elsewhere one at a time, in order
    assert lines == {"1": ["delta", "samples"], "2": ["samples", "delta"] if forked else ["delta", "samples"]}
    for name in ("delta", "samples"):
        one, two = (plumbing.load_npz(str(tmp_path / jobs / f"{name}.npz")) for jobs in ("1", "2"))
        assert sorted(one) == sorted(two)
        for key in one:
            if key != "args":
                assert np.array_equal(one[key], two[key]), (name, key)
        assert (tmp_path / "1" / f"{name}.png").read_bytes() == (tmp_path / "2" / f"{name}.png").read_bytes()
