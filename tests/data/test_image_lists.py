"""Reading image-file datasets' splits (split lists and class folders), on tiny real files."""

import logging
from pathlib import Path

import pytest
import torch

from data.cifar import DatasetFormatError, DatasetNotFoundError
from data.image_lists import LIST_DATASETS, read_folder_split, read_list_split
from tests.conftest import write_noise_jpeg


def write_list(list_dir: Path, name: str, text: str) -> Path:
    list_dir.mkdir(parents=True, exist_ok=True)
    (list_dir / name).write_text(text)
    return list_dir / name


# --- split lists -----------------------------------------------------------------------------------


def test_list_specs_name_the_published_files_and_class_counts():
    assert {k: (s.num_classes, s.files) for k, s in LIST_DATASETS.items()} == {
        "imagenet_lt": (1000, {"train": "ImageNet_LT_train.txt", "val": "ImageNet_LT_val.txt",
                               "test": "ImageNet_LT_test.txt"}),
        "places_lt": (365, {"train": "Places_LT_train.txt", "val": "Places_LT_val.txt", "test": "Places_LT_test.txt"}),
        "inat2018": (8142, {"train": "iNaturalist18_train.txt", "test": "iNaturalist18_val.txt"}),
    }


def test_list_parsing_gives_absolute_paths_and_labels_in_file_order(tmp_path):
    root = tmp_path / "imagenet"
    for rel in ("train/n01/a.JPEG", "train/n02/b.JPEG", "train/n01/c d.JPEG"):
        write_noise_jpeg(root / rel)
    write_list(tmp_path / "lists", "ImageNet_LT_train.txt",
               "train/n01/a.JPEG 0\n\n  \ntrain/n02/b.JPEG 999\r\ntrain/n01/c d.JPEG 0\n")

    split = read_list_split("imagenet_lt", "train", tmp_path / "lists", root)

    assert split.paths == [root.resolve() / "train/n01/a.JPEG", root.resolve() / "train/n02/b.JPEG",
                           root.resolve() / "train/n01/c d.JPEG"]
    assert all(p.is_absolute() for p in split.paths)
    assert split.labels.dtype == torch.int64
    assert split.labels.tolist() == [0, 999, 0]
    assert split.class_names == [str(c) for c in range(1000)]


def test_a_list_saved_with_a_byte_order_mark_reads_its_first_path_without_it(tmp_path):
    write_noise_jpeg(tmp_path / "root" / "train/n01/a.JPEG")
    write_list(tmp_path / "lists", "ImageNet_LT_train.txt", "\ufefftrain/n01/a.JPEG 3\n")
    split = read_list_split("imagenet_lt", "train", tmp_path / "lists", tmp_path / "root")
    assert split.paths == [(tmp_path / "root").resolve() / "train/n01/a.JPEG"] and split.labels.tolist() == [3]


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_unix_windows_and_old_mac_line_endings_read_alike(tmp_path, newline):
    list_file = tmp_path / "Places_LT_train.txt"
    list_file.write_bytes(newline.join(["a b.jpg 0", "", "c.jpg 1", ""]).encode())
    split = read_list_split("places_lt", "train", tmp_path, tmp_path, check_files=False)
    assert [p.name for p in split.paths] == ["a b.jpg", "c.jpg"] and split.labels.tolist() == [0, 1]


def test_an_image_listed_twice_with_two_labels_is_refused_and_twice_with_one_is_read_twice(tmp_path):
    list_file = write_list(tmp_path, "Places_LT_train.txt", "a.jpg 0\nb.jpg 1\n./a.jpg 0\na.jpg 2\n")
    with pytest.raises(DatasetFormatError, match=rf"^{list_file}:4: image {tmp_path.resolve() / 'a.jpg'} is listed "
                                                 r"with label 2, and with 0 at line 1; replace the file"):
        read_list_split("places_lt", "train", tmp_path, tmp_path, check_files=False)
    write_list(tmp_path, "Places_LT_train.txt", "a.jpg 0\nb.jpg 1\na.jpg 0\n")
    assert read_list_split("places_lt", "train", tmp_path, tmp_path, check_files=False).labels.tolist() == [0, 1, 0]


def test_inat_test_split_reads_the_official_val_list(tmp_path):
    write_list(tmp_path, "iNaturalist18_val.txt", "train_val2018/Aves/3124/x.jpg 8141\n")
    split = read_list_split("inat2018", "test", tmp_path, tmp_path / "root", check_files=False)
    assert split.paths == [(tmp_path / "root").resolve() / "train_val2018/Aves/3124/x.jpg"]
    assert split.labels.tolist() == [8141]
    assert len(split.class_names) == 8142


