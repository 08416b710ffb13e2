"""Stage-2 features: K cached views in eval mode, cached lookup by index, and the live train-mode path."""
import copy
import os

import numpy as np
import pytest
import torch

from data.augment import BatchAugment
from data.loader import DATA_STREAM, META_VIEW_STREAM, VIEW_STREAM, epoch_generator
from engine.features import VIEW_CHUNK, CachedFeatures, LiveFeatures, compute_views, drop_feature_caches
from models import build_model

MEAN = (0.5, 0.4, 0.3)
STD = (0.2, 0.25, 0.3)
N, H = 5, 16


def _normalize_by_hand(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randint(0, 256, (N, 3, H, H), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def base_model(images) -> torch.nn.Module:
    """A resnet32 whose BatchNorm running stats are not the defaults (so eval != train mode)."""
    torch.manual_seed(0)
    model = build_model("resnet32", 10).train()
    with torch.no_grad():
        for _ in range(3):
            model.forward_features(_normalize_by_hand(images) * 2.0 + 1.0)
    return model


@pytest.fixture
def model(base_model) -> torch.nn.Module:
    m = copy.deepcopy(base_model)
    m.train()  # compute_views must switch to eval itself
    return m


def _eval_features(model, x_uint8) -> torch.Tensor:
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        return ref.forward_features(_normalize_by_hand(x_uint8))


def _bn_state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


# ---------------------------------------------------------------- compute_views


def test_without_augmentation_all_views_equal_the_eval_mode_features(model, images):
    expected = _eval_features(model, images)
    views = compute_views(model, images, None, 3, MEAN, STD, seed=0, stream=0, batch_size=2)  # chunks 2, 2, 1
    assert views.shape == (3, N, 64) and views.dtype == torch.float32
    for k in range(3):
        torch.testing.assert_close(views[k], expected, rtol=1e-5, atol=1e-5)
    # not the train-mode (batch-statistics) features
    with torch.no_grad():
        train_mode = copy.deepcopy(model).train().forward_features(_normalize_by_hand(images))
    assert not torch.allclose(train_mode, expected, atol=1e-3)


def test_augmented_view_k_uses_the_generator_of_seed_and_k(model, images):
    augment = BatchAugment(4, True)
    views = compute_views(model, images, augment, 2, MEAN, STD, seed=7, stream=0, batch_size=N)
    for k in range(2):
        x = BatchAugment(4, True)(images, epoch_generator(7, k))
        torch.testing.assert_close(views[k], _eval_features(model, x), rtol=1e-5, atol=1e-5)


def test_views_draw_from_their_own_stream_never_from_the_data_order_of_another_seed(model, images):
    # A run with seed s must not reuse, for its cached views, the data-order stream of a run with seed s + k.
    firsts = []

    def recording_augment(x, gen):
        firsts.append(torch.rand(4, generator=gen))
        return x

    compute_views(model, images, recording_augment, 2, MEAN, STD, seed=3, stream=VIEW_STREAM, batch_size=N)
    for k in range(2):
        assert torch.equal(firsts[k], torch.rand(4, generator=epoch_generator(3, k, VIEW_STREAM)))
        for other_seed in range(3, 9):
            for stream in (DATA_STREAM, META_VIEW_STREAM):
                assert not torch.equal(firsts[k], torch.rand(4, generator=epoch_generator(other_seed, k, stream)))


def test_augmented_views_differ_from_each_other(model, images):
    views = compute_views(model, images, BatchAugment(4, True), 2, MEAN, STD, seed=7, stream=0, batch_size=2)
    assert not torch.allclose(views[0], views[1], atol=1e-4)


def test_augmented_views_are_reproducible_for_a_seed_and_change_with_it(model, images):
    augment = BatchAugment(4, True)
    a = compute_views(model, images, augment, 2, MEAN, STD, seed=7, stream=0, batch_size=2)
    b = compute_views(model, images, augment, 2, MEAN, STD, seed=7, stream=0, batch_size=2)
    c = compute_views(model, images, augment, 2, MEAN, STD, seed=8, stream=0, batch_size=2)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, atol=1e-4)


def test_compute_views_leaves_batchnorm_running_stats_and_weights_unchanged(model, images):
    before = copy.deepcopy(model.state_dict())
    compute_views(model, images, BatchAugment(4, True), 2, MEAN, STD, seed=1, stream=0, batch_size=2)
    after = model.state_dict()
    assert set(before) == set(after)
    for k in before:
        assert torch.equal(before[k], after[k]), k


# ---------------------------------------------------------------- CachedFeatures


def _distinct_views(k: int, n: int = 6, d: int = 4) -> torch.Tensor:
    # entry (k, i, j) = 100 k + 10 i + j: every row identifies its view and index
    return (100 * torch.arange(k).view(k, 1, 1) + 10 * torch.arange(n).view(1, n, 1)
            + torch.arange(d).view(1, 1, d)).float()


IDX = torch.tensor([5, 0, 0, 3, 2, 5, 1, 4, 4, 0, 3, 2])


def test_cached_row_is_one_of_the_k_views_of_its_index():
    views = _distinct_views(3)
    out = CachedFeatures(views)(IDX, torch.Generator().manual_seed(0))
    assert out.shape == (len(IDX), 4)
    for row, i in zip(out, IDX.tolist()):
        assert any(torch.equal(row, views[k, i]) for k in range(3))


def test_cached_view_choice_is_randint_k_from_the_generator():
    views = _distinct_views(3)
    k = torch.randint(3, (len(IDX),), generator=torch.Generator().manual_seed(11))
    expected = torch.stack([views[k[b], IDX[b]] for b in range(len(IDX))])
    out = CachedFeatures(views)(IDX, torch.Generator().manual_seed(11))
    assert torch.equal(out, expected)


def test_cached_views_are_all_used_over_many_draws():
    views = _distinct_views(3)
    idx = torch.zeros(300, dtype=torch.int64)
    out = CachedFeatures(views)(idx, torch.Generator().manual_seed(0))
    assert set((out[:, 0] // 100).long().tolist()) == {0, 1, 2}


def test_single_cached_view_is_exactly_views_zero_at_the_indices():
    views = _distinct_views(1)
    out = CachedFeatures(views)(IDX, torch.Generator().manual_seed(5))
    assert torch.equal(out, views[0, IDX])


# ---------------------------------------------------------------- LiveFeatures


def test_live_features_run_in_train_mode_and_update_batchnorm_but_not_weights(model, images):
    model.eval()
    weights_before = {k: v.clone() for k, v in model.named_parameters()}
    bn_before = _bn_state(model)
    idx = torch.tensor([4, 1, 3])
    live = LiveFeatures(model, images, BatchAugment(4, True), MEAN, STD)
    out = live(idx, torch.Generator().manual_seed(2))

    assert model.training
    assert out.shape == (3, 64) and not out.requires_grad
    bn_after = _bn_state(model)
    changed = [k for k in bn_before if not torch.equal(bn_before[k], bn_after[k])]
    assert "bn1.running_mean" in changed and "bn1.running_var" in changed
    assert bn_after["bn1.num_batches_tracked"].item() == bn_before["bn1.num_batches_tracked"].item() + 1
    for k, v in model.named_parameters():
        assert torch.equal(v, weights_before[k]), k


def test_live_features_are_train_mode_features_of_the_augmented_batch(model, images):
    ref = copy.deepcopy(model).train()
    idx = torch.tensor([4, 1, 3])
    out = LiveFeatures(model, images, BatchAugment(4, True), MEAN, STD)(idx, torch.Generator().manual_seed(2))
    x = BatchAugment(4, True)(images[idx], torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref.forward_features(_normalize_by_hand(x))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_live_features_with_eval_batchnorm_keep_stage1_statistics_and_match_a_cached_view(model, images):
    idx = torch.tensor([4, 1, 3])
    bn_before = _bn_state(model)
    out = LiveFeatures(model, images, BatchAugment(4, True), MEAN, STD, bn_train=False)(
        idx, torch.Generator().manual_seed(2))
    assert not model.training
    bn_after = _bn_state(model)
    assert all(torch.equal(bn_before[k], bn_after[k]) for k in bn_before)
    # The same augmented images through the eval-mode backbone: what compute_views caches.
    x = BatchAugment(4, True)(images[idx], torch.Generator().manual_seed(2))
    expected = compute_views(model, x, None, 1, MEAN, STD, 0, 0, 8)[0]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_live_features_run_the_backbone_under_autocast_with_amp_and_return_fp32(model, images):
    idx = torch.tensor([4, 1, 3])
    out = LiveFeatures(model, images, BatchAugment(4, True), MEAN, STD, bn_train=False, amp="bf16")(
        idx, torch.Generator().manual_seed(2))
    x = BatchAugment(4, True)(images[idx], torch.Generator().manual_seed(2))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model.eval().forward_features(_normalize_by_hand(x)).float()
    fp32 = compute_views(model, x, None, 1, MEAN, STD, 0, 0, 8)[0]
    assert out.dtype == torch.float32 and torch.equal(out, expected) and not torch.equal(out, fp32)
    assert (out - fp32).norm() < 0.05 * fp32.norm()  # bf16's rounding, not another computation


def test_host_half_views_are_the_device_views_in_float16_moved_one_view_at_a_time(model, images):
    # For disk_views: the device never holds more than one view in fp32.
    moved = []
    original = torch.Tensor.to

    def record(t, *args, **kwargs):
        out = original(t, *args, **kwargs)
        if out.dtype == torch.float16:
            moved.append(tuple(t.shape))
        return out

    expected = compute_views(model, images, BatchAugment(4, True, False, 0), 3, MEAN, STD, 0, 0, 8)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "to", record)
        half = compute_views(model, images, BatchAugment(4, True, False, 0), 3, MEAN, STD, 0, 0, 8, host_half=True)
    assert half.dtype == torch.float16 and half.device.type == "cpu" and torch.equal(half, expected.half())
    assert moved == [tuple(expected.shape[1:])] * 3


def test_disk_views_are_computed_once_as_float16_and_memory_mapped_back(tmp_path):
    from engine.features import disk_views

    views = torch.randn(2, 5, 3)
    calls = []

    def compute():
        calls.append(1)
        return views

    path = tmp_path / "features_train.npy"
    first = disk_views(path, compute, writes=True, shape=(2, 5, 3))
    assert path.exists() and not list(tmp_path.glob("*.partial.npy"))
    assert first.dtype == torch.float16 and torch.equal(first, views.half())
    again = disk_views(path, lambda: pytest.fail("recomputed although the file exists"), writes=True, shape=(2, 5, 3))
    assert torch.equal(again, views.half()) and calls == [1]


def _cut_short(path):
    os.truncate(path, path.stat().st_size - 7)


@pytest.mark.parametrize("damage, problem", [
    (lambda p: p.write_bytes(b""), "is empty"),
    (lambda p: p.write_text("hi\n"), "is not a .npy file"),
    (_cut_short, "cannot be read (mmap length is greater than file size)"),
    (lambda p: np.save(p, np.zeros((3, 7), np.float16)),
     "holds a float16 array of shape (3, 7), not float16 (2, 5, 3)"),
    (lambda p: np.save(p, np.zeros((2, 5, 3), np.float32)), "holds a float32 array of shape (2, 5, 3), not float16"),
])
def test_a_damaged_feature_cache_is_computed_again_with_a_warning_and_never_read(tmp_path, caplog, damage, problem):
    """A resumed run whose cache was emptied, cut short or replaced: mapped as it is, a short file would be grown
    with zeros and trained on."""
    from engine.features import disk_views

    views, path = torch.randn(2, 5, 3), tmp_path / "features_train.npy"
    disk_views(path, lambda: views, writes=True, shape=(2, 5, 3))
    damage(path)
    again = disk_views(path, lambda: views, writes=True, shape=(2, 5, 3))
    assert torch.equal(again, views.half())
    assert f"the feature cache {path} {problem}" in caplog.text and "computing it again" in caplog.text
    assert torch.equal(torch.from_numpy(np.load(path)), views.half())  # the file is whole again


def test_a_rank_that_does_not_write_keeps_its_views_in_memory(tmp_path):
    from engine.features import disk_views

    out = disk_views(tmp_path / "f.npy", lambda: torch.ones(1, 2, 2), writes=False, shape=(1, 2, 2))
    assert not (tmp_path / "f.npy").exists() and torch.equal(out, torch.ones(1, 2, 2, dtype=torch.float16))


def test_cached_features_from_disk_come_back_as_float32_on_the_device():
    from engine.features import CachedFeatures

    views = torch.arange(24, dtype=torch.float16).view(2, 4, 3)
    out = CachedFeatures(views, torch.device("cpu"))(torch.tensor([3, 0]), torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and out.shape == (2, 3)
    assert all(any(torch.equal(row, views[k, i].float()) for k in range(2)) for row, i in zip(out, [3, 0]))


def test_views_and_both_feature_paths_run_without_float64_on_the_device(no_float64_on_meta, base_model, images):
    """MPS (Apple GPUs) has no float64 (the meta device stands in for it): augmenting, normalising and
    featurising the views, and drawing cached or live features, make no float64 tensor there."""
    model = copy.deepcopy(base_model).to("meta")
    augment = BatchAugment(4, True, True, 16)
    views = compute_views(model, images, augment, 2, MEAN, STD, 0, VIEW_STREAM, 8)
    assert views.shape == (2, N, model.feature_dim) and views.device.type == "meta"
    indices = torch.tensor([0, 3, 5])
    assert CachedFeatures(views)(indices, torch.Generator()).dtype == torch.float32
    live = LiveFeatures(model, images.to("meta"), augment, MEAN, STD)(indices, torch.Generator())
    assert live.shape == (3, model.feature_dim) and live.dtype == torch.float32


# --- the views under several processes (each rank computes its share; gather_rows stands in for the all-gather) ---

class _MeanFeatures(torch.nn.Module):
    """forward_features: each image's channel means (B, 3)."""
    feature_dim = 3

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward_features(self, x):
        return x.mean((2, 3)) * self.w


class _SeedShowingFiles(torch.utils.data.Dataset):
    """5 'image files' indexed by (index, seed), whose pixels show both: the seed a sample got is visible."""

    def __len__(self):
        return 5

    def __getitem__(self, item):
        index, seed = item
        return torch.full((3, 2, 2), float(index) + (seed % 1000) / 1000.0), 0


def _rank_shares(monkeypatch, images, batch_size: int, chunk: int = VIEW_CHUNK) -> list[torch.Tensor]:
    import engine.features as features
    from engine.distributed import Dist

    shares = []
    monkeypatch.setattr(features, "gather_rows", lambda local, d: (shares.append(local), local)[1])
    for rank in (0, 1):
        compute_views(_MeanFeatures(), images, None, 1, (0.0,) * 3, (1.0,) * 3, 7, 2, batch_size, d=Dist(rank, 2),
                      chunk=chunk)
    return shares


def test_two_ranks_compute_disjoint_shares_of_the_uint8_chunks_that_make_up_the_one_process_view(monkeypatch):
    images = torch.randint(0, 256, (5, 3, 2, 2), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    whole = compute_views(_MeanFeatures(), images, None, 1, (0.0,) * 3, (1.0,) * 3, 7, 2, 2)[0]
    first, second = _rank_shares(monkeypatch, images, 3, chunk=2)
    assert (len(first), len(second)) == (4, 1)  # chunks of 2 images: two for rank 0, one for rank 1
    torch.testing.assert_close(torch.cat([first, second]), whole, rtol=0, atol=0)


def test_two_ranks_give_each_image_file_the_seed_it_gets_in_one_process(monkeypatch):
    whole = compute_views(_MeanFeatures(), _SeedShowingFiles(), None, 1, (0.0,) * 3, (1.0,) * 3, 7, 2, 2)[0]
    first, second = _rank_shares(monkeypatch, _SeedShowingFiles(), 2)
    assert (len(first), len(second)) == (3, 2)
    torch.testing.assert_close(torch.cat([first, second]), whole, rtol=0, atol=0)


def test_chunk_j_of_view_k_is_augmented_with_generator_k_times_chunks_plus_j():
    """5 images in chunks of 2 (3 chunks), 2 views: the 6 generators epoch_generator(seed, 0 ... 5, stream)."""
    draws = []

    def augment(x, generator):
        draws.append(torch.rand(1, generator=generator))
        return x
    compute_views(_MeanFeatures(), torch.zeros(5, 3, 2, 2, dtype=torch.uint8), augment, 2, (0.0,) * 3, (1.0,) * 3,
                  7, VIEW_STREAM, 4, chunk=2)
    expected = [torch.rand(1, generator=epoch_generator(7, i, VIEW_STREAM)) for i in range(6)]
    assert torch.equal(torch.cat(draws), torch.cat(expected))



def test_the_forward_batch_size_never_changes_the_augmented_views(model):
    # eval.batch_size is a speed setting that --resume may change: the views' crops and flips must not follow it.
    images = torch.randint(0, 256, (11, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    augment = BatchAugment(4, True)
    views = {b: compute_views(model, images, augment, 2, MEAN, STD, seed=3, stream=0, batch_size=b, chunk=4)
             for b in (1, 3, 4, 11, 128)}
    for b, v in views.items():
        torch.testing.assert_close(v, views[4], rtol=1e-5, atol=1e-5, msg=f"batch_size {b}")
    chunks = [augment(images[i : i + 4], epoch_generator(3, 3 + j)) for j, i in enumerate(range(0, 11, 4))]
    torch.testing.assert_close(views[3][1], _eval_features(model, torch.cat(chunks)), rtol=1e-5, atol=1e-5)
    assert VIEW_CHUNK == 128  # the default eval.batch_size that made the views before: committed results hold

def test_every_rank_computes_the_disk_views_when_another_rank_lacks_its_file(tmp_path, monkeypatch):
    """Machines without a shared disk: rank 0 has the file, rank 1 not; computing takes collectives, so rank 0
    must compute too (else rank 1 waits in them alone until the timeout)."""
    import engine.features as features
    from engine.distributed import Dist
    from engine.features import disk_views

    path = tmp_path / "features_train.npy"
    disk_views(path, lambda: torch.zeros(1, 2, 2), writes=True, shape=(1, 2, 2))
    monkeypatch.setattr(features, "sum_over_ranks", lambda values, d: [1.0])  # the other rank has no usable file
    calls = []
    disk_views(path, lambda: (calls.append(1), torch.ones(1, 2, 2))[1], writes=True, shape=(1, 2, 2), d=Dist(0, 2))
    assert calls == [1]


def test_the_host_s_memory_is_its_ram_as_proc_meminfo_gives_it():
    from engine.features import memory_bytes

    total_kib = int(open("/proc/meminfo").read().split("MemTotal:")[1].split()[0])
    assert abs(memory_bytes(torch.device("cpu")) - total_kib * 1024) <= 4096


def test_views_that_memory_cannot_hold_twice_over_are_refused_before_any_is_computed(monkeypatch, tmp_path):
    """fp32 on the device (3 x 10 x 4 x 4 bytes = 480, held twice while stacked), float16 on the host with
    host_half (240 bytes), then free disk space for the file disk_views writes."""
    import shutil
    from collections import namedtuple

    import engine.features as features
    from engine.device import DeviceError

    memory = {"cpu": 960, "meta": 959}
    monkeypatch.setattr(features, "memory_bytes", lambda device: memory[device.type])
    features.check_cache_fits((3, 10, 4), torch.device("cpu"))  # exactly fits
    with pytest.raises(DeviceError) as e:
        features.check_cache_fits((3, 10, 4), torch.device("meta"))
    assert str(e.value) == ("stage2.cache_views=3 makes 3 x 10 x 4 features, 0.0 GB, held twice while they are "
                            "stacked: more than the 0.0 GB of meta: lower stage2.cache_views (0 = the backbone on "
                            "every batch)")
    memory["cpu"] = 479
    with pytest.raises(DeviceError, match="more than the 0.0 GB of host memory"):
        features.check_cache_fits((3, 10, 4), torch.device("meta"), host_half=True)  # float16 goes to the host
    memory["cpu"] = 480
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 239, 239))
    features.check_cache_fits((3, 10, 4), torch.device("meta"), host_half=True)  # no disk: a rank that keeps them
    with pytest.raises(DeviceError, match=rf"^stage2.cache_views=3 makes 3 x 10 x 4 features, 0.0 GB on disk: more "
                                          rf"than the 0.0 GB free under {tmp_path}: free space or lower"):
        features.check_cache_fits((3, 10, 4), torch.device("meta"), host_half=True, disk=tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 240, 240))
    features.check_cache_fits((3, 10, 4), torch.device("meta"), host_half=True, disk=tmp_path)


def test_a_refused_cache_names_its_size_and_the_memory_in_gigabytes_of_1e9_bytes(monkeypatch):
    import engine.features as features
    from engine.device import DeviceError

    monkeypatch.setattr(features, "memory_bytes", lambda device: 7_999_999_999)
    with pytest.raises(DeviceError) as e:
        features.check_cache_fits((1, 1_000_000, 1000), torch.device("meta"))  # 4e9 bytes of fp32
    assert str(e.value).startswith("stage2.cache_views=1 makes 1 x 1000000 x 1000 features, 4.0 GB, held twice while "
                                   "they are stacked: more than the 8.0 GB of meta:")


def test_a_host_that_cannot_tell_its_memory_is_not_checked_against_it(monkeypatch):
    import engine.features as features

    def sysconf(name):  # as os.sysconf answers a name the system does not define
        raise ValueError("unrecognized configuration name")
    monkeypatch.setattr(os, "sysconf", sysconf)
    assert features.memory_bytes(torch.device("cpu")) is None
    features.check_cache_fits((1, 1_000_000, 1000), torch.device("cpu"))


def test_a_new_run_removes_the_feature_caches_a_dead_start_left_and_nothing_else(tmp_path):
    """The cached views of a start that died before its first last.pt (features_train.npy, features_meta.npy: maybe
    of another backbone with the same shape, which no shape check would catch) are removed by rank 0 alone."""
    names = ("features_train.npy", "features_meta.npy", "train.log", "features.npy")
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    drop_feature_caches(tmp_path, writes=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    drop_feature_caches(tmp_path, writes=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.npy", "train.log"]
