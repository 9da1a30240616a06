"""SnapGen UNet: tiny real models on CPU, diffusers round trip, config validation, meta-device counts."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from snapgen_app.config import UNetConfig  # noqa: E402
from snapgen_app.errors import ConfigError, UsageError  # noqa: E402
from snapgen_app.model.flops import (  # noqa: E402
    attention_flops,
    build_on_meta,
    count_parameters,
    sdpa_counted_on_meta,
    unet_flops,
)
from snapgen_app.model.presets import UNET_PRESETS, unet_preset  # noqa: E402
from snapgen_app.model.unet import MATH_ATTENTION_MAX_SCORES, Attention, SnapGenUNet, attention  # noqa: E402

LATENT = 16


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest single-threaded on the shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(seed: int = 0, **changes: object) -> SnapGenUNet:
    torch.manual_seed(seed)
    cfg = unet_preset("tiny").replace(**changes) if changes else unet_preset("tiny")
    return SnapGenUNet.from_unet_config(cfg)


def _inputs(cfg: UNetConfig, batch: int = 2, seed: int = 1) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, cfg.in_channels, LATENT, LATENT, generator=g),
        "timestep": torch.rand(batch, generator=g) * 1000,
        "encoder_hidden_states": torch.randn(batch, 7, cfg.context_dim, generator=g),
        "pooled_text": torch.randn(batch, cfg.pooled_dim, generator=g),
    }


def _perturb(model: Any, seed: int = 2) -> None:
    """Move zero-initialised output layers off zero so every branch shapes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)


def test_tiny_forward_backward_shapes_finite_and_grads_flow() -> None:
    model = _tiny()
    cfg = model.unet_config
    assert 100_000 < count_parameters(model) < 1_000_000
    inputs = _inputs(cfg)
    velocity = model(**inputs)
    assert velocity.shape == (2, cfg.out_channels, LATENT, LATENT)
    assert torch.isfinite(velocity).all()
    # Residual branches start at zero (identity init), so check flow after one SGD step.
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    velocity.square().mean().backward()
    opt.step()
    opt.zero_grad()
    model(**inputs).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    zero = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() == 0]
    assert not missing
    assert not zero, zero


def test_gradient_checkpointing_gives_the_same_output_and_grads() -> None:
    model = _tiny()
    _perturb(model)
    inputs = _inputs(model.unet_config)
    model(**inputs).sum().backward()
    ref = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.enable_gradient_checkpointing()
    model(**inputs).sum().backward()
    for a, p in zip(ref, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, a, rtol=1e-5, atol=1e-6)


def _sdpa_kernels_run(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key}


