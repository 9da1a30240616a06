"""The architecture table: parameters and GFLOPs per UNet step of every preset, and the ablation
chain's step-by-step changes next to the paper's (printed by ``snapgen arch``, kept in
docs/architecture.md).

The paper's FLOP changes are read at 1024 px (the deployment resolution): step 1's -17 % only
appears there, because removing stage-2 self-attention saves a cost quadratic in the token count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from snapgen_app.model.flops import build_on_meta, count_parameters, unet_flops
from snapgen_app.model.presets import (
    ABLATION_CHAIN,
    PAPER_PARAMS,
    PAPER_STEP_CHANGES,
    UNET_PRESETS,
    unet_preset,
)

RESOLUTIONS: tuple[int, ...] = (256, 512, 1024)
CHANGE_RESOLUTION = 1024  # the resolution the ablation FLOP changes are compared at


def preset_counts(name: str, resolutions: Sequence[int] = RESOLUTIONS) -> dict[str, Any]:
    """{"preset", "params", "gflops_<R>" for each R}: one UNet forward at batch 1, R px square."""
    cfg = unet_preset(name)
    model = build_on_meta(cfg)
    row: dict[str, Any] = {"preset": name, "params": count_parameters(model)}
    for res in resolutions:
        row[f"gflops_{res}"] = unet_flops(cfg, res, model=model) / 1e9
    return row


def _change(new: float, old: float) -> float:
    return new / old - 1.0


def architecture_rows(names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Rows for ``names`` (default: every preset), in order.

    Every row: preset, params, gflops_256, gflops_512, gflops_1024. Ablation-chain rows add step,
    baseline, params_change and flops_change (fractions vs the paper's baseline for that step,
    FLOPs at 1024 px) and paper_params_change / paper_flops_change (None where the paper gives no
    number). The paper's two models add paper_params and params_error.
    """
    names = list(names) if names is not None else list(UNET_PRESETS)
    for name in names:
        unet_preset(name)  # unknown names fail before any counting
    # Keyed by config, so aliases (stage1-ca = snapgen-imagenet) are counted once.
    cache: dict[Any, dict[str, Any]] = {}

    def counts(name: str) -> dict[str, Any]:
        cfg = unet_preset(name)
        if cfg not in cache:
            cache[cfg] = preset_counts(name)
        return {**cache[cfg], "preset": name}

    rows = []
    for name in names:
        row = dict(counts(name))
        if name in PAPER_STEP_CHANGES:
            paper = PAPER_STEP_CHANGES[name]
            base = counts(str(paper["baseline"]))
            key = f"gflops_{CHANGE_RESOLUTION}"
            row.update(
                step=paper["step"],
                baseline=paper["baseline"],
                params_change=_change(row["params"], base["params"]),
                flops_change=_change(row[key], base[key]),
                paper_params_change=paper["params"],
                paper_flops_change=paper["flops"],
            )
        elif name == ABLATION_CHAIN[0]:
            row.update(step="0", baseline=None)
        if name in PAPER_PARAMS:
            row.update(
                paper_params=PAPER_PARAMS[name], params_error=_change(row["params"], PAPER_PARAMS[name])
            )
        rows.append(row)
    return rows


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:+.1f} %"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of the rows (the same text goes into docs/architecture.md)."""
    header = (
        "| preset | params (M) | GFLOPs 256 px | GFLOPs 512 px | GFLOPs 1024 px | step (vs) | "
        "params change (paper) | FLOPs change @1024 (paper) |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---|---|---|"]
    for row in rows:
        step = f"{row['step']} (vs {row['baseline']})" if row.get("baseline") else row.get("step", "")
        params = f"{row['params'] / 1e6:.1f}"
        if "paper_params" in row:
            params += f" (paper {row['paper_params'] / 1e6:.0f}, {_pct(row['params_error'])})"
        p_change = (
            f"{_pct(row.get('params_change'))} ({_pct(row.get('paper_params_change')) or '-'})"
            if "params_change" in row
            else ""
        )
        f_change = (
            f"{_pct(row.get('flops_change'))} ({_pct(row.get('paper_flops_change')) or '-'})"
            if "flops_change" in row
            else ""
        )
        lines.append(
            f"| {row['preset']} | {params} | {row['gflops_256']:.2f} | {row['gflops_512']:.2f} | "
            f"{row['gflops_1024']:.1f} | {step} | {p_change} | {f_change} |"
        )
    return "\n".join(lines)
