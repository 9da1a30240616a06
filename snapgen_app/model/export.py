"""Export of the three runtime components to ONNX, with a parity check against torch.

One function per component, each writing one ``.onnx`` file with the IO names of the bundle format:

- :func:`export_unet`: inputs ``sample`` [B,C,h,w], ``timestep`` [B], ``encoder_hidden_states``
  [B,L,D] (+ ``pooled_text`` [B,P] when the model has it); output ``velocity`` [B,C,h,w].
- :func:`export_decoder`: input ``latent`` [B,C,h,w]; output ``image`` [B,3,H,W].
- :func:`export_text_encoder`: inputs ``input_ids``/``attention_mask`` [B,L] int64; outputs
  ``tokens`` [B,L,D] and ``pooled`` [B,P] float32.

Export uses ``torch.onnx.export(dynamo=True)`` (the TorchScript exporter fails on SDPA with
``enable_gqa``), opset 18 (GroupNorm as InstanceNormalization, 15 % faster than opset 21's
GroupNormalization and friendlier to quantization), dynamic batch/spatial/token axes where the graph
allows (falling back to static shapes with a warning), and external data above 2 GB.

:func:`check_parity` runs a variant in onnxruntime on fixed seeded inputs (several timesteps for the
UNet) and compares it with the torch fp32 output; :class:`ExportError` when the drift passes the
variant's threshold. The thresholds and measured values go into the bundle manifest.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from model_store.bundle import CHECKPOINT_DEFAULTS_KEY
from snapgen_app.errors import ExportError
from snapgen_app.model.quantize import EXTERNAL_DATA_THRESHOLD_BYTES, Feeds, make_session, psnr_db

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
UNET_PARITY_TIMESTEPS: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25, 0.05)

Metric = Literal["max_abs_diff", "psnr_db"]


# ---------------------------------------------------------------------------------------------
# Parity


@dataclasses.dataclass(frozen=True)
class ParitySpec:
    """How a variant is compared with torch fp32.

    ``max_abs_diff``: max |onnx - torch| divided by max(1, max |torch|); passes when <= threshold.
    ``psnr_db``: PSNR of onnx against torch with torch's range as the peak; passes when >= threshold.
    The worst value over all parity inputs and outputs counts.
    """

    metric: Metric
    threshold: float

    def passes(self, value: float) -> bool:
        if self.metric == "max_abs_diff":
            return value <= self.threshold
        return value >= self.threshold


# Per-variant defaults. fp32 must match torch to float rounding; fp16 and int8 are judged by PSNR.
# int8 single-step PSNR on random inputs is a floor against broken graphs; the quality target
# (>= 30 dB over a whole trajectory of a trained model) is measured by the benchmark.
DEFAULT_PARITY: dict[str, ParitySpec] = {
    "fp32": ParitySpec("max_abs_diff", 1e-3),
    "fp16": ParitySpec("psnr_db", 35.0),
    "int8": ParitySpec("psnr_db", 20.0),
}


@dataclasses.dataclass(frozen=True)
class ParityResult:
    """Outcome of one parity check: metric, worst value, threshold, number of inputs compared."""

    component: str
    metric: Metric
    value: float
    threshold: float
    inputs: int

    @property
    def passed(self) -> bool:
        return ParitySpec(self.metric, self.threshold).passes(self.value)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (an infinite PSNR, from bit-identical outputs, is written as 999.0)."""
        value = 999.0 if math.isinf(self.value) else float(self.value)
        return {
            "metric": self.metric,
            "value": value,
            "threshold": float(self.threshold),
            "inputs": self.inputs,
        }


def _metric(spec: ParitySpec, reference: np.ndarray, test: np.ndarray) -> float:
    if reference.shape != test.shape:
        return math.inf if spec.metric == "max_abs_diff" else -math.inf
    if not np.all(np.isfinite(test)):
        return math.inf if spec.metric == "max_abs_diff" else -math.inf
    if spec.metric == "max_abs_diff":
        scale = max(1.0, float(np.abs(reference).max()))
        return float(np.abs(reference.astype(np.float64) - test).max()) / scale
    return psnr_db(reference, test)


