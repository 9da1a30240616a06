"""Which mixed precision a training or sampling run uses on this machine.

bf16 autocast is the recipe's choice where the CPU computes in bf16 (AVX-512 BF16, AMX, Arm BF16:
oneDNN's bf16 kernels): on the project's Zen-5-class CPU it trains the emoji UNets about 2x faster
than fp32. Where it does not, PyTorch falls back to a slow reference path and bf16 costs far more
than it saves. Measured on a 2-core AMD EPYC with AVX2 only (torch 2.13, two threads, 2026-12-07,
``benchmarks/precision_speed.py``, medians of 3 alternating rounds): a ``[16384, 256] x [256, 1024]``
linear 103 GFLOP/s in fp32 against 9.7 under bf16 autocast; a training step of the emoji recipe's
teacher (batch 64) 20.7 against 2.1 samples/s. So ``"auto"`` (the default) takes bf16 on a CPU only
when oneDNN reports bf16 support, and fp32 otherwise; an explicit ``"bf16"`` is kept (with a warning
in :func:`resolve_precision`'s reason).

GPUs: bf16 where CUDA supports it, else fp16 (both fast there).
"""

from __future__ import annotations

import functools
from typing import Literal

import torch

Precision = Literal["no", "bf16", "fp16"]


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True when oneDNN runs bf16 kernels on this CPU (AVX-512 BF16 / AMX on x86, BF16 on Arm)."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if probe is None:  # a build without the query: trust the ISA flags torch reports
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return bool(probe())


def resolve_precision(requested: str, device: torch.device | str) -> tuple[Precision, str]:
    """(the precision to run, why) for ``requested`` in ``auto``/``no``/``bf16``/``fp16`` on ``device``."""
    kind = torch.device(device).type
    if kind == "cuda":
        if requested != "auto":
            return requested, f"{requested} as configured"  # type: ignore[return-value]
        if torch.cuda.is_bf16_supported():
            return "bf16", "bf16 autocast (CUDA)"
        return "fp16", "fp16 autocast (this GPU has no bf16)"
    if requested == "fp16":
        requested = "bf16" if cpu_has_fast_bf16() else "no"
        return requested, f"fp16 autocast needs a GPU: {cpu_words(requested)}"  # type: ignore[return-value]
    if requested == "auto":
        chosen: Precision = "bf16" if cpu_has_fast_bf16() else "no"
        return chosen, cpu_words(chosen)
    if requested == "bf16" and not cpu_has_fast_bf16():
        return "bf16", (
            "bf16 autocast as configured, but this CPU has no bf16 kernels: expect it to run several "
            "times slower than fp32 (mixed_precision 'auto' or 'no' picks fp32)"
        )
    return requested, f"{requested} as configured"  # type: ignore[return-value]


def cpu_words(chosen: str) -> str:
    """Why a CPU run takes ``chosen`` (``bf16`` or ``no``) under ``auto``."""
    if chosen == "bf16":
        return "bf16 autocast (this CPU computes in bf16)"
    return "fp32 (this CPU has no bf16 kernels; bf16 would run several times slower)"
