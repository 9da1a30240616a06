"""Reference UNets for the benchmark: SD1.5 and SDXL built from their public configs.

The configs below are the published ``unet/config.json`` of ``stable-diffusion-v1-5`` and
``stable-diffusion-xl-base-1.0`` written inline (no network, no weights): the benchmark compares
architectures, so random weights are enough. Each builder returns a module with the project's UNet
signature ``forward(sample, timestep, encoder_hidden_states, pooled_text=None) -> velocity`` so that
export, quantization and timing treat all three UNets the same way.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch import nn

# stable-diffusion-v1-5/unet/config.json (diffusers 0.6 layout), 859.5 M parameters.
SD15_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

# stable-diffusion-xl-base-1.0/unet/config.json, 2567 M parameters.
SDXL_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

# Text-side shapes each architecture was trained with (CLIP: 77 tokens).
REFERENCE_CONTEXT: dict[str, dict[str, int]] = {
    "sd15": {"latent_channels": 4, "context_dim": 768, "pooled_dim": 0, "tokens": 77},
    "sdxl": {"latent_channels": 4, "context_dim": 2048, "pooled_dim": 1280, "tokens": 77},
}


class ReferenceUNet(nn.Module):
    """Adapter from a diffusers ``UNet2DConditionModel`` to the project's UNet signature.

    SDXL's micro-conditioning ``time_ids`` (original size, crop, target size) are fixed to a
    1024 px square, which is what a user generation passes; they do not change the cost.
    """

    def __init__(self, unet: UNet2DConditionModel, *, uses_pooled: bool) -> None:
        super().__init__()
        self.unet = unet
        self.uses_pooled = uses_pooled

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_text: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """sample [B,4,h,w] float32, timestep [B] float32 (0-1000), context [B,77,D] -> [B,4,h,w]."""
        added: dict[str, torch.Tensor] | None = None
        if self.uses_pooled:
            if pooled_text is None:
                raise ValueError("the SDXL UNet needs pooled_text [B, 1280]")
            batch = sample.shape[0]
            time_ids = sample.new_tensor([1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]).expand(batch, 6)
            added = {"text_embeds": pooled_text, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[
            0
        ]


def build_reference_unet(name: str, *, seed: int = 0, device: str | torch.device = "cpu") -> ReferenceUNet:
    """Build ``sd15`` or ``sdxl`` with seeded random weights (``device="meta"`` allocates nothing)."""
    configs = {"sd15": SD15_UNET_CONFIG, "sdxl": SDXL_UNET_CONFIG}
    if name not in configs:
        raise ValueError(f"unknown reference UNet {name!r}; allowed: {sorted(configs)}")
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(configs[name])
    return ReferenceUNet(unet, uses_pooled=REFERENCE_CONTEXT[name]["pooled_dim"] > 0).eval()
