"""service.generate on tiny real bundles: reproducibility, batches, progress, cancel, preview, PNG
metadata, and one clear error for each bad input with nothing written."""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from test_runtime_fixtures import build_bundle, copy_bundle

from snapgen_app import service
from snapgen_app.api import GenerationRequest, StepEvent
from snapgen_app.errors import (
    BundleError,
    Cancelled,
    ConfigError,
    ModelNotFoundError,
    ProviderError,
    SnapGenError,
    UsageError,
)
from snapgen_app.pipeline.png import parse_a1111_parameters, read_png_metadata, read_png_text
from snapgen_app.progress import CancelToken, Event
from snapgen_app.runtime.providers import CPU, PROVIDER_BY_DEVICE, available_providers


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("bundles") / "tiny", precisions=("fp32", "int8"))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAPGEN_HOME", str(tmp_path / "home"))


def _request(bundle: Path, out: Path, **fields: object) -> GenerationRequest:
    values: dict[str, object] = {
        "prompt": "a red apple on a blue background",
        "model": str(bundle),
        "seed": 7,
    }
    values.update(fields)
    if "output_paths" not in values:
        values["output_dir"] = str(out)
    return GenerationRequest(**values)  # type: ignore[arg-type]


def _pixels(path: str | Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# -- reproducibility ------------------------------------------------------------------------------


def _optimized_graphs() -> list[Path]:
    return sorted((Path(os.environ["SNAPGEN_HOME"]) / "cache" / "onnxruntime").glob("*.onnx"))


def test_same_seed_gives_byte_identical_png(bundle: Path, tmp_path: Path) -> None:
    service.clear_cache()
    first = service.generate(_request(bundle, tmp_path, output_paths=(str(tmp_path / "a.png"),)))
    # The first sessions saved their optimized graphs; fresh sessions load those (another process
    # would too) and must give the same bytes.
    assert len(_optimized_graphs()) == 3  # text encoder, UNet, decoder
    service.clear_cache()
    second = service.generate(_request(bundle, tmp_path, output_paths=(str(tmp_path / "b" / "b.png"),)))
    other = service.generate(_request(bundle, tmp_path, seed=8, output_paths=(str(tmp_path / "c.png"),)))
    a, b = Path(first.images[0]).read_bytes(), Path(second.images[0]).read_bytes()
    assert a == b
    assert _pixels(first.images[0]).std() > 1.0, "the image must not be blank"
    assert not np.array_equal(_pixels(first.images[0]), _pixels(other.images[0])), (
        "another seed, another image"
    )
    assert first.seeds == (7,) and first.images[0] == str(tmp_path / "a.png")


def test_a_damaged_or_unwritable_graph_cache_changes_nothing(bundle: Path, tmp_path: Path) -> None:
    service.clear_cache()
    first = service.generate(_request(bundle, tmp_path, output_paths=(str(tmp_path / "a.png"),)))
    graphs = _optimized_graphs()
    for graph in graphs:
        graph.write_bytes(b"half a graph")  # as a full disk or a crash might leave it
    service.clear_cache()
    rebuilt = service.generate(_request(bundle, tmp_path, output_paths=(str(tmp_path / "b.png"),)))
    assert Path(rebuilt.images[0]).read_bytes() == Path(first.images[0]).read_bytes()
    assert _optimized_graphs() == graphs and all(g.stat().st_size > 1000 for g in graphs)  # written again
    # A cache folder that cannot be made (a file in its way): the sessions optimize in memory.
    cache = Path(os.environ["SNAPGEN_HOME"]) / "cache"
    for graph in graphs:
        graph.unlink()
    (cache / "onnxruntime").rmdir()
    (cache / "onnxruntime").write_text("not a folder")
    service.clear_cache()
    plain = service.generate(_request(bundle, tmp_path, output_paths=(str(tmp_path / "c.png"),)))
    assert Path(plain.images[0]).read_bytes() == Path(first.images[0]).read_bytes()
    assert not list(cache.glob("*.partial")) and not list(cache.rglob("*.partial"))


def test_the_graph_cache_keeps_the_recently_used_graphs_under_its_cap(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from snapgen_app.runtime import sessions

    cache = Path(os.environ["SNAPGEN_HOME"]) / "cache" / "onnxruntime"
    cache.mkdir(parents=True)
    stale = cache / "unet.int8-0123456789abcdef.onnx"
    stale.write_bytes(b"x" * 4096)
    os.utime(stale, (1_000_000, 1_000_000))  # long unused
    left = cache / "unet.int8-0123456789abcdef.onnx.4242-1.partial"  # a process killed while saving
    left.write_bytes(b"x" * 4096)
    os.utime(left, (1_000_000, 1_000_000))
    fresh = cache / "decoder.int8-0123456789abcdef.onnx.4243-1.partial"  # one saving right now
    fresh.write_bytes(b"x" * 4096)
    service.clear_cache()
    service.generate(_request(bundle, tmp_path))
    assert stale.exists()  # under the cap: nothing pruned
    assert not left.exists() and fresh.exists()  # an old half-saved graph is removed
    graphs = _optimized_graphs()
    monkeypatch.setattr(sessions, "OPTIMIZED_CACHE_BYTES", sum(g.stat().st_size for g in graphs) - 1)
    for graph in graphs:
        if graph != stale:
            graph.unlink()  # written again by the next load, which prunes
    service.clear_cache()
    service.generate(_request(bundle, tmp_path / "again"))
    assert not stale.exists() and len(_optimized_graphs()) == 3


def test_batch_of_n_equals_n_single_runs(bundle: Path, tmp_path: Path) -> None:
    batch = service.generate(_request(bundle, tmp_path / "batch", seed=100, num_images=3))
    assert batch.seeds == (100, 101, 102) and len(batch.images) == 3
    for seed, path in zip(batch.seeds, batch.images, strict=True):
        single = service.generate(_request(bundle, tmp_path / f"single{seed}", seed=seed))
        np.testing.assert_array_equal(_pixels(path), _pixels(single.images[0]))
    assert not np.array_equal(_pixels(batch.images[0]), _pixels(batch.images[1]))


def test_random_seed_is_recorded_and_reproduces(bundle: Path, tmp_path: Path) -> None:
    result = service.generate(_request(bundle, tmp_path / "r", seed=None))
    assert result.request.seed == result.seeds[0]
    again = service.generate(_request(bundle, tmp_path / "r2", seed=result.seeds[0]))
    np.testing.assert_array_equal(_pixels(result.images[0]), _pixels(again.images[0]))


# -- progress, preview, cancel ----------------------------------------------------------------------


def test_progress_events_one_per_step(bundle: Path, tmp_path: Path) -> None:
    events: list[Event] = []
    result = service.generate(_request(bundle, tmp_path, steps=5), on_event=events.append)
    kinds = [e.kind for e in events]
    assert kinds == ["started"] + ["progress"] * 5 + ["finished"]
    steps = [StepEvent.from_event(e) for e in events if e.kind == "progress"]
    assert [s.step for s in steps] == [1, 2, 3, 4, 5] and {s.total for s in steps} == {5}
    assert steps[0].t == 1.0 and all(a.t > b.t for a, b in itertools.pairwise(steps))
    assert all(s.preview is None for s in steps)
    assert events[-1].data["images"] == list(result.images)
    assert set(result.timings) >= {
        "load",
        "text_encoder",
        "unet",
        "unet_per_step",
        "decoder",
        "write",
        "total",
    }


def test_preview_is_a_small_uint8_image_close_to_the_result(bundle: Path, tmp_path: Path) -> None:
    events: list[Event] = []
    result = service.generate(
        _request(bundle, tmp_path, width=64, height=32, preview=True), on_event=events.append
    )
    previews = [StepEvent.from_event(e).preview for e in events if e.kind == "progress"]
    assert len(previews) == 4
    for preview in previews:
        assert preview is not None and preview.dtype == np.uint8
        assert preview.shape == (128, 256, 3)  # latent 4x8, upscaled x32 to a 256 px long side
    # the last x0 estimate, projected linearly, should look like the decoded image
    final = _pixels(result.images[0]).astype(np.float64)
    coarse = final.reshape(4, 8, 8, 8, 3).mean(axis=(1, 3))
    last_preview = previews[-1]
    assert last_preview is not None
    last = last_preview[::32, ::32].astype(np.float64)
    correlation = np.corrcoef(coarse.ravel(), last.ravel())[0, 1]
    assert correlation > 0.8, correlation


def test_cancel_stops_within_one_step_and_writes_nothing(bundle: Path, tmp_path: Path) -> None:
    token = CancelToken()
    events: list[Event] = []

    def on_event(event: Event) -> None:
        events.append(event)
        if event.kind == "progress" and event.step == 2:
            token.cancel()

    out = tmp_path / "cancelled"
    with pytest.raises(Cancelled):
        service.generate(_request(bundle, out, steps=10, num_images=2), on_event=on_event, cancel=token)
    assert [e.step for e in events if e.kind == "progress"] == [1, 2]
    assert events[-1].kind == "cancelled"
    assert _files(out) == []


def test_cancel_before_start_runs_no_step(bundle: Path, tmp_path: Path) -> None:
    token = CancelToken()
    token.cancel()
    events: list[Event] = []
    with pytest.raises(Cancelled):
        service.generate(_request(bundle, tmp_path / "x"), on_event=events.append, cancel=token)
    assert not [e for e in events if e.kind == "progress"]
    assert _files(tmp_path / "x") == []


def test_cancel_while_a_model_is_first_loaded_builds_no_session(tmp_path: Path) -> None:
    """The first load hashes every file (seconds for a large model): a cancel there stops it
    before any ONNX Runtime session is built, and the next request loads it in full."""
    root = build_bundle(tmp_path / "fresh", precisions=("int8",))
    token = CancelToken()
    hashed: list[str] = []

    def cancel_while_hashing(done: int, total: int, path: str) -> None:
        hashed.append(path)
        token.cancel()  # the user presses Cancel while the files are being checked

    from model_store import bundle as store_bundle

    real_verify = store_bundle.verify_or_raise

    def verify_with_progress(*args: Any, **kwargs: Any) -> Any:
        return real_verify(*args, progress=cancel_while_hashing, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(store_bundle, "verify_or_raise", verify_with_progress)
        with pytest.raises(Cancelled):
            service.generate(_request(root, tmp_path / "x"), cancel=token)
    assert hashed  # it was hashing when the cancel came
    assert not any(key[0] == str(root) for key in service._PIPELINES)
    assert _files(tmp_path / "x") == []
    assert service.generate(_request(root, tmp_path / "y")).images


# -- PNG metadata -----------------------------------------------------------------------------------


def test_png_metadata_round_trips(bundle: Path, tmp_path: Path) -> None:
    result = service.generate(_request(bundle, tmp_path, seed=41, num_images=2, steps=3, shift=2.0))
    text = read_png_text(result.images[1])
    assert text["prompt"] == "a red apple on a blue background"
    assert text["seed"] == "42" and text["steps"] == "3" and text["size"] == "32x32"
    assert text["model"] == "tiny-test" and text["precision"] == result.precision == "int8"
    assert text["bundle_hash"] == result.bundle_hash and len(result.bundle_hash) == 64
    assert text["provider"] == result.provider and text["version"]
    assert text["parameters"].splitlines() == [
        "a red apple on a blue background",
        f"Steps: 3, Sampler: Euler flow, CFG scale: 1.0, Seed: 42, Size: 32x32, Model hash: {result.bundle_hash[:10]}, "
        f"Model: tiny-test, Shift: 2.0, Precision: int8, Provider: {result.provider}, Version: snapgen-studio {text['version']}",
    ]
    restored = read_png_metadata(result.images[1])
    assert restored == result.request.replace(seed=42, num_images=1, output_dir=None, output_paths=())
    # the restored request reproduces exactly that image
    again = service.generate(restored.replace(output_paths=(str(tmp_path / "again.png"),)))
    np.testing.assert_array_equal(_pixels(again.images[0]), _pixels(result.images[1]))
    # the A1111 chunk alone is enough for other tools' images
    from_parameters = parse_a1111_parameters(text["parameters"])
    assert (from_parameters.prompt, from_parameters.steps, from_parameters.seed) == (restored.prompt, 3, 42)
    assert (from_parameters.width, from_parameters.height, from_parameters.shift) == (32, 32, 2.0)


def test_unicode_and_punctuation_in_prompts_survive(bundle: Path, tmp_path: Path) -> None:
    prompt = 'ein Äpfel 🍎, "quoted": yes\nsecond line'
    result = service.generate(_request(bundle, tmp_path, prompt=prompt))
    assert read_png_metadata(result.images[0]).prompt == prompt
    assert read_png_text(result.images[0])["prompt"] == prompt


def test_reading_metadata_of_a_plain_png_is_a_clear_error(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    with pytest.raises(UsageError, match="no generation settings"):
        read_png_metadata(tmp_path / "plain.png")
    (tmp_path / "not.png").write_text("hello")
    with pytest.raises(UsageError, match="cannot read"):
        read_png_metadata(tmp_path / "not.png")
    # another tool's parameters chunk with values that are not numbers: a UsageError, not a crash
    for bad in ("Steps: 20.5, Seed: 1", "Steps: 20, Seed: -", "Steps: 20, Size: autoxauto"):
        with pytest.raises(UsageError, match="bad value"):
            parse_a1111_parameters("a cat\n" + bad)


# -- model variants ---------------------------------------------------------------------------------


def test_precision_auto_picks_int8_on_cpu_and_explicit_precision_is_honoured(
    bundle: Path, tmp_path: Path
) -> None:
    assert service.generate(_request(bundle, tmp_path / "a")).precision == "int8"
    assert service.generate(_request(bundle, tmp_path / "b", precision="fp32")).precision == "fp32"
    with pytest.raises(ConfigError, match="fp16"):
        service.generate(_request(bundle, tmp_path / "c", precision="fp16"))


def test_precision_auto_follows_a_gpu_provider_that_falls_back_to_the_cpu(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """onnxruntime-gpu installed on a machine whose GPU cannot run it: the build lists CUDA, the
    session falls back to the CPU. "auto" first picks the GPU's variant (fp32 here), then the CPU's
    (int8), as on a plain CPU build."""
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", CPU])
    with caplog.at_level("WARNING", logger="snapgen_app.service"):
        result = service.generate(_request(bundle, tmp_path / "a"))
    assert (result.precision, result.provider) == ("int8", CPU)
    assert not any(key[2][0] == "CUDAExecutionProvider" for key in service._PIPELINES), "not kept loaded"
    assert (
        "CUDAExecutionProvider fell back to the CPU: running the int8 variant instead of fp32" in caplog.text
    )
    assert read_png_text(result.images[0])["precision"] == "int8"


def test_guidance_above_one_uses_the_empty_prompt(bundle: Path, tmp_path: Path) -> None:
    plain = service.generate(_request(bundle, tmp_path / "a", guidance_scale=1.0))
    guided = service.generate(_request(bundle, tmp_path / "b", guidance_scale=3.0))
    assert not np.array_equal(_pixels(plain.images[0]), _pixels(guided.images[0]))
    batch = service.generate(_request(bundle, tmp_path / "c", guidance_scale=3.0, num_images=2))
    np.testing.assert_array_equal(_pixels(batch.images[0]), _pixels(guided.images[0]))


def test_unet_without_pooled_input_and_manifest_without_block_channels(tmp_path: Path) -> None:
    root = build_bundle(tmp_path / "plain", with_pooled=False, unet_config={})
    result = service.generate(_request(root, tmp_path / "out", width=40, height=24))  # stride falls back to 8
    assert _pixels(result.images[0]).shape == (24, 40, 3)


# -- bad inputs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [("shift", float("inf")), ("shift", float("nan")), ("shift", 0.0), ("shift", 1e-17), ("shift", 1e3),
     ("guidance_scale", float("inf")), ("guidance_scale", 1e39), ("guidance_scale", -1.0)],
)  # fmt: skip
def test_shift_and_guidance_that_give_no_image_are_refused(field: str, value: float) -> None:
    """Values the sampler would turn into inf/NaN pixels (reported as a model fault): bad usage."""
    with pytest.raises(ConfigError, match=f"{field}: .* is out of range"):
        GenerationRequest(prompt="a cat", **{field: value})


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_empty_prompt_is_refused(prompt: str) -> None:
    with pytest.raises(ConfigError, match="prompt: is empty"):
        GenerationRequest(prompt=prompt)


def test_over_long_prompt_is_truncated_with_a_warning(bundle: Path, tmp_path: Path) -> None:
    events: list[Event] = []
    result = service.generate(
        _request(bundle, tmp_path, prompt=" ".join(["red apple"] * 30)), on_event=events.append
    )
    assert any("truncated" in w for w in result.warnings)
    assert any(e.kind == "log" and "truncated" in e.message for e in events)
    assert len(result.images) == 1
    short = service.generate(_request(bundle, tmp_path / "short"))
    assert short.warnings == ()


@pytest.mark.parametrize("steps", [0, 51])
def test_steps_out_of_range_are_refused(steps: int) -> None:
    with pytest.raises(ConfigError, match=r"steps: .* out of range; allowed: 1-50"):
        GenerationRequest(prompt="a dog", steps=steps)


def test_size_not_a_multiple_of_the_stride_is_refused(bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="width: 40 is not a multiple of 16") as info:
        service.generate(_request(bundle, tmp_path / "out", width=40))
    assert "use 32 or 48" in str(info.value)
    assert _files(tmp_path / "out") == []


def test_missing_file_names_the_file(bundle: Path, tmp_path: Path) -> None:
    broken = copy_bundle(bundle, tmp_path / "broken")
    (broken / "decoder.int8.onnx").unlink()
    (broken / "decoder.fp32.onnx").unlink()
    with pytest.raises(BundleError, match=r"decoder\.int8\.onnx: missing"):
        service.generate(_request(broken, tmp_path / "out"))
    with pytest.raises(BundleError, match=r"decoder\.fp32\.onnx: missing"):
        service.generate(_request(broken, tmp_path / "out", precision="fp32"))
    assert _files(tmp_path / "out") == []


def test_altered_file_is_refused_even_after_a_good_run(bundle: Path, tmp_path: Path) -> None:
    altered = copy_bundle(bundle, tmp_path / "altered")
    service.generate(_request(altered, tmp_path / "ok"))
    data = bytearray((altered / "unet.int8.onnx").read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    (altered / "unet.int8.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"unet\.int8\.onnx: mismatch \(sha256"):
        service.generate(_request(altered, tmp_path / "out"))
    assert _files(tmp_path / "out") == []


def test_onnx_file_that_is_not_a_model_is_a_clear_error(tmp_path: Path) -> None:
    root = build_bundle(tmp_path / "bad")
    # starts like an ONNX file (so the store's header check passes) but is no protobuf model
    (root / "unet.fp32.onnx").write_bytes(b"\x08\x08" + b"\xff" * 64)
    from model_store.bundle import read_manifest, write_manifest

    write_manifest(root, read_manifest(root))
    with pytest.raises(BundleError, match=r"unet\.fp32\.onnx is not a loadable ONNX model"):
        service.generate(_request(root, tmp_path / "out"))
    assert _files(tmp_path / "out") == []


def test_provider_not_installed_is_a_provider_error(bundle: Path, tmp_path: Path) -> None:
    missing = [d for d, p in PROVIDER_BY_DEVICE.items() if p not in available_providers()]
    if not missing:
        pytest.skip("every provider is installed here")
    with pytest.raises(ProviderError, match="does not have"):
        service.generate(_request(bundle, tmp_path / "out", device=missing[0]))
    assert _files(tmp_path / "out") == []


def test_unknown_model_and_non_bundle_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        service.generate(GenerationRequest(prompt="a dog", model="no-such-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match=r"no bundle\.json"):
        service.generate(GenerationRequest(prompt="a dog", model=str(tmp_path / "empty")))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_images", 0),
        ("seed", -1),
        ("precision", "int4"),
        ("device", "tpu"),
        ("threads", 0),
        ("shift", 0.0),
    ],
)
def test_bad_request_fields_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        GenerationRequest(prompt="a dog", **{field: value})  # type: ignore[arg-type]


def test_request_dict_round_trip_rejects_unknown_keys() -> None:
    request = GenerationRequest(prompt="a dog", steps=4, output_paths=("x.png",))
    assert GenerationRequest.from_dict(request.to_dict()) == request
    with pytest.raises(ConfigError, match="negative_prompt"):
        GenerationRequest.from_dict({**request.to_dict(), "negative_prompt": "x"})


def test_pipelines_are_cached_across_calls(bundle: Path, tmp_path: Path) -> None:
    service.clear_cache()
    first = service.generate(_request(bundle, tmp_path / "a"))
    second = service.generate(_request(bundle, tmp_path / "b"))
    assert first.timings["load"] > 0 and second.timings["load"] == 0.0
    assert service.generate(_request(bundle, tmp_path / "c", threads=1)).timings["load"] > 0, (
        "new options, new sessions"
    )


def test_null_condition_zeros_changes_only_guided_images(bundle: Path) -> None:
    from model_store.bundle import read_manifest
    from snapgen_app.pipeline.text_to_image import TextToImagePipeline

    manifest = read_manifest(bundle)
    settings = {"steps": 3, "width": 32, "height": 32, "shift": 3.0}
    runs = {}
    for mode in ("empty_prompt", "zeros"):
        pipe = TextToImagePipeline(bundle, manifest, "fp32", ["CPUExecutionProvider"], null_condition=mode)  # type: ignore[arg-type]
        runs[mode, 1.0] = pipe.generate("a dog", [3], guidance_scale=1.0, **settings).images
        runs[mode, 3.0] = pipe.generate("a dog", [3], guidance_scale=3.0, **settings).images
    np.testing.assert_array_equal(runs["empty_prompt", 1.0], runs["zeros", 1.0])
    assert not np.array_equal(runs["empty_prompt", 3.0], runs["zeros", 3.0])
    with pytest.raises(ConfigError, match="null_condition"):
        TextToImagePipeline(bundle, manifest, "fp32", ["CPUExecutionProvider"], null_condition="noise")  # type: ignore[arg-type]


def test_a_failed_write_leaves_no_image_and_no_temp_file(bundle: Path, tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.mkdir()
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    paths = (str(good / "one.png"), str(blocker / "two.png"))
    with pytest.raises(SnapGenError, match="cannot write"):
        service.generate(_request(bundle, tmp_path, num_images=2, output_paths=paths))
    assert _files(good) == []