def check_parity(
    component: str,
    reference: Callable[[Feeds], Sequence[np.ndarray]],
    onnx_path: Path,
    feeds: Sequence[Feeds],
    spec: ParitySpec,
    *,
    raise_on_failure: bool = True,
) -> ParityResult:
    """Compare ``onnx_path`` in onnxruntime with the torch ``reference`` on every feed.

    ``reference(feed)`` returns the torch outputs as float32 arrays in the ONNX output order.
    Raises ExportError naming the component, metric, value and threshold when the worst value fails.
    """
    session = make_session(onnx_path)
    input_names = {i.name for i in session.get_inputs()}
    worst = -math.inf if spec.metric == "max_abs_diff" else math.inf
    for feed in feeds:
        expected = reference(feed)
        try:
            got = session.run(None, {k: v for k, v in feed.items() if k in input_names})
        except Exception as exc:  # onnxruntime's errors are untyped (InvalidArgument, Fail, ...)
            shapes = {k: list(v.shape) for k, v in feed.items() if k in input_names}
            raise ExportError(
                f"{onnx_path.name}: {component} does not run on the parity inputs {shapes}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}",
                hint="a graph exported with fixed shapes (after dynamic shapes failed, see the warning) "
                "only takes its example's shapes; export at the size you generate at, or fix the export",
            ) from None
        for ref, out in zip(expected, got, strict=True):
            value = _metric(spec, ref, out)
            worst = max(worst, value) if spec.metric == "max_abs_diff" else min(worst, value)
    result = ParityResult(component, spec.metric, float(worst), spec.threshold, len(feeds))
    if raise_on_failure and not result.passed:
        relation = "<=" if spec.metric == "max_abs_diff" else ">="
        raise ExportError(
            f"{onnx_path.name}: {component} drifted from torch: {spec.metric} = {result.value:.4g}, "
            f"required {relation} {spec.threshold:g} over {len(feeds)} inputs",
            hint="the export is broken or this precision is too lossy for the model; "
            "try another --precision or inspect the graph",
        )
    return result


# ---------------------------------------------------------------------------------------------
# Export plumbing


@dataclasses.dataclass(frozen=True)
class ExportedGraph:
    """One exported ONNX file and how it was exported."""

    path: Path
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: bool
    opset: int
    external_data: bool


def _parameter_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + sum(
        b.numel() * b.element_size() for b in module.buffers()
    )


Exporter = Literal["dynamo", "torchscript"]
Axes = dict[str, dict[int, str]]  # input or output name -> {dynamic axis: symbolic dimension name}


def _export(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    out_path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    axes: Axes | None,
    opset: int,
    exporter: Exporter = "dynamo",
) -> ExportedGraph:
    """torch.onnx.export with dynamic ``axes``; retries with static shapes when they fail.

    ``dynamo`` (default) is torch.export-based and handles ``enable_gqa`` attention; ``torchscript``
    is the legacy tracer, 5-10x faster to export small graphs (tests use it).
    """
    out_path.parent.mkdir(parents=True, exist_ok=True)
    external = _parameter_bytes(module) > EXTERNAL_DATA_THRESHOLD_BYTES
    module = module.eval()
    attempts: list[Axes | None] = [axes, None] if axes else [None]
    last_error: Exception | None = None
    for attempt in attempts:
        try:
            with torch.no_grad():
                if exporter == "torchscript":
                    _export_torchscript(module, args, out_path, input_names, output_names, attempt, opset)
                else:
                    _export_dynamo(
                        module, args, out_path, input_names, output_names, attempt, opset, external
                    )
            return ExportedGraph(
                out_path, tuple(input_names), tuple(output_names), attempt is not None, opset, external
            )
        except Exception as exc:
            last_error = exc
            if attempt is not None:
                log.warning(
                    "export of %s with dynamic axes failed (%s); retrying with static shapes",
                    out_path.name,
                    exc,
                )
    raise ExportError(
        f"could not export {out_path.name} to ONNX: {type(last_error).__name__}: {str(last_error).splitlines()[0][:300]}",
        hint="run with -v for the full trace; the module may use an op torch.onnx cannot convert",
    ) from last_error


def _export_dynamo(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    out_path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    axes: Axes | None,
    opset: int,
    external: bool,
) -> None:
    # Dim.AUTO lets torch.export infer the constraints (e.g. latent sizes divisible by 4).
    shapes = None
    if axes is not None:
        shapes = {name: dict.fromkeys(axes.get(name, ()), torch.export.Dim.AUTO) for name in input_names}
    program = torch.onnx.export(
        module,
        args,
        dynamo=True,
        input_names=list(input_names),
        output_names=list(output_names),
        opset_version=opset,
        dynamic_shapes=shapes,
        optimize=True,
        verbose=False,
    )
    if program is None:
        raise ExportError(f"torch.onnx.export returned no program for {out_path.name}")
    program.save(str(out_path), external_data=external)


def _export_torchscript(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    out_path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    axes: Axes | None,
    opset: int,
) -> None:
    dynamic_axes = None
    if axes is not None:
        # Distinct symbols per input: shared ones ("batch" on sample and timestep) made the tracer
        # pin timestep's batch to the example's.
        dynamic_axes = {name: {axis: f"{name}_{axis}" for axis in dims} for name, dims in axes.items()}
    torch.onnx.export(
        module,
        args,
        str(out_path),
        dynamo=False,
        input_names=list(input_names),
        output_names=list(output_names),
        opset_version=opset,
        dynamic_axes=dynamic_axes,
    )


# ---------------------------------------------------------------------------------------------
# UNet


@dataclasses.dataclass(frozen=True)
class UNetIO:
    """Input sizes of a UNet: latent channels, text context width, pooled width (0 = none), tokens."""

    latent_channels: int
    context_dim: int
    pooled_dim: int
    tokens: int
    latent_multiple: int = 8

    @property
    def input_names(self) -> tuple[str, ...]:
        base = ("sample", "timestep", "encoder_hidden_states")
        return (*base, "pooled_text") if self.pooled_dim > 0 else base


