"""docs/reference.md is what the scripts say (docs/make_reference.py), and each script's --help fits on about two
screens, lists every option of its parser and ends by pointing to the reference."""
import argparse
import importlib.util
import os
import re

import pytest

import eval_gap
import figures
import sample_memorize
import toy2d
import train_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("make_reference", os.path.join(ROOT, "docs", "make_reference.py"))
make_reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_reference)

MODULES = {"toy2d.py": toy2d, "train_image.py": train_image, "eval_gap.py": eval_gap,
           "sample_memorize.py": sample_memorize, "figures.py": figures}
MAX_HELP_LINES = 110  # about two screens
POINTER = "Flags and result keys in full: docs/reference.md"


@pytest.fixture(scope="module")
def helps():
    """{script: its --help at make_reference.COLUMNS columns}, run once for all tests here."""
    return {script: make_reference.help_text(script) for script in make_reference.SCRIPTS}


def test_every_script_is_in_the_reference():
    assert set(make_reference.SCRIPTS) == set(MODULES)


def test_reference_md_is_generated_from_the_scripts(helps):
    with open(make_reference.REFERENCE, encoding="utf-8") as f:
        current = f.read()
    assert make_reference.reference(helps) == current, (
        "docs/reference.md is out of date: run python3 docs/make_reference.py")


def parser_of(module, monkeypatch):
    """The argparse parser that module.parse_args builds (stopped before it parses anything)."""
    built = []

    def grab(self, args=None, namespace=None):
        built.append(self)
        raise SystemExit(0)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    with pytest.raises(SystemExit):
        module.parse_args([])
    return built[0]


@pytest.mark.parametrize("script", sorted(MODULES))
def test_help_fits_on_two_screens_and_lists_every_option(script, helps, monkeypatch):
    text = helps[script]
    assert len(text.splitlines()) <= MAX_HELP_LINES, f"{script} --help has {len(text.splitlines())} lines"
    assert text.rstrip().endswith(POINTER)
    parser = parser_of(MODULES[script], monkeypatch)
    assert parser.description == MODULES[script].__doc__.split("\n\n")[0], "the docstring's first paragraph"
    for action in parser._actions:
        assert action.help, f"{script}: {action.option_strings or action.dest} has no help"
        if action.option_strings:
            listed = ", ".join(action.option_strings)
            assert re.search(rf"(?m)^  {re.escape(listed)}( |$)", text), f"{script} --help lacks {listed}"
        else:
            assert re.search(rf"(?m)^  {re.escape(action.metavar or action.dest)}( |$)", text), (
                f"{script} --help lacks {action.metavar or action.dest}")


def test_check_exits_1_with_one_line_when_the_reference_differs(helps, tmp_path, monkeypatch, capsys):
    stale = tmp_path / "reference.md"
    stale.write_text("# Command-line reference\n")
    monkeypatch.setattr(make_reference, "REFERENCE", str(stale))
    monkeypatch.setattr(make_reference, "help_text", lambda script: helps[script])
    with pytest.raises(SystemExit) as exit_info:
        make_reference.main(["--check"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count("\n") == 1, err
    assert err.startswith("docs/reference.md is out of date"), err
    make_reference.main([])  # writes the file
    assert stale.read_text() == make_reference.reference(helps)
    make_reference.main(["--check"])  # and now agrees: no exit