def test_unknown_dataset_or_split_lists_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"'cub'.*\['imagenet_lt', 'inat2018', 'places_lt'\]"):
        read_list_split("cub", "train", tmp_path, tmp_path)
    with pytest.raises(ValueError, match=r"no split 'val'.*\['train', 'test'\]"):
        read_list_split("inat2018", "val", tmp_path, tmp_path)


def test_missing_list_file_names_the_path_and_where_lists_come_from(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        read_list_split("places_lt", "val", tmp_path / "lists", tmp_path)
    message = str(err.value)
    assert str(tmp_path / "lists" / "Places_LT_val.txt") in message
    assert "classifier-balancing" in message and "data/" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "line, problem",
    [
        ("train/a.jpg", "expected 'relative/path.jpg label'"),
        ("train/a.jpg zero", "label 'zero' is not an integer"),
        ("train/a.jpg 1.0", "label '1.0' is not an integer"),
        ("train/a.jpg 1_0", "label '1_0' is not an integer"),
        ("train/a.jpg 365", "label 365 is outside [0, 365)"),
        ("train/a.jpg -1", "label -1 is outside [0, 365)"),
    ],
)
def test_malformed_list_line_is_a_format_error_naming_file_and_line(tmp_path, line, problem):
    list_file = write_list(tmp_path, "Places_LT_train.txt", f"train/b.jpg 3\n\n{line}\n")
    with pytest.raises(DatasetFormatError) as err:
        read_list_split("places_lt", "train", tmp_path, tmp_path, check_files=False)
    message = str(err.value)
    assert message.startswith(f"{list_file}:3: {problem}")
    assert "\n" not in message


def test_non_utf8_list_line_is_a_format_error_naming_file_and_line(tmp_path):
    list_file = tmp_path / "Places_LT_test.txt"
    list_file.write_bytes(b"a.jpg 1\nb\xff.jpg 2\n")
    with pytest.raises(DatasetFormatError, match=rf"^{list_file}:2: not UTF-8 text"):
        read_list_split("places_lt", "test", tmp_path, tmp_path, check_files=False)


def test_empty_list_is_a_format_error(tmp_path):
    list_file = write_list(tmp_path, "Places_LT_test.txt", "\n\n")
    with pytest.raises(DatasetFormatError, match=rf"^{list_file} lists no images"):
        read_list_split("places_lt", "test", tmp_path, tmp_path, check_files=False)


def test_every_missing_listed_image_is_counted_in_the_one_error(tmp_path):
    """A partly extracted archive: one run names the first gap and counts the others, not one rerun per file."""
    write_noise_jpeg(tmp_path / "a.jpg")
    list_file = write_list(tmp_path, "Places_LT_train.txt", "x.jpg 0\na.jpg 0\ny.jpg 1\nz.jpg 1\n")
    with pytest.raises(DatasetNotFoundError) as err:
        read_list_split("places_lt", "train", tmp_path, tmp_path)
    assert str(err.value).startswith(f"{list_file}:1: image {tmp_path.resolve() / 'x.jpg'} does not exist (and 2 "
                                     f"more of its 4 images, e.g. line 4); point data.root at the folder")


def test_missing_listed_image_names_list_file_line_and_image(tmp_path):
    root = tmp_path / "places"
    write_noise_jpeg(root / "a.jpg")
    list_file = write_list(tmp_path, "Places_LT_train.txt", "a.jpg 0\nmissing/b.jpg 1\n")
    with pytest.raises(DatasetNotFoundError) as err:
        read_list_split("places_lt", "train", tmp_path, root)
    assert str(err.value).startswith(f"{list_file}:2: image {root.resolve() / 'missing/b.jpg'} does not exist; ")
    # Without the check the list is read as is.
    split = read_list_split("places_lt", "train", tmp_path, root, check_files=False)
    assert split.labels.tolist() == [0, 1]


# --- class folders ---------------------------------------------------------------------------------