def unet_io(unet: nn.Module, *, tokens: int) -> UNetIO:
    """The :class:`UNetIO` of a SnapGenUNet (from its config) or of a bench ReferenceUNet."""
    config = getattr(unet, "unet_config", None)
    if config is not None:
        return UNetIO(
            config.in_channels, config.context_dim, config.pooled_dim, tokens, config.latent_multiple
        )
    inner = getattr(unet, "unet", None)
    if inner is not None and hasattr(inner, "config"):
        cfg = inner.config
        pooled = 1280 if getattr(unet, "uses_pooled", False) else 0
        multiple = 2 ** (len(cfg.block_out_channels) - 1)
        return UNetIO(cfg.in_channels, cfg.cross_attention_dim, pooled, tokens, multiple)
    raise ExportError(f"cannot tell the input sizes of {type(unet).__name__}; pass a UNetIO")


class _UNetGraph(nn.Module):
    """The UNet with exactly the bundle's inputs (no pooled_text) as named arguments."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states, None)


class _PooledUNetGraph(_UNetGraph):
    """The UNet with the bundle's inputs including pooled_text."""

    def forward(  # type: ignore[override]
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_text: torch.Tensor,
    ) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states, pooled_text)


def unet_example_inputs(
    io: UNetIO, *, batch: int, height: int, width: int, seed: int, t: float = 0.5
) -> Feeds:
    """Seeded float32 UNet inputs: sample = (1-t) x0 + t eps at ``timestep`` = t*1000."""
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal((batch, io.latent_channels, height, width)).astype(np.float32) * 0.8
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    feed: Feeds = {
        "sample": ((1.0 - t) * x0 + t * eps).astype(np.float32),
        "timestep": np.full((batch,), t * 1000.0, dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, io.tokens, io.context_dim)).astype(np.float32),
    }
    if io.pooled_dim > 0:
        feed["pooled_text"] = rng.standard_normal((batch, io.pooled_dim)).astype(np.float32)
    return feed


def export_unet(
    unet: nn.Module,
    out_path: Path,
    io: UNetIO,
    *,
    example_latent: tuple[int, int] = (32, 32),
    opset: int = DEFAULT_OPSET,
    dynamic: bool = True,
    exporter: Exporter = "dynamo",
) -> ExportedGraph:
    """Export a UNet (SnapGenUNet or any module with its signature) to ``out_path``.

    Dynamic axes: batch, latent height/width, token count. The example batch is 2 because
    torch.export would specialise a size-1 dimension to a constant.
    """
    feed = unet_example_inputs(
        io, batch=2 if dynamic else 1, height=example_latent[0], width=example_latent[1], seed=0
    )
    args = tuple(torch.from_numpy(feed[name]) for name in io.input_names)
    axes: Axes = {
        "sample": (0, 2, 3),
        "timestep": (0,),
        "encoder_hidden_states": (0, 1),
        "velocity": (0, 2, 3),
    }
    if io.pooled_dim > 0:
        axes["pooled_text"] = (0,)
    graph = _PooledUNetGraph(unet) if io.pooled_dim > 0 else _UNetGraph(unet)
    with _split_gates(unet):
        return _export(
            graph, args, out_path, io.input_names, ("velocity",), axes if dynamic else None, opset, exporter
        )


@contextmanager
def _split_gates(module: nn.Module) -> Iterator[None]:
    """Export GEGLU feed-forwards as two weight MatMuls (see ``unet.FeedForward.split_gate``)."""
    gated = [m for m in module.modules() if callable(getattr(m, "split_gate", None))]
    try:
        for m in gated:
            m.split_gate(True)
        yield
    finally:
        for m in gated:
            m.split_gate(False)


def torch_unet_reference(unet: nn.Module, io: UNetIO) -> Callable[[Feeds], list[np.ndarray]]:
    """``feeds -> [velocity]`` computed by the torch model in fp32 (the parity reference)."""

    @torch.no_grad()
    def run(feed: Feeds) -> list[np.ndarray]:
        args = [torch.from_numpy(feed[name]) for name in io.input_names]
        pooled = args[3] if io.pooled_dim > 0 else None
        return [unet(args[0], args[1], args[2], pooled).float().numpy()]

    return run


def unet_parity_feeds(
    io: UNetIO,
    *,
    latent: tuple[int, int],
    contexts: Sequence[tuple[np.ndarray, np.ndarray | None]] = (),
    timesteps: Sequence[float] = UNET_PARITY_TIMESTEPS,
    seed: int = 1234,
) -> list[Feeds]:
    """Fixed seeded UNet inputs at several timesteps (batch 1); real text contexts when given."""
    feeds: list[Feeds] = []
    for index, t in enumerate(timesteps):
        feed = unet_example_inputs(io, batch=1, height=latent[0], width=latent[1], seed=seed + index, t=t)
        if contexts:
            tokens, pooled = contexts[index % len(contexts)]
            feed["encoder_hidden_states"] = tokens.astype(np.float32)
            if io.pooled_dim > 0 and pooled is not None:
                feed["pooled_text"] = pooled.astype(np.float32)
        feeds.append(feed)
    return feeds


