"""Quantization: trajectory calibration, int8 static QDQ of Conv + weight MatMul only, dynamic int8
for MatMul/Gemm, fp16 with fp32 islands and its NaN check. Tiny seeded models, real onnxruntime."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from snapgen_app.errors import ExportError  # noqa: E402
from snapgen_app.model.export import (  # noqa: E402
    ParitySpec,
    check_parity,
    export_unet,
    torch_unet_reference,
    unet_io,
    unet_parity_feeds,
)
from snapgen_app.model.presets import unet_preset  # noqa: E402
from snapgen_app.model.quantize import (  # noqa: E402
    TrajectoryData,
    collect_trajectories,
    convert_fp16,
    flow_matching_timesteps,
    make_session,
    op_histogram,
    quantize_dynamic_int8,
    quantize_static_int8,
    select_weight_nodes,
)
from snapgen_app.model.unet import SnapGenUNet  # noqa: E402

LATENT = 8  # 64 px
STEPS = 6


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_unet() -> SnapGenUNet:
    torch.manual_seed(0)
    unet = SnapGenUNet.from_unet_config(unet_preset("tiny"))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # zero-initialised output layers would hide quantization error
        for param in unet.parameters():
            if not torch.any(param):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return unet.eval()


@pytest.fixture(scope="module")
def contexts(tiny_unet: SnapGenUNet) -> list[tuple[torch.Tensor, torch.Tensor]]:
    cfg = tiny_unet.unet_config
    generator = torch.Generator().manual_seed(2)
    return [
        (
            torch.randn(1, 6, cfg.context_dim, generator=generator),
            torch.randn(1, cfg.pooled_dim, generator=generator),
        )
        for _ in range(2)
    ]


@pytest.fixture(scope="module")
def graphs(
    tiny_unet: SnapGenUNet, contexts: list, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quant")
    io = unet_io(tiny_unet, tokens=6)
    fp32 = export_unet(
        tiny_unet, root / "unet.fp32.onnx", io, example_latent=(LATENT, LATENT), exporter="torchscript"
    ).path
    trajectories = collect_trajectories(
        tiny_unet, contexts, latent_shape=(16, LATENT, LATENT), steps=STEPS, shift=3.0
    )
    int8 = quantize_static_int8(fp32, root / "unet.int8.onnx", trajectories.unet_feeds)
    return {"fp32": fp32, "int8": int8.path, "root": root}


def test_calibration_comes_from_trajectories_spanning_the_schedule(
    tiny_unet: SnapGenUNet, contexts: list
) -> None:
    data = collect_trajectories(
        tiny_unet, contexts, latent_shape=(16, LATENT, LATENT), steps=STEPS, shift=3.0, seed=4
    )
    assert len(data.unet_feeds) == len(contexts) * STEPS
    expected_t = flow_matching_timesteps(STEPS, 3.0)[:-1]
    assert np.allclose(data.timesteps[:STEPS], expected_t)
    assert max(data.timesteps) == 1.0 and min(data.timesteps) < 0.4  # shifted schedule reaches low noise
    assert len(set(np.round(data.timesteps, 6))) == STEPS
    stamps = [float(f["timestep"][0]) for f in data.unet_feeds]
    assert np.allclose(stamps, np.array(data.timesteps) * 1000.0)
    # each step's sample is the previous one moved by the model's velocity: not independent noise
    first, second = data.unet_feeds[0]["sample"], data.unet_feeds[1]["sample"]
    velocity = (
        tiny_unet(torch.from_numpy(first), torch.tensor([1000.0]), contexts[0][0], contexts[0][1])
        .detach()
        .numpy()
    )
    dt = expected_t[1] - expected_t[0]
    assert np.allclose(second, first + dt * velocity, atol=1e-5)
    assert np.array_equal(data.unet_feeds[0]["encoder_hidden_states"], contexts[0][0].numpy())
    # decoder calibration: predicted clean latents per step plus the final latent of each trajectory
    assert len(data.decoder_feeds) == len(contexts) * (STEPS + 1)


def test_guided_calibration_follows_cfg_and_records_the_unconditional_inputs(
    tiny_unet: SnapGenUNet, contexts: list
) -> None:
    cfg = tiny_unet.unet_config
    null = (torch.zeros(1, 6, cfg.context_dim), torch.zeros(1, cfg.pooled_dim))

    def trajectories(guidance: float) -> TrajectoryData:
        return collect_trajectories(
            tiny_unet,
            contexts,
            latent_shape=(16, LATENT, LATENT),
            steps=STEPS,
            shift=3.0,
            seed=4,
            guidance_scale=guidance,
            null_context=null,
        )

    data = trajectories(4.0)
    assert len(data.unet_feeds) == len(contexts) * STEPS * 2  # conditional + unconditional per step
    cond, uncond, after = data.unet_feeds[0], data.unet_feeds[1], data.unet_feeds[2]
    assert np.array_equal(cond["sample"], uncond["sample"]) and data.timesteps[0] == data.timesteps[1]
    assert np.array_equal(uncond["encoder_hidden_states"], null[0].numpy())
    assert np.array_equal(uncond["pooled_text"], null[1].numpy())
    x, t = torch.from_numpy(cond["sample"]), torch.tensor([1000.0])
    with torch.no_grad():
        v_cond = tiny_unet(x, t, contexts[0][0], contexts[0][1])
        v_null = tiny_unet(x, t, null[0], null[1])
    dt = flow_matching_timesteps(STEPS, 3.0)[1] - 1.0
    guided = (x + dt * (v_null + 4.0 * (v_cond - v_null))).numpy()
    assert np.allclose(after["sample"], guided, atol=1e-5)
    assert not np.allclose(after["sample"], (x + dt * v_cond).numpy(), atol=1e-3)  # not the unguided step
    assert len(trajectories(1.0).unet_feeds) == len(contexts) * STEPS  # guidance 1: the plain trajectory


def test_int8_quantizes_only_conv_and_weight_matmuls(graphs: dict[str, Path]) -> None:
    ops = op_histogram(graphs["int8"])
    assert not any(op.startswith("QLinear") for op in ops)  # QDQ format, no QLinearSoftmax etc.
    assert ops.get("Softmax", 0) == op_histogram(graphs["fp32"]).get("Softmax", 0) > 0
    model = onnx.load(str(graphs["int8"]))
    producers = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    inits = {i.name: i for i in model.graph.initializer}
    # A node runs quantized when ORT can fuse DQ -> node -> Q: every activation input comes from a
    # DequantizeLinear and every consumer of its output is a QuantizeLinear. Apart from pure data
    # movement (exact on int8), only Conv / MatMul / Gemm may be such nodes.
    data_movement = {
        "Reshape",
        "Transpose",
        "Concat",
        "Unsqueeze",
        "Squeeze",
        "Slice",
        "Split",
        "Resize",
        "Expand",
    }
    quantized_ops = set()
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        activations = [i for i in node.input if i and i not in inits]
        outputs = [c for out in node.output for c in consumers.get(out, [])]
        from_dq = activations and all(
            i in producers and producers[i].op_type == "DequantizeLinear" for i in activations
        )
        if from_dq and outputs and all(c.op_type == "QuantizeLinear" for c in outputs):
            quantized_ops.add(node.op_type)
    assert "Conv" in quantized_ops
    assert quantized_ops - data_movement <= {"Conv", "MatMul", "Gemm"}, quantized_ops
    weight_matmuls = [
        n
        for n in model.graph.node
        if n.op_type == "MatMul"
        and all(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in n.input)
    ]
    assert weight_matmuls and all(producers[n.input[1]].input[0] in inits for n in weight_matmuls)
    # int8 weights feed only Conv / MatMul / Gemm
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            assert {c.op_type for c in consumers[node.output[0]]} <= {"Conv", "MatMul", "Gemm"}
    softmax = [n for n in model.graph.node if n.op_type == "Softmax"]
    assert all(producers[n.input[0]].op_type != "DequantizeLinear" for n in softmax)
    assert all(c.op_type != "QuantizeLinear" for n in softmax for c in consumers.get(n.output[0], []))
    fp32_model = onnx.load(str(graphs["fp32"]))
    _, keep = select_weight_nodes(fp32_model)
    assert keep, "the tiny UNet has attention: some MatMuls multiply two activations"
    by_name = {n.name: n for n in model.graph.node}
    for name in keep:  # attention matmuls take float inputs
        node = by_name[name]
        assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in node.input)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convs and all(producers[n.input[1]].op_type == "DequantizeLinear" for n in convs)
    weights_dq = [producers[n.input[1]] for n in convs]
    assert all(inits[dq.input[0]].data_type == TensorProto.INT8 for dq in weights_dq)  # s8 weights
    per_channel = [
        dq for dq in weights_dq if len(inits[dq.input[1]].dims) == 1 and inits[dq.input[1]].dims[0] > 1
    ]
    assert per_channel, "conv weights are quantized per output channel"
    activation_q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert all(inits[n.input[2]].data_type == TensorProto.UINT8 for n in activation_q)  # u8 activations


def test_int8_runs_in_onnxruntime_close_to_fp32(
    tiny_unet: SnapGenUNet, graphs: dict[str, Path], contexts: list
) -> None:
    io = unet_io(tiny_unet, tokens=6)
    np_contexts = [(t.numpy(), p.numpy()) for t, p in contexts]
    feeds = unet_parity_feeds(io, latent=(LATENT, LATENT), contexts=np_contexts)
    result = check_parity(
        "unet", torch_unet_reference(tiny_unet, io), graphs["int8"], feeds, ParitySpec("psnr_db", 20.0)
    )
    assert 20.0 <= result.value < 90.0  # really quantized, and not broken


def _toy_graph(path: Path, *, scale: float = 1.0) -> Path:
    """x [1,4,8,8] -> Conv -> reshape [1,64,4]-ish -> MatMul(weight) -> x @ x^T -> Softmax -> Mul(scale)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32) * 0.3, "conv_w"),
        numpy_helper.from_array(np.array([1, 64, 4], dtype=np.int64), "shape"),
        numpy_helper.from_array(rng.standard_normal((4, 8)).astype(np.float32), "proj_w"),
        numpy_helper.from_array(np.array(scale, dtype=np.float32), "scale"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv_w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Transpose", ["c"], ["ct"], perm=[0, 2, 3, 1], name="to_tokens"),
        helper.make_node("Reshape", ["ct", "shape"], ["tok"], name="reshape"),
        helper.make_node("MatMul", ["tok", "proj_w"], ["q"], name="weight_matmul"),
        helper.make_node("Transpose", ["q"], ["qt"], perm=[0, 2, 1], name="qt"),
        helper.make_node("MatMul", ["q", "qt"], ["scores"], name="activation_matmul"),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"], name="scale_scores"),
        helper.make_node("Softmax", ["scaled"], ["y"], axis=-1, name="softmax"),
    ]
    graph = helper.make_graph(
        nodes,
        "toy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 64])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def test_dynamic_int8_touches_only_weight_matmuls(tmp_path: Path) -> None:
    src = _toy_graph(tmp_path / "toy.onnx")
    result = quantize_dynamic_int8(src, tmp_path / "toy.int8.onnx")
    assert result.quantized_nodes == ("weight_matmul",)
    assert result.kept_in_higher_precision == ("activation_matmul",)
    ops = op_histogram(result.path)
    assert "ConvInteger" not in ops and ops["Conv"] == 1  # the CPU provider cannot run ConvInteger
    assert ops.get("MatMul", 0) == 1  # the activation x activation matmul is untouched
    session = make_session(result.path)
    (y,) = session.run(None, {"x": np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)})
    assert np.all(np.isfinite(y)) and np.allclose(y.sum(-1), 1.0, atol=1e-4)


