"""train_image.py: snapshots and logs, exact resume, data parallel, compiled step and its fallback, precision,
threads, NaN stop, bad input."""
import io
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import common
import plumbing
from conftest import exit_status, file_size_limit, one_line, write_fashion_mnist
import train_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 8


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A tiny synthetic Fashion-MNIST: 40 training and 20 validation images of 28x28."""
    return write_fashion_mnist(tmp_path_factory.mktemp("data"), 40, 20)


def argv(data_dir, out, steps=40, *extra):
    """A tiny conditional run that draws from every random stream (noise, flips, label and weight dropout), in
    float32 on every machine (--precision auto would follow the CPU)."""
    return ["--data-dir", data_dir, "--out", str(out), "--model", "unet", "--size", "tiny", "--channels", "8",
            "--resolution", "16", "--n", "16", "--batch", str(BATCH), "--steps", str(steps), "--lr", "2e-3",
            "--lr-rampup", "64", "--ema-half-life", "80", "--cond", "class", "--label-dropout", "0.2",
            "--augment", "xflip", "--dropout", "0.1", "--snapshots", f"every:{20 * BATCH}",
            "--eval-every", f"{20 * BATCH}", "--probe-images", "8", "--device", "cpu", "--precision", "fp32", *extra]


def snapshot(out, step):
    return os.path.join(out, f"snapshot-{step * BATCH:09d}.pt")


@pytest.fixture(scope="module")
def baseline(data_dir, tmp_path_factory):
    """An uninterrupted 40-step run."""
    out = tmp_path_factory.mktemp("baseline")
    train_image.main(argv(data_dir, out))
    return out


@pytest.fixture(scope="module")
def augmented(data_dir, tmp_path_factory):
    """An uninterrupted 40-step run with the non-leaking augmentation."""
    out = tmp_path_factory.mktemp("augmented")
    train_image.main(argv(data_dir, out, 40, "--augment-p", "0.5"))
    return out


@pytest.fixture(scope="module")
def bf16(data_dir, tmp_path_factory):
    """An uninterrupted 40-step run in bf16 autocast."""
    out = tmp_path_factory.mktemp("bf16")
    train_image.main(argv(data_dir, out, 40, "--precision", "bf16"))
    return out


def counting_loss(monkeypatch, at, result):
    """Make the training loss call number `at` (and later ones) return result(loss) instead."""
    calls, real = [0], common.edm_loss

    def loss(*args, **kwargs):
        calls[0] += 1
        return result(real(*args, **kwargs)) if calls[0] >= at else real(*args, **kwargs)
    monkeypatch.setattr(common, "edm_loss", loss)


def interrupt(loss):
    raise KeyboardInterrupt


def test_adam_is_fused_on_a_cpu_and_steps_like_torchs_loop_up_to_rounding():
    torch.manual_seed(0)
    net = common.build_network("unet", "tiny", 16, 1)
    loop_net = common.build_network("unet", "tiny", 16, 1)
    loop_net.load_state_dict(net.state_dict())
    fused, loop = train_image.adam(net, 2e-3, torch.device("cpu")), torch.optim.Adam(loop_net.parameters(), lr=2e-3)
    assert fused.defaults["fused"] and not loop.defaults["fused"]
    for _ in range(5):
        for p, q in zip(net.parameters(), loop_net.parameters()):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        fused.step()
        loop.step()
    for p, q in zip(net.parameters(), loop_net.parameters()):
        torch.testing.assert_close(p, q, atol=1e-7, rtol=1e-6)


def test_snapshot_is_a_plain_dict_with_the_documented_keys(baseline):
    path = snapshot(baseline, 40)
    ckpt = torch.load(path, weights_only=True)  # tensors and plain values only: no code from the file runs
    assert set(plumbing.CHECKPOINT_KEYS) <= set(ckpt)
    assert all(isinstance(ckpt[key], torch.Tensor) for key in plumbing.SNAPSHOT_ARRAYS if key != "kmeans_centroids")
    loaded = plumbing.load_checkpoint(path)
    assert isinstance(loaded["subset"], np.ndarray) and np.array_equal(loaded["subset"], ckpt["subset"].numpy())
    assert ckpt["kind"] == plumbing.CHECKPOINT_KIND
    assert (ckpt["step"], ckpt["images_seen"], ckpt["dataset"], ckpt["resolution"]) == \
        (40, 40 * BATCH, "fashion-mnist", 16)
    assert ckpt["args"]["n"] == 16 and len(ckpt["subset"]) == 16 and len(ckpt["labels"]) == 16
    assert len(ckpt["rng"]) == 1 and "noise" in ckpt["rng"][0]["generators"]
    denoiser, _ = plumbing.load_denoiser(path)
    assert denoiser.config == ckpt["network"] and not denoiser.training
    x = torch.randn(2, 1, 16, 16)
    assert torch.isfinite(denoiser(x, torch.tensor([0.5, 2.0]), torch.tensor([0, 10]))).all()


def test_train_log_has_the_documented_keys_and_one_loss_per_step(baseline):
    log = plumbing.load_npz(os.path.join(baseline, "train_log.npz"))
    assert set(log) == {"args", "script", "format", "code", "images_seen", "loss", "eval_images", "eval_sigmas",
                        "E_train", "E_val", "snapshot_images", "subset", "probe_train", "probe_val"}
    assert log["args"]["steps"] == 40 and log["script"] == "train_image.py"
    np.testing.assert_array_equal(log["images_seen"], BATCH * np.arange(1, 41))
    assert np.isfinite(log["loss"]).all()
    np.testing.assert_array_equal(log["eval_images"], [0, 20 * BATCH, 40 * BATCH])
    np.testing.assert_array_equal(log["snapshot_images"], [20 * BATCH, 40 * BATCH])
    assert log["E_train"].shape == log["E_val"].shape == (3, 3)
    assert np.isin(log["probe_train"], log["subset"]).all() and len(log["probe_val"]) == 8
    assert log["E_train"][-1, 1] < log["E_train"][0, 1], "training lowers the denoising error at sigma = 1"


@pytest.mark.parametrize("run, extra", [("baseline", []), ("augmented", ["--augment-p", "0.5"]),
                                        ("bf16", ["--precision", "bf16"])])
def test_killed_and_resumed_run_ends_bit_identical_to_uninterrupted(run, extra, request, data_dir, tmp_path,
                                                                    monkeypatch):
    baseline = request.getfixturevalue(run)
    counting_loss(monkeypatch, 28, interrupt)  # killed in step 28, after the snapshot at step 20
    with pytest.raises(KeyboardInterrupt):
        train_image.main(argv(data_dir, tmp_path, 40, *extra))
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(snapshot(tmp_path, 20)), "train_log.npz"]
    monkeypatch.undo()
    train_image.main(argv(data_dir, tmp_path, 40, *extra))
    a, b = (torch.load(snapshot(out, 40), weights_only=False) for out in (baseline, tmp_path))
    for key in ("net", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    for i, state in a["opt"]["state"].items():
        assert all(torch.equal(state[k], b["opt"]["state"][i][k]) for k in state)
    log_a, log_b = (plumbing.load_npz(os.path.join(d, "train_log.npz")) for d in (baseline, tmp_path))
    for key in ("loss", "E_train", "E_val", "snapshot_images"):
        np.testing.assert_array_equal(log_a[key], log_b[key])


def test_a_resumed_snapshot_equals_the_uninterrupted_one_byte_for_byte(data_dir, tmp_path, monkeypatch):
    real, files = common.edm_loss, {}
    for name in ("whole", "resumed"):  # in two folders, both given as --out run: the argument is stored
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        run = argv(data_dir, "run", 20, "--snapshots", f"every:{10 * BATCH}")
        if name == "resumed":
            counting_loss(monkeypatch, 14, interrupt)  # killed in step 14, after the snapshot at step 10
            with pytest.raises(KeyboardInterrupt):
                train_image.main(run)
            monkeypatch.setattr(common, "edm_loss", real)
        train_image.main(run)
        files[name] = (tmp_path / name / snapshot("run", 20)).read_bytes()
    assert files["resumed"] == files["whole"]


def test_augmented_run_trains_on_augmented_images_told_their_parameters(augmented, data_dir, tmp_path,
                                                                         monkeypatch):
    ckpt = plumbing.load_checkpoint(snapshot(augmented, 40))
    assert ckpt["args"]["augment_p"] == 0.5 and ckpt["network"]["augment_dim"] == common.AUGMENT_DIM
    seen, real = [], common.edm_loss
    monkeypatch.setattr(common, "edm_loss", lambda *a, **kw: seen.append(kw["augment_labels"]) or real(*a, **kw))
    train_image.main(argv(data_dir, tmp_path / "plain", 2))
    assert seen == [None, None], "no --augment-p: no augmentation parameters"
    seen.clear()
    train_image.main(argv(data_dir, tmp_path / "augmented", 2, "--augment-p", "0.2"))
    params = torch.cat(seen)  # an image has no transform with probability 1/2 (1 - 0.2/2) 0.8^4 = 0.18
    assert params.shape == (2 * BATCH, common.AUGMENT_DIM) and 0 < params.ne(0).any(1).sum() < 2 * BATCH
    # sampling and evaluation give no augmentation parameters: the network as if a = 0
    denoiser, _ = plumbing.load_denoiser(ckpt)
    x, sigma, labels = torch.randn(3, 1, 16, 16), torch.tensor([0.3, 1.0, 3.0]), torch.tensor([0, 4, 10])
    torch.testing.assert_close(plumbing.network_denoiser(denoiser, "cpu", precision="fp32")(x, sigma, labels),
                               denoiser(x, sigma, labels, torch.zeros(3, common.AUGMENT_DIM)), rtol=0, atol=0)


@pytest.mark.parametrize("damage, words", [
    (lambda ckpt: ckpt["network"].update(depth=3), "does not hold what this version writes (depth)"),
    (lambda ckpt: ckpt["network"].pop("augment_dim"), "does not hold what this version writes (augment_dim)"),
    (lambda ckpt: ckpt.update(args=None), "does not hold what this version writes (args)"),
    (lambda ckpt: ckpt["ema"].update({"net.extra.weight": torch.ones(1)}), "ema weights of"),
    (lambda ckpt: ckpt["ema"].pop("net.conv_out.weight"), "ema weights of")])
def test_a_snapshot_whose_contents_do_not_fit_this_version_is_refused_in_one_line(baseline, tmp_path, damage, words,
                                                                                   capsys):
    ckpt = torch.load(snapshot(baseline, 20), weights_only=True)  # as written: tensors and plain values
    damage(ckpt)
    plumbing.save_checkpoint(ckpt, snapshot(tmp_path, 20))
    with pytest.raises(SystemExit) as stop:
        plumbing.run_cli(lambda: plumbing.load_denoiser(snapshot(tmp_path, 20)))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and words in err and len(err.strip().splitlines()) == 1, err


def test_same_seed_gives_the_same_snapshot_and_log_bytes_and_another_seed_does_not(data_dir, tmp_path):
    def run_bytes(*extra):
        out = tmp_path / "run"  # the same --out each time: it is stored in the files
        train_image.main(argv(data_dir, out, 20, *extra))
        files = {name: (out / name).read_bytes() for name in sorted(os.listdir(out))}
        shutil.rmtree(out)
        return files
    first = run_bytes()
    assert sorted(first) == [os.path.basename(snapshot(tmp_path, 20)), "train_log.npz"]
    assert run_bytes() == first
    other = run_bytes("--seed", "1")
    assert all(other[name] != first[name] for name in first)


def test_ctrl_c_prints_one_line_with_the_step_the_last_snapshot_and_how_to_resume(data_dir, tmp_path, capsys,
                                                                                   monkeypatch):
    counting_loss(monkeypatch, 28, interrupt)  # in step 28, after the snapshot at step 20
    with pytest.raises(SystemExit) as exit_info:
        plumbing.run_cli(lambda: train_image.main(argv(data_dir, tmp_path)))
    err = capsys.readouterr().err
    assert exit_info.value.code == 130 and "Traceback" not in err
    assert err.splitlines()[-1] == (f"interrupted after 27 of 40 steps (216 images seen); last snapshot "
                                    f"{snapshot(tmp_path, 20)}: rerun the same command to resume from it")


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_snapshot(data_dir, tmp_path, monkeypatch):
    counting_loss(monkeypatch, 25, lambda loss: loss * float("nan"))
    with pytest.raises(common.UserError, match=r"loss became nan at step 25 .*snapshot-000000160\.pt.*--lr"):
        train_image.main(argv(data_dir, tmp_path))
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(snapshot(tmp_path, 20)), "train_log.npz"]
    ckpt = plumbing.load_checkpoint(snapshot(tmp_path, 20))
    assert all(torch.isfinite(v).all() for v in ckpt["ema"].values())


def run_cli(args, capsys):
    """Exit status and stderr of the script's entry point."""
    return exit_status(lambda: train_image.main(args), capsys)


