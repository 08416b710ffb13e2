"""torchvision.io's decode (data/image_files.py decode_rgb) against Pillow's convert("RGB") (the papers' code):
the pixels of the first 3,000 JPEGs of ../shared/datasets/cifar10-jpeg.tar.gz, and the time per decode of one
500 x 375 JPEG (quality 90) and its PNG, one thread, the best of 5 rounds of 200 decodes.

    python results/decode_compare/compare.py > results/decode_compare/compare.txt
"""
import io
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, read_file

warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29's notice on its image decoders
torch.set_num_threads(1)
ARCHIVE = Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets" / "cifar10-jpeg.tar.gz"


def pil_rgb(source) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(source).convert("RGB"))).permute(2, 0, 1)  # a writable copy


def same_pixels(limit: int = 3000) -> tuple[int, int]:
    n = differ = 0
    with tarfile.open(ARCHIVE, "r|gz") as tar:
        for member in tar:
            if member.isfile() and n < limit:
                raw = tar.extractfile(member).read()
                ours = decode_image(torch.frombuffer(bytearray(raw), dtype=torch.uint8), mode=ImageReadMode.RGB)
                n, differ = n + 1, differ + int(not torch.equal(ours, pil_rgb(io.BytesIO(raw))))
    return n, differ


def ms_per_decode(decode, rounds: int = 5, count: int = 200) -> float:
    decode()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(count):
            decode()
        best = min(best, (time.perf_counter() - start) / count * 1e3)
    return best


def main() -> None:
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, Pillow {Image.__version__}")
    n, differ = same_pixels()
    print(f"CIFAR-10 JPEGs decoded both ways: {n}, with any pixel different: {differ}")
    smooth = Image.fromarray(np.random.default_rng(0).integers(0, 256, (47, 63, 3), dtype=np.uint8))
    smooth = smooth.resize((500, 375), Image.Resampling.BICUBIC)
    with tempfile.TemporaryDirectory() as tmp:
        for name, kwargs in (("big.jpg", {"quality": 90}), ("big.png", {})):
            path = Path(tmp) / name
            smooth.save(path, **kwargs)
            tv = ms_per_decode(lambda: decode_image(read_file(str(path)), mode=ImageReadMode.RGB))
            pil = ms_per_decode(lambda: pil_rgb(path))
            same = torch.equal(decode_image(read_file(str(path)), mode=ImageReadMode.RGB), pil_rgb(path))
            print(f"{name}: torchvision.io {tv:.2f} ms, Pillow {pil:.2f} ms ({pil / tv:.2f}x), same pixels: {same}")


if __name__ == "__main__":
    main()
