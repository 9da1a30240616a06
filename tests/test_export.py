"""Export to ONNX with parity checks, and `snapgen export` of a tiny checkpoint to a verified bundle.

Tiny real models, seeded: the ``tiny`` UNet preset (zero-initialised output layers given small
random weights so parity compares real signal), the ``tiny`` autoencoder and a tiny random BERT
read as a MiniLM-kind text encoder (MiniLM's tokenizer, 2 layers of width 32).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
from onnx import numpy_helper  # noqa: E402
from transformers import AutoTokenizer, BertConfig, BertModel  # noqa: E402

from model_store.bundle import read_manifest, verify_or_raise  # noqa: E402
from model_store.errors import IntegrityError  # noqa: E402
from snapgen_app.cli import main as cli_main  # noqa: E402
from snapgen_app.config import TextConditionerConfig, TextEncoderConfig  # noqa: E402
from snapgen_app.errors import ExportError  # noqa: E402
from snapgen_app.model.autoencoder import SnapGenAutoencoder, autoencoder_preset  # noqa: E402
from snapgen_app.model.export import (  # noqa: E402
    DEFAULT_PARITY,
    BundleDefaults,
    ExportOptions,
    ParitySpec,
    check_parity,
    decoder_parity_feeds,
    export_bundle,
    export_decoder,
    export_unet,
    sha256_of_tree,
    torch_module_reference,
    unet_io,
    write_checkpoint,
)
from snapgen_app.model.presets import unet_preset  # noqa: E402
from snapgen_app.model.quantize import make_session  # noqa: E402
from snapgen_app.model.text_encoders import TextConditioner, minilm_model_dir  # noqa: E402
from snapgen_app.model.unet import SnapGenUNet  # noqa: E402
from snapgen_app.pipeline.text_to_image import TextToImagePipeline  # noqa: E402

CONTEXT_DIM = 32
TEXT_WIDTH = 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def randomize_zero_weights(module: torch.nn.Module, seed: int = 1) -> None:
    """Zero-initialised output layers would make parity compare zeros with zeros."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            if not torch.any(param):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def tiny_text_source(root: Path) -> Path:
    """A 2-layer width-32 random BERT with MiniLM's tokenizer, saved like a hub folder."""
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_model_dir()), local_files_only=True)
    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=TEXT_WIDTH,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
        )
    )
    bert.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def tiny_checkpoint(root: Path) -> Path:
    """model_index.json + unet/ + autoencoder/ + text_conditioner/ with tiny seeded models."""
    source = tiny_text_source(root / "text_source")
    encoder = TextEncoderConfig(
        kind="minilm", source=str(source), max_length=12, hidden_size=TEXT_WIDTH, pooled_size=TEXT_WIDTH
    )
    conditioner = TextConditioner(TextConditionerConfig(encoders=(encoder,), context_dim=CONTEXT_DIM))
    torch.manual_seed(0)
    unet = SnapGenUNet.from_unet_config(
        unet_preset("tiny").replace(context_dim=CONTEXT_DIM, pooled_dim=TEXT_WIDTH)
    )
    randomize_zero_weights(unet)
    autoencoder = SnapGenAutoencoder.from_autoencoder_config(autoencoder_preset("tiny"))
    randomize_zero_weights(autoencoder)
    return write_checkpoint(
        root / "checkpoint",
        unet=unet,
        autoencoder=autoencoder,
        text_conditioner=conditioner,
        defaults=BundleDefaults(steps=4, width=128, height=128, shift=1.0),
        license="apache-2.0",
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def bundle(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All three precisions, exported through the CLI with dynamic axes (the torchscript exporter keeps
    the test fast; the dynamo exporter is exercised by the decoder tests below)."""
    out = tmp_path_factory.mktemp("bundles") / "tiny-bundle"
    argv = ["export", str(checkpoint), "--out", str(out), "--precision", "int8,fp16,fp32", "--name", "tiny"]
    prompts = out.parent / "calibration-prompts.txt"
    prompts.write_text("a red circle\n\na blue square on a white background\n")
    argv += ["--calib-prompts", "2", "--calib-steps", "4", "--exporter", "torchscript"]
    argv += ["--calib-prompt-file", str(prompts), "--calib-guidance", "3"]  # guided, own prompts
    assert cli_main(argv) == 0
    return out


def test_bundle_verifies_and_records_parity_and_provenance(bundle: Path, checkpoint: Path) -> None:
    manifest = verify_or_raise(bundle)
    assert manifest.name == "tiny"
    assert manifest.precisions == ("fp32", "fp16", "int8")
    assert manifest.variants["int8"].unet == "unet.int8.onnx"
    assert manifest.variants["int8"].text_encoder == ("text_encoder.int8.onnx",)
    assert manifest.variants["fp32"].text_encoder == ("text_encoder.onnx",)
    assert manifest.model.text_encoders[0].tokenizer == "tokenizer.json"
    assert manifest.model.text_encoders[0].hidden_size == CONTEXT_DIM
    assert manifest.model.latent_channels == 16 and manifest.model.vae_scale_factor == 8
    # CFG's unconditional input is the checkpoint's text dropout (TextConditionerConfig default: zeros)
    assert manifest.model.null_condition == "zeros"
    pipe = TextToImagePipeline(bundle, manifest, "fp32", ["CPUExecutionProvider"])
    assert pipe.null_condition == "zeros"
    assert manifest.defaults.width == 128
    for precision, variant in manifest.variants.items():
        assert set(variant.parity) == {"text_encoder_0", "unet", "decoder"}
        for component, check in variant.parity.items():
            spec = ParitySpec(check["metric"], check["threshold"])
            assert spec.passes(check["value"]), (precision, component, check)
    assert manifest.variants["fp32"].parity["unet"]["value"] < 1e-4
    assert manifest.variants["fp32"].parity["unet"]["inputs"] == 5  # five timesteps
    assert manifest.provenance.source_checkpoint_sha256 == sha256_of_tree(checkpoint)
    assert {"torch", "onnx", "onnxruntime"} <= set(manifest.provenance.tools)
    assert manifest.license == "apache-2.0"


def test_bundle_graphs_have_the_runtime_io_names(bundle: Path) -> None:
    unet = make_session(bundle / "unet.int8.onnx")
    assert [i.name for i in unet.get_inputs()] == [
        "sample",
        "timestep",
        "encoder_hidden_states",
        "pooled_text",
    ]
    assert [o.name for o in unet.get_outputs()] == ["velocity"]
    text = make_session(bundle / "text_encoder.onnx")
    assert [i.name for i in text.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in text.get_outputs()] == ["tokens", "pooled"]
    decoder = make_session(bundle / "decoder.fp16.onnx")
    (image,) = decoder.run(
        None, {"latent": np.random.default_rng(0).standard_normal((1, 16, 16, 16)).astype(np.float32)}
    )
    assert image.shape == (1, 3, 128, 128) and np.all(np.isfinite(image))
    assert image.min() >= -1.0 and image.max() <= 1.0


def test_fp16_variant_records_nodes_kept_in_fp32(bundle: Path) -> None:
    kept = read_manifest(bundle).variants["fp16"].kept_in_higher_precision
    unet_kept = [k.split(":", 1)[1] for k in kept if k.startswith("unet.fp16.onnx:")]
    ops = {n.name: n.op_type for n in onnx.load(str(bundle / "unet.fp16.onnx")).graph.node}
    kept_ops = {ops[name] for name in unet_kept}
    assert {"Softmax", "InstanceNormalization", "Pow"} <= kept_ops
    # the kept nodes still compute in fp32: their inputs come through Cast nodes from fp16
    assert any(op == "Cast" for op in ops.values())


def test_int8_variant_lists_attention_matmuls_as_kept(bundle: Path) -> None:
    kept = read_manifest(bundle).variants["int8"].kept_in_higher_precision
    assert any(k.startswith("unet.int8.onnx:") for k in kept)
    model = onnx.load(str(bundle / "unet.int8.onnx"))
    producers = {out: n.op_type for n in model.graph.node for out in n.output}
    for node in model.graph.node:
        if f"unet.int8.onnx:{node.name}" in kept:
            assert node.op_type in ("MatMul", "Gemm")
            assert producers.get(node.input[0]) != "DequantizeLinear"


def test_geglu_exports_as_two_weight_matmuls_without_slices(bundle: Path, checkpoint: Path) -> None:
    """The feed-forward's value and gate halves are separate weight MatMuls (no Slice over the
    widest activation), each quantized in int8 and run with a float output."""
    unet = SnapGenUNet.from_pretrained(str(checkpoint / "unet"))
    gated = [m for m in unet.modules() if hasattr(m, "split_gate")]
    gates = _gelu_gate_linears(onnx.load(str(bundle / "unet.fp32.onnx")))
    assert len(gates) == len(gated) > 0
    assert all(constant_weight for _, constant_weight in gates), gates
    int8 = onnx.load(str(bundle / "unet.int8.onnx"))
    consumers: dict[str, list[str]] = {}
    for node in int8.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    by_output = {out: n for n in int8.graph.node for out in n.output}
    weight_matmuls = [
        n
        for n in int8.graph.node
        if n.op_type == "MatMul"
        and by_output.get(n.input[1]) is not None
        and by_output[n.input[1]].op_type == "DequantizeLinear"
    ]
    assert len(weight_matmuls) >= 2 * len(gated)
    # float output: ORT runs them as MatMulIntegerToFloat (no QuantizeLinear after them)
    assert all("QuantizeLinear" not in consumers.get(n.output[0], []) for n in weight_matmuls)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_geglu_weights_are_constants_with_either_exporter(tmp_path: Path, exporter: str) -> None:
    """Both exporters give the split GEGLU constant weights (a Slice of an initializer in the graph
    would hide them from the int8 quantizer: the dynamo exporter does not fold one), and the module
    is rejoined after the export."""
    torch.manual_seed(0)
    unet = SnapGenUNet.from_unet_config(unet_preset("tiny")).eval()
    keys = set(unet.state_dict())
    io = unet_io(unet, tokens=7)
    path = export_unet(unet, tmp_path / "unet.onnx", io, example_latent=(16, 16), exporter=exporter).path
    assert set(unet.state_dict()) == keys
    model = onnx.load(str(path))
    assert not any(n.op_type == "Slice" and n.input[0] in _constants(model) for n in model.graph.node)
    gates = _gelu_gate_linears(model)
    assert gates and all(constant_weight for _, constant_weight in gates), gates


def _constants(model: onnx.ModelProto) -> set[str]:
    names = {i.name for i in model.graph.initializer}
    return names | {out for n in model.graph.node if n.op_type == "Constant" for out in n.output}


def _gelu_gate_linears(model: onnx.ModelProto) -> list[tuple[str, bool]]:
    """For each GELU of an opset-18 graph (written out with Erf): the op its gate comes from, past
    the bias Add and the Div by sqrt(2), and whether that op is a MatMul with a constant weight."""
    constants = _constants(model)
    producers = {out: n for n in model.graph.node for out in n.output}
    found = []
    for erf in (n for n in model.graph.node if n.op_type == "Erf"):
        source = producers[erf.input[0]]
        while source.op_type in ("Add", "Div", "Mul"):
            source = producers[next(i for i in source.input if i in producers and i not in constants)]
        found.append((source.op_type, source.op_type == "MatMul" and source.input[1] in constants))
    return found


def test_threshold_failure_raises_and_leaves_nothing(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "never"
    strict = (
        ("fp32", ParitySpec("max_abs_diff", 0.0)),
        *((k, v) for k, v in DEFAULT_PARITY.items() if k != "fp32"),
    )
    with pytest.raises(ExportError, match="drifted from torch"):
        export_bundle(
            checkpoint, out, ExportOptions(precisions=("fp32",), parity=strict, exporter="torchscript")
        )
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # the staging folder is gone too


def test_a_static_export_runs_at_its_default_size(checkpoint: Path, tmp_path: Path) -> None:
    """--static-shapes traces, checks and writes the graphs at the bundle's default size (here
    576 px, over the 512 px that dynamic exports calibrate at), so generating at the defaults works;
    another parity size, or a non-square default, is refused before anything is exported."""
    from PIL import Image

    from snapgen_app import service
    from snapgen_app.api import GenerationRequest

    big = tmp_path / "ckpt576"
    shutil.copytree(checkpoint, big)
    index = json.loads((big / "model_index.json").read_text())
    key = next(k for k, v in index.items() if isinstance(v, dict) and "width" in v)
    index[key].update(width=576, height=576)
    (big / "model_index.json").write_text(json.dumps(index))
    out = tmp_path / "static"
    export_bundle(big, out, ExportOptions(precisions=("fp32",), dynamic=False, exporter="torchscript"))
    sample = next(i for i in onnx.load(str(out / "unet.fp32.onnx")).graph.input if i.name == "sample")
    assert [d.dim_value for d in sample.type.tensor_type.shape.dim][-2:] == [72, 72]  # 576 / 8
    result = service.generate(
        GenerationRequest(prompt="a red circle", model=str(out), seed=1, output_dir=str(tmp_path / "png"))
    )
    assert Image.open(result.images[0]).size == (576, 576)

    with pytest.raises(ExportError, match="runs at its default size 576 px only, not parity_px=128"):
        export_bundle(big, tmp_path / "o1", ExportOptions(precisions=("fp32",), dynamic=False, parity_px=128))
    index[key].update(width=576, height=320)
    (big / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ExportError, match="576x320 here"):
        export_bundle(big, tmp_path / "o2", ExportOptions(precisions=("fp32",), dynamic=False))
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_bad_checkpoint_and_bad_flags(
    tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["export", str(empty), "--out", str(tmp_path / "o")]) == 1
    assert "model_index.json" in capsys.readouterr().err
    assert cli_main(["export", str(checkpoint), "--out", str(tmp_path / "o"), "--precision", "int4"]) == 2
    assert "allowed: fp32, fp16, int8" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / "unet" / "weights.bin").write_bytes(b"pickle")
    assert cli_main(["export", str(broken), "--out", str(tmp_path / "o")]) == 1
    assert "pickle" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    out = ["export", str(checkpoint), "--out", str(tmp_path / "o")]
    assert cli_main([*out, "--calib-prompt-file", str(tmp_path / "none.txt")]) == 2
    assert "cannot read" in capsys.readouterr().err
    (tmp_path / "blank.txt").write_text("\n  \n")
    assert cli_main([*out, "--calib-prompt-file", str(tmp_path / "blank.txt")]) == 2
    assert "holds no prompt" in capsys.readouterr().err
    assert cli_main([*out, "--calib-guidance", "0.5"]) == 2
    assert "--calib-guidance must be >= 1" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("not a folder")
    assert cli_main(["export", str(checkpoint), "--out", str(tmp_path / "a-file")]) == 1
    assert "a-file is a file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def decoder_graph(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """The tiny latent decoder exported with dynamic batch and spatial axes."""
    torch.manual_seed(0)
    autoencoder = SnapGenAutoencoder.from_autoencoder_config(autoencoder_preset("tiny"))
    randomize_zero_weights(autoencoder)
    decoder = autoencoder.latent_decoder().eval()
    path = tmp_path_factory.mktemp("decoder") / "decoder.fp32.onnx"
    graph = export_decoder(decoder, path, latent_channels=16, example_latent=(8, 8))
    assert graph.dynamic_axes
    return decoder, path


def test_dynamic_decoder_passes_parity_at_other_sizes(decoder_graph: tuple[torch.nn.Module, Path]) -> None:
    decoder, path = decoder_graph
    reference = torch_module_reference(decoder, ("latent",))
    feeds = decoder_parity_feeds(16, latent=(12, 20), count=2)
    feeds.append({"latent": np.random.default_rng(3).standard_normal((2, 16, 4, 4)).astype(np.float32)})
    result = check_parity("decoder", reference, path, feeds, DEFAULT_PARITY["fp32"])
    assert result.passed and result.value < 1e-4 and result.inputs == 3


def test_modified_onnx_weight_fails_parity(
    decoder_graph: tuple[torch.nn.Module, Path], tmp_path: Path
) -> None:
    decoder, path = decoder_graph
    model = onnx.load(str(path))
    conv_weights = [i for i in model.graph.initializer if len(i.dims) == 4]
    target = conv_weights[len(conv_weights) // 2]
    target.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(target) + 0.05, target.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(model, str(tampered))
    reference = torch_module_reference(decoder, ("latent",))
    feeds = decoder_parity_feeds(16, latent=(8, 8), count=2)
    with pytest.raises(ExportError, match="max_abs_diff"):
        check_parity("decoder", reference, tampered, feeds, DEFAULT_PARITY["fp32"])
    # the same check with a PSNR threshold no real export reaches fails too
    with pytest.raises(ExportError, match="psnr_db"):
        check_parity("decoder", reference, path, feeds, ParitySpec("psnr_db", 1000.0))
    # a graph that cannot take the parity inputs at all (here: a static 8x8 graph fed 12x20) is
    # one ExportError, not onnxruntime's InvalidArgument traceback
    static = tmp_path / "static.onnx"
    export_decoder(
        decoder, static, latent_channels=16, example_latent=(8, 8), dynamic=False, exporter="torchscript"
    )
    with pytest.raises(
        ExportError, match=r"does not run on the parity inputs \{'latent': \[1, 16, 12, 20\]\}"
    ):
        check_parity(
            "decoder",
            reference,
            static,
            decoder_parity_feeds(16, latent=(12, 20), count=1),
            DEFAULT_PARITY["fp32"],
        )


def test_altered_bundle_file_fails_verification(bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    data = bytearray((copy / "decoder.int8.onnx").read_bytes())
    data[-10] ^= 0xFF
    (copy / "decoder.int8.onnx").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"decoder\.int8\.onnx"):
        verify_or_raise(copy)
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert "bundle.json" not in manifest["files"]
