"""The shipped text encoder's word-embedding table: int8 rows, with the training vocabulary exact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from training_tools.recipes.ship import quantize_word_embeddings, training_vocabulary

NAME = "encoder.model.embeddings.word_embeddings.weight"


def _embedding_model(path: Path, table: np.ndarray) -> None:
    """ids [B, T] int64 -> Gather(table) [B, T, D], the shape of the exported text encoder's lookup."""
    graph = helper.make_graph(
        [helper.make_node("Gather", [NAME, "ids"], ["rows"], name="lookup", axis=0)],
        "lookup",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "T"])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["B", "T", table.shape[1]])],
        [numpy_helper.from_array(table, NAME)],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def _lookup(path: Path, ids: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["rows"], {"ids": ids})[0])


def test_exact_rows_come_out_bit_identical_and_the_rest_within_half_a_step(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    table = rng.normal(size=(50, 8)).astype(np.float32)
    src, out = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    _embedding_model(src, table)
    exact = [0, 3, 7, 49]
    quantize_word_embeddings(src, out, exact_rows=exact)

    ids = np.arange(50, dtype=np.int64).reshape(5, 10)
    got = _lookup(out, ids).reshape(50, 8)
    np.testing.assert_array_equal(got[exact], table[exact])
    others = [i for i in range(50) if i not in exact]
    step = np.abs(table[others]).max(axis=1, keepdims=True) / 127.0
    error = np.abs(got[others] - table[others])
    assert np.all(error <= step / 2 + 1e-7)
    assert np.any(error > 0)  # the other rows really are int8
    # int8 rows + per-row scales + the few exact rows: well under the fp32 table's size
    sizes = {i.name: numpy_helper.to_array(i).nbytes for i in onnx.load(str(out)).graph.initializer}
    assert sizes[NAME + "_int8"] == table.size
    assert sizes[NAME + "_exact"] == (len(exact) + 1) * 8 * 4


def test_without_exact_rows_every_row_is_int8(tmp_path: Path) -> None:
    table = np.random.default_rng(1).normal(size=(20, 4)).astype(np.float32)
    src, out = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    _embedding_model(src, table)
    quantize_word_embeddings(src, out)
    got = _lookup(out, np.arange(20, dtype=np.int64).reshape(1, 20))[0]
    assert np.all(np.abs(got - table).max(axis=1) > 0)


def test_training_vocabulary_is_every_token_of_the_captions(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, "a": 2, "red": 3, "apple": 4, "blue": 5, "dog": 6, "on": 7}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.enable_padding(length=6, pad_id=0, pad_token="[PAD]")
    tok.save(str(tmp_path / "tokenizer.json"))
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"file_name": "0.png", "text": "a red apple"}, {"file_name": "1.png", "text": "a red zebra"}]
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert training_vocabulary(data, tmp_path / "tokenizer.json") == [0, 1, 2, 3, 4]