def assert_one_line_error(status, err, *words):
    assert status == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert all(w in err for w in words), err


@pytest.mark.parametrize("change, words", [
    (["--n", "41"], ["41", "40 images"]),
    (["--model", "vit"], ["unknown model", "unet", "dit"]),
    (["--size", "huge"], ["unknown size", "tiny"]),
    (["--data", "imagenet"], ["unknown dataset", "fashion-mnist"]),
    (["--snapshots", "log20"], ["--snapshots", "every:N"]),
    (["--cond", "none"], ["--label-dropout needs a conditional run"]),
    (["--channels", "7"], ["channels must be even", "7"]),
    (["--augment-p", "1.5"], ["--augment-p", "[0, 1]", "1.5"]),
    (["--data", "cifar10"], ["--data-dir", "has no cifar10 train split", "cifar-10-python.tar.gz"]),
])
def test_bad_arguments_exit_2_with_one_line_message(data_dir, tmp_path, capsys, change, words):
    assert_one_line_error(*run_cli(argv(data_dir, tmp_path, 40, *change), capsys), *words)
    assert not os.path.exists(tmp_path / "train_log.npz")


@pytest.mark.parametrize("change, message", [
    (["--p-mean", "nan"], "argument --p-mean: must be a finite number, got 'nan'"),
    (["--resolution", "0"], "argument --resolution: must be a positive integer, got '0'"),
    (["--seed", "-1"], "argument --seed: must be a non-negative integer, got '-1'"),
    (["--n", "1e3"], "argument --n: must be an integer of at least 2, got '1e3'"),
    (["--n", "1"], "argument --n: must be an integer of at least 2, got '1'"),
])
def test_bad_numbers_are_refused_by_the_parser_naming_the_option(data_dir, tmp_path, capsys, change, message):
    status, err = run_cli(argv(data_dir, tmp_path, 40, *change), capsys)
    assert status == 2 and err.endswith(f"error: {message}\n") and "Traceback" not in err, err


