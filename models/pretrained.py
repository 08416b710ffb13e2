"""Pretrained weights from a registry name, URL or path, in any known layout, as our model.

    from models import load_pretrained
    model = load_pretrained("final_model_checkpoint.pth", arch="resnet32")  # a BALMS release
    model = load_pretrained("resnet50_imagenet", num_classes=10, reset_head=True)  # fine-tune on 10 classes

A source is a name in models.zoo.PRETRAINED (downloaded once into the cache, or shipped in
models/released/; SHA-256 checked), an http(s) URL (pinned by appending #sha256=<hex>), or a file.
Its layout is detected from its keys (models.foreign). Every key is checked: missing and unexpected
keys are listed by name, a shape mismatch names the parameter and both shapes. A download that is
not a checkpoint (a web page served instead of the file, say) is removed from the cache, so the next
run fetches it again; a file the user names, or one shipped here, is never removed.
"""
from __future__ import annotations

import difflib
from pathlib import Path

from torch import nn

from models.checkpoint import FORMAT, CheckpointError, load_state_checked, save_checkpoint
from models.download import DEFAULT_TIMEOUT, SHA256_HEX, fetch
from models.foreign import Converted, convert, read_checkpoint_file
from models.registry import MODELS, build_model
from models.release import released_file
from models.zoo import PRETRAINED, URL_SCHEMES, PretrainedEntry


class HeadMismatchError(CheckpointError):
    """Weights whose classifier has another number of classes than asked, loaded with their head kept."""

    def __init__(self, problem: str, num_classes: int) -> None:
        super().__init__(f"{problem}. Its classifier does not fit a {num_classes}-class head: reset_head=True "
                         f"(model.reset_head=true) starts a new one")
        self.problem = problem  # the keys and shapes that do not fit
        self.num_classes = num_classes

    def __reduce__(self) -> tuple:
        """Pickled with its own two arguments (an error sent from one rank to the others is pickled)."""
        return type(self), (self.problem, self.num_classes)


def resolve(source: str, cache: str | Path | None = None,
            timeout: float = DEFAULT_TIMEOUT) -> tuple[Path, PretrainedEntry | None]:
    """The local file of a source (downloading it if needed) and its registry entry, if it has one."""
    if source in PRETRAINED:
        entry = PRETRAINED[source]
        if entry.shipped:
            return released_file(entry.url, entry.sha256, source), entry
        return fetch(entry.url, entry.sha256, cache, timeout), entry
    if source.startswith(URL_SCHEMES):
        url, _, fragment = source.partition("#")
        if fragment and not fragment.startswith("sha256="):
            raise CheckpointError(f"{source}: the only URL fragment understood is #sha256=<hex digest of the file>")
        pin = fragment.removeprefix("sha256=") if fragment else None
        if pin is not None and not SHA256_HEX.fullmatch(pin.lower()):  # "#sha256=" alone too: a digest left out
            raise CheckpointError(f"the pin #sha256={pin} of {url} is not a SHA-256 digest (8 to 64 hex digits); pin "
                                  f"the file with #sha256=<its digest as sha256sum prints it, or the first 8 or more "
                                  f"hex digits>, or leave the pin off to download it unchecked")
        return fetch(url, pin, cache, timeout), None
    path = Path(source).expanduser()
    if not path.is_file():
        close = difflib.get_close_matches(source, list(PRETRAINED), n=2, cutoff=0.6)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise CheckpointError(f"pretrained source {source!r} is not a registry name ({', '.join(PRETRAINED)}), "
                              f"an http(s) URL or an existing file{hint}; `python -m models list` shows the registry")
    return path, None


def _read(source: str, path: Path, entry: PretrainedEntry | None) -> Converted:
    """The checkpoint at `path`; a downloaded file that is none is deleted, lest the cache keep serving it."""
    try:
        return convert(read_checkpoint_file(path), str(path))
    except CheckpointError as e:
        downloaded = not entry.shipped if entry else source.startswith(URL_SCHEMES)
        if not downloaded:  # the user's own file, or one shipped in models/released/
            raise
        path.unlink(missing_ok=True)
        url = f"{entry.url} ({source})" if entry else source
        fix = ("the entry in models/zoo.py names the wrong file" if entry else
               "check that #sha256= pins the checkpoint" if "#sha256=" in source else
               "check that the URL serves the checkpoint itself, not a web page, and pin it with #sha256=<its digest>")
        raise CheckpointError(f"{url}: the downloaded file was not a checkpoint ({e}); it was removed from the cache, "
                              f"so the next run downloads it again; {fix}") from None


