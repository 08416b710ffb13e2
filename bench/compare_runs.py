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


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def table(runs: list[Path]) -> str:
    results = []
    for run in runs:
        path = run / "test_metrics.json"
        if not path.is_file():
            sys.exit(f"{path} does not exist: run the script with --test for that run first")
        results.append((run.name, json.loads(path.read_text())))
    first = results[0][1]
    names = first.get("class_names") or [str(c) for c in range(len(first["per_class"]))]
    head = [f"{name} ({n})" for name, n in zip(names, first["train_class_counts"])]
    lines = ["| run | top-1 | many | medium | few | " + " | ".join(head) + " |",
             "|---" * (5 + len(head)) + "|"]
    for name, m in results:
        if m["train_class_counts"] != first["train_class_counts"]:
            sys.exit(f"{name} was trained on other class counts than {results[0][0]}: not comparable")
        cells = [pct(m[k]) for k in ("top1", "many", "medium", "few")] + [pct(a) for a in m["per_class"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run directories holding test_metrics.json")
    print(table(p.parse_args().runs))


if __name__ == "__main__":
    main()
