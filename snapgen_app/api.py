"""Request, result and event messages of the generation API (``snapgen_app.service.generate``).

Torch-free and Qt-free: the command line, the Qt worker and tests all build a
:class:`GenerationRequest`, call ``service.generate(request, on_event, cancel)`` and get a
:class:`GenerationResult` back.

Progress design (decided here): :class:`snapgen_app.progress.Event` stays the single message type
for started / progress / log / finished / error / cancelled. A denoising step is an Event with
``kind="progress"``, ``stage="generate"``, ``step``/``total`` set and ``data={"t": float, "preview":
uint8 array [H, W, 3] or None}``. :class:`StepEvent` is the typed view of that payload:
``StepEvent.from_event(event)`` and ``step_event.to_event()`` convert both ways, so the UI works with
a typed object while anything that only understands ``Event`` still works. Preview arrays are an
in-process payload; they are not meant for ``progress.encode_event`` (JSON lines).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np

from snapgen_app.errors import ConfigError
from snapgen_app.progress import Event

Precision = Literal["auto", "int8", "fp16", "fp32"]
Device = Literal["auto", "cpu", "cuda", "dml", "coreml"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
DEVICES: tuple[str, ...] = get_args(Device)
MIN_STEPS = 1
MAX_STEPS = 50
MAX_SEED = 2**63 - 1
MAX_IMAGES = 64
MIN_SIZE, MAX_SIZE = 8, 4096  # pixels, width and height
#: Timestep shift and guidance beyond these give no useful image (and inf or NaN in the sampler).
MIN_SHIFT, MAX_SHIFT = 0.01, 100.0
MAX_GUIDANCE = 100.0
GENERATE_STAGE = "generate"


@dataclass(frozen=True)
class GenerationRequest:
    """Everything that decides an image; stored in full in every PNG written for it.

    ``model`` is a registered model name, a bundle directory path, or ``""`` for the default model.
    ``None`` for steps/width/height/shift/guidance_scale means "the bundle's default";
    ``seed=None`` means a random seed, recorded in the result. Image ``i`` of a request uses seed
    ``seed + i``, so a batch of N equals N single runs with those seeds. ``output_paths`` (one per
    image) wins over ``output_dir``; with neither, images go to the data directory's ``outputs``.
    ``threads`` is ONNX Runtime's intra-op thread count (None: its default).
    """

    prompt: str
    model: str = ""
    steps: int | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    num_images: int = 1
    precision: Precision = "auto"
    device: Device = "auto"
    shift: float | None = None
    guidance_scale: float | None = None
    preview: bool = False
    threads: int | None = None
    output_dir: str | None = None
    output_paths: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError (a UsageError) naming the first bad field; bundle-dependent checks
        (size stride, precision present) happen in the service once the model is known."""
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ConfigError("prompt", "is empty", hint="describe the image you want, e.g. 'a red apple'")
        if self.steps is not None and not (MIN_STEPS <= self.steps <= MAX_STEPS):
            raise ConfigError("steps", f"{self.steps} is out of range", allowed=f"{MIN_STEPS}-{MAX_STEPS}")
        if self.seed is not None and not (0 <= self.seed <= MAX_SEED):
            raise ConfigError("seed", f"{self.seed} is out of range", allowed=f"0-{MAX_SEED}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and not (MIN_SIZE <= value <= MAX_SIZE):
                raise ConfigError(name, f"{value} is out of range", allowed=f"{MIN_SIZE}-{MAX_SIZE} pixels")
        if not (1 <= self.num_images <= MAX_IMAGES):
            raise ConfigError("num_images", f"{self.num_images} is out of range", allowed=f"1-{MAX_IMAGES}")
        if self.precision not in PRECISIONS:
            raise ConfigError("precision", f"{self.precision!r} is not allowed", allowed=list(PRECISIONS))
        if self.device not in DEVICES:
            raise ConfigError("device", f"{self.device!r} is not allowed", allowed=list(DEVICES))
        if self.shift is not None and not MIN_SHIFT <= self.shift <= MAX_SHIFT:  # NaN and inf fail too
            raise ConfigError(
                "shift", f"{self.shift} is out of range", allowed=f"{MIN_SHIFT:g}-{MAX_SHIFT:g}"
            )
        if self.guidance_scale is not None and not 0 <= self.guidance_scale <= MAX_GUIDANCE:
            raise ConfigError(
                "guidance_scale", f"{self.guidance_scale} is out of range", allowed=f"0-{MAX_GUIDANCE:g}"
            )
        if self.threads is not None and not (1 <= self.threads <= 256):
            raise ConfigError("threads", f"{self.threads} is out of range", allowed="1-256")
        if self.output_paths and len(self.output_paths) != self.num_images:
            raise ConfigError(
                "output_paths",
                f"{len(self.output_paths)} paths given for {self.num_images} images",
                hint="give one path per image, or an output directory",
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (tuples become lists)."""
        raw = dataclasses.asdict(self)
        raw["output_paths"] = list(self.output_paths)
        return raw

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> GenerationRequest:
        """Inverse of :meth:`to_dict`; unknown keys raise ConfigError naming the key."""
        if not isinstance(raw, dict):
            raise ConfigError("GenerationRequest", f"expected an object, got {type(raw).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ConfigError(f"GenerationRequest.{unknown[0]}", "unknown field", allowed=sorted(names))
        values = dict(raw)
        if "output_paths" in values:
            values["output_paths"] = tuple(values["output_paths"] or ())
        try:
            return cls(**values)
        except TypeError as exc:  # the prompt is missing
            raise ConfigError("GenerationRequest", str(exc)) from None

    def replace(self, **changes: Any) -> GenerationRequest:
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class StepEvent:
    """One denoising step: ``step`` in 1..total, ``t`` the flow time the UNet saw (1 -> 0), and an
    optional cheap preview of the first image's current x0 estimate as uint8 [H, W, 3]."""

    step: int
    total: int
    t: float
    preview: np.ndarray | None = None

    def to_event(self) -> Event:
        """The Event sent to ``on_event`` for this step."""
        return Event(
            kind="progress",
            stage=GENERATE_STAGE,
            step=self.step,
            total=self.total,
            data={"t": self.t, "preview": self.preview},
        )

    @classmethod
    def from_event(cls, event: Event) -> StepEvent:
        """Typed view of a generation progress Event (raises ValueError for any other event)."""
        if event.kind != "progress" or event.stage != GENERATE_STAGE or "t" not in event.data:
            raise ValueError(f"not a generation step event: {event.kind}/{event.stage}")
        return cls(
            step=event.step, total=event.total, t=float(event.data["t"]), preview=event.data.get("preview")
        )


@dataclass(frozen=True)
class GenerationResult:
    """What one ``generate`` call produced.

    ``images``: written PNG paths, one per image, same order as ``seeds``. ``timings``: seconds per
    component ("load", "text_encoder", "unet", "unet_per_step", "decoder", "write", "total").
    ``provider``: the ONNX Runtime provider that actually ran the UNet. ``request``: the request as
    resolved (defaults filled in, the base seed set). ``metadata``: the text chunks written into the
    first PNG. ``warnings``: things the user should know (e.g. a truncated prompt).
    """

    images: tuple[str, ...]
    seeds: tuple[int, ...]
    timings: dict[str, float]
    provider: str
    precision: str
    bundle_hash: str
    model_name: str
    request: GenerationRequest
    metadata: dict[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (for ``snapgen generate --json``)."""
        return {
            "images": list(self.images),
            "seeds": list(self.seeds),
            "timings": dict(self.timings),
            "provider": self.provider,
            "precision": self.precision,
            "bundle_hash": self.bundle_hash,
            "model_name": self.model_name,
            "request": self.request.to_dict(),
            "metadata": dict(self.metadata),
            "warnings": list(self.warnings),
        }
