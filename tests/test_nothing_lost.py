"""Nothing lost: results tied to the images they were computed on, resumes that say when they are not exact, locks
that a symlink cannot bypass and that live in the run folder, scripts that stop with every job on Ctrl-C and
SIGTERM, one line instead of a traceback, and paths taken from where a script was started."""
import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import common
import eval_gap
import plumbing
import sample_memorize
import toy2d
import train_image
from conftest import exit_status, one_line, write_fashion_mnist, write_idx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["--model", "unet", "--size", "tiny", "--channels", "8", "--resolution", "16", "--n", "16", "--batch", "8",
         "--lr", "2e-3", "--lr-rampup", "0", "--snapshots", "every:16", "--eval-every", "16", "--probe-images", "4",
         "--device", "cpu", "--precision", "fp32"]
GAP = ["--optimal", "--n", "16", "--resolution", "8", "--num-images", "8", "--sigmas", "0.05", "0.5", "2",
       "--device", "cpu"]
SAMPLES = ["--optimal", "--n", "8", "--resolution", "8", "--num-samples", "4", "--steps", "4", "--stop-sigma", "1",
           "--bootstrap", "20", "--features", "builtin", "--device", "cpu"]
TOY = ["--samples-per-point", "8", "--steps", "24", "--num-samples", "64"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A tiny synthetic Fashion-MNIST: 40 training and 20 validation images."""
    return write_fashion_mnist(tmp_path_factory.mktemp("data"), 40, 20)


@pytest.fixture(scope="module")
def relative_run(data_dir, tmp_path_factory):
    """HERE/run: a 4-step run (snapshots after steps 2 and 4) on one CPU thread, trained in the folder HERE with
    --data-dir data, a relative path (HERE/data links to the data)."""
    here = tmp_path_factory.mktemp("here")
    os.symlink(data_dir, here / "data")
    before = os.getcwd()
    os.chdir(here)
    try:
        train_image.main([*TRAIN, "--steps", "4", "--threads", "1", "--data-dir", "data", "--out", "run"])
    finally:
        os.chdir(before)
    return here / "run"


def one_line_error(status, err, *words):
    assert status == 2, err
    one_line(err, "error: ", *words)


# --- 2. results of the optimal denoiser belong to the images they were computed on ------------------------------

@pytest.mark.parametrize("script, argv, key", [(eval_gap, GAP, "e_val_optimal"), (sample_memorize, SAMPLES, "d_val")])
def test_optimal_results_of_replaced_images_are_not_reused_and_force_computes_them_again(script, argv, key, tmp_path,
                                                                                         capsys):
    (tmp_path / "data").mkdir()
    data = write_fashion_mnist(tmp_path / "data", 40, 20)
    out = tmp_path / "result.npz"
    command = [*argv, "--data-dir", data, "--out", str(out)]
    script.main(command)
    first, first_bytes = plumbing.load_npz(str(out)), out.read_bytes()
    write_fashion_mnist(data, 40, 20, seed=7)  # other images under the same file names
    plumbing._LOADED.clear()  # read again, as a new process reads them
    plumbing._SPLIT_DIGESTS.clear()
    status, err = exit_status(lambda: script.main(command), capsys)
    one_line_error(status, err, "--force")  # its row is of other images: not reused, and not dropped unasked
    assert out.read_bytes() == first_bytes
    script.main([*command, "--force"])
    assert not np.array_equal(plumbing.load_npz(str(out))[key], first[key]), "computed again on the new images"


# --- 3. a resume with another thread count says that it matches only up to rounding -------------------------------

@pytest.mark.parametrize("threads, note", [(1, False), (2, True)])
def test_a_resume_with_another_cpu_thread_count_says_it_matches_only_up_to_rounding(threads, note, relative_run,
                                                                                    tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(relative_run, run)
    os.remove(run / "snapshot-000000032.pt")  # resume after step 2
    state = torch.load(run / "snapshot-000000016.pt", weights_only=True)
    assert state["cpu_threads"] == 1
    state["cpu_threads"] = threads  # as if made on `threads` threads
    torch.save(state, run / "snapshot-000000016.pt")
    capsys.readouterr()
    train_image.main([*TRAIN, "--steps", "4", "--threads", "1", "--out", str(run)])  # the run's own --data-dir
    out = capsys.readouterr().out
    assert ("note: resuming with CPU threads 2 -> 1 (the snapshot's -> now)" in out
            and "matches an uninterrupted run only up to rounding" in out) == note, out
    resumed = plumbing.load_checkpoint(run / "snapshot-000000032.pt")
    assert resumed["cpu_threads"] == 1
    data = str(relative_run.parent / "data")  # without --data-dir, a resume reads the folder the run read
    assert resumed["args"]["data_dir"] == resumed["data_digests"]["folder"] == data


# --- 4 and 8. locks: on the resolved path, inside a run folder ------------------------------------------------------

def test_a_symlink_to_a_run_folder_is_locked_as_the_folder(data_dir, tmp_path, capsys):
    run, link = tmp_path / "run", tmp_path / "link"
    run.mkdir()
    link.symlink_to(run)
    with plumbing.exclusive(run, folder=True):  # as train_image.py --out run holds it
        status, err = exit_status(lambda: train_image.main([*TRAIN, "--steps", "2", "--data-dir", data_dir,
                                                            "--out", str(link)]), capsys)
    one_line_error(status, err, f"--out {link} is being written by process {os.getpid()}", str(run / ".lock"))
    assert os.listdir(run) == []


def test_a_symlink_to_a_result_file_is_locked_as_its_target_and_written_through(data_dir, tmp_path, capsys):
    real, link = tmp_path / "real.npz", tmp_path / "link.npz"
    eval_gap.main([*GAP, "--data-dir", data_dir, "--out", str(real)])
    link.symlink_to(real)
    with plumbing.exclusive(real):
        status, err = exit_status(lambda: eval_gap.main([*GAP, "--data-dir", data_dir, "--out", str(link)]), capsys)
    one_line_error(status, err, "is being written by process", str(tmp_path / ".real.npz.lock"))
    eval_gap.main([*GAP, "--data-dir", data_dir, "--sigmas", "1", "--out", str(link), "--force"])
    assert link.is_symlink() and os.readlink(link) == str(real), "the link stays a link"
    assert list(plumbing.load_npz(str(real))["sigmas"]) == [1.0], "its target is what was written"
    assert sorted(os.listdir(tmp_path)) == ["link.npz", "real.npz"]


def test_the_lock_of_a_run_folder_lives_inside_it(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    with plumbing.exclusive(run, folder=True):  # whoever may write the run folder may lock it: not its parent
        assert os.listdir(tmp_path) == ["run"] and os.listdir(run) == [".lock"]
        status, err = exit_status(lambda: train_image.main([*TRAIN, "--steps", "2", "--data-dir", data_dir,
                                                            "--out", str(run)]), capsys)
    one_line_error(status, err, f"(it holds {run / '.lock'})")
    train_image.main([*TRAIN, "--steps", "2", "--data-dir", data_dir, "--out", str(run)])
    assert os.listdir(tmp_path) == ["run"] and ".lock" not in os.listdir(run)


# --- 5. SIGTERM stops a Python script as Ctrl-C does --------------------------------------------------------------

def test_sigterm_stops_training_with_one_line_saying_how_far_it_got_and_status_143(data_dir, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train_image.py", *TRAIN, "--steps", "1000000", "--data-dir", data_dir,
                             "--out", str(run)], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (run / "snapshot-000000016.pt").exists(), proc, 120)
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
    assert proc.returncode == 143 and "Traceback" not in err, err[-3000:]
    last = err.splitlines()[-1]
    assert last.startswith("interrupted by SIGTERM after ") and "rerun the same command to resume" in last, last
    assert ".lock" not in os.listdir(run), "the lock goes with it"


@pytest.mark.parametrize("num, stop", [(signal.SIGTERM, plumbing.Terminated), (signal.SIGINT, KeyboardInterrupt)])
def test_a_signal_during_a_snapshot_write_stops_once_the_file_is_whole(num, stop, tmp_path):
    """torch.save interrupted inside its zip writer ended in a RuntimeError traceback and exit status 1."""
    state = {"weights": torch.arange(50000.0)}

    def write(f):
        os.kill(os.getpid(), num)  # arrives while torch.save writes
        torch.save(state, f)
    previous = plumbing.stop_on_sigterm()
    try:
        with pytest.raises(stop):
            plumbing.atomic_write(tmp_path / "snapshot.pt", write)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    assert torch.equal(torch.load(tmp_path / "snapshot.pt", weights_only=True)["weights"], state["weights"])
    assert os.listdir(tmp_path) == ["snapshot.pt"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


SIGTERM_ON_TORCH_IMPORT = """
import os, runpy, signal, sys
class Terminate:  # SIGTERM while torch is being imported, as in the first 1.5 s of every script
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            os.kill(os.getpid(), signal.SIGTERM)
sys.meta_path.insert(0, Terminate())
sys.path.insert(0, {folder!r})
sys.argv = [{script!r}]
runpy.run_path({script!r}, run_name="__main__")
"""


def test_sigterm_while_starting_up_is_one_line_and_status_143():
    code = SIGTERM_ON_TORCH_IMPORT.format(folder=ROOT, script="eval_gap.py")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 143, (done.returncode, done.stderr[-2000:])  # not killed by SIGTERM (-15)
    one_line(done.stderr, "interrupted while starting up")


def test_forked_workers_end_quietly_when_their_pool_closes_under_run_cli():
    code = ("import plumbing\n"  # a closing pool ends its workers by SIGTERM, which must not raise Terminated there
            "plumbing.run_cli(lambda: print(plumbing.in_processes([int, int, int], 2)))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (0, "[0, 0, 0]\n", "")


# --- 7. toy2d.py replaces a result of other settings only with --force ---------------------------------------------

def test_toy2d_keeps_a_result_of_other_settings_unless_force(tmp_path, capsys):
    toy2d.main(["delta", "--n-points", "8", "--out", str(tmp_path), *TOY])
    first = (tmp_path / "delta.npz").read_bytes()
    status, err = exit_status(lambda: toy2d.main(["delta", "--n-points", "10", "--out", str(tmp_path), *TOY]), capsys)
    one_line_error(status, err, "other settings", "n_points [8] -> [10]", "--force")
    assert (tmp_path / "delta.npz").read_bytes() == first
    toy2d.main(["delta", "--n-points", "10", "--out", str(tmp_path), "--force", *TOY])
    assert plumbing.load_npz(str(tmp_path / "delta.npz"))["args"]["n_points"] == [10]
    toy2d.main(["delta", "--n-points", "10", "--out", str(tmp_path), "--jobs", "1", *TOY])  # not a setting


# --- 11. one line instead of a traceback -------------------------------------------------------------------------

def test_an_unwritable_cache_for_the_classifier_features_is_one_line(data_dir, tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("a file where the cache folder would be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    source = plumbing.TrainingSource("fashion-mnist", 8, np.arange(8), data_dir=data_dir)
    with pytest.raises(common.UserError, match=r"^cannot write the cache of the classifier feature network .*"
                                               r"set XDG_CACHE_HOME to a folder you can write$"):
        plumbing.load_feature_extractor("classifier", "cpu", source)


@pytest.mark.parametrize("script", [train_image, eval_gap, sample_memorize])
def test_an_empty_validation_split_is_one_line_naming_its_file(script, tmp_path, capsys):
    (tmp_path / "data").mkdir()
    data = write_fashion_mnist(tmp_path / "data", 40, 0)
    out = str(tmp_path / ("run" if script is train_image else "result.npz"))
    argv = [*TRAIN, "--steps", "2"] if script is train_image else GAP if script is eval_gap else SAMPLES
    status, err = exit_status(lambda: script.main([*argv, "--data-dir", data, "--out", out]), capsys)
    one_line_error(status, err, "t10k-images-idx3-ubyte.gz holds no images", "val")


# --- 12. paths from where a script was started ---------------------------------------------------------------------

def test_a_run_trained_with_a_relative_data_dir_is_evaluated_from_another_folder(relative_run, tmp_path, monkeypatch):
    ckpt = plumbing.load_checkpoint(relative_run / "snapshot-000000032.pt")
    assert ckpt["args"]["data_dir"] == str(relative_run.parent / "data")
    monkeypatch.chdir(tmp_path)
    eval_gap.main([str(relative_run), "--num-images", "4", "--sigmas", "0.5", "--device", "cpu", "--out", "gap.npz"])
    assert plumbing.load_npz("gap.npz")["e_val"].shape == (2, 1)


# --- 14. and 15. ---------------------------------------------------------------------------------------------------

def test_images_and_labels_of_different_lengths_name_both_files(tmp_path):
    write_fashion_mnist(tmp_path, 40, 20)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(39) % 10)
    with pytest.raises(common.UserError) as err:
        plumbing.load_images("fashion-mnist", "train", str(tmp_path))
    assert str(err.value).startswith(f"{tmp_path / 'train-images-idx3-ubyte.gz'} holds 40 images but "
                                     f"{tmp_path / 'train-labels-idx1-ubyte.gz'} 39 labels"), str(err.value)


def test_a_run_folder_and_its_own_snapshots_give_each_snapshot_once(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    names = [f"snapshot-{seen:09d}.pt" for seen in (8, 32, 160)]
    for name in names:
        (run / name).write_bytes(b"")
    (tmp_path / "last.pt").symlink_to(run / names[-1])
    found = plumbing.find_snapshots([str(run), str(run / names[-1]), str(tmp_path / "last.pt"), str(run / names[0])])
    assert found == [str(run / name) for name in names]


def test_stop_sigmas_that_fall_on_one_grid_step_are_listed_once():
    sigmas = common.edm_sigmas(6)
    steps = sample_memorize.stop_steps(sigmas, [5.0, 2.0, 1.0, 0.5, 0.2])
    assert steps == [3, 4] and sigmas[steps].tolist() == sorted(set(sigmas[steps].tolist()), reverse=True)


# --- shell scripts: 5, 6, 9, 12 and 13 ----------------------------------------------------------------------------

def start_script(script, argv, cwd, **env):
    """bash ROOT/SCRIPT ARGV, started in the folder cwd, in a session of its own, one thread per process."""
    return subprocess.Popen(["bash", os.path.join(ROOT, script), *argv], cwd=cwd, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **env}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def session(proc):
    """The command lines of the live processes of proc's session: the script and everything it started."""
    listed = subprocess.run(["ps", "-ww", "-s", str(proc.pid), "-o", "stat=,args="], capture_output=True,
                            text=True).stdout  # -ww: whole command lines, whatever COLUMNS says
    return [line.split(None, 1)[-1] for line in listed.splitlines() if not line.lstrip().startswith("Z")]


def wait_for(condition, proc, timeout):
    """Wait until condition() holds; fails when proc ends first or after `timeout` seconds."""
    end = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > end:
            stop(proc)
            pytest.fail(f"{proc.args}: {'ended' if proc.poll() is not None else 'timed out'} before what the test "
                        f"waited for:\n{''.join(part or '' for part in proc.communicate())[-3000:]}")
        time.sleep(0.2)


def stop(proc):
    """Kill proc and, when it leads a session (start_script), what is left of that session."""
    proc.kill()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def finish(proc, timeout):
    """(exit status, stdout, stderr) of a script; killed, with its jobs, after `timeout` seconds (the test fails)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        out, err = proc.communicate()
        pytest.fail(f"{proc.args} still ran after {timeout} s:\n{out[-2000:]}{err[-2000:]}")
    return proc.returncode, out, err


def gone(proc, timeout=20):
    """The processes of proc's session still alive after up to `timeout` seconds (none: all ended)."""
    end = time.monotonic() + timeout
    while session(proc) and time.monotonic() < end:
        time.sleep(0.2)
    left = session(proc)
    stop(proc)
    return left


@pytest.fixture
def elsewhere(data_dir, tmp_path):
    """A folder to start the shell scripts in, outside the repository, with a link `data` to the data and a Python
    at the relative path `my python/python3` (a space in it)."""
    here = tmp_path / "here"
    (here / "my python").mkdir(parents=True)
    (here / "my python" / "python3").symlink_to(sys.executable)
    (here / "data").symlink_to(data_dir)
    return here


@pytest.mark.parametrize("how, status", [("SIGTERM", 143), ("Ctrl-C", 130)])
def test_study_sh_started_elsewhere_stops_every_job_on_ctrl_c_and_sigterm(how, status, elsewhere):
    proc = start_script("study.sh", ["--scale", "cpu", "--tiny", "--device", "cpu", "--out", "study", "--data-dir",
                                     "data"], elsewhere, PYTHON="my python/python3")
    logs = elsewhere / "study" / "logs"
    wait_for(lambda: logs.is_dir() and any(f.stat().st_size for f in logs.iterdir()), proc, 120)  # a job runs
    assert any(f"{elsewhere}/my python/python3 " in command for command in session(proc)), "PYTHON as given there"
    assert not os.path.exists(os.path.join(ROOT, "study")), "OUT is where the script was started"
    if how == "SIGTERM":
        os.kill(proc.pid, signal.SIGTERM)
    else:  # a terminal sends Ctrl-C to its foreground process group
        os.killpg(proc.pid, signal.SIGINT)
    code, out, err = finish(proc, 60)
    assert code == status and err.splitlines()[-1].startswith("interrupted: the running jobs were stopped"), err
    assert gone(proc) == [], "every job and its children ended"
    assert f"reading fashion-mnist from {elsewhere / 'data'}" in out, "--data-dir from where it was started"
    lines = [(logs / name).read_text().splitlines() for name in os.listdir(logs)]
    assert any(text and text[-1].startswith("interrupted") for text in lines), lines


def test_quick_sh_started_elsewhere_runs_a_python_path_with_a_space_and_stops_every_job_on_sigterm(elsewhere):
    proc = start_script("quick.sh", ["myq"], elsewhere, PYTHON="my python/python3")
    wait_for(lambda: (elsewhere / "myq" / "toy2d" / ".lock").exists(), proc, 120)  # toy2d.py runs, under its lock
    assert (elsewhere / "myq" / "logs" / "references.log").exists() and not os.path.exists(os.path.join(ROOT, "myq"))
    os.kill(proc.pid, signal.SIGTERM)
    code, out, err = finish(proc, 60)
    assert code == 143 and err.splitlines()[-1].startswith("interrupted: the running jobs were stopped"), err
    assert f"quick.sh with {elsewhere}/my python/python3," in out
    assert gone(proc) == [], "the toy study and the reference samplers ended too"


@pytest.mark.parametrize("script, argv, log", [
    ("quick.sh", ["out"], "logs/references.log"),
    ("study.sh", ["--scale", "cpu", "--tiny", "--device", "cpu", "--out", "out", "--data-dir", "data"], "cpu.log")])
def test_a_second_shell_script_into_the_same_out_stops_before_it_touches_a_log(script, argv, log, elsewhere):
    out = elsewhere / "out"
    (out / "logs").mkdir(parents=True)
    (out / log).write_text("the first run's log\n")
    lock = out / f".{script[:-3]}.lock"
    with open(lock, "a") as held:  # as the first run holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write(f"{os.getpid()}\n")
        held.flush()
        proc = start_script(script, argv, elsewhere, PYTHON=sys.executable)
        code, _, err = finish(proc, 120)
    one_line_error(code, err, f"{out} is being written by another {script} (process {os.getpid()}")
    assert (out / log).read_text() == "the first run's log\n"
    assert gone(proc) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_gpu_sh_without_cuda_stops_in_one_line_before_any_job(tmp_path):
    proc = start_script("gpu.sh", ["--tiny", "--out", "out"], tmp_path, PYTHON=sys.executable)
    code, _, err = finish(proc, 120)
    one_line_error(code, err, "--device cuda: cuda is not available here")
    assert not (tmp_path / "out").exists()


def test_unknown_sizes_stop_in_one_line_before_any_job(tmp_path):
    proc = start_script("study.sh", ["--scale", "cpu", "--tiny", "--device", "cpu", "--sizes", "tiny huge", "--out",
                                     "out"], tmp_path, PYTHON=sys.executable)
    code, _, err = finish(proc, 120)
    one_line_error(code, err, "--sizes huge: no such U-Net size", "tiny")
    assert not (tmp_path / "out").exists()


def test_quick_sh_takes_out_from_where_it_was_started(tmp_path):
    (tmp_path / "myq").write_text("a file")
    proc = start_script("quick.sh", ["myq"], tmp_path, PYTHON=sys.executable)
    code, _, err = finish(proc, 120)
    one_line_error(code, err, f"{tmp_path / 'myq'} is a file, not a folder")