# ---------------------------------------------------------------------------------------------
# Decoder


def export_decoder(
    decoder: nn.Module,
    out_path: Path,
    *,
    latent_channels: int,
    example_latent: tuple[int, int] = (16, 16),
    opset: int = DEFAULT_OPSET,
    dynamic: bool = True,
    exporter: Exporter = "dynamo",
) -> ExportedGraph:
    """Export a latent decoder (diffusion-space latent [B,C,h,w] -> image [B,3,H,W] in [-1, 1])."""
    latent = torch.randn(
        2 if dynamic else 1, latent_channels, *example_latent, generator=torch.Generator().manual_seed(0)
    )
    axes: Axes = {
        "latent": {0: "batch", 2: "height", 3: "width"},
        "image": {0: "batch", 2: "image_height", 3: "image_width"},
    }
    return _export(
        decoder, (latent,), out_path, ("latent",), ("image",), axes if dynamic else None, opset, exporter
    )


def decoder_parity_feeds(
    latent_channels: int, *, latent: tuple[int, int], count: int = 3, seed: int = 99
) -> list[Feeds]:
    """Seeded latents (unit variance, like diffusion-space latents) for decoder parity."""
    rng = np.random.default_rng(seed)
    return [
        {"latent": rng.standard_normal((1, latent_channels, *latent)).astype(np.float32)}
        for _ in range(count)
    ]


def torch_module_reference(
    module: nn.Module, input_names: Sequence[str]
) -> Callable[[Feeds], list[np.ndarray]]:
    """``feeds -> outputs`` of a torch module called positionally with ``input_names``."""

    @torch.no_grad()
    def run(feed: Feeds) -> list[np.ndarray]:
        out = module(*[torch.from_numpy(feed[name]) for name in input_names])
        outputs = out if isinstance(out, (tuple, list)) else [out]
        return [o.float().numpy() for o in outputs]

    return run


# ---------------------------------------------------------------------------------------------
# Text encoder


def export_text_encoder(
    encoder: nn.Module,
    out_path: Path,
    *,
    max_length: int,
    vocab_size: int,
    opset: int = DEFAULT_OPSET,
    dynamic: bool = True,
    exporter: Exporter = "dynamo",
) -> ExportedGraph:
    """Export ``encoder(input_ids [B,L] int64, attention_mask [B,L] int64) -> (tokens, pooled)``.

    ``tokens`` [B,L,context_dim] float32 are already projected; ``pooled`` [B,P] float32.
    """
    ids, mask = text_example_inputs(vocab_size, batch=2 if dynamic else 1, length=max_length, seed=0)
    sequence = {0: "batch", 1: "sequence"}
    axes: Axes = {
        "input_ids": sequence,
        "attention_mask": sequence,
        "tokens": sequence,
        "pooled": {0: "batch"},
    }
    return _export(
        encoder,
        (torch.from_numpy(ids), torch.from_numpy(mask)),
        out_path,
        ("input_ids", "attention_mask"),
        ("tokens", "pooled"),
        axes if dynamic else None,
        opset,
        exporter,
    )