@pytest.mark.parametrize("queries", [16, MATH_ATTENTION_MAX_SCORES // 8 + 64])
def test_attention_trains_small_attentions_on_the_math_kernel_with_the_same_numbers(queries: int) -> None:
    """Below the size limit a CPU backward runs the math kernel (much faster there than the flash
    kernel's backward); above it, and without gradients, the flash kernel. Same output and gradients."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, 16, generator=gen) for n in (queries, 8, 8))
    grads = []
    for fn in (attention, torch.nn.functional.scaled_dot_product_attention):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        kernels = _sdpa_kernels_run(lambda fn=fn, leaves=leaves: fn(*leaves).square().sum().backward())
        grads.append([t.grad for t in leaves])
        if fn is attention:
            small = queries * 8 <= MATH_ATTENTION_MAX_SCORES
            assert any("math" in k for k in kernels) == small, kernels
            assert any("flash" in k for k in kernels) == (not small), kernels
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        kernels = _sdpa_kernels_run(lambda: attention(q, k, v))
        assert any("flash" in k for k in kernels), kernels
        torch.testing.assert_close(
            attention(q, k, v), torch.nn.functional.scaled_dot_product_attention(q, k, v)
        )


def test_split_gate_gives_the_same_output_plain_and_lora_wrapped() -> None:
    """The export's two-MatMul GEGLU computes what the one-MatMul GEGLU does and leaves the state
    dict as it was once rejoined; a LoRA-wrapped proj_in does not split (copies of its base weight
    would drop the adapter)."""
    from peft import LoraConfig, get_peft_model

    from snapgen_app.model.unet import FeedForward

    def split(model: torch.nn.Module, on: bool) -> list[bool]:
        return [m.split_gate(on) for m in model.modules() if isinstance(m, FeedForward)]

    model = _tiny()
    _perturb(model)
    keys = set(model.state_dict())
    inputs = _inputs(model.unet_config)
    with torch.no_grad():
        whole = model(**inputs)
        assert all(split(model, True))
        torch.testing.assert_close(model(**inputs), whole, rtol=1e-5, atol=1e-6)
        assert not any(split(model, False)) and set(model.state_dict()) == keys
        lora = get_peft_model(model, LoraConfig(r=4, target_modules=["proj_in"], init_lora_weights=False))
        with_adapter = lora(**inputs)
        assert not torch.allclose(with_adapter, whole, atol=1e-4)  # the adapter changes the output
        assert not any(split(lora, True))
        torch.testing.assert_close(lora(**inputs), with_adapter, rtol=1e-5, atol=1e-6)


def test_geglu_as_two_linears_equals_the_chunked_projection_with_gradients() -> None:
    """FeedForward runs a plain GEGLU as two linears on the halves of ``proj_in`` (faster on a CPU);
    output and gradients equal the one-projection, chunk-then-gate formulation it replaces."""
    import torch.nn.functional as F

    from snapgen_app.model.unet import FeedForward

    torch.manual_seed(0)
    ff = FeedForward(24, _tiny().unet_config)
    x = torch.randn(3, 10, 24, requires_grad=True)

    def chunked(inp: torch.Tensor) -> torch.Tensor:
        value, gate = ff.proj_in(inp).chunk(2, dim=-1)
        return ff.proj_out(value * F.gelu(gate))

    grads = []
    for fn in (ff, chunked):
        out = fn(x)
        params = [x, ff.proj_in.weight, ff.proj_in.bias, ff.proj_out.weight]
        grads.append((out.detach(), torch.autograd.grad(out.pow(2).sum(), params)))
    (out_a, grads_a), (out_b, grads_b) = grads
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_save_pretrained_round_trip_is_bit_exact(tmp_path) -> None:
    model = _tiny().eval()
    _perturb(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = SnapGenUNet.from_pretrained(tmp_path).eval()
    assert loaded.unet_config == model.unet_config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    inputs = _inputs(model.unet_config)
    with torch.no_grad():
        assert torch.equal(model(**inputs), loaded(**inputs))


def test_diffusers_signature_matches_unet_config_fields_and_defaults() -> None:
    params = list(inspect.signature(SnapGenUNet.__init__).parameters.values())[1:]
    fields = dataclasses.fields(UNetConfig)
    assert [p.name for p in params] == [f.name for f in fields]
    for p, f in zip(params, fields, strict=True):
        assert p.default == f.default, p.name


def test_return_features_keys_and_shapes() -> None:
    model = _tiny()
    cfg = model.unet_config
    velocity, features = model(**_inputs(cfg), return_features=True)
    assert velocity.shape == (2, 16, LATENT, LATENT)
    widths = cfg.block_channels
    expected = {
        "down_0": (2, widths[0], 16, 16),
        "down_1": (2, widths[1], 8, 8),
        "down_2": (2, widths[2], 4, 4),
        "mid": (2, widths[2], 4, 4),
        "up_2": (2, widths[2], 4, 4),
        "up_1": (2, widths[1], 8, 8),
        "up_0": (2, widths[0], 16, 16),
        "kd_tokens": (2, 16, widths[2]),
    }
    assert {k: tuple(v.shape) for k, v in features.items()} == expected
    # Without a mid transformer the deepest up stage's last block supplies the KD tokens.
    _, features = _tiny(mid_transformer_depth=0)(**_inputs(cfg), return_features=True)
    assert features["kd_tokens"].shape == (2, 16, widths[2])


def test_class_conditional_tiny_variant() -> None:
    model = _tiny(num_classes=10, pooled_dim=0)
    _perturb(model)
    x = torch.randn(3, 16, LATENT, LATENT)
    t = torch.tensor([10.0, 500.0, 990.0])
    labels = torch.tensor([0, 3, 10])  # 10 = the null class
    out = model(x, t, class_labels=labels)
    assert out.shape == x.shape and torch.isfinite(out).all()
    # Different labels give different outputs; None means the null class.
    other = model(x, t, class_labels=torch.tensor([1, 4, 10]))
    assert not torch.allclose(out[:2], other[:2])
    torch.testing.assert_close(out[2], other[2])
    torch.testing.assert_close(model(x[2:], t[2:], class_labels=None), out[2:])


def test_unknown_preset_names_the_allowed_ones() -> None:
    with pytest.raises(ConfigError, match="tiny-emoji-student") as info:
        unet_preset("snapgen-xl")
    assert info.value.field == "preset"


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError) as info:
        UNetConfig.from_dict({"block_channels": [64, 128, 256], "width_multiplier": 2})
    assert info.value.field == "UNetConfig.width_multiplier"
    with pytest.raises(ConfigError) as info:
        UNetConfig(block_channels=(64, 128, 160), attention_head_dim=64)
    assert info.value.field == "attention_head_dim" and "160" in str(info.value)
    with pytest.raises(ConfigError) as info:
        UNetConfig(block_channels=(256, 512))
    assert info.value.field == "down_layers"
    with pytest.raises(ConfigError) as info:
        UNetConfig(kv_heads=3)
    assert info.value.field == "kv_heads"
    with pytest.raises(ConfigError) as info:
        UNetConfig(norm_groups=24)
    assert info.value.field == "block_channels"


def test_bad_latent_and_pixel_sizes_are_config_errors() -> None:
    cfg = unet_preset("snapgen-t2i")
    cfg.check_latent_size(128, 96)
    cfg.check_pixel_size(1024, 768)
    with pytest.raises(ConfigError, match="multiples of 4") as info:
        cfg.check_latent_size(128, 30)
    assert info.value.field == "latent width"
    with pytest.raises(ConfigError, match="multiples of 32") as info:
        cfg.check_pixel_size(1000, 1024)
    assert info.value.field == "height"
    model = _tiny()
    inputs = _inputs(model.unet_config)
    inputs["sample"] = torch.randn(2, 16, 18, 16)
    with pytest.raises(ConfigError, match="latent height"):
        model(**inputs)
    inputs = _inputs(model.unet_config)
    inputs["encoder_hidden_states"] = torch.randn(2, 7, 33)
    with pytest.raises(UsageError, match="encoder_hidden_states"):
        model(**inputs)


def test_paper_model_parameter_counts_on_meta() -> None:
    t2i = count_parameters(build_on_meta(unet_preset("snapgen-t2i")))
    imagenet = count_parameters(build_on_meta(unet_preset("snapgen-imagenet")))
    assert abs(t2i / 379e6 - 1) < 0.03, t2i
    assert abs(imagenet / 372e6 - 1) < 0.03, imagenet
    assert UNET_PRESETS["stage1-ca"] == UNET_PRESETS["snapgen-imagenet"]
    student = count_parameters(build_on_meta(unet_preset("tiny-emoji-student")))
    teacher = count_parameters(build_on_meta(unet_preset("tiny-emoji-teacher")))
    small = count_parameters(build_on_meta(unet_preset("tiny-emoji-small")))
    assert 5e6 <= student <= 12e6 and 25e6 <= teacher <= 40e6
    assert 4e6 <= small <= 0.8 * student, (small, student)


def test_flop_counter_counts_attention_exactly() -> None:
    assert sdpa_counted_on_meta()
    cfg = unet_preset("tiny")
    dim, tokens, ctx_tokens = 48, 64, 7
    with torch.device("meta"):
        attn = Attention(dim, cfg.context_dim, cfg, use_rope=False)
        x = torch.empty(2, tokens, dim)
        context = torch.empty(2, ctx_tokens, cfg.context_dim)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        attn(x, context=context)
    heads, kv = dim // cfg.attention_head_dim, 1
    batch = 2
    # 2 FLOPs per multiply-accumulate; two projections each (to_q + to_out, to_k + to_v).
    projections = 2 * 2 * batch * tokens * dim * dim
    projections += 2 * 2 * batch * ctx_tokens * cfg.context_dim * kv * cfg.attention_head_dim
    expected = projections + attention_flops(batch, heads, tokens, ctx_tokens, cfg.attention_head_dim)
    assert counter.get_total_flops() == expected


def test_unet_flops_grow_with_resolution() -> None:
    cfg = unet_preset("tiny")
    f256, f512 = unet_flops(cfg, 256), unet_flops(cfg, 512)
    # Convs and linears scale 4x with 4x the pixels; self-attention faster than that.
    assert 4.0 < f512 / f256 < 6.0
