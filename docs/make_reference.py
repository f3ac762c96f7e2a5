"""Build docs/reference.md from the scripts themselves: per script its module docstring (what it does, how to run
it), its NOTES (what each flag does in detail), its KEYS (the keys of the files it writes) and its --help (every
flag with its default).

    python3 docs/make_reference.py           # rewrite docs/reference.md
    python3 docs/make_reference.py --check   # exit 1, with one line, if docs/reference.md is not up to date

--help runs in a subprocess of this Python at a fixed width (COLUMNS), so that argparse wraps it the same way on
every machine; no default shown there depends on the machine (the device shows as auto, threads as a fixed
number, 0 for automatic). The argparse of Pythons 3.11 to 3.13 lays it out alike.
"""
import argparse
import ast
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(ROOT, "docs", "reference.md")
SCRIPTS = ("toy2d.py", "train_image.py", "eval_gap.py", "sample_memorize.py", "figures.py")  # in pipeline order
COLUMNS = 100  # the --help width
COMMAND = "python3 docs/make_reference.py"


def docstring(script):
    """The module docstring of a script, read without running it."""
    with open(os.path.join(ROOT, script), encoding="utf-8") as f:
        return ast.get_docstring(ast.parse(f.read())) or ""


def constants(script):
    """A script's NOTES (its flags in detail) and KEYS (the keys of the files it writes: {key: what it holds}),
    read without running it: ('', {}) where it has none."""
    with open(os.path.join(ROOT, script), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    found = {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body
             if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
             and node.targets[0].id in ("NOTES", "KEYS")}
    return found.get("NOTES", "").strip(), found.get("KEYS", {})


def keys_section(keys):
    """The KEYS of a script as a list, a line per entry: - `key`, `key`: what it holds."""
    if not keys:
        return ""
    items = [f"- {', '.join(f'`{k.strip()}`' for k in key.split(','))}: {text}" for key, text in keys.items()]
    return "### Result keys\n\n" + "\n".join(items) + "\n\n"


def help_text(script):
    """`python3 SCRIPT --help` run from the repository root at COLUMNS columns, without colours: its output."""
    env = {key: value for key, value in os.environ.items() if key not in ("FORCE_COLOR", "COLUMNS", "LINES")}
    env.update(COLUMNS=str(COLUMNS), NO_COLOR="1", PYTHON_COLORS="0")
    done = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"error: {script} --help exited with status {done.returncode}: {tail}")
    return done.stdout


def anchor(script):
    """GitHub's anchor of the heading '## script' (lower case, without the dot)."""
    return script.lower().replace(".", "")


def reference(helps=None):
    """The text of docs/reference.md; helps: {script: --help text} already at hand (default: run each)."""
    helps = helps or {}
    parts = [
        "# Command-line reference\n",
        textwrap.fill(f"Generated from the scripts by `{COMMAND}` (`--check`: exit 1 if this file is out of date); "
                      "do not edit it by hand, edit the scripts' docstrings, NOTES, KEYS and argparse help instead. "
                      "Per script: its module docstring (what it does, how to run it), its NOTES (its flags in detail), "
                      "its KEYS (the keys of the files it writes) and its `--help` (every flag, with its default) at "
                      f"{COLUMNS} columns.", 110) + "\n",
        " | ".join(f"[{script}](#{anchor(script)})" for script in SCRIPTS) + "\n",
    ]
    for script in SCRIPTS:
        text = helps[script] if script in helps else help_text(script)
        notes, keys = constants(script)
        parts.append(f"## {script}\n\n{docstring(script).strip()}\n\n{notes + chr(10) * 2 if notes else ''}"
                     f"{keys_section(keys)}### `{script} --help`\n\n```text\n{text.rstrip()}\n```\n")
    return "\n".join(parts)


def main(argv=None):
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="do not write: exit 1 if docs/reference.md differs")
    args = p.parse_args(argv)
    text = reference()
    if args.check:
        try:
            with open(REFERENCE, encoding="utf-8") as f:
                current = f.read()
        except FileNotFoundError:
            current = None
        if current != text:
            print(f"docs/reference.md is {'out of date' if current else 'missing'}: run {COMMAND}", file=sys.stderr)
            sys.exit(1)
        return
    with open(REFERENCE, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    print(f"wrote {os.path.relpath(REFERENCE, ROOT)}")


if __name__ == "__main__":
    main()
