"""Atomic, pickle-free training checkpoints.

Layout: ``run_dir/checkpoints/step-00000050/`` holding ``<group>.safetensors`` files (model, ema,
optimizer, extra modules, RNG tensors per rank) and ``trainer_state.json`` (step, data position,
optimizer hyper-parameters, python/numpy RNG scalars). A checkpoint is written into
``.tmp-step-...`` first and renamed into place only when complete; ``latest`` (a one-line file,
replaced atomically) then points at it, and only after that are older ones pruned. So a crash or a
full disk while writing leaves the previous checkpoint untouched and ``latest`` pointing at it.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from snapgen_app.errors import TrainingError

STATE_FILE = "trainer_state.json"
LATEST_FILE = "latest"


def step_dir_name(step: int) -> str:
    """Directory name of the checkpoint taken after ``step`` optimizer steps."""
    return f"step-{step:08d}"


def begin(root: Path, step: int) -> Path:
    """Create (fresh) the temporary directory a checkpoint is written into."""
    tmp = root / f".tmp-{step_dir_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_group(tmp: Path, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write one group of tensors as ``name.safetensors`` (contiguous CPU copies)."""
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    try:
        save_file(clean, str(tmp / f"{name}.safetensors"))
    except SafetensorError as exc:
        # safetensors reports a failed write (a full disk: "... (os error 28)") as its own error
        # type; as an OSError it takes the trainer's path that keeps the previous checkpoint.
        code = re.search(r"os error (\d+)", str(exc))
        raise OSError(int(code.group(1)) if code else errno.EIO, str(exc)) from exc


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(root: Path, tmp: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write the state file, rename ``tmp`` into place, point ``latest`` at it, prune old ones."""
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True))
    for f in tmp.iterdir():
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    final = root / step_dir_name(step)
    if final.exists():  # a rerun of the same step (resume after a crash right after writing)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _point_latest(root, final)
    for old in _complete(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def abort(tmp: Path, step: int, error: OSError, root: Path) -> TrainingError:
    """Remove a half-written checkpoint and build the error that says what survived."""
    shutil.rmtree(tmp, ignore_errors=True)
    previous = latest(root)
    kept = (
        f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists"
    )
    return TrainingError(
        f"could not write the checkpoint of step {step} in {root} ({error.strerror or error}); {kept}",
        hint="free disk space (or point run_dir at a larger disk) and resume with --resume",
    )


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint directory, or None."""
    pointer = root / LATEST_FILE
    if pointer.exists():
        candidate = root / pointer.read_text().strip()
        if (candidate / STATE_FILE).exists():
            return candidate
    complete = _complete(root)
    return complete[-1] if complete else None


def _complete(root: Path) -> list[Path]:
    """The complete checkpoint directories under ``root``, oldest first."""
    return sorted(p for p in root.glob("step-*") if (p / STATE_FILE).exists())


def _point_latest(root: Path, checkpoint: Path | None) -> None:
    """Replace ``latest`` atomically with ``checkpoint``'s name (remove it for None)."""
    if checkpoint is None:
        (root / LATEST_FILE).unlink(missing_ok=True)
    else:
        pointer = root / f".{LATEST_FILE}.tmp"
        pointer.write_text(checkpoint.name + "\n")
        os.replace(pointer, root / LATEST_FILE)
    _fsync_dir(root)


def read_group(path: Path, name: str) -> dict[str, torch.Tensor]:
    """Tensors of one group (``name.safetensors``) of a checkpoint; empty if absent."""
    file = path / f"{name}.safetensors"
    return load_file(str(file)) if file.exists() else {}


def read_state(path: Path) -> dict[str, Any]:
    """The JSON trainer state of a checkpoint."""
    return json.loads((path / STATE_FILE).read_text())


# --- optimizer state without pickle -----------------------------------------------------------


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (safetensors) and JSON (groups, scalars)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    """Inverse of :func:`optimizer_to_tensors`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, entry in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entry)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# --- RNG states -------------------------------------------------------------------------------


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch (CPU, CUDA), numpy and python RNG states as tensors + JSON."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64))
    py_version, py_state, py_gauss = random.getstate()
    meta = {
        "numpy": [kind, int(pos), int(has_gauss), float(cached)],
        "python": [py_version, list(py_state), py_gauss],
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))


def set_aside(root: Path, from_step: int) -> list[Path]:
    """Rename every complete checkpoint of ``from_step`` or later to ``diverged-step-...`` (kept, never
    resumed from) and point ``latest`` at the newest one left (or remove it). Returns the new paths."""
    moved = []
    for path in _complete(root):
        if int(path.name.removeprefix("step-")) >= from_step:
            target = root / f"diverged-{path.name}"
            if target.exists():
                shutil.rmtree(target)
            os.rename(path, target)
            moved.append(target)
    remaining = _complete(root)
    _point_latest(root, remaining[-1] if remaining else None)
    return moved
