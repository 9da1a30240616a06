"""The About box: versions of SnapGen Studio, ONNX Runtime, Qt and Python, and the licences."""

from __future__ import annotations

from PySide6.QtWidgets import QDialog, QDialogButtonBox, QTextBrowser, QVBoxLayout, QWidget

from ui.extras import library_versions

#: (component, licence, why it is here)
LICENCES: tuple[tuple[str, str, str], ...] = (
    ("SnapGen Studio", "Apache-2.0", "this application"),
    ("ONNX Runtime", "MIT", "runs the models"),
    ("Qt 6 / PySide6", "LGPL-3.0", "the user interface"),
    ("all-MiniLM-L6-v2 (sentence-transformers)", "Apache-2.0", "text encoder of the built-in model"),
    ("Noto Color Emoji (Google)", "SIL OFL-1.1", "training images of the built-in emoji model"),
    ("Hugging Face tokenizers", "Apache-2.0", "prompt tokenization"),
    ("huggingface_hub", "Apache-2.0", "model downloads"),
    ("NumPy", "BSD-3-Clause", "arrays"),
    ("Pillow", "MIT-CMU (HPND)", "PNG files"),
    ("platformdirs", "MIT", "data folder location"),
)


def about_html() -> str:
    """The About text (HTML): versions, then one line per licence."""
    versions = "".join(
        f"<tr><td>{name}</td><td><b>{value}</b></td></tr>" for name, value in library_versions().items()
    )
    licences = "".join(f"<tr><td>{c}</td><td>{lic}</td><td>{why}</td></tr>" for c, lic, why in LICENCES)
    return (
        "<h2>SnapGen Studio</h2><p>Offline few-step text-to-image generation with SnapGen-class models.</p>"
        f"<h3>Versions</h3><table cellspacing=4>{versions}</table>"
        f"<h3>Licences</h3><table cellspacing=4>{licences}</table>"
        "<p>Images you generate are yours; each PNG records the settings and model that made it.</p>"
    )


class AboutDialog(QDialog):
    """Non-modal About box."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("About SnapGen Studio")
        self.browser = QTextBrowser()
        self.browser.setHtml(about_html())
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.close)
        layout = QVBoxLayout(self)
        layout.addWidget(self.browser)
        layout.addWidget(buttons)
        self.resize(560, 520)
