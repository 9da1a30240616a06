"""Tiny real runtime bundles for the runtime/pipeline/CLI tests, built with onnx.helper and tokenizers.

The graphs are small but real ONNX models run by the real onnxruntime:
- text encoder: Gather embedding -> tokens [B, L, D]; masked mean @ W -> pooled [B, P];
- UNet stand-in: velocity = sample * a + Conv3x3(sample) + (mean_L(ehs) @ Wc) + (pooled @ Wp)
  + timestep/1000 * b, all broadcast to [B, C, h, w];
- decoder: nearest Resize x vae_scale_factor -> Conv3x3 to 3 channels -> Tanh.
The tokenizer is a WordLevel tokenizer trained in memory on a few captions. Other test modules
import ``build_bundle`` from here (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import GraphProto, TensorProto, helper, numpy_helper  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: E402

from model_store.bundle import (  # noqa: E402
    BundleManifest,
    Defaults,
    ModelSpec,
    TextEncoderSpec,
    Variant,
    write_manifest,
)

LATENT_CHANNELS = 16
CONTEXT_DIM = 8
POOLED_DIM = 6
MAX_LENGTH = 8
VAE_SCALE = 8
BLOCK_CHANNELS = [8, 16]  # two stages -> stride 8 * 2 = 16
OPSET = 18
CAPTIONS = (
    "a red apple on a blue background",
    "a dog to the left of a rocket",
    "two green cats above a yellow house",
    "one small star below the moon",
)


def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(array, name=name)


def _save(graph: GraphProto, path: Path) -> None:
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="snapgen-tests"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def make_tokenizer(path: Path) -> Tokenizer:
    """A WordLevel tokenizer over CAPTIONS with [PAD]=0 and [UNK]=1, saved as tokenizer.json."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(CAPTIONS, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    tokenizer.save(str(path))
    return tokenizer


def make_text_encoder(path: Path, vocab_size: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    embedding = rng.standard_normal((vocab_size, CONTEXT_DIM)).astype(np.float32)
    projection = (rng.standard_normal((CONTEXT_DIM, POOLED_DIM)) / np.sqrt(CONTEXT_DIM)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["embedding", "input_ids"], ["embedded"]),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "last_axis"], ["mask_3d"]),
        # tokens keep the [PAD] embedding (like a real transformer, padding is not zero)
        helper.make_node("Identity", ["embedded"], ["tokens"]),
        helper.make_node("Mul", ["embedded", "mask_3d"], ["masked"]),
        helper.make_node("ReduceMean", ["masked", "axis_1"], ["mean_tokens"], keepdims=0),
        helper.make_node("MatMul", ["mean_tokens", "projection"], ["pooled"]),
    ]
    graph = helper.make_graph(
        nodes,
        "text_encoder",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "L"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "L"]),
        ],
        [
            helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["B", "L", CONTEXT_DIM]),
            helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["B", POOLED_DIM]),
        ],
        [
            _init("embedding", embedding),
            _init("projection", projection),
            _init("last_axis", np.array([-1], np.int64)),
            _init("axis_1", np.array([1], np.int64)),
        ],
    )
    _save(graph, path)


def make_unet(path: Path, seed: int = 1, with_pooled: bool = True) -> None:
    rng = np.random.default_rng(seed)
    c = LATENT_CHANNELS
    conv = (rng.standard_normal((c, c, 3, 3)) * 0.05).astype(np.float32)
    context = (rng.standard_normal((CONTEXT_DIM, c)) * 0.3).astype(np.float32)
    pooled_w = (rng.standard_normal((POOLED_DIM, c)) * 0.3).astype(np.float32)
    nodes = [
        helper.make_node("Mul", ["sample", "a"], ["scaled"]),
        helper.make_node("Conv", ["sample", "conv_w"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["scaled", "conv"], ["spatial"]),
        helper.make_node("ReduceMean", ["encoder_hidden_states", "axis_1"], ["ctx_mean"], keepdims=0),
        helper.make_node("MatMul", ["ctx_mean", "context_w"], ["ctx"]),
        helper.make_node("Div", ["timestep", "thousand"], ["t01"]),
        helper.make_node("Unsqueeze", ["t01", "axis_1"], ["t_col"]),
        helper.make_node("Mul", ["t_col", "b"], ["t_term"]),
        helper.make_node("Add", ["ctx", "t_term"], ["cond0"]),
    ]
    inputs = [
        helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["B", c, "h", "w"]),
        helper.make_tensor_value_info("timestep", TensorProto.FLOAT, ["B"]),
        helper.make_tensor_value_info("encoder_hidden_states", TensorProto.FLOAT, ["B", "L", CONTEXT_DIM]),
    ]
    inits = [
        _init("a", np.array(0.9, np.float32)),
        _init("conv_w", conv),
        _init("context_w", context),
        _init("pooled_w", pooled_w),
        _init("axis_1", np.array([1], np.int64)),
        _init("thousand", np.array(1000.0, np.float32)),
        _init("b", np.linspace(-0.5, 0.5, c, dtype=np.float32)),
        _init("cond_shape", np.array([-1, c, 1, 1], np.int64)),
    ]
    if with_pooled:
        inputs.append(helper.make_tensor_value_info("pooled_text", TensorProto.FLOAT, ["B", POOLED_DIM]))
        nodes += [
            helper.make_node("MatMul", ["pooled_text", "pooled_w"], ["pool"]),
            helper.make_node("Add", ["cond0", "pool"], ["cond"]),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["cond0"], ["cond"]))
    nodes += [
        helper.make_node("Reshape", ["cond", "cond_shape"], ["cond_4d"]),
        helper.make_node("Add", ["spatial", "cond_4d"], ["velocity"]),
    ]
    graph = helper.make_graph(
        nodes,
        "unet",
        inputs,
        [helper.make_tensor_value_info("velocity", TensorProto.FLOAT, ["B", c, "h", "w"])],
        inits,
    )
    _save(graph, path)


