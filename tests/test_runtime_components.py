"""Runtime parts on their own: providers, session options/cache, tokenizer, text encoder stack."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from test_runtime_fixtures import CONTEXT_DIM, MAX_LENGTH, POOLED_DIM, make_text_encoder, make_tokenizer

from snapgen_app.errors import BundleError, ConfigError, ProviderError
from snapgen_app.runtime import (
    PromptTokenizer,
    RuntimeOptions,
    SessionCache,
    TextEncoderStack,
    available_providers,
    choose_providers,
)
from snapgen_app.runtime.providers import CPU, PROVIDER_BY_DEVICE

# -- providers ---------------------------------------------------------------------------------


def test_available_providers_include_the_cpu() -> None:
    assert CPU in available_providers()
    assert available_providers() == tuple(ort.get_available_providers())


def test_auto_prefers_cuda_then_directml_then_coreml_then_cpu() -> None:
    everything = ["CoreMLExecutionProvider", "DmlExecutionProvider", "CUDAExecutionProvider", CPU]
    assert choose_providers("auto", everything) == ["CUDAExecutionProvider", CPU]
    assert choose_providers("auto", [*everything[:2], CPU]) == ["DmlExecutionProvider", CPU]
    assert choose_providers("auto", ["CoreMLExecutionProvider", CPU]) == ["CoreMLExecutionProvider", CPU]
    assert choose_providers("auto", [CPU]) == [CPU]
    assert choose_providers("cpu") == [CPU]


def test_auto_logs_why_it_fell_back(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="snapgen_app.runtime.providers"):
        choose_providers("auto", [CPU])
    assert "CUDAExecutionProvider" in caplog.text and "not in this onnxruntime build" in caplog.text


def test_auto_uses_the_installed_onnxruntime() -> None:
    chosen = choose_providers("auto")
    assert chosen[-1] == CPU
    assert all(p in available_providers() for p in chosen)


@pytest.mark.parametrize(
    ("device", "package"), [("cuda", "onnxruntime-gpu"), ("dml", "onnxruntime-directml"), ("coreml", "macOS")]
)
def test_a_missing_provider_says_what_to_install(device: str, package: str) -> None:
    with pytest.raises(ProviderError) as info:
        choose_providers(device, [CPU])
    assert PROVIDER_BY_DEVICE[device] in str(info.value)
    assert package in str(info.value)


def test_a_provider_missing_from_this_onnxruntime_is_refused() -> None:
    missing = [d for d, p in PROVIDER_BY_DEVICE.items() if p not in available_providers()]
    if not missing:
        pytest.skip("this onnxruntime has every provider")
    with pytest.raises(ProviderError, match="does not have"):
        choose_providers(missing[0])


def test_unknown_device_is_refused() -> None:
    with pytest.raises(ProviderError, match="unknown device"):
        choose_providers("tpu", [CPU])


# -- sessions ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("encoder")
    tokenizer = make_tokenizer(root / "tokenizer.json")
    make_text_encoder(root / "text_encoder.onnx", tokenizer.get_vocab_size())
    return root


def test_session_options_carry_the_settings() -> None:
    options = RuntimeOptions(
        intra_op_threads=1, graph_optimization="basic", cpu_mem_arena=False, mem_pattern=False
    )
    session_options = options.to_session_options()
    assert session_options.intra_op_num_threads == 1
    assert session_options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert session_options.enable_cpu_mem_arena is False
    assert session_options.enable_mem_pattern is False
    assert session_options.get_session_config_entry("session.intra_op.allow_spinning") == "1"


def test_bad_options_are_refused() -> None:
    with pytest.raises(ConfigError, match="threads"):
        RuntimeOptions(intra_op_threads=-1)
    with pytest.raises(ConfigError, match="graph_optimization"):
        RuntimeOptions(graph_optimization="max")  # type: ignore[arg-type]


def test_sessions_are_lazy_and_cached(encoder_files: Path) -> None:
    cache = SessionCache()
    options = RuntimeOptions(intra_op_threads=1)
    session = cache.get(encoder_files / "text_encoder.onnx", [CPU], options)
    assert not session.loaded
    assert cache.get(encoder_files / "text_encoder.onnx", [CPU], options) is session
    assert (
        cache.get(encoder_files / "text_encoder.onnx", [CPU], RuntimeOptions(intra_op_threads=2))
        is not session
    )
    assert session.input_names == ("input_ids", "attention_mask")
    assert session.loaded and session.provider_used == CPU
    assert len(cache) == 2


def test_a_file_that_is_not_a_model_names_the_file(tmp_path: Path) -> None:
    bogus = tmp_path / "unet.fp32.onnx"
    bogus.write_bytes(b"<html>404 Not Found</html>")
    session = SessionCache().get(bogus, [CPU], RuntimeOptions())
    with pytest.raises(BundleError, match=r"unet\.fp32\.onnx is not a loadable ONNX model"):
        _ = session.inference_session


def test_a_missing_model_file_is_a_bundle_error(tmp_path: Path) -> None:
    session = SessionCache().get(tmp_path / "decoder.fp32.onnx", [CPU], RuntimeOptions())
    with pytest.raises(BundleError, match="model file missing"):
        session.run({})


def test_missing_io_names_are_reported(encoder_files: Path) -> None:
    session = SessionCache().get(encoder_files / "text_encoder.onnx", [CPU], RuntimeOptions())
    with pytest.raises(BundleError, match="lacks input 'sample'"):
        session.require_io(("sample",), ("tokens",))


# -- tokenizer and text encoder ------------------------------------------------------------------


def test_tokenizer_pads_to_max_length(encoder_files: Path) -> None:
    tokenizer = PromptTokenizer.from_file(encoder_files / "tokenizer.json", MAX_LENGTH)
    batch = tokenizer.encode(["a red apple", ""])
    assert batch.input_ids.shape == (2, MAX_LENGTH) and batch.input_ids.dtype == np.int64
    assert batch.attention_mask.tolist()[0] == [1, 1, 1, 0, 0, 0, 0, 0]
    assert batch.attention_mask[1].sum() == 0
    assert batch.input_ids[0, 3:].tolist() == [0] * 5, "padding uses [PAD] (id 0)"
    assert batch.truncated == (False, False)


def test_tokenizer_keeps_the_padding_side_it_was_saved_with(encoder_files: Path, tmp_path: Path) -> None:
    """A tokenizer saved padding on the left (Gemma's) pads on the left here too: the text encoder
    reads its tokens where it was trained to."""
    from tokenizers import Tokenizer

    saved = Tokenizer.from_file(str(encoder_files / "tokenizer.json"))
    saved.enable_padding(direction="left", pad_id=0, pad_token="[PAD]")
    saved.save(str(tmp_path / "tokenizer.json"))
    batch = PromptTokenizer.from_file(tmp_path / "tokenizer.json", MAX_LENGTH).encode(["a red apple"])
    assert batch.attention_mask.tolist()[0] == [0, 0, 0, 0, 0, 1, 1, 1]
    right = PromptTokenizer.from_file(encoder_files / "tokenizer.json", MAX_LENGTH).encode(["a red apple"])
    assert batch.input_ids[0, 5:].tolist() == right.input_ids[0, :3].tolist()


def test_tokenizer_truncates_long_prompts_with_a_warning(
    encoder_files: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tokenizer = PromptTokenizer.from_file(encoder_files / "tokenizer.json", MAX_LENGTH)
    long_prompt = " ".join(["red apple"] * 20)
    with caplog.at_level(logging.WARNING):
        batch = tokenizer.encode([long_prompt, "a dog"])
    assert batch.input_ids.shape == (2, MAX_LENGTH)
    assert batch.truncated == (True, False)
    assert "truncated" in caplog.text


def test_tokenizer_without_fixed_padding_pads_to_the_longest(encoder_files: Path) -> None:
    tokenizer = PromptTokenizer.from_file(
        encoder_files / "tokenizer.json", MAX_LENGTH, pad_to_max_length=False
    )
    batch = tokenizer.encode(["a red apple", "a dog"])
    assert batch.input_ids.shape == (2, 3)


def test_bad_tokenizer_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="tokenizer file missing"):
        PromptTokenizer.from_file(tmp_path / "tokenizer.json", 8)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(BundleError, match=r"tokenizer\.json is not a valid tokenizer\.json"):
        PromptTokenizer.from_file(tmp_path / "tokenizer.json", 8)


def test_text_encoders_are_concatenated_along_tokens_and_pooled(encoder_files: Path) -> None:
    cache = SessionCache()
    tokenizer = PromptTokenizer.from_file(encoder_files / "tokenizer.json", MAX_LENGTH)
    session = cache.get(encoder_files / "text_encoder.onnx", [CPU], RuntimeOptions())
    single = TextEncoderStack([(tokenizer, session)]).encode(["a red apple", "a dog"])
    assert single.tokens.shape == (2, MAX_LENGTH, CONTEXT_DIM) and single.tokens.dtype == np.float32
    assert single.pooled.shape == (2, POOLED_DIM)
    double = TextEncoderStack([(tokenizer, session), (tokenizer, session)]).encode(["a red apple", "a dog"])
    assert double.tokens.shape == (2, 2 * MAX_LENGTH, CONTEXT_DIM)
    assert double.pooled.shape == (2, 2 * POOLED_DIM)
    np.testing.assert_array_equal(double.tokens[:, MAX_LENGTH:], single.tokens)
    np.testing.assert_array_equal(double.pooled[:, :POOLED_DIM], single.pooled)
    assert not np.allclose(single.tokens[0], single.tokens[1]), "different prompts embed differently"


def _fixed_graph(path: Path) -> None:
    """float16 input x [1, 4] -> Cast to float32 * 2 -> y [1, 4]: a fixed-batch, fp16-IO export."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["x32", "two"], ["y"]),
        ],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.array(2.0, np.float32), name="two")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_fp16_inputs_fixed_batch_and_fixed_shapes(tmp_path: Path) -> None:
    _fixed_graph(tmp_path / "fixed.onnx")
    session = SessionCache().get(tmp_path / "fixed.onnx", [CPU], RuntimeOptions(intra_op_threads=1))
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    y = session.run({"x": x})["y"]  # cast to float16 and run one row at a time
    np.testing.assert_array_equal(y, 2 * x)
    with pytest.raises(BundleError, match=r"fixed\.onnx: input 'x' was exported with fixed shape \[1, 4\]"):
        session.run({"x": np.zeros((1, 5), np.float32)})


def test_a_model_with_external_weights_gets_no_saved_graph(tmp_path: Path) -> None:
    """A saved optimized graph would carry the weights of NAME.onnx.data / NAME.onnx_data inline, and
    a change of only that file would go unnoticed: such models are optimized at every load instead.
    Another model beside it (text_encoder_1...) does not count as its weights."""
    from snapgen_app.runtime import sessions

    options = RuntimeOptions(optimized_cache=str(tmp_path / "cache"))
    cpu = ["CPUExecutionProvider"]
    unet = tmp_path / "unet.fp32.onnx"
    unet.write_bytes(b"graph")
    encoder = tmp_path / "text_encoder.int8.onnx"
    encoder.write_bytes(b"graph")
    (tmp_path / "text_encoder_1.int8.onnx").write_bytes(b"another encoder")
    assert sessions._optimized_path(unet, cpu, options) is not None
    assert sessions._optimized_path(encoder, cpu, options) is not None
    for companion in ("unet.fp32.onnx.data", "unet.fp32.onnx_data"):
        (tmp_path / companion).write_bytes(b"weights")
        assert sessions._optimized_path(unet, cpu, options) is None
        (tmp_path / companion).unlink()
