"""Pages whose service APIs do not exist yet: they say what is coming, and run nothing."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QLabel, QVBoxLayout, QWidget

WIZARD_TEXT = """<h2>Personal style (distillation wizard)</h2>
<p>Coming: fine-tune a model on a folder of your own images, in six steps:</p>
<ol>
<li>choose an images folder;</li>
<li>check and edit captions (missing ones proposed from file names);</li>
<li>choose the base model and the teacher;</li>
<li>settings with the estimated time and memory for this computer (refuses what does not fit);</li>
<li>training with live loss curves and samples at fixed seeds, pause/cancel; it keeps running when
the window closes and the wizard reattaches;</li>
<li>side-by-side comparison with the base model, then export, quantize and register: the new model
appears in the model picker.</li>
</ol>
<p><i>Not available in this build: the service has no fine-tuning API yet
(<code>snapgen_app.service</code> lacks a FineTuneRequest / training-run interface).</i></p>"""

DEVICES_TEXT = """<h2>Devices (on-device profiling)</h2>
<p>Coming: list phones and boards attached over adb or ssh, profile a chosen model and precision on
them, and show latency per step, per component and per operator, first run against warm runs, peak
memory, and compare runs side by side.</p>
<p><i>Not available in this build: the device-profiling service (<code>snapgen devices</code>) is
not there yet.</i></p>"""


class ComingPage(QWidget):
    """A page that explains a feature still to come."""

    def __init__(self, html: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        label = QLabel(html)
        label.setWordWrap(True)
        label.setTextFormat(Qt.TextFormat.RichText)
        label.setAlignment(Qt.AlignmentFlag.AlignTop | Qt.AlignmentFlag.AlignLeft)
        label.setMaximumWidth(720)
        layout = QVBoxLayout(self)
        layout.addWidget(label)
        layout.addStretch(1)
