"""The command lines of the scripts: shared flags are defined once and mean the same everywhere, and
--help shows each default once."""
import re

import pytest
import torch

import common
import eval_gap
import figures
import sample_memorize
import toy2d
import train_image

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


@pytest.mark.parametrize("name", ["eval_gap", "sample_memorize"])
def test_explicit_forward_mode_compile_that_cannot_work_stops_at_start_with_one_line(name, tmp_path, capsys,
                                                                                    monkeypatch):
    def failing_backend(gm, inputs):
        raise RuntimeError("no compiler here")
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, dynamic=kw.get("dynamic"), backend=failing_backend))
    monkeypatch.setattr(common, "load_images", lambda *args, **kwargs: pytest.fail("data read before the check"))
    torch._dynamo.reset()
    with pytest.raises(SystemExit) as exit_info:
        common.run_cli(lambda: SCRIPTS[name].main(["--optimal", "--forward-mode", "compile", "--device", "cpu",
                                                   "--out", str(tmp_path / "result.npz")]))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: --forward-mode compile: torch.compile failed (BackendCompilerFailed: "), err
    assert err.endswith("RuntimeError: no compiler here); --forward-mode eager (or auto) runs without it\n"), err