def training_run(source: str, cache: str | Path | None = None, timeout: float = DEFAULT_TIMEOUT) -> dict | None:
    """The checkpoint of `source` when it is a stage-1 training run of this tool (a release, a run's
    .pt), whose config and class counts stage 2 reads as from stage1.checkpoint; None for other weights
    (and for a file that is no checkpoint: load_pretrained then says so)."""
    path, _ = resolve(source, cache, timeout)
    try:
        ckpt = read_checkpoint_file(path)
    except CheckpointError:
        return None
    if (isinstance(ckpt, dict) and ckpt.get("format") == FORMAT and ckpt.get("config")
            and "stage2" not in ckpt["config"]):
        return ckpt
    return None


def _load(source: str, arch: str | None, num_classes: int | None, reset_head: bool, head_type: str,
          cache: str | Path | None, timeout: float) -> tuple[nn.Module, dict, Converted]:
    """(model with the weights, its model_args, the converted checkpoint)."""
    path, entry = resolve(source, cache, timeout)
    ckpt = _read(source, path, entry)
    what = f"{source} ({ckpt.layout} layout)"
    if entry is not None and ckpt.layout != entry.format:
        raise CheckpointError(f"{what}: the registry entry says {entry.format!r}; the entry in models/zoo.py is wrong")
    recorded = ckpt.model_args["name"] if ckpt.model_args else (entry.arch if entry else None)
    if arch is None and recorded is None:
        raise CheckpointError(f"{what} does not record its architecture: pass model.name= (--arch of `python -m "
                              f"models import`), one of {', '.join(MODELS)}")
    if arch is not None and recorded is not None and arch != recorded:
        raise CheckpointError(f"{what} holds a {recorded}, not a {arch}: use arch={recorded!r} (model.name={recorded})")
    arch = arch or recorded
    head = ckpt.state.get("head.weight")
    if num_classes is None:
        if head is None:
            raise CheckpointError(f"{what} has no classifier to take the number of classes from: "
                                  f"pass num_classes= with reset_head=True")
        num_classes = head.shape[0]
    if not reset_head:  # the checkpoint's own head type (foreign layouts have linear heads)
        head_type = (ckpt.model_args or {}).get("head", "linear")
    model = build_model(arch, num_classes, head_type)
    state = ckpt.state
    if reset_head:  # keep the freshly initialised head of the model, for its number of classes
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        state.update({k: v for k, v in model.state_dict().items() if k.startswith("head.")})
    try:
        load_state_checked(model, state, what)
    except CheckpointError as e:
        def shapes(s: dict) -> dict:
            return {k: tuple(v.shape) for k, v in s.items() if not k.startswith("head.")}
        if shapes(state) != shapes(model.state_dict()):  # the backbone itself does not fit
            if recorded is None:  # the architecture was the caller's guess: foreign weights record none
                raise CheckpointError(f"{e}; if these weights are not a {arch}'s, pass the architecture they are "
                                      f"(model.name=, or --arch of `python -m models import`; one of "
                                      f"{', '.join(MODELS)})") from None
            raise
        if reset_head or (head is not None and tuple(head.shape) == tuple(model.head.weight.shape)):
            raise
        raise HeadMismatchError(str(e), num_classes) from None
    return model, {"name": arch, "num_classes": num_classes, "head": head_type}, ckpt


def load_pretrained(source: str, arch: str | None = None, num_classes: int | None = None, reset_head: bool = False,
                    head: str = "linear", cache: str | Path | None = None,
                    timeout: float = DEFAULT_TIMEOUT) -> nn.Module:
    """Our model (backbone + head, training mode as from build_model) with the weights of `source`.

    arch: models.MODELS name; None = the one the checkpoint or registry records (foreign files
    record none). num_classes: None = the checkpoint's classifier. reset_head: keep a freshly
    initialised head (another number of classes) and load the backbone only; head: its type
    (models.heads.HEADS) - without reset_head the model keeps the checkpoint's head type.
    timeout: seconds a download may wait for the server.
    """
    return _load(source, arch, num_classes, reset_head, head, cache, timeout)[0]


def import_checkpoint(source: str, out: str | Path, arch: str | None = None, cache: str | Path | None = None,
                      timeout: float = DEFAULT_TIMEOUT) -> dict:
    """Convert `source` once into a checkpoint of this tool at `out`; returns what was written.

    The result has no training config ("config": None), so stage 2 takes its class counts from
    the data, as for any pretrained backbone.
    """
    model, model_args, ckpt = _load(source, arch, None, False, "linear", cache, timeout)
    payload = {"model": model.state_dict(), "model_args": model_args, "class_counts": ckpt.class_counts,
               "class_names": ckpt.class_names, "config": None, "imported_from": source, "layout": ckpt.layout}
    save_checkpoint(out, payload)
    return payload