def test_fp16_keeps_softmax_and_records_it(tmp_path: Path) -> None:
    src = _toy_graph(tmp_path / "toy.onnx", scale=0.1)
    feeds = [{"x": np.random.default_rng(2).standard_normal((1, 4, 8, 8)).astype(np.float32)}]
    result = convert_fp16(src, tmp_path / "toy.fp16.onnx", feeds)
    assert "softmax" in result.kept_in_higher_precision
    assert "weight_matmul" not in result.kept_in_higher_precision
    model = onnx.load(str(result.path))
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # float32 IO kept
    assert any(i.data_type == TensorProto.FLOAT16 for i in model.graph.initializer)


def test_fp16_overflow_is_caught_by_the_nan_check(tmp_path: Path) -> None:
    # inputs of 1e5 are fine in fp32 but overflow to inf in the fp16 graph (max 65504); the
    # softmax of inf is NaN, which the check must catch (the black-image failure of fp16 decoders)
    src = _toy_graph(tmp_path / "toy.onnx", scale=0.1)
    x = np.random.default_rng(2).standard_normal((1, 4, 8, 8)).astype(np.float32) * 1e5
    (reference,) = make_session(src).run(None, {"x": x})
    assert np.all(np.isfinite(reference))
    with pytest.raises(ExportError, match="NaN"):
        convert_fp16(src, tmp_path / "toy.fp16.onnx", [{"x": x}])


