"""``snapgen bench``: SnapGen against SDXL and SD1.5 on this machine, in one run.

What it measures (medians of ``runs`` timed runs after ``warmup`` untimed ones):

- the ONNX Runtime MatMul peak (2048^3) in fp32 and int8 QDQ (u8 activations, s8 per-channel
  weights), the ceiling every "% of peak" below refers to;
- per-step UNet latency of ``snapgen-t2i``, SD1.5 and SDXL (random weights, built from their
  configs, exported and quantized the same way) through ONNX Runtime (CPU provider, 2 threads,
  ORT_ENABLE_ALL), at 512 and 1024 px, fp32 and int8, with counted GFLOPs, achieved GFLOP/s and
  peak resident memory. Where a graph does not fit this machine (SDXL: 10 GB of fp32 weights, its
  export and calibration near 24 GB; SD1.5 at 1024 px: its 16384-token self-attention
  materialises 2 x 8.6 GB of scores in ONNX Runtime) that architecture and ``snapgen-t2i`` are
  both measured in torch eager fp32 instead, and the table says so;
- the tiny decoder against the SD3-family VAE decoder at 1024 px;
- the end-to-end time of one 4-step 1024 px image with ``snapgen-t2i`` int8 (random weights);
- the int8 quality target: a tiny UNet trained for ``train_seconds`` on a synthetic task, its
  fp32 and int8 graphs run over the same Euler trajectories, PSNR of the final latents.

Every measurement runs in its own subprocess (``python -m snapgen_app.model.bench --job JSON``),
so peak memory is per measurement and a failure of one (out of memory) does not end the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

THREADS = 2
PEAK_N = 2048  # the MatMul peak's size: n^3, large enough to run at the kernel's best
# Pause between two ORT sessions' runs, so that neither runs beside the other's spinning threads.
SPIN_PAUSE_S = 0.25
BENCH_TOKENS = (
    77  # every UNet gets a 77-token context (CLIP length) so the cross-attention cost is comparable
)


# ---------------------------------------------------------------------------------------------
# Settings


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """What one ``snapgen bench`` run measures. ``quick`` shrinks everything for a smoke test."""

    quick: bool = False
    runs: int = 5
    warmup: int = 1
    resolutions: tuple[int, ...] = (512, 1024)
    decoder_resolution: int = 1024
    e2e_resolution: int = 1024
    e2e_steps: int = 4
    calib_resolution: int = 512
    calib_prompts: int = 2
    calib_steps: int = 4
    train_seconds: float = 90.0
    archs: tuple[str, ...] = ("snapgen-t2i", "sd15", "sdxl")
    calib_attention_budget_gb: float = 0.25  # attention scores per layer that int8 calibration may hold
    sdxl_in_onnx: bool = False  # SDXL's export + int8 calibration does not fit 24 GB shared
    ort_attention_budget_gb: float = 4.0  # above this, a graph's attention scores won't fit ORT
    # torchscript: same graphs as dynamo for these UNets (no enable_gqa), 5-10x faster to export and
    # about half the peak memory (snapgen-t2i: 6.4 GB), which decides whether SD1.5 fits 24 GB.
    exporter: str = "torchscript"

    @classmethod
    def quick_settings(cls) -> BenchSettings:
        return cls(
            quick=True,
            runs=2,
            warmup=1,
            resolutions=(256,),
            decoder_resolution=256,
            e2e_resolution=256,
            calib_resolution=256,
            calib_prompts=1,
            calib_steps=2,
            train_seconds=15.0,
        )


# ---------------------------------------------------------------------------------------------
# Small helpers shared by the jobs


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports ru_maxrss in KiB)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def time_runs(fn: Callable[[], object], *, runs: int, warmup: int) -> list[float]:
    """Wall-clock seconds of ``runs`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def machine_description() -> dict[str, Any]:
    """CPU model, cores, memory, OS and library versions."""
    cpu = platform.processor() or platform.machine()
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                flags = [
                    f
                    for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_int8")
                    if f in present
                ]
                break
    except OSError:
        pass
    memory_gb = (
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3 if hasattr(os, "sysconf") else 0.0
    )
    from snapgen_app.model.export import tool_versions

    return {
        "cpu": cpu,
        "cpu_flags": flags,
        "logical_cores": os.cpu_count(),
        "memory_gb": round(memory_gb, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "threads": THREADS,
        "tools": tool_versions(),
    }


def _ort_session(path: str) -> Any:
    from snapgen_app.model.quantize import make_session

    return make_session(Path(path), threads=THREADS)


def _random_feeds(inputs: dict[str, list[Any]], seed: int = 0) -> dict[str, np.ndarray]:
    """{name: [shape, dtype, scale]} -> seeded arrays (timesteps get 500, ids get small ints)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, (shape, dtype, fill) in inputs.items():
        if fill is not None:
            feeds[name] = np.full(shape, fill, dtype=dtype)
        else:
            feeds[name] = rng.standard_normal(shape).astype(dtype)
    return feeds


# ---------------------------------------------------------------------------------------------
# Architectures


def snapgen_t2i_unet(seed: int = 0, device: str = "cpu") -> Any:
    """The ``snapgen-t2i`` UNet (preset from snapgen_app.model.presets) with seeded random weights."""
    import torch

    from snapgen_app.model.unet import SnapGenUNet

    config = _preset_unet_config("snapgen-t2i")
    torch.manual_seed(seed)
    with torch.device(device):
        unet = SnapGenUNet.from_unet_config(config)
    if device != "meta":
        _randomize_zero_params(unet, seed)
    return unet.eval()


def _preset_unet_config(name: str) -> Any:
    from snapgen_app.config import UNetConfig

    try:
        from snapgen_app.model import presets
    except ImportError:  # presets not written yet: the UNetConfig defaults are the T2I reconstruction
        return UNetConfig() if name == "snapgen-t2i" else None
    for attr in ("unet_preset", "get_unet_preset", "preset"):
        fn = getattr(presets, attr, None)
        if callable(fn):
            config = fn(name)
            return getattr(config, "unet", config)
    table = getattr(presets, "UNET_PRESETS", None) or getattr(presets, "PRESETS", {})
    config = table[name]
    return getattr(config, "unet", config)


def _randomize_zero_params(module: Any, seed: int) -> None:
    """Zero-initialised output convs make a random-weight UNet output exactly 0: give them noise so
    the benchmark's int8 calibration and parity see real signal (it changes no cost)."""
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in module.parameters():
            if param.ndim > 1 and not torch.any(param):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)


def build_unet(arch: str, *, device: str = "cpu", seed: int = 0) -> Any:
    """``snapgen-t2i``, ``sd15`` or ``sdxl`` with seeded random weights (``meta``: shapes only)."""
    if arch == "snapgen-t2i":
        return snapgen_t2i_unet(seed, device)
    from snapgen_app.model.reference_unets import build_reference_unet

    return build_reference_unet(arch, seed=seed, device=device)


def unet_io_for(arch: str, unet: Any) -> Any:
    from snapgen_app.model.export import unet_io

    return unet_io(unet, tokens=BENCH_TOKENS)


def count_unet_gflops(arch: str, px: int) -> dict[str, float]:
    """Parameters (M) and GFLOP of one UNet evaluation at ``px`` (batch 1), counted on the meta
    device so scaled_dot_product_attention is counted (FlopCounterMode on CPU tensors misses it)."""
    import torch

    unet = build_unet(arch, device="meta")
    io = unet_io_for(arch, unet)
    latent = px // 8
    args = [
        torch.empty(1, io.latent_channels, latent, latent, device="meta"),
        torch.full((1,), 500.0, device="meta"),
        torch.empty(1, io.tokens, io.context_dim, device="meta"),
    ]
    pooled = torch.empty(1, io.pooled_dim, device="meta") if io.pooled_dim else None
    gflop = count_gflops(lambda: unet(*args, pooled))
    params = sum(p.numel() for p in unet.parameters())
    return {"params_m": params / 1e6, "gflop": gflop}


def count_gflops(fn: Callable[[], object]) -> float:
    """GFLOP (multiply-add = 2) of ``fn()`` under torch's FlopCounterMode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops() / 1e9


def attention_score_gb(arch: str, px: int) -> float:
    """Bytes of one self-attention score matrix (+ its softmax) at the highest-resolution attention
    stage, as ONNX Runtime materialises it (MatMul -> Softmax -> MatMul), in GB."""
    latent = px // 8
    if arch == "sd15":  # 8 heads at full latent resolution
        tokens, heads = latent * latent, 8
    elif arch == "sdxl":  # attention from stage 2 (latent/2), 10 heads
        tokens, heads = (latent // 2) ** 2, 10
    else:  # snapgen-t2i: self-attention only at the lowest resolution (latent/4), 14 heads
        tokens, heads = (latent // 4) ** 2, 14
    return 2 * heads * tokens * tokens * 4 / 1e9


# ---------------------------------------------------------------------------------------------
# Jobs (each runs in its own subprocess)


def _peak_matmul(precision: str, n: int) -> tuple[Any, dict[str, np.ndarray]]:
    """(ORT session, feeds) of an n^3 MatMul: fp32, or int8 QDQ (u8 activations, s8 per-channel weights)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((n, n)).astype(np.float32)
    x = rng.standard_normal((n, n)).astype(np.float32)
    io_in = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])]
    io_out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])]
    if precision == "fp32":
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
        inits = [numpy_helper.from_array(weight, "w")]
    else:
        scale = (np.abs(weight).max(axis=0) / 127.0).astype(np.float32)
        wq = np.clip(np.round(weight / scale), -127, 127).astype(np.int8)
        nodes = [
            helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
            helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
            helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=1),
            helper.make_node("MatMul", ["xd", "wd"], ["y"]),
        ]
        inits = [
            numpy_helper.from_array(np.array(8.0 / 255.0, np.float32), "xs"),
            numpy_helper.from_array(np.array(128, np.uint8), "xz"),
            numpy_helper.from_array(wq, "wq"),
            numpy_helper.from_array(scale, "ws"),
            numpy_helper.from_array(np.zeros(n, np.int8), "wz"),
        ]
    graph = helper.make_graph(nodes, f"matmul_{precision}", io_in, io_out, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session, {"x": x}


def job_peak(precision: str, n: int, runs: int) -> dict[str, Any]:
    """GFLOP/s of an n^3 MatMul in ORT (see :func:`_peak_matmul`)."""
    session, feeds = _peak_matmul(precision, n)
    times = time_runs(lambda: session.run(None, feeds), runs=runs, warmup=2)
    median = statistics.median(times)
    return {
        "precision": precision,
        "n": n,
        "runs": runs,
        "median_s": median,
        "gflops": 2 * n**3 / median / 1e9,
    }


def job_export_unet(arch: str, workdir: str, exporter: str = "torchscript") -> dict[str, Any]:
    """Build ``arch`` (random weights, seeded) and export it to fp32 ONNX."""
    import torch

    from snapgen_app.model.export import export_unet

    torch.set_num_threads(THREADS)
    out = Path(workdir)
    unet = build_unet(arch)
    io = unet_io_for(arch, unet)
    start = time.perf_counter()
    graph = export_unet(unet, out / f"{arch}.fp32.onnx", io, example_latent=(32, 32), exporter=exporter)  # type: ignore[arg-type]
    return {
        "fp32": str(graph.path),
        "export_s": time.perf_counter() - start,
        "dynamic": graph.dynamic_axes,
        "peak_rss_gb": peak_rss_bytes() / 1e9,
    }


def job_quantize_unet(arch: str, workdir: str, calib: dict[str, int]) -> dict[str, Any]:
    """int8 static QDQ of ``arch``'s fp32 graph, calibrated on Euler trajectories of the same seeded
    torch model (its own process, so a calibration that runs out of memory leaves the fp32 graph)."""
    import torch

    from snapgen_app.model.quantize import collect_trajectories, quantize_static_int8

    torch.set_num_threads(THREADS)
    out = Path(workdir)
    unet = build_unet(arch)
    io = unet_io_for(arch, unet)
    generator = torch.Generator().manual_seed(5)
    contexts = []
    for _ in range(calib["prompts"]):
        tokens = torch.randn(1, io.tokens, io.context_dim, generator=generator)
        pooled = torch.randn(1, io.pooled_dim, generator=generator) if io.pooled_dim else None
        contexts.append((tokens, pooled))
    latent = calib["px"] // 8
    start = time.perf_counter()
    traj = collect_trajectories(
        unet, contexts, latent_shape=(io.latent_channels, latent, latent), steps=calib["steps"]
    )
    del unet
    quant = quantize_static_int8(out / f"{arch}.fp32.onnx", out / f"{arch}.int8.onnx", traj.unet_feeds)
    np.savez(out / f"{arch}.decoder_calib.npz", *[f["latent"] for f in traj.decoder_feeds])
    return {
        "int8": str(quant.path),
        "quantize_s": time.perf_counter() - start,
        "int8_quantized_nodes": len(quant.quantized_nodes),
        "int8_kept_nodes": len(quant.kept_in_higher_precision),
        "calib_px": calib["px"],
        "calib_timesteps": [round(t, 3) for t in traj.timesteps],
        "peak_rss_gb": peak_rss_bytes() / 1e9,
    }


def calibration_px(arch: str, px: int, budget_gb: float) -> int:
    """The largest calibration size up to ``px`` (halving) whose attention scores fit ``budget_gb``.

    Calibration records every tensor that feeds a MatMul, attention scores included, so SD1.5's
    full-resolution attention (1.07 GB of scores + softmax per layer at 512 px, see
    :func:`attention_score_gb`) does not fit beside the model.
    """
    while px > 64 and attention_score_gb(arch, px) > budget_gb:
        px //= 2
    return px


def job_time_onnx(
    path: str, inputs: dict[str, list[Any]], runs: int, warmup: int, peak_precision: str | None = None
) -> dict[str, Any]:
    """Median wall time of one ORT run of ``path`` on seeded inputs; peak RSS of this process.

    With ``peak_precision``, the MatMul peak of that precision is measured in the same process,
    interleaved with the timed runs (three MatMuls after each run, with pauses so that neither
    session's spinning worker threads slow the other; ``peak_gflops`` is their median):
    this 2-core machine's speed drifts by 10-25 % over minutes (the int8 peak measured 1,265 and 1,727
    GFLOP/s in two runs of the benchmark), so a '% of peak' from a peak taken minutes earlier in
    another process measures the drift as much as the model.
    """
    start = time.perf_counter()
    session = _ort_session(path)
    load_s = time.perf_counter() - start
    feeds = _random_feeds(inputs)
    peak_run: Callable[[], object] | None = None
    if peak_precision:
        peak_session, peak_feeds = _peak_matmul(peak_precision, PEAK_N)
        peak_run = functools.partial(peak_session.run, None, peak_feeds)
        time_runs(peak_run, runs=0, warmup=2)  # warm it before anything is timed
    peak_times: list[float] = []
    for _ in range(warmup):
        session.run(None, feeds)
    times = []
    for _ in range(runs):
        begin = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - begin)
        if peak_run is not None:
            # ORT's idle worker threads spin for a while after a run: without the pauses each
            # session's spinning threads take the CPU from the other (measured: the int8 peak right
            # after a UNet run reads 450-900 GFLOP/s, after 0.2 s of pause 1,480-1,650).
            time.sleep(SPIN_PAUSE_S)
            peak_times += time_runs(peak_run, runs=3, warmup=0)
            time.sleep(SPIN_PAUSE_S)
    result: dict[str, Any] = {
        "median_s": statistics.median(times),
        "times": times,
        "runs": runs,
        "load_s": load_s,
        "peak_rss_gb": peak_rss_bytes() / 1e9,
    }
    if peak_times:
        result["peak_gflops"] = 2 * PEAK_N**3 / statistics.median(peak_times) / 1e9
    return result


def job_time_torch_unet(arch: str, px: int, runs: int, warmup: int) -> dict[str, Any]:
    """Median torch-eager fp32 time of one UNet evaluation at ``px`` (batch 1)."""
    import torch

    torch.set_num_threads(THREADS)
    unet = build_unet(arch)
    io = unet_io_for(arch, unet)
    latent = px // 8
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(1, io.latent_channels, latent, latent, generator=gen)
    timestep = torch.full((1,), 500.0)
    context = torch.randn(1, io.tokens, io.context_dim, generator=gen)
    pooled = torch.randn(1, io.pooled_dim, generator=gen) if io.pooled_dim else None

    def step() -> None:
        with torch.inference_mode():
            unet(sample, timestep, context, pooled)

    times = time_runs(step, runs=runs, warmup=warmup)
    return {
        "median_s": statistics.median(times),
        "times": times,
        "runs": runs,
        "peak_rss_gb": peak_rss_bytes() / 1e9,
    }


def _decoder_module(which: str) -> tuple[Any, int]:
    """(latent decoder module, latent channels): ``tiny`` = SnapGen's, ``sd3`` = the SD3 VAE's."""
    import torch

    from snapgen_app.model import autoencoder as ae

    if which == "tiny":
        torch.manual_seed(0)
        model = ae.SnapGenAutoencoder.from_autoencoder_config(ae.autoencoder_preset("snapgen-tiny"))
        _randomize_zero_params(model, 0)
        return model.latent_decoder().eval(), model.autoencoder_config.latent_channels
    vae = ae.build_sd3_vae(seed=0)

    class SD3LatentDecoder(torch.nn.Module):
        """SD3 VAE decode with its scaling/shift, like the tiny decoder's contract."""

        def __init__(self) -> None:
            super().__init__()
            self.vae = vae

        def forward(self, latent: torch.Tensor) -> torch.Tensor:
            raw = latent / ae.SD3_SCALING_FACTOR + ae.SD3_SHIFT_FACTOR
            return self.vae.decode(raw).sample.clamp(-1.0, 1.0)

    return SD3LatentDecoder().eval(), 16


def job_export_decoder(
    which: str,
    workdir: str,
    precisions: list[str],
    calib_latents: str | None,
    px: int,
    exporter: str = "torchscript",
) -> dict[str, Any]:
    """Export a decoder (fp32 + int8 calibrated on trajectory latents); count its GFLOP at ``px``."""
    import torch

    from snapgen_app.model.export import export_decoder
    from snapgen_app.model.quantize import quantize_static_int8

    torch.set_num_threads(THREADS)
    module, channels = _decoder_module(which)
    counted = module.vae.decoder if which == "sd3" else module  # the SD3 VAE object also holds its encoder
    params = sum(p.numel() for p in counted.parameters()) / 1e6
    latent = torch.randn(1, channels, px // 8, px // 8)
    gflop = count_gflops(
        lambda: module(latent)
    )  # conv-only graph: CPU counting is exact apart from SD3's one attention
    if which == "sd3":
        # the SD3 mid-block attention (1 head, 512 ch, N=(px/8)^2 tokens): QK^T and PV, 2*2*N*N*512
        n_tokens = (px // 8) ** 2
        gflop += 4 * n_tokens * n_tokens * 512 / 1e9
    out = Path(workdir)
    graph = export_decoder(
        module,
        out / f"decoder_{which}.fp32.onnx",
        latent_channels=channels,
        example_latent=(16, 16),
        exporter=exporter,  # type: ignore[arg-type]
    )
    result: dict[str, Any] = {"fp32": str(graph.path), "params_m": params, "gflop": gflop}
    if "int8" in precisions and calib_latents:
        data = np.load(calib_latents)
        feeds = [{"latent": data[key]} for key in data.files]
        quant = quantize_static_int8(graph.path, out / f"decoder_{which}.int8.onnx", feeds)
        result["int8"] = str(quant.path)
    result["peak_rss_gb"] = peak_rss_bytes() / 1e9
    return result


def job_export_text(workdir: str, context_dim: int, pooled_dim: int) -> dict[str, Any]:
    """MiniLM (the bundled all-MiniLM-L6-v2) + random projections to snapgen-t2i's widths, to ONNX."""
    import torch

    from snapgen_app.config import TextConditionerConfig, TextEncoderConfig
    from snapgen_app.model.export import export_text_encoder
    from snapgen_app.model.text_encoders import TextConditioner, export_tokenizer_json

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    config = TextConditionerConfig(
        encoders=(TextEncoderConfig(kind="minilm", max_length=32),),
        context_dim=context_dim,
        pooled_projection_dim=pooled_dim,
        dropout=(0.0,),
    )
    conditioner = TextConditioner(config).eval()
    encoder = conditioner.encoders[0]
    out = Path(workdir)
    graph = export_text_encoder(
        conditioner.export_module(0),
        out / "text_encoder.onnx",
        max_length=32,
        vocab_size=int(encoder.tokenizer.vocab_size),
        exporter="torchscript",
    )
    tokenizer = export_tokenizer_json(encoder, out / "tokenizer.json")
    return {
        "text_encoder": str(graph.path),
        "tokenizer": str(tokenizer),
        "peak_rss_gb": peak_rss_bytes() / 1e9,
    }


def job_e2e(
    unet_path: str,
    decoder_path: str,
    px: int,
    steps: int,
    runs: int,
    pooled_dim: int,
    context_dim: int,
    text_encoder_path: str | None = None,
    tokenizer_path: str | None = None,
) -> dict[str, Any]:
    """Seconds for one image from a prompt: tokenizer + text encoder (MiniLM ONNX) + ``steps`` Euler
    UNet steps + decoder, with sessions already loaded (load time reported apart)."""
    from snapgen_app.model.quantize import flow_matching_timesteps

    start = time.perf_counter()
    unet = _ort_session(unet_path)
    decoder = _ort_session(decoder_path)
    text = _ort_session(text_encoder_path) if text_encoder_path else None
    tokenizer = None
    if tokenizer_path:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(tokenizer_path)
    load_s = time.perf_counter() - start
    latent = px // 8
    rng = np.random.default_rng(0)
    fixed_context = rng.standard_normal((1, BENCH_TOKENS, context_dim)).astype(np.float32)
    fixed_pooled = rng.standard_normal((1, pooled_dim)).astype(np.float32) if pooled_dim else None
    names = {i.name for i in unet.get_inputs()}
    times = flow_matching_timesteps(steps, 3.0)

    def encode() -> tuple[np.ndarray, np.ndarray | None]:
        if text is None or tokenizer is None:
            return fixed_context, fixed_pooled
        encoding = tokenizer.encode("a red fox sitting in a snowy forest at dawn, photo")
        ids = np.array([encoding.ids], dtype=np.int64)
        mask = np.array([encoding.attention_mask], dtype=np.int64)
        tokens, pooled = text.run(None, {"input_ids": ids, "attention_mask": mask})
        return tokens, pooled

    def generate() -> None:
        context, pooled = encode()
        x = np.random.default_rng(1).standard_normal((1, 16, latent, latent)).astype(np.float32)
        for t, t_next in itertools.pairwise(times):
            feed = {
                "sample": x,
                "timestep": np.array([t * 1000.0], np.float32),
                "encoder_hidden_states": context,
            }
            if "pooled_text" in names and pooled is not None:
                feed["pooled_text"] = pooled
            (v,) = unet.run(None, feed)
            x = (x + (t_next - t) * v).astype(np.float32)
        decoder.run(None, {"latent": x})

    times_s = time_runs(generate, runs=runs, warmup=1)
    return {
        "median_s": statistics.median(times_s),
        "times": times_s,
        "runs": runs,
        "load_s": load_s,
        "steps": steps,
        "px": px,
        "text_encoder": "MiniLM ONNX fp32 (32 tokens)" if text is not None else "not included",
        "peak_rss_gb": peak_rss_bytes() / 1e9,
    }


def job_quality(workdir: str, train_seconds: float, steps: int) -> dict[str, Any]:
    """Train a tiny UNet on a synthetic task, export fp32 + int8, compare ORT trajectories (PSNR)."""
    import torch

    from snapgen_app.model.export import export_unet, unet_io
    from snapgen_app.model.quantize import (
        collect_trajectories,
        flow_matching_timesteps,
        psnr_db,
        quantize_static_int8,
    )

    torch.set_num_threads(THREADS)
    unet, contexts, losses = train_tiny_unet(train_seconds)
    io = unet_io(unet, tokens=contexts[0][0].shape[1])
    out = Path(workdir)
    graph = export_unet(unet, out / "tiny.fp32.onnx", io, example_latent=(16, 16), exporter="torchscript")
    traj = collect_trajectories(
        unet, contexts, latent_shape=(io.latent_channels, 16, 16), steps=8, shift=1.0, seed=11
    )
    quant = quantize_static_int8(graph.path, out / "tiny.int8.onnx", traj.unet_feeds)
    fp32 = _ort_session(str(graph.path))
    int8 = _ort_session(str(quant.path))
    times = flow_matching_timesteps(steps, 1.0)
    psnrs = []
    for index, (tokens, pooled) in enumerate(contexts):
        x0 = (
            np.random.default_rng(100 + index)
            .standard_normal((1, io.latent_channels, 16, 16))
            .astype(np.float32)
        )
        finals = []
        for session in (fp32, int8):
            x = x0.copy()
            for t, t_next in itertools.pairwise(times):
                feed = {
                    "sample": x,
                    "timestep": np.array([t * 1000.0], np.float32),
                    "encoder_hidden_states": tokens.numpy(),
                }
                if pooled is not None:
                    feed["pooled_text"] = pooled.numpy()
                (v,) = session.run(None, feed)
                x = (x + (t_next - t) * v).astype(np.float32)
            finals.append(x)
        psnrs.append(psnr_db(finals[0], finals[1]))
    return {
        "psnr_db_median": statistics.median(psnrs),
        "psnr_db_min": min(psnrs),
        "trajectories": len(psnrs),
        "steps": steps,
        "train_seconds": train_seconds,
        "loss_first": losses[0],
        "loss_last": float(np.mean(losses[-20:])),
        "train_steps": len(losses),
    }


def train_tiny_unet(seconds: float, seed: int = 0) -> tuple[Any, list[tuple[Any, Any]], list[float]]:
    """Flow-matching training of a tiny UNet on a synthetic conditional task for ``seconds``.

    Task: 4 "prompts" (fixed random token embeddings), each owning a smooth latent pattern; the
    model learns to generate its prompt's pattern (plus small per-sample variation). Returns the
    model, the prompts' (tokens [1,8,D], pooled [1,P]) and the loss curve.
    """
    import torch
    import torch.nn.functional as F

    from snapgen_app.model.unet import SnapGenUNet

    torch.manual_seed(seed)
    config = _preset_unet_config("tiny") if _has_preset("tiny") else _fallback_tiny_config()
    unet = SnapGenUNet.from_unet_config(config)
    gen = torch.Generator().manual_seed(seed)
    n_prompts, tokens = 4, 8
    contexts = [
        (
            torch.randn(1, tokens, config.context_dim, generator=gen),
            torch.randn(1, config.pooled_dim, generator=gen) if config.pooled_dim else None,
        )
        for _ in range(n_prompts)
    ]
    patterns = F.interpolate(
        torch.randn(n_prompts, config.in_channels, 4, 4, generator=gen), size=(16, 16), mode="bilinear"
    )
    optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    losses: list[float] = []
    deadline = time.perf_counter() + seconds
    unet.train()
    while time.perf_counter() < deadline:
        idx = torch.randint(0, n_prompts, (16,), generator=gen)
        x0 = patterns[idx] + 0.1 * torch.randn(16, config.in_channels, 16, 16, generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        t = torch.sigmoid(torch.randn(16, generator=gen))  # logit-normal
        xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
        ctx = torch.cat([contexts[i][0] for i in idx.tolist()])
        pooled = torch.cat([contexts[i][1] for i in idx.tolist()]) if config.pooled_dim else None
        loss = F.mse_loss(unet(xt, t * 1000.0, ctx, pooled), eps - x0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    return unet.eval(), contexts, losses


def _has_preset(name: str) -> bool:
    try:
        return _preset_unet_config(name) is not None
    except Exception:
        return False


def _fallback_tiny_config() -> Any:
    from snapgen_app.config import UNetConfig

    return UNetConfig(
        block_channels=(32, 64),
        down_layers=(1, 1),
        up_layers=(2, 2),
        transformer_depth=(1, 1),
        self_attention=(False, True),
        cross_attention=(True, True),
        mid_transformer_depth=1,
        context_dim=32,
        pooled_dim=16,
        norm_groups=8,
        time_embed_dim=64,
        time_freq_dim=32,
        attention_head_dim=16,
    )


JOBS: dict[str, Callable[..., dict[str, Any]]] = {
    "peak": job_peak,
    "export_unet": job_export_unet,
    "quantize_unet": job_quantize_unet,
    "time_onnx": job_time_onnx,
    "time_torch_unet": job_time_torch_unet,
    "export_decoder": job_export_decoder,
    "e2e": job_e2e,
    "export_text": job_export_text,
    "quality": job_quality,
    "count_unet": lambda arch, px: count_unet_gflops(arch, px),
}


def run_job(name: str, log: Callable[[str], None], **kwargs: Any) -> dict[str, Any]:
    """Run one job in a fresh Python process; {"error": ...} instead of raising when it fails."""
    payload = json.dumps({"name": name, "kwargs": kwargs})
    log(f"  {name} {json.dumps(kwargs)[:140]}")
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "snapgen_app.model.bench", "--job", payload],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(THREADS)},
        check=False,
    )
    elapsed = time.perf_counter() - start
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("BENCH_RESULT "):
            result = json.loads(line[len("BENCH_RESULT ") :])
            result["job_wall_s"] = elapsed
            return result
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    reason = "killed (out of memory?)" if proc.returncode in (-9, 137) else " | ".join(tail)[-400:]
    log(f"    failed: {reason}")
    return {"error": reason, "returncode": proc.returncode, "job_wall_s": elapsed}


# ---------------------------------------------------------------------------------------------
# The whole run


def unet_inputs(io_like: dict[str, int], px: int) -> dict[str, list[Any]]:
    """Input specs (shape, dtype, fill) for a UNet graph at ``px`` (batch 1)."""
    latent = px // 8
    spec: dict[str, list[Any]] = {
        "sample": [[1, io_like["latent_channels"], latent, latent], "float32", None],
        "timestep": [[1], "float32", 500.0],
        "encoder_hidden_states": [[1, BENCH_TOKENS, io_like["context_dim"]], "float32", None],
    }
    if io_like["pooled_dim"]:
        spec["pooled_text"] = [[1, io_like["pooled_dim"]], "float32", None]
    return spec


ARCH_IO: dict[str, dict[str, int]] = {
    "sd15": {"latent_channels": 4, "context_dim": 768, "pooled_dim": 0},
    "sdxl": {"latent_channels": 4, "context_dim": 2048, "pooled_dim": 1280},
}


def _snapgen_io() -> dict[str, int]:
    config = _preset_unet_config("snapgen-t2i")
    return {
        "latent_channels": config.in_channels,
        "context_dim": config.context_dim,
        "pooled_dim": config.pooled_dim,
    }


def run_bench(settings: BenchSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every measurement of ``settings`` and return the report dict (see :func:`render_table`)."""
    started = time.perf_counter()
    report: dict[str, Any] = {
        "settings": dataclasses.asdict(settings),
        "machine": machine_description(),
        "unet": [],
        "decoder": [],
        "notes": [],
    }
    io = {"snapgen-t2i": _snapgen_io(), **ARCH_IO}
    with tempfile.TemporaryDirectory(prefix="snapgen-bench-") as work:
        log("MatMul peaks")
        report["peak"] = {
            p: run_job("peak", log, precision=p, n=PEAK_N, runs=max(5, settings.runs))
            for p in ("fp32", "int8")
        }

        log("GFLOP counts")
        counts = {
            (a, px): run_job("count_unet", log, arch=a, px=px)
            for a in settings.archs
            for px in settings.resolutions
        }

        calib = {
            "px": settings.calib_resolution,
            "prompts": settings.calib_prompts,
            "steps": settings.calib_steps,
        }
        exported: dict[str, dict[str, Any]] = {}
        for arch in settings.archs:
            if arch == "sdxl" and not settings.sdxl_in_onnx:
                report["notes"].append(
                    "SDXL (2.57 B parameters, 10.3 GB fp32) is not exported: ONNX export plus int8 calibration needs "
                    "close to this machine's 24 GB; SDXL and snapgen-t2i are both timed in torch eager fp32 instead."
                )
                continue
            log(f"export {arch}")
            exported[arch] = run_job("export_unet", log, arch=arch, workdir=work, exporter=settings.exporter)
            if "error" in exported[arch]:
                report["notes"].append(
                    f"{arch}: ONNX export failed ({exported[arch]['error']}); not timed in ONNX Runtime."
                )
                continue
            arch_calib = {
                **calib,
                "px": calibration_px(arch, calib["px"], settings.calib_attention_budget_gb),
            }
            if arch_calib["px"] != calib["px"]:
                report["notes"].append(
                    f"{arch} int8 is calibrated at {arch_calib['px']} px, not {calib['px']} px: calibration keeps "
                    f"its {attention_score_gb(arch, calib['px']):.1f} GB attention scores per layer in memory."
                )
            quant = run_job("quantize_unet", log, arch=arch, workdir=work, calib=arch_calib)
            if "error" in quant:
                report["notes"].append(
                    f"{arch}: int8 quantization failed ({quant['error']}); only fp32 is timed."
                )
            else:
                exported[arch].update({k: v for k, v in quant.items() if k != "peak_rss_gb"})
                exported[arch]["quantize_peak_rss_gb"] = quant["peak_rss_gb"]

        for arch in settings.archs:
            for px in settings.resolutions:
                count = counts[(arch, px)]
                fits_ort = attention_score_gb(arch, px) <= settings.ort_attention_budget_gb
                if arch in exported and "error" not in exported[arch] and fits_ort:
                    for precision in ("fp32", "int8"):
                        path = exported[arch].get(precision)
                        if not path:
                            continue
                        log(f"time {arch} {px}px ORT {precision}")
                        res = run_job(
                            "time_onnx",
                            log,
                            path=path,
                            inputs=unet_inputs(io[arch], px),
                            runs=settings.runs,
                            warmup=settings.warmup,
                            peak_precision=precision,
                        )
                        report["unet"].append(
                            _unet_row(arch, px, "onnxruntime", precision, count, res, report["peak"])
                        )
                elif arch in exported and "error" not in exported[arch] and not fits_ort:
                    report["notes"].append(
                        f"{arch} at {px} px is not run in ONNX Runtime: its self-attention materialises "
                        f"{attention_score_gb(arch, px):.1f} GB of scores; timed in torch eager fp32 (which streams attention)."
                    )
                needs_torch = (arch == "sdxl" and not settings.sdxl_in_onnx) or not fits_ort
                if needs_torch:
                    log(f"time {arch} {px}px torch eager fp32")
                    res = run_job(
                        "time_torch_unet", log, arch=arch, px=px, runs=settings.runs, warmup=settings.warmup
                    )
                    report["unet"].append(
                        _unet_row(arch, px, "torch-eager", "fp32", count, res, report["peak"])
                    )
            if arch != "snapgen-t2i" and "snapgen-t2i" in settings.archs:
                # the same-run baseline for torch-eager comparisons
                for px in settings.resolutions:
                    needs = (arch == "sdxl" and not settings.sdxl_in_onnx) or attention_score_gb(
                        arch, px
                    ) > settings.ort_attention_budget_gb
                    have = any(
                        r["arch"] == "snapgen-t2i" and r["px"] == px and r["runtime"] == "torch-eager"
                        for r in report["unet"]
                    )
                    if needs and not have:
                        log(f"time snapgen-t2i {px}px torch eager fp32")
                        res = run_job(
                            "time_torch_unet",
                            log,
                            arch="snapgen-t2i",
                            px=px,
                            runs=settings.runs,
                            warmup=settings.warmup,
                        )
                        report["unet"].append(
                            _unet_row(
                                "snapgen-t2i",
                                px,
                                "torch-eager",
                                "fp32",
                                counts[("snapgen-t2i", px)],
                                res,
                                report["peak"],
                            )
                        )

        calib_latents = (
            str(Path(work) / "snapgen-t2i.decoder_calib.npz") if "snapgen-t2i" in exported else None
        )
        px = settings.decoder_resolution
        decoders: dict[str, dict[str, Any]] = {}
        for which in ("tiny", "sd3"):
            log(f"export decoder {which}")
            decoders[which] = run_job(
                "export_decoder",
                log,
                which=which,
                workdir=work,
                precisions=["fp32", "int8"],
                calib_latents=calib_latents,
                px=px,
                exporter=settings.exporter,
            )
            for precision in ("fp32", "int8"):
                path = decoders[which].get(precision)
                if not path:
                    continue
                log(f"time decoder {which} {px}px {precision}")
                spec = {"latent": [[1, 16, px // 8, px // 8], "float32", None]}
                res = run_job(
                    "time_onnx",
                    log,
                    path=path,
                    inputs=spec,
                    runs=settings.runs,
                    warmup=settings.warmup,
                    peak_precision=precision,
                )
                report["decoder"].append(
                    _decoder_row(which, px, precision, decoders[which], res, report["peak"])
                )

        snap = exported.get("snapgen-t2i", {})
        if snap.get("int8") and decoders.get("tiny", {}).get("fp32"):
            decoder_path = decoders["tiny"].get("int8") or decoders["tiny"]["fp32"]
            log("export the MiniLM text encoder")
            text = run_job(
                "export_text",
                log,
                workdir=work,
                context_dim=io["snapgen-t2i"]["context_dim"],
                pooled_dim=io["snapgen-t2i"]["pooled_dim"],
            )
            log(f"end to end {settings.e2e_steps} steps {settings.e2e_resolution}px int8")
            report["e2e"] = run_job(
                "e2e",
                log,
                unet_path=snap["int8"],
                decoder_path=decoder_path,
                px=settings.e2e_resolution,
                steps=settings.e2e_steps,
                runs=max(3, settings.runs // 2 + 1),
                pooled_dim=io["snapgen-t2i"]["pooled_dim"],
                context_dim=io["snapgen-t2i"]["context_dim"],
                text_encoder_path=text.get("text_encoder"),
                tokenizer_path=text.get("tokenizer"),
            )
            report["e2e"]["decoder"] = Path(decoder_path).name

        log(f"int8 quality on a tiny UNet trained {settings.train_seconds:.0f} s")
        report["quality"] = run_job(
            "quality", log, workdir=work, train_seconds=settings.train_seconds, steps=8
        )
        report["exports"] = exported
        report["decoder_exports"] = decoders
    report["targets"] = evaluate_targets(report)
    report["total_s"] = time.perf_counter() - started
    return report


def _unet_row(
    arch: str,
    px: int,
    runtime: str,
    precision: str,
    count: dict[str, Any],
    res: dict[str, Any],
    peaks: dict[str, Any],
) -> dict[str, Any]:
    row: dict[str, Any] = {"arch": arch, "px": px, "runtime": runtime, "precision": precision}
    row.update(params_m=count.get("params_m"), gflop=count.get("gflop"))
    if "error" in res:
        row["error"] = res["error"]
        return row
    row.update(median_s=res["median_s"], runs=res["runs"], peak_rss_gb=res["peak_rss_gb"])
    _add_throughput(row, res, peaks.get(precision, {}).get("gflops"))
    return row


def _add_throughput(row: dict[str, Any], res: dict[str, Any], separate_peak: float | None) -> None:
    """GFLOP/s and % of peak; the peak measured beside the runs (``time_onnx``) when there is one."""
    if not row["gflop"]:
        return
    row["gflops"] = row["gflop"] / res["median_s"]
    peak = res.get("peak_gflops") or separate_peak
    if peak:
        row["peak_gflops"] = peak
        row["peak_interleaved"] = "peak_gflops" in res
        row["pct_of_peak"] = 100.0 * row["gflops"] / peak


def _decoder_row(
    which: str, px: int, precision: str, export: dict[str, Any], res: dict[str, Any], peaks: dict[str, Any]
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "decoder": which,
        "px": px,
        "precision": precision,
        "params_m": export.get("params_m"),
        "gflop": export.get("gflop"),
    }
    if "error" in res:
        row["error"] = res["error"]
        return row
    row.update(median_s=res["median_s"], runs=res["runs"], peak_rss_gb=res["peak_rss_gb"])
    _add_throughput(row, res, peaks.get(precision, {}).get("gflops"))
    return row


def _find(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()) and "median_s" in row:
            return row
    return None


def _flop_bound_detail(big: dict[str, Any], small: dict[str, Any], big_name: str, small_name: str) -> str:
    """What bounds a latency ratio: the FLOP ratio (the latency ratio at equal GFLOP/s) and each
    side's achieved GFLOP/s; '' when a row has no count."""
    if not (big.get("gflop") and small.get("gflop") and big.get("gflops") and small.get("gflops")):
        return ""
    return (
        f"GFLOP ratio {big['gflop'] / small['gflop']:.2f}x (the latency ratio if both ran at the same GFLOP/s); "
        f"achieved {big_name} {big['gflops']:.0f} vs {small_name} {small['gflops']:.0f} GFLOP/s"
    )


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets with the measured value and pass/fail (None when not measured)."""
    rows = report["unet"]
    targets: list[dict[str, Any]] = []
    top = max((r["px"] for r in rows), default=0)

    def add(name: str, value: float | None, goal: str, ok: bool | None, detail: str = "") -> None:
        targets.append({"target": name, "value": value, "goal": goal, "passed": ok, "detail": detail})

    fp32 = _find(rows, arch="snapgen-t2i", px=top, runtime="onnxruntime", precision="fp32")
    int8 = _find(rows, arch="snapgen-t2i", px=top, runtime="onnxruntime", precision="int8")
    speedup = fp32["median_s"] / int8["median_s"] if fp32 and int8 else None
    add(
        f"int8 vs fp32 speed-up, snapgen-t2i UNet {top}px",
        speedup,
        ">= 1.8x",
        None if speedup is None else speedup >= 1.8,
    )
    quality = report.get("quality", {})
    psnr = quality.get("psnr_db_min")
    add(
        "int8 vs fp32 PSNR on a trained model's trajectories",
        psnr,
        ">= 30 dB",
        None if psnr is None else psnr >= 30.0,
        "tiny UNet trained on a synthetic task; worst of the trajectories",
    )
    for runtime, precision in (("onnxruntime", "int8"), ("onnxruntime", "fp32"), ("torch-eager", "fp32")):
        snap = _find(rows, arch="snapgen-t2i", px=top, runtime=runtime, precision=precision)
        sdxl = _find(rows, arch="sdxl", px=top, runtime=runtime, precision=precision)
        if snap and sdxl:
            ratio = sdxl["median_s"] / snap["median_s"]
            add(
                f"SDXL / snapgen-t2i per-step latency {top}px ({runtime} {precision})",
                ratio,
                ">= 7x",
                ratio >= 7.0,
                _flop_bound_detail(sdxl, snap, "SDXL", "snapgen-t2i"),
            )
    dec = {(r["decoder"], r["precision"]): r for r in report["decoder"] if "median_s" in r}
    for precision in ("fp32", "int8"):
        if ("tiny", precision) in dec and ("sd3", precision) in dec:
            ratio = dec[("sd3", precision)]["median_s"] / dec[("tiny", precision)]["median_s"]
            add(
                f"SD3 decoder / tiny decoder {dec[('tiny', precision)]['px']}px ({precision})",
                ratio,
                ">= 30x",
                ratio >= 30.0,
                _flop_bound_detail(dec[("sd3", precision)], dec[("tiny", precision)], "SD3", "tiny"),
            )
    for precision, goal in (("int8", 50.0), ("fp32", None)):
        row = _find(rows, arch="snapgen-t2i", px=top, runtime="onnxruntime", precision=precision)
        pct = row.get("pct_of_peak") if row else None
        add(
            f"snapgen-t2i {top}px {precision}: % of {precision} MatMul peak",
            pct,
            ">= 50 %" if goal else "reported",
            None if pct is None or goal is None else pct >= goal,
        )
    e2e = report.get("e2e", {})
    e2e_s = e2e.get("median_s")
    add(
        f"end to end {e2e.get('steps', 4)}-step {e2e.get('px', '?')}px image, snapgen-t2i int8",
        e2e_s,
        "<= 10 s",
        None if e2e_s is None else e2e_s <= 10.0,
    )
    return targets


# ---------------------------------------------------------------------------------------------
# Output


def _fmt(value: Any, spec: str = ".2f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return format(value, spec)
    return str(value)


def _peak_used(row: dict[str, Any]) -> str:
    """The peak a row's '% of peak' divides by; 'beside' = measured interleaved with its runs."""
    if "peak_gflops" not in row:
        return "-"
    return f"{row['peak_gflops']:.0f} ({'beside' if row.get('peak_interleaved') else 'separate'})"


def render_table(report: dict[str, Any]) -> str:
    """The report as Markdown tables (printed by the CLI and written to docs/performance.md)."""
    lines: list[str] = []
    peak = report.get("peak", {})
    lines.append(
        "MatMul peak (2048^3, ONNX Runtime, 2 threads): "
        + ", ".join(f"{p} {_fmt(v.get('gflops'), '.0f')} GFLOP/s" for p, v in peak.items())
    )
    lines.append("")
    lines.append(
        "| UNet | px | runtime | precision | params (M) | GFLOP/step | s/step (median) | runs | GFLOP/s | % of peak | peak used (GFLOP/s) | peak RSS (GB) |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in report.get("unet", []):
        if "error" in r:
            lines.append(
                f"| {r['arch']} | {r['px']} | {r['runtime']} | {r['precision']} | {_fmt(r.get('params_m'), '.0f')} | {_fmt(r.get('gflop'), '.0f')} | failed: {r['error'][:60]} | | | | | |"
            )
            continue
        lines.append(
            f"| {r['arch']} | {r['px']} | {r['runtime']} | {r['precision']} | {_fmt(r.get('params_m'), '.0f')} | {_fmt(r.get('gflop'), '.0f')} "
            f"| {_fmt(r['median_s'], '.3f')} | {r['runs']} | {_fmt(r.get('gflops'), '.0f')} | {_fmt(r.get('pct_of_peak'), '.0f')} "
            f"| {_peak_used(r)} | {_fmt(r['peak_rss_gb'], '.2f')} |"
        )
    lines.append("")
    lines.append(
        "| decoder | px | precision | params (M) | GFLOP | s (median) | runs | GFLOP/s | % of peak | peak used (GFLOP/s) | peak RSS (GB) |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in report.get("decoder", []):
        if "error" in r:
            lines.append(
                f"| {r['decoder']} | {r['px']} | {r['precision']} | | | failed: {r['error'][:60]} | | | | | |"
            )
            continue
        lines.append(
            f"| {r['decoder']} | {r['px']} | {r['precision']} | {_fmt(r.get('params_m'), '.2f')} | {_fmt(r.get('gflop'), '.1f')} | {_fmt(r['median_s'], '.3f')} "
            f"| {r['runs']} | {_fmt(r.get('gflops'), '.0f')} | {_fmt(r.get('pct_of_peak'), '.0f')} | {_peak_used(r)} | {_fmt(r['peak_rss_gb'], '.2f')} |"
        )
    e2e = report.get("e2e")
    if e2e:
        lines.append("")
        if "error" in e2e:
            lines.append(f"End to end: failed ({e2e['error']})")
        else:
            lines.append(
                f"End to end, snapgen-t2i int8, {e2e['steps']} steps, {e2e['px']} px, decoder {e2e.get('decoder')}: "
                f"{_fmt(e2e['median_s'], '.2f')} s (median of {e2e['runs']}; session load {_fmt(e2e['load_s'], '.1f')} s apart; "
                f"peak RSS {_fmt(e2e['peak_rss_gb'], '.2f')} GB; text encoder {e2e['text_encoder']})"
            )
    quality = report.get("quality")
    if quality:
        if "error" in quality:
            lines.append(f"int8 quality: failed ({quality['error']})")
        else:
            lines.append(
                f"int8 quality: tiny UNet trained {quality['train_seconds']:.0f} s ({quality['train_steps']} steps, loss "
                f"{quality['loss_first']:.3f} -> {quality['loss_last']:.3f}); {quality['steps']}-step trajectories int8 vs fp32 "
                f"PSNR median {_fmt(quality['psnr_db_median'], '.1f')} dB, worst {_fmt(quality['psnr_db_min'], '.1f')} dB over {quality['trajectories']}"
            )
    lines.append("")
    lines.append("| target | measured | goal | result |")
    lines.append("|---|---|---|---|")
    for t in report.get("targets", []):
        verdict = {True: "met", False: "NOT met", None: "not measured" if t["value"] is None else "reported"}[
            t["passed"]
        ]
        lines.append(f"| {t['target']} | {_fmt(t['value'])} | {t['goal']} | {verdict} |")
    details = [f"- {t['target']}: {t['detail']}" for t in report.get("targets", []) if t.get("detail")]
    if details:
        lines += ["", *details]
    for note in report.get("notes", []):
        lines.append(f"\nNote: {note}")
    return "\n".join(lines)


def render_markdown(report: dict[str, Any]) -> str:
    """docs/performance.md: machine, method, tables, targets."""
    machine = report["machine"]
    settings = report["settings"]
    head = [
        "# Performance",
        "",
        "Written by `snapgen bench` (snapgen_app/model/bench.py); do not edit by hand, re-run the benchmark.",
        "",
        "## Machine",
        "",
        f"- CPU: {machine['cpu']} ({machine['logical_cores']} logical cores; flags: {', '.join(machine['cpu_flags']) or 'n/a'})",
        f"- Memory: {machine['memory_gb']} GB; OS: {machine['os']}; Python {machine['python']}",
        f"- Tools: {', '.join(f'{k} {v}' for k, v in machine['tools'].items())}",
        f"- ONNX Runtime: CPU provider, intra-op threads {machine['threads']}, ORT_ENABLE_ALL; torch eager: {machine['threads']} threads",
        "",
        "## Method",
        "",
        f"- Figures are medians of {settings['runs']} timed runs after {settings['warmup']} warm-up run(s); each measurement runs in its own process (peak RSS is that process's).",
        "- All UNets have random weights, batch 1, a 77-token text context, timestep 500; built from their public configs, exported with "
        f"torch.onnx ({settings['exporter']} exporter, opset 18) and quantized the same way (int8 static QDQ: Conv + weight MatMul/Gemm only, u8 activations, "
        f"s8 per-channel weights, weight MatMuls with a float output, MinMax calibration on {settings['calib_prompts']} Euler trajectories x {settings['calib_steps']} steps at {settings['calib_resolution']} px).",
        "- GFLOP counted with torch's FlopCounterMode on the meta device (attention included; multiply-add = 2 FLOP). "
        "'% of peak' = achieved GFLOP/s over the ONNX Runtime MatMul peak of the same precision; for ONNX Runtime rows that peak "
        "is measured in the same process, three 2048^3 MatMuls after each timed run with 0.25 s pauses around them ('beside'), because this machine's speed drifts "
        "by 10-25 % over minutes; torch rows use the peak measured at the start ('separate').",
        f"- Full run: {'no (quick smoke settings: numbers are not representative)' if settings['quick'] else 'yes'}; total {report.get('total_s', 0) / 60:.1f} min.",
        "",
        "## Results",
        "",
    ]
    tail = [
        "",
        "## Reproduce",
        "",
        "`snapgen bench` (or `benchmarks/full_bench.sh`, which also keeps the JSON) on a quiet machine; "
        "`snapgen bench --quick` smoke-tests every path at 256 px. Targets come from issue 3; a target "
        "marked NOT met is reported as measured, never loosened.",
    ]
    return "\n".join(head) + render_table(report) + "\n" + "\n".join(tail) + "\n"


# ---------------------------------------------------------------------------------------------
# Subprocess entry point


def _job_main(payload: str) -> int:
    job = json.loads(payload)
    result = JOBS[job["name"]](**job["kwargs"])
    sys.stdout.write("BENCH_RESULT " + json.dumps(result, default=str) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m snapgen_app.model.bench")
    parser.add_argument("--job", required=True, help="JSON {name, kwargs} of one measurement")
    args = parser.parse_args(argv)
    return _job_main(args.job)


if __name__ == "__main__":
    sys.exit(main())
