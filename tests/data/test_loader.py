"""BatchLoader: per-(seed, epoch) randomness, full coverage of an epoch, batch sizes, layout, errors.

Image i has every pixel equal to i, and with mean 0 and std 1/255 normalisation gives
(i / 255 - 0) / (1 / 255) = i back, so a batch tells which dataset indices it holds.
"""
import pytest
import torch

from data.loader import AUGMENT_CHUNK, SHARD_AUGMENT_STREAM, BatchLoader, epoch_generator, steps_per_epoch
from data.samplers import build_sampler

C = 3  # classes; image i has label i % C
IDENTITY_MEAN = (0.0, 0.0, 0.0)
IDENTITY_STD = (1 / 255, 1 / 255, 1 / 255)


def _loader(n: int, batch_size: int, seed: int = 0, augment=None, channels_last: bool = False,
            augment_chunk: int = AUGMENT_CHUNK) -> BatchLoader:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    labels = torch.arange(n, dtype=torch.int64) % C
    sampler = build_sampler("instance", labels, C)
    return BatchLoader(images, labels, batch_size, sampler, augment, IDENTITY_MEAN, IDENTITY_STD, seed,
                       channels_last=channels_last, augment_chunk=augment_chunk)


def _indices(x: torch.Tensor) -> list[int]:
    """Dataset indices of a batch, read back from the pixel values."""
    return x[:, 0, 0, 0].round().long().tolist()


def test_epoch_generator_is_reproducible_for_same_seed_and_epoch():
    a = torch.rand(8, generator=epoch_generator(3, 5))
    b = torch.rand(8, generator=epoch_generator(3, 5))
    assert torch.equal(a, b)


def test_epoch_generator_differs_across_epochs_and_seeds():
    base = torch.rand(8, generator=epoch_generator(0, 1))
    assert not torch.equal(base, torch.rand(8, generator=epoch_generator(0, 2)))
    assert not torch.equal(base, torch.rand(8, generator=epoch_generator(1, 1)))
    # (seed, epoch) is not a symmetric pair: (1, 0) is another stream than (0, 1).
    assert not torch.equal(base, torch.rand(8, generator=epoch_generator(1, 0)))


def test_epoch_generator_streams_are_independent_and_default_to_zero():
    default = torch.rand(8, generator=epoch_generator(2, 3))
    assert torch.equal(default, torch.rand(8, generator=epoch_generator(2, 3, 0)))
    assert not torch.equal(default, torch.rand(8, generator=epoch_generator(2, 3, 1)))
    assert not torch.equal(torch.rand(8, generator=epoch_generator(2, 3, 1)),
                           torch.rand(8, generator=epoch_generator(2, 3, 2)))


def test_normalised_pixels_decode_to_dataset_index_and_label():
    for x, y in _loader(12, 4).epoch(0):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        idx = _indices(x)
        # Every pixel of image i carries i.
        assert torch.allclose(x, torch.tensor(idx, dtype=torch.float32).view(-1, 1, 1, 1).expand_as(x), atol=1e-4)
        assert y.tolist() == [i % C for i in idx]


def test_instance_sampler_epoch_visits_every_index_exactly_once():
    loader = _loader(24, 8)
    seen = []
    for x, _ in loader.epoch(0):
        seen += _indices(x)
    assert sorted(seen) == list(range(24))
    assert seen != list(range(24))  # shuffled


def test_batch_sizes_keep_a_trailing_batch_larger_than_one():
    loader = _loader(20, 8)
    sizes = [x.shape[0] for x, _ in loader.epoch(0)]
    assert sizes == [8, 8, 4]
    assert len(loader) == 3


def test_trailing_batch_of_one_is_dropped():
    loader = _loader(17, 8)  # N = 2 * B + 1
    batches = list(loader.epoch(0))
    assert len(loader) == 2
    assert [x.shape[0] for x, _ in batches] == [8, 8]
    seen = [i for x, _ in batches for i in _indices(x)]
    assert len(set(seen)) == 16


def test_same_epoch_gives_same_batches_and_other_epoch_differs():
    first = [(x.clone(), y.clone()) for x, y in _loader(24, 8, seed=5).epoch(2)]
    again = [(x.clone(), y.clone()) for x, y in _loader(24, 8, seed=5).epoch(2)]
    other = [x for x, _ in _loader(24, 8, seed=5).epoch(3)]
    assert len(first) == len(again) == 3
    for (xa, ya), (xb, yb) in zip(first, again):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert [_indices(x) for x, _ in first] != [_indices(x) for x in other]


