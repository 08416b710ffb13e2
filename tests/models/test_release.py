"""Float16 releases of stage-1 runs (models/release.py) and registry entries shipped in models/released/."""
from __future__ import annotations

import pytest
import torch

from config.load import config_to_dict, load_config
from models import build_model, load_pretrained
from models import pretrained as pretrained_module
from models import release
from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models.download import file_sha256
from models.pretrained import resolve, training_run
from models.zoo import PRETRAINED, PretrainedEntry

MAX_BYTES = 1.5 * 2**20  # a shipped release stays small enough for the repository


def _stage1_checkpoint(path, stage="stage1"):
    torch.manual_seed(0)
    model = build_model("resnet32", 10)
    cfg = load_config(None, ["data.imbalance_factor=100", "name=run"] +
                      (["stage1.checkpoint=x.pt"] if stage == "stage2" else []))
    save_checkpoint(path, {"model": model.state_dict(), "model_args": {"name": "resnet32", "num_classes": 10},
                           "class_counts": [50] * 10, "class_names": [f"c{i}" for i in range(10)],
                           "config": config_to_dict(cfg, stage), "optimizer": {"state": {}}, "step": 7,
                           "normalization": {"mean": [0.5, 0.4, 0.3], "std": [0.3, 0.2, 0.25]}})
    return model.state_dict()


def test_release_keeps_weights_in_float16_and_what_stage2_reads_but_no_optimiser(tmp_path):
    state = _stage1_checkpoint(tmp_path / "last.pt")
    sha256, size = release.write_release(tmp_path / "last.pt", tmp_path / "r.pt")
    assert sha256 == file_sha256(tmp_path / "r.pt") and size == (tmp_path / "r.pt").stat().st_size
    assert size < 0.6 * (tmp_path / "last.pt").stat().st_size
    r = load_checkpoint(tmp_path / "r.pt")
    assert "optimizer" not in r and r["released_from"] == {"run": "run", "step": 7}
    assert r["class_counts"] == [50] * 10 and r["config"]["data"]["imbalance_factor"] == 100
    assert r["normalization"] == {"mean": [0.5, 0.4, 0.3], "std": [0.3, 0.2, 0.25]}  # stage 2 and --test read it
    for k, v in state.items():
        if v.is_floating_point():
            assert r["model"][k].dtype == torch.float16 and torch.equal(r["model"][k], v.half()), k
        else:
            assert torch.equal(r["model"][k], v), k
    model = load_pretrained(str(tmp_path / "r.pt"))  # a float32 model again, weights within float16 rounding
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.equal(model.state_dict()["conv1.weight"], state["conv1.weight"].half().float())


def test_a_stage2_checkpoint_or_an_import_is_not_released(tmp_path):
    _stage1_checkpoint(tmp_path / "s2.pt", stage="stage2")
    with pytest.raises(CheckpointError, match="is a stage-2 checkpoint: release the stage-1 run"):
        release.write_release(tmp_path / "s2.pt", tmp_path / "r.pt")
    save_checkpoint(tmp_path / "imported.pt", {"model": {}, "model_args": {"name": "resnet32"}, "config": None})
    with pytest.raises(CheckpointError, match="lacks class_counts, class_names, config: release a checkpoint"):
        release.write_release(tmp_path / "imported.pt", tmp_path / "r.pt")
    assert not (tmp_path / "r.pt").exists()


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    """A release shipped in a stand-in models/released/ with its registry entry."""
    folder = tmp_path / "models" / "released"
    _stage1_checkpoint(tmp_path / "last.pt")
    sha256, _ = release.write_release(tmp_path / "last.pt", folder / "r32.pt")
    monkeypatch.setattr(release, "RELEASED_DIR", folder)
    entry = PretrainedEntry("r32.pt", sha256, "resnet32", "cifar10_lt_if100", 10, "lt-decoupled")
    monkeypatch.setitem(PRETRAINED, "r32_test", entry)
    return folder / "r32.pt"


def test_a_shipped_release_resolves_offline_and_stage2_reads_its_run(shipped, tmp_path):
    cache = tmp_path / "empty_cache"
    assert resolve("r32_test", cache=cache)[0] == shipped and not cache.exists()  # nothing downloaded
    run = training_run("r32_test", cache=cache)
    assert run["config"]["data"]["imbalance_factor"] == 100 and run["class_counts"] == [50] * 10
    assert load_pretrained("r32_test", cache=cache).head.out_features == 10


def test_a_changed_or_missing_shipped_file_is_refused_and_kept(shipped):
    shipped.write_bytes(shipped.read_bytes()[:-1] + b"x")
    with pytest.raises(CheckpointError, match=r"r32_test: .*r32.pt has SHA-256 [0-9a-f]{64}, not the registry's "):
        resolve("r32_test")
    assert shipped.is_file()  # the user's checkout is never deleted, unlike a bad download
    shipped.unlink()
    with pytest.raises(CheckpointError, match=r"the released file .* is missing; restore it with `git checkout --"):
        resolve("r32_test")


def test_training_run_is_none_for_weights_that_are_not_a_stage1_run(tmp_path):
    torch.save(build_model("resnet32", 10).state_dict(), tmp_path / "plain.pth")
    _stage1_checkpoint(tmp_path / "s2.pt", stage="stage2")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert [training_run(str(tmp_path / n)) for n in ("plain.pth", "s2.pt", "junk.pt")] == [None, None, None]


@pytest.mark.parametrize("name", [n for n, e in PRETRAINED.items() if e.shipped])
def test_every_shipped_release_matches_its_entry_and_fits_the_repository(name):
    entry = PRETRAINED[name]
    path, _ = resolve(name)  # SHA-256 checked
    assert path.parent == release.RELEASED_DIR and path.stat().st_size < MAX_BYTES
    ckpt = load_checkpoint(path)
    assert ckpt["model_args"]["name"] == entry.arch and len(ckpt["class_counts"]) == entry.num_classes
    assert isinstance(pretrained_module.load_pretrained(name), torch.nn.Module)


def test_a_release_halves_floating_tensors_and_keeps_integers_exact():
    """BatchNorm's num_batches_tracked past 2048 (float16 rounds it) or 65504 (float16 overflows) stays exact."""
    state = release.half_state({"w": torch.tensor([1.0, 1 / 3]), "bn.num_batches_tracked": torch.tensor(70001)})
    assert state["w"].dtype == torch.float16 and state["w"].tolist() == [1.0, torch.tensor(1 / 3).half().item()]
    assert state["bn.num_batches_tracked"].dtype == torch.int64 and state["bn.num_batches_tracked"].item() == 70001
