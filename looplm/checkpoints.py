# Generated from book/04a_appendix_engineering.py, book/07a_appendix_decoding.py: edit the chapter, then run `make export`.
# fmt: off
__all__ = ['CHECKPOINT_FORMAT', 'CheckpointError', 'write_checkpoint', 'read_checkpoint', 'checkpoint_model', 'save_model', 'load_model', 'load_model_flag']
# fmt: on

import contextlib
import dataclasses
import os
import pickle
import re
from pathlib import Path

import torch

from looplm import __version__
from looplm.model import LoopLM, LoopLMConfig

# --- book/04a_appendix_engineering.py:1170 (cell 50) ---
def _temporary_name_pattern(path):
    """The names of the temporary files of `path`: .NAME.<random>.tmp (random: hex here, or
    letters, digits and _ as tempfile.mkstemp, which earlier versions used)."""
    return re.compile(re.escape(f".{path.name}.") + r"[a-z0-9_]+\.tmp")


def _create_temporary(path):
    """A new empty file .NAME.<random hex>.tmp next to `path`, opened for writing -> (fd, its path).

    Created with os.open(..., 0o666), so its permissions follow the umask like any new file.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        temporary = path.parent / f".{path.name}.{os.urandom(6).hex()}.tmp"
        try:
            return os.open(temporary, flags, 0o666), temporary
        except FileExistsError:                 # 2**48 names: try another
            continue


def _remove_stale_temporaries(path):
    """Delete the temporary files that interrupted writes of `path` left in its folder. -> their names.

    Only one process at a time may write a given path: another writer's file would look stale.
    """
    path = Path(path)
    pattern = _temporary_name_pattern(path)
    try:
        names = sorted(os.listdir(path.parent))
    except OSError:                          # no folder yet, or one we cannot list: nothing to do
        return []
    removed = []
    for name in names:
        if pattern.fullmatch(name):
            with contextlib.suppress(OSError):
                os.unlink(path.parent / name)
                removed.append(name)
    return removed


def _naming(path, error):
    """`error` (an OSError) as an OSError of the same kind that names `path`."""
    if error.errno is None:
        return error
    return OSError(error.errno, error.strerror or os.strerror(error.errno), str(path))


def _os_error_behind(error):
    """The OSError that caused `error`, or None. torch.save turns a failed write (a full disk)
    into a RuntimeError while it cleans up, with the OSError as its context."""
    while error is not None:
        if isinstance(error, OSError):
            return error
        error = error.__cause__ or error.__context__
    return None


def _atomic_write(path, write):
    """Call write(f) with a binary file next to `path`, flush it to disk, os.replace it onto `path`.

    `path` ends up complete or unchanged. Leftovers of earlier interrupted writes of `path` are
    removed first; an OSError names `path`. -> path.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(path)
        fd, temporary = _create_temporary(path)
    except OSError as e:
        raise _naming(path, e) from e
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        cause = _os_error_behind(e) if isinstance(e, Exception) else None
        if cause is not None:
            raise _naming(path, cause) from e
        raise
    return path

# --- book/04a_appendix_engineering.py:1260 (cell 52) ---
CHECKPOINT_FORMAT = "looplm-checkpoint"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: not a looplm checkpoint, too new, broken, or for another model."""


def _config_dict(config):
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else None


def write_checkpoint(path, model, *, trainer_state=None, train_config=None, loss_state=None, extra=None):
    """Write `model` (its config and weights) and what a trainer adds, to `path`, atomically.

    trainer_state: a Trainer's state_dict() (default: {"model": the model's weights}, a model
    alone). train_config: its TrainConfig; loss_state: its loss function's state; extra: plain
    data (dicts, lists, str, numbers, None). The file appears complete or not at all: it is
    written to a temporary file in the same folder and moved onto `path` with os.replace;
    temporary files of `path` that killed writes left behind are deleted. Refuses (ValueError)
    a model holding non-finite weights. Returns the path.
    """
    weights = model.state_dict() if trainer_state is None else trainer_state["model"]
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"refusing to save a checkpoint: parameter {name} holds non-finite values")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "looplm_version": __version__,
        "model_config": _config_dict(model.config),
        "train_config": _config_dict(train_config),
        "trainer": {"model": weights} if trainer_state is None else trainer_state,
        "loss_fn": loss_state,
        "extra": extra,
    }
    return _atomic_write(Path(path), lambda f: torch.save(payload, f))

# --- book/04a_appendix_engineering.py:1311 (cell 54) ---
def _version_tuple(version):
    return tuple(int(part) for part in re.findall(r"\d+", str(version))[:3])


def _check_stored_weights(path, payload):
    """CheckpointError unless payload["trainer"]["model"] is a dict whose tensors are all finite.

    (Entries that are not tensors are left to the loaders, which say what they expected.)
    """
    trainer = payload.get("trainer")
    weights = trainer.get("model") if isinstance(trainer, dict) else None
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path} holds no model weights (no trainer['model'] dictionary)")
    for name, tensor in weights.items():
        if isinstance(tensor, torch.Tensor) and (tensor.is_floating_point() or tensor.is_complex()):
            bad = (~torch.isfinite(tensor)).sum().item()
            if bad:
                raise CheckpointError(f"{path} is unusable: the stored model tensor {name} holds {bad} "
                                      f"non-finite value{'s' if bad > 1 else ''} (NaN or inf)")


def read_checkpoint(path, map_location="cpu"):
    """The checked contents of a checkpoint file (a dict; see save_checkpoint).

    CheckpointError if the file is not a readable looplm checkpoint, was written by a newer
    (or an unrecognisable) looplm version, or its model weights are missing or hold NaN or inf
    (the message names the tensor). FileNotFoundError if there is no file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001  (pickle, zip and torch errors all mean "unreadable")
        reason = (str(e).splitlines() or [""])[0].split(". ")[0][:120]
        raise CheckpointError(f"{path} is not a readable looplm checkpoint: torch.load failed "
                              f"({type(e).__name__}: {reason})") from e
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a looplm checkpoint (no format={CHECKPOINT_FORMAT!r} entry)")
    written_by = payload.get("looplm_version")
    if not isinstance(written_by, str) or len(_version_tuple(written_by)) != 3:
        raise CheckpointError(f"{path} was written by an unknown looplm version {written_by!r}")
    if _version_tuple(written_by) > _version_tuple(__version__):
        raise CheckpointError(f"{path} was written by looplm {written_by}, newer than the installed "
                              f"looplm {__version__}; upgrade looplm to load it")
    _check_stored_weights(path, payload)
    return payload


