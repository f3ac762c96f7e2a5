"""What the scripts promise about their outputs and their start: one writer per output (a lock that dies with its
process), files written whole or not at all (a failed write is one line and keeps the old file), snapshot names of
any length, one line for an unusable device and for Ctrl-C while starting up."""
import errno
import os
import signal
import subprocess
import sys

import pytest
import torch

import common
import plumbing
from conftest import file_size_limit, one_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_atomic_write_leaves_the_temp_file_of_another_live_writer_alone(tmp_path):
    target = tmp_path / "gap.npz"
    live = tmp_path / ".gap.npz.999999.tmp"  # another process, half way through writing the same file
    live.write_bytes(b"partial")
    plumbing.atomic_write(target, lambda f: f.write(b"mine"))
    assert target.read_bytes() == b"mine" and live.read_bytes() == b"partial"
    assert sorted(os.listdir(tmp_path)) == [".gap.npz.999999.tmp", "gap.npz"]


def test_a_second_writer_is_refused_naming_the_holder_and_the_lock_dies_with_its_process(tmp_path):
    target = tmp_path / "race.npz"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, plumbing\n"
                               f"with plumbing.exclusive({str(target)!r}):\n"
                               "    print('holding', flush=True)\n"
                               "    time.sleep(600)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "holding\n"
        with pytest.raises(common.UserError) as err:
            with plumbing.exclusive(target):
                pass
        one_line(str(err.value), f"--out {target}", f"process {holder.pid}", str(tmp_path / ".race.npz.lock"),
                 "another --out")
    finally:
        holder.send_signal(signal.SIGKILL)  # kill -9: no clean-up of its own
        holder.wait()
    stale = tmp_path / f".race.npz.{holder.pid}.tmp"  # what a writer killed mid-write leaves
    stale.write_bytes(b"x" * 100)
    with plumbing.exclusive(target):
        assert not stale.exists(), "under the lock, no live process writes: its temp files are stale"
        plumbing.atomic_write(target, lambda f: f.write(b"done"))
    assert os.listdir(tmp_path) == ["race.npz"], "the lock file goes with its holder"


def test_a_write_that_fails_for_space_is_one_line_with_the_size_needed_and_keeps_the_old_file(tmp_path,
                                                                                                monkeypatch):
    target = tmp_path / "result.npz"
    target.write_bytes(b"old")
    payload = b"x" * 3_000_000
    with file_size_limit(1_000_000), pytest.raises(common.UserError) as err:  # ulimit -f
        plumbing.atomic_write(target, lambda f: f.write(payload))
    one_line(str(err.value), f"cannot write {target}", "file too large", "3 MB needed")

    def full(fd):  # a full disk, which some file systems report only when the data reach it
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(common.UserError) as err:
        plumbing.save_npz(target, values=torch.zeros(500_000, dtype=torch.float64).numpy())
    one_line(str(err.value), f"cannot write {target}", "no space left", "4 MB needed")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["result.npz"]


def test_snapshots_of_any_number_of_digits_are_found_in_the_order_of_images_seen(tmp_path):
    names = ["snapshot-1000000000.pt", "snapshot-000000512.pt", "snapshot-999999999.pt", "snapshot-12000000000.pt",
             "snapshot-x.pt", "snapshot-000000512.pt.tmp"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    found = [os.path.basename(p) for p in plumbing.find_snapshots([str(tmp_path)])]
    assert found == ["snapshot-000000512.pt", "snapshot-999999999.pt", "snapshot-1000000000.pt",
                     "snapshot-12000000000.pt"]


def test_a_free_name_replaces_nothing(tmp_path):
    (tmp_path / "gap.npz").write_bytes(b"")
    (tmp_path / "gap-2.npz").write_bytes(b"")
    assert plumbing.free_name(tmp_path / "gap.npz") == str(tmp_path / "gap-3.npz")


@pytest.mark.parametrize("script, argv", [
    ("train_image.py", ["--size", "tiny"]), ("eval_gap.py", ["--optimal"]), ("sample_memorize.py", ["--optimal"]),
    ("toy2d.py", ["delta"])])
@pytest.mark.parametrize("device", ["mps", "xpu", "meta"])
def test_a_device_that_is_not_here_is_one_line_before_any_work(script, argv, device, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    module = __import__(script[:-3])
    out = tmp_path / "out.npz" if script in ("eval_gap.py", "sample_memorize.py") else tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        plumbing.run_cli(lambda: module.main([*argv, "--device", device, "--out", str(out)]))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.endswith(f"error: --device {device}: {device} is not available here "
                                                      "(use cpu or auto)\n"), err


@pytest.mark.parametrize("script", ["eval_gap", "sample_memorize"])
def test_a_second_process_on_a_result_file_stops_naming_the_first(script, tmp_path, capsys):
    out = tmp_path / "race.npz"
    module = __import__(script)
    with plumbing.exclusive(out):  # as another eval_gap.py or sample_memorize.py --out race.npz would hold it
        with pytest.raises(SystemExit) as exit_info:
            plumbing.run_cli(lambda: module.main(["--optimal", "--device", "cpu", "--out", str(out)]))
    assert exit_info.value.code == 2 and capsys.readouterr().err == (
        f"error: --out {out} is being written by process {os.getpid()} (it holds {tmp_path / '.race.npz.lock'}): "
        "wait for it to end, or give another --out\n")
    assert os.listdir(tmp_path) == []


INTERRUPT_ON_TORCH_IMPORT = """
import runpy, sys
class Interrupt:  # Ctrl-C while torch is being imported, as in the first 1.5 s of every script
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise KeyboardInterrupt
sys.meta_path.insert(0, Interrupt())
sys.path.insert(0, {folder!r})
sys.argv = [{script!r}]
runpy.run_path({script!r}, run_name="__main__")
"""


@pytest.mark.parametrize("script", ["train_image.py", "eval_gap.py", "sample_memorize.py", "toy2d.py", "figures.py",
                                    "benchmarks/bench_nn.py"])
def test_ctrl_c_while_starting_up_is_one_line_and_status_130(script):
    code = INTERRUPT_ON_TORCH_IMPORT.format(folder=os.path.dirname(os.path.join(ROOT, script)), script=script)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 130, (done.returncode, done.stderr[-2000:])  # not killed by SIGINT (-2)
    one_line(done.stderr, "interrupted while starting up")
