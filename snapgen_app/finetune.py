"""Fine-tuning a personal style: the torch-free service side of the distillation wizard.

The application never imports torch or ``training_tools``. It writes a ``TrainConfig`` JSON and runs
``python -m training_tools finetune CONFIG`` in the *training interpreter* (:func:`training_python`)
as a detached subprocess (its own session), so a run survives the window closing. Everything about a
run lives in one folder, ``$SNAPGEN_HOME/runs/<name>/``::

    request.json     the FineTuneRequest (what the wizard asked for)
    config.json      the TrainConfig handed to the trainer
    events.jsonl     the trainer's stdout: JSON-lines events (snapgen_app.progress encoding), appended
                     across pause/resume; :class:`RunHandle` tails it from the start on reattach
    stderr.log       the trainer's stderr (its one-line cause on failure), a LAUNCH_MARK line
                     before each attempt
    process.json     pid of the running trainer (and what it was started for)
    paused|cancelled marker files: why the last stop happened
    dataset/         symlinks to the images + edited .txt captions (only when captions were edited)
    train/           the trainer's run_dir (checkpoints/, samples/, final/)
    bundle/          the exported runtime bundle (int8 + fp32), then moved into the model store
    base-bundle/     the base model exported for the side-by-side comparison (when it has no bundle)

Pause and cancel both send SIGTERM: the trainer finishes its step, writes a checkpoint and exits
with 130; :meth:`RunHandle.resume` continues with ``--resume``. :func:`finish` exports the final
checkpoint through ``python -m snapgen_app export`` (int8 + fp32, parity-checked) and registers the
bundle in the model store with source ``trained`` and the request.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from model_store.bundle import recorded_guidance, recorded_shift
from model_store.errors import StoreError
from model_store.paths import store_home
from model_store.registry import ModelSource, RegisteredModel, Registry, validate_name
from snapgen_app.errors import Cancelled, ConfigError, SnapGenError, TrainingError, UsageError
from snapgen_app.progress import CancelToken, Event, EventCallback, decode_event

STAGE = "finetune"
TRAINING_PYTHON_ENV = "SNAPGEN_TRAIN_PYTHON"
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_EXTENSION = ".txt"
METADATA_FILE = "metadata.jsonl"
#: The line :func:`_launch` writes to ``stderr.log`` before each attempt (start or resume).
LAUNCH_MARK = "--- snapgen: trainer launched"
EXIT_STOPPED = 130  # the trainer's exit code after SIGTERM, with a checkpoint to resume from
#: Component folder names of a checkpoint (docs/bundle-format.md; `vae/` as diffusers names it).
UNET_FOLDERS = ("unet",)
AUTOENCODER_FOLDERS = ("autoencoder", "vae")
TEXT_FOLDERS = ("text_conditioner",)
EXPORT_FOLDERS_REQUIRED = ("unet", "text_conditioner")

RunState = Literal["starting", "running", "finished", "paused", "cancelled", "failed"]


# -- the request -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FineTuneRequest:
    """What the wizard asks for.

    ``images_dir``: folder of images (same-name ``.txt`` captions or ``metadata.jsonl``).
    ``captions``: image file name (relative to ``images_dir``) -> caption, when the user edited
    them (then the run trains on a ``dataset/`` folder of links with those captions; the user's
    folder is left as it is); None = the folder's own captions (file names where missing).
    ``base_model``: a registered model with a checkpoint, or a checkpoint folder.
    ``teacher``: "" = the base model (frozen copy; LoRA distillation regulariser), or a SnapGen
    UNet folder. ``lora_rank`` 0 = full fine-tuning. ``resolution``: training side in pixels.
    ``sample_prompts``/``sample_seeds``: fixed samples every ``sample_every`` steps (0 = 4 times
    per run) and the comparison prompts.
    """

    images_dir: str
    base_model: str
    name: str
    captions: dict[str, str] | None = None
    teacher: str = ""
    steps: int = 300
    lora_rank: int = 8
    resolution: int = 256
    batch_size: int = 2
    learning_rate: float = 1e-4
    seed: int = 0
    sample_prompts: tuple[str, ...] = ()
    sample_seeds: tuple[int, ...] = (0, 1)
    sample_every: int = 0
    sample_steps: int = 8
    cpu_threads: int = 0
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "no"  # "auto": bf16 where the CPU computes in it

    def __post_init__(self) -> None:
        try:
            validate_name(self.name)
        except StoreError as exc:
            raise ConfigError("name", exc.message, hint=exc.hint) from None
        checks = (
            ("images_dir", bool(self.images_dir), "is required (a folder of your images)"),
            ("base_model", bool(self.base_model), "is required (a model with a training checkpoint)"),
            ("steps", 1 <= self.steps <= 1_000_000, f"{self.steps} is out of range (1-1000000)"),
            ("lora_rank", 0 <= self.lora_rank <= 256, f"{self.lora_rank} is out of range (0 = full, 1-256)"),
            (
                "resolution",
                16 <= self.resolution <= 4096 and self.resolution % 8 == 0,
                f"{self.resolution} must be a multiple of 8 in 16-4096",
            ),
            ("batch_size", 1 <= self.batch_size <= 256, f"{self.batch_size} is out of range (1-256)"),
            ("learning_rate", 0 < self.learning_rate < 1, f"{self.learning_rate} must be in (0, 1)"),
            ("sample_seeds", len(self.sample_seeds) >= 1, "give at least one seed"),
            ("sample_steps", 1 <= self.sample_steps <= 100, f"{self.sample_steps} is out of range (1-100)"),
            ("sample_every", self.sample_every >= 0, "must be >= 0 (0 = four times per run)"),
        )
        for name, ok, message in checks:
            if not ok:
                raise ConfigError(name, message)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (tuples as lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> FineTuneRequest:
        """Inverse of :meth:`to_dict`; unknown keys are a ConfigError naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ConfigError("request", f"unknown keys {unknown}", allowed=sorted(names))
        values = dict(raw)
        for key in ("sample_prompts", "sample_seeds"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)

    def prompts(self) -> tuple[str, ...]:
        """The sample/comparison prompts (a default one when none were given)."""
        return self.sample_prompts or ("a picture in my style",)