@pytest.mark.parametrize("content, words", [
    (b"not a torch file", ["corrupted"]),
    (None, ["not a denoiser snapshot"]),
])
def test_resuming_from_a_corrupted_or_foreign_snapshot_exits_2(data_dir, tmp_path, capsys, content, words):
    path = snapshot(tmp_path, 20)
    if content is None:
        torch.save({"model": {}}, path)
    else:
        with open(path, "wb") as f:
            f.write(content)
    assert_one_line_error(*run_cli(argv(data_dir, tmp_path), capsys), path, *words)


def test_resuming_on_other_images_under_the_same_file_names_names_both_folders(baseline, data_dir, tmp_path,
                                                                               capsys, monkeypatch):
    assert plumbing.load_checkpoint(snapshot(baseline, 40))["data_digests"] == plumbing.data_digests(
        "fashion-mnist", plumbing.load_checkpoint(snapshot(baseline, 40))["subset"], data_dir)
    (tmp_path / "other").mkdir()
    other = write_fashion_mnist(tmp_path / "other", 40, 20, seed=1)  # as an MNIST folder: the same file names
    counting_loss(monkeypatch, 1, interrupt)  # no step may run
    status, err = run_cli(argv(data_dir, baseline, 41, "--data-dir", other), capsys)
    assert status == 2, err
    one_line(err, "error: ", str(snapshot(baseline, 40)), f"other images than those in {other}", str(data_dir),
             "--data-dir")


