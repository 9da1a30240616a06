"""Named UNet architectures: the one registry of presets (name -> UNetConfig).

- ``snapgen-t2i``: the paper's text-to-image UNet (379 M parameters reported; ours in
  docs/architecture.md). Text tokens of width 2048 (CLIP-L/CLIP-G/Gemma projected to one width)
  and a 2048-wide pooled vector (CLIP-L 768 + CLIP-G 1280, SDXL style).
- ``snapgen-imagenet``: the class-conditional ImageNet-256 UNet (372 M reported); the last step of
  the ablation chain.
- The ablation chain on class-conditional ImageNet 256 px, one step of the paper's table each:
  ``sdxl-thin`` -> ``no-hires-sa`` -> ``sepconv`` -> ``sepconv-exp2`` -> ``ffn3`` -> ``mqa``
  -> ``stage1-ca`` (= ``snapgen-imagenet``). QK-norm and RoPE (no parameters, <0.1 % of FLOPs) are
  held constant along the chain so that each step changes exactly what the paper changed.
- ``tiny`` (tests) and the emoji presets (128 px, 16x16x16 latents, MiniLM text of width 384), the
  SnapGen design at small widths: ``tiny-emoji-small`` (6.3 M) is the built-in model, distilled from
  ``tiny-emoji-student`` (8.9 M); ``tiny-emoji-teacher`` (33 M) was the first built-in models' teacher.

Torch-free: this module only builds configs.
"""

from __future__ import annotations

from snapgen_app.config import UNetConfig
from snapgen_app.errors import ConfigError

# The text-to-image model: UNetConfig's defaults are this architecture.
_SNAPGEN_T2I = UNetConfig()

# The ablation chain starts from SDXL made thinner and shorter (the paper's starting point):
# dense convs, self- and cross-attention in stages 2-3, FFN x4, multi-head attention, class tokens.
_SDXL_THIN = UNetConfig(
    transformer_depth=(0, 2, 4),
    self_attention=(False, True, True),
    cross_attention=(False, True, True),
    separable_conv=False,
    conv_expansion=1.0,
    ffn_expansion=4.0,
    kv_heads=None,
    context_dim=1024,
    pooled_dim=0,
    num_classes=1000,
)
_NO_HIRES_SA = _SDXL_THIN.replace(self_attention=(False, False, True))  # step 1
_SEPCONV = _NO_HIRES_SA.replace(separable_conv=True)  # step 2
_SEPCONV_EXP2 = _SEPCONV.replace(conv_expansion=2.0)  # step 2b
_FFN3 = _SEPCONV_EXP2.replace(ffn_expansion=3.0)  # step 3
_MQA = _FFN3.replace(kv_heads=1)  # step 4
_STAGE1_CA = _MQA.replace(transformer_depth=(1, 2, 4), cross_attention=(True, True, True))  # step 5

# Small SnapGen-design models; head dim 32 (16 for `tiny`) keeps several heads at small widths.
_TINY = UNetConfig(
    block_channels=(16, 32, 48),
    down_layers=(1, 1, 1),
    up_layers=(2, 2, 2),
    transformer_depth=(1, 1, 1),
    attention_head_dim=16,
    context_dim=32,
    pooled_dim=16,
    norm_groups=8,
    time_embed_dim=64,
    time_freq_dim=32,
)
_TINY_EMOJI_STUDENT = UNetConfig(
    block_channels=(64, 128, 160),
    transformer_depth=(1, 1, 1),
    attention_head_dim=32,
    context_dim=384,
    pooled_dim=384,
    time_embed_dim=256,
    time_freq_dim=128,
)
_TINY_EMOJI_TEACHER = UNetConfig(
    block_channels=(96, 192, 288),
    transformer_depth=(1, 2, 2),
    attention_head_dim=32,
    context_dim=384,
    pooled_dim=384,
    time_embed_dim=512,
    time_freq_dim=256,
)
# The student at narrower deeper stages (6.3 M): a student for the 8.9 M architecture as teacher.
_TINY_EMOJI_SMALL = _TINY_EMOJI_STUDENT.replace(block_channels=(64, 96, 128))

UNET_PRESETS: dict[str, UNetConfig] = {
    "snapgen-t2i": _SNAPGEN_T2I,
    "snapgen-imagenet": _STAGE1_CA,
    "sdxl-thin": _SDXL_THIN,
    "no-hires-sa": _NO_HIRES_SA,
    "sepconv": _SEPCONV,
    "sepconv-exp2": _SEPCONV_EXP2,
    "ffn3": _FFN3,
    "mqa": _MQA,
    "stage1-ca": _STAGE1_CA,
    "tiny": _TINY,
    "tiny-emoji-student": _TINY_EMOJI_STUDENT,
    "tiny-emoji-teacher": _TINY_EMOJI_TEACHER,
    "tiny-emoji-small": _TINY_EMOJI_SMALL,
}

# The ablation chain in order, with the paper's reported change of each step (fractions; None where
# the paper gives no number). ``baseline`` names the preset the paper's number is relative to.
ABLATION_CHAIN: tuple[str, ...] = (
    "sdxl-thin",
    "no-hires-sa",
    "sepconv",
    "sepconv-exp2",
    "ffn3",
    "mqa",
    "stage1-ca",
)
PAPER_STEP_CHANGES: dict[str, dict[str, object]] = {
    "no-hires-sa": {"step": "1", "baseline": "sdxl-thin", "params": None, "flops": -0.17},
    "sepconv": {"step": "2", "baseline": "no-hires-sa", "params": -0.24, "flops": None},
    "sepconv-exp2": {"step": "2b", "baseline": "no-hires-sa", "params": -0.15, "flops": -0.27},
    "ffn3": {"step": "3", "baseline": "sepconv-exp2", "params": -0.12, "flops": -0.12},
    "mqa": {"step": "4", "baseline": "ffn3", "params": -0.16, "flops": -0.06},
    "stage1-ca": {"step": "5", "baseline": "mqa", "params": None, "flops": None},
}
# Reported parameter totals of the paper's two models.
PAPER_PARAMS: dict[str, int] = {"snapgen-t2i": 379_000_000, "snapgen-imagenet": 372_000_000}


def unet_preset(name: str) -> UNetConfig:
    """The UNetConfig registered as ``name``; ConfigError listing the allowed names otherwise."""
    try:
        return UNET_PRESETS[name]
    except KeyError:
        raise ConfigError("preset", f"unknown UNet preset {name!r}", allowed=sorted(UNET_PRESETS)) from None
