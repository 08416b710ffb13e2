"""Bad input, as real processes: each case exits with status 2 after ONE line that names the problem
and the fix (log lines before it aside), shows no traceback, and writes or overwrites nothing: no
run directory appears (also none in logs/), and an existing run's files and the data keep their bytes and times."""
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from models import build_model
from tests.conftest import REPO, run_script, write_image_folder, write_image_lists

pytestmark = pytest.mark.slow

LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (INFO|WARNING) ")  # setup_run's format; everything else is the error
# The shared stage-1 run's settings (tests/conftest.py TINY_STAGE1), so that only what a case sets differs.
FAST = ("train.epochs=3", "train.batch_size=32", "train.lr=0.05", "train.warmup=1", "train.num_threads=1",
        "eval.batch_size=64")
CIFAR = ("data.imbalance_factor=10", "data.val_per_class=2")  # added unless a case names data.dataset
S1, S2, PREDICT = "stage1_train.py", "stage2_classifier.py", "predict.py"

# (script, arguments, what the one line says: one fragment or several). {data} is a tiny CIFAR-10,
# {bad} the broken files below, {s1} a finished stage-1 run (a copy: cases on it must leave it as it
# was), {s1_again} another copy (a case that points log_dir at a run claims it, and the cases run at once: a
# second such case on {s1} would be refused as "in use"), {run} the run directory a case would write
# (log_dir={run} is added unless a case names its own).
CASES = {
    # the config file and the overrides
    "cfg_missing": (S1, ["--cfg", "{bad}/nope.yaml"], "config error: config file '{bad}/nope.yaml' does not exist"),
    "yaml_syntax": (S1, ["--cfg", "{bad}/broken.yaml"], "config error: {bad}/broken.yaml is not valid YAML at line 2"),
    "yaml_not_a_mapping": (S1, ["--cfg", "{bad}/list.yaml"], "must hold a mapping of config keys, got list"),
    "unknown_key": (S1, ["train.lrr=0.1"], "unknown config key 'train.lrr' (override 'train.lrr=0.1'); did you mean "
                                           "train.lr"),
    "renamed_key": (S1, ["sampler.tau=2"], "meta_sampler.gumbel_tau"),
    "wrong_type": (S1, ["train.epochs=abc"], "config key 'train.epochs' (override 'train.epochs=abc') expects int"),
    "override_without_equals": (S1, ["train.lr"], "override 'train.lr' must look like section.key=value"),
    "abbreviated_option": (S1, ["--resum"], "stage1_train.py: error: unrecognized arguments: --resum"),
    "negative_lr": (S1, ["train.lr=-0.1"], "config error: train.lr=-0.1 is out of range: it must be >= 0"),
    "nan_lr": (S1, ["train.lr=nan"], "expects a finite number, got 'nan'"),
    "overflowing_weight_decay": (S1, ["train.weight_decay=1e300"],  # was torch's overflow traceback at step 1
                                 "config error: train.weight_decay=1e+300 is out of range: it must be <= 1"),
    "batch_of_one": (S1, ["train.batch_size=1"], "train.batch_size=1 is out of range: it must be >= 2"),
    "zero_epochs": (S1, ["train.epochs=0"], "train.epochs=0 is out of range: it must be >= 1"),
    "negative_iterations": (S1, ["train.iterations=-1"], "train.iterations=-1 is out of range: it must be >= 0"),
    "epochs_beside_iterations": (S1, ["train.iterations=50"], "config error: train.epochs=3 has no effect: "
                                 "train.iterations=50 sets the run's length (and train.warmup's unit) in steps; set "
                                 "train.iterations=N instead, or add train.iterations=0 to count in epochs"),
    "imbalance_below_one": (S1, ["data.imbalance_factor=0.5"], "data.imbalance_factor=0.5 is out of range"),
    "infinite_imbalance": (S1, ["data.imbalance_factor=inf"], "expects a finite number, got 'inf'"),
    "zero_eval_batch": (S1, ["eval.batch_size=0"], "eval.batch_size=0 is out of range: it must be >= 1"),
    "warmup_as_long_as_the_run": (S1, ["train.epochs=3", "train.warmup=3"],
                                  "train.warmup=3 (epochs) is not shorter than the run (train.epochs=3)"),
    "empty_name": (S1, ["name="], "config error: name is empty"),
    "name_above_logs": (S1, ["name=.."], "config error: name='..' is not a folder under logs/"),
    "yaml_alias_inside_its_anchor": (S1, ["--cfg", "{bad}/recursive.yaml"], "config error: train.lr holds itself"),
    "number_of_400_digits": (S1, ["train.lr=" + "1" * 400], "expects a finite number, got 111111111111111111111111... "
                             "(400 characters)"),
    "milestone_past_the_run": (S1, ["train.schedule=step"], "config error: train.milestones=[160.0, 180.0] (epochs) "
                               "holds 180, not before the run's end (train.epochs=3): the lr would never decay there"),
    "milestones_of_no_step_schedule": (S1, ["train.milestones=[1]"], "config error: train.milestones=[1.0] is read by "
                                       "train.schedule=step only; train.schedule=cosine does not use it"),
    "nesterov_without_momentum": (S1, ["train.nesterov=true", "train.momentum=0"], "config error: train.nesterov=true "
                                  "needs a momentum, and train.momentum=0 has none"),  # was torch's traceback
    "drw_past_the_run": (S1, ["loss.name=ldam", "loss.drw_epoch=3"], "config error: loss.drw_epoch=3 is not an epoch "
                         "of the run (0 to 2): its re-weighting would never start"),
    "padding_past_the_image": (S1, ["data.crop_padding=100000"], "config error: data.crop_padding=100000 is out of "
                               "range: it must be <= 32 (the CIFAR image side"),  # was a 28 TB allocation
    "seed_past_64_bits": (S1, ["data.subset_seed=18446744073709551616"], "config error: data.subset_seed="
                          "18446744073709551616 is out of range: it must be < 2**64"),
    "reset_head_without_pretrained": (S1, ["model.reset_head=true"], "config error: model.reset_head=true replaces "
                                      "the head of pretrained weights, and no model.pretrained (--pretrained) is "
                                      "given"),
    "unknown_dataset": (S1, ["data.dataset=cifar1000"], "data.dataset='cifar1000' is not one of cifar10, cifar100"),
    "unknown_model": (S1, ["model.name=resnet33"], "model.name='resnet33' is not one of resnet10, resnet101, "
                                                   "resnet152, resnet18, resnet32, resnet34, resnet50"),
    "unknown_head": (S1, ["model.head=cosin"], "model.head='cosin' is not one of cosine, linear (did you mean "
                                               "cosine?)"),
    "unknown_loss": (S1, ["loss.name=focall"], "loss.name='focall' is not one of arb, balanced_softmax, ce, "
                                               "class_balanced, focal, ldam, logit_adjust, reweight"),
    "unknown_sampler": (S1, ["data.sampler=balancd"], "data.sampler='balancd' is not one of class_balanced, "
                                                      "instance, oversample, progressive, sqrt, undersample"),
    "unknown_device": (S1, ["train.device=tpu"], "train.device='tpu' is not one of auto, cpu, cuda, cuda:N, mps"),
    "bias_init_on_a_head_without_bias": (S1, ["loss.name=class_balanced", "loss.variant=sigmoid", "model.head=cosine"],
                                         "initialises the classifier's bias, and model.head=cosine has none: use "
                                         "model.head=linear"),
    "unknown_schedule": (S1, ["train.schedule=linear"], "train.schedule='linear' is not one of cosine, step"),
    "stage2_key_in_stage1": (S1, ["stage2.method=crt"], "stage2.method='crt' is read by stage2 (stage2_classifier.py) "
                                                        "only"),
    "key_of_another_dataset_kind": (S1, ["data.image_size=64"], "data.image_size=64 is read for folder and list "
                                                                "datasets only"),
    # before the data loads (there is none at data.root)
    "loss_parameter_not_taken": (S1, ["loss.name=ce", "loss.gamma=2.0", "data.root={bad}/no_data"],
                                 "config error: loss.gamma=2.0 is read by loss.name=class_balanced or focal only; "
                                 "loss.name=ce does not use it (it reads loss.label_smoothing): remove it"),
    "no_cuda_here": (S1, ["train.device=cuda"], "train.device=cuda: no CUDA device is visible here"),
    "fp16_on_the_cpu": (S1, ["train.device=cpu", "train.amp=fp16"], "train.amp=fp16 needs a CUDA device"),
    "unknown_option": (S1, ["--bogus"], "stage1_train.py: error: unrecognized arguments: --bogus"),
    "ckpt_swallowed_an_override": (S1, ["--test", "--ckpt", "train.lr=0.1"], "--ckpt takes a checkpoint's path"),
    # data
    "no_dataset_there": (S1, ["data.root={bad}/nothing"], ("CIFAR-10 not found: looked in {bad}/nothing",
                                                           "Set data.download=true", "LT_DATA_ROOT")),
    "damaged_cifar_file": (S1, ["data.root={bad}/cifar_damaged"], "data_batch_1 is not a valid CIFAR file"),
    "validation_takes_a_whole_class": (S1, ["data.val_per_class=60"], "would hold out every training image of class"),
    "imbalance_empties_a_class": (S1, ["data.imbalance_factor=1000"], "leaves class"),
    "empty_class_folder": (S1, ["data.dataset=folder", "data.root={bad}/folder_empty_class"],
                           "train/c: class folder holds no images"),
    "val_class_without_training_folder": (S1, ["data.dataset=folder", "data.root={bad}/folder_unknown_class",
                                               "data.imbalance_factor=1"],
                                          "val/c: class 'c' has no folder in the training split"),
    "missing_list_file": (S1, ["data.dataset=imagenet_lt", "data.root={bad}"],
                          "ImageNet-LT train list not found: {bad}/ImageNet_LT_train.txt"),
    "list_label_not_an_integer": (S1, ["data.dataset=imagenet_lt", "data.root={bad}/lists_bad_label"],
                                  "ImageNet_LT_train.txt:4: label 'cat' is not an integer"),
    "listed_image_missing": (S1, ["data.dataset=imagenet_lt", "data.root={bad}/lists_missing_image"],
                             "ImageNet_LT_train.txt:2: image {bad}/lists_missing_image/images/ImageNet_LT_train/1.jpg "
                             "does not exist"),
    "run_directory_under_a_file": (S1, ["log_dir={bad}/a_file/run"], "{bad}/a_file/run: Not a directory"),
    # checkpoints and runs
    "test_before_training": (S1, ["--test"], "error: no checkpoint at {run}/last.pt: train first"),
    "test_checkpoint_missing": (S1, ["--test", "--ckpt", "{bad}/none.pt"], "no checkpoint at {bad}/none.pt"),
    "test_checkpoint_truncated": (S1, ["--test", "--ckpt", "{bad}/truncated.pt"],
                                  "{bad}/truncated.pt cannot be read as a checkpoint"),
    "test_checkpoint_not_torch": (S1, ["--test", "--ckpt", "{bad}/text.pt"],
                                  "{bad}/text.pt cannot be read as a checkpoint"),
    "run_exists_without_resume": (S1, ["log_dir={s1}"], "already holds a run ({s1}/last.pt); pass --resume"),
    "resume_with_another_config": (S1, ["log_dir={s1_again}", "--resume", "train.lr=0.2"],
                                   "--resume with a config that differs from the run's at train.lr"),
    # stage 2
    "stage2_without_backbone": (S2, [], "config error: stage 2 needs a backbone: stage1.checkpoint="),
    "stage2_backbone_missing": (S2, ["stage1.checkpoint={bad}/none.pt"], "no checkpoint at {bad}/none.pt"),
    "stage2_backbone_truncated": (S2, ["stage1.checkpoint={bad}/truncated.pt"], "cannot be read as a checkpoint"),
    "stage2_two_backbones": (S2, ["stage1.checkpoint={s1}/last.pt", "model.pretrained={s1}/last.pt"],
                             "set stage1.checkpoint or model.pretrained, not both"),
    "stage2_other_training_set": (S2, ["stage1.checkpoint={s1}/last.pt", "data.imbalance_factor=50"],
                                  "data.imbalance_factor=50.0, but the stage-1 run"),
    "stage2_unknown_method": (S2, ["stage1.checkpoint={s1}/last.pt", "stage2.method=bals"],
                              "stage2.method='bals' is not one of balanced_softmax, balms, crt, lws, tau_norm (did "
                              "you mean balms"),
    "meta_batch_past_memory": (S2, ["stage1.checkpoint={s1}/last.pt", "stage2.method=balms",
                                    "meta_sampler.meta_batch_size=1000000000"],
                               "meta_sampler.meta_batch_size=1000000000 is out of range: it must be <= 65536"),
    # was a 256 GB allocation at the first meta step
    "stage1_key_in_stage2": (S2, ["stage1.checkpoint={s1}/last.pt", "loss.name=focal"],
                             "loss.name='focal' is read by stage1 (stage1_train.py) only; stage2 "
                             "(stage2_classifier.py) does not use it: remove it"),
    "key_the_method_does_not_read": (S2, ["stage1.checkpoint={s1}/last.pt", "stage2.method=crt",
                                          "meta_sampler.lr=0.1"], "is read by stage2.method=balms only"),
    "stage2_lws_on_a_backbone_of_other_classes": (S2, ["model.pretrained={bad}/resnet32_100_classes.pt",
                                                       "stage2.method=lws"],
                                                  "stage2.method=lws starts from the backbone's own classifier, which "
                                                  "must have this training set's 10 classes: use balanced_softmax"),
    # downloads
    "pretrained_unknown_name": (S1, ["--pretrained", "resnet50_imagenett"], "is not a registry name"),
    "pretrained_unreachable": (S1, ["--pretrained", "http://127.0.0.1:9/r.pt"], "cannot reach 127.0.0.1:9"),
    "pretrained_not_a_checkpoint": (S1, ["--pretrained", "{bad}/text.pt"], "cannot be read as a checkpoint"),
    # predict.py
    "predict_batch_of_zero": (PREDICT, ["{s1}/last.pt", "{bad}/a_file", "--batch-size", "0"],
                              "argument --batch-size: expected a whole number of at least 1"),
    "predict_checkpoint_missing": (PREDICT, ["{bad}/none.pt", "{bad}/a_file"], "no checkpoint at {bad}/none.pt"),
}
if torch.cuda.is_available():  # there train.device=cuda trains: not a bad input on a GPU machine
    del CASES["no_cuda_here"]


