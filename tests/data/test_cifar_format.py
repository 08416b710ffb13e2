"""Reading tiny CIFAR datasets written in the official on-disk pickle format."""

import pickle
import pickletools
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets import utils as tv_utils

from data.cifar import DatasetNotFoundError, load_cifar

ROWS = 20
C10_NAMES = [f"c10_{i}" for i in range(10)]
C100_NAMES = [f"c100_{i}" for i in range(100)]


def _py2_pickle(obj) -> bytes:
    """Protocol-2 pickle whose ASCII strings are python-2 byte strings (SHORT_BINSTRING), like the official files."""
    raw = pickle.dumps(obj, protocol=2)
    out, last = bytearray(), 0
    for op, arg, pos in pickletools.genops(raw):
        if op.name == "BINUNICODE" and arg.isascii() and len(arg) < 256:
            out += raw[last:pos] + b"U" + bytes([len(arg)]) + arg.encode("latin1")
            last = pos + 5 + len(arg)  # opcode byte + 4-byte length + payload
    return bytes(out + raw[last:])


def _dump(path: Path, obj, style: str) -> None:
    if style == "py2":
        path.write_bytes(_py2_pickle(obj))
    elif style == "bytes_keys":
        path.write_bytes(pickle.dumps({k.encode(): v for k, v in obj.items()}, protocol=2))
    else:
        path.write_bytes(pickle.dumps(obj, protocol=4))


def _rows(seed: int, n: int = ROWS) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


def write_cifar10(root: Path, style: str = "py2") -> dict:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for b in range(1, 6):
        data = _rows(b)
        labels = [(3 * i + b) % 10 for i in range(ROWS)]
        batches[f"data_batch_{b}"] = (data, labels)
        _dump(folder / f"data_batch_{b}", {"batch_label": f"training batch {b}", "data": data, "labels": labels}, style)
    test_data, test_labels = _rows(99), [i % 10 for i in range(ROWS)]
    batches["test_batch"] = (test_data, test_labels)
    _dump(folder / "test_batch", {"data": test_data, "labels": test_labels}, style)
    _dump(folder / "batches.meta", {"label_names": C10_NAMES, "num_vis": 3072}, style)
    return batches


def write_cifar100(root: Path, style: str = "protocol4") -> dict:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    splits = {}
    for split, n, seed in (("train", 30, 1), ("test", 10, 2)):
        data = _rows(seed, n)
        fine = [(7 * i + 50) % 100 for i in range(n)]
        coarse = [i % 20 for i in range(n)]
        splits[split] = (data, fine, coarse)
        _dump(folder / split, {"data": data, "fine_labels": fine, "coarse_labels": coarse}, style)
    _dump(folder / "meta", {"fine_label_names": C100_NAMES, "coarse_label_names": [f"sc{i}" for i in range(20)]}, style)
    return splits


def test_py2_helper_writes_byte_string_keys():
    ops = {op.name for op, _, _ in pickletools.genops(_py2_pickle({"data": 1}))}
    assert "SHORT_BINSTRING" in ops and "BINUNICODE" not in ops


def test_cifar10_train_concatenates_five_batches_in_order(tmp_path):
    batches = write_cifar10(tmp_path)
    split = load_cifar("cifar10", tmp_path, "train")
    assert split.images.dtype == torch.uint8
    assert split.images.shape == (100, 3, 32, 32)
    assert split.images.is_contiguous()
    assert split.labels.dtype == torch.int64
    expected_labels = sum((batches[f"data_batch_{b}"][1] for b in range(1, 6)), [])
    assert split.labels.tolist() == expected_labels
    assert split.class_names == C10_NAMES
    # Row 0 of data_batch_3 is image 40; its first byte is the red value at (y=0, x=0).
    assert int(split.images[40, 0, 0, 0]) == int(batches["data_batch_3"][0][0, 0])


def test_cifar10_test_split_reads_test_batch(tmp_path):
    batches = write_cifar10(tmp_path)
    split = load_cifar("cifar10", tmp_path, "test")
    assert split.images.shape == (ROWS, 3, 32, 32)
    assert split.labels.tolist() == batches["test_batch"][1]


