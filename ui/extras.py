"""Service helpers the UI pages use (PNG settings, devices) plus library versions for About."""

from __future__ import annotations

from snapgen_app import service

# Forwarders kept so UI modules have one import place; the implementations live in the service.
read_png_request = service.read_png_request
png_text = service.read_png_text
available_devices = service.available_devices
DeviceChoice = service.DeviceChoice


def library_versions() -> dict[str, str]:
    """Versions for the About box: SnapGen Studio, onnxruntime, Qt/PySide6, Python."""
    import platform

    import onnxruntime
    import PySide6
    from PySide6.QtCore import qVersion

    from snapgen_app import __version__

    return {
        "SnapGen Studio": __version__,
        "ONNX Runtime": onnxruntime.__version__,
        "Qt": qVersion(),
        "PySide6": PySide6.__version__,
        "Python": platform.python_version(),
    }
