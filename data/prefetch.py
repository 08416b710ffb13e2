"""The items of an iterator, each next one made in a background thread while the caller uses the current one.

The in-memory loader (data.loader) augments a chunk of batches per call. Made in the training thread,
a call's few hundred operator launches and host draws hold up the queueing of training steps, and on
a GPU its kernels run in the training stream, between two steps. `prefetched` makes chunk k + 1 in a
background thread while the training thread runs chunk k's steps: the host work runs on another core
(torch releases the GIL inside every operator, so the two threads interleave), and on CUDA it runs on
a stream of its own, so that its kernels can run beside the training kernels. The caller's stream
waits for each item's event (the host does not wait), and the item's tensors are marked as used by
that stream, so that the caching allocator does not give their memory back to the side stream while
the training kernels still read it.

The source iterator is only ever advanced by the thread, one item ahead of the caller, in order: its
items are those the caller would have made itself, bytes for bytes. An exception it raises reaches
the caller at that item; a caller that stops early (closes or drops the iterator), or the interpreter's
exit, stops the thread after the item in progress.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

import torch
from torch.profiler import record_function

T = TypeVar("T")
_END = object()  # what the thread hands over after the source's last item


def prefetched(items: Iterator[T], device: torch.device, made_ahead: threading.Event | None = None) -> Iterator[T]:
    """The items of `items`, each made one ahead in a background thread (on its own stream on CUDA).

    An item is a tensor or a tuple whose tensors are on `device`; on CUDA the caller's current stream
    of `device` waits for it before its use. `made_ahead`, when given, is set while the thread has nothing
    to make (the item ahead is made, or the source ended) and cleared as the caller takes an item:
    bench/train_paths.py waits for it, so that a timed window pays for the item its last step left in progress.
    """
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    made: queue.SimpleQueue = queue.SimpleQueue()  # (item, CUDA event or None) | (None, exception) | _END
    wanted = threading.Semaphore(1)  # items the thread may make ahead of the caller's
    stop = threading.Event()
    # Not a daemon: at exit the interpreter waits for the item in progress (a daemon thread still running
    # torch operators while the interpreter shuts down can abort the process), and the thread ends by itself.
    made_ahead = made_ahead if made_ahead is not None else threading.Event()
    made_ahead.clear()
    thread = threading.Thread(target=_make, args=(items, stream, made, wanted, stop, made_ahead), name="prefetch")
    thread.start()
    try:
        while True:
            got = made.get()
            if got is _END:
                return
            item, extra = got
            if isinstance(extra, BaseException):
                raise extra
            made_ahead.clear()  # before the thread may start the next item: a wait never sees a stale "made"
            wanted.release()  # the thread starts the next item while the caller uses this one
            if extra is not None:
                _use_on(torch.cuda.current_stream(device), item, extra)
            yield item
    finally:
        stop.set()
        wanted.release()  # wake a thread waiting for permission, so that it sees `stop`


def _make(items: Iterator, stream: torch.cuda.Stream | None, made: queue.SimpleQueue,
          wanted: threading.Semaphore, stop: threading.Event, made_ahead: threading.Event) -> None:
    """The thread: make each item of `items` when the caller allows it, on `stream` (CUDA)."""
    if stream is not None:
        torch.cuda.set_device(stream.device)  # the current device is per thread
    while True:
        while not wanted.acquire(timeout=0.1):
            if not threading.main_thread().is_alive():
                return  # the interpreter is exiting: it joins this thread, after the item in progress
        if stop.is_set():
            made_ahead.set()
            return
        try:
            # A named range, so that a profile tells this thread's work (and the kernels it launches) apart.
            with record_function("prefetch"):
                if stream is None:
                    item = next(items)
                    event = None
                else:
                    with torch.cuda.stream(stream):
                        item = next(items)
                    event = stream.record_event()
        except StopIteration:
            made.put(_END)
            made_ahead.set()
            return
        except BaseException as e:  # noqa: BLE001 (handed to the caller, who raises it)
            made.put((None, e))
            made_ahead.set()
            return
        made.put((item, event))
        made_ahead.set()


def _use_on(stream: torch.cuda.Stream, item, event: torch.cuda.Event) -> None:
    """Make `stream` wait for `event` and mark the item's tensors as used by `stream`."""
    stream.wait_event(event)
    for t in item if isinstance(item, tuple) else (item,):
        if isinstance(t, torch.Tensor):
            t.record_stream(stream)
