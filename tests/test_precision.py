"""Mixed precision follows the CPU: bf16 autocast only where the CPU computes in bf16."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import test_training_helpers as helpers
import torch
from test_training_helpers import base_config, read_events, run_quietly

from training_tools import precision
from training_tools.config import TrainConfig
from training_tools.precision import resolve_precision

shapes = helpers.shapes


@pytest.fixture(params=[True, False], ids=["cpu-with-bf16", "cpu-without-bf16"])
def bf16_cpu(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: request.param)
    return bool(request.param)


def test_auto_takes_bf16_only_on_a_cpu_with_bf16_kernels(bf16_cpu: bool) -> None:
    chosen, reason = resolve_precision("auto", "cpu")
    assert chosen == ("bf16" if bf16_cpu else "no")
    assert ("bf16 autocast" in reason) == bf16_cpu
    assert ("no bf16 kernels" in reason) != bf16_cpu


def test_explicit_choices_are_kept_on_a_cpu_and_bf16_warns_where_slow(bf16_cpu: bool) -> None:
    assert resolve_precision("no", "cpu")[0] == "no"
    chosen, reason = resolve_precision("bf16", "cpu")
    assert chosen == "bf16"
    assert ("slower than fp32" in reason) != bf16_cpu
    # fp16 autocast needs a GPU: a CPU takes what "auto" would.
    chosen, reason = resolve_precision("fp16", "cpu")
    assert chosen == ("bf16" if bf16_cpu else "no") and "needs a GPU" in reason


def test_the_default_config_asks_for_auto() -> None:
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    assert defaults["mixed_precision"] == "auto"


def test_the_probe_agrees_with_onednn() -> None:
    precision.cpu_has_fast_bf16.cache_clear()
    assert precision.cpu_has_fast_bf16() == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def test_a_training_run_logs_and_uses_the_resolved_precision(
    tmp_path: Path,
    shapes: tuple[Path, Path],
    bf16_cpu: bool,
) -> None:
    data, cache = shapes
    cfg = base_config(tmp_path, data, cache, max_steps=2, mixed_precision="auto")
    run_quietly(cfg)
    logged = [e for e in read_events(Path(cfg.run_dir)) if e.kind == "log" and "mixed_precision" in e.data]
    assert len(logged) == 1
    assert logged[0].data == {"mixed_precision": "bf16" if bf16_cpu else "no", "requested": "auto"}
    assert logged[0].message.startswith("precision: ")
