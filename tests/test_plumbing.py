"""plumbing.py: devices, process groups, atomic writes and locks, checkpoint errors, random states, result files,
Ctrl-C and forked processes."""
import os
import random
import sys

import numpy as np
import pytest
import torch

import common
import plumbing
from conftest import one_line

F64 = torch.float64


# --- preconditioning and loss weight ---------------------------------------


# --- sigma grids -----------------------------------------------------------


# --- optimal denoiser --------------------------------------------------------


# --- error-prone denoiser and guidance -------------------------------------


# --- sampler ---------------------------------------------------------------


# --- Fréchet distance --------------------------------------------------------


# --- device --------------------------------------------------------------

@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_pick_device_auto_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert plumbing.pick_device("auto") == torch.device(expected)


def test_pick_device_refuses_unknown_names_and_every_absent_device_alike(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    assert plumbing.pick_device("cpu") == torch.device("cpu")
    with pytest.raises(common.UserError, match="unknown device 'abacus'"):
        plumbing.pick_device("abacus")
    for name in ("cuda", "cuda:1", "mps", "xpu", "meta"):
        with pytest.raises(common.UserError, match=f"--device {name}: {name} is not available here \\(use cpu or auto"):
            plumbing.pick_device(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert plumbing.pick_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(common.UserError, match="--device cuda:1: cuda:1 is not available here \\(use cuda, cpu"):
        plumbing.pick_device("cuda:1")


def _gather_in_gloo_group(rank, world, init):
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        cpu, n = torch.device("cpu"), 2 + rank  # shards of different sizes
        shard = torch.arange(3 * n * 2, dtype=F64).view(3, n, 2) + 100 * rank
        rows = plumbing.gather_rows(shard, world, cpu, dim=1)
        assert rows.shape == (3, 5, 2) and torch.equal(rows[:, :2], torch.arange(12, dtype=F64).view(3, 2, 2))
        assert torch.equal(rows[:, 2:], torch.arange(18, dtype=F64).view(3, 3, 2) + 100)
        assert plumbing.gather_rows(torch.full((n,), rank), world, cpu).tolist() == [0, 0, 1, 1, 1]
        assert plumbing.gather_rows(torch.zeros(0, n, 0), world, cpu, dim=1).shape == (0, 5, 0)
        assert plumbing.is_main_process() == (rank == 0)
    finally:
        torch.distributed.destroy_process_group()


def test_gather_rows_concatenates_uneven_shards_of_two_gloo_processes_in_rank_order(tmp_path):
    torch.multiprocessing.spawn(_gather_in_gloo_group, args=(2, f"file://{tmp_path / 'init'}"), nprocs=2)
    shard = torch.ones(2, 3)
    assert plumbing.gather_rows(shard, 1, torch.device("cpu"), dim=1) is shard


# --- per-noise-level error ---------------------------------------------------


# --- files ---------------------------------------------------------------------

def test_temp_files_a_killed_writer_left_for_the_same_target_go_under_its_lock(tmp_path):
    stale, other = tmp_path / ".a.npz.12345.tmp", tmp_path / ".b.npz.12345.tmp"
    stale.write_bytes(b"x" * 100)
    other.write_bytes(b"x")
    with plumbing.exclusive(tmp_path / "a.npz"):  # atomic_write alone leaves them: they may be a live writer's
        plumbing.save_npz(tmp_path / "a.npz", x=np.zeros(3))
    assert sorted(os.listdir(tmp_path)) == [".b.npz.12345.tmp", "a.npz"]


def test_atomic_write_leaves_no_temp_file_when_the_writer_fails(tmp_path):
    def fail(f):
        f.write(b"partial")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        plumbing.atomic_write(tmp_path / "a.pt", fail)
    assert os.listdir(tmp_path) == []


def test_atomic_write_gives_the_files_the_umasks_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        npz = plumbing.save_npz(tmp_path / "a.npz", x=np.zeros(3))
        pt = plumbing.save_checkpoint({"a": 1}, tmp_path / "a.pt")
        os.umask(0o077)
        private = plumbing.save_npz(tmp_path / "b.npz", x=np.zeros(3))
    finally:
        os.umask(old)
    assert [os.stat(p).st_mode & 0o777 for p in (npz, pt, private)] == [0o644, 0o644, 0o600]


def test_unreadable_checkpoint_says_permission_denied_without_telling_to_delete_it(tmp_path, monkeypatch):
    path = plumbing.save_checkpoint({"kind": plumbing.CHECKPOINT_KIND}, tmp_path / "snapshot-000000008.pt")

    def denied(f, *args, **kwargs):
        raise PermissionError(13, "Permission denied", os.fspath(f))
    monkeypatch.setattr(torch, "load", denied)
    with pytest.raises(common.UserError) as err:
        plumbing.load_checkpoint(path)
    one_line(str(err.value), f"cannot read {path}", "Permission denied")


def test_npz_passed_as_a_checkpoint_is_named_as_such_and_not_called_corrupted(tmp_path):
    path = plumbing.save_npz(tmp_path / "gap.npz", x=np.zeros(3))
    with pytest.raises(common.UserError, match=r"gap\.npz is an \.npz file .*not a torch checkpoint") as err:
        plumbing.load_checkpoint(path)
    assert "delete" not in str(err.value) and "corrupted" not in str(err.value)


def test_garbage_checkpoint_is_called_corrupted_or_foreign(tmp_path):
    path = tmp_path / "snapshot-000000008.pt"
    path.write_bytes(b"not a torch file")
    with pytest.raises(common.UserError, match="corrupted .*or not a torch checkpoint"):
        plumbing.load_checkpoint(path)


class Pickled:
    """An object that only unpickling with code from the file could rebuild."""


def test_checkpoint_with_pickled_objects_is_refused_without_running_them(tmp_path):
    path = plumbing.save_checkpoint({"kind": plumbing.CHECKPOINT_KIND, "net": Pickled()}, tmp_path / "snap.pt")
    with pytest.raises(common.UserError, match="holds objects other than tensors, numpy arrays and plain") as err:
        plumbing.load_checkpoint(path)
    assert "\n" not in str(err.value)


def test_rng_state_is_tensors_and_plain_values_and_restores_every_generator(tmp_path):
    g = torch.Generator().manual_seed(3)
    state = plumbing.rng_state(noise=g)
    torch.save(state, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)
    draws = lambda: (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=g).item())  # noqa: E731
    first = draws()
    plumbing.set_rng_state(loaded, noise=g)
    assert draws() == first


# --- command line ----------------------------------------------------------------

def test_check_writable_names_files_where_folders_are_expected_and_back(tmp_path):
    (tmp_path / "file").write_text("x")
    plumbing.check_writable(tmp_path / "new" / "deeper" / "a.npz")
    plumbing.check_writable(tmp_path / "new" / "run", folder=True)
    plumbing.check_writable(tmp_path, folder=True)
    plumbing.check_writable(None)
    for path, folder, words in [(tmp_path / "file", True, "is an existing file, not a folder"),
                                (tmp_path, False, "is a folder, not a file name"),
                                (tmp_path / "file" / "a.npz", False, "is a file, not a folder"),
                                (tmp_path / "file" / "run", True, "is a file, not a folder")]:
        with pytest.raises(common.UserError, match=words):
            plumbing.check_writable(path, folder)


def test_check_writable_reports_a_folder_without_write_permission(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: os.fspath(path) != str(tmp_path))
    with pytest.raises(common.UserError, match=f"--out {tmp_path}/run/a.npz cannot be written: permission "
                                               f"denied in {tmp_path}$"):
        plumbing.check_writable(tmp_path / "run" / "a.npz")


def test_ctrl_c_prints_one_line_with_the_registered_progress_and_exits_130(capsys):
    def main(progress):
        if progress:
            plumbing.on_interrupt(lambda: "after 3 of 9 steps")
        raise KeyboardInterrupt
    for progress, line in ((True, "interrupted after 3 of 9 steps\n"), (False, "interrupted\n")):
        with pytest.raises(SystemExit) as exit_info:
            plumbing.run_cli(lambda: main(progress))
        assert exit_info.value.code == 130 and capsys.readouterr().err == line


def test_result_files_name_their_script_and_other_programs_files_are_not_replaced_unasked(tmp_path):
    path = str(tmp_path / "gap.npz")
    plumbing.save_npz(path, args={"n": 2}, script="eval_gap.py", x=np.zeros(3))
    data = plumbing.load_npz(path)
    assert data["script"] == "eval_gap.py" and plumbing.result_script(data) == "eval_gap.py"
    assert plumbing.earlier_result(path, "eval_gap.py")["args"] == {"n": 2}
    assert plumbing.earlier_result(path, "sample_memorize.py", force=True) is None
    assert plumbing.earlier_result(str(tmp_path / "new.npz"), "eval_gap.py") is None
    with pytest.raises(common.UserError, match="holds results of eval_gap.py, so sample_memorize.py would replace "
                                               "it: give another --out, or --force to replace it"):
        plumbing.earlier_result(path, "sample_memorize.py")
    np.savez(tmp_path / "foreign.npz", e_train=np.zeros(2))
    with pytest.raises(common.UserError, match="foreign.npz exists and was not written by it"):
        plumbing.earlier_result(str(tmp_path / "foreign.npz"), "eval_gap.py")
    (tmp_path / "notes.npz").write_text("not an npz")
    with pytest.raises(common.UserError, match="is not a result file it can read"):
        plumbing.earlier_result(str(tmp_path / "notes.npz"), "eval_gap.py")
    np.savez(tmp_path / "args.npz", args=np.array("not json"))
    with pytest.raises(common.UserError, match="'args' entry that is not the JSON"):
        plumbing.load_npz(str(tmp_path / "args.npz"))


def test_in_processes_gives_each_jobs_result_and_print_in_order_from_other_processes_and_raises_its_error(capsys):
    def job(i):
        def run():
            print(f"job {i}")
            return i * i, os.getpid(), torch.get_num_threads()
        return run
    results = plumbing.in_processes([job(i) for i in range(5)], 2)
    assert [square for square, _, _ in results] == [0, 1, 4, 9, 16]
    assert capsys.readouterr().out == "".join(f"job {i}\n" for i in range(5))
    pids = {pid for _, pid, _ in results}
    if sys.platform == "linux":  # forked: other processes, of one torch thread each
        assert os.getpid() not in pids and len(pids) <= 2 and {t for _, _, t in results} == {1}
    else:
        assert pids == {os.getpid()}
    assert {pid for _, pid, _ in plumbing.in_processes([job(0), job(1)], 1)} == {os.getpid()}  # one process: here

    def fails():
        raise ValueError("a broken figure")
    with pytest.raises(ValueError, match="a broken figure"):
        plumbing.in_processes([job(0), fails, job(2)], 2)
