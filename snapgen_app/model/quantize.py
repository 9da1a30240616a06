"""Quantization of exported ONNX graphs: int8 static QDQ, int8 dynamic, fp16 with fp32 islands.

What runs fast and stays accurate on the target CPUs (see reference/onnxruntime-cpu-notes.md):

- UNet and decoder: int8 **static QDQ** with u8 activations and s8 per-channel weights, MinMax
  calibration, and ONLY ``Conv`` plus weight-bearing ``MatMul``/``Gemm`` nodes quantized. The
  activation x activation MatMuls of attention and ``Softmax`` stay fp32: ORT's QLinearSoftmax is
  7x slower than fp32 Softmax and quantized attention scores collapse accuracy.
  Weight MatMuls keep a float output (no Q/DQ pair after them): ONNX Runtime then runs them as
  ``MatMulIntegerToFloat``, which writes fp32 with the bias add fused, instead of ``QLinearMatMul``
  writing u8 that a DequantizeLinear and an Add read back (10 % of an int8 UNet step at 1024 px on
  a 2-core CPU, and one rounding fewer). Conv outputs stay quantized (``QLinearConv`` needs them).
- Calibration data come from **real denoising trajectories**: the torch model runs its Euler
  sampler from noise with real text embeddings and every UNet input along the way is recorded
  (:func:`collect_trajectories`), so the ranges cover the whole schedule, not random tensors.
- Text encoder: **dynamic** int8 for MatMul/Gemm only (``quantize_dynamic`` would turn Conv into
  ConvInteger, which the CPU provider cannot run).
- fp16: ``onnxruntime.transformers.float16`` with overflow-prone ops (norms, softmax, exp, pow,
  sin/cos of the timestep embedding) kept in fp32, float32 inputs/outputs, and a NaN check.

Every function returns which nodes stayed in higher precision so the manifest can record them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch

from snapgen_app.errors import ExportError

log = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]

# Ops whose fp16 versions overflow or lose too much (variance sums, exp of large logits, the
# sinusoidal timestep embedding of t*1000): these stay fp32 in the fp16 variant.
FP16_KEEP_OP_TYPES: tuple[str, ...] = (
    "InstanceNormalization",
    "LayerNormalization",
    "GroupNormalization",
    "RMSNormalization",
    "SimplifiedLayerNormalization",
    "SkipLayerNormalization",
    "ReduceMean",
    "ReduceSum",
    "Pow",
    "Sqrt",
    "Reciprocal",
    "Softmax",
    "Exp",
    "Sin",
    "Cos",
)

QUANTIZED_OP_TYPES: tuple[str, ...] = ("Conv", "MatMul", "Gemm")

# Above this size a model proto cannot be serialized in one piece (protobuf's 2 GB limit).
EXTERNAL_DATA_THRESHOLD_BYTES = 2 * 1024**3 - 64 * 1024**2


@dataclasses.dataclass(frozen=True)
class QuantizationResult:
    """What a quantization pass did: the file, the nodes quantized and the ones left in float."""

    path: Path
    quantized_nodes: tuple[str, ...]
    kept_in_higher_precision: tuple[str, ...]
    preprocessed: bool = False


@dataclasses.dataclass(frozen=True)
class TrajectoryData:
    """Inputs recorded along Euler trajectories of the torch UNet.

    ``unet_feeds``: one dict per (prompt, step) with sample [1,C,h,w], timestep [1] (t*1000),
    encoder_hidden_states [1,L,D] and pooled_text [1,P] when the model has it, all float32.
    ``decoder_feeds``: {"latent": [1,C,h,w]} with the predicted clean latent x0 = x - t*v at each
    step (the decoder sees these at the end of a few-step run) and the final latent.
    ``timesteps``: the t (0-1) of each UNet feed, to check the calibration spans the schedule.
    """

    unet_feeds: tuple[Feeds, ...]
    decoder_feeds: tuple[Feeds, ...]
    timesteps: tuple[float, ...]


def flow_matching_timesteps(steps: int, shift: float) -> np.ndarray:
    """The ``steps + 1`` times t from 1 to 0 of the Euler sampler with the SD3 shift (float64)."""
    t = np.linspace(1.0, 0.0, steps + 1)
    return shift * t / (1.0 + (shift - 1.0) * t)


@torch.no_grad()
def collect_trajectories(
    unet: torch.nn.Module,
    contexts: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
    *,
    latent_shape: tuple[int, int, int],
    steps: int = 8,
    shift: float = 1.0,
    seed: int = 0,
    guidance_scale: float = 1.0,
    null_context: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> TrajectoryData:
    """Run the torch UNet's Euler sampler once per context and record every step's inputs.

    ``contexts``: per prompt (tokens [1,L,D] float32, pooled [1,P] float32 or None), produced by the
    real text conditioner. ``latent_shape``: (C, h, w) of the latent. The sampler follows the
    project convention: x_1 = noise, x <- x + (t_next - t) * v, timestep input = t * 1000.
    With ``guidance_scale`` > 1 and a ``null_context`` the trajectories follow classifier-free
    guidance, v = v_null + g (v_cond - v_null), as generation with that guidance does, and the
    unconditional inputs are recorded too: both are what the UNet sees at inference.
    """
    generator = torch.Generator().manual_seed(seed)
    times = flow_matching_timesteps(steps, shift)
    unet_feeds: list[Feeds] = []
    decoder_feeds: list[Feeds] = []
    recorded_t: list[float] = []
    for tokens, pooled in contexts:
        x = torch.randn((1, *latent_shape), generator=generator, dtype=torch.float32)
        for t, t_next in itertools.pairwise(times):
            timestep = torch.full((1,), float(t) * 1000.0, dtype=torch.float32)
            feed: Feeds = {
                "sample": x.numpy().copy(),
                "timestep": timestep.numpy().copy(),
                "encoder_hidden_states": tokens.float().numpy().copy(),
            }
            if pooled is not None:
                feed["pooled_text"] = pooled.float().numpy().copy()
            unet_feeds.append(feed)
            recorded_t.append(float(t))
            velocity = _velocity(unet, x, timestep, tokens, pooled)
            if guidance_scale > 1.0 and null_context is not None:
                null_tokens, null_pooled = null_context
                null_pooled = null_pooled if pooled is not None else None
                unconditional = {**feed, "encoder_hidden_states": null_tokens.float().numpy().copy()}
                if null_pooled is not None:
                    unconditional["pooled_text"] = null_pooled.float().numpy().copy()
                unet_feeds.append(unconditional)
                recorded_t.append(float(t))
                v_null = _velocity(unet, x, timestep, null_tokens, null_pooled)
                velocity = v_null + guidance_scale * (velocity - v_null)
            decoder_feeds.append({"latent": (x - float(t) * velocity).numpy().copy()})
            x = x + float(t_next - t) * velocity
        decoder_feeds.append({"latent": x.numpy().copy()})
    return TrajectoryData(tuple(unet_feeds), tuple(decoder_feeds), tuple(recorded_t))


def _velocity(
    unet: torch.nn.Module,
    x: torch.Tensor,
    timestep: torch.Tensor,
    tokens: torch.Tensor,
    pooled: torch.Tensor | None,
) -> torch.Tensor:
    return unet(x, timestep, tokens, pooled) if pooled is not None else unet(x, timestep, tokens)


class FeedsReader:
    """An onnxruntime ``CalibrationDataReader`` over a list of recorded feeds.

    Feeds whose names the model does not take are dropped (e.g. pooled_text for a model without it).
    """

    def __init__(self, feeds: Sequence[Feeds], input_names: Sequence[str]) -> None:
        self._feeds = [{k: v for k, v in f.items() if k in input_names} for f in feeds]
        self._iter: Iterator[Feeds] = iter(self._feeds)

    def get_next(self) -> Feeds | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self._feeds)


def _initializer_names(model: onnx.ModelProto) -> set[str]:
    names = {init.name for init in model.graph.initializer}
    names.update(out for node in model.graph.node if node.op_type == "Constant" for out in node.output)
    return names


def select_weight_nodes(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """Split Conv/MatMul/Gemm nodes into (to quantize, to keep in float).

    Conv always quantizes; MatMul and Gemm only when their second input is a constant weight.
    A MatMul of two activations (attention q @ k^T, p @ v) is kept in float.
    """
    constants = _initializer_names(model)
    quantize: list[str] = []
    keep: list[str] = []
    for node in model.graph.node:
        if node.op_type == "Conv":
            quantize.append(node.name)
        elif node.op_type in ("MatMul", "Gemm"):
            (quantize if len(node.input) > 1 and node.input[1] in constants else keep).append(node.name)
    return quantize, keep


def inline_identity_initializers(model: onnx.ModelProto) -> int:
    """Replace ``Identity(initializer)`` nodes by a copy of the initializer; returns how many.

    The TorchScript exporter deduplicates equal weights (e.g. the zero biases of zero-initialised
    layers) through Identity nodes; the quantizer only treats initializers as weights, so such a
    Conv would keep a float bias and ORT could not fuse it into an int8 convolution.
    """
    inits = {init.name: init for init in model.graph.initializer}
    keep = []
    copies = []
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            copies.append(copy)
        else:
            keep.append(node)
    if copies:
        del model.graph.node[:]
        model.graph.node.extend(keep)
        model.graph.initializer.extend(copies)
    return len(copies)


def _ensure_node_names(model: onnx.ModelProto) -> None:
    """Give unnamed nodes a stable name: node lists and manifests refer to nodes by name."""
    used = {n.name for n in model.graph.node if n.name}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)


def model_size_bytes(path: Path) -> int:
    """Bytes of an ONNX file plus any external-data files next to it."""
    total = path.stat().st_size
    model = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value
        for init in model.graph.initializer
        if init.data_location == onnx.TensorProto.EXTERNAL
        for entry in init.external_data
        if entry.key == "location"
    }
    return total + sum((path.parent / loc).stat().st_size for loc in locations)


def save_model(model: onnx.ModelProto, path: Path, *, external: bool | None = None) -> None:
    """Save ``model``; weights go to ``<name>.data`` when the proto would pass 2 GB."""
    if external is None:
        external = model.ByteSize() > EXTERNAL_DATA_THRESHOLD_BYTES
    if external:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))


@contextlib.contextmanager
def _working_directory(path: Path) -> Iterator[None]:
    """Run inside ``path``: ORT's quantization tools write scratch files (sym_shape_infer_temp.onnx,
    <uuid>.data) into the current directory, which must not be the user's."""
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def _preprocess(src: Path, dst: Path, large: bool) -> bool:
    """ORT's recommended pre-pass (shape inference + graph optimization); False when it fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(
            str(src),
            str(dst),
            save_as_external_data=large,
            all_tensors_to_one_file=True,
            external_data_location=dst.name + ".data",
        )
    except Exception as exc:  # it crashes on some ops (opset-23 Attention); quantize without it
        log.warning("quant_pre_process failed (%s); quantizing the graph as exported", exc)
        return False
    return True


def quantize_static_int8(
    fp32_path: Path,
    out_path: Path,
    calibration_feeds: Sequence[Feeds],
    *,
    preprocess: bool = True,
) -> QuantizationResult:
    """int8 static QDQ of Conv + weight MatMul/Gemm; u8 activations, s8 per-channel weights, MinMax.

    ``calibration_feeds``: input dicts recorded from trajectories (see :func:`collect_trajectories`).
    Everything else (norms, SiLU, Softmax, attention score MatMuls) stays fp32; those node names are
    returned in ``kept_in_higher_precision`` (Conv/MatMul/Gemm nodes left in float).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not calibration_feeds:
        raise ExportError("int8 calibration needs at least one recorded trajectory step; got none")
    fp32_path, out_path = fp32_path.resolve(), out_path.resolve()
    large = model_size_bytes(fp32_path) > EXTERNAL_DATA_THRESHOLD_BYTES
    with (
        tempfile.TemporaryDirectory(prefix="snapgen-quant-", dir=out_path.parent) as tmp,
        _working_directory(Path(tmp)),
    ):
        source = fp32_path
        preprocessed = False
        if preprocess:
            candidate = Path(tmp) / "pre.onnx"
            preprocessed = _preprocess(fp32_path, candidate, large)
            if preprocessed:
                source = candidate
        model = onnx.load(str(source))
        inline_identity_initializers(model)
        _ensure_node_names(model)
        named = Path(tmp) / "named.onnx"
        save_model(model, named, external=large)
        to_quantize, keep = select_weight_nodes(model)
        input_names = [i.name for i in model.graph.input]
        del model
        quantize_static(
            str(named),
            str(out_path),
            FeedsReader(calibration_feeds, input_names),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OP_TYPES),
            nodes_to_quantize=to_quantize,
            per_channel=True,
            reduce_range=False,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            use_external_data_format=large,
            extra_options={
                "MatMulConstBOnly": True,
                "WeightSymmetric": True,
                "ActivationSymmetric": False,
                # MatMul weights are [K, N]: one scale per output column.
                "QDQOpTypePerChannelSupportToAxis": {"MatMul": -1},
                # float output: MatMulIntegerToFloat (bias fused) instead of QLinearMatMul + DQ + Add
                "OpTypesToExcludeOutputQuantization": ["MatMul"],
                # Not "CalibMaxIntermediateOutputs": onnxruntime 1.32's MinMax calibrator clears the
                # recorded tensors at that count without merging their ranges ("No data is collected").
            },
        )
    return QuantizationResult(out_path, tuple(to_quantize), tuple(keep), preprocessed)


