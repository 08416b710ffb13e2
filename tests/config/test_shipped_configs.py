"""Every experiment YAML in config/ loads, names its own run command, and builds its loss and sampler."""
from dataclasses import asdict
from pathlib import Path

import pytest

from config.keys import flatten
from config.load import config_to_dict, load_config
from config.readers import check_dataset_keys
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
    commands = {f"# python {script} --cfg {rel}": stage for stage, script in STAGE_SCRIPTS.items()}
    stage = commands.get(first.split("  ")[0])
    assert stage is not None, first
    cfg = load_config(path, stage=stage)  # no key the other stage alone reads
    if stage == "stage1":  # (stage 2 reads data.dataset from its stage-1 checkpoint first)
        check_dataset_keys(cfg, DATASET_KINDS[cfg.data.dataset])  # nor one another kind of dataset reads
    assert bool(cfg.stage1.checkpoint) == (stage == "stage2")
    assert cfg.model.name in MODELS and cfg.data.sampler in SAMPLERS
    params = {k: v for k, v in asdict(cfg.loss).items() if k != "name" and v is not None}
    build_loss(cfg.loss.name, [50, 20, 5], **params)


def _flat(path: Path) -> dict:
    return flatten(config_to_dict(load_config(path)))


# What a method config may change of its folder's ce.yaml: the method's own keys (and the run's name).
METHOD_KEYS = ("loss.", "data.sampler", "model.head", "train.mixup_alpha", "eval.logit_adjust_tau")
# ARB's own code decays once, by 0.1 at epoch 160; the others follow LDAM-DRW (x0.01 at 160 and 180).
ARB_DECAY = {"train.milestones": [160.0], "train.gamma": 0.1}


@pytest.mark.parametrize("path", sorted((ROOT / "config").glob("*/methods_if100_*/*.yaml")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_method_configs_differ_from_each_other_only_in_method_and_dataset_keys(path):
    """Each method config is its folder's ce.yaml with method keys changed (ARB also its decay), and each folder's
    ce.yaml is CIFAR-10-LT exp's with only the dataset keys changed: every other key is the same everywhere."""
    cfg, ce = _flat(path), _flat(path.parent / "ce.yaml")
    changed = {k for k in cfg if cfg[k] != ce[k]}
    allowed = {k for k in changed if k.startswith(METHOD_KEYS) or k == "name"}
    if cfg["loss.name"] == "arb":
        assert {k: cfg[k] for k in ARB_DECAY} == ARB_DECAY
        allowed |= set(ARB_DECAY)
    assert changed - allowed == set()
    assert cfg["name"] == f"{path.parent.parent.name}_if100_{path.parent.name.rsplit('_', 1)[1]}_{path.stem}"
    base = _flat(ROOT / "config" / "cifar10_lt" / "methods_if100_exp" / "ce.yaml")
    dataset = {"name", "data.dataset", "data.profile"}
    assert {k for k in ce if ce[k] != base[k]} <= dataset
    assert (ce["data.dataset"], ce["data.profile"]) == ({"cifar10_lt": "cifar10", "cifar100_lt": "cifar100"}[
        path.parent.parent.name], path.parent.name.rsplit("_", 1)[1])
    assert (base["data.imbalance_factor"], base["train.epochs"], base["train.batch_size"], base["train.lr"],
            base["train.warmup"], base["train.schedule"], base["train.milestones"], base["train.gamma"],
            base["train.weight_decay"]) == (100, 200, 128, 0.1, 5, "step", [160.0, 180.0], 0.01, 2e-4)


@pytest.mark.parametrize("name", ["cifar10_lt/stage1_softmax.yaml", "cifar10_lt/stage1_mixup.yaml",
                                  "cifar100_lt/stage1_softmax.yaml"])
def test_paper_stage1_configs_warm_up_from_0_05_to_0_1_as_the_balms_configs(name):
    t = load_config(ROOT / "config" / name).train
    assert (t.iterations, t.batch_size, t.lr, t.warmup, t.warmup_start, t.schedule) == (13000, 512, 0.1, 800, 0.5,
                                                                                         "cosine")


# The SGD of each family of paper configs, (momentum, weight decay, nesterov, lr, batch), as its code sets it: many
# configs leave these at the schema's defaults, so a changed default must not move a paper's run unnoticed.
PAPER_SGD = {
    "cifar*_lt/stage1_*.yaml": (0.9, 5e-4, False, 0.1, 512),  # BALMS: softmax_imba200.yaml's optim_params
    "cifar*_lt/stage2_*.yaml": (0.9, 5e-4, False, 0.1, 512),
    "cifar10_lt/decoupled_if100/[!t]*.yaml": (0.9, 5e-4, False, 0.1, 512),  # all but tau_norm, which trains nothing
    "cifar*_lt/methods_*/*.yaml": (0.9, 2e-4, False, 0.1, 128),  # LDAM-DRW's cifar_train.py
    "imagenet_lt/*[!m]_res*.yaml": (0.9, 5e-4, False, 0.2, 512),  # Decoupling's ImageNet_LT configs, tau_norm aside
    "imagenet_lt/stage2_balms_resnet10.yaml": (0.9, 5e-4, False, 0.5, 512),  # BALMS's balms_resnet10.yaml classifier
    "inat2018/*.yaml": (0.9, 1e-4, False, 0.2, 512),  # Decoupling's iNaturalist18 configs
}


@pytest.mark.parametrize("pattern", list(PAPER_SGD))
def test_paper_configs_train_with_their_paper_s_sgd_settings(pattern):
    paths = [p for p in sorted((ROOT / "config").glob(pattern)) if not any(  # the most specific pattern holds
        other != pattern and len(other) > len(pattern) and p.match(other) for other in PAPER_SGD)]
    assert paths, pattern
    for path in paths:
        stage = "stage2" if "stage2_classifier" in path.read_text().splitlines()[0] else "stage1"
        t = load_config(path, stage=stage).train
        assert (t.momentum, t.weight_decay, t.nesterov, t.lr, t.batch_size) == PAPER_SGD[pattern], path
