"""The README's commands of the two entry scripts (plain and under torchrun) stay runnable: each parses, names a
shipped config and passes the checks its stage makes before it reads data or a checkpoint; and each of its
`$ command` examples still fails with the error line shown under it; its contents list and file links stay true."""
import re
import shlex
from pathlib import Path

import pytest

from config.cli import parse_cli
from config.load import check_schedule_keys
from config.readers import check_loss_keys
from config.stage2 import check_method
from models.losses import LOSSES, loss_params

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"stage1_train.py": "stage1", "stage2_classifier.py": "stage2"}
# A command of either entry script, in a code block or a code span (which may wrap over lines).
COMMAND = re.compile(r"(?:python|torchrun) [^`\n]*?(?:stage1_train|stage2_classifier)\.py[^`\n]*")
INLINE = re.compile(r"`((?:python|torchrun) [^`]*?(?:stage1_train|stage2_classifier)\.py[^`]*)`")
PLACEHOLDER = re.compile(r"\.\.\.|<|\$|\|")  # `--cfg ...`, logs/<run>/, demo_stage2_$m.yaml, NAME|URL|PATH


def readme_blocks() -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(code-block lines, prose paragraphs), each (first line number, text); a block's `\\` continuations
    joined into one line, a paragraph's lines joined with spaces."""
    lines = (ROOT / "README.md").read_text().splitlines()
    code, prose, in_block, paragraph, i = [], [], False, [], 0
    while i < len(lines):
        line, number = lines[i], i + 1
        if line.lstrip().startswith("```") or (not in_block and not line.strip()):
            if paragraph:
                prose.append((paragraph[0][0], " ".join(text for _, text in paragraph)))
                paragraph = []
            in_block ^= line.lstrip().startswith("```")
        elif in_block:
            while line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i].strip()
            code.append((number, line))
        else:
            paragraph.append((number, line.strip()))
        i += 1
    return code, prose


def readme_commands() -> tuple[list[tuple[int, str]], list[tuple[int, str, str]]]:
    """(line, command) of each entry-script command, and (line, command, the error line under it) of each
    `$ command` example."""
    code, prose = readme_blocks()
    commands, examples = [], []
    for k, (number, line) in enumerate(code):
        text = line.split(" # ")[0].strip()
        if text.startswith("$ ") and COMMAND.search(text):
            examples.append((number, text[2:], code[k + 1][1]))
        elif COMMAND.match(text):
            commands.append((number, text))
    commands += [(number, m.group(1)) for number, text in prose for m in INLINE.finditer(text)]
    return commands, examples


COMMANDS, EXAMPLES = readme_commands()


def _checked(command: str) -> None:
    """Parse `command` as its entry script does and make the checks its stage makes before it reads data."""
    words = shlex.split(command)
    script = next(w for w in words if w in SCRIPTS)
    stage = SCRIPTS[script]
    cfg, _ = parse_cli(stage, "", words[words.index(script) + 1:])
    check_schedule_keys(cfg)  # as a new run starts
    if stage == "stage1":
        check_loss_keys(cfg, {name: loss_params(name) for name in LOSSES})
    else:
        check_method(cfg)


def test_every_entry_script_command_of_the_readme_is_collected():
    """Each mention of `python|torchrun ... stage1_train.py|stage2_classifier.py` in code is a command, an example
    or in an example's error line (which may name the command to run instead)."""
    code, prose = readme_blocks()
    text = "\n".join([line for _, line in code] + [m.group(1) for _, p in prose for m in INLINE.finditer(p)])
    in_errors = sum(len(COMMAND.findall(error)) for _, _, error in EXAMPLES)
    assert len(COMMAND.findall(text)) == len(COMMANDS) + len(EXAMPLES) + in_errors
    assert {w for _, c in COMMANDS for w in c.split() if w in SCRIPTS} == set(SCRIPTS)
    assert len(COMMANDS) >= 35 and len(EXAMPLES) >= 5


@pytest.mark.parametrize("number, command", [c for c in COMMANDS if not PLACEHOLDER.search(c[1])],
                         ids=lambda v: f"line{v}" if isinstance(v, int) else "")
def test_a_readme_command_parses_and_passes_its_stages_checks(number, command, monkeypatch):
    monkeypatch.chdir(ROOT)  # the commands' paths are the repository's
    try:
        _checked(command)
    except SystemExit as e:
        pytest.fail(f"README line {number}: {command}\n{e}")


@pytest.mark.parametrize("number, command, error", EXAMPLES, ids=lambda v: f"line{v}" if isinstance(v, int) else "")
def test_a_readme_error_example_fails_with_the_line_shown(number, command, error, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as e:
        _checked(command)
    assert str(e.value) == error, f"README line {number}"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower().strip()).replace(" ", "-")


def test_the_contents_list_links_every_section_in_order():
    text = (ROOT / "README.md").read_text()
    headings = re.findall(r"^(##|###) (.+)$", text, flags=re.M)
    contents = text.split("\nContents:\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert contents == [("- " if level == "##" else "  - ") + f"[{title}](#{_anchor(title)})"
                        for level, title in headings]


def test_every_relative_link_names_a_file_of_the_repository():
    targets = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", (ROOT / "README.md").read_text())
    assert len(targets) >= 20
    assert [t for t in targets if not (ROOT / t).exists()] == []