def test_static_int8_needs_calibration_data(graphs: dict[str, Path]) -> None:
    with pytest.raises(ExportError, match="calibration"):
        quantize_static_int8(graphs["fp32"], graphs["root"] / "never.onnx", [])


def test_deduplicated_biases_are_still_quantized(tmp_path: Path) -> None:
    """TorchScript export shares equal weights (zero biases) through Identity nodes; every Conv must
    still get an int32 bias so ORT can fuse it into an int8 convolution."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 8, 1))
    with torch.no_grad():
        for conv in (net[0], net[2]):
            conv.bias.zero_()
    src = tmp_path / "convs.onnx"
    torch.onnx.export(
        net, (torch.randn(1, 4, 8, 8),), str(src), dynamo=False, input_names=["x"], opset_version=18
    )
    assert any(n.op_type == "Identity" for n in onnx.load(str(src)).graph.node)  # the sharing happened
    feeds = [
        {"x": np.random.default_rng(i).standard_normal((1, 4, 8, 8)).astype(np.float32)} for i in range(3)
    ]
    result = quantize_static_int8(src, tmp_path / "convs.int8.onnx", feeds)
    model = onnx.load(str(result.path))
    producers = {out: node for node in model.graph.node for out in node.output}
    inits = {i.name: i for i in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 2
    for conv in convs:
        bias_dq = producers[conv.input[2]]
        assert (
            bias_dq.op_type == "DequantizeLinear" and inits[bias_dq.input[0]].data_type == TensorProto.INT32
        )