@pytest.fixture(scope="module")
def bad(tmp_path_factory, fake_cifar10) -> Path:
    """Broken files, each as a user might have it."""
    root = tmp_path_factory.mktemp("bad")
    (root / "broken.yaml").write_text("train: {lr: 0.1\n")
    (root / "list.yaml").write_text("- train.lr\n- 0.1\n")
    (root / "recursive.yaml").write_text("train: &x {lr: *x}\n")
    (root / "text.pt").write_text("not a checkpoint\n")
    (root / "a_file").write_text("a file, not a folder\n")
    shutil.copytree(fake_cifar10, root / "cifar_damaged")
    batch = root / "cifar_damaged" / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(batch.read_bytes()[:5000])
    write_image_folder(root / "folder_empty_class", {"train": {"a": 3, "b": 2}, "test": {"a": 1, "b": 1}})
    (root / "folder_empty_class" / "train" / "c").mkdir()
    write_image_folder(root / "folder_unknown_class", {"train": {"a": 3, "b": 2}, "val": {"a": 1, "c": 1},
                                                       "test": {"a": 1, "b": 1}})
    lists = {"ImageNet_LT_train.txt": [0, 1, 1], "ImageNet_LT_val.txt": [0, 1], "ImageNet_LT_test.txt": [0, 1]}
    write_image_lists(root / "lists_bad_label", lists)
    train_list = root / "lists_bad_label" / "ImageNet_LT_train.txt"
    train_list.write_text(train_list.read_text() + "images/ImageNet_LT_train/0.jpg cat\n")
    torch.save(build_model("resnet32", num_classes=100).state_dict(), root / "resnet32_100_classes.pt")
    write_image_lists(root / "lists_missing_image", lists)
    (root / "lists_missing_image" / "images" / "ImageNet_LT_train" / "1.jpg").unlink()
    return root


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory, stage1_run, bad) -> tuple[Path, Path]:
    """Two copies of the shared stage-1 run (cases on them must not change them), and a truncated checkpoint."""
    copies = tmp_path_factory.mktemp("finished") / "run", tmp_path_factory.mktemp("finished") / "run"
    for copy in copies:
        shutil.copytree(stage1_run, copy)
    (bad / "truncated.pt").write_bytes((copies[0] / "last.pt").read_bytes()[:1000])
    return copies


