"""BALMS's meta-gradient under the two relaxations of meta_sampler.relax, on small problems where it can be
averaged: the mean, over many draws, of d(meta loss)/d(theta) after one look-ahead step of the head.

    python -m bench.meta_gradient --draws 6000 --out results/meta_gradient/meta_gradient.txt

Each problem: C = 4 classes with counts 60, 25, 10, 4 (a long tail), D = 6 features around class means,
a linear head, SGD (lr 0.5, momentum 0.9, weight decay 5e-4, as a stage-2 head), Balanced Softmax on the
drawn batch of 32, plain cross-entropy on a class-balanced meta batch of 64 of the training images. Per
draw, both relaxations see the same head and meta batch; each draws its own batch (the same distribution).
Printed: each class's mean gradient and its standard error under each relaxation, and whether their signs
agree where both are over 3 standard errors from 0.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also run as python bench/meta_gradient.py

from config.program import OneLineParser, at_least  # noqa: E402
from meta_sampler.learner import RELAXATIONS, ClassSampler, balanced_batch  # noqa: E402
from meta_sampler.meta_step import lookahead  # noqa: E402
from models.losses import build_loss  # noqa: E402

COUNTS = (60, 25, 10, 4)
BATCH, META_BATCH, DIM = 32, 64, 6


def mean_gradients(seed: int, draws: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{relaxation: (mean gradient (C,), its standard error (C,))} over `draws` draws of problem `seed`."""
    torch.manual_seed(seed)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(COUNTS)])
    feats = (torch.randn(len(COUNTS), DIM) * 1.5)[labels] + torch.randn(len(labels), DIM)
    head = nn.Linear(DIM, len(COUNTS))
    optimizer = torch.optim.SGD(head.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)
    loss = build_loss("balanced_softmax", list(COUNTS), reduction="none")
    sampler = ClassSampler(labels, len(COUNTS))
    generator = torch.Generator().manual_seed(seed + 1)
    sums = {r: torch.zeros(2, len(COUNTS), dtype=torch.float64) for r in RELAXATIONS}
    for _ in range(draws):
        meta = balanced_batch(labels, len(COUNTS), META_BATCH, generator)
        for relax in RELAXATIONS:
            idx, weights = sampler.draw(BATCH, generator, 1.0, relax)
            sampler.theta.grad = None
            stepped = lookahead(head, optimizer, feats[idx], labels[idx], weights, loss)
            F.cross_entropy(stepped(feats[meta]), labels[meta]).backward()
            grad = sampler.theta.grad.double()
            sums[relax] += torch.stack((grad, grad**2))
    out = {}
    for relax, (total, squares) in sums.items():
        mean = total / draws
        out[relax] = mean, ((squares / draws - mean**2).clamp_min(0) / draws).sqrt()
    return out


def report(seeds: list[int], draws: int) -> str:
    lines = [f"mean d(meta loss)/d(theta) over {draws} draws, classes with {', '.join(map(str, COUNTS))} images "
             f"(+- one standard error)"]
    for seed in seeds:
        grads = mean_gradients(seed, draws)
        for relax in RELAXATIONS:
            mean, se = grads[relax]
            cells = "  ".join(f"{m:+.5f} +- {s:.5f}" for m, s in zip(mean.tolist(), se.tolist()))
            lines.append(f"problem {seed}  {relax:>5}  {cells}")
        (a, sa), (b, sb) = grads["image"], grads["class"]
        clear = (a.abs() > 3 * sa) & (b.abs() > 3 * sb)
        opposite = [c for c in range(len(COUNTS)) if clear[c] and a[c] * b[c] < 0]
        lines.append(f"problem {seed}  opposite signs (both over 3 SE): "
                     + (", ".join(f"class {c} ({COUNTS[c]} images)" for c in opposite) or "none"))
    return "\n".join(lines)


def main() -> None:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=at_least(0), nargs="+", default=[0, 3], help="problems (data, head and draws)")
    parser.add_argument("--draws", type=at_least(1), default=6000, help="draws averaged per problem and relaxation")
    parser.add_argument("--threads", type=at_least(1), default=1)
    parser.add_argument("--out", type=Path, help="also write the table here (a file)")
    args = parser.parse_args()
    if args.out and args.out.is_dir():
        parser.error(f"--out {args.out} is a folder: name the file to write")
    torch.set_num_threads(args.threads)
    text = report(args.seeds, args.draws)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