def quantize_dynamic_int8(fp32_path: Path, out_path: Path) -> QuantizationResult:
    """Dynamic int8 of weight MatMul/Gemm only (text encoder); Conv never becomes ConvInteger."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(fp32_path))
    inline_identity_initializers(model)
    _ensure_node_names(model)
    to_quantize, keep = select_weight_nodes(model)
    to_quantize = [n.name for n in model.graph.node if n.name in set(to_quantize) and n.op_type != "Conv"]
    with tempfile.TemporaryDirectory(prefix="snapgen-quant-", dir=out_path.parent) as tmp:
        named = Path(tmp) / "named.onnx"
        save_model(model, named)
        del model
        quantize_dynamic(
            str(named),
            str(out_path),
            op_types_to_quantize=["MatMul", "Gemm"],
            nodes_to_quantize=to_quantize,
            per_channel=True,
            weight_type=QuantType.QInt8,
            extra_options={"MatMulConstBOnly": True},
        )
    return QuantizationResult(out_path, tuple(to_quantize), tuple(keep))


def convert_fp16(
    fp32_path: Path,
    out_path: Path,
    check_feeds: Sequence[Feeds],
    *,
    keep_op_types: Sequence[str] = FP16_KEEP_OP_TYPES,
) -> QuantizationResult:
    """fp16 weights and math with ``keep_op_types`` in fp32; inputs/outputs stay float32.

    Runs the converted graph on ``check_feeds`` and raises ExportError naming the output when any
    value is NaN or infinite (the black-image failure of fp16 decoders).
    """
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(fp32_path))
    _ensure_node_names(model)
    kept = [n.name for n in model.graph.node if n.op_type in keep_op_types]
    converted = convert_float_to_float16(
        model,
        keep_io_types=True,
        op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(keep_op_types)),
        disable_shape_infer=model.ByteSize() > EXTERNAL_DATA_THRESHOLD_BYTES,
    )
    del model
    save_model(converted, out_path)
    del converted
    check_finite(out_path, check_feeds, label="fp16")
    converted_ops = [n.name for n in onnx.load(str(out_path), load_external_data=False).graph.node]
    return QuantizationResult(out_path, tuple(n for n in converted_ops if n not in set(kept)), tuple(kept))


def check_finite(onnx_path: Path, feeds: Sequence[Feeds], *, label: str) -> None:
    """Run ``onnx_path`` on every feed; ExportError when any output holds NaN or infinity."""
    session = make_session(onnx_path)
    names = {i.name for i in session.get_inputs()}
    for index, feed in enumerate(feeds):
        outputs = session.run(None, {k: v for k, v in feed.items() if k in names})
        for meta, value in zip(session.get_outputs(), outputs, strict=True):
            if not np.all(np.isfinite(value)):
                raise ExportError(
                    f"the {label} variant of {onnx_path.name} produced NaN/inf in output {meta.name!r} "
                    f"on check input {index}",
                    hint="keep more node types in fp32 or export only fp32/int8",
                )


def make_session(onnx_path: Path, *, threads: int = 2) -> object:
    """CPU onnxruntime session with the project's benchmark/parity options (ORT_ENABLE_ALL)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def psnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """PSNR of ``test`` against ``reference`` with the reference's value range as the peak (dB)."""
    reference = reference.astype(np.float64)
    mse = float(np.mean((reference - test.astype(np.float64)) ** 2))
    peak = float(reference.max() - reference.min()) or 1.0
    return math.inf if mse == 0.0 else 10.0 * math.log10(peak**2 / mse)


def op_histogram(onnx_path: Path) -> dict[str, int]:
    """Count of nodes per op type (used by tests and the bench to show what got quantized)."""
    counts: dict[str, int] = {}
    for node in onnx.load(str(onnx_path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
