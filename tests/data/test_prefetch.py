"""prefetched(): the same items in order, made one ahead in another thread, errors and early stops
handed over; and BatchLoader(prefetch=True) giving the batches of the loader without it."""
import gc
import subprocess
import sys
import threading

import pytest
import torch

from data.loader import BatchLoader
from data.prefetch import prefetched
from data.samplers import build_sampler
from tests.conftest import REPO

CPU = torch.device("cpu")


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "prefetch"]


def _wait_until(condition, seconds: float = 10.0) -> bool:
    """Poll `condition` (the thread's progress) for up to `seconds`."""
    done = threading.Event()
    for _ in range(int(seconds / 0.01)):
        if condition():
            return True
        done.wait(0.01)
    return condition()


def test_items_come_in_order_made_in_another_thread():
    makers = []

    def source():
        for i in range(5):
            makers.append(threading.current_thread())
            yield torch.full((2,), i)

    got = [t.tolist() for t in prefetched(source(), CPU)]
    assert got == [[i, i] for i in range(5)]
    assert all(m is not threading.current_thread() and m.name == "prefetch" for m in makers)



def test_made_ahead_is_set_once_the_item_ahead_is_made_and_cleared_as_the_caller_takes_one():
    gate = threading.Event()  # item 1 is made only when the test opens the gate

    def source():
        yield 0
        gate.wait(10)
        yield 1

    made_ahead = threading.Event()
    it = prefetched(source(), CPU, made_ahead)
    assert next(it) == 0 and not made_ahead.is_set()  # taking item 0 cleared it; item 1 is in the making
    assert not made_ahead.wait(0.2)
    gate.set()
    assert made_ahead.wait(10)  # item 1 made, the thread waits for the caller
    assert next(it) == 1
    assert made_ahead.wait(10)  # the source ended: nothing left to make
    assert list(it) == []


def test_a_loader_s_wait_ahead_returns_once_the_next_epoch_s_first_chunk_is_made():
    labels = torch.arange(12) % 3
    gate, calls = threading.Event(), []

    def augment(x, generator):  # chunks of 4 images: calls 0-2 are epoch 0's, call 3 epoch 1's first
        calls.append(len(calls))
        if len(calls) == 4:
            gate.wait(10)
        return x

    loader = BatchLoader(torch.zeros(12, 3, 4, 4, dtype=torch.uint8), labels, 4, build_sampler("instance", labels, 3),
                         augment, (0.0,) * 3, (1.0,) * 3, 0, augment_chunk=4, prefetch=True)
    assert loader.wait_ahead(0)  # nothing in the making before the first epoch
    assert len(list(loader.epoch(0))) == 3
    assert not loader.wait_ahead(0.2)  # epoch 1's first chunk is in the making, held at the gate
    gate.set()
    assert loader.wait_ahead(10) and calls == [0, 1, 2, 3]
    plain = BatchLoader(torch.zeros(12, 3, 4, 4, dtype=torch.uint8), labels, 4, build_sampler("instance", labels, 3),
                        None, (0.0,) * 3, (1.0,) * 3, 0, augment_chunk=4)
    assert len(list(plain.epoch(0))) == 3 and plain.wait_ahead(0)  # without prefetch nothing is made ahead

def test_the_next_item_is_made_while_the_caller_holds_the_current_one_and_no_further():
    started = []

    def source():
        for i in range(4):
            started.append(i)
            yield i

    it = prefetched(source(), CPU)
    assert next(it) == 0
    # Without the caller asking again, the thread makes item 1 (and then waits: never item 2).
    assert _wait_until(lambda: started == [0, 1])
    threading.Event().wait(0.2)
    assert started == [0, 1]
    assert next(it) == 1
    assert _wait_until(lambda: started == [0, 1, 2])
    assert list(it) == [2, 3]


def test_an_error_of_the_source_reaches_the_caller_at_its_item():
    def source():
        yield 0
        yield 1
        raise ValueError("bad chunk 2")

    it = prefetched(source(), CPU)
    assert [next(it), next(it)] == [0, 1]
    with pytest.raises(ValueError, match="bad chunk 2"):
        next(it)
    assert _wait_until(lambda: not _prefetch_threads())


