"""Step distillation's backward simulation: each sample's own k Euler steps of the student."""

from __future__ import annotations

import torch

from snapgen_app.model.presets import unet_preset
from snapgen_app.model.unet import SnapGenUNet
from training_tools import flow
from training_tools.trainer import simulate_chains


def _masked_reference(model, x, times, k, tokens, pooled):  # type: ignore[no-untyped-def]
    """The whole batch to max(k), later steps masked out (what the trainer did before)."""
    for j in range(int(k.max())):
        v = model(x, times[j].expand(x.shape[0]) * 1000, tokens, pooled).float()
        x = torch.where((k > j).view(-1, 1, 1, 1), x + (times[j + 1] - times[j]) * v, x)
    return x


def test_only_unfinished_chains_run_and_the_result_matches_the_masked_batch() -> None:
    torch.manual_seed(0)
    model = SnapGenUNet.from_unet_config(unet_preset("tiny")).eval()
    cfg = model.unet_config
    b = 6
    x = torch.randn(b, cfg.in_channels, 8, 8)
    tokens = torch.randn(b, 5, cfg.context_dim)
    pooled = torch.randn(b, cfg.pooled_dim)
    times = flow.schedule(4, 3.0)
    k = torch.tensor([0, 3, 1, 2, 3, 0])
    calls: list[int] = []

    def counting(xx, tt, cc, pp):  # type: ignore[no-untyped-def]
        calls.append(xx.shape[0])
        return model(xx, tt, cc, pp)

    with torch.no_grad():
        got = simulate_chains(counting, x, times, k, tokens, pooled)
        want = _masked_reference(model, x, times, k, tokens, pooled)
    assert calls == [4, 3, 2]  # samples with k > 0, > 1, > 2: 9 sample-passes instead of 18
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[k == 0], x[k == 0])  # a chain of no steps stays at the fresh noise
