"""Every experiment YAML in config/ loads, names its own run command, and builds its loss and sampler."""
from dataclasses import asdict
from pathlib import Path

import pytest

from config.load import check_dataset_keys, load_config
from config.schema import STAGE_SCRIPTS
from data.build_files import DATASET_KINDS
from data.samplers import SAMPLERS
from models import MODELS
from models.losses import build_loss

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "config").rglob("*.yaml"))


def test_there_are_configs_for_each_method_on_both_datasets_and_profiles():
    for folder in ("cifar10_lt", "cifar100_lt"):
        for profile in ("exp", "step"):
            names = {p.stem for p in (ROOT / "config" / folder / f"methods_if100_{profile}").glob("*.yaml")}
            assert {"ce", "mixup", "balanced_softmax", "logit_adjust", "cb_softmax", "cb_sigmoid", "cb_focal", "focal",
                    "reweight", "ldam_drw", "arb", "resample_class_balanced", "resample_sqrt",
                    "resample_progressive", "oversample", "undersample"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_loads_for_the_stage_of_its_first_line_which_is_its_own_run_command(path):
    rel = path.relative_to(ROOT).as_posix()
    first = path.read_text().splitlines()[0]
    stage = {f"# python {script} --cfg {rel}": stage for stage, script in STAGE_SCRIPTS.items()}.get(first.split("  ")[0])
    assert stage is not None, first
    cfg = load_config(path, stage=stage)  # no key the other stage alone reads
    if stage == "stage1":  # (stage 2 reads data.dataset from its stage-1 checkpoint first)
        check_dataset_keys(cfg, DATASET_KINDS[cfg.data.dataset])  # nor one another kind of dataset reads
    assert bool(cfg.stage1.checkpoint) == (stage == "stage2")
    assert cfg.model.name in MODELS and cfg.data.sampler in SAMPLERS
    params = {k: v for k, v in asdict(cfg.loss).items() if k != "name" and v is not None}
    build_loss(cfg.loss.name, [50, 20, 5], **params)


@pytest.mark.parametrize("path", sorted((ROOT / "config").glob("*/methods_if100_*/*.yaml")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_method_configs_differ_from_each_other_only_in_method_and_dataset_keys(path):
    cfg = load_config(path)
    assert cfg.data.imbalance_factor == 100 and cfg.data.profile == path.parent.name.rsplit("_", 1)[1]
    # ARB's own code decays once, by 0.1 at epoch 160; the others follow LDAM-DRW (x0.01 at 160 and 180).
    decay = ([160.0], 0.1) if cfg.loss.name == "arb" else ([160.0, 180.0], 0.01)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.lr, cfg.train.schedule, cfg.train.milestones,
            cfg.train.gamma, cfg.train.weight_decay) == (200, 128, 0.1, "step", *decay, 2e-4)


@pytest.mark.parametrize("name", ["cifar10_lt/stage1_softmax.yaml", "cifar10_lt/stage1_mixup.yaml",
                                  "cifar100_lt/stage1_softmax.yaml"])
def test_paper_stage1_configs_warm_up_from_0_05_to_0_1_as_the_balms_configs(name):
    t = load_config(ROOT / "config" / name).train
    assert (t.iterations, t.batch_size, t.lr, t.warmup, t.warmup_start, t.schedule) == (13000, 512, 0.1, 800, 0.5,
                                                                                         "cosine")
