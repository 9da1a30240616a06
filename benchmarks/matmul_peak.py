"""Print the ONNX Runtime MatMul peaks (2048^3, 2 threads) in fp32 and int8 QDQ (u8 x s8 per-channel)."""

from __future__ import annotations

from snapgen_app.model.bench import job_peak

if __name__ == "__main__":
    for precision in ("fp32", "int8"):
        result = job_peak(precision, n=2048, runs=7)
        print(
            f"{precision}: {result['gflops']:.0f} GFLOP/s (median of {result['runs']} runs, {result['median_s'] * 1e3:.1f} ms)"
        )
