"""Torch-free generation pipeline: the numpy flow-matching sampler, the text-to-image loop over a
runtime bundle, and PNG writing with the generation settings inside."""

from snapgen_app.pipeline.png import read_png_metadata, read_png_text, write_png
from snapgen_app.pipeline.sampler import flow_sigmas, sample_euler, shift_timesteps
from snapgen_app.pipeline.text_to_image import TextToImagePipeline, initial_noise, size_stride

__all__ = [
    "TextToImagePipeline",
    "flow_sigmas",
    "initial_noise",
    "read_png_metadata",
    "read_png_text",
    "sample_euler",
    "shift_timesteps",
    "size_stride",
    "write_png",
]
