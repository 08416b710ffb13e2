"""Shared fixtures: tiny datasets written in the official on-disk formats, and a subprocess runner."""
from __future__ import annotations

import functools
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tests import forkserver

REPO = Path(__file__).resolve().parents[1]


def write_fake_cifar10(root: Path, train_per_class: int, test_per_class: int, seed: int = 0) -> Path:
    """A learnable CIFAR-10 look-alike in the official python format under root/cifar-10-batches-py.

    Class c is a noisy image whose mean colour depends on c, so a tiny run learns something.
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def images(per_class: int) -> tuple[np.ndarray, list[int]]:
        labels = np.repeat(np.arange(10), per_class)
        rng.shuffle(labels)
        base = np.stack([np.full((3, 32, 32), 0.0)] * len(labels))
        for i, c in enumerate(labels):
            base[i, c % 3] = 40 + 20 * c
            base[i, :, : (c + 1) * 3] = 255 - 20 * c
        data = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        return data.reshape(len(labels), 3072), labels.tolist()

    data, labels = images(train_per_class)
    for b, chunk in enumerate(np.array_split(np.arange(len(labels)), 5)):
        with open(folder / f"data_batch_{b + 1}", "wb") as f:
            pickle.dump({"batch_label": f"training batch {b + 1} of 5", "data": data[chunk],
                         "labels": [labels[i] for i in chunk], "filenames": [f"{i}.png" for i in chunk]}, f)
    data, labels = images(test_per_class)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"batch_label": "testing batch 1 of 1", "data": data, "labels": labels,
                     "filenames": [f"{i}.png" for i in range(len(labels))]}, f)
    with open(folder / "batches.meta", "wb") as f:
        names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
        pickle.dump({"label_names": names, "num_cases_per_batch": 10000, "num_vis": 3072}, f)
    return root


def _class_image(label: int, index: int, size: int) -> torch.Tensor:
    """A learnable uint8 (3, size, size) image: class `label` sets its colour, `index` its noise."""
    g = torch.Generator().manual_seed(1000 * label + index)
    image = torch.full((3, size, size), 40.0)
    image[label % 3] = 60 + (37 * label) % 180
    return (image + torch.randint(-20, 21, (3, size, size), generator=g)).clamp(0, 255).to(torch.uint8)


def _write_jpeg(path: Path, image: torch.Tensor) -> None:
    from torchvision.io import encode_jpeg

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_jpeg(image, quality=95).numpy().tobytes())


def write_noise_jpeg(path: Path, seed: int = 0, size: tuple[int, int] = (40, 56)) -> Path:
    """A JPEG of uniform noise, (height, width) = size, from `seed`."""
    from torchvision.io import encode_jpeg

    path.parent.mkdir(parents=True, exist_ok=True)
    image = torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    path.write_bytes(encode_jpeg(image).numpy().tobytes())
    return path


def write_image_folder(root: Path, counts: dict[str, dict[str, int]], size: int = 16) -> Path:
    """root/<split>/<class>/<i>.jpg with counts[split][class] JPEG images each."""
    for split, per_class in counts.items():
        for c, (name, n) in enumerate(sorted(per_class.items())):
            for i in range(n):
                _write_jpeg(root / split / name / f"{i}.jpg", _class_image(c, i + 100 * len(split), size))
    return root


def write_image_lists(root: Path, files: dict[str, list[int]], size: int = 16) -> Path:
    """A split-list dataset: for each list file name, one JPEG per label (images/<file>/<i>.jpg) and
    the list file itself (`images/<file>/<i>.jpg <label>` lines) in root."""
    for name, labels in files.items():
        lines = []
        for i, label in enumerate(labels):
            rel = f"images/{Path(name).stem}/{i}.jpg"
            _write_jpeg(root / rel, _class_image(label, i, size))
            lines.append(f"{rel} {label}")
        (root / name).write_text("\n".join(lines) + "\n")
    return root


def pytest_configure(config):
    # Every process a test starts uses one intra-op thread unless OMP_NUM_THREADS says otherwise:
    # make test runs test processes side by side, and torch threads that share cores spin-wait for
    # each other (a script's own train.num_threads still wins).
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def one_thread():
    # In-process tests use tiny tensors: intra-op threads only add overhead, and stall badly
    # when other jobs share the cores. Subprocess runs set train.num_threads=1 themselves.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _NoFloat64On(TorchDispatchMode):
    """Fails any operator that makes or takes a float64 tensor on `device_type`."""

    def __init__(self, device_type: str) -> None:
        super().__init__()
        self.device_type = device_type

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves((args, kwargs, out)):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.device.type == self.device_type:
                raise AssertionError(f"{func} has a float64 tensor on the {self.device_type} device, "
                                     "which MPS (Apple GPUs) cannot hold")
        return out


@pytest.fixture
def no_float64_on_meta(monkeypatch):
    """Apple's MPS has no float64, and no Apple GPU is here: a test that runs a loop on the meta device
    (the stand-in for a GPU: there every read of a device value raises) with this fixture treats meta
    as MPS (data.transfer.widest_float gives float32) and fails on any float64 tensor there;
    host-side float64 (draws, counts) is fine."""
    import data.transfer

    monkeypatch.setattr(data.transfer, "NO_FLOAT64", data.transfer.NO_FLOAT64 | {"meta"})
    with _NoFloat64On("meta"):
        yield


@pytest.fixture(scope="session")
def fake_cifar10(tmp_path_factory) -> Path:
    """60 training and 10 test images per class (LT IF10 keeps 60 ... 6)."""
    return write_fake_cifar10(tmp_path_factory.mktemp("cifar"), train_per_class=60, test_per_class=10)


@pytest.fixture(scope="session")
def real_cifar10() -> Path:
    """The real CIFAR-10 folder under $LT_DATA_ROOT; skipped without it, except under CI (CI set), where
    missing data is a failure."""
    root = os.environ.get("LT_DATA_ROOT")
    if root and (Path(root) / "cifar-10-batches-py").is_dir():
        return Path(root)
    why = f"real CIFAR-10 not found: LT_DATA_ROOT={root!r} has no cifar-10-batches-py/"
    if os.environ.get("CI"):
        pytest.fail(f"{why}; the real data was expected under CI (CI={os.environ['CI']!r})")
    pytest.skip(why)


def run_script(*args: str, timeout: float = 300, check: bool = True, cold: bool = False) -> subprocess.CompletedProcess:
    """`python *args` (a script and its arguments, or -m and a module) as its own process, from the repository
    root: forked from a process that has imported torch already (tests/forkserver.py), or, with `cold` or
    LT_TESTS_COLD=1 set, started afresh."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if cold or os.environ.get("LT_TESTS_COLD") == "1":
        proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)
    else:
        proc = forkserver.run(list(args), REPO, env, timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


# A stage-1 schedule that takes seconds on the tiny data: single thread for bitwise determinism.
TINY_STAGE1 = ("data.imbalance_factor=10", "train.epochs=3", "train.batch_size=32", "train.lr=0.05",
               "train.warmup=1", "train.num_threads=1", "eval.batch_size=64")


@pytest.fixture
def run(request) -> callable:
    """run_script; cold for the GPU tests (a fork of a process that imported torch may start CUDA, but those
    tests run rarely, on borrowed machines: they take the plain path)."""
    if request.node.get_closest_marker("gpu"):
        return functools.partial(run_script, cold=True)
    return run_script


@pytest.fixture
def tiny_stage1() -> tuple[str, ...]:
    return TINY_STAGE1


@pytest.fixture(scope="session")
def stage1_run(fake_cifar10, tmp_path_factory) -> Path:
    """One tiny stage-1 run with a 2-per-class validation split, shared by the stage-2 tests."""
    log_dir = tmp_path_factory.mktemp("stage1") / "run"
    run_script("stage1_train.py", f"data.root={fake_cifar10}", f"log_dir={log_dir}", *TINY_STAGE1,
               "data.val_per_class=2")
    return log_dir


def wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Return once run_dir/last.pt exists, or proc has ended, or timeout seconds have passed (the caller's
    assertions then say which)."""
    deadline = time.time() + timeout
    while not (run_dir / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)


def kill_after_first_checkpoint(args: list[str], log_dir: Path) -> int:
    """Start a run, SIGKILL it as soon as its first last.pt appears; return the epoch it had saved."""
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for_checkpoint(log_dir, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    return torch.load(log_dir / "last.pt", weights_only=True)["epoch"]


@pytest.fixture
def kill_run() -> callable:
    return kill_after_first_checkpoint