def test_augment_gets_each_chunk_of_batches_as_uint8_and_the_epoch_generator_in_order():
    calls = []

    def record(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        calls.append((images.dtype, _indices(images.float()), torch.rand(1, generator=gen).item()))
        return images

    # 5 batches of 4; a chunk of 9 images rounds down to 2 batches: the augment sees steps 0-1, 2-3, 4.
    batches = [_indices(x) for x, _ in _loader(20, 4, seed=4, augment=record, augment_chunk=9).epoch(1)]
    assert [c[0] for c in calls] == [torch.uint8] * 3
    assert [c[1] for c in calls] == [batches[0] + batches[1], batches[2] + batches[3], batches[4]]
    # The augment's draws continue the epoch's stream right after the sampler's permutation.
    gen = epoch_generator(4, 1)
    torch.randperm(20, generator=gen)
    assert [c[2] for c in calls] == [torch.rand(1, generator=gen).item() for _ in range(3)]


@pytest.mark.parametrize("augment_chunk", [1, 8, 9, 21, AUGMENT_CHUNK])
def test_batches_do_not_depend_on_the_augment_chunk(augment_chunk):
    """Without augmentation, chunking changes nothing: 21 images give 5 batches of 4 (the trailing
    batch of one is dropped); the chunk (at least one batch) only decides how many batches one
    augment call covers."""
    batches = [(_indices(x), y.tolist()) for x, y in _loader(21, 4, seed=2, augment_chunk=augment_chunk).epoch(0)]
    reference = [(_indices(x), y.tolist()) for x, y in _loader(21, 4, seed=2, augment_chunk=4).epoch(0)]
    assert batches == reference
    assert [len(i) for i, _ in batches] == [4] * 5 and len({i for b, _ in batches for i in b}) == 20


def test_channels_last_flag_gives_channels_last_batches():
    for x, _ in _loader(8, 4, channels_last=True).epoch(0):
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert not x.is_contiguous()
    for x, _ in _loader(8, 4, channels_last=False).epoch(0):
        assert x.is_contiguous()
        assert not x.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("batch_size", [1, 0])
def test_batch_size_below_two_is_rejected(batch_size):
    with pytest.raises(ValueError, match="at least 2"):
        _loader(8, batch_size)


def test_a_training_set_smaller_than_the_batch_gives_every_rank_an_equal_share():
    # 5 images, batch 8, 2 ranks: one step of 2 + 2 images (the fifth left out), not 3 + 2 (DDP's mean of the
    # two ranks' mean losses would weight an image of the smaller share more).
    images = torch.arange(5, dtype=torch.uint8).view(5, 1, 1, 1).expand(5, 3, 4, 4).contiguous()
    labels = torch.arange(5) % C
    shares = [[_indices(x) for x, _ in BatchLoader(images, labels, 8, build_sampler("instance", labels, C), None,
                                                   IDENTITY_MEAN, IDENTITY_STD, 0, rank=r, world=2).epoch(0)]
              for r in range(2)]
    (a,), (b,) = shares
    assert len(a) == len(b) == 2 and not set(a) & set(b)


def _rank_loader(n: int, batch_size: int, rank: int, world: int, seed: int = 0, augment=None) -> BatchLoader:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    labels = torch.arange(n) % C
    return BatchLoader(images, labels, batch_size, build_sampler("instance", labels, C), augment, IDENTITY_MEAN,
                       IDENTITY_STD, seed, rank=rank, world=world)


def test_with_several_ranks_an_epoch_has_only_full_global_batches():
    # 20 images, global batch 8, 2 ranks: 2 steps of 4 + 4 images; the last 4 images would be a 2 + 2 step,
    # which DDP's mean of the ranks' means would weight like a full one.
    shares = []
    for rank in range(2):
        loader = _rank_loader(20, 8, rank, 2)
        assert len(loader) == 2
        shares.append([_indices(x) for x, _ in loader.epoch(0)])
    assert [[len(b) for b in s] for s in shares] == [[4, 4], [4, 4]]
    seen = [i for s in shares for b in s for i in b]
    assert len(set(seen)) == 16  # the ranks' shares are disjoint


def test_each_rank_augments_its_share_with_its_own_stream():
    draws = {}
    for rank in range(2):
        def record(images, gen, rank=rank):
            draws.setdefault(rank, []).append(torch.rand(4, generator=gen))
            return images

        list(_rank_loader(16, 8, rank, 2, seed=3, augment=record).epoch(1))
    # Same seed and epoch, different ranks: independent draws, each from stream SHARD_AUGMENT_STREAM + rank.
    assert not torch.equal(draws[0][0], draws[1][0])
    for rank in range(2):
        assert torch.equal(draws[rank][0], torch.rand(4, generator=epoch_generator(3, 1, SHARD_AUGMENT_STREAM + rank)))


def test_an_epoch_takes_its_partial_last_batch_as_a_step_unless_that_is_one_image():
    """A lone last image is dropped (BatchNorm cannot train on one), but a training set of one image still trains."""
    assert [steps_per_epoch(n, 128) for n in (1, 2, 128, 129, 130)] == [1, 1, 1, 1, 2]


@pytest.mark.parametrize("prefetch", [False, True])
def test_an_epoch_asked_for_again_gives_the_same_batches_and_the_next_one_a_fresh_loader_s(prefetch):
    """With prefetch, the chunk made ahead belongs to the next epoch: asking for epoch 0 twice (a resumed run
    re-entering it) must not hand out epoch 1's batches, and epoch 1 must be what a fresh loader gives."""
    labels = torch.arange(10) % 2
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2).contiguous()

    def loader(prefetch: bool) -> BatchLoader:
        return BatchLoader(images, labels, 4, build_sampler("instance", labels, 2), None, (0.0,) * 3, (1.0,) * 3, 0,
                           augment_chunk=4, prefetch=prefetch)
    it = loader(prefetch)
    first, again, second = ([y.tolist() for _, y in it.epoch(e)] for e in (0, 0, 1))
    assert first == again and second == [y.tolist() for _, y in loader(False).epoch(1)]