# -- the images folder -----------------------------------------------------------------------------


def caption_from_filename(name: str) -> str:
    """'red_circle-03.png' -> 'red circle 03' (the trainer's fallback, proposed to the user)."""
    return " ".join(Path(name).stem.replace("_", " ").replace("-", " ").split())


@dataclass(frozen=True)
class ImageEntry:
    """One image of the folder: relative name, caption, where it came from ("txt", "metadata",
    "filename" = proposed), and its size in pixels."""

    name: str
    caption: str
    caption_source: str
    width: int
    height: int


@dataclass(frozen=True)
class FolderReport:
    """What :func:`check_images_folder` found."""

    folder: str
    images: tuple[ImageEntry, ...]
    unreadable: tuple[tuple[str, str], ...] = ()  # (name, reason)
    ignored: int = 0

    @property
    def missing_captions(self) -> dict[str, str]:
        """Image name -> caption proposed from its file name, for images without a caption."""
        return {e.name: e.caption for e in self.images if e.caption_source == "filename"}

    def captions(self) -> dict[str, str]:
        """Image name -> caption (proposals included)."""
        return {e.name: e.caption for e in self.images}

    def summary(self) -> str:
        """One line for people."""
        text = f"{len(self.images)} images"
        if self.missing_captions:
            text += f", {len(self.missing_captions)} without a caption (proposed from the file name)"
        if self.unreadable:
            text += f", {len(self.unreadable)} unreadable (skipped)"
        return text


def read_metadata_captions(folder: Path) -> dict[str, str]:
    """Captions from ``folder/metadata.jsonl`` (diffusers image-folder convention): file_name -> text.

    Shared with the trainer's data loader; UsageError names the first malformed line.
    """
    captions: dict[str, str] = {}
    path = folder / METADATA_FILE
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            captions[str(row["file_name"])] = str(row.get("text", row.get("caption", "")))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UsageError(
                f"{path} line {lineno} is not a JSON object with file_name and text",
                hint='each line must look like {"file_name": "cat.png", "text": "a cat"}',
            ) from None
    return captions


