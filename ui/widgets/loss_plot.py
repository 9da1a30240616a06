"""A small QPainter line plot of training loss curves (one line per loss term, log-free, no
matplotlib): axes with min/max labels, a legend, repainted as points arrive."""

from __future__ import annotations

from collections.abc import Iterable

from PySide6.QtCore import QPointF, QRectF, Qt
from PySide6.QtGui import QColor, QPainter, QPainterPath, QPaintEvent, QPen
from PySide6.QtWidgets import QSizePolicy, QWidget

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")


class LossPlot(QWidget):
    """``add(step, terms)`` appends one point per term; ``series`` holds step -> value per term."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.series: dict[str, dict[int, float]] = {}
        self.setMinimumSize(260, 160)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)

    def clear(self) -> None:
        self.series.clear()
        self.update()

    def add(self, step: int, terms: dict[str, float]) -> None:
        """One optimizer step's loss terms (a step seen again, after a resume, replaces its value)."""
        for name, value in terms.items():
            if value is not None:
                self.series.setdefault(name, {})[int(step)] = float(value)
        self.update()

    def extend(self, points: Iterable[tuple[int, dict[str, float]]]) -> None:
        for step, terms in points:
            self.add(step, terms)

    def point_count(self) -> int:
        return max((len(v) for v in self.series.values()), default=0)

    # -- painting ----------------------------------------------------------------------------------

    def _bounds(self) -> tuple[int, int, float, float]:
        steps = [s for values in self.series.values() for s in values]
        values = [v for series in self.series.values() for v in series.values()]
        low, high = min(values), max(values)
        if high - low < 1e-12:
            high = low + 1.0
        return min(steps), max(max(steps), min(steps) + 1), low, high

    def paintEvent(self, event: QPaintEvent) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        palette = self.palette()
        painter.fillRect(self.rect(), palette.base())
        text_colour = palette.text().color()
        area = QRectF(self.rect()).adjusted(52, 10, -12, -26)
        painter.setPen(QPen(text_colour, 1))
        painter.drawRect(area)
        if not self.series or self.point_count() == 0:
            painter.drawText(area, Qt.AlignmentFlag.AlignCenter, "loss curves appear here")
            painter.end()
            return
        first, last, low, high = self._bounds()

        def to_xy(step: int, value: float) -> QPointF:
            x = area.left() + (step - first) / (last - first) * area.width()
            y = area.bottom() - (value - low) / (high - low) * area.height()
            return QPointF(x, y)

        painter.drawText(QRectF(0, area.top() - 6, 48, 14), Qt.AlignmentFlag.AlignRight, f"{high:.3g}")
        painter.drawText(QRectF(0, area.bottom() - 8, 48, 14), Qt.AlignmentFlag.AlignRight, f"{low:.3g}")
        painter.drawText(
            QRectF(area.left(), area.bottom() + 4, 80, 16), Qt.AlignmentFlag.AlignLeft, str(first)
        )
        painter.drawText(
            QRectF(area.right() - 120, area.bottom() + 4, 120, 16),
            Qt.AlignmentFlag.AlignRight,
            f"step {last}",
        )
        for index, (name, values) in enumerate(sorted(self.series.items())):
            colour = QColor(PALETTE[index % len(PALETTE)])
            path = QPainterPath()
            for n, step in enumerate(sorted(values)):
                point = to_xy(step, values[step])
                if n == 0:
                    path.moveTo(point)
                else:
                    path.lineTo(point)
            painter.setPen(QPen(colour, 1.6))
            painter.drawPath(path)
            legend = QRectF(area.right() - 110, area.top() + 4 + 16 * index, 104, 14)
            painter.drawText(legend, Qt.AlignmentFlag.AlignRight, name)
        painter.end()
