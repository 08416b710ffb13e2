"""Decoding image files and their transforms, on tiny real files."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import encode_png

from data.cifar import DatasetFormatError, DatasetNotFoundError
from data.image_files import IMAGENET_MEAN, IMAGENET_STD, ImageFileDataset, decode_rgb, eval_transform, train_transform
from data.image_lists import ImageList
from tests.conftest import write_noise_jpeg


def write_png(path: Path, image: torch.Tensor) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(image).numpy().tobytes())
    return path


# --- decoding --------------------------------------------------------------------------------------


# Not "remove it": a run then has another training set, which --resume refuses.
RESTORE_ADVICE = ("; restore it from the dataset's source (without it the training set is another, which --resume "
                  "refuses: a run on it starts anew).")


@pytest.mark.parametrize("content", [b"not an image at all", b"", b"\xff\xd8\xff\xe0 truncated jpeg"])
def test_corrupt_image_is_a_format_error_naming_the_file(tmp_path, content):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(DatasetFormatError) as err:
        decode_rgb(path)
    message = str(err.value)
    assert message.startswith(f"cannot decode image {path}: ")
    assert message.endswith(RESTORE_ADVICE)
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
    assert message.endswith(RESTORE_ADVICE)
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


def test_16_bit_grayscale_is_scaled_to_8_bits_where_pillow_s_convert_clips_it_white(tmp_path):
    Image.fromarray(np.array([[4096, 32768, 65535]], dtype=np.uint16)).save(tmp_path / "deep.png")
    assert decode_rgb(tmp_path / "deep.png")[:, 0].tolist() == [[16, 128, 255]] * 3
    with Image.open(tmp_path / "deep.png") as im:
        assert np.array(im.convert("RGB"))[0, :, 0].tolist() == [255, 255, 255]


def test_an_animated_gif_decodes_to_its_first_frame_as_pillow_reads_it(tmp_path):
    frames = [Image.fromarray(np.full((4, 6, 3), v, dtype=np.uint8)) for v in (0, 255, 128)]
    frames[0].save(tmp_path / "anim.jpg", format="GIF", save_all=True, append_images=frames[1:])  # under a .jpg name
    with Image.open(tmp_path / "anim.jpg") as im:
        assert im.n_frames == 3
        expected = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(decode_rgb(tmp_path / "anim.jpg"), expected)  # (3, 4, 6): one frame


def test_cmyk_jpeg_decodes_to_the_rgb_that_pillow_converts_it_to(tmp_path):
    # ImageNet's training set holds CMYK JPEGs; the papers' loaders read them with Pillow's convert("RGB").
    rgb = np.random.default_rng(2).integers(0, 256, size=(16, 24, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    with Image.open(tmp_path / "cmyk.jpg") as im:
        assert im.mode == "CMYK"
        expected = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(decode_rgb(tmp_path / "cmyk.jpg"), expected)


def test_palette_png_and_a_png_named_jpg_decode_to_their_rgb_pixels(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 256, size=(5, 6, 3), dtype=np.uint8)
    palette = Image.fromarray(rgb).convert("P")
    palette.save(tmp_path / "palette.png")
    Image.fromarray(rgb).save(tmp_path / "really_a_png.jpg", format="PNG")
    assert torch.equal(decode_rgb(tmp_path / "palette.png"),
                       torch.from_numpy(np.array(palette.convert("RGB"))).permute(2, 0, 1))
    assert torch.equal(decode_rgb(tmp_path / "really_a_png.jpg"), torch.from_numpy(rgb).permute(2, 0, 1))


def test_an_exif_orientation_tag_is_not_applied_as_pillow_s_open_does_not_apply_it(tmp_path):
    rgb = np.random.default_rng(4).integers(0, 256, size=(16, 24, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(rgb).save(tmp_path / "rotated.jpg", quality=95, exif=exif)
    with Image.open(tmp_path / "rotated.jpg") as im:
        assert im.getexif()[0x0112] == 6
        expected = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
    assert expected.shape == (3, 16, 24)
    assert torch.equal(decode_rgb(tmp_path / "rotated.jpg"), expected)


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


def test_train_transform_without_flip_leaves_only_the_flip_out():
    kinds = [type(t).__name__ for t in train_transform(224, flip=False).transforms]
    assert kinds == ["RandomResizedCrop", "ColorJitter", "ToDtype", "Normalize"]


@pytest.mark.parametrize("size", [0, -3, 2.5, True])
def test_transform_size_must_be_a_positive_int(size):
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        train_transform(size)
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        eval_transform(size)


# --- dataset ---------------------------------------------------------------------------------------


@pytest.fixture
def two_image_dataset(tmp_path) -> ImageFileDataset:
    paths = [write_noise_jpeg(tmp_path / "a.jpg", seed=0, size=(48, 64)), write_noise_jpeg(tmp_path / "b.jpg", seed=1)]
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