def test_a_second_process_on_a_run_folder_stops_naming_the_first_and_stale_temp_files_go(data_dir, tmp_path,
                                                                                         capsys):
    out = tmp_path / "run"
    with plumbing.exclusive(out, folder=True):  # as another train_image.py --out run would hold it
        status, err = run_cli(argv(data_dir, out, 2), capsys)
    assert status == 2, err
    one_line(err, "error: ", f"--out {out}", f"process {os.getpid()}", str(out / ".lock"), "another --out")
    stale = out / f".{os.path.basename(snapshot(out, 9))}.123.tmp"  # a killed run's, of a snapshot never made
    stale.write_bytes(b"x" * 1000)
    foreign = out / ".gap.npz.123.tmp"  # eval_gap.py writes into run folders too, under its own lock
    foreign.write_bytes(b"y")
    train_image.main(argv(data_dir, out, 2))
    assert not stale.exists() and foreign.exists() and not (out / ".lock").exists()


def test_a_full_disk_stops_before_the_first_step_and_a_failed_write_is_one_line(data_dir, tmp_path, capsys,
                                                                                monkeypatch):
    counting_loss(monkeypatch, 1, interrupt)  # no step may run
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=300_000))
    status, err = run_cli(argv(data_dir, tmp_path / "full", 40), capsys)
    assert status == 2 and re.fullmatch(rf"error: cannot write {re.escape(snapshot(tmp_path / 'full', 20))}: no "
                                        rf"space left on device \(1\.\d+ MB needed, 0\.3 MB free in "
                                        rf"{re.escape(str(tmp_path / 'full'))}\)\n", err), err
    monkeypatch.undo()
    with file_size_limit(1_000_000):  # ulimit -f: the first snapshot (1.3 MB) cannot be written
        status, err = run_cli(argv(data_dir, tmp_path / "limited", 20), capsys)
    assert status == 2 and re.search(rf"\nerror: cannot write {re.escape(snapshot(tmp_path / 'limited', 20))}: file "
                                     rf"too large \(1\.\d+ MB needed\)\n$", err), err[-500:]
    assert os.listdir(tmp_path / "limited") == [], "no temp file is left"


