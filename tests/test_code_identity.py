"""Results know the code that made them: after an edit that changes what a script computes, a rerun never gives
the old numbers quietly (training stops, evaluations compute again); after an edit of a comment or a docstring it
reuses them. Snapshots and result files carry a format version; another version's files are refused."""
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
from conftest import write_fashion_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("common.py", "plumbing.py", "train_image.py", "eval_gap.py", "sample_memorize.py")


def test_python_digest_ignores_comments_docstrings_and_layout_but_not_code(tmp_path):
    source = ('"""A module."""\nimport math\n\n\ndef f(x):\n    """Square root plus one."""\n    # why\n'
              '    return math.sqrt(x) + 1  # note\n\n\nlabel = f"{f(4):.1f} done"\n')
    same = [source.replace('"""A module."""', '"""Another text."""'),
            source.replace("    # why\n", "    # another reason\n\n"),
            source.replace("math.sqrt(x) + 1", "math.sqrt( x )+1"),
            source.replace("def f(x):\n", "def f(x):\n\n"),
            source.replace("    ", "  ")]  # another indentation width
    other = [source.replace("+ 1", "+ 2"), source.replace(".1f} done", ".2f} done"), source.replace("sqrt", "log")]
    digests = []
    for i, text in enumerate([source] + same + other):
        (tmp_path / f"m{i}.py").write_text(text)
        digests.append(plumbing.python_digest(tmp_path / f"m{i}.py"))
    assert len(set(digests[:1 + len(same)])) == 1, "comments, docstrings and layout do not count"
    assert len(set(digests)) == 1 + len(other), "every edit of the code does"
    identity = plumbing.code_identity(str(tmp_path / "m0.py"), str(tmp_path / "m6.py"))
    assert identity == {"m0.py": digests[0], "m6.py": digests[6]}
    assert plumbing.code_changes(identity, {"m0.py": digests[0], "m6.py": "x"}) == "m6.py"
    assert plumbing.code_changes(None, identity) == "m0.py, m6.py" and plumbing.code_changes(identity, identity) == ""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_fashion_mnist(tmp_path_factory.mktemp("data"), 40, 24)


@pytest.fixture
def code(tmp_path):
    """A copy of the scripts, as a researcher who edits them has."""
    for name in SCRIPTS:
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    return tmp_path