def read_caption(path: Path) -> str:
    """A caption file's text, stripped: UTF-8 (a byte-order mark dropped), else Windows-1252, the
    encoding older Windows editors save in (shared with the trainer's data loader)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace").strip()


def check_images_folder(folder: str | Path) -> FolderReport:
    """List the images of ``folder`` (recursively, like the trainer) with their captions; opens each
    image header to find unreadable ones. Raises UsageError when there is no usable image."""
    from snapgen_app.images import UNREADABLE, checked_size

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UsageError(f"{root} is not a folder", hint="choose the folder that holds your images")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    candidates = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not candidates:
        raise UsageError(
            f"{root} has no images ({len(files)} other files)",
            hint=f"put your pictures there as {', '.join(e.lstrip('.') for e in IMAGE_EXTENSIONS[:4])}",
        )
    shared: dict[Path, list[str]] = {}
    for path in candidates:
        shared.setdefault(path.with_suffix(CAPTION_EXTENSION), []).append(path.relative_to(root).as_posix())
    clashes = [names for names in shared.values() if len(names) > 1]
    if clashes:  # the wizard writes each caption as the .txt beside its image: one file, two captions
        raise UsageError(
            f"{' and '.join(clashes[0])} would share the caption file "
            f"{Path(clashes[0][0]).with_suffix(CAPTION_EXTENSION).as_posix()}"
            + (f" ({len(clashes) - 1} more such names)" if len(clashes) > 1 else ""),
            hint="rename one of them so that every image has a name of its own",
        )
    metadata = read_metadata_captions(root) if (root / METADATA_FILE).is_file() else None
    images: list[ImageEntry] = []
    unreadable: list[tuple[str, str]] = []
    for path in candidates:
        name = path.relative_to(root).as_posix()
        try:
            width, height = checked_size(path)
        except UNREADABLE as exc:
            unreadable.append((name, str(exc) or type(exc).__name__))
            continue
        txt = path.with_suffix(CAPTION_EXTENSION)
        if metadata is not None and name in metadata:
            caption, source = metadata[name], "metadata"
        elif txt.is_file():
            caption, source = read_caption(txt), "txt"
        else:
            caption, source = caption_from_filename(name), "filename"
        images.append(ImageEntry(name, caption, source, width, height))
    if not images:
        raise UsageError(
            f"none of the {len(candidates)} images in {root} can be read (first: {unreadable[0][1]})",
            hint="re-save them as PNG or JPEG",
        )
    ignored = len(files) - len(candidates) - sum(1 for p in files if p.suffix == CAPTION_EXTENSION)
    return FolderReport(str(root), tuple(images), tuple(unreadable), max(0, ignored - (metadata is not None)))


def write_captions(folder: str | Path, captions: Mapping[str, str]) -> list[Path]:
    """Write each caption as the same-name ``.txt`` beside its image in ``folder`` (the format the
    trainer reads); returns the files written. Empty captions are refused."""
    root = Path(folder).expanduser()
    planned: list[tuple[Path, str]] = []
    for name, caption in captions.items():  # every caption checked before any file is written
        text = caption.strip()
        if not text:
            raise ConfigError("captions", f"the caption of {name} is empty")
        image = root / name
        if not image.is_file():
            raise UsageError(f"{image} does not exist", hint="re-check the images folder")
        planned.append((image.with_suffix(CAPTION_EXTENSION), text))
    written: list[Path] = []
    for target, text in planned:
        try:
            target.write_text(text + "\n", encoding="utf-8")
        except OSError as exc:  # a read-only folder (an SD card, a share), a full disk
            raise UsageError(
                f"could not write {target.name} ({len(written)} of {len(planned)} caption files written): "
                f"{exc.strerror or exc}",
                hint="the captions are still used for training; make the folder writable to keep them there",
            ) from None
        written.append(target)
    return written


def _dataset_with_captions(report: FolderReport, captions: Mapping[str, str], out: Path) -> Path:
    """A folder of links to the images with ``captions`` as .txt files (the user's folder untouched)."""
    out.mkdir(parents=True, exist_ok=True)
    proposals = report.captions()
    for entry in report.images:
        source = Path(report.folder) / entry.name
        link = out / entry.name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            try:
                link.symlink_to(source.resolve())
            except OSError:  # no symlinks (Windows without the privilege): copy
                shutil.copy2(source, link)
        caption = (captions.get(entry.name) or proposals[entry.name]).strip()
        link.with_suffix(CAPTION_EXTENSION).write_text(caption + "\n", encoding="utf-8")
    return out


# -- base models -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseModel:
    """A checkpoint to fine-tune: its components, and a runtime bundle for comparisons (a registered
    model name or bundle folder; "" when the base must be exported first)."""

    label: str
    checkpoint: Path
    unet: Path
    autoencoder: Path
    text: Path
    bundle: str = ""
    shift: float = 0.0  # the timestep shift it was trained and samples at (0 = not recorded)
    guidance: float = 1.0  # its default classifier-free guidance (1 = none or not recorded)


def _model_index(index_path: Path) -> dict[str, Any]:
    """A checkpoint's model_index.json ({} when unreadable)."""
    try:
        raw = json.loads(index_path.read_text())
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def _component(checkpoint: Path, names: Sequence[str]) -> Path | None:
    return next((checkpoint / n for n in names if (checkpoint / n / "config.json").is_file()), None)


def inspect_checkpoint(folder: str | Path, label: str = "", bundle: str = "") -> BaseModel:
    """The components of a diffusers-layout SnapGen checkpoint (unet/, autoencoder/ or vae/,
    text_conditioner/ or text_projection/); UsageError naming what is missing."""
    root = Path(folder).expanduser()
    if not (root / "model_index.json").is_file():
        raise UsageError(
            f"{root} is not a training checkpoint (no model_index.json)",
            hint="choose a folder with model_index.json, unet/, autoencoder/ and text_conditioner/",
        )
    parts = {
        "unet": _component(root, UNET_FOLDERS),
        "autoencoder": _component(root, AUTOENCODER_FOLDERS),
        "text": _component(root, TEXT_FOLDERS),
    }
    missing = [k for k, v in parts.items() if v is None]
    if missing:
        raise UsageError(
            f"the checkpoint {root} lacks {', '.join(missing)} (a folder with config.json + safetensors)",
            hint="a SnapGen checkpoint has unet/, autoencoder/ (or vae/) and text_conditioner/",
        )
    return BaseModel(
        label=label or root.name,
        checkpoint=root,
        unet=parts["unet"],  # type: ignore[arg-type]
        autoencoder=parts["autoencoder"],  # type: ignore[arg-type]
        text=parts["text"],  # type: ignore[arg-type]
        bundle=bundle,
        shift=recorded_shift(index := _model_index(root / "model_index.json")) or 0.0,
        guidance=recorded_guidance(index) or 1.0,
    )


def _checkpoint_of(model: RegisteredModel) -> Path | None:
    if model.kind in ("checkpoint", "both"):
        return model.path
    nested = model.path / "checkpoint"  # built-in models ship their student checkpoint there
    return nested if (nested / "model_index.json").is_file() else None


def base_models(registry: Registry | None = None) -> list[BaseModel]:
    """Registered models that have a usable training checkpoint (built-ins included)."""
    found: list[BaseModel] = []
    for model in (registry or Registry()).list():
        checkpoint = _checkpoint_of(model)
        if checkpoint is None:
            continue
        try:
            found.append(inspect_checkpoint(checkpoint, model.name, model.name if model.has_bundle else ""))
        except UsageError:
            continue
    return found


def resolve_base(base_model: str, registry: Registry | None = None) -> BaseModel:
    """A registered model name (with a checkpoint) or a checkpoint folder."""
    for model in base_models(registry):
        if model.label == base_model:
            return model
    path = Path(base_model).expanduser()
    if path.is_dir():
        return inspect_checkpoint(path)
    raise UsageError(
        f"{base_model!r} is neither a registered model with a training checkpoint nor a checkpoint folder",
        hint="pick one of the listed base models or choose a checkpoint folder",
    )


# -- the training interpreter ----------------------------------------------------------------------


def training_python(configured: str | None = None) -> str:
    """The Python that has the ``train`` extra: this one when torch is importable here, else
    ``configured`` (the app's setting) or ``$SNAPGEN_TRAIN_PYTHON``; TrainingError otherwise.

    Only ``importlib.util.find_spec`` looks for torch: it is never imported in this process."""
    for candidate in (configured, os.environ.get(TRAINING_PYTHON_ENV)):
        if candidate:
            if not Path(candidate).expanduser().is_file():
                raise TrainingError(
                    f"the training Python {candidate} does not exist",
                    hint=f"fix the path in Settings or ${TRAINING_PYTHON_ENV}",
                )
            return str(Path(candidate).expanduser())
    if importlib.util.find_spec("torch") is not None:
        return sys.executable
    raise TrainingError(
        "fine-tuning needs the training tools (torch, diffusers, peft), which this installation lacks",
        hint="install them with `pip install 'snapgen-studio[train]'`, or set the path of a Python "
        f"that has them in ${TRAINING_PYTHON_ENV}",
    )


def _child_env() -> dict[str, str]:
    """The trainer's environment: never the current folder on sys.path (the repo's packaging/
    folder would shadow the PyPI package) and the same data folder as ours."""
    env = dict(os.environ)
    env.update({"PYTHONSAFEPATH": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    env["SNAPGEN_HOME"] = str(store_home())
    return env


# -- config ----------------------------------------------------------------------------------------


def runs_dir() -> Path:
    """Where runs live: ``$SNAPGEN_HOME/runs``."""
    return store_home() / "runs"


def run_dir_for(name: str) -> Path:
    return runs_dir() / validate_name(name)


def build_config(request: FineTuneRequest, run_dir: Path, data_path: str, base: BaseModel) -> dict[str, Any]:
    """The TrainConfig (as a JSON dict) of a fine-tuning run."""
    sample_every = request.sample_every or max(1, request.steps // 4)
    config: dict[str, Any] = {
        "stage": STAGE,
        "run_dir": str(run_dir / "train"),
        "seed": request.seed,
        "batch_size": request.batch_size,
        "max_steps": request.steps,
        "mixed_precision": request.mixed_precision,
        "cpu_threads": request.cpu_threads,
        "checkpoint_every": max(1, request.steps // 4),
        "keep_checkpoints": 1,
        "sample_every": sample_every,
        "log_every": 1,
        "data": {"path": data_path, "resolution": request.resolution},
        "model": {
            "unet_path": str(base.unet),
            "autoencoder_path": str(base.autoencoder),
            "text_path": str(base.text),
            "train_text": False,
            "text_dropout": 0.1,
        },
        "lora": {"rank": request.lora_rank, "alpha": float(max(1, request.lora_rank))},
        "optim": {"lr": request.learning_rate, "ema": request.lora_rank == 0},
        # Fine-tune at the timestep shift the base was trained at (else the trainer's resolution shift).
        "flow": {"shift": base.shift},
        # Samples, and the fine-tuned model's default, at the guidance the base generates with.
        "sample": {
            "prompts": list(request.prompts()),
            "seeds": list(request.sample_seeds),
            "steps": request.sample_steps,
            "guidance_scale": base.guidance,
        },
    }
    if request.teacher:
        teacher = Path(request.teacher).expanduser()
        if (teacher / "unet" / "config.json").is_file():  # a whole checkpoint: its UNet teaches
            teacher = teacher / "unet"
        config["teacher"] = {"kind": "snapgen", "path": str(teacher)}
    return config


# -- estimate --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """The trainer's dry-run estimate for this machine (memory in GiB, time in seconds)."""

    memory_gib: float
    available_gib: float
    seconds_per_step: float
    total_seconds: float
    params_m: float
    trainable_m: float
    message: str

    @property
    def fits(self) -> bool:
        return self.available_gib <= 0 or self.memory_gib <= self.available_gib


def available_memory_gib() -> float:
    """Memory available to a new process now (Linux MemAvailable; total physical memory elsewhere)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / 2**30
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return 0.0


def _trainer_error(stderr: str, returncode: int) -> TrainingError:
    lines = [line for line in stderr.splitlines() if line.strip()]
    cause = next((line for line in reversed(lines) if "training_tools: error:" in line), None)
    if cause is not None:
        return TrainingError(cause.split("training_tools: error:", 1)[1].strip())
    tail = lines[-1] if lines else f"exit code {returncode}"
    return TrainingError(f"the trainer failed: {tail}", hint="see the run's stderr.log")


def estimate(
    request: FineTuneRequest,
    *,
    python: str | None = None,
    registry: Registry | None = None,
    cancel: CancelToken | None = None,
    timeout_s: float = 600.0,
) -> Estimate:
    """Run ``python -m training_tools finetune CFG --dry-run`` and parse its estimate. Raises
    TrainingError with the trainer's cause when the run does not fit this machine's memory."""
    base = resolve_base(request.base_model, registry)
    check_images_folder(request.images_dir)
    with tempfile.TemporaryDirectory(prefix="snapgen-estimate-") as tmp:
        config = build_config(request, Path(tmp) / "run", str(Path(request.images_dir).expanduser()), base)
        cfg_path = Path(tmp) / "config.json"
        cfg_path.write_text(json.dumps(config), encoding="utf-8")
        command = [training_python(python), "-m", "training_tools", STAGE, str(cfg_path), "--dry-run"]
        stdout, stderr, code = _run_child(command, cancel, timeout_s)
    if code != 0:
        raise _trainer_error(stderr, code)
    for line in stdout.splitlines():
        try:
            event = decode_event(line)
        except ValueError:
            continue
        numbers = event.data.get("estimate")
        if isinstance(numbers, dict):
            per_step = float(numbers["seconds_per_step"])
            return Estimate(
                memory_gib=float(numbers["memory_gib"]),
                available_gib=available_memory_gib(),
                seconds_per_step=per_step,
                total_seconds=per_step * request.steps,
                params_m=float(numbers["params_m"]),
                trainable_m=float(numbers["trainable_m"]),
                message=event.message,
            )
    raise TrainingError("the trainer's dry run printed no estimate", hint="see its output: " + stdout[-300:])


def _run_child(command: list[str], cancel: CancelToken | None, timeout_s: float) -> tuple[str, str, int]:
    """Run a child to the end (killed on cancel or timeout); (stdout, stderr, return code)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(
            command, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=_child_env(), text=True
        )
        deadline = time.monotonic() + timeout_s
        while child.poll() is None:
            if (cancel is not None and cancel.cancelled) or time.monotonic() > deadline:
                child.kill()
                child.wait()
                if cancel is not None and cancel.cancelled:
                    raise Cancelled("cancelled by the user")
                raise TrainingError(f"{' '.join(command[1:4])} took more than {timeout_s:.0f} s")
            time.sleep(0.05)
        out.seek(0)
        err.seek(0)
        return out.read(), err.read(), int(child.returncode)


# -- runs ------------------------------------------------------------------------------------------

#: Trainer processes started by this process, by pid: polling them reaps them (no zombies), and a
#: handle made by ``attach`` in the same process sees the same child.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _pid_alive(pid: int) -> bool:
    child = _CHILDREN.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():  # a recycled pid runs something else
        try:
            return b"training_tools" in cmdline.read_bytes()
        except OSError:
            return False
    return True


@dataclass
class RunHandle:
    """A fine-tuning run folder and (maybe) its live trainer process. ``poll()`` returns the events
    appended to ``events.jsonl`` since the last call (from the start after ``attach``)."""

    run_dir: Path
    request: FineTuneRequest
    pid: int | None = None
    _offset: int = 0
    _buffer: str = ""
    history: list[Event] = field(default_factory=list)
    #: index in ``history`` where the latest launch (start or resume) of this process began: the
    #: endings of earlier attempts are not this attempt's
    _launch_index: int = 0

    # -- files --------------------------------------------------------------------------------

    @property
    def events_path(self) -> Path:
        return self.run_dir / "events.jsonl"

    @property
    def train_dir(self) -> Path:
        return self.run_dir / "train"

    @property
    def final_checkpoint(self) -> Path:
        return self.train_dir / "final"

    @property
    def bundle_dir(self) -> Path:
        return self.run_dir / "bundle"

    @property
    def name(self) -> str:
        return self.request.name

    # -- events --------------------------------------------------------------------------------

    def poll(self) -> list[Event]:
        """Events written since the last poll (complete lines only; foreign lines are skipped)."""
        try:
            with open(self.events_path, "rb") as handle:
                handle.seek(self._offset)
                chunk = handle.read()
        except FileNotFoundError:
            return []
        self._offset += len(chunk)
        text = self._buffer + chunk.decode("utf-8", errors="replace")
        lines = text.split("\n")
        self._buffer = lines.pop()  # an unfinished line waits for the next poll
        events = []
        for line in lines:
            try:
                events.append(decode_event(line))
            except ValueError:
                continue
        self.history.extend(events)
        return events

    def events(
        self, cancel: CancelToken | None = None, interval_s: float = 0.2, timeout_s: float | None = None
    ) -> Iterator[Event]:
        """Yield events as they come until the process has exited and the file is read to its end
        (or ``cancel`` fires: that only stops watching, the run goes on)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            alive = self.alive()
            yield from self.poll()
            if not alive:
                yield from self.poll()
                return
            if cancel is not None and cancel.cancelled:
                return
            if deadline is not None and time.monotonic() > deadline:
                return
            time.sleep(interval_s)

    def alive(self) -> bool:
        """True while the trainer process runs."""
        return self.pid is not None and _pid_alive(self.pid)

    def wait(self, timeout_s: float = 600.0) -> RunState:
        """Block until the trainer exits (reading events); the final state."""
        for _ in self.events(timeout_s=timeout_s):
            pass
        return self.state()

    # -- state -----------------------------------------------------------------------------------

    def last_terminal(self) -> Event | None:
        """The finished/error/cancelled event of the latest attempt; None when it has none (still
        running, or it died without a word: killed, crashed in native code, power loss)."""
        for event in reversed(self.history[self._launch_index :]):
            if event.kind in ("finished", "error", "cancelled"):
                return event
            if event.kind == "started":  # each launch starts with one: older endings are not ours
                return None
        return None

    def state(self) -> RunState:
        """running, finished, paused (resumable), cancelled, failed, or starting (no event yet)."""
        if self.alive():
            return "running" if self.history else "starting"
        self.poll()
        last = self.last_terminal()
        if last is not None and last.kind == "finished" and self.final_checkpoint.is_dir():
            return "finished"
        if (self.run_dir / "cancelled").exists():
            return "cancelled"
        # a pause before the trainer installed its SIGTERM handler leaves no terminal event
        if (self.run_dir / "paused").exists() or (last is not None and last.kind == "cancelled"):
            return "paused"
        return "failed"

    def failure(self) -> str:
        """Why the run failed, for people: its error event, the trainer's one-line cause on stderr,
        else how the process ended (exit code or signal) with the last lines of ``stderr.log``."""
        last = self.last_terminal()
        if last is not None and last.kind == "error" and last.message:
            return last.message
        tail = self.log_tail()
        cause = next((line for line in reversed(tail) if "training_tools: error:" in line), None)
        if cause is not None:
            return cause.split("training_tools: error:", 1)[1].strip()
        text = _how_it_ended(self.pid)
        if tail:
            text += "; the end of its log: " + " / ".join(tail[-3:])
        return text + f" (full log: {self.run_dir / 'stderr.log'})"

    def log_tail(self, lines: int = 20, width: int = 300) -> list[str]:
        """The last ``lines`` non-empty lines the latest attempt wrote to ``stderr.log`` (each cut
        to ``width`` characters); [] when there is none."""
        try:
            with open(self.run_dir / "stderr.log", "rb") as handle:
                handle.seek(max(0, handle.seek(0, os.SEEK_END) - 64 * 1024))  # a long log: its end
                text = handle.read().decode("utf-8", errors="replace")
        except OSError:
            return []
        _, mark, after = text.rpartition(LAUNCH_MARK)
        if mark:  # an earlier attempt's cause is not this one's
            text = after.partition("\n")[2]
        # progress bars (tqdm's "50%|#####|") say nothing about why it stopped
        kept = [
            line.rstrip() for line in text.splitlines() if line.strip() and not _PROGRESS_BAR.search(line)
        ]
        return [line if len(line) <= width else line[: width - 1] + "…" for line in kept[-lines:]]

    def losses(self) -> list[tuple[int, dict[str, float]]]:
        """(step, loss terms) of every progress event read so far (a resumed step: last wins)."""
        by_step: dict[int, dict[str, float]] = {}
        for event in self.history:
            if event.kind == "progress" and isinstance(event.data.get("loss"), dict):
                by_step[event.step] = {k: float(v) for k, v in event.data["loss"].items() if v is not None}
        return sorted(by_step.items())

    def samples(self) -> list[tuple[int, list[str]]]:
        """(step, sample image paths) of every preview event read so far."""
        return [
            (e.step, [str(p) for p in e.data.get("samples", [])]) for e in self.history if e.kind == "preview"
        ]

    # -- control ---------------------------------------------------------------------------------

    def _signal(self, marker: str) -> bool:
        # The marker says why the trainer stopped; on a full disk the signal matters more.
        with contextlib.suppress(OSError):
            for name in ("paused", "cancelled"):
                (self.run_dir / name).unlink(missing_ok=True)
            (self.run_dir / marker).write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
        if not self.alive() or self.pid is None:
            return False
        try:  # the whole session: accelerate may have started workers
            os.killpg(self.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError, AttributeError):
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                return False
        return True

    def pause(self) -> bool:
        """Stop at the next step with a checkpoint (SIGTERM); :meth:`resume` continues. False when
        the trainer was not running."""
        return self._signal("paused")

    def cancel(self) -> bool:
        """Stop the run (SIGTERM: it still checkpoints, so it can be resumed later)."""
        return self._signal("cancelled")

    def resume(self, python: str | None = None) -> RunHandle:
        """Start the trainer again with ``--resume`` (events keep being appended)."""
        if self.alive():
            raise TrainingError(f"run {self.name} is still running", hint="pause it first")
        # a trainer that stopped before it made its run folder starts over
        again = (self.train_dir / "train_config.json").is_file()
        try:
            return _launch(self, python, resume=again)
        except OSError as exc:  # a full disk, a training Python that cannot be executed
            raise TrainingError(
                f"could not start the run {self.name!r} again: {exc}",
                hint="free some disk space or check the training Python in Settings, then retry",
            ) from None


_PROGRESS_BAR = re.compile(r"\d+%\|")


def _how_it_ended(pid: int | None) -> str:
    """How a trainer that left no error ended: its exit code or signal when this process started
    it, else only that it stopped (started by an earlier session of the app)."""
    child = _CHILDREN.get(pid) if pid is not None else None
    code = child.poll() if child is not None else None
    if code is None:
        return "the trainer stopped without reporting an error"
    if code >= 0:
        return f"the trainer exited with code {code} without reporting an error"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    text = f"the trainer was killed by {name} without reporting an error"
    if -code == getattr(signal, "SIGKILL", 9):
        text += " (the system does this when memory runs out)"
    return text


def _end_partial_line(path: Path) -> None:
    """A trainer killed while writing leaves half a line: end it, so the next attempt's first event
    is not glued to it (the half line is then skipped as foreign)."""
    try:
        with open(path, "rb+") as handle:
            if handle.seek(0, os.SEEK_END) > 0:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    handle.write(b"\n")
    except FileNotFoundError:
        pass


def _launch(handle: RunHandle, python: str | None, *, resume: bool) -> RunHandle:
    for name in ("paused", "cancelled"):
        (handle.run_dir / name).unlink(missing_ok=True)
    _end_partial_line(handle.events_path)
    handle.poll()
    handle._launch_index = len(handle.history)
    command = [training_python(python), "-m", "training_tools", STAGE, str(handle.run_dir / "config.json")]
    if resume:
        command.append("--resume")
    with open(handle.events_path, "ab") as out, open(handle.run_dir / "stderr.log", "ab") as err:
        mode = "resume" if resume else "start"
        err.write(f"{LAUNCH_MARK} ({mode}) {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode())
        err.flush()  # before the child writes to the same file
        child = subprocess.Popen(
            command,
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            cwd=handle.run_dir,
            env=_child_env(),
            start_new_session=True,  # survives the window (and a Ctrl-C in its terminal)
        )
    _CHILDREN[child.pid] = child
    handle.pid = child.pid
    process = {"pid": child.pid, "command": command, "started": time.time(), "resume": resume}
    try:
        (handle.run_dir / "process.json").write_text(json.dumps(process), encoding="utf-8")
    except OSError:  # a full disk: no trainer may run on that its caller reports as not started
        with contextlib.suppress(OSError):
            os.killpg(child.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=30)
        raise
    return handle


def start(
    request: FineTuneRequest, *, python: str | None = None, registry: Registry | None = None
) -> RunHandle:
    """Write the run folder and start the trainer as a detached subprocess."""
    run_dir = run_dir_for(request.name)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise TrainingError(
            f"a run named {request.name!r} already exists in {run_dir}",
            hint="reattach to it, pick another name, or delete that folder",
        )
    try:
        if (registry or Registry()).get(request.name) is not None:
            raise TrainingError(
                f"a model named {request.name!r} is already installed", hint="pick another name"
            )
    except StoreError:
        pass
    base = resolve_base(request.base_model, registry)
    report = check_images_folder(request.images_dir)
    interpreter = training_python(python)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        data_path = report.folder
        if request.captions is not None:
            data_path = str(_dataset_with_captions(report, request.captions, run_dir / "dataset"))
        config = build_config(request, run_dir, data_path, base)
        (run_dir / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        saved = request.to_dict()
        saved["base_model"] = request.base_model
        (run_dir / "request.json").write_text(json.dumps(saved, indent=2), encoding="utf-8")
        (run_dir / "base.json").write_text(
            json.dumps({"checkpoint": str(base.checkpoint), "bundle": base.bundle, "label": base.label}),
            encoding="utf-8",
        )
        return _launch(RunHandle(run_dir, request), interpreter, resume=False)
    except OSError as exc:  # a full disk, a folder without write permission, a trainer that cannot start
        # The folder was new (or empty): a half-written one would block this name for every retry.
        shutil.rmtree(run_dir, ignore_errors=True)
        raise TrainingError(
            f"could not start the run {request.name!r}: {exc}",
            hint=f"nothing was kept; free some disk space or check that {run_dir.parent} is writable, then start again",
        ) from None


def attach(run_dir: str | Path) -> RunHandle:
    """A handle on an existing run folder; its events are read again from the start."""
    root = Path(run_dir)
    try:
        request = FineTuneRequest.from_dict(json.loads((root / "request.json").read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise TrainingError(f"{root} is not a fine-tuning run (no request.json)") from None
    except (ValueError, TypeError, OSError) as exc:  # not JSON, not UTF-8, unreadable
        raise TrainingError(f"{root / 'request.json'} is unreadable: {exc}") from None
    pid = None
    try:
        pid = int(json.loads((root / "process.json").read_text(encoding="utf-8"))["pid"])
    except (FileNotFoundError, KeyError, ValueError, TypeError, json.JSONDecodeError):
        pid = None
    handle = RunHandle(root, request, pid)
    handle.poll()
    return handle


def list_runs() -> list[RunHandle]:
    """Every run under ``$SNAPGEN_HOME/runs``, newest first."""
    root = runs_dir()
    if not root.is_dir():
        return []
    handles = []
    for folder in root.iterdir():
        if (folder / "request.json").is_file():
            try:
                handles.append(attach(folder))
            except SnapGenError:  # one damaged or outdated run folder must not hide the others
                continue
    return sorted(handles, key=lambda h: (h.run_dir / "request.json").stat().st_mtime, reverse=True)


def running_run() -> RunHandle | None:
    """The newest run whose trainer is alive, else the newest unfinished-but-resumable or finished
    run not yet registered (what the wizard reattaches to); None when there is none."""
    runs = [h for h in list_runs() if not (h.run_dir / "registered.json").exists()]
    live = next((h for h in runs if h.alive()), None)
    return live if live is not None else next(iter(runs), None)


# -- export, comparison, register -------------------------------------------------------------------


@dataclass(frozen=True)
class ExportSettings:
    """Arguments of ``snapgen export`` (fewer calibration runs / torchscript keep tests fast)."""

    precisions: tuple[str, ...] = ("int8", "fp32")
    calib_prompts: int = 4
    calib_steps: int = 8
    exporter: Literal["dynamo", "torchscript"] = "dynamo"

    def arguments(self) -> list[str]:
        return [
            "--precision",
            ",".join(self.precisions),
            "--calib-prompts",
            str(self.calib_prompts),
            "--calib-steps",
            str(self.calib_steps),
            "--exporter",
            self.exporter,
        ]


def export_checkpoint(
    checkpoint: Path,
    out: Path,
    name: str,
    settings: ExportSettings = ExportSettings(),
    *,
    python: str | None = None,
    on_event: EventCallback | None = None,
    cancel: CancelToken | None = None,
    calibration_prompts: Sequence[str] = (),
) -> Path:
    """``python -m snapgen_app export CHECKPOINT --out OUT`` in the training interpreter; its log
    lines become ``log`` events (stage "export"). Returns ``out``; a finished ``out`` is reused.

    ``calibration_prompts``: int8 calibration on these (the run's own captions) instead of the
    exporter's generic prompts (on the built-in emoji model, calibrating on its own world's captions
    along guided trajectories raised int8 single-object accuracy at 4 steps from 36.25 to 43.75 %,
    fp32 42.5 %; docs/training.md)."""
    if (out / "bundle.json").is_file():
        return out
    command = [training_python(python), "-m", "snapgen_app", "export", str(checkpoint), "--out", str(out)]
    command += ["--name", name, *settings.arguments()]
    out.parent.mkdir(parents=True, exist_ok=True)
    if calibration_prompts:
        prompt_file = out.parent / f"{out.name}-calibration-prompts.txt"
        prompt_file.write_text("\n".join(calibration_prompts) + "\n", encoding="utf-8")
        command += ["--calib-prompt-file", str(prompt_file)]
    with tempfile.TemporaryFile("w+") as err:
        # cwd: the quantizer writes scratch files into the current folder; two exports sharing one
        # folder would overwrite each other's
        child = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=_child_env(),
            cwd=out.parent,
            text=True,
        )
        seen = 0
        while child.poll() is None:
            if cancel is not None and cancel.cancelled:
                child.terminate()
                child.wait()
                raise Cancelled("export cancelled by the user")
            seen = _forward_log(err, seen, on_event)
            time.sleep(0.1)
        _forward_log(err, seen, on_event)
        err.seek(0)
        stderr = err.read()
    if child.returncode != 0:
        lines = [line.strip() for line in stderr.splitlines() if line.strip()]
        causes = [line for line in lines if line.startswith("snapgen:") or "Error" in line] or lines
        raise TrainingError(
            f"exporting {checkpoint} failed: {causes[-1] if causes else f'exit code {child.returncode}'}",
            hint="see the export log above; the checkpoint is kept, so you can export it again",
        )
    return out


def _forward_log(stream: Any, seen: int, on_event: EventCallback | None) -> int:
    stream.seek(0)
    lines = stream.read().splitlines()
    for line in lines[seen:]:
        if on_event is not None and line.startswith("export:"):
            on_event(Event(kind="log", stage="export", message=line[len("export:") :].strip()))
    return len(lines)


def export_run(
    run_dir: str | Path,
    settings: ExportSettings = ExportSettings(),
    *,
    python: str | None = None,
    on_event: EventCallback | None = None,
    cancel: CancelToken | None = None,
) -> Path:
    """Export the run's final checkpoint to ``run_dir/bundle`` (int8 + fp32 by default)."""
    handle = attach(run_dir)
    if not handle.final_checkpoint.is_dir():
        raise TrainingError(
            f"run {handle.name} has no final checkpoint yet (state: {handle.state()})",
            hint="let the training finish (or resume it) first",
        )
    return export_checkpoint(
        handle.final_checkpoint,
        handle.bundle_dir,
        handle.name,
        settings,
        python=python,
        on_event=on_event,
        cancel=cancel,
        calibration_prompts=run_calibration_prompts(handle.request, settings.calib_prompts),
    )


def run_calibration_prompts(request: FineTuneRequest, count: int) -> list[str]:
    """Up to ``count`` prompts of the run's own world: its sample prompts, then its captions."""
    captions = dict(request.captions or {})
    if not captions:
        try:
            captions = check_images_folder(request.images_dir).captions()
        except SnapGenError:  # the folder moved since training: the sample prompts still count
            captions = {}
    prompts = [p.strip() for p in (*request.prompts(), *sorted(captions.values())) if p.strip()]
    return list(dict.fromkeys(prompts))[: max(1, count)]


def base_bundle(
    run_dir: str | Path,
    settings: ExportSettings = ExportSettings(precisions=("fp32",)),
    *,
    python: str | None = None,
    on_event: EventCallback | None = None,
    cancel: CancelToken | None = None,
) -> str:
    """A runtime bundle of the run's base model for comparisons: its registered name when it has
    one, else the base checkpoint exported once to ``run_dir/base-bundle``."""
    root = Path(run_dir)
    info = json.loads((root / "base.json").read_text(encoding="utf-8"))
    if info.get("bundle"):
        return str(info["bundle"])
    checkpoint = Path(info["checkpoint"])
    missing = [f for f in EXPORT_FOLDERS_REQUIRED if not (checkpoint / f).is_dir()]
    if missing:
        raise TrainingError(
            f"the base checkpoint {checkpoint} cannot be exported for the comparison (no {', '.join(missing)}/)",
            hint="register a base model that has a runtime bundle",
        )
    out = export_checkpoint(
        checkpoint, root / "base-bundle", "base", settings, python=python, on_event=on_event, cancel=cancel
    )
    return str(out)


def register_run(
    run_dir: str | Path, name: str | None = None, registry: Registry | None = None
) -> RegisteredModel:
    """Install the run's exported bundle as model ``name`` (default: the request's), source
    ``trained`` with the request; the bundle folder is moved into the store."""
    handle = attach(run_dir)
    if not (handle.bundle_dir / "bundle.json").is_file():
        raise TrainingError(f"run {handle.name} has not been exported yet", hint="export it first")
    store = registry or Registry()
    model = store.install(
        handle.bundle_dir,
        name or handle.name,
        source=ModelSource(type="trained", request=handle.request.to_dict()),
        move=True,
    )
    (handle.run_dir / "registered.json").write_text(json.dumps({"name": model.name}), encoding="utf-8")
    return model


def finish(
    run_dir: str | Path,
    name: str | None = None,
    settings: ExportSettings = ExportSettings(),
    *,
    python: str | None = None,
    registry: Registry | None = None,
    on_event: EventCallback | None = None,
    cancel: CancelToken | None = None,
) -> RegisteredModel:
    """Export (int8 + fp32, parity-checked) and register the finished run; the new model's entry."""
    export_run(run_dir, settings, python=python, on_event=on_event, cancel=cancel)
    if cancel is not None:
        cancel.raise_if_cancelled()
    return register_run(run_dir, name, registry)


def comparison_settings(request: FineTuneRequest) -> list[tuple[str, int]]:
    """(prompt, seed) pairs of the side-by-side comparison: the sample prompts at the sample seeds."""
    return [(p, s) for p in request.prompts() for s in request.sample_seeds]


__all__ = [
    "BaseModel",
    "Estimate",
    "ExportSettings",
    "FineTuneRequest",
    "FolderReport",
    "ImageEntry",
    "RunHandle",
    "attach",
    "base_bundle",
    "base_models",
    "check_images_folder",
    "comparison_settings",
    "estimate",
    "export_run",
    "finish",
    "list_runs",
    "register_run",
    "resolve_base",
    "running_run",
    "start",
    "training_python",
    "write_captions",
]