def make_decoder(path: Path, seed: int = 2) -> None:
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((3, LATENT_CHANNELS, 3, 3)) * 0.1).astype(np.float32)
    nodes = [
        helper.make_node("Resize", ["latent", "", "scales"], ["up"], mode="nearest"),
        helper.make_node("Conv", ["up", "w"], ["rgb"], pads=[1, 1, 1, 1]),
        helper.make_node("Tanh", ["rgb"], ["image"]),
    ]
    graph = helper.make_graph(
        nodes,
        "decoder",
        [helper.make_tensor_value_info("latent", TensorProto.FLOAT, ["B", LATENT_CHANNELS, "h", "w"])],
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["B", 3, "H", "W"])],
        [_init("scales", np.array([1, 1, VAE_SCALE, VAE_SCALE], np.float32)), _init("w", weight)],
    )
    _save(graph, path)


def build_bundle(
    root: Path,
    *,
    name: str = "tiny-test",
    precisions: tuple[str, ...] = ("fp32",),
    with_pooled: bool = True,
    unet_config: dict | None = None,
    guidance_scale: float = 1.0,
) -> Path:
    """Write a complete, verified tiny bundle into ``root`` and return it.

    Every precision variant gets its own (identical) UNet and decoder files, as export would write.
    """
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(root / "tokenizer.json")
    make_text_encoder(root / "text_encoder.onnx", tokenizer.get_vocab_size())
    for precision in precisions:
        make_unet(root / f"unet.{precision}.onnx", with_pooled=with_pooled)
        make_decoder(root / f"decoder.{precision}.onnx")
    manifest = BundleManifest(
        name=name,
        model=ModelSpec(
            unet=unet_config if unet_config is not None else {"block_channels": BLOCK_CHANNELS},
            decoder={},
            text_encoders=(
                TextEncoderSpec(
                    file="text_encoder.onnx",
                    tokenizer="tokenizer.json",
                    max_length=MAX_LENGTH,
                    pad_to_max_length=True,
                    hidden_size=CONTEXT_DIM,
                    pooled_size=POOLED_DIM,
                ),
            ),
            latent_channels=LATENT_CHANNELS,
            vae_scale_factor=VAE_SCALE,
        ),
        defaults=Defaults(steps=4, width=32, height=32, shift=3.0, guidance_scale=guidance_scale),
        variants={
            p: Variant(
                unet=f"unet.{p}.onnx", decoder=f"decoder.{p}.onnx", text_encoder=("text_encoder.onnx",)
            )
            for p in precisions
        },
        license="Apache-2.0",
    )
    write_manifest(root, manifest)
    return root


def copy_bundle(source: Path, target: Path) -> Path:
    """A copy of a bundle folder (to damage without touching the shared one)."""
    shutil.copytree(source, target)
    return target


def test_tiny_bundle_is_valid(tmp_path: Path) -> None:
    """The fixtures themselves: the graphs pass onnx.checker and the bundle verifies."""
    from model_store.bundle import verify_or_raise

    root = build_bundle(tmp_path / "b", precisions=("fp32", "int8"))
    manifest = verify_or_raise(root)
    assert manifest.precisions == ("fp32", "int8")
    for name in ("text_encoder.onnx", "unet.fp32.onnx", "decoder.int8.onnx"):
        onnx.checker.check_model(onnx.load(str(root / name)))
