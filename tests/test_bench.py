"""The benchmark's pieces that need no full-size model: calibration sizing, failure reporting,
targets. The full run (`snapgen bench`) builds SDXL/SD1.5-size graphs and is not a unit test."""

from __future__ import annotations

from snapgen_app.model import bench


def test_calibration_size_halves_until_attention_scores_fit() -> None:
    # SD1.5 attends at full latent resolution: 1.07 GB of scores per layer at 512 px, 0.07 GB at 256.
    assert bench.attention_score_gb("sd15", 512) > 1.0
    assert bench.calibration_px("sd15", 512, budget_gb=0.25) == 256
    assert bench.calibration_px("sd15", 512, budget_gb=0.01) == 128
    # snapgen-t2i attends only at 1/4 of the latent: 512 px calibration stays at 512 px.
    assert bench.calibration_px("snapgen-t2i", 512, budget_gb=0.25) == 512
    assert bench.calibration_px("sdxl", 512, budget_gb=0.25) == 512


def test_a_failing_job_returns_its_error_instead_of_raising(tmp_path) -> None:
    logged: list[str] = []
    result = bench.run_job(
        "time_onnx", logged.append, path=str(tmp_path / "missing.onnx"), inputs={}, runs=1, warmup=0
    )
    assert "error" in result and result["returncode"] != 0
    assert result["error"]  # the job's last stderr lines, e.g. ONNX Runtime's NO_SUCHFILE
    assert any("failed" in line for line in logged)


def _row(arch: str, px: int, runtime: str, precision: str, median_s: float, pct: float | None = None) -> dict:
    row = {"arch": arch, "px": px, "runtime": runtime, "precision": precision, "median_s": median_s}
    if pct is not None:
        row["pct_of_peak"] = pct
    return row


def test_targets_compare_rows_of_the_same_runtime_and_precision() -> None:
    report = {
        "unet": [
            _row("snapgen-t2i", 1024, "onnxruntime", "fp32", 4.0, 70.0),
            _row("snapgen-t2i", 1024, "onnxruntime", "int8", 2.0, 45.0),
            _row("snapgen-t2i", 1024, "torch-eager", "fp32", 6.0),
            _row("sdxl", 1024, "torch-eager", "fp32", 48.0),
            {"arch": "sd15", "px": 1024, "runtime": "onnxruntime", "precision": "int8", "error": "killed"},
        ],
        "decoder": [
            {"decoder": "tiny", "px": 1024, "precision": "fp32", "median_s": 1.0},
            {"decoder": "sd3", "px": 1024, "precision": "fp32", "median_s": 20.0},
        ],
        "quality": {"psnr_db_min": 29.0},
        "e2e": {"median_s": 9.0, "steps": 4, "px": 1024},
    }
    targets = {t["target"]: t for t in bench.evaluate_targets(report)}
    assert targets["int8 vs fp32 speed-up, snapgen-t2i UNet 1024px"]["passed"] is True
    assert targets["int8 vs fp32 PSNR on a trained model's trajectories"]["passed"] is False
    sdxl = targets["SDXL / snapgen-t2i per-step latency 1024px (torch-eager fp32)"]
    assert sdxl["value"] == 8.0 and sdxl["passed"] is True
    assert targets["SD3 decoder / tiny decoder 1024px (fp32)"]["passed"] is False
    assert targets["snapgen-t2i 1024px int8: % of int8 MatMul peak"]["passed"] is False
    assert targets["snapgen-t2i 1024px fp32: % of fp32 MatMul peak"]["passed"] is None  # reported only
    assert targets["end to end 4-step 1024px image, snapgen-t2i int8"]["passed"] is True


def test_pct_of_peak_uses_the_peak_measured_beside_the_runs() -> None:
    peaks = {"int8": {"gflops": 1000.0}}
    res = {"median_s": 2.0, "runs": 3, "peak_rss_gb": 1.0}
    count = {"params_m": 1.0, "gflop": 800.0}
    separate = bench._unet_row("snapgen-t2i", 1024, "onnxruntime", "int8", count, res, peaks)
    assert separate["pct_of_peak"] == 40.0 and separate["peak_interleaved"] is False
    beside = bench._unet_row(
        "snapgen-t2i", 1024, "onnxruntime", "int8", count, {**res, "peak_gflops": 800.0}, peaks
    )
    assert beside["pct_of_peak"] == 50.0 and beside["peak_interleaved"] is True
    assert "beside" in bench.render_table({"unet": [beside], "decoder": [], "targets": []})


def test_time_onnx_measures_the_peak_in_the_same_process(tmp_path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    res = bench.job_time_onnx(
        str(path), {"x": [[4], "float32", None]}, runs=2, warmup=0, peak_precision="fp32"
    )
    assert res["runs"] == 2 and len(res["times"]) == 2
    assert res["peak_gflops"] > 1.0  # a 2048^3 fp32 MatMul on any CPU this runs on
    assert "peak_gflops" not in bench.job_time_onnx(
        str(path), {"x": [[4], "float32", None]}, runs=1, warmup=0
    )


def test_latency_ratio_targets_say_what_bounds_them() -> None:
    snap = {**_row("snapgen-t2i", 1024, "torch-eager", "fp32", 6.0), "gflop": 1300.0, "gflops": 216.7}
    sdxl = {**_row("sdxl", 1024, "torch-eager", "fp32", 30.0), "gflop": 6500.0, "gflops": 216.7}
    targets = bench.evaluate_targets({"unet": [snap, sdxl], "decoder": []})
    sdxl_target = next(t for t in targets if t["target"].startswith("SDXL"))
    assert sdxl_target["passed"] is False and "GFLOP ratio 5.00x" in sdxl_target["detail"]
    assert "GFLOP ratio 5.00x" in bench.render_table({"unet": [], "decoder": [], "targets": targets})