def test_no_resume_with_a_bad_argument_keeps_the_earlier_run(baseline, data_dir, tmp_path, capsys):
    run = shutil.copytree(baseline, tmp_path / "run")
    before = sorted(os.listdir(run))
    for change, words in ((["--n", "41"], ["40 images"]), (["--data", "cifar10"], ["has no cifar10"])):
        assert_one_line_error(*run_cli(argv(data_dir, run, 40, "--no-resume", *change), capsys), *words)
    assert sorted(os.listdir(run)) == before


def test_no_resume_replaces_the_earlier_run_once_its_first_snapshot_is_written(baseline, data_dir, tmp_path,
                                                                              monkeypatch):
    run = shutil.copytree(baseline, tmp_path / "run")
    before = sorted(os.listdir(run))
    counting_loss(monkeypatch, 5, interrupt)  # stopped before the new run's first snapshot
    with pytest.raises(KeyboardInterrupt):
        train_image.main(argv(data_dir, run, 20, "--no-resume", "--seed", "1"))
    assert sorted(os.listdir(run)) == before
    monkeypatch.undo()
    train_image.main(argv(data_dir, run, 20, "--no-resume", "--seed", "1"))
    assert sorted(os.listdir(run)) == [os.path.basename(snapshot(run, 20)), "train_log.npz"]
    assert plumbing.load_checkpoint(snapshot(run, 20))["args"]["seed"] == 1
    assert plumbing.load_npz(os.path.join(run, "train_log.npz"))["args"]["seed"] == 1


def test_resuming_with_different_arguments_names_them(baseline, data_dir, capsys):
    status, err = run_cli(argv(data_dir, baseline, 60, "--lr", "1e-3"), capsys)
    assert_one_line_error(status, err, "--lr 0.002 (snapshot) vs 0.001 (now)", "--no-resume")
    assert "--steps" not in err.split("--no-resume")[0], "a longer --steps resumes"


def test_two_gloo_processes_train_like_one_process_with_the_same_global_batch(baseline, data_dir, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--",
           os.path.join(ROOT, "train_image.py"), *argv(data_dir, tmp_path, 20)]  # the baseline's first 20 steps
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(snapshot(tmp_path, 20)), "train_log.npz"]
    ckpt = plumbing.load_checkpoint(snapshot(tmp_path, 20))
    assert len(ckpt["rng"]) == 2 and not torch.equal(*(s["generators"]["noise"] for s in ckpt["rng"]))
    one, two = (plumbing.load_npz(os.path.join(d, "train_log.npz")) for d in (baseline, tmp_path))
    np.testing.assert_array_equal(one["subset"], two["subset"])
    assert len(two["loss"]) == 20 and not np.array_equal(one["loss"][:20], two["loss"]), "each process draws its own noise"
    np.testing.assert_allclose(two["loss"].mean(), one["loss"][:20].mean(), rtol=0.25)
    np.testing.assert_array_equal(two["eval_images"], one["eval_images"][:2])
    np.testing.assert_allclose(two["E_train"][-1], one["E_train"][1], rtol=0.15)


def test_compile_mode_compiles_train_steps_loss_and_trains_like_eager(baseline, data_dir, tmp_path, monkeypatch):
    # The step torch.compile captures on CUDA (there with CUDA graphs), run here with the aot_eager backend.
    compiled, real = [], torch.compile

    def compile_(fn, **kwargs):
        compiled.append((fn.__qualname__, kwargs))
        return real(fn, backend="aot_eager")
    monkeypatch.setattr(torch, "compile", compile_)
    train_image.main(argv(data_dir, tmp_path, 20, "--step-mode", "compile"))
    assert compiled == [("check_compile.<locals>.<lambda>", {"dynamic": False}), ("loss_function.<locals>.loss", {})]
    assert train_image.parse_args(["--compile"]).step_mode == "compile"
    one, two = (plumbing.load_npz(os.path.join(d, "train_log.npz")) for d in (baseline, tmp_path))
    np.testing.assert_allclose(two["loss"], one["loss"][:20], rtol=1e-5)


