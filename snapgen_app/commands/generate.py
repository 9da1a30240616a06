"""``snapgen generate "PROMPT"``: text to PNG on the torch-free ONNX Runtime engine.

Also ``selftest()`` for ``snapgen --selftest``: one image with the default model, checked for
content and for metadata that round-trips. Progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from snapgen_app.api import DEVICES, MAX_STEPS, MIN_STEPS, PRECISIONS, GenerationRequest
from snapgen_app.commands.devices import device_choice, run_generate_on_device
from snapgen_app.devices.transport import is_remote_target
from snapgen_app.errors import SnapGenError, UsageError
from snapgen_app.progress import Event

DESCRIPTION = """Generate images from a text prompt with an installed SnapGen model, offline.

Runs the model's ONNX files through ONNX Runtime (no torch). Each PNG stores the prompt, seed,
steps, size, model, bundle hash, precision, provider and version in its text chunks (also as an
AUTOMATIC1111 'parameters' chunk), so `snapgen` or other tools can reuse the settings.
Unset options take the model's defaults; the seed is random unless given and is printed."""


def register(subparsers: Any) -> None:
    """Add the ``generate`` subcommand."""
    parser = subparsers.add_parser(
        "generate",
        help="generate images from a text prompt",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("prompt", help="what the image should show")
    parser.add_argument(
        "-o", "--output", metavar="OUT.png", help="output file; with --num-images N: OUT-1.png ... OUT-N.png"
    )
    parser.add_argument(
        "--output-dir", metavar="DIR", help="folder for the images (default: <data dir>/outputs)"
    )
    parser.add_argument(
        "--model",
        default="",
        metavar="NAME|PATH",
        help="installed model name or bundle folder (default: the built-in model)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        metavar="N",
        help=f"denoising steps, {MIN_STEPS}-{MAX_STEPS} (default: the model's)",
    )
    parser.add_argument(
        "--seed", type=int, metavar="S", help="seed of the first image; image i uses S+i (default: random)"
    )
    parser.add_argument(
        "--width", type=int, metavar="W", help="image width in pixels, a multiple of the model's stride"
    )
    parser.add_argument(
        "--height", type=int, metavar="H", help="image height in pixels, a multiple of the model's stride"
    )
    parser.add_argument(
        "--num-images", type=int, default=1, metavar="N", help="images to generate in one batch (default 1)"
    )
    parser.add_argument(
        "--device",
        type=device_choice,
        default="auto",
        metavar="{" + ",".join(DEVICES) + ",adb:SERIAL,ssh:USER@HOST}",
        help="execution provider (default: auto, best available), or a device to run on (see `snapgen devices`)",
    )
    parser.add_argument(
        "--precision", choices=PRECISIONS, default="auto", help="model variant (default: auto; int8 on CPU)"
    )
    parser.add_argument("--shift", type=float, metavar="S", help="timestep shift (default: the model's)")
    parser.add_argument(
        "--guidance-scale",
        type=float,
        metavar="G",
        help="classifier-free guidance; > 1 enables it (default: the model's)",
    )
    parser.add_argument(
        "--threads", type=int, metavar="N", help="ONNX Runtime intra-op threads (default: one per core)"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    parser.set_defaults(handler=run)


def output_paths(output: str | None, num_images: int) -> tuple[str, ...]:
    """``-o OUT.png`` as one path per image (OUT-1.png ... for several); () when not given."""
    if not output:
        return ()
    path = Path(output)
    if path.suffix.lower() != ".png":
        raise UsageError(f"--output {output!r} must end with .png")
    if num_images == 1:
        return (str(path),)
    return tuple(str(path.with_name(f"{path.stem}-{i + 1}{path.suffix}")) for i in range(num_images))


def request_from_args(args: argparse.Namespace) -> GenerationRequest:
    """The GenerationRequest the flags describe (raises UsageError/ConfigError for bad values)."""
    return GenerationRequest(
        prompt=args.prompt,
        model=args.model,
        steps=args.steps,
        seed=args.seed,
        width=args.width,
        height=args.height,
        num_images=args.num_images,
        precision=args.precision,
        device=args.device,
        shift=args.shift,
        guidance_scale=args.guidance_scale,
        threads=args.threads,
        output_dir=args.output_dir,
        output_paths=output_paths(args.output, args.num_images),
    )


def _progress_printer(stream: Any) -> Any:
    interactive = hasattr(stream, "isatty") and stream.isatty()

    def on_event(event: Event) -> None:
        if event.kind == "started":
            print(f"generating: {event.message}", file=stream)
        elif event.kind == "progress":
            eta = f", eta {event.eta_s:.1f}s" if event.eta_s is not None else ""
            end = "\r" if interactive and event.step < event.total else "\n"
            print(f"step {event.step}/{event.total}{eta}   ", end=end, file=stream, flush=True)
        elif event.kind == "log":
            print(f"warning: {event.message}", file=stream)

    return on_event


def run(args: argparse.Namespace) -> int:
    """Handler of ``snapgen generate``."""
    from snapgen_app import service  # imported here so `snapgen --help` stays light

    if is_remote_target(args.device):  # the whole loop runs on a phone/board: snapgen_app.devices
        return run_generate_on_device(
            args, request_from_args(argparse.Namespace(**{**vars(args), "device": "auto"}))
        )
    request = request_from_args(args)
    result = service.generate(request, on_event=_progress_printer(sys.stderr))
    if args.json:
        json.dump(result.to_dict(), sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        for path, seed in zip(result.images, result.seeds, strict=True):
            print(f"{path}  (seed {seed})")
        total = result.timings.get("total", 0.0)
        print(f"{result.model_name} {result.precision} on {result.provider}: {total:.2f} s", file=sys.stderr)
    return 0


def selftest(model: str = "") -> int:
    """Generate one image with ``model`` (default: the built-in model) into a temp folder, check it
    has content and that its metadata restores the request. Prints one line; returns 0 or 1."""
    from snapgen_app import service
    from snapgen_app.pipeline.png import read_png_metadata, read_png_text

    try:
        with tempfile.TemporaryDirectory(prefix="snapgen-selftest-") as folder:
            target = str(Path(folder) / "selftest.png")
            request = GenerationRequest(
                prompt="a red apple on a yellow background", model=model, seed=1, output_paths=(target,)
            )
            result = service.generate(request)
            problems = _selftest_problems(result.images[0], result.request, read_png_metadata, read_png_text)
    except SnapGenError as exc:
        print(f"selftest: FAILED: {exc}", file=sys.stderr)
        return 1
    if problems:
        print(f"selftest: FAILED: {'; '.join(problems)}", file=sys.stderr)
        return 1
    print(
        f"selftest: ok ({result.model_name} {result.precision} on {result.provider}, {result.timings['total']:.2f} s)"
    )
    return 0


def _selftest_problems(
    path: str, expected: GenerationRequest, read_metadata: Any, read_text: Any
) -> list[str]:
    from PIL import Image

    problems = []
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    if float(pixels.std()) < 1.0:
        problems.append(f"the image is blank (pixel std {pixels.std():.2f})")
    restored = read_metadata(path)
    wanted = expected.replace(num_images=1, output_paths=(), output_dir=None)
    if restored != wanted:
        problems.append("the PNG metadata does not restore the request")
    if "parameters" not in read_text(path):
        problems.append("the PNG lacks the 'parameters' chunk")
    return problems
