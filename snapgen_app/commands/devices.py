"""``snapgen devices list|add|forget|profile|compare``: profile a model on a tethered phone or a board.

Also :func:`run_generate_on_device`, which ``snapgen generate --device adb:SERIAL|ssh:USER@HOST``
hands over to. Progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from snapgen_app.devices.transport import is_remote_target
from snapgen_app.errors import UsageError
from snapgen_app.progress import Event

DESCRIPTION = """Profile SnapGen models on a device: an Android phone over adb, or a Linux board or a
phone running Termux's sshd over SSH. The on-device runner needs Python with numpy and onnxruntime
there (or pass --perf-test with an onnxruntime_perf_test build). Reports session creation, first
and warm latency percentiles, peak memory and top operators per component (text encoder, UNet per
step, decoder) and the estimated end-to-end time; results are saved under <data dir>/profiles/.
See docs/devices.md for preparing a phone."""

EPS = ("cpu", "xnnpack", "qnn", "nnapi", "coreml", "cuda")


def _add_connect_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ssh-key", metavar="FILE", help="SSH private key (default: agent and ~/.ssh keys)")
    parser.add_argument("--remote-python", metavar="CMD", help="Python on the device (default: python3)")
    parser.add_argument("--remote-dir", metavar="DIR", help="work folder on the device")
    parser.add_argument("--adb", metavar="PATH", help="adb executable (default: adb on PATH)")


def register(subparsers: Any) -> None:
    """Add the ``devices`` subcommand and its actions."""
    parser = subparsers.add_parser(
        "devices", help="list devices and profile models on them", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    actions = parser.add_subparsers(dest="devices_action", metavar="ACTION")
    parser.set_defaults(handler=lambda _args: parser.print_help() or 2)

    listing = actions.add_parser("list", help="adb devices (any state) and saved SSH targets")
    listing.add_argument("--adb", metavar="PATH", help="adb executable (default: adb on PATH)")
    listing.add_argument(
        "--describe", action="store_true", help="connect to each ready device and describe it"
    )
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=run_list)

    add = actions.add_parser("add", help="remember how to reach a target (key, Python, folder)")
    add.add_argument("target", help="adb:SERIAL or ssh:USER@HOST[:PORT]")
    _add_connect_flags(add)
    add.add_argument("--json", action="store_true", help="print JSON")
    add.set_defaults(handler=run_add)

    forget = actions.add_parser("forget", help="drop a saved target")
    forget.add_argument("target")
    forget.add_argument("--json", action="store_true", help="print JSON")
    forget.set_defaults(handler=run_forget)

    prof = actions.add_parser("profile", help="time a model's components on a device")
    prof.add_argument("model", help="installed model name or bundle folder")
    prof.add_argument("--target", required=True, help="adb:SERIAL or ssh:USER@HOST[:PORT]")
    prof.add_argument(
        "--ep", choices=EPS, default="cpu", help="execution provider on the device (default cpu)"
    )
    prof.add_argument("--threads", type=int, default=0, metavar="N", help="intra-op threads (default: ORT's)")
    prof.add_argument(
        "--runs", type=int, default=10, metavar="N", help="timed runs per component (default 10)"
    )
    prof.add_argument(
        "--warmup", type=int, default=1, metavar="N", help="warm-up runs, the first is reported (default 1)"
    )
    prof.add_argument("--precision", choices=("auto", "int8", "fp16", "fp32"), default="auto")
    prof.add_argument(
        "--steps", type=int, metavar="N", help="steps for the end-to-end estimate (default: the model's)"
    )
    prof.add_argument("--width", type=int, metavar="W")
    prof.add_argument("--height", type=int, metavar="H")
    prof.add_argument("--ort-format", action="store_true", help="push ORT-format (.ort) conversions")
    prof.add_argument(
        "--fixed-shapes", action="store_true", help="push fixed-shape copies (NNAPI/QNN/CoreML need them)"
    )
    prof.add_argument(
        "--perf-test", metavar="DEVICE_PATH", help="use onnxruntime_perf_test at this path on the device"
    )
    prof.add_argument(
        "--op-profile-runs",
        type=int,
        default=1,
        metavar="N",
        help="profiled runs for the per-operator table (0: off)",
    )
    prof.add_argument(
        "--thermal-seconds",
        type=float,
        default=0.0,
        metavar="S",
        help="keep the UNet running S seconds, recording latency over time",
    )
    prof.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="limit per component in seconds (default 600)",
    )
    prof.add_argument(
        "--no-save", action="store_true", help="do not save the result under <data dir>/profiles"
    )
    prof.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_connect_flags(prof)
    prof.set_defaults(handler=run_profile)

    cmp_parser = actions.add_parser("compare", help="compare two saved profile JSON files")
    cmp_parser.add_argument("a", metavar="A.json")
    cmp_parser.add_argument("b", metavar="B.json")
    cmp_parser.add_argument("--json", action="store_true")
    cmp_parser.set_defaults(handler=run_compare)


def _connect(args: argparse.Namespace) -> Any:
    from snapgen_app.devices.service import ConnectOptions

    return ConnectOptions(
        ssh_key=getattr(args, "ssh_key", None),
        remote_python=getattr(args, "remote_python", None) or "python3",
        remote_dir=getattr(args, "remote_dir", None),
        adb=getattr(args, "adb", None),
    )


def _printer(stream: Any) -> Any:
    def on_event(event: Event) -> None:
        if event.kind in ("started", "log") or (event.kind == "progress" and event.message):
            print(f"{event.stage}: {event.message}", file=stream)

    return on_event


def run_list(args: argparse.Namespace) -> int:
    from snapgen_app.devices import service

    found = service.list_devices(args.adb)
    if args.describe:
        described = []
        for device in found:
            if device.state in ("device", "saved"):
                try:
                    device = service.describe_target(device.target)
                except Exception as exc:  # one bad device must not hide the others
                    print(f"{device.target}: {exc}", file=sys.stderr)
            described.append(device)
        found = described
    if args.json:
        json.dump({"devices": [d.to_dict() for d in found]}, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
        return 0
    if not found:
        print(
            "no devices: plug in a phone with USB debugging on, or `snapgen devices add ssh:USER@HOST`",
            file=sys.stderr,
        )
        return 0
    for device in found:
        print(device.summary())
    return 0


def run_add(args: argparse.Namespace) -> int:
    from snapgen_app.devices import service

    target = service.add_target(args.target, _connect(args))
    if args.json:
        print(json.dumps({"saved": target}))
    else:
        print(f"saved {target}")
    return 0


def run_forget(args: argparse.Namespace) -> int:
    from snapgen_app.devices import service

    forgotten = service.forget_target(args.target)
    if args.json:
        print(json.dumps({"target": args.target, "forgotten": forgotten}))
    if not forgotten:
        print(f"snapgen: error: {args.target} was not saved", file=sys.stderr)
        return 1
    return 0


def run_profile(args: argparse.Namespace) -> int:
    from snapgen_app.devices import service
    from snapgen_app.devices.report import format_report

    request = service.ProfileRequest(
        model=args.model,
        target=args.target,
        ep=args.ep,
        threads=args.threads,
        runs=args.runs,
        warmup=args.warmup,
        precision=args.precision,
        steps=args.steps,
        width=args.width,
        height=args.height,
        ort_format=args.ort_format,
        fixed_shapes=args.fixed_shapes,
        perf_test=args.perf_test,
        op_profile_runs=args.op_profile_runs,
        thermal_seconds=args.thermal_seconds,
        timeout_s=args.timeout,
        connect=_connect(args),
        save=not args.no_save,
    )
    result = service.profile(request, on_event=_printer(sys.stderr))
    if args.json:
        payload = result.to_dict()
        json.dump(payload, sys.stdout, indent=2, sort_keys=True, default=str)
        sys.stdout.write("\n")
    else:
        print(format_report(result))
        if result.runtime.get("saved_to"):
            print(f"saved: {result.runtime['saved_to']}", file=sys.stderr)
    if result.partial or result.errors:  # the measured part is printed (and saved); the run failed
        cause = "; ".join(result.errors) or "some runs did not finish"
        print(f"snapgen: error: the profile is incomplete: {cause}", file=sys.stderr)
        return 1
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from snapgen_app.devices.report import compare_profiles, format_comparison, load_profile

    a, b = load_profile(args.a), load_profile(args.b)
    if args.json:
        rows = [
            {"name": r.name, "a_s": r.a_s, "b_s": r.b_s, "ratio": r.ratio} for r in compare_profiles(a, b)
        ]
        json.dump({"a": args.a, "b": args.b, "rows": rows}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_comparison(a, b))
    return 0


def run_generate_on_device(args: argparse.Namespace, request: Any) -> int:
    """``snapgen generate ... --device adb:SERIAL|ssh:USER@HOST``: the whole loop on the device.

    ``request`` is the GenerationRequest the generate flags describe (with device "auto")."""
    from snapgen_app.devices import service

    if not is_remote_target(args.device):
        raise UsageError(f"--device {args.device!r} is not a remote target")
    result = service.generate_on_device(request, args.device, on_event=_printer(sys.stderr))
    if getattr(args, "json", False):
        json.dump(result.to_dict(), sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        for path, seed in zip(result.images, result.seeds, strict=True):
            print(f"{path}  (seed {seed})")
        device_total = result.timings.get("device_total", 0.0)
        print(
            f"{result.model_name} {result.precision} on {result.provider}: {device_total:.2f} s on the device",
            file=sys.stderr,
        )
    return 0


def device_choice(value: str) -> str:
    """argparse ``type`` for ``generate --device``: a local device name or adb:/ssh: target."""
    from snapgen_app.api import DEVICES

    if value in DEVICES or is_remote_target(value):
        return value
    raise argparse.ArgumentTypeError(
        f"invalid choice: {value!r} (choose from {', '.join(DEVICES)}, adb:SERIAL, ssh:USER@HOST)"
    )