RUN_FILES = {"config.yaml", "metrics.jsonl", "train.log", "tb", "last.pt", "best.pt"}


def _snapshot(*folders: Path) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for folder in folders if folder.exists()
            for p in sorted(folder.rglob("*"))}


def _logs_snapshot(logs: Path) -> set:
    """The default log folder's run directories, and any run file written into the folder itself: what a bad
    input that went on to train would add there. Other files in it (a test log a developer writes while the
    suite runs, a run of theirs going on) are not the cases' doing."""
    if not logs.is_dir():
        return set()
    return {p for p in logs.iterdir() if p.is_dir() or p.name in RUN_FILES}


@pytest.fixture(scope="module")
def outcomes(fake_cifar10, bad, finished_runs, tmp_path_factory) -> dict:
    """Every case run once, as many at a time as there are cores (each its own process, forked from the
    test process's fork server): {case: (its process, its places)}, and the watched files before and after
    them all."""
    cases = tmp_path_factory.mktemp("cases")
    watched = (*finished_runs, bad)

    def run_case(case: str) -> tuple[subprocess.CompletedProcess, Path]:
        script, args, _ = CASES[case]
        places = {"data": fake_cifar10, "bad": bad, "s1": finished_runs[0], "s1_again": finished_runs[1],
                  "run": cases / case}
        args = [a.format(**places) for a in args]
        if script != PREDICT:
            cifar = () if any(a.startswith("data.dataset=") for a in args) else CIFAR
            args = [f"data.root={fake_cifar10}", *FAST, *cifar, *args]
            if not any(a.startswith("log_dir=") for a in args) and case not in ("empty_name", "name_above_logs"):
                args.append(f"log_dir={places['run']}")
        proc = run_script(script, *args, check=False)
        return proc, places

    before, logs_before = _snapshot(*watched), _logs_snapshot(REPO / "logs")
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = dict(zip(CASES, pool.map(run_case, CASES)))
    return {"results": results, "before": before, "after": _snapshot(*watched), "cases": cases,
            "new_in_logs": _logs_snapshot(REPO / "logs") - logs_before}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_naming_problem_and_fix_with_exit_2_and_no_traceback(case, outcomes):
    proc, places = outcomes["results"][case]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not LOG_LINE.match(line)]
    assert len(lines) == 1, lines
    expected = CASES[case][2]
    for fragment in (expected,) if isinstance(expected, str) else expected:
        assert fragment.format(**places) in lines[0]


def test_no_bad_input_wrote_a_run_directory_or_changed_a_file(outcomes):
    assert list(outcomes["cases"].iterdir()) == []  # no case's run directory exists
    changed = {str(p) for p in set(outcomes["before"]) | set(outcomes["after"])
               if outcomes["before"].get(p) != outcomes["after"].get(p)}
    assert changed == set()
    assert outcomes["new_in_logs"] == set()