def test_cuda_graph_loss_is_the_compiled_loss_behind_a_step_marker(monkeypatch):
    # loss_function(cuda_graphs=True) on CPU: torch.compile asked for mode reduce-overhead (here aot_eager,
    # which ignores it), each call starting a new CUDA graph step; train_step returns a copy of the loss.
    modes, marks, real = [], [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None: modes.append(mode) or real(fn, backend="aot_eager"))
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    torch.manual_seed(0)
    nets = [common.build_network("unet", "tiny", 16, 1, channels=8) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    y, losses = torch.rand(4, 1, 16, 16) * 2 - 1, []
    for net, fn in zip(nets, (train_image.loss_function(nets[0]),
                              train_image.loss_function(nets[1], compiled=True, cuda_graphs=True))):
        ema = common.build_network("unet", "tiny", 16, 1, channels=8).requires_grad_(False)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(1)
        losses.append([train_image.train_step(fn, net, ema, opt, y, None, 1e-3, 0.9, common.P_MEAN, common.P_STD,
                                              gen) for _ in range(3)])
    assert modes == ["reduce-overhead"] and len(marks) == 3
    torch.testing.assert_close(torch.stack(losses[1]), torch.stack(losses[0]), rtol=1e-5, atol=0)
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_threads_automatic_one_for_small_steps_and_override(data_dir, tmp_path, capsys):
    try:
        train_image.main(argv(data_dir, tmp_path / "auto", 2))
        assert "1 CPU thread(s) each" in capsys.readouterr().out
        train_image.main(argv(data_dir, tmp_path / "two", 2, "--threads", "2"))
        assert "2 CPU thread(s) each" in capsys.readouterr().out and torch.get_num_threads() == 2
        assert plumbing.choose_threads(plumbing.ONE_THREAD_BELOW_FLOPS / 2) == 1 == plumbing.choose_threads(None)
        assert plumbing.choose_threads(plumbing.ONE_THREAD_BELOW_FLOPS * 2) == plumbing.DEFAULT_THREADS >= 1
        assert plumbing.choose_threads(1e15, requested=3) == 3 == plumbing.choose_threads(None) == torch.get_num_threads()
    finally:
        torch.set_num_threads(1)
    with pytest.raises(common.UserError, match="--threads"):
        plumbing.choose_threads(None, -1)


def test_step_flops_is_three_forward_passes_per_image():
    from torch.utils.flop_counter import FlopCounterMode
    net = common.build_network("unet", "tiny", 16, 1, channels=8)
    with FlopCounterMode(display=False) as counter:
        common.edm_loss(net, torch.rand(4, 1, 16, 16)).mean().backward()
    assert train_image.step_flops(net, 4) == pytest.approx(counter.get_total_flops(), rel=0.05)
    assert net.training


def failing_backend(gm, inputs):
    """A torch.compile backend that cannot build anything, as inductor without its C++ compiler or Triton."""
    raise RuntimeError("no compiler here")


def compile_failing_in(monkeypatch, fails):
    """torch.compile with a backend that fails at the forward pass (the first call) or, having compiled the
    forward pass, at the backward pass (the first loss.backward(), where autograd compiles it)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    backend = failing_backend if fails == "forward" else aot_autograd(
        fw_compiler=lambda gm, inputs: make_boxed_func(gm.forward), bw_compiler=failing_backend)
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, dynamic=kw.get("dynamic"), backend=backend))


@pytest.mark.parametrize("fails", ["forward", "backward"])
def test_auto_step_mode_survives_a_failing_compile_and_trains_bit_exact_as_eager(fails, baseline, data_dir, tmp_path,
                                                                                 monkeypatch, capsys):
    # auto compiles this run (a CPU, a small step, a run made long enough); the compiled step fails in step 1, in
    # its forward pass or after it (dropout has drawn from the random streams by then): one line, and the run goes
    # on eager from the state before step 1, bit for bit the eager baseline's first 20 steps.
    compile_failing_in(monkeypatch, fails)
    monkeypatch.setattr(train_image, "CPU_COMPILE_MIN_STEPS", 20)
    torch._dynamo.reset()
    train_image.main(argv(data_dir, tmp_path, 20))
    out = capsys.readouterr().out
    assert "training step: compile, float32 (--precision fp32)" in out
    failures = re.findall(r"^torch.compile failed \((\w+): (.*)\); running eager$", out, re.M)
    assert len(failures) == 1 and "no compiler here" in failures[0][1], out
    a, b = (torch.load(snapshot(d, 20), weights_only=False) for d in (baseline, tmp_path))
    for key in ("net", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    for i, state in a["opt"]["state"].items():
        assert all(torch.equal(state[k], b["opt"]["state"][i][k]) for k in state)
    assert torch.equal(a["rng"][0]["generators"]["noise"], b["rng"][0]["generators"]["noise"])
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"]), "dropout's stream as if eager from the start"
    one, two = (plumbing.load_npz(os.path.join(d, "train_log.npz")) for d in (baseline, tmp_path))
    np.testing.assert_array_equal(two["loss"], one["loss"][:20])


@pytest.mark.parametrize("fails", ["forward", "backward"])
def test_explicit_step_mode_compile_that_cannot_work_stops_with_one_line(fails, data_dir, tmp_path, capsys,
                                                                        monkeypatch):
    # A compiler that cannot build even a small function stops the run at start, before any data is read; one
    # that fails only on the training step stops it there. Either way one line, and nothing written.
    compile_failing_in(monkeypatch, fails)
    read, real_load = [], plumbing.load_images
    monkeypatch.setattr(plumbing, "load_images", lambda *a, **kw: read.append(a) or real_load(*a, **kw))
    torch._dynamo.reset()
    status, err = run_cli(argv(data_dir, tmp_path, 20, "--step-mode", "compile"), capsys)
    if fails == "backward":  # the progress bars of the evaluation before step 1 come first
        assert "Traceback" not in err
        err = err.splitlines()[-1] + "\n"
    assert_one_line_error(status, err, "--step-mode compile: torch.compile failed (",
                          "RuntimeError: no compiler here); --step-mode eager (or auto) runs without it")
    assert (read == []) == (fails == "forward")
    assert not os.path.exists(tmp_path / "train_log.npz")


def test_auto_step_mode_compiles_on_a_cpu_only_small_steps_of_long_runs():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    small, big = train_image.CPU_COMPILE_BELOW_FLOPS / 2, train_image.CPU_COMPILE_BELOW_FLOPS * 2
    long, short = train_image.CPU_COMPILE_MIN_STEPS, train_image.CPU_COMPILE_MIN_STEPS - 1
    assert train_image.step_mode("auto", cpu, 1, small, long) == ("compile", False)
    for world, flops, steps in ((1, small, short), (1, big, long), (2, small, long)):
        assert train_image.step_mode("auto", cpu, world, flops, steps) == ("eager", False)
    assert train_image.step_mode("auto", cuda, 1, big, short) == ("compile", True)
    assert train_image.step_mode("compile", cpu, 1, big, short) == ("compile", False)
    assert train_image.step_mode("eager", cpu, 1, small, long) == ("eager", False)
    # the quick reproduction's step (tiny U-Net of 24 channels, batch 32 at 16x16) is small enough, but quick.sh's
    # 2,400 steps do not win back the compilation; ten times as many would
    quick = train_image.step_flops(common.build_network("unet", "tiny", 16, 1, channels=24), 32)
    assert train_image.step_mode("auto", cpu, 1, quick, 2400) == ("eager", False)
    assert train_image.step_mode("auto", cpu, 1, quick, 24000) == ("compile", False)


def test_auto_precision_is_bf16_on_cuda_and_on_cpus_with_bf16_units_only(monkeypatch):
    for units, on_cpu in (([], "fp32"), (["AMX-BF16"], "bf16"), (["AVX512-BF16"], "bf16")):
        monkeypatch.setattr(plumbing, "cpu_bf16_units", lambda: units)
        assert plumbing.choose_precision("auto", "cpu") == on_cpu
        assert plumbing.choose_precision("auto", "cuda") == "bf16" and plumbing.choose_precision("auto", "mps") == "fp32"
        assert plumbing.choose_precision("fp32", "cuda") == "fp32" and plumbing.choose_precision("bf16", "cpu") == "bf16"
    assert train_image.parse_args([]).precision == "auto"


def test_cpu_bf16_units_are_what_torch_detects_else_the_cpuinfo_flags(monkeypatch):
    for amx, avx in ((False, False), (True, False), (False, True), (True, True)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx, raising=False)
        assert plumbing.cpu_bf16_units() == ["AMX-BF16"] * amx + ["AVX512-BF16"] * avx
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    for flags, units in (("fpu avx2 fma", []), ("avx512f amx_tile amx_bf16", ["AMX-BF16"]),
                         ("avx512f avx512_bf16", ["AVX512-BF16"])):
        cpuinfo = f"processor\t: 0\nmodel name\t: a CPU\nflags\t\t: {flags}\n"
        monkeypatch.setattr(plumbing, "open", lambda path: io.StringIO(cpuinfo), raising=False)
        assert plumbing.cpu_bf16_units() == units


def test_bf16_autocasts_the_training_loss_and_never_the_evaluations(data_dir, tmp_path, monkeypatch):
    seen = {"loss": [], "eval": []}
    real_loss, real_errors = common.edm_loss, common.denoising_errors
    monkeypatch.setattr(common, "edm_loss", lambda *a, **kw: seen["loss"].append(
        torch.is_autocast_enabled("cpu")) or real_loss(*a, **kw))
    monkeypatch.setattr(common, "denoising_errors", lambda *a, **kw: seen["eval"].append(
        torch.is_autocast_enabled("cpu")) or real_errors(*a, **kw))
    train_image.main(argv(data_dir, tmp_path, 2, "--precision", "bf16", "--eval-every", str(BATCH)))
    assert seen["loss"] == [True, True] and len(seen["eval"]) == 6 and not any(seen["eval"])


def test_bf16_run_stores_its_precision_keeps_float32_weights_and_trains_like_fp32(baseline, bf16):
    ckpt, fp32 = (plumbing.load_checkpoint(snapshot(run, 40)) for run in (bf16, baseline))
    assert ckpt["args"]["precision"] == "bf16" and fp32["args"]["precision"] == "fp32"
    assert all(v.dtype == torch.float32 for key in ("net", "ema") for v in ckpt[key].values() if v.is_floating_point())
    one, two = (plumbing.load_npz(os.path.join(d, "train_log.npz")) for d in (baseline, bf16))
    assert plumbing.load_npz(os.path.join(bf16, "train_log.npz"))["args"]["precision"] == "bf16"
    assert not np.array_equal(one["loss"], two["loss"]), "the loss ran in bf16"
    np.testing.assert_allclose(two["loss"][0], one["loss"][0], rtol=0.02)  # the same weights: bf16 rounding only
    np.testing.assert_array_equal(two["E_train"][0], one["E_train"][0])  # before training: float32 both times
    np.testing.assert_array_equal(two["E_val"][0], one["E_val"][0])
    np.testing.assert_allclose(two["E_train"][-1], one["E_train"][-1], rtol=0.15)


def test_resuming_keeps_the_snapshots_precision_and_refuses_another(baseline, data_dir, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(snapshot(baseline, 20), snapshot(run, 20))
    status, err = run_cli(argv(data_dir, run, 40, "--precision", "bf16"), capsys)
    assert_one_line_error(status, err, "--precision fp32 (snapshot) vs bf16 (now)", "--no-resume")
    monkeypatch.setattr(plumbing, "cpu_bf16_units", lambda: ["AMX-BF16"])  # a new run would pick bf16 here
    train_image.main(argv(data_dir, run, 40, "--precision", "auto"))
    assert "training step: eager, float32 (--precision fp32)" in capsys.readouterr().out
    a, b = (plumbing.load_checkpoint(snapshot(out, 40)) for out in (baseline, run))
    assert b["args"]["precision"] == "fp32" and all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])


def test_time_estimate_comes_after_the_warm_up_steps_and_leaves_them_out(data_dir, tmp_path, capsys, monkeypatch):
    # A first step of 2 s (as compilation makes it): the estimate is printed once the warm-up steps are over, from
    # the steps after them, and names the warm-up's time apart.
    monkeypatch.setattr(train_image, "FLUSH_EVERY", 3)
    calls, real = [0], common.edm_loss

    def slow_first(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 1:
            time.sleep(2)
        return real(*args, **kwargs)
    monkeypatch.setattr(common, "edm_loss", slow_first)
    train_image.main(argv(data_dir, tmp_path, 8))
    plan = re.findall(r"^(\S+) s per step after 2 warm-up steps of (\S+) s: about \S+ s left for 3 steps",
                      capsys.readouterr().out, re.M)
    assert len(plan) == 1 and float(plan[0][0]) < 1 <= 2 <= float(plan[0][1]), plan