def run(folder, *argv):
    """python ARGV in the folder of the copied code: the finished process."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *argv], cwd=folder, capture_output=True, text=True, env=env, timeout=600)


def edit(path, old, new):
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def train(folder, data_dir, steps, *extra):
    return run(folder, "train_image.py", "--data-dir", data_dir, "--resolution", "8", "--model", "unet", "--size", "tiny",
               "--channels", "8", "--n", "16", "--batch", "8", "--lr-rampup", "0", "--snapshots", "log:2",
               "--eval-every", "64", "--probe-images", "8", "--steps", str(steps), "--device", "cpu", "--out", "run",
               *extra)


def test_training_resumes_after_a_comment_edit_and_stops_after_an_edit_of_the_loss(code, data_dir):
    assert train(code, data_dir, 4).returncode == 0
    edit(code / "common.py", "def edm_loss(", "# The loss of EDM, eq. 2.\ndef edm_loss(")
    done = train(code, data_dir, 6)
    assert done.returncode == 0 and "resuming from" in done.stdout, done.stderr
    # the edit of the issue: the loss returns 0; the finished command rerun must not resume quietly
    edit(code / "common.py", "    return loss_weight(sigma, sigma_data) * err", "    return 0 * err")
    stopped = train(code, data_dir, 6)
    lines = stopped.stderr.strip().splitlines()
    assert stopped.returncode == 2 and len(lines) == 1 and "Traceback" not in stopped.stderr, stopped.stderr
    assert "other code: common.py changed" in lines[0] and "--resume-changed-code" in lines[0]
    assert "--no-resume" in lines[0] and "--out" in lines[0]
    went_on = train(code, data_dir, 8, "--resume-changed-code")
    assert went_on.returncode == 0 and "note: common.py changed" in went_on.stdout, went_on.stderr
    last = plumbing.load_checkpoint(code / "run" / "snapshot-000000064.pt")
    assert [step for step, _ in last["code_history"]] == [0, 6]
    assert plumbing.code_changes(*[identity for _, identity in last["code_history"]]) == "common.py"
    assert last["code"] == last["code_history"][-1][1]
    again = train(code, data_dir, 4, "--no-resume")  # starting over needs no flag
    assert again.returncode == 0 and "resuming" not in again.stdout


def test_evaluations_compute_again_after_an_edit_of_the_error_and_reuse_rows_after_a_comment_edit(code, data_dir):
    assert train(code, data_dir, 4).returncode == 0
    evaluate = ("eval_gap.py", "run", "--num-images", "8", "--sigmas", "0.1", "1", "--device", "cpu", "--bootstrap",
                "20", "--optimal")
    sample = ("sample_memorize.py", "run", "--num-samples", "4", "--steps", "3", "--features", "builtin",
              "--bootstrap", "20", "--fd-subsets", "2", "--device", "cpu")
    first = [run(code, *evaluate), run(code, *sample)]
    assert all(done.returncode == 0 for done in first), [done.stderr for done in first]
    before = plumbing.load_npz(code / "run" / "gap.npz")
    edit(code / "eval_gap.py", "def relative_gap(", "# G of the paper, eq. 4\ndef relative_gap(")
    edit(code / "sample_memorize.py", "def memorization(", "# d1 / d2\ndef memorization(")
    reused = [run(code, *evaluate), run(code, *sample)]
    assert "3 reused from" in reused[0].stdout and "2 of 2 configuration(s) reused" in reused[1].stdout
    np.testing.assert_array_equal(plumbing.load_npz(code / "run" / "gap.npz")["e_train"], before["e_train"])
    # the edit of the issue: E(sigma) doubled; the rerun computes every row again, with one line saying why
    edit(code / "common.py", "    return out.view(S, N)", "    return 2 * out.view(S, N)")
    again = [run(code, *evaluate), run(code, *sample)]
    assert "was made by other code (common.py changed since): its 3 row(s) are computed again" in again[0].stdout
    assert "0 reused from" in again[0].stdout and "common.py changed since" in again[1].stdout
    after = plumbing.load_npz(code / "run" / "gap.npz")
    np.testing.assert_allclose(after["e_train"], 2 * before["e_train"], rtol=1e-6)
    assert json.loads(str(after["code"]))["common.py"] != json.loads(str(before["code"]))["common.py"]


def test_files_of_another_format_version_are_refused_in_one_line(tmp_path, data_dir, capsys):
    import eval_gap
    import figures
    net = common.build_network("unet", "tiny", 8, 1, channels=8)
    path = tmp_path / "snapshot-000000008.pt"
    state = dict(kind=plumbing.CHECKPOINT_KIND, net=net.state_dict(), ema=net.state_dict(), opt={}, step=1,
                 images_seen=8, args=dict(data_dir=data_dir), network=net.config, subset=torch.arange(4), labels=None,
                 dataset="fashion-mnist", resolution=8, kmeans_centroids=None, rng=[])
    torch.save(state, path)  # as an earlier version wrote it: no format
    with pytest.raises(common.UserError, match="another version of this project .snapshot format none"):
        plumbing.load_checkpoint(path)
    plumbing.save_checkpoint(state, path)
    assert plumbing.load_checkpoint(path)["format"] == plumbing.FORMAT_VERSION
    # a result file of another version is neither reused nor replaced unasked; figures.py skips it
    out = tmp_path / "gap.npz"
    plumbing.save_npz(out, args={}, script="eval_gap.py", e_train=np.ones((1, 2)))
    old = dict(np.load(out), format=np.int64(0))
    np.savez(out, **old)
    argv = [str(path), "--num-images", "4", "--sigmas", "1", "--device", "cpu", "--out", str(out), "--bootstrap", "10"]
    with pytest.raises(SystemExit) as stop:
        plumbing.run_cli(lambda: eval_gap.main(argv))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "another version of this project (result format 0" in err and "--force" in err
    assert len(np.load(out)["e_train"]) == 1
    with pytest.raises(common.UserError, match="no results"):  # the only result is another version's
        figures.main([str(tmp_path), "--out", str(tmp_path / "figs")])
    assert "remake it with eval_gap.py" in capsys.readouterr().out
    eval_gap.main([*argv, "--force"])
    assert plumbing.load_npz(out)["format"] == plumbing.FORMAT_VERSION