def test_folder_classes_are_indexed_by_sorted_name_and_files_sorted(tmp_path):
    for rel in ("zebra/2.jpg", "zebra/1.PNG", "Ant/x.jpeg", "cat/b.webp", "cat/a.jpg"):
        write_noise_jpeg(tmp_path / "train" / rel)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "cat" / "._a.jpg").write_bytes(b"macOS resource fork")
    (tmp_path / "train" / ".cache").mkdir()

    split = read_folder_split(tmp_path, "train")

    assert split.class_names == ["Ant", "cat", "zebra"]  # code-point order: upper case first
    assert [p.relative_to(tmp_path.resolve() / "train").as_posix() for p in split.paths] == [
        "Ant/x.jpeg", "cat/a.jpg", "cat/b.webp", "zebra/1.PNG", "zebra/2.jpg"]
    assert split.labels.dtype == torch.int64
    assert split.labels.tolist() == [0, 1, 1, 2, 2]


def test_skipped_non_image_files_are_logged(tmp_path, caplog):
    write_noise_jpeg(tmp_path / "train" / "cat" / "a.jpg")
    (tmp_path / "train" / "cat" / "b.bmp").write_bytes(b"BM")
    with caplog.at_level(logging.WARNING, logger="data.image_lists"):
        split = read_folder_split(tmp_path, "train")
    assert len(split.paths) == 1
    assert "skipped 1 entries" in caplog.text and "cat/b.bmp" in caplog.text


def test_test_folders_are_mapped_onto_training_classes(tmp_path):
    for rel in ("a/1.jpg", "b/1.jpg", "c/1.jpg"):
        write_noise_jpeg(tmp_path / "train" / rel)
    for rel in ("c/1.jpg", "a/1.jpg", "a/2.jpg"):  # class b has no test images
        write_noise_jpeg(tmp_path / "test" / rel)
    train = read_folder_split(tmp_path, "train")

    test = read_folder_split(tmp_path, "test", train.class_names)

    assert test.class_names == ["a", "b", "c"]
    assert test.labels.tolist() == [0, 0, 2]
    # Read on their own, the test folders would number c as 1.
    assert read_folder_split(tmp_path, "test").labels.tolist() == [0, 0, 1]


def test_absent_val_folder_gives_none(tmp_path):
    write_noise_jpeg(tmp_path / "train" / "a" / "1.jpg")
    assert read_folder_split(tmp_path, "val", ["a"]) is None


def test_absent_train_folder_is_not_found_naming_it(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=rf"{tmp_path.resolve() / 'train'} is not a folder"):
        read_folder_split(tmp_path, "train")


def test_class_only_in_test_is_a_format_error_naming_it(tmp_path):
    write_noise_jpeg(tmp_path / "test" / "a" / "1.jpg")
    write_noise_jpeg(tmp_path / "test" / "dog" / "1.jpg")
    with pytest.raises(DatasetFormatError) as err:
        read_folder_split(tmp_path, "test", ["a", "b"])
    where = tmp_path.resolve() / "test" / "dog"
    assert str(err.value).startswith(f"{where}: class 'dog' has no folder in the training")


def test_empty_class_folder_is_a_format_error_naming_it(tmp_path):
    write_noise_jpeg(tmp_path / "train" / "a" / "1.jpg")
    (tmp_path / "train" / "b").mkdir()
    (tmp_path / "train" / "b" / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetFormatError) as err:
        read_folder_split(tmp_path, "train")
    assert str(err.value).startswith(f"{tmp_path.resolve() / 'train' / 'b'}: class folder holds no images")


@pytest.mark.parametrize("split", ["val", "test"])
def test_an_empty_class_folder_of_another_split_is_that_class_without_images_there(tmp_path, split, caplog):
    """As a class whose folder that split lacks: the metrics report such a class as "-"; a split of no images at
    all is refused."""
    write_noise_jpeg(tmp_path / split / "a" / "1.jpg")
    (tmp_path / split / "b").mkdir(parents=True)
    images = read_folder_split(tmp_path, split, ["a", "b"])
    assert [p.name for p in images.paths] == ["1.jpg"] and images.labels.tolist() == [0]
    assert f"1 class folders hold no images (b): those classes have no {split} images" in caplog.text
    (tmp_path / split / "a" / "1.jpg").unlink()
    with pytest.raises(DatasetFormatError, match=rf"^{tmp_path.resolve() / split}: no class folder holds images "):
        read_folder_split(tmp_path, split, ["a", "b"])


def test_split_folder_without_class_folders_is_a_format_error(tmp_path):
    write_noise_jpeg(tmp_path / "train" / "loose.jpg")
    with pytest.raises(DatasetFormatError, match=r"has no class folders"):
        read_folder_split(tmp_path, "train")
