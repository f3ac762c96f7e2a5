"""figures.py draws every figure it has data for from the stage scripts' .npz files, and skips the rest."""
import json
import subprocess
import sys

import numpy as np
import pytest

import common
import plumbing
import figures
from conftest import one_line

S, C = 12, 4


def write_gap(path, params=1000, n=32, k=None, guidance=False, script="eval_gap.py", augment_p=None, channels=8,
              radius=False, windows=None):
    sigmas = np.geomspace(2e-3, 80, S)
    seen = np.array([100, 1000, 10000, 100000])
    bump = np.exp(-np.log(sigmas) ** 2)                           # a gap peaking at sigma = 1
    e_train = np.outer(1 / np.log10(seen), sigmas ** 2 / (1 + sigmas ** 2))
    gap = np.outer(np.log10(seen) - 1, bump) * (1000 / params) * (32 / n)
    arrays = dict(sigmas=sigmas, images_seen=seen, e_train=e_train, e_val=e_train * (1 + gap), gap=gap,
                  onset_images_seen=np.full(S, 1000), peak_sigma=sigmas[gap.argmax(1)],
                  checkpoints=np.array([f"runs/r{params}-{n}/snapshot-{s:09d}.pt" for s in seen]),
                  digests=np.array([f"r{params}-{n}-{s}" for s in seen]),
                  e_train_optimal=e_train[-1:] * 0.5, e_val_optimal=e_train[-1:] * 2, gap_optimal=np.full((1, S), 3.0),
                  run_args=np.array(json.dumps(dict(n=n, cond="kmeans" if k else "none", k=k, data="fashion-mnist",
                                                    resolution=16, model="unet"))), params=np.int64(params),
                  network=np.array(json.dumps(dict(channels=channels))))
    arrays.update(peak_gap=gap.max(1), peak_gap_ci=np.stack([gap.max(1) - 0.31, gap.max(1) + 0.69], 1))
    if augment_p is not None:  # eval_gap.py's files of runs trained with --augment-p; before it, no key
        augment_dim = common.AUGMENT_DIM if augment_p > 0 else 0
        arrays["params"] = np.int64(params + augment_dim * channels)
        arrays["gap"] = arrays["gap"] * (1 - augment_p)
        arrays["run_args"] = np.array(json.dumps({**json.loads(str(arrays["run_args"])), "augment_p": augment_p}))
        arrays["network"] = np.array(json.dumps(dict(channels=channels, augment_dim=augment_dim)))
    if radius:  # training images looked at from further away where the gap is large
        arrays.update(jacobian_sigmas=sigmas[::3], radius_val=np.ones((len(seen), S // 3)) * np.arange(1, 5))
        arrays["radius_train"] = arrays["radius_val"] + gap[:, ::3]
    if guidance:
        arrays = {key: np.stack([v, 2 * v]) if key.startswith(("e_train", "e_val", "gap", "radius", "peak_gap")) else v
                  for key, v in arrays.items()}
        arrays["guidance_weights"] = np.array([0.0, 1.0])
    if windows is not None:  # smaller windows, smaller gap; the whole image (the last entry) keeps it
        per_model = ("e_train", "e_val", "gap", "onset_images_seen", "peak_sigma", "peak_gap")
        arrays = {key: np.stack([v * (1 if w == windows[-1] else 0.5 * w / windows[-1]) for w in windows])
                  if key.startswith(per_model) and key != "onset_images_seen" else
                  np.stack([v] * len(windows)) if key == "onset_images_seen" else v for key, v in arrays.items()}
        arrays["windows"] = np.array(windows)
    if script is None:  # as eval_gap.py wrote it before result files named their script
        arrays.update(eval_settings=np.array("{}"))
    plumbing.save_npz(path, args={"x": 1}, script=script, **arrays)


def write_memorization(path, params=1000, n=32, folder="runs", settings="{}"):
    M, P = 8, 3
    seen = np.array([100, 1000, 10000, 100000])
    rng = np.random.default_rng(0)
    peak = dict(traj_heldout_score_peak=np.full(C, 0.4), traj_heldout_score_peak_ci=np.tile([0.3, 0.5], (C, 1)),
                traj_valid_peak=np.ones(C, bool), null_heldout_score_peak=np.full(C, 0.01),
                null_heldout_score_peak_ci=np.tile([-0.1, 0.1], (C, 1)), peak_probe_sigma=np.full(C, 0.3),
                **{f"fcos_{q}_train_peak": rng.uniform(0.4, 0.7, (C, M)) for q in ("traj", "train", "val")})
    plumbing.save_npz(path, args={"n": n}, script="sample_memorize.py", configs=np.array([f"c{i}" for i in range(C)]),
                      checkpoints=np.array([f"{folder}/r{params}-{n}/snapshot-{s:09d}.pt" for s in seen]), **peak,
                      digests=np.array([f"r{params}-{n}-{s}" for s in seen]),  # as write_gap's
                      settings=np.array(settings),
                      images_seen=seen, guidance_weights=np.zeros(C), nn_ratio=rng.random((C, M)),
                      memorized_fraction=np.array([0.0, 0.1, 0.2, 0.5]), memorized_ci=np.array([[0, .1]] * C),
                      fd_gap=np.linspace(0, 1, C), stop_sigmas=np.array([0.5, 2.0]), fd_stop_gap=rng.random((C, 2)),
                      probe_sigmas=np.array([2.0, 1.2, 0.6]), nn_traj=rng.random((C, P, M)),
                      nn_train=rng.random((C, P, M)), nn_val=rng.random((C, P, M)),
                      llr_traj=rng.normal(0, 1, (C, P, M)), llr_train=rng.normal(5, 1, (C, P, M)),
                      llr_val=rng.normal(-5, 1, (C, P, M)), traj_train_overlap=np.tile([0.9, 0.3, 0.1], (C, 1)),
                      llr_heldout=rng.normal(0, 1, (C, P, M)), heldout_train_overlap=np.tile([0.5, 0.2, 0.1], (C, 1)),
                      traj_heldout_score=np.tile([0.7, 0.15, 0.1], (C, 1)),
                      traj_heldout_score_ci=np.tile([[0.6, 0.8], [0.05, 0.25], [0.0, 0.2]], (C, 1, 1)),
                      traj_valid=np.tile([True, True, False], (C, 1)),
                      fd_gap_heldout=np.full(C, 0.05), samples=rng.uniform(-1, 1, (C, M, 1, 8, 8)).astype(np.float16))


def test_every_figure_is_drawn_from_matching_results(tmp_path, capsys):
    write_gap(tmp_path / "gap" / "small.npz", params=1000)
    write_gap(tmp_path / "gap" / "large.npz", params=4000)
    write_gap(tmp_path / "gap" / "large-n256.npz", params=4000, n=256)
    write_gap(tmp_path / "gap" / "guided.npz", guidance=True)
    write_memorization(tmp_path / "samples" / "small.npz")
    figures.main([str(tmp_path)])
    out = tmp_path / "figures"
    names = {p.stem for p in out.glob("*.png")}
    for expected in ("errors_over_training_gap_small", "gap_over_training_gap_small", "optimal_vs_network_gap_small",
                     "gap_by_params", "gap_by_n", "gap_by_guidance_gap_guided", "memorization_over_training",
                     "fd_vs_stop_sigma_samples_small", "trajectory_llr_samples_small", "samples_samples_small"):
        assert expected in names, f"{expected} missing from {sorted(names)}"
        assert (out / f"{expected}.pdf").exists()
    summary = (out / "summary.txt").read_text()
    row = next(line for line in summary.splitlines() if line.startswith("gap_small "))
    assert "1,000" in row and "100,000" in row and "50% [0%, 10%]" in row   # params, images seen, copies
    assert "0.15 [0.05, 0.25]" in row  # the score [interval] at the fixed probe nearest 1.2
    assert "0.40 [0.30, 0.50]" in row and " 0.300 " in row and "0.01 [-0.10, 0.10]" in row  # ... at the peak, null
    assert "+1.00" in row and "+0.05" in row and "3.31 [3.00, 4.00]" in row  # FD gaps, peak G [interval]
    table = (out / "claim3_map.txt").read_text()
    assert "claim3_map" in names and "0.15 [0.05, 0.25]" in table and "0.40 [0.30, 0.50]" in table
    assert "figures in" in capsys.readouterr().out


def seeded_results(tmp_path, seed, shift=0.0, run=None, eval_settings="{}", sample_settings="{}"):
    """An eval_gap.py and a sample_memorize.py result (as load_npz dicts) of one run of training seed `seed` (its
    run arguments updated by `run`), its scores moved by `shift`, made with the given settings."""
    tag = f"{seed}-{json.dumps(run, sort_keys=True)}"
    write_gap(tmp_path / "g.npz")
    gap = plumbing.load_npz(tmp_path / "g.npz")
    gap = dict(gap, run_args=np.array(json.dumps({**json.loads(str(gap["run_args"])), "seed": seed, **(run or {})})),
               checkpoints=np.array([f"s{tag}/{p}" for p in gap["checkpoints"]]),
               digests=np.array([f"s{tag}-{d}" for d in gap["digests"]]), eval_settings=np.array(eval_settings))
    write_memorization(tmp_path / "m.npz", settings=sample_settings)
    mem = plumbing.load_npz(tmp_path / "m.npz")
    mem = dict(mem, checkpoints=gap["checkpoints"], digests=gap["digests"],
               traj_heldout_score=mem["traj_heldout_score"] + shift,
               traj_heldout_score_ci=mem["traj_heldout_score_ci"] + shift)
    return gap, mem


def test_the_claim3_map_pairs_each_snapshot_and_merges_training_seeds_with_intervals_that_hold_each_seed(tmp_path):
    rows = [seeded_results(tmp_path, seed, shift) for seed, shift in ((0, 0.0), (1, 0.2))]
    points = figures.snapshot_points([("g", g) for g, _ in rows], [("m", m) for _, m in rows])
    assert len(points) == 2 * C and {p["seed"] for p in points} == {0, 1}
    merged = figures.across_seeds(points)
    assert len(merged) == C and all(r["seeds"] == 2 for r in merged)
    last = merged[-1]
    assert last["score"] == pytest.approx(0.25) and last["score_ci"] == pytest.approx((0.05, 0.45))
    assert last["valid"] and last["copies"] == 0.5 and last["score_peak"] == pytest.approx(0.4)
    table = figures.format_map(points)
    assert "0.25 [0.05, 0.45]" in table and "50.0% [0.0%, 10.0%]" in table and "0.40 [0.30, 0.50]" in table
    fig = figures.fig_claim3_map(points)
    assert fig.axes[0].get_xscale() == "symlog" and "seeds" in fig.axes[0].get_legend().get_texts()[0].get_text()
    assert len(fig.axes) == 3 and "peak probe" in fig.axes[1].get_title() and "1.2" in fig.axes[2].get_title()
    figures.plt.close(fig)


def test_the_claim3_map_merges_only_results_that_differ_in_the_training_seed_alone(tmp_path, capsys):
    plain, plain_seed1 = seeded_results(tmp_path, 0), seeded_results(tmp_path, 1)
    base = seeded_results(tmp_path, 0, run=dict(cond="class", augment_p=0.12, dropout=0.13))
    larger = seeded_results(tmp_path, 0, run=dict(size="s"))
    # the same snapshots evaluated in bf16 and float32, or with windows or the Jacobian: other points, or none
    fp32 = (dict(plain[0], eval_settings=np.array('{"precision": "fp32"}')), plain[1])
    windows = (dict(plain[0], windows=np.array([8, 16]), **{k: np.stack([plain[0][k]] * 2) for k in (
        "gap", "peak_gap", "peak_gap_ci")}), plain[1])
    jacobian = (dict(plain[0], eval_settings=np.array('{"jacobian_sigmas": [1.0]}')), plain[1])
    # the samples of one snapshot with other settings, and the same results in a second file
    other_samples = dict(plain[1], settings=np.array('{"num_samples": 64}'))
    gaps = [plain[0], plain_seed1[0], base[0], larger[0], fp32[0], windows[0], jacobian[0]]
    mems = [plain[1], plain_seed1[1], base[1], larger[1], other_samples, plain[1]]
    points = figures.snapshot_points([(f"g{i}", g) for i, g in enumerate(gaps)], [(f"m{i}", m) for i, m in enumerate(mems)])
    assert "counted once" in capsys.readouterr().out
    merged = figures.across_seeds(points)
    last = [r for r in merged if r["images_seen"] == 100000]
    assert sorted((r["recipe"], str(r["run_args"].get("size")), r["seeds"]) for r in last) == sorted([
        ("plain", "None", 2),   # seeds 0 and 1 of one run
        ("plain", "None", 1),   # seed 0 sampled with other settings
        ("plain", "None", 1),   # seed 0 evaluated in float32 ...
        ("plain", "None", 1),   # ... and sampled with other settings
        ("plain", "s", 1),      # another network
        ("base", "None", 1)])   # the authors' base model
    labels = set(figures.map_labels(merged).values())
    assert {"plain n = 32, size None", "plain n = 32, size s", "base n = 32, size None"} <= labels
    table = figures.format_map(points)
    assert table.count("base n = 32") == C


def test_correlation_radius_is_drawn_beside_the_gap_when_eval_gap_measured_it(tmp_path, capsys):
    write_gap(tmp_path / "guided.npz", radius=True, guidance=True)
    figures.main([str(tmp_path)])
    assert (tmp_path / "figures" / "correlation_radius_guided.png").exists()
    assert (tmp_path / "figures" / "correlation_radius_guided.pdf").exists()
    assert "note: correlation_radius" not in capsys.readouterr().out
    write_gap(tmp_path / "plain.npz", radius=True)
    data = plumbing.load_npz(tmp_path / "plain.npz")
    fig = figures.fig_correlation_radius(data)
    left, right = fig.axes[:2]
    assert len(left.lines) == 2 * C and left.get_ylabel() == "correlation radius of D (pixels)"
    np.testing.assert_array_equal(right.lines[0].get_ydata(), data["radius_train"][-1] - data["radius_val"][-1])
    figures.plt.close(fig)


def test_sample_columns_pair_with_the_gap_by_snapshot_digest_whatever_the_paths_and_unpaired_runs_say_so(tmp_path,
                                                                                                     capsys):
    write_gap(tmp_path / "gap.npz")  # checkpoints runs/r1000-32/snapshot-*.pt
    gap = plumbing.load_npz(tmp_path / "gap.npz")
    for folder in ("/elsewhere/moved", "../runs"):  # the run folder moved, or given by another path
        write_memorization(tmp_path / "mem.npz", folder=folder)
        row = figures.summary_rows([("gap", gap)], [("mem", plumbing.load_npz(tmp_path / "mem.npz"))])[0]
        assert row["memorized"] == 0.5 and row["fd_gap"] == 1.0
    capsys.readouterr()
    write_memorization(tmp_path / "other.npz", n=64)  # samples of other snapshots only
    row = figures.summary_rows([("gap", gap)], [("other", plumbing.load_npz(tmp_path / "other.npz"))])[0]
    assert row.get("memorized") is None
    one_line(capsys.readouterr().out, "note: ", "sample_memorize.py", "last snapshot of gap")


def test_summary_reports_the_peak_gap_of_the_last_snapshot_and_its_sigma(tmp_path):
    write_gap(tmp_path / "g.npz", params=2000)
    data = plumbing.load_npz(tmp_path / "g.npz")
    row = figures.summary_rows([("g", data)], [])[0]
    assert row["peak_gap"] == pytest.approx(data["gap"][-1].max())
    assert row["peak_sigma"] == pytest.approx(data["sigmas"][data["gap"][-1].argmax()])
    assert row["params"] == 2000 and row["n"] == 32 and row.get("memorized") is None


def test_runs_with_and_without_augmentation_are_compared_and_not_taken_for_two_model_sizes(tmp_path):
    write_gap(tmp_path / "plain.npz", params=1000)  # written before --augment-p: p = 0
    write_gap(tmp_path / "augmented.npz", params=1000, augment_p=0.12)
    write_gap(tmp_path / "larger.npz", params=4000, augment_p=0.12)
    groups = figures.factor_groups([(name, plumbing.load_npz(tmp_path / f"{name}.npz"))
                                    for name in ("plain", "augmented", "larger")])
    assert sorted(groups) == ["gap_by_augment_p", "gap_by_params"]
    assert [value for value, _ in groups["gap_by_augment_p"][1]] == [0.0, 0.12]
    assert [value for value, _ in groups["gap_by_params"][1]] == [1000, 4000], "the two augmented runs"
    figures.main([str(tmp_path)])
    assert (tmp_path / "figures" / "gap_by_augment_p.png").exists()
    summary = (tmp_path / "figures" / "summary.txt").read_text()
    augmented = next(line for line in summary.splitlines() if line.startswith("augmented "))
    assert f"{1000 + common.AUGMENT_DIM * 8:,}" in augmented, "the augment map's weights count"


def test_toy_results_are_redrawn(tmp_path):
    import toy2d
    toy2d.main(["delta", "--out", str(tmp_path / "toy"), "--samples-per-point", "4", "--steps", "16"])
    figures.main([str(tmp_path)])
    assert (tmp_path / "figures" / "toy_toy_delta.png").exists()


def test_missing_inputs_are_skipped_with_a_note_and_an_empty_folder_is_a_clear_error(tmp_path, capsys):
    write_memorization(tmp_path / "m.npz")
    figures.main([str(tmp_path)])
    assert "no eval_gap.py results" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([sys.executable, figures.__file__, str(empty)], capture_output=True, text=True)
    assert proc.returncode == 2 and "no results" in proc.stderr and "Traceback" not in proc.stderr


def test_a_gap_file_with_one_snapshot_gives_the_summary_without_any_figure(tmp_path, capsys):
    sigmas = np.geomspace(0.01, 10, 5)
    plumbing.save_npz(tmp_path / "gap.npz", args={}, script="eval_gap.py", sigmas=sigmas, images_seen=np.array([64]),
                      e_train=np.ones((1, 5)), e_val=np.full((1, 5), 2.0), gap=np.ones((1, 5)),
                      onset_images_seen=np.full(5, 64), peak_sigma=sigmas[:1], checkpoints=np.array(["r/s.pt"]))
    figures.main([str(tmp_path)])
    summary = (tmp_path / "figures" / "summary.txt").read_text()
    assert summary.splitlines()[2].startswith("gap ") and "0 figures in" in capsys.readouterr().out
    assert "unlike noisy data" not in summary, "no sample result: no trajectory score and no note about it"


def test_files_are_recognised_by_the_script_that_wrote_them_and_a_failing_figure_is_a_note(tmp_path, capsys):
    write_gap(tmp_path / "good.npz")
    write_gap(tmp_path / "old.npz", script=None)
    # another program's file whose key names match eval_gap.py's, with arrays of other shapes
    plumbing.save_npz(tmp_path / "foreign.npz", args={"lr": 1}, e_train=np.ones(3), e_val=np.ones(3), gap=np.ones(7),
                      images_seen=np.ones((2, 2)), sigmas=np.ones(1), onset_images_seen=np.ones(1))
    np.savez(tmp_path / "plain.npz", e_train=np.ones(3), e_val=np.ones(3), gap=np.ones(3), images_seen=np.ones(3),
             sigmas=np.ones(1), args=np.array("not json"))
    plumbing.save_npz(tmp_path / "bench.npz", args={}, script="bench_train.py", gap=np.ones(3))
    # written by eval_gap.py, yet missing the onset and with a gap of the wrong shape
    plumbing.save_npz(tmp_path / "broken.npz", args={}, script="eval_gap.py", sigmas=np.ones(4),
                      images_seen=np.array([1, 2]), e_train=np.ones((2, 4)), e_val=np.ones((2, 4)), gap=np.ones(3))
    figures.main([str(tmp_path)])
    out = capsys.readouterr().out
    names = {p.stem for p in (tmp_path / "figures").glob("*.png")}
    assert {"errors_over_training_good", "gap_over_training_good"} <= names and not any("old" in n for n in names)
    assert not any("foreign" in n or "plain" in n or "bench" in n for n in names)
    assert "note: skipping" in out and "foreign.npz: not a result of" in out and "plain.npz" in out
    assert "old.npz: not a result of" in out  # no 'script' entry: not recognised
    assert "note: errors_over_training_broken skipped: its input lacks 'onset_images_seen'" in out
    assert "note: summary row of broken skipped: IndexError" in out
    summary = (tmp_path / "figures" / "summary.txt").read_text()
    assert "good" in summary and "broken" not in summary


def test_image_grid_places_images_in_rows_with_white_gaps_and_enlarged_pixels():
    images = np.stack([np.full((1, 2, 2), v, np.float32) for v in (-1.0, 0.0, 1.0)])
    grid = plumbing.image_grid(images, cols=2, gap=1, scale=2)
    assert grid.shape == (2 * (4 + 1) + 1, 2 * (4 + 1) + 1)
    assert (grid[1:5, 1:5] == 0).all() and (grid[1:5, 6:10] == 0.5).all() and (grid[6:10, 1:5] == 1).all()
    assert (grid[0] == 1).all() and (grid[:, 5] == 1).all() and (grid[6:10, 6:10] == 1).all()  # gaps, empty cell
    color = plumbing.image_grid(np.full((2, 3, 2, 2), 5.0), cols=2)  # clipped to [-1, 1], no gaps
    assert color.shape == (2, 4, 3) and (color == 1).all()


def test_window_figure_shows_g_of_the_last_snapshot_per_window_and_the_others_the_whole_image(tmp_path):
    write_gap(tmp_path / "win.npz", windows=[8, 10, 16])
    figures.main([str(tmp_path)])
    names = {p.stem for p in (tmp_path / "figures").glob("*.png")}
    assert {"gap_by_window_win", "errors_over_training_win", "optimal_vs_network_win"} <= names
    win = plumbing.load_npz(tmp_path / "win.npz")
    row = figures.summary_rows([("win", win)], [])[0]
    assert row["peak_gap"] == win["gap"][-1, -1].max() > win["gap"][0, -1].max(), "the summary reads the whole image"
    fig = figures.fig_gap_by_window(win)
    curves = [line.get_ydata() for line in fig.axes[0].get_lines()][:3]   # then the zero line
    for w, curve in enumerate(curves):
        np.testing.assert_array_equal(curve, win["gap"][w, -1])
    assert "window size" in fig.axes[1].get_ylabel() and fig.axes[0].get_xscale() == "log"
    guided = dict(win, guidance_weights=np.array([0.0, 1.0]), gap=np.stack([win["gap"], 2 * win["gap"]], axis=1))
    lines = figures.fig_gap_by_window(guided).axes[0].get_lines()
    np.testing.assert_array_equal(lines[0].get_ydata(), win["gap"][0, -1])
    figures.plt.close("all")


def test_figures_drawn_by_two_processes_are_the_bytes_and_lines_of_one(tmp_path, capsys):
    write_gap(tmp_path / "gap" / "small.npz")
    write_memorization(tmp_path / "samples" / "small.npz")
    printed = {}
    for threads in ("1", "2"):
        figures.main([str(tmp_path), "--threads", threads, "--out", str(tmp_path / f"figs{threads}")])
        printed[threads] = capsys.readouterr().out.replace(f"figs{threads}", "figs")
    assert printed["1"] == printed["2"] and "wrote" in printed["1"]
    one = sorted(p.name for p in (tmp_path / "figs1").iterdir())
    assert len(one) > 10 and one == sorted(p.name for p in (tmp_path / "figs2").iterdir())
    for name in one:
        assert (tmp_path / "figs1" / name).read_bytes() == (tmp_path / "figs2" / name).read_bytes(), name