def text_example_inputs(
    vocab_size: int, *, batch: int, length: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded token ids [B,L] int64 and a padding mask [B,L] int64 with different prompt lengths."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab_size, size=(batch, length), dtype=np.int64)
    mask = np.zeros((batch, length), dtype=np.int64)
    for row in range(batch):
        mask[row, : max(2, length - 3 * row - 1)] = 1
    ids[mask == 0] = 0
    return ids, mask


def text_parity_feeds(vocab_size: int, *, length: int, count: int = 3, seed: int = 7) -> list[Feeds]:
    """Seeded tokenized prompts of different lengths (batch 1), for text-encoder parity."""
    feeds = []
    for index in range(count):
        ids, mask = text_example_inputs(vocab_size, batch=count, length=length, seed=seed)
        feeds.append({"input_ids": ids[index : index + 1], "attention_mask": mask[index : index + 1]})
    return feeds


# ---------------------------------------------------------------------------------------------
# Provenance


def sha256_of_tree(root: Path) -> str:
    """One sha256 over every file under ``root``: hash of sorted "relative/path\\0file-sha256\\n"."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        file_hash = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                file_hash.update(chunk)
        digest.update(f"{path.relative_to(root).as_posix()}\0{file_hash.hexdigest()}\n".encode())
    return digest.hexdigest()


def tool_versions() -> dict[str, str]:
    """Versions of the packages that shape an exported graph."""
    versions = {}
    for package in (
        "snapgen-studio",
        "torch",
        "onnx",
        "onnxruntime",
        "onnxscript",
        "diffusers",
        "transformers",
        "numpy",
    ):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def scratch_dir(parent: Path | None = None) -> tempfile.TemporaryDirectory[str]:
    """A temporary folder for intermediate graphs, next to ``parent`` when given (same disk)."""
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(
        prefix=".snapgen-export-", dir=None if parent is None else os.fspath(parent)
    )


# ---------------------------------------------------------------------------------------------
# Checkpoint (diffusers layout) -> runtime bundle

# Component folders of a SnapGen checkpoint (docs/bundle-format.md). ``vae/`` is accepted for the
# autoencoder as diffusers pipelines name it.
UNET_FOLDER = "unet"
AUTOENCODER_FOLDERS: tuple[str, ...] = ("autoencoder", "vae")
TEXT_CONDITIONER_FOLDER = "text_conditioner"
CHECKPOINT_INDEX = "model_index.json"
DEFAULTS_KEY = CHECKPOINT_DEFAULTS_KEY
LICENSE_KEY = "_license"
PRECISION_ORDER: tuple[str, ...] = ("fp32", "fp16", "int8")

# Prompts whose real text embeddings drive the calibration trajectories and the parity inputs.
CALIBRATION_PROMPTS: tuple[str, ...] = (
    "a red fox sitting in a snowy forest at dawn",
    "portrait photo of an old fisherman, dramatic light",
    "a bowl of ramen on a wooden table, top view",
    "watercolor painting of a lighthouse in a storm",
    "a futuristic city skyline at night with neon signs",
    "a cute cartoon robot waving, flat colors",
    "macro shot of a dew drop on a green leaf",
    "an astronaut riding a horse on the moon",
)


@dataclasses.dataclass(frozen=True)
class BundleDefaults:
    """Generation defaults written to bundle.json (``_snapgen_defaults`` in model_index.json)."""

    steps: int = 4
    width: int = 1024
    height: int = 1024
    shift: float = 3.0
    guidance_scale: float = 1.0


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """Settings of :func:`export_bundle`.

    ``calib_px``: image size of the calibration trajectories (default: the bundle's default size,
    capped at 512 px to bound memory and time; activation ranges hardly depend on size).
    ``parity_px``: image size of the parity inputs (default: the calibration size).
    ``calibration_prompts``: the prompts of the int8 calibration trajectories (default: the first
    ``calib_prompts`` of :data:`CALIBRATION_PROMPTS`); a model of a narrow world (the emoji model)
    calibrates best on prompts of that world.
    ``calib_guidance``: classifier-free guidance of the calibration trajectories (default: the
    bundle's default guidance); above 1 the unconditional inputs are calibrated too.
    """

    precisions: tuple[str, ...] = ("fp32", "int8")
    name: str | None = None
    calib_prompts: int = 4
    calibration_prompts: tuple[str, ...] = ()
    calib_guidance: float | None = None
    calib_steps: int = 8
    calib_px: int | None = None
    parity_px: int | None = None
    parity: tuple[tuple[str, ParitySpec], ...] = tuple(DEFAULT_PARITY.items())
    opset: int = DEFAULT_OPSET
    dynamic: bool = True
    exporter: Exporter = "dynamo"
    license: str | None = None

    def spec(self, precision: str) -> ParitySpec:
        return dict(self.parity)[precision]


def _static_size(defaults: BundleDefaults, options: ExportOptions, multiple: int) -> int:
    """The one image size of a static-shape export: the bundle's default size, which must be square
    and a multiple of the model's stride; a calibration or parity size other than it is refused
    (the graph could not run it, nor could `snapgen generate` at the defaults)."""
    size = defaults.width
    if defaults.height != size or size % multiple:
        raise ExportError(
            f"a static-shape export runs at its default size, which is {defaults.width}x{defaults.height} "
            f"here (it must be square and a multiple of {multiple})",
            hint="export with dynamic shapes (without --static-shapes), or set a square default size",
        )
    for name, value in (("calib_px", options.calib_px), ("parity_px", options.parity_px)):
        if value is not None and value != size:
            raise ExportError(
                f"a static-shape export runs at its default size {size} px only, not {name}={value}",
                hint=f"leave {name} out (it is {size} for a static export)",
            )
    return size


@dataclasses.dataclass(frozen=True)
class ExportSummary:
    """What :func:`export_bundle` wrote: the bundle folder, its manifest dict and the timings."""

    bundle_dir: Path
    manifest: dict[str, Any]
    seconds: float


def write_checkpoint(
    directory: Path,
    *,
    unet: nn.Module,
    autoencoder: nn.Module,
    text_conditioner: Any,
    defaults: BundleDefaults | None = None,
    license: str | None = None,
) -> Path:
    """Write a SnapGen checkpoint in the diffusers layout that :func:`export_bundle` reads.

    ``model_index.json`` + ``unet/`` (SnapGenUNet) + ``autoencoder/`` (SnapGenAutoencoder) +
    ``text_conditioner/`` (the trainable TextProjection; frozen encoders load from their sources).
    """
    directory.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(str(directory / UNET_FOLDER), safe_serialization=True)
    autoencoder.save_pretrained(str(directory / AUTOENCODER_FOLDERS[0]), safe_serialization=True)
    text_conditioner.save_pretrained(directory / TEXT_CONDITIONER_FOLDER)
    index: dict[str, Any] = {
        "_class_name": "SnapGenPipeline",
        UNET_FOLDER: ["snapgen_app.model.unet", "SnapGenUNet"],
        AUTOENCODER_FOLDERS[0]: ["snapgen_app.model.autoencoder", "SnapGenAutoencoder"],
        TEXT_CONDITIONER_FOLDER: ["snapgen_app.model.text_encoders", "TextProjection"],
        DEFAULTS_KEY: dataclasses.asdict(defaults or BundleDefaults()),
    }
    if license:
        index[LICENSE_KEY] = license
    (directory / CHECKPOINT_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return directory


def _read_index(checkpoint: Path) -> tuple[dict[str, Any], Path]:
    """model_index.json and the autoencoder folder, or ExportError naming what is missing."""
    from model_store.bundle import find_pickles

    if not checkpoint.is_dir():
        raise ExportError(
            f"{checkpoint} is not a folder", hint="pass a checkpoint folder in the diffusers layout"
        )
    index_path = checkpoint / CHECKPOINT_INDEX
    try:
        index = json.loads(index_path.read_text())
    except FileNotFoundError:
        raise ExportError(
            f"{index_path} does not exist",
            hint="a checkpoint needs model_index.json + unet/ + autoencoder/ + text_conditioner/",
        ) from None
    except json.JSONDecodeError as exc:
        raise ExportError(f"{index_path} is not valid JSON: {exc}") from None
    pickles = find_pickles(checkpoint)
    if pickles:
        raise ExportError(
            f"pickle files are refused: {pickles[:5]} in {checkpoint}", hint="convert them to .safetensors"
        )
    autoencoder_dir = next((checkpoint / f for f in AUTOENCODER_FOLDERS if (checkpoint / f).is_dir()), None)
    missing = [f for f in (UNET_FOLDER, TEXT_CONDITIONER_FOLDER) if not (checkpoint / f).is_dir()]
    if autoencoder_dir is None:
        missing.append("autoencoder/ (or vae/)")
    if missing:
        raise ExportError(
            f"{checkpoint} lacks component folder(s) {missing}",
            hint="see docs/bundle-format.md for the layout",
        )
    return index, autoencoder_dir


def _bundle_defaults(index: dict[str, Any]) -> BundleDefaults:
    raw = index.get(DEFAULTS_KEY, {})
    fields = {f.name for f in dataclasses.fields(BundleDefaults)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ExportError(
            f"{CHECKPOINT_INDEX}: unknown key(s) {unknown} in {DEFAULTS_KEY}; allowed: {sorted(fields)}"
        )
    return BundleDefaults(**raw)


def _variant_file(component: str, precision: str) -> str:
    return f"{component}.{precision}.onnx"


def _text_encoder_file(index: int, precision: str | None = None) -> str:
    stem = "text_encoder" if index == 0 else f"text_encoder_{index}"
    return f"{stem}.onnx" if precision is None else f"{stem}.{precision}.onnx"


def _tokenizer_file(index: int) -> str:
    return "tokenizer.json" if index == 0 else f"tokenizer_{index}.json"


def export_bundle(
    checkpoint: Path,
    out_dir: Path,
    options: ExportOptions,
    log: Callable[[str], None] = lambda _msg: None,
) -> ExportSummary:
    """Export a SnapGen checkpoint to a verified runtime bundle at ``out_dir``.

    Everything is written to a temporary folder next to ``out_dir`` and renamed into place at the
    end, so a failure (a parity check, a full disk, Ctrl-C) leaves no half-written bundle.
    Raises ExportError when a variant drifts past its threshold or the checkpoint is malformed.
    """
    from model_store.bundle import (
        BundleManifest,
        Defaults,
        ModelSpec,
        Provenance,
        TextEncoderSpec,
        Variant,
        write_manifest,
    )
    from snapgen_app.model.autoencoder import SnapGenAutoencoder
    from snapgen_app.model.quantize import (
        collect_trajectories,
        convert_fp16,
        quantize_dynamic_int8,
        quantize_static_int8,
    )
    from snapgen_app.model.text_encoders import TextConditioner, export_tokenizer_json
    from snapgen_app.model.unet import SnapGenUNet

    started = time.perf_counter()
    bad = [p for p in options.precisions if p not in PRECISION_ORDER]
    if bad or not options.precisions:
        raise ExportError(
            f"unknown precision(s) {bad or options.precisions}; allowed: {list(PRECISION_ORDER)}"
        )
    precisions = [p for p in PRECISION_ORDER if p in options.precisions]
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        what = "is a file" if not out_dir.is_dir() else "already exists and is not empty"
        raise ExportError(f"{out_dir} {what}", hint="choose another --out or remove it first")
    index, autoencoder_dir = _read_index(checkpoint)
    defaults = _bundle_defaults(index)
    log(f"hashing {checkpoint}")
    checkpoint_sha = sha256_of_tree(checkpoint)

    log("loading the checkpoint")
    unet = SnapGenUNet.from_pretrained(str(checkpoint / UNET_FOLDER), use_safetensors=True).eval()
    autoencoder = SnapGenAutoencoder.from_pretrained(str(autoencoder_dir), use_safetensors=True).eval()
    conditioner = TextConditioner.from_pretrained(checkpoint / TEXT_CONDITIONER_FOLDER).eval()
    unet_cfg = unet.unet_config
    scale = autoencoder.scale_factor
    latent_channels = unet_cfg.in_channels
    multiple = unet_cfg.latent_multiple * scale
    if options.dynamic:
        calib_px = options.calib_px or min(defaults.width, 512)
        calib_px = max(multiple, calib_px // multiple * multiple)
        parity_px = options.parity_px or calib_px
        parity_px = max(multiple, parity_px // multiple * multiple)
    else:  # a static graph runs at one size only: the one the bundle generates at by default
        calib_px = parity_px = _static_size(defaults, options, multiple)

    out_dir = out_dir.resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent) as staging_name:
        staging = Path(staging_name) / "bundle"
        scratch = Path(staging_name) / "scratch"
        staging.mkdir()
        scratch.mkdir()
        parity: dict[str, dict[str, Any]] = {p: {} for p in precisions}
        kept: dict[str, list[str]] = {p: [] for p in precisions}
        text_files: dict[str, list[str]] = {p: [] for p in precisions}
        encoder_specs = []

        # Text encoders: fp32 always (the fp16 variant reuses it: fp16 gains nothing on CPUs);
        # int8 = dynamic MatMul/Gemm quantization.
        for i, encoder in enumerate(conditioner.encoders):
            module = conditioner.export_module(i).eval()
            vocab = int(encoder.tokenizer.vocab_size)
            log(f"exporting text encoder {i}")
            graph = export_text_encoder(
                module,
                staging / _text_encoder_file(i),
                max_length=encoder.max_length,
                vocab_size=vocab,
                opset=options.opset,
                dynamic=options.dynamic,
                exporter=options.exporter,
            )
            feeds = text_parity_feeds(vocab, length=encoder.max_length)
            reference = torch_module_reference(module, ("input_ids", "attention_mask"))
            result = check_parity(f"text_encoder_{i}", reference, graph.path, feeds, options.spec("fp32"))
            export_tokenizer_json(encoder, staging / _tokenizer_file(i))
            tokens_out, pooled_out = module(
                *[torch.from_numpy(feeds[0][n]) for n in ("input_ids", "attention_mask")]
            )
            encoder_specs.append(
                TextEncoderSpec(
                    file=_text_encoder_file(i),
                    tokenizer=_tokenizer_file(i),
                    max_length=encoder.max_length,
                    pad_to_max_length=True,
                    hidden_size=int(tokens_out.shape[-1]),
                    pooled_size=int(pooled_out.shape[-1]),
                )
            )
            for precision in precisions:
                if precision != "int8":
                    text_files[precision].append(_text_encoder_file(i))
                    parity[precision][f"text_encoder_{i}"] = result.to_dict()
                    continue
                log(f"quantizing text encoder {i} (dynamic int8)")
                quant = quantize_dynamic_int8(graph.path, staging / _text_encoder_file(i, "int8"))
                q_result = check_parity(
                    f"text_encoder_{i}", reference, quant.path, feeds, options.spec("int8")
                )
                text_files["int8"].append(_text_encoder_file(i, "int8"))
                parity["int8"][f"text_encoder_{i}"] = q_result.to_dict()
                kept["int8"].extend(
                    f"{_text_encoder_file(i, 'int8')}:{n}" for n in quant.kept_in_higher_precision
                )

        # Real text embeddings for calibration and parity.
        prompts = list(options.calibration_prompts) or [
            CALIBRATION_PROMPTS[k % len(CALIBRATION_PROMPTS)] for k in range(max(1, options.calib_prompts))
        ]
        with torch.no_grad():
            contexts = [conditioner.encode([p]) for p in prompts]
        torch_contexts = [(tok, pooled if unet_cfg.pooled_dim > 0 else None) for tok, pooled in contexts]
        np_contexts = [
            (tok.numpy(), None if pooled is None else pooled.numpy()) for tok, pooled in torch_contexts
        ]
        tokens_len = int(contexts[0][0].shape[1])

        log("exporting the UNet")
        io = unet_io(unet, tokens=tokens_len)
        latent_parity = (parity_px // scale, parity_px // scale)
        # Dynamic graphs are traced at another size than the parity inputs, so parity also checks the
        # dynamic axes; static graphs are traced at the parity size.
        example = latent_parity if not options.dynamic else (2 * unet_cfg.latent_multiple * 4,) * 2
        fp32_unet = export_unet(
            unet,
            scratch / _variant_file("unet", "fp32"),
            io,
            example_latent=example,
            opset=options.opset,
            dynamic=options.dynamic,
            exporter=options.exporter,
        )
        unet_feeds = unet_parity_feeds(io, latent=latent_parity, contexts=np_contexts)
        unet_ref = torch_unet_reference(unet, io)
        unet_fp32_parity = check_parity("unet", unet_ref, fp32_unet.path, unet_feeds, options.spec("fp32"))

        log("exporting the decoder")
        latent_decoder = autoencoder.latent_decoder().eval()
        fp32_decoder = export_decoder(
            latent_decoder,
            scratch / _variant_file("decoder", "fp32"),
            latent_channels=latent_channels,
            example_latent=example,
            opset=options.opset,
            dynamic=options.dynamic,
            exporter=options.exporter,
        )
        decoder_feeds = decoder_parity_feeds(latent_channels, latent=latent_parity)
        decoder_ref = torch_module_reference(latent_decoder, ("latent",))
        decoder_fp32_parity = check_parity(
            "decoder", decoder_ref, fp32_decoder.path, decoder_feeds, options.spec("fp32")
        )

        trajectories = None
        if "int8" in precisions:
            log(
                f"recording {len(prompts)} calibration trajectories x {options.calib_steps} steps at {calib_px}px"
            )
            latent_calib = calib_px // scale
            guidance = defaults.guidance_scale if options.calib_guidance is None else options.calib_guidance
            null_context = None
            if guidance > 1.0:
                log(f"calibration trajectories follow guidance {guidance:g} (unconditional inputs included)")
                with torch.no_grad():
                    null_context = conditioner.unconditional(1)
            trajectories = collect_trajectories(
                unet,
                torch_contexts,
                latent_shape=(latent_channels, latent_calib, latent_calib),
                steps=options.calib_steps,
                shift=defaults.shift,
                guidance_scale=guidance,
                null_context=null_context,
            )
            # Decoder parity on real trajectory ends too (the decoder never sees pure noise).
            decoder_feeds = [*decoder_feeds, trajectories.decoder_feeds[-1]]

        for precision in precisions:
            for component, graph, feeds, reference, fp32_result in (
                ("unet", fp32_unet, unet_feeds, unet_ref, unet_fp32_parity),
                ("decoder", fp32_decoder, decoder_feeds, decoder_ref, decoder_fp32_parity),
            ):
                target = staging / _variant_file(component, precision)
                if precision == "fp32":
                    _copy_graph(graph.path, target)
                    parity["fp32"][component] = fp32_result.to_dict()
                    continue
                if precision == "int8":
                    assert trajectories is not None
                    log(f"quantizing the {component} (int8 static QDQ)")
                    calib = trajectories.unet_feeds if component == "unet" else trajectories.decoder_feeds
                    result = quantize_static_int8(graph.path, target, calib)
                else:
                    log(f"converting the {component} to fp16")
                    result = convert_fp16(graph.path, target, feeds)
                checked = check_parity(component, reference, target, feeds, options.spec(precision))
                parity[precision][component] = checked.to_dict()
                kept[precision].extend(f"{target.name}:{n}" for n in result.kept_in_higher_precision)

        variants = {
            p: Variant(
                unet=_variant_file("unet", p),
                decoder=_variant_file("decoder", p),
                text_encoder=tuple(text_files[p]),
                parity=parity[p],
                kept_in_higher_precision=tuple(kept[p]),
            )
            for p in precisions
        }
        name = options.name or checkpoint.resolve().name
        manifest = BundleManifest(
            name=name,
            model=ModelSpec(
                unet=unet_cfg.to_dict(),
                decoder=autoencoder.autoencoder_config.decoder.to_dict(),
                text_encoders=tuple(encoder_specs),
                latent_channels=latent_channels,
                vae_scale_factor=scale,
                # CFG's unconditional input is what text dropout fed the model in training.
                null_condition=conditioner.config.drop_mode,
            ),
            defaults=Defaults(**dataclasses.asdict(defaults)),
            variants=variants,
            license=options.license or index.get(LICENSE_KEY) or "unspecified (see the source checkpoint)",
            provenance=Provenance(
                source_checkpoint_sha256=checkpoint_sha, tools=tool_versions(), created=utc_now()
            ),
        )
        log("hashing the bundle")
        written = write_manifest(staging, manifest)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.replace(staging, out_dir)
    return ExportSummary(out_dir, written.to_dict(), time.perf_counter() - started)


def _copy_graph(src: Path, dst: Path) -> None:
    """Copy an ONNX file (with its external data, renamed to follow ``dst``)."""
    import shutil

    import onnx

    model = onnx.load(str(src), load_external_data=False)
    if not any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer):
        shutil.copyfile(src, dst)
        return
    onnx.save_model(
        onnx.load(str(src)),
        str(dst),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=dst.name + ".data",
    )
