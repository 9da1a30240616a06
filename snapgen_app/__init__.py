"""SnapGen Studio: offline few-step text-to-image generation with SnapGen-class models.

Outside ``snapgen_app.model`` this package never imports torch, diffusers or transformers.
"""

__version__ = "0.1.0"
