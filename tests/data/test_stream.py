"""data.stream: epochs of image-file batches decoded in worker processes, sharded over ranks."""
from __future__ import annotations

import torch

from data.build_files import build_file_data
from data.loader import epoch_generator
from data.samplers import build_sampler
from data.stream import EpochBatches, StreamLoader
from tests.conftest import write_image_folder


def _labels(n=40, classes=4):
    return torch.arange(n) % classes


def test_the_ranks_shares_are_disjoint_and_make_up_the_single_process_batches():
    sampler = build_sampler("class_balanced", _labels(), 4)
    one = EpochBatches(sampler, 8, seed=3)
    ranks = [EpochBatches(sampler, 8, seed=3, rank=r, world=2) for r in range(2)]
    for b in [one, *ranks]:
        b.set_epoch(5)
    whole = list(one)[: len(ranks[0])]
    for step, (a, b) in enumerate(zip(*[list(r) for r in ranks])):
        assert a + b == whole[step] and len(a) == len(b) == 4  # (index, seed) pairs, seeds included


def test_a_training_set_smaller_than_the_batch_gives_every_rank_an_equal_share():
    # 5 images, batch 8, 2 ranks: one step of 2 + 2 images (the fifth left out), not 3 + 2, which DDP's
    # gradient mean would weight unequally per image.
    sampler = build_sampler("instance", _labels(5, 2), 2)
    ranks = [EpochBatches(sampler, 8, seed=1, rank=r, world=2) for r in range(2)]
    for b in ranks:
        b.set_epoch(0)
    (a,), (b,) = [list(r) for r in ranks]
    assert len(a) == len(b) == 2 and not {i for i, _ in a} & {i for i, _ in b}


def test_an_epoch_is_the_same_every_time_and_differs_from_the_next():
    batches = EpochBatches(build_sampler("instance", _labels(), 4), 8, seed=0)
    batches.set_epoch(2)
    first, again = list(batches), list(batches)
    batches.set_epoch(3)
    assert first == again and first != list(batches)
    assert len(first) == 5 and sorted(i for b in first for i, _ in b) == list(range(40))


def test_workers_decode_the_same_batches_as_the_main_process(tmp_path):
    root = write_image_folder(tmp_path / "f", {"train": {"a": 6, "b": 6}})
    data = build_file_data("folder", root, "", 1.0, "exp", 0, 0, 12)
    sampler = build_sampler("instance", data.train_labels, 2)
    cpu = torch.device("cpu")
    in_process = list(StreamLoader(data.train_images, 4, sampler, 7, 0, cpu).epoch(1))
    loader = StreamLoader(data.train_images, 4, sampler, 7, 2, cpu)
    with_workers = list(loader.epoch(1))
    assert len(in_process) == len(with_workers) == 3
    for (x0, y0), (x1, y1) in zip(in_process, with_workers):
        assert x0.shape == (4, 3, 12, 12) and torch.equal(x0, x1) and torch.equal(y0, y1)
    assert not torch.equal(torch.cat([x for x, _ in loader.epoch(2)]), torch.cat([x for x, _ in with_workers]))


def test_a_file_stream_epoch_visits_the_images_in_the_in_memory_loader_s_order():
    """Its order is the sampler's draw from the epoch's generator, as data.loader's; the per-sample seeds come
    after the order (drawing them first would give another order)."""
    sampler = build_sampler("instance", torch.arange(10) % 2, 2)
    visited = [index for batch in EpochBatches(sampler, 4, seed=3) for index, _ in batch]
    assert visited == sampler.indices(0, epoch_generator(3, 0)).tolist()
