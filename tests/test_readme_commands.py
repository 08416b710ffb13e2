"""The README's commands of the two entry scripts (plain and under torchrun) stay runnable: each parses, names a
shipped config and passes the checks its stage makes before it reads data or a checkpoint."""
import re
import shlex
from pathlib import Path

import pytest

from config.cli import parse_cli
from config.readers import check_loss_keys
from config.stage2 import check_method
from models.losses import LOSSES, loss_params

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"stage1_train.py": "stage1", "stage2_classifier.py": "stage2"}
PLACEHOLDER = re.compile(r"\.\.\.|<|\$|\|")  # `--cfg ...`, logs/<run>/, demo_stage2_$m.yaml, NAME|URL|PATH


INLINE = re.compile(r"`((?:python|torchrun) [^`]*(?:stage1_train|stage2_classifier)\.py[^`]*)`")


def readme_commands() -> list[tuple[int, str]]:
    """(line, command) of each entry-script command in the README's code blocks (continuations joined) and
    inline code spans."""
    commands, in_block, lines = [], False, (ROOT / "README.md").read_text().splitlines()
    i = 0
    while i < len(lines):
        line, number = lines[i], i + 1
        if line.lstrip().startswith("```"):
            in_block = not in_block
        elif not in_block:
            commands += [(number, m.group(1)) for m in INLINE.finditer(line)]
        else:
            while line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i].strip()
            words = line.split("#")[0].split()
            if any(w in SCRIPTS for w in words) and words[0] in ("python", "torchrun"):
                commands.append((number, line.split("#")[0].strip()))
        i += 1
    return commands


COMMANDS = readme_commands()


def test_the_readme_shows_commands_of_both_stages():
    scripts = {w for _, c in COMMANDS for w in c.split() if w in SCRIPTS}
    assert scripts == set(SCRIPTS) and len(COMMANDS) >= 30


@pytest.mark.parametrize("number, command", [c for c in COMMANDS if not PLACEHOLDER.search(c[1])],
                         ids=lambda v: f"line{v}" if isinstance(v, int) else "")
def test_a_readme_command_parses_and_passes_its_stages_checks(number, command, monkeypatch):
    monkeypatch.chdir(ROOT)  # the commands' paths are the repository's
    words = shlex.split(command)
    script = next(w for w in words if w in SCRIPTS)
    argv, stage = words[words.index(script) + 1:], SCRIPTS[script]
    try:
        cfg, _ = parse_cli(stage, "", argv)
        if stage == "stage1":
            check_loss_keys(cfg, {name: loss_params(name) for name in LOSSES})
        else:
            check_method(cfg)
    except SystemExit as e:
        pytest.fail(f"README line {number}: {command}\n{e}")