def test_pixel_row_layout_is_rgb_planes_row_major(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(tmp_path)
    data = np.zeros((ROWS, 3072), dtype=np.uint8)
    data[2, 1 * 1024 + 5 * 32 + 7] = 201  # green plane, y=5, x=7
    data[2, 2 * 1024 + 31 * 32 + 0] = 77  # blue plane, y=31, x=0
    _dump(folder / "test_batch", {"data": data, "labels": [0] * ROWS}, "py2")
    images = load_cifar("cifar10", tmp_path, "test").images
    assert int(images[2, 1, 5, 7]) == 201
    assert int(images[2, 2, 31, 0]) == 77
    assert int(images.sum()) == 201 + 77


def test_cifar10_with_protocol4_str_keys(tmp_path):
    batches = write_cifar10(tmp_path, style="protocol4")
    split = load_cifar("cifar10", tmp_path, "test")
    assert split.labels.tolist() == batches["test_batch"][1]


def test_bytes_keys_and_names_are_accepted(tmp_path):
    write_cifar10(tmp_path, style="bytes_keys")
    folder = tmp_path / "cifar-10-batches-py"
    _dump(folder / "batches.meta", {"label_names": [n.encode() for n in C10_NAMES]}, "bytes_keys")
    split = load_cifar("cifar10", tmp_path, "test")
    assert split.class_names == C10_NAMES
    assert split.images.shape == (ROWS, 3, 32, 32)


def test_cifar100_uses_fine_labels_not_coarse(tmp_path):
    splits = write_cifar100(tmp_path)
    train = load_cifar("cifar100", tmp_path, "train")
    assert train.labels.tolist() == splits["train"][1]
    assert train.labels.tolist() != splits["train"][2]
    assert int(train.labels.max()) == 99  # i=7: (49 + 50) % 100; coarse labels never exceed 19
    assert train.class_names == C100_NAMES
    test = load_cifar("cifar100", tmp_path, "test")
    assert test.images.shape == (10, 3, 32, 32)
    assert int(test.images[3, 0, 0, 1]) == int(splits["test"][0][3, 1])


def test_unknown_name_and_split_list_valid_choices(tmp_path):
    with pytest.raises(ValueError, match=r"'cifar1000'.*\['cifar10', 'cifar100'\]"):
        load_cifar("cifar1000", tmp_path, "train")
    with pytest.raises(ValueError, match=r"'val'.*\['train', 'test'\]"):
        load_cifar("cifar10", tmp_path, "val")


@pytest.mark.parametrize(
    "content,problem",
    [
        ({"labels": [0] * ROWS}, "key 'data' is missing"),
        ({"data": _rows(0)}, "key 'labels' is missing"),
        ({"data": _rows(0).astype(np.int64), "labels": [0] * ROWS}, "uint8"),
        ({"data": [[0] * 3072] * ROWS, "labels": [0] * ROWS}, "uint8"),
        ({"data": np.zeros((ROWS, 3000), np.uint8), "labels": [0] * ROWS}, r"shape \(N, 3072\)"),
        ({"data": _rows(0), "labels": [0] * (ROWS - 1)}, "to match 'data'"),
        ({"data": _rows(0), "labels": [10] + [0] * (ROWS - 1)}, r"expected \[0, 10\)"),
        ({"data": _rows(0), "labels": [-1] + [0] * (ROWS - 1)}, r"expected \[0, 10\)"),
        ({"data": _rows(0), "labels": [0.5] * ROWS}, "must hold integers"),
    ],
)
def test_bad_data_file_names_file_problem_and_fix(tmp_path, content, problem):
    write_cifar10(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "test_batch"
    _dump(bad, content, "py2")
    with pytest.raises(ValueError, match=problem) as err:
        load_cifar("cifar10", tmp_path, "test")
    assert str(bad) in str(err.value)
    assert "data.root=<an empty folder> data.download=true" in str(err.value)
    assert "delete" not in str(err.value).replace("nothing in it is deleted", "")  # the folder may be shared


def test_meta_with_wrong_number_of_names_is_rejected(tmp_path):
    write_cifar10(tmp_path)
    meta = tmp_path / "cifar-10-batches-py" / "batches.meta"
    _dump(meta, {"label_names": C10_NAMES[:9]}, "py2")
    with pytest.raises(ValueError, match="'label_names' has 9 names, expected 10") as err:
        load_cifar("cifar10", tmp_path, "train")
    assert str(meta) in str(err.value)


@pytest.mark.parametrize("names", [None, "airplane", [1] * 10])
def test_meta_whose_names_are_not_a_list_of_strings_is_rejected(tmp_path, names):
    write_cifar10(tmp_path)
    _dump(tmp_path / "cifar-10-batches-py" / "batches.meta", {"label_names": names}, "py2")
    with pytest.raises(ValueError, match="'label_names' must be a list of class names"):
        load_cifar("cifar10", tmp_path, "train")


def test_cifar100_meta_without_fine_names_is_rejected(tmp_path):
    write_cifar100(tmp_path)
    _dump(tmp_path / "cifar-100-python" / "meta", {"coarse_label_names": ["a"] * 20}, "protocol4")
    with pytest.raises(ValueError, match="key 'fine_label_names' is missing"):
        load_cifar("cifar100", tmp_path, "test")


@pytest.mark.parametrize(
    "payload,problem",
    [
        (b"not a pickle at all", "cannot be unpickled"),
        (b"", "cannot be unpickled"),
        (pickle.dumps([1, 2]), "holds a list"),
        (b"\x80\x05\x96" + b"\xff" * 8, r"cannot be unpickled \(OverflowError"),  # a damaged length field
    ],
)
def test_unreadable_or_non_dict_file_is_rejected(tmp_path, payload, problem):
    write_cifar10(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    bad.write_bytes(payload)
    with pytest.raises(ValueError, match=problem) as err:
        load_cifar("cifar10", tmp_path, "train")
    assert str(bad) in str(err.value)


def test_missing_folder_message_names_path_files_and_both_remedies(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_cifar("cifar10", tmp_path, "train")
    message = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert str((tmp_path / "cifar-10-batches-py").resolve()) in message
    assert "data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5, batches.meta" in message
    assert "data.download=true" in message and "163 MB" in message
    assert "LT_DATA_ROOT" in message and "data.root" in message


def test_missing_single_file_is_the_only_one_listed(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"missing: data_batch_4\. "):
        load_cifar("cifar10", tmp_path, "train")
    assert load_cifar("cifar10", tmp_path, "test").images.shape[0] == ROWS


@pytest.mark.parametrize(
    "error",
    [
        urllib.error.URLError("[Errno -3] Temporary failure in name resolution"),
        TimeoutError("timed out"),
        RuntimeError("File not found or corrupted."),
    ],
)
def test_offline_download_is_a_dataset_error_with_url_reason_and_fix(tmp_path, monkeypatch, error):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fail)
    with pytest.raises(DatasetNotFoundError) as err:  # a user error: one line at the command line
        load_cifar("cifar100", tmp_path, "train", download=True)
    message = str(err.value)
    assert "CIFAR-100 could not be downloaded from https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in message
    assert str(error) in message
    assert "network" in message and str(tmp_path / "cifar-100-python") in message
    assert err.value.__cause__ is error


def test_download_true_with_valid_folder_does_not_touch_network(tmp_path, monkeypatch):
    write_cifar10(tmp_path)

    def must_not_run(*args, **kwargs):
        raise AssertionError("download was attempted although the data is present")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", must_not_run)
    assert load_cifar("cifar10", tmp_path, "train", download=True).images.shape[0] == 100


def test_download_fetches_official_archive_with_md5_then_loads(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, download_root, md5=None, **kwargs):
        calls.append((url, Path(download_root), md5))
        write_cifar10(Path(download_root))

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake_download)
    split = load_cifar("cifar10", tmp_path, "test", download=True)
    official = ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", tmp_path, "c58f30108f718f92721af3b95e74349a")
    assert calls == [official]
    assert split.images.shape == (ROWS, 3, 32, 32)