def test_a_caller_that_stops_early_stops_the_thread():
    made = []

    def source():
        for i in range(100):
            made.append(i)
            yield i

    it = prefetched(source(), CPU)
    assert next(it) == 0
    it.close()
    assert _wait_until(lambda: not _prefetch_threads())
    assert len(made) <= 2  # the item in use and at most the one made ahead


C = 3


def _loader(n: int, batch_size: int, prefetch: bool, augment=None, world: int = 1, rank: int = 0,
            chunk: int = 8) -> BatchLoader:
    """Image i has every pixel equal to i (mod 256); identity normalisation keeps it."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    labels = torch.arange(n) % C
    return BatchLoader(images, labels, batch_size, build_sampler("instance", labels, C), augment, (0.0,) * 3,
                       (1 / 255,) * 3, 7, rank=rank, world=world, augment_chunk=chunk, prefetch=prefetch)


def _noisy(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """An augmentation that consumes the epoch's generator, as BatchAugment does."""
    return (images.int() + torch.randint(0, 3, images.shape, generator=gen)).clamp(0, 255).to(torch.uint8)


def _take(loader: BatchLoader, epoch: int, steps: int | None = None) -> list[tuple[list, list]]:
    out = []
    for k, (x, y) in enumerate(loader.epoch(epoch)):
        if steps is not None and k == steps:
            break
        out.append((x.flatten(1).tolist(), y.tolist()))
    return out


@pytest.mark.parametrize("world,rank", [(1, 0), (2, 1)])
def test_prefetch_gives_the_same_batches_through_epochs_stops_and_restarts(world, rank):
    """Consecutive epochs (made ahead across the epoch boundary), an epoch left after one step, an epoch
    asked out of order: the batches are those of the loader without prefetch, epoch for epoch."""
    plan = [(0, None), (1, None), (2, 1), (3, None), (1, None), (2, None), (3, None)]
    with_prefetch, without = (_loader(22, 4, p, _noisy, world, rank) for p in (True, False))
    for epoch, steps in plan:
        assert _take(with_prefetch, epoch, steps) == _take(without, epoch, steps)
    assert len(with_prefetch) == (6 if world == 1 else 5)  # world 2: only full global batches


def test_an_epoch_used_up_leaves_the_next_epochs_first_chunk_made():
    made = []

    def count(images, gen):
        made.append(threading.current_thread().name)
        return images

    loader = _loader(16, 4, True, count, chunk=8)  # 4 steps, 2 chunks per epoch
    _take(loader, 0)
    assert _wait_until(lambda: len(made) == 3)  # epoch 0's two chunks and epoch 1's first
    assert set(made) == {"prefetch"}


def test_a_dropped_loader_stops_its_thread():
    loader = _loader(16, 4, True, _noisy)
    _take(loader, 0)
    assert _prefetch_threads()
    del loader
    gc.collect()
    assert _wait_until(lambda: not _prefetch_threads())


@pytest.mark.slow
def test_a_process_exiting_while_the_thread_makes_an_item_waits_for_it_and_exits_cleanly(tmp_path):
    """A daemon thread still inside torch operators at interpreter exit aborts the process
    ("terminate called without an active exception", exit -6): the exit must wait for the item."""
    script = tmp_path / "exit_mid_item.py"
    script.write_text(
        "import sys, torch\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from data.prefetch import prefetched\n"
        "def slow():\n"
        "    for i in range(10):\n"
        "        x = torch.randn(200, 200)\n"
        "        for _ in range(300):\n"
        "            x = (x @ x).tanh()\n"
        "        print('made', i, flush=True)\n"
        "        yield x\n"
        "it = prefetched(slow(), torch.device('cpu'))\n"
        "next(it)\n"
        "print('main done', flush=True)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # Item 0 taken; item 1, in progress when the main thread ended, finished before the exit; no further one.
    assert proc.stdout.split("\n")[:1] == ["made 0"] and "made 1" in proc.stdout and "made 2" not in proc.stdout
    assert "terminate" not in proc.stderr
