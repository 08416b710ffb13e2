"""Registry names and URLs resolve through the download cache (loopback server); the registry table is sound."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from models import MODELS, load_pretrained
from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models.download import SHA256_HEX, cache_path
from models.foreign import LAYOUTS
from models.heads import CosineLinear
from models.pretrained import import_checkpoint
from models.registry import build_model
from models.release import RELEASED_DIR
from models.zoo import PRETRAINED, PretrainedEntry


@pytest.fixture(scope="module")
def source() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet32", 10).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def balms_bytes(source, tmp_path) -> bytes:
    """A BALMS final_model_checkpoint.pth of `source`, as bytes to serve."""
    state = source.state_dict()
    feat = {f"module.{k}": v for k, v in state.items() if not k.startswith("head.")}
    classifier = {f"module.fc.{k[5:]}": v for k, v in state.items() if k.startswith("head.")}
    path = tmp_path / "final_model_checkpoint.pth"
    torch.save({"epoch": 200, "best_epoch": 200, "best_acc": 0.4, "centroids": None,
                "state_dict_best": {"feat_model": feat, "classifier": classifier}}, path)
    return path.read_bytes()


def _logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(images)


def test_registry_name_downloads_once_checks_and_loads(serve, balms_bytes, source, images, tmp_path, monkeypatch):
    srv = serve(balms_bytes)
    digest = hashlib.sha256(balms_bytes).hexdigest()
    monkeypatch.setitem(PRETRAINED, "tiny_balms", PretrainedEntry(srv.url, digest, "resnet32", "fake", 10, "balms"))
    cache = tmp_path / "cache"
    for _ in range(2):
        model = load_pretrained("tiny_balms", cache=cache)  # the architecture comes from the entry
        assert torch.equal(_logits(model, images), _logits(source, images))
    assert srv.ranges == [None] and cache_path(srv.url, cache).is_file()


def test_registry_entry_with_the_wrong_format_is_reported(serve, balms_bytes, tmp_path, monkeypatch):
    srv = serve(balms_bytes)
    digest = hashlib.sha256(balms_bytes).hexdigest()
    monkeypatch.setitem(PRETRAINED, "tiny", PretrainedEntry(srv.url, digest, "resnet32", "fake", 10, "mislas"))
    with pytest.raises(CheckpointError, match="the registry entry says 'mislas'; the entry in models/zoo.py is wrong"):
        load_pretrained("tiny", cache=tmp_path)


def test_url_pinned_by_sha256_fragment_is_checked(serve, balms_bytes, source, images, tmp_path):
    srv = serve(balms_bytes)
    digest = hashlib.sha256(balms_bytes).hexdigest()
    model = load_pretrained(f"{srv.url}#sha256={digest}", arch="resnet32", cache=tmp_path)
    assert torch.equal(_logits(model, images), _logits(source, images))
    with pytest.raises(CheckpointError, match="only URL fragment understood is #sha256="):
        load_pretrained(f"{srv.url}#md5=abc", arch="resnet32", cache=tmp_path)


def test_a_sha256_fragment_written_with_a_colon_is_told_the_one_form_understood(tmp_path):
    with pytest.raises(CheckpointError, match=r"^http://127.0.0.1:9/r.pt#sha256:0676ba61: the only URL fragment "
                                              r"understood is #sha256=<hex digest of the file>$"):
        load_pretrained("http://127.0.0.1:9/r.pt#sha256:0676ba61", arch="resnet32", cache=tmp_path)


@pytest.mark.parametrize("pin", ["xyz", "abc", "", "0676ba61 "])
def test_malformed_sha256_pin_is_a_checkpoint_error_naming_the_pin_and_the_fix(pin, tmp_path):
    # Port 9 (discard) is never asked: the pin is refused before any download.
    source = f"http://127.0.0.1:9/r.pt#sha256={pin}"
    with pytest.raises(CheckpointError) as err:
        load_pretrained(source, arch="resnet32", cache=tmp_path)
    assert str(err.value) == (f"the pin #sha256={pin} of http://127.0.0.1:9/r.pt is not a SHA-256 digest (8 to 64 "
                              f"hex digits); pin the file with #sha256=<its digest as sha256sum prints it, or the "
                              f"first 8 or more hex digits>, or leave the pin off to download it unchecked")
    assert list(tmp_path.iterdir()) == []


def test_unknown_source_lists_the_registry_names(tmp_path):
    with pytest.raises(CheckpointError) as err:
        load_pretrained(str(tmp_path / "nothing.pth"))
    assert "is not a registry name (resnet18_imagenet, resnet34_imagenet" in str(err.value)
    assert "an http(s) URL or an existing file; `python -m models list`" in str(err.value)  # nothing close to it
    with pytest.raises(CheckpointError, match=r"an existing file \(did you mean resnet18_imagenet or "
                                              r"resnet152_imagenet\?\); `python -m"):
        load_pretrained("resnet18_imagnet")


@pytest.mark.parametrize("name", sorted(PRETRAINED))
def test_registry_entry_is_consistent(name):
    entry = PRETRAINED[name]
    shipped = (RELEASED_DIR / entry.url).is_file()  # a release in models/released/, else a download
    assert (entry.url.startswith("https://") or shipped) and entry.arch in MODELS and entry.format in LAYOUTS
    assert SHA256_HEX.fullmatch(entry.sha256)
    # torchvision publishes the digest prefix in the file name: the entry must carry the same digits
    published = re.search(r"-([0-9a-f]{8,})\.pth$", entry.url)
    assert published is None or published.group(1) == entry.sha256


def test_import_writes_our_checkpoint_with_the_same_weights(balms_bytes, source, images, tmp_path):
    path = tmp_path / "final_model_checkpoint.pth"
    path.write_bytes(balms_bytes)
    out = tmp_path / "imported" / "balms_resnet32.pt"
    import_checkpoint(str(path), out, arch="resnet32")
    ckpt = load_checkpoint(out)
    assert ckpt["model_args"] == {"name": "resnet32", "num_classes": 10, "head": "linear"}
    assert ckpt["layout"] == "balms" and ckpt["config"] is None and ckpt["imported_from"] == str(path)
    assert torch.equal(_logits(load_pretrained(str(out)), images), _logits(source, images))
    assert [p.name for p in Path(out).parent.iterdir()] == ["balms_resnet32.pt"]


def test_checkpoint_with_a_cosine_head_loads_as_one_and_reset_head_picks_the_new_type(images, tmp_path):
    torch.manual_seed(0)
    cosine = build_model("resnet32", 10, head="cosine").eval()
    path = tmp_path / "ldam.pt"
    save_checkpoint(path, {"model": cosine.state_dict(), "model_args": {"name": "resnet32", "num_classes": 10,
                                                                        "head": "cosine"}})
    loaded = load_pretrained(str(path))  # head="linear" is only the type of a reset head
    assert isinstance(loaded.head, CosineLinear) and torch.equal(_logits(loaded, images), _logits(cosine, images))
    fresh = load_pretrained(str(path), num_classes=5, reset_head=True, head="cosine")
    assert isinstance(fresh.head, CosineLinear) and fresh.head.weight.shape == (5, 64)
    relinear = load_pretrained(str(path), num_classes=5, reset_head=True)
    assert type(relinear.head) is nn.Linear
    assert torch.equal(relinear.layer3[4].conv2.weight, cosine.layer3[4].conv2.weight)


NOT_A_CHECKPOINT = b"<html><body>Sign in to download this file</body></html>"


def test_url_that_serves_no_checkpoint_is_removed_from_the_cache_and_fetched_again(serve, tmp_path):
    srv = serve(NOT_A_CHECKPOINT)
    cache = tmp_path / "cache"
    for attempt in (1, 2):
        with pytest.raises(CheckpointError) as err:
            load_pretrained(srv.url, arch="resnet32", cache=cache)
        msg = str(err.value)
        assert msg.startswith(f"{srv.url}: the downloaded file was not a checkpoint (")
        assert "cannot be read as a checkpoint" in msg and "pin it with #sha256=" in msg
        assert "it was removed from the cache, so the next run downloads it again" in msg and "\n" not in msg
        assert list(cache.iterdir()) == []
        assert srv.ranges == [None] * attempt  # each run asks the server again


def test_registry_file_that_is_no_checkpoint_is_removed_and_the_entry_blamed(serve, tmp_path, monkeypatch):
    srv = serve(NOT_A_CHECKPOINT)
    digest = hashlib.sha256(NOT_A_CHECKPOINT).hexdigest()
    monkeypatch.setitem(PRETRAINED, "tiny", PretrainedEntry(srv.url, digest, "resnet32", "fake", 10, "balms"))
    with pytest.raises(CheckpointError) as err:
        load_pretrained("tiny", cache=tmp_path)
    assert str(err.value).startswith(f"{srv.url} (tiny): the downloaded file was not a checkpoint (")
    assert str(err.value).endswith("the entry in models/zoo.py names the wrong file")
    assert list(tmp_path.iterdir()) == []


def test_users_own_file_that_is_no_checkpoint_is_never_deleted(tmp_path):
    path = tmp_path / "mine.pth"  # in the cache folder even: only downloads are removed
    path.write_bytes(NOT_A_CHECKPOINT)
    with pytest.raises(CheckpointError, match="cannot be read as a checkpoint") as err:
        load_pretrained(str(path), arch="resnet32", cache=tmp_path)
    assert "removed" not in str(err.value)
    assert path.read_bytes() == NOT_A_CHECKPOINT
