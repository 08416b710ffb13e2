"""Reading image-file datasets (split lists and class folders), decoding and transforms, on tiny real files."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import encode_jpeg, encode_png

from data.cifar import DatasetFormatError, DatasetNotFoundError
from data.image_files import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LIST_DATASETS,
    ImageFileDataset,
    ImageList,
    decode_rgb,
    eval_transform,
    read_folder_split,
    read_list_split,
    train_transform,
)


def write_jpeg(path: Path, seed: int = 0, size: tuple[int, int] = (40, 56)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    path.write_bytes(encode_jpeg(image).numpy().tobytes())
    return path


def write_png(path: Path, image: torch.Tensor) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(image).numpy().tobytes())
    return path


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
        write_jpeg(root / rel)
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
    write_jpeg(tmp_path / "root" / "train/n01/a.JPEG")
    write_list(tmp_path / "lists", "ImageNet_LT_train.txt", "\ufefftrain/n01/a.JPEG 3\n")
    split = read_list_split("imagenet_lt", "train", tmp_path / "lists", tmp_path / "root")
    assert split.paths == [(tmp_path / "root").resolve() / "train/n01/a.JPEG"] and split.labels.tolist() == [3]


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


def test_missing_listed_image_names_list_file_line_and_image(tmp_path):
    root = tmp_path / "places"
    write_jpeg(root / "a.jpg")
    list_file = write_list(tmp_path, "Places_LT_train.txt", "a.jpg 0\nmissing/b.jpg 1\n")
    with pytest.raises(DatasetNotFoundError) as err:
        read_list_split("places_lt", "train", tmp_path, root)
    assert str(err.value).startswith(f"{list_file}:2: image {root.resolve() / 'missing/b.jpg'} does not exist")
    # Without the check the list is read as is.
    split = read_list_split("places_lt", "train", tmp_path, root, check_files=False)
    assert split.labels.tolist() == [0, 1]


# --- class folders ---------------------------------------------------------------------------------


def test_folder_classes_are_indexed_by_sorted_name_and_files_sorted(tmp_path):
    for rel in ("zebra/2.jpg", "zebra/1.PNG", "Ant/x.jpeg", "cat/b.webp", "cat/a.jpg"):
        write_jpeg(tmp_path / "train" / rel)
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
    write_jpeg(tmp_path / "train" / "cat" / "a.jpg")
    (tmp_path / "train" / "cat" / "b.bmp").write_bytes(b"BM")
    with caplog.at_level(logging.WARNING, logger="data.image_files"):
        split = read_folder_split(tmp_path, "train")
    assert len(split.paths) == 1
    assert "skipped 1 entries" in caplog.text and "cat/b.bmp" in caplog.text


def test_test_folders_are_mapped_onto_training_classes(tmp_path):
    for rel in ("a/1.jpg", "b/1.jpg", "c/1.jpg"):
        write_jpeg(tmp_path / "train" / rel)
    for rel in ("c/1.jpg", "a/1.jpg", "a/2.jpg"):  # class b has no test images
        write_jpeg(tmp_path / "test" / rel)
    train = read_folder_split(tmp_path, "train")

    test = read_folder_split(tmp_path, "test", train.class_names)

    assert test.class_names == ["a", "b", "c"]
    assert test.labels.tolist() == [0, 0, 2]
    # Read on their own, the test folders would number c as 1.
    assert read_folder_split(tmp_path, "test").labels.tolist() == [0, 0, 1]


def test_absent_val_folder_gives_none(tmp_path):
    write_jpeg(tmp_path / "train" / "a" / "1.jpg")
    assert read_folder_split(tmp_path, "val", ["a"]) is None


def test_absent_train_folder_is_not_found_naming_it(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=rf"{tmp_path.resolve() / 'train'} is not a folder"):
        read_folder_split(tmp_path, "train")


def test_class_only_in_test_is_a_format_error_naming_it(tmp_path):
    write_jpeg(tmp_path / "test" / "a" / "1.jpg")
    write_jpeg(tmp_path / "test" / "dog" / "1.jpg")
    with pytest.raises(DatasetFormatError) as err:
        read_folder_split(tmp_path, "test", ["a", "b"])
    where = tmp_path.resolve() / "test" / "dog"
    assert str(err.value).startswith(f"{where}: class 'dog' has no folder in the training")


def test_empty_class_folder_is_a_format_error_naming_it(tmp_path):
    write_jpeg(tmp_path / "train" / "a" / "1.jpg")
    (tmp_path / "train" / "b").mkdir()
    (tmp_path / "train" / "b" / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetFormatError) as err:
        read_folder_split(tmp_path, "train")
    assert str(err.value).startswith(f"{tmp_path.resolve() / 'train' / 'b'}: class folder holds no images")


def test_split_folder_without_class_folders_is_a_format_error(tmp_path):
    write_jpeg(tmp_path / "train" / "loose.jpg")
    with pytest.raises(DatasetFormatError, match=r"has no class folders"):
        read_folder_split(tmp_path, "train")


# --- decoding --------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"not an image at all", b"", b"\xff\xd8\xff\xe0 truncated jpeg"])
def test_corrupt_image_is_a_format_error_naming_the_file(tmp_path, content):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(DatasetFormatError) as err:
        decode_rgb(path)
    message = str(err.value)
    assert message.startswith(f"cannot decode image {path}: ")
    assert message.endswith("; re-download or remove it.")
    assert "\n" not in message and ".cpp" not in message


def _half_a_png(path):
    write_png(path, torch.zeros(3, 20, 20, dtype=torch.uint8))
    path.write_bytes(path.read_bytes()[:60])


@pytest.mark.parametrize("make, reason", [
    (lambda p: p.write_bytes(b"hello, not an image"), "not a JPEG, PNG, WebP or GIF image; "),
    (_half_a_png, ""),  # the decoder's own words, which change with its version (torchvision 0.29: "Out of bound read")
])
def test_a_decoder_error_reads_as_its_reason_without_torchvision_s_source_or_advice(tmp_path, make, reason):
    path = tmp_path / "x.png"
    make(path)
    with pytest.raises(DatasetFormatError) as err:
        decode_rgb(path)
    message = str(err.value)
    assert message.startswith(f"cannot decode image {path}: {reason}")
    assert message.endswith("; re-download or remove it.")
    assert ".cpp" not in message and "decode_avif" not in message and "\n" not in message


def test_a_folder_listed_as_an_image_is_named_as_a_folder(tmp_path):
    (tmp_path / "a.jpg").mkdir()
    with pytest.raises(DatasetFormatError, match=rf"^image {tmp_path / 'a.jpg'} is a folder, not an image file"):
        decode_rgb(tmp_path / "a.jpg")


def test_missing_image_at_decode_is_not_found(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=rf"image {tmp_path / 'gone.jpg'} does not exist"):
        decode_rgb(tmp_path / "gone.jpg")


def test_grayscale_png_decodes_to_three_equal_channels(tmp_path):
    gray = torch.arange(35, dtype=torch.uint8).reshape(1, 5, 7) * 7
    image = decode_rgb(write_png(tmp_path / "g.png", gray))
    assert image.dtype == torch.uint8
    assert torch.equal(image, gray.expand(3, 5, 7))


def test_rgba_png_drops_alpha_exactly(tmp_path):
    rgba = np.random.default_rng(1).integers(0, 256, size=(6, 3, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert torch.equal(decode_rgb(tmp_path / "rgba.png"), torch.from_numpy(rgba[..., :3]).permute(2, 0, 1))


def test_16_bit_png_decodes_to_uint8(tmp_path):
    Image.fromarray(np.full((4, 5), 65535, dtype=np.uint16)).save(tmp_path / "deep.png")
    image = decode_rgb(tmp_path / "deep.png")
    assert image.dtype == torch.uint8
    assert torch.equal(image, torch.full((3, 4, 5), 255, dtype=torch.uint8))


# --- transforms ------------------------------------------------------------------------------------


def expected_normalised(colour: tuple[int, int, int], size: int) -> torch.Tensor:
    c = torch.tensor(colour, dtype=torch.float32).view(3, 1, 1) / 255
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((c - mean) / std).expand(3, size, size)


def test_eval_transform_of_constant_image_is_exactly_normalised_colour():
    colour = (10, 128, 250)
    image = torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1).expand(3, 50, 90).contiguous()
    out = eval_transform(32)(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected_normalised(colour, 32), rtol=0, atol=1e-6)


def test_eval_transform_resizes_shorter_side_by_256_over_224_then_centre_crops():
    # Resizing 512 -> 256 and cropping the centre 224 keeps exactly the middle 448 of 512 pixels.
    image = torch.zeros(3, 512, 512, dtype=torch.uint8)
    image[:, 32:480, 32:480] = 255
    out = eval_transform(224)(image)
    assert out.shape == (3, 224, 224)
    white, black = expected_normalised((255, 255, 255), 224), expected_normalised((0, 0, 0), 224)
    # Inside: pure white. Outermost pixels: the antialiasing filter blends in some of the black
    # border just outside the crop (a smaller resize would show black, a larger one pure white).
    torch.testing.assert_close(out[:, 1:-1, 1:-1], white[:, 1:-1, 1:-1], rtol=0, atol=1e-6)
    for edge in (out[:, 0, :], out[:, -1, :], out[:, :, 0], out[:, :, -1]):
        assert bool(((edge > black[:, 0, :] + 0.5) & (edge < white[:, 0, :] - 0.1)).all())


def test_train_transform_gives_float_square_in_normalised_range():
    image = torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = train_transform(24)(image)
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    low, high = expected_normalised((0, 0, 0), 1), expected_normalised((255, 255, 255), 1)
    assert bool(((out >= low - 1e-6) & (out <= high + 1e-6)).all())


def test_train_transform_is_the_decoupling_imagenet_lt_pipeline():
    crop, flip, jitter, to_float, normalize = train_transform(224).transforms
    assert (crop.size, crop.scale, crop.antialias) == ((224, 224), (0.08, 1.0), True)
    assert flip.p == 0.5
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == ((0.6, 1.4),) * 3 + (None,)
    assert (to_float.dtype, to_float.scale) == (torch.float32, True)
    assert (normalize.mean, normalize.std) == (list(IMAGENET_MEAN), list(IMAGENET_STD))


@pytest.mark.parametrize("size", [0, -3, 2.5, True])
def test_transform_size_must_be_a_positive_int(size):
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        train_transform(size)
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        eval_transform(size)


# --- dataset ---------------------------------------------------------------------------------------


@pytest.fixture
def two_image_dataset(tmp_path) -> ImageFileDataset:
    paths = [write_jpeg(tmp_path / "a.jpg", seed=0, size=(48, 64)), write_jpeg(tmp_path / "b.jpg", seed=1)]
    images = ImageList(paths=paths, labels=torch.tensor([3, 7]), class_names=[str(c) for c in range(8)])
    return ImageFileDataset(images, train_transform(32))


def test_dataset_length_and_labels(two_image_dataset):
    assert len(two_image_dataset) == 2
    image, label = two_image_dataset[1]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert type(label) is int and label == 7


def test_same_index_and_seed_give_identical_tensors(two_image_dataset):
    first, label = two_image_dataset[(0, 1234)]
    torch.manual_seed(99)  # whatever the global RNG state of the worker, the sample is the same
    second, _ = two_image_dataset[(0, 1234)]
    assert label == 3
    assert torch.equal(first, second)


def test_different_seeds_give_different_tensors(two_image_dataset):
    samples = [two_image_dataset[(0, seed)][0] for seed in range(4)]
    assert all(not torch.equal(samples[i], samples[j]) for i in range(4) for j in range(i + 1, 4))


def test_seeded_item_leaves_the_global_rng_untouched(two_image_dataset):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    two_image_dataset[(1, 42)]
    assert torch.equal(torch.rand(3), expected)
