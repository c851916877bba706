"""The raw GEMM limit the benchmark sets every variant against (benchmarks/moe_layer.py): its
structure only; its numbers are measured by ``nox -s bench``, never asserted."""

import pytest

from benchmarks.moe_layer import GEMM_SHAPES, expert_flops, layer_rows, measure_gemm_limit


def test_gemm_limit_is_the_best_shape_measured():
    limit = measure_gemm_limit("fp32", tokens=64, warmup=0, steps=1)
    assert set(limit["shapes"]) == set(GEMM_SHAPES) and limit["threads"] == 1
    best = max(limit["shapes"].values(), key=lambda shape: shape["gflops"])
    assert limit["gflops"] == best["gflops"] == limit["shapes"][limit["best_shape"]]["gflops"] > 0
    gate_up = limit["shapes"]["routed_gate_up"]
    assert (gate_up["m"], gate_up["k"], gate_up["n"]) == (128, 512, 2048)  # 64 tokens x top-2 routed rows


def test_every_layer_row_is_a_fraction_of_its_dtypes_limit():
    def result(step_s):
        return {"step_s": [step_s] * 3, "step_cpu_s": [step_s] * 3, "peak_live_bytes": 10, "saved_bytes_sum": 5}

    results = {(variant, dtype): result(seconds) for dtype in ("fp32", "bf16")
               for variant, seconds in (("autoep", 2.0), ("transformers", 4.0), ("dense_ceiling", 1.0))}
    limits = {"fp32": {"gflops": 100.0}, "bf16": {"gflops": 400.0}}
    rows = layer_rows(results, tokens=1024, limits=limits)
    for row in rows:
        gflops = expert_flops(1024 * 2) / row["step_s_median"] / 1e9
        assert row["gflops"] == pytest.approx(gflops)
        assert row["fraction_of_gemm_limit"] == pytest.approx(gflops / limits[row["dtype"]]["gflops"])
