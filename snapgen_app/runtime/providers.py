"""Execution-provider choice for ONNX Runtime.

``auto`` picks the best provider the installed onnxruntime offers (CUDA > DirectML > CoreML > CPU)
and logs why it skipped the others; a provider that the user asked for by name but that this
onnxruntime build lacks raises :class:`ProviderError` saying which package to install. The CPU
provider is always appended as the fallback for operators a GPU provider cannot run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import onnxruntime as ort

from snapgen_app.errors import ProviderError

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
PROVIDER_BY_DEVICE: dict[str, str] = {
    "cuda": "CUDAExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "cpu": CPU,
}
DEVICE_BY_PROVIDER: dict[str, str] = {v: k for k, v in PROVIDER_BY_DEVICE.items()}
AUTO_ORDER: tuple[str, ...] = ("cuda", "dml", "coreml", "cpu")
INSTALL_HINTS: dict[str, str] = {
    "cuda": "install onnxruntime-gpu instead of onnxruntime (pip install onnxruntime-gpu, "
    "`pip install snapgen-studio[gpu]`) with an NVIDIA driver and CUDA 12 runtime",
    "dml": "on Windows, install onnxruntime-directml instead of onnxruntime (pip install onnxruntime-directml)",
    "coreml": "use the macOS onnxruntime wheel (pip install onnxruntime on macOS includes CoreML)",
    "cpu": "reinstall onnxruntime (pip install --force-reinstall onnxruntime)",
}


def available_providers() -> tuple[str, ...]:
    """Provider names the installed onnxruntime can use, in onnxruntime's order of preference."""
    return tuple(ort.get_available_providers())


def choose_providers(device: str, available: Sequence[str] | None = None) -> list[str]:
    """Provider list for an InferenceSession, best first, always ending with the CPU provider.

    ``device`` is "auto", "cpu", "cuda", "dml" or "coreml". ``available`` defaults to
    :func:`available_providers`. Raises ProviderError when a named device's provider is missing.
    """
    present = tuple(available) if available is not None else available_providers()
    if device == "auto":
        for candidate in AUTO_ORDER:
            name = PROVIDER_BY_DEVICE[candidate]
            if name in present:
                if candidate != "cuda":
                    skipped = [PROVIDER_BY_DEVICE[d] for d in AUTO_ORDER[: AUTO_ORDER.index(candidate)]]
                    log.info(
                        "device auto: using %s (%s not in this onnxruntime build)", name, ", ".join(skipped)
                    )
                return _with_cpu_fallback(name)
        raise ProviderError(
            f"this onnxruntime offers no usable provider (it has {list(present)})", hint=INSTALL_HINTS["cpu"]
        )
    if device not in PROVIDER_BY_DEVICE:
        raise ProviderError(f"unknown device {device!r}; allowed: auto, {', '.join(PROVIDER_BY_DEVICE)}")
    name = PROVIDER_BY_DEVICE[device]
    if name not in present:
        raise ProviderError(
            f"device {device!r} needs {name}, which this onnxruntime does not have (it has {list(present)})",
            hint=INSTALL_HINTS[device] + ", or use --device auto",
        )
    return _with_cpu_fallback(name)


def _with_cpu_fallback(name: str) -> list[str]:
    return [name] if name == CPU else [name, CPU]
