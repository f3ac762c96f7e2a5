"""The command lines of the scripts: shared flags are defined once and mean the same everywhere, --help shows
each default once, and the shell scripts check their numbers and their Python before they start."""
import os
import re
import stat
import subprocess
import sys

import pytest
import torch

import eval_gap
import figures
import plumbing
import sample_memorize
import toy2d
import train_image
from conftest import one_line

SCRIPTS = {"eval_gap": eval_gap, "sample_memorize": sample_memorize, "train_image": train_image, "toy2d": toy2d,
           "figures": figures}
MINIMAL = {"eval_gap": ["--optimal"], "sample_memorize": ["--optimal"], "train_image": [], "toy2d": ["delta"],
           "figures": ["results"]}


def help_text(name, capsys):
    with pytest.raises(SystemExit):
        SCRIPTS[name].parse_args(["--help"])
    return capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help_shows_each_default_once_and_never_none(name, capsys):
    text = help_text(name, capsys)
    assert "(default: None)" not in text
    options = re.split(r"\n  (?=-)", text.split("options:")[1])
    for option in options:
        assert len(re.findall(r"\(default", option)) <= 1, option
    for flag in ("--seed", "--device", "--out"):
        assert f"\n  {flag} " in text, f"{name} lacks {flag}"


@pytest.mark.parametrize("name", ["eval_gap", "sample_memorize", "train_image"])
def test_shared_data_flags_have_the_same_defaults_and_types(name):
    args = SCRIPTS[name].parse_args(MINIMAL[name])
    assert (args.data, args.data_dir, args.resolution, args.n, args.cond, args.k, args.seed, args.device) == (
        "fashion-mnist", None, 32, 1000, "none", 10, 0, "auto")
    with pytest.raises(SystemExit):
        SCRIPTS[name].parse_args([*MINIMAL[name], "--n", "1"])


def test_subset_seed_weights_and_guidance_weights_mean_the_same_in_every_script():
    for script in (eval_gap, sample_memorize):
        args = script.parse_args(["--optimal", "--subset-seed", "3", "--seed", "5", "--weights", "raw"])
        assert (args.subset_seed, args.seed, args.weights) == (3, 5, "raw")
        with pytest.raises(SystemExit):
            script.parse_args(["--optimal", "--weights", "net"])
    assert eval_gap.default_out(eval_gap.parse_args(["--optimal", "--subset-seed", "3", "--seed", "5"])).endswith(
        "-seed3.npz"), "the result file names the subset's seed, not the noise seed"
    assert toy2d.parse_args(["guidance", "--guidance-weights", "0", "1"]).guidance_weights == [0, 1]


def test_forward_mode_and_step_mode_are_one_flag_definition_with_auto_by_default():
    for script in (eval_gap, sample_memorize):
        assert script.parse_args(["--optimal"]).forward_mode == "auto"
        assert script.parse_args(["--optimal", "--forward-mode", "compile"]).forward_mode == "compile"
        with pytest.raises(SystemExit):
            script.parse_args(["--optimal", "--forward-mode", "graphs"])
    assert train_image.parse_args(["--step-mode", "eager"]).step_mode == "eager"
    assert train_image.parse_args([]).step_mode == "auto"


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHELL = {"quick.sh": [], "gpu.sh": ["--tiny"], "benchmarks/gpu_check.sh": ["--tiny"]}


def run_shell(script, argv, tmp_path, **env):
    """bash SCRIPT ARGV with --out (quick.sh: OUT) in tmp_path; -> the finished process."""
    out = [str(tmp_path / "out")] if script == "quick.sh" else ["--out", str(tmp_path / "out")]
    environ = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    return subprocess.run(["bash", os.path.join(ROOT, script), *argv, *out], env={**environ, **env},
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("script", sorted(SHELL))
def test_a_shell_script_whose_python_lacks_torch_stops_at_once_naming_it(script, tmp_path):
    fake = tmp_path / "bin" / "python3"  # python3 on the PATH without the requirements, as outside a venv
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'torch'\" >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    done = run_shell(script, SHELL[script], tmp_path, PATH=f"{fake.parent}:{os.environ['PATH']}")
    assert done.returncode == 2, done.stderr
    one_line(done.stderr, "error: ", "python3 cannot import torch", "PYTHON", "pip install -r requirements.txt")
    assert not (tmp_path / "out").exists()


def test_quick_sh_says_which_python_it_runs():
    done = subprocess.run(["bash", os.path.join(ROOT, "quick.sh"), os.path.join(ROOT, "quick.sh")],  # OUT: a file
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=120)
    assert done.stdout.startswith(f"python: {sys.executable} with torch {torch.__version__}\n"), done.stdout
    assert done.returncode == 2 and "quick.sh is a file, not a folder" in done.stderr, done.stderr


def test_quick_sh_probes_the_samples_where_the_gap_it_measured_peaks():
    """sample_memorize.py reads RUN/gap.npz by default; quick.sh writes the gap elsewhere, so it names the file
    (without it the summary's score@peak column stayed empty)."""
    text = open(os.path.join(ROOT, "quick.sh")).read().replace("\\\n", " ")
    gap_out = re.search(r'eval_gap\.py "\$OUT/runs/\$run".*?--out (\S+)', text).group(1)
    sample_gap = re.search(r'sample_memorize\.py "\$OUT/runs/\$run".*?--gap (\S+)', text)
    assert sample_gap is not None and sample_gap.group(1) == gap_out, gap_out


@pytest.mark.parametrize("script, argv, message", [
    ("gpu.sh", ["--jobs", "0"], "error: --jobs takes positive integers, got '0'"),
    ("gpu.sh", ["--images", "1e6"], "error: --images takes positive integers, got '1e6'"),
    ("gpu.sh", ["--ns", "256 x"], "error: --ns takes positive integers, got 'x'"),
    ("gpu.sh", ["--sizes", " "], "error: --sizes, --ns and --seeds must not be empty"),
    ("benchmarks/gpu_check.sh", ["--train-steps", "-5"], "error: --train-steps must be a positive integer, got "
                                                         "'-5'"),
])
def test_a_shell_script_refuses_bad_numbers_in_one_line_before_it_starts(script, argv, message, tmp_path):
    done = run_shell(script, argv, tmp_path, PYTHON=sys.executable)
    assert done.returncode == 2 and done.stderr == message + "\n", done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["eval_gap", "sample_memorize"])
def test_explicit_forward_mode_compile_that_cannot_work_stops_at_start_with_one_line(name, tmp_path, capsys,
                                                                                    monkeypatch):
    def failing_backend(gm, inputs):
        raise RuntimeError("no compiler here")
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, dynamic=kw.get("dynamic"), backend=failing_backend))
    monkeypatch.setattr(plumbing, "load_images", lambda *args, **kwargs: pytest.fail("data read before the check"))
    torch._dynamo.reset()
    with pytest.raises(SystemExit) as exit_info:
        plumbing.run_cli(lambda: SCRIPTS[name].main(["--optimal", "--forward-mode", "compile", "--device", "cpu",
                                                     "--out", str(tmp_path / "result.npz")]))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: --forward-mode compile: torch.compile failed (BackendCompilerFailed: "), err
    assert err.endswith("RuntimeError: no compiler here); --forward-mode eager (or auto) runs without it\n"), err
