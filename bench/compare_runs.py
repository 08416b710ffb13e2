"""Side-by-side Markdown table of the --test results of several runs.

    python bench/compare_runs.py logs/cifar10_lt_if100_demo_stage1 logs/cifar10_lt_if100_demo_stage2_*

Reads <run>/test_metrics.json of each run (written by `--test`) and prints one row per run:
top-1, many, medium, few and every class's accuracy, in %, with each class's training count in
the header. Absent shot groups print as "-".
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config.program import OneLineParser, run_program  # noqa: E402


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


GROUPS = ("top1", "many", "medium", "few")


def read_text(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        sys.exit(f"error: cannot read {path}: {getattr(e, 'strerror', None) or e}; check the file and its permissions")


def parse_json(text: str, where: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        sys.exit(f"error: {where} is not valid JSON ({e.msg}, column {e.colno}); rewrite it by rerunning that step "
                 f"(a killed write leaves a partial line: delete it)")


def row_name(run: Path, m: dict) -> str:
    """The run's name in a table, with what else its test_metrics.json `m` scored: a checkpoint from outside the
    run directory (`--test --ckpt` of another run's, in a log_dir of its own or in a run not yet tested), logits
    adjusted post hoc (eval.logit_adjust_tau)."""
    notes = []
    # By the folder's name, as given or resolved (a run directory moved since its --test, logs/ to results/, or
    # reached through a link holds its own checkpoint still); "" or ".": a --test run inside the run directory.
    folder = Path(m.get("checkpoint") or ".").parent.name
    if folder not in ("", ".", run.name, run.resolve().name):
        notes.append(f"tests {m['checkpoint']}")
    if m.get("logit_adjust_tau"):
        notes.append(f"post-hoc tau {m['logit_adjust_tau']:g}")
    name = run.name or run.resolve().name  # "." given: the folder's own name
    return f"{name} ({'; '.join(notes)})" if notes else name


def read_metrics(path: Path, keys: tuple[str, ...] = GROUPS) -> dict:
    """A run's test_metrics.json (written by --test), holding `keys`; a file that cannot be read, is not JSON
    or lacks a key ends the program with one line (SystemExit)."""
    m = parse_json(read_text(path), str(path))
    if not isinstance(m, dict) or any(k not in m for k in keys):
        sys.exit(f"error: {path} lacks some of {', '.join(keys)}; rerun --test for that run to rewrite it")
    return m


def table(runs: list[Path]) -> str:
    results = []
    for run in runs:
        path = run / "test_metrics.json"
        if not run.is_dir():
            sys.exit(f"error: {run} is not a directory; pass run directories (logs/<run>) that --test has been run on")
        if not path.is_file():
            sys.exit(f"error: {path} does not exist: run the script with --test for that run first")
        m = read_metrics(path, (*GROUPS, "per_class", "train_class_counts"))
        results.append((row_name(run, m), m))
    first = results[0][1]
    names = first.get("class_names") or [str(c) for c in range(len(first["per_class"]))]
    head = [f"{name} ({n})" for name, n in zip(names, first["train_class_counts"])]
    lines = ["| run | top-1 | many | medium | few | " + " | ".join(head) + " |",
             "|---" * (5 + len(head)) + "|"]
    for name, m in results:
        if m["train_class_counts"] != first["train_class_counts"]:
            sys.exit(f"error: {name} was trained on other class counts than {results[0][0]}: not comparable class "
                     f"by class; bench/report.py puts runs of other datasets side by side")
        cells = [pct(m[k]) for k in GROUPS] + [pct(a) for a in m["per_class"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run directories holding test_metrics.json")
    runs = p.parse_args().runs
    run_program(lambda: print(table(runs)))  # a missing or damaged test_metrics.json: one line, exit 2


if __name__ == "__main__":
    main()
