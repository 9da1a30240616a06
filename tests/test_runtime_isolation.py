"""The runtime is torch-free and offline: a generation in a fresh interpreter whose sockets all
raise loads no torch and still succeeds."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_runtime_fixtures import build_bundle

from model_store.registry import ModelSource, Registry

SCRIPT = textwrap.dedent(
    """
    import json, socket, sys

    attempts = []

    class NoNetwork(socket.socket):
        def __init__(self, *args, **kwargs):
            attempts.append("socket")
            raise OSError("network access attempted during generation")

    def refuse(*args, **kwargs):
        attempts.append("dns")
        raise OSError("network access attempted during generation")

    socket.socket = NoNetwork
    socket.create_connection = refuse
    socket.getaddrinfo = refuse

    import snapgen_app.pipeline
    import snapgen_app.runtime
    import snapgen_app.service
    from snapgen_app.api import GenerationRequest

    after_import = sorted(m for m in ("torch", "diffusers", "transformers", "PySide6") if m in sys.modules)
    request = GenerationRequest(prompt="a red apple", model=sys.argv[1], seed=3, output_dir=sys.argv[2])
    result = snapgen_app.service.generate(request)
    after_run = sorted(m for m in ("torch", "diffusers", "transformers", "PySide6") if m in sys.modules)
    during_run = list(attempts)
    try:  # prove the blocker is live: a real attempt is recorded
        socket.socket()
    except OSError:
        pass
    print(json.dumps({"after_import": after_import, "after_run": after_run, "attempts": during_run,
                      "blocker_works": attempts == during_run + ["socket"], "images": list(result.images)}))
    """
)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("by", ["installed name", "bundle path"])
def test_generation_loads_no_torch_and_opens_no_socket(tmp_path: Path, by: str) -> None:
    bundle = build_bundle(tmp_path / "bundle")
    home = tmp_path / "home"
    model = str(bundle)
    if by == "installed name":  # the everyday case: a model installed in the registry
        Registry(home).install(
            bundle, "tiny-installed", source=ModelSource(type="import", request=str(bundle))
        )
        model = "tiny-installed"
    # HF_HUB_OFFLINE=0: offline must come from our code making no call, not from the Hub's switch.
    env = {"SNAPGEN_HOME": str(home), "HF_HUB_OFFLINE": "0", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, model, str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["after_import"] == [] and report["after_run"] == []
    assert report["attempts"] == [] and report["blocker_works"]
    assert len(report["images"]) == 1 and Path(report["images"][0]).is_file()