def _config_differences(expected, found):
    a, b = dataclasses.asdict(expected), dataclasses.asdict(found)
    return [f"{key}: checkpoint {a[key]!r}, model {b.get(key)!r}" for key in a if a[key] != b.get(key)]


def checkpoint_model(path, payload, model=None):
    """The LoopLM for a checkpoint's payload (from read_checkpoint): built from the stored config,
    or `model` after checking that its config is the stored one. Weights are not loaded."""
    try:
        stored = LoopLMConfig(**payload["model_config"])
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path} holds a model config this looplm cannot build: {e}") from e
    if model is None:
        return LoopLM(stored)
    if not isinstance(model, LoopLM):
        raise TypeError(f"model must be a LoopLM, got {type(model).__name__}")
    if model.config != stored:
        raise CheckpointError(f"{path} holds a model with another config than the model given: "
                              + "; ".join(_config_differences(stored, model.config)))
    return model

# --- book/07a_appendix_decoding.py:83 (cell 6) ---
def save_model(path, model, extra=None):
    """Write `model` (a LoopLM), its config and the looplm version to `path`, atomically. -> path."""
    if not isinstance(model, LoopLM):
        raise TypeError(f"model must be a LoopLM, got {type(model).__name__}")
    return write_checkpoint(path, model, extra=extra)


def _unreadable(path, error):
    """A clearer CheckpointError for a file torch.load(weights_only=True) refused, or None."""
    cause = error.__cause__
    if cause is None:                                  # read_checkpoint's own checks: already clear
        return None
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(cause))
    if isinstance(cause, pickle.UnpicklingError) and found:
        return CheckpointError(f"{path} is not a readable looplm checkpoint: it holds a reference to the Python "
                               f"object {found.group(1)}, which unpickling would call (that is how a pickle runs "
                               f"code), so it was not loaded; a looplm checkpoint holds tensors and plain data "
                               f"only, read with torch.load(weights_only=True)")
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(cause))
    reason = detail.group(1).strip() if detail else (str(cause).strip().splitlines() or ["it ends early"])[0][:160]
    return CheckpointError(f"{path} is not a readable looplm checkpoint: the file is damaged or was not written "
                           f"by torch.save ({type(cause).__name__}: {reason})")


def _listed(items, n=3):
    return "; ".join(items[:n]) + (f"; and {len(items) - n} more" if len(items) > n else "")


def _weight_mismatch(model, state):
    """What keeps `state` from loading into `model`, in words ('' if nothing)."""
    if not isinstance(state, dict):
        return f"its weights are a {type(state).__name__}, not a dict of tensors"
    expected = model.state_dict()
    shapes = [f"{k} is {list(v.shape)} in the file and {list(expected[k].shape)} in the model"
              for k, v in state.items() if k in expected and isinstance(v, torch.Tensor) and v.shape != expected[k].shape]
    not_tensors = [f"{k} is a {type(v).__name__}" for k, v in state.items() if k in expected
                   and not isinstance(v, torch.Tensor)]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    parts = []
    if shapes:
        parts.append(f"{len(shapes)} tensor(s) differ in shape: {_listed(shapes)}")
    if not_tensors:
        parts.append(f"{len(not_tensors)} entry(ies) are not tensors: {_listed(not_tensors)}")
    if missing:
        parts.append(f"{len(missing)} tensor(s) of the model are missing: {_listed(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} tensor(s) in the file belong to no part of the model: {_listed(unexpected)}")
    return ". ".join(parts)


def load_model(path, model=None, map_location="cpu"):
    """The LoopLM stored at `path` (by save_model or python -m looplm.train), built from its config,
    or loaded into `model` after checking that its config is the stored one. CheckpointError otherwise."""
    try:
        payload = read_checkpoint(path, map_location)
    except CheckpointError as e:
        clearer = _unreadable(path, e)
        if clearer is None:
            raise
        raise clearer from e
    model = checkpoint_model(path, payload, model)
    trainer = payload.get("trainer")
    if not isinstance(trainer, dict) or "model" not in trainer:
        raise CheckpointError(f"{path} holds no model weights (no trainer['model'] entry)")
    mismatch = _weight_mismatch(model, trainer["model"])
    if mismatch:
        raise CheckpointError(f"{path} holds weights that do not fit its model config: {mismatch}")
    model.load_state_dict(trainer["model"])
    return model


def load_model_flag(path, flag="--checkpoint"):
    """load_model(path) for a command line: a missing or unusable file is an error naming `flag`."""
    try:
        return load_model(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{flag}: {e}") from e
    except CheckpointError as e:
        raise CheckpointError(f"{flag}: {e}") from e
