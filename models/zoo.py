"""The table of named pretrained checkpoints that `model.pretrained=NAME` and `load_pretrained(NAME)` fetch.

An entry is a direct download URL with the file's SHA-256: the full hex digest `sha256sum` prints,
or, for torchvision's files, the leading hex digits in the file name (`resnet50-0676ba61.pth`),
which torchvision publishes as the digest's prefix and torch.hub checks the same way.

The papers' own CIFAR-LT releases (BALMS, Decoupling, MiSLAS) sit behind Google Drive / OneDrive
pages with no direct link and no published digest, so they are not listed: download them by hand
and pass the path, or convert them once with `python -m models import`.
"""
from __future__ import annotations

from dataclasses import dataclass

URL_SCHEMES = ("http://", "https://")  # an entry or source naming a download


@dataclass(frozen=True)
class PretrainedEntry:
    url: str  # direct http(s) download, or the name of a file shipped in models/released/ (models.release)
    sha256: str  # full hex digest, or its first >= 8 hex digits as published by the file's source
    arch: str  # models.MODELS name the weights fit
    dataset: str  # what the weights were trained on
    num_classes: int  # classes of the checkpoint's classifier (reset the head for others)
    format: str  # models.foreign.LAYOUTS name of the file's layout

    @property
    def shipped(self) -> bool:
        """A file of models/released/ rather than a download."""
        return not self.url.startswith(URL_SCHEMES)


PRETRAINED: dict[str, PretrainedEntry] = {
    # torchvision IMAGENET1K_V1 weights (the URLs torchvision.models.resnet itself uses)
    "resnet18_imagenet": PretrainedEntry("https://download.pytorch.org/models/resnet18-f37072fd.pth",
                                         "f37072fd", "resnet18", "imagenet1k", 1000, "state_dict"),
    "resnet34_imagenet": PretrainedEntry("https://download.pytorch.org/models/resnet34-b627a593.pth",
                                         "b627a593", "resnet34", "imagenet1k", 1000, "state_dict"),
    "resnet50_imagenet": PretrainedEntry("https://download.pytorch.org/models/resnet50-0676ba61.pth",
                                         "0676ba61", "resnet50", "imagenet1k", 1000, "state_dict"),
    "resnet101_imagenet": PretrainedEntry("https://download.pytorch.org/models/resnet101-63fe2227.pth",
                                          "63fe2227", "resnet101", "imagenet1k", 1000, "state_dict"),
    "resnet152_imagenet": PretrainedEntry("https://download.pytorch.org/models/resnet152-394f9c45.pth",
                                          "394f9c45", "resnet152", "imagenet1k", 1000, "state_dict"),
    "resnext50_32x4d_imagenet": PretrainedEntry("https://download.pytorch.org/models/resnext50_32x4d-7cdf4587.pth",
                                                "7cdf4587", "resnext50_32x4d", "imagenet1k", 1000, "state_dict"),
    # this repository's releases (models/released/): the 200-epoch softmax run of
    # config/cifar10_lt/methods_if100_exp/ce.yaml, 65.7 % test top-1 (results/full_cifar10_lt_if100/)
    "resnet32_cifar10_lt_if100_ce": PretrainedEntry(
        "resnet32_cifar10_lt_if100_ce.pt", "cba707579eaf3a9190cf44c89cd5250c0c5c44d6f41bd08e14bbc7bea2428717",
        "resnet32", "cifar10_lt_if100", 10, "lt-decoupled"),
    # the 200-epoch end-to-end Balanced Softmax run of config/cifar10_lt/methods_if100_exp/balanced_softmax.yaml,
    # 72.3 % test top-1 (results/full_cifar10_lt_if100/)
    "resnet32_cifar10_lt_if100_balanced_softmax": PretrainedEntry(
        "resnet32_cifar10_lt_if100_balanced_softmax.pt",
        "6b17d59ff794eaa3f6e2eb34c3269cae7d0c3dd59a4e173e3247177cf002998e",
        "resnet32", "cifar10_lt_if100", 10, "lt-decoupled"),
}
