"""Image helpers: numpy previews to QImage, thumbnails, and a non-modal full-size viewer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PySide6.QtCore import Qt
from PySide6.QtGui import QImage, QPixmap
from PySide6.QtWidgets import QDialog, QLabel, QScrollArea, QVBoxLayout, QWidget


def qimage_from_rgb(pixels: np.ndarray) -> QImage:
    """uint8 [H, W, 3] RGB -> a QImage that owns a copy of the pixels."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected uint8 [H, W, 3], got {pixels.dtype} {pixels.shape}")
    data = np.ascontiguousarray(pixels)
    height, width, _ = data.shape
    image = QImage(data.data, width, height, 3 * width, QImage.Format.Format_RGB888)
    return image.copy()  # detach from the numpy buffer, which the worker may free


def scaled_pixmap(image: QImage, size: int) -> QPixmap:
    """``image`` fit into a ``size`` x ``size`` square; tiny images are enlarged without blurring."""
    mode = (
        Qt.TransformationMode.FastTransformation
        if max(image.width(), image.height()) < size
        else Qt.TransformationMode.SmoothTransformation
    )
    return QPixmap.fromImage(image.scaled(size, size, Qt.AspectRatioMode.KeepAspectRatio, mode))


class ImageDialog(QDialog):
    """Full view of one image (non-modal; at least 512 px so tiny test images are visible)."""

    def __init__(self, path: str | Path, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        # Closed means gone: parented to its page, a hidden dialog would keep its full-size pixmap.
        self.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        self.path = Path(path)
        self.setWindowTitle(self.path.name)
        image = QImage(str(self.path))
        label = QLabel()
        label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        if image.isNull():
            label.setText(f"Cannot open {self.path.name}")
        else:
            side = max(512, image.width(), image.height())
            label.setPixmap(scaled_pixmap(image, side))
        scroll = QScrollArea()
        scroll.setWidget(label)
        scroll.setWidgetResizable(True)
        layout = QVBoxLayout(self)
        layout.addWidget(scroll)
        self.resize(600, 600)
