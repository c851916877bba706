"""The GPU path in one run: conformance on CUDA, grouped GEMM vs dense GEMM, the layer's
throughput and memory, and the device-to-host synchronisations of a step.

    python -m benchmarks.gpu [--out DIR] [--quick] [--budget-s S] [--all-cases]
    nox -s gpu [-- --quick]

Without a CUDA device it prints one line and exits 0. On CUDA it writes DIR/gpu-results.json
(default DIR: gpu-results) and prints a short table. Sections (each timed; one that would start
after --budget-s seconds is recorded as skipped, so the run fits a borrowed machine):

  conformance  (at most half of --budget-s) the one-process conformance cells (zero-none, w1-ep1) of one case per preset
               (every case with --all-cases), float32 and bf16, on ``cuda`` against the CPU
               reference (conformance/runner.py run_cell(device="cuda")); CUDA tolerances and the
               TF32-off rule in conformance/tolerances.py (CUDA_TOLERANCES, set_cuda_numerics).
  gemm         ``torch.nn.functional.grouped_mm`` bf16 against one dense ``mm`` of the same FLOPs
               (the rows of all experts times one expert's weight), for the gate_up and the down
               projection, at a Qwen3-30B-A3B-like and a Mixtral-8x7B-like shape (SHAPES; tokens
               evenly spread over the experts). CUDA events, warm-up, median of several repeats.
  layer        one MoE block (a one-layer Transformers model built on the GPU, random weights) after
               ``autoep.apply`` and, for comparison, the original Transformers block: forward +
               backward tokens/s, expert TFLOPS (FLOP_FORMULA) and their fraction of the device's
               dense bf16 peak (PEAK_BF16_TFLOPS by device name; "unknown" otherwise), peak memory
               (torch.cuda.max_memory_allocated over the measured steps, and above the resting state).
  syncs        device-to-host synchronisations in one forward + backward of the autoep layer, two
               ways: torch.cuda.set_sync_debug_mode("warn") (every synchronising CUDA call, inside
               torch ops too) and a wrapper around Tensor.tolist/item/__int__/__float__/__bool__/
               __index__ (the explicit host reads, with the line of autoep/ that made each).
  ep           autoep_size=2 over NCCL on 2 rank processes (autoep.launch, one GPU per rank): the
               layer's step time and the syncs per step on each rank. Needs 2 visible GPUs; with
               fewer it says so and is skipped.

Where the syncs come from, and the plan to remove them (the counts are measured by ``syncs``/``ep``):

- ``autoep_size == 1`` with grouped_mm: the dispatch computes the per-expert counts with
  ``searchsorted`` on the device and grouped_mm takes the offsets as a device tensor, so autoep's own
  code reads nothing back; what ``syncs`` still counts there comes from inside torch ops.
- ``autoep_size > 1``, per layer forward, in autoep/dispatch.py ``_dispatch``: (1)
  ``send_splits ... .tolist()`` and (2) ``receive_splits ... .tolist()`` (all_to_all_single takes its
  split sizes as Python lists), (3) ``int(counts_ES.sum())`` (the output size of the expert-major
  permutation). The backward reuses the lists: no sync.
- the "eager" experts implementation (a per-expert loop, also grouped_mm's fallback for unaligned
  widths) reads ``counts_E.tolist()`` once per step (autoep/experts.py ``_ExpertsMLP.forward``; its
  backward reuses the list).

Plan: (a) one read instead of three: stack the send counts and the received counts into one int64
tensor, copy it to pinned host memory with ``non_blocking=True`` and an event, and take the total
from the received list in Python (no ``int(tensor)``); (b) hide the remaining read: start the count
exchange right after routing (``async_op=True``) and run the shared experts (and the router's aux
statistics) before waiting on the event, so the host waits for a copy that has already landed; (c)
remove it: a dropless exchange with device-side split sizes (``torch.ops.symm_mem.all_to_all_vdev``
over NVSHMEM symmetric memory, which takes the splits as a device tensor) or a capacity-bounded
exchange (fixed-size buffers of T*K rows per peer, the counts carried in the payload) whose sizes are
known on the host in advance; the expert-major permutation then gets its size from the same bound
(``output_size`` = capacity) instead of ``int()``. (d) the eager loop keeps its read (it needs Python
slice bounds) and is only used where grouped_mm cannot run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

from benchmarks.blocks import FLOP_FORMULA, block_of, block_step, build_block_model, expert_flops, layer_inputs

# Dense bf16 peak (TFLOPS, no sparsity) from the vendors' datasheets, matched by substring of
# torch.cuda.get_device_name() in this order (the more specific names first).
PEAK_BF16_TFLOPS = (
    ("H200", 989.0), ("GH200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
    ("H800", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0),
)
# (family, H, I, E, top-k, tokens): the shapes of the issue.
SHAPES = {
    "qwen3_30b_a3b": dict(family="qwen3_moe", hidden=2048, intermediate=768, experts=128, top_k=8, tokens=16384),
    "mixtral_8x7b": dict(family="mixtral", hidden=4096, intermediate=14336, experts=8, top_k=2, tokens=16384),
}
FULL = dict(warmup=3, repeats=10, tokens_scale=1)
QUICK = dict(warmup=1, repeats=3, tokens_scale=4)  # a quarter of the tokens
CONFORMANCE_SHARE = 0.5  # of --budget-s: cells left when it is spent are recorded "skipped"
HOST_READS = ("tolist", "item", "__int__", "__float__", "__bool__", "__index__")


def peak_bf16_tflops(device_name: str) -> float | None:
    """The device's dense bf16 peak, or None ("unknown") for a device not in the table."""
    return next((peak for name, peak in PEAK_BF16_TFLOPS if name in device_name), None)


def no_cuda_line() -> str:
    return (f"benchmarks.gpu: no CUDA device visible (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda}); nothing to run. On a CUDA machine: python -m benchmarks.gpu [--out DIR] [--quick]")


# ----------------------------------------------------------------------------- timing


def timed(fn, device: str, warmup: int, repeats: int) -> list[float]:
    """Milliseconds of each of ``repeats`` calls of ``fn`` after ``warmup`` calls: CUDA events on
    CUDA (the GPU's own time), perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            times.append((time.perf_counter() - began) * 1e3)
    return times


def tflops(flop: float, ms: float) -> float:
    return flop / (ms * 1e-3) / 1e12


# ----------------------------------------------------------------------------- gemm


def gemm_comparison(shape: dict, device: str, warmup: int, repeats: int, tokens: int | None = None) -> list[dict]:
    """grouped_mm over all experts vs one dense mm with the same FLOPs, for gate_up and down, bf16."""
    import torch.nn.functional as F

    hidden, inter, experts = shape["hidden"], shape["intermediate"], shape["experts"]
    rows = (tokens or shape["tokens"]) * shape["top_k"]
    rows -= rows % experts  # evenly spread: rows / E per expert
    generator = torch.Generator(device=device).manual_seed(0)
    offsets_E = (torch.arange(1, experts + 1, device=device) * (rows // experts)).to(torch.int32)
    results = []
    for name, (inp, out) in (("gate_up", (hidden, 2 * inter)), ("down", (inter, hidden))):
        x_RK = torch.randn(rows, inp, device=device, generator=generator, dtype=torch.bfloat16)
        w_EOK = torch.randn(experts, out, inp, device=device, generator=generator, dtype=torch.bfloat16)
        flop = 2.0 * rows * inp * out
        grouped = timed(lambda: F.grouped_mm(x_RK, w_EOK.transpose(-2, -1), offs=offsets_E), device, warmup, repeats)
        dense = timed(lambda: F.linear(x_RK, w_EOK[0]), device, warmup, repeats)
        g_ms, d_ms = statistics.median(grouped), statistics.median(dense)
        results.append({"projection": name, "rows": rows, "in": inp, "out": out, "experts": experts,
                        "flop": flop, "grouped_mm_ms": g_ms, "dense_mm_ms": d_ms,
                        "grouped_mm_tflops": tflops(flop, g_ms), "dense_mm_tflops": tflops(flop, d_ms),
                        "grouped_over_dense": d_ms / g_ms})
        del x_RK, w_EOK
    return results


# ----------------------------------------------------------------------------- layer


def measure_block(block, x_BTH, upstream_BTH, shape: dict, device: str, warmup: int, repeats: int,
                  peak: float | None) -> dict:
    tokens = x_BTH.shape[1]
    step = lambda: block_step(block, x_BTH, upstream_BTH)  # noqa: E731
    for _ in range(warmup):
        step()
    resting = peak_memory = None
    if device == "cuda":
        torch.cuda.synchronize()
        resting = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = timed(step, device, 0, repeats)
    if device == "cuda":
        peak_memory = torch.cuda.max_memory_allocated()
    ms = statistics.median(times)
    flop = expert_flops(shape, tokens)
    achieved = tflops(flop, ms)
    return {"tokens": tokens, "step_ms": ms, "step_ms_all": times, "tokens_per_s": tokens / (ms * 1e-3),
            "expert_tflops": achieved, "fraction_of_peak": None if peak is None else achieved / peak,
            "peak_memory_bytes": peak_memory,
            "peak_above_resting_bytes": None if peak_memory is None else peak_memory - resting}


def layer_throughput(shape: dict, device: str, warmup: int, repeats: int, tokens: int | None = None,
                     peak: float | None = None) -> dict:
    """The original Transformers block, then the same model after ``autoep.apply`` (the same
    weights: at autoep_size 1 the layer keeps the block's parameters), bf16."""
    import autoep

    tokens = tokens or shape["tokens"]
    model = build_block_model(shape, torch.bfloat16, device)
    x_BTH, upstream_BTH = layer_inputs(shape, tokens, torch.bfloat16, device)
    results = {"transformers": measure_block(block_of(model), x_BTH, upstream_BTH, shape, device, warmup, repeats,
                                             peak)}
    results["transformers"]["experts_implementation"] = getattr(model.config, "_experts_implementation", None)
    autoep.apply(model, {"autoep_size": 1})
    results["autoep"] = measure_block(block_of(model), x_BTH, upstream_BTH, shape, device, warmup, repeats, peak)
    results["autoep"]["kernel"] = block_of(model).routed_experts().last_path
    results["autoep_over_transformers"] = results["transformers"]["step_ms"] / results["autoep"]["step_ms"]
    return results


# ----------------------------------------------------------------------------- syncs


def _autoep_frame() -> str:
    """The innermost caller in autoep/ (else the innermost outside torch and this module)."""
    import traceback as tb

    frames = tb.extract_stack()[:-2]  # without this function and the counting wrapper
    here = os.path.abspath(__file__)
    for frame in reversed(frames):
        if f"{os.sep}autoep{os.sep}" in frame.filename:
            return f"{_short(frame.filename)}:{frame.lineno} {frame.name}"
    for frame in reversed(frames):
        if os.path.abspath(frame.filename) != here and f"{os.sep}torch{os.sep}" not in frame.filename:
            return f"{_short(frame.filename)}:{frame.lineno} {frame.name}"
    return "unknown"


def _short(path: str) -> str:
    parts = Path(path).parts
    for anchor in ("autoep", "transformers", "torch", "benchmarks", "conformance"):
        if anchor in parts:
            return "/".join(parts[len(parts) - 1 - parts[::-1].index(anchor):])
    return Path(path).name


@contextlib.contextmanager
def host_reads(device: str):
    """Count the explicit reads of a ``device`` tensor's values into Python (HOST_READS), by the
    autoep line that made them: yields a dict location -> count. On CUDA each is a sync."""
    counts: dict[str, int] = {}
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    own = {name for name in HOST_READS if name in vars(torch.Tensor)}  # the rest are inherited from C

    def wrap(name, original):
        def counting(self, *args, **kwargs):
            if self.device.type == device:
                where = f"Tensor.{name}() at {_autoep_frame()}"
                counts[where] = counts.get(where, 0) + 1
            return original(self, *args, **kwargs)
        return counting

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            if name in own:
                setattr(torch.Tensor, name, original)
            else:
                delattr(torch.Tensor, name)


@contextlib.contextmanager
def cuda_syncs():
    """Every synchronising CUDA call (torch.cuda.set_sync_debug_mode("warn")), by the Python line that
    made it: yields a dict location -> count (empty off CUDA)."""
    counts: dict[str, int] = {}
    if not torch.cuda.is_available():
        yield counts
        return
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield counts
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    for warning in caught:
        if "synchroniz" in str(warning.message).lower():
            where = f"{_short(warning.filename)}:{warning.lineno}"
            counts[where] = counts.get(where, 0) + 1


def step_syncs(block, x_BTH, upstream_BTH, device: str) -> dict:
    """Device-to-host synchronisations of one forward + backward of ``block`` (after a warm-up step)."""
    block_step(block, x_BTH, upstream_BTH)
    if device == "cuda":
        torch.cuda.synchronize()
    with cuda_syncs() as syncs, host_reads(device) as reads:
        block_step(block, x_BTH, upstream_BTH)
    return {"cuda_syncs": sum(syncs.values()), "cuda_sync_sites": syncs,
            "host_reads": sum(reads.values()), "host_read_sites": reads}


def layer_syncs(shape: dict, device: str, tokens: int, experts_implementation: str | None = None) -> dict:
    import autoep

    model = build_block_model(shape, torch.bfloat16, device)
    if experts_implementation is not None:
        model.set_experts_implementation(experts_implementation)
    autoep.apply(model, {"autoep_size": 1})
    x_BTH, upstream_BTH = layer_inputs(shape, tokens, torch.bfloat16, device)
    result = step_syncs(block_of(model), x_BTH, upstream_BTH, device)
    result["kernel"] = block_of(model).routed_experts().last_path
    return result


# ----------------------------------------------------------------------------- expert parallelism


def ep_layer_on_rank(shape: dict, tokens: int, autoep_size: int, warmup: int, repeats: int) -> dict:
    """Rank side (autoep.launch, one GPU per rank): the autoep layer at ``autoep_size`` on this
    rank's own tokens: step time (a barrier before each step) and the syncs of one step."""
    import torch.distributed as dist

    import autoep

    device = "cuda"
    model = build_block_model(shape, torch.bfloat16, device)
    autoep.apply(model, {"autoep_size": autoep_size})
    block = block_of(model)
    x_BTH, upstream_BTH = layer_inputs(shape, tokens, torch.bfloat16, device, seed=2 + dist.get_rank())

    def step():
        dist.barrier()
        block_step(block, x_BTH, upstream_BTH)

    times = timed(step, device, warmup, repeats)
    return {"rank": dist.get_rank(), "step_ms": statistics.median(times),
            **step_syncs(block, x_BTH, upstream_BTH, device)}


def expert_parallel(shape: dict, tokens: int, warmup: int, repeats: int) -> dict:
    from autoep import launch

    visible = torch.cuda.device_count()
    if visible < 2:
        return {"status": "skipped", "reason": f"EP over NCCL needs one GPU per rank: 2 ranks, {visible} visible"}
    try:
        ranks = launch.run(2, ep_layer_on_rank, shape, tokens, 2, warmup, repeats, device="cuda", timeout=300)
    finally:
        launch.close_shared_pools()
    step_ms = max(rank["step_ms"] for rank in ranks)  # a step lasts as long as its slowest rank
    flop = expert_flops(shape, tokens)
    return {"status": "done", "autoep_size": 2, "world_size": 2, "tokens_per_rank": tokens, "step_ms": step_ms,
            "tokens_per_s_per_rank": tokens / (step_ms * 1e-3), "expert_tflops_per_rank": tflops(flop, step_ms),
            "ranks": ranks}


# ----------------------------------------------------------------------------- conformance


def conformance_cells(all_cases: bool, quick: bool) -> list:
    """The one-process cells (zero-none, w1-ep1) of the installed Transformers version: one case per
    preset (the case named like the preset, else its first), or every case; both dtypes."""
    import transformers

    from matrix.models import CASES_BY_ID
    from matrix.cells import cells

    chosen = [cell for cell in cells() if cell.transformers == transformers.__version__ and cell.zero_stage == "none"
              and cell.world_size == 1 and cell.autoep_size == 1 and cell.resume is None and cell.interop is None]
    if not all_cases:
        by_preset: dict[str, list[str]] = {}
        for cell in chosen:
            cases = by_preset.setdefault(CASES_BY_ID[cell.case].preset, [])
            if cell.case not in cases:
                cases.append(cell.case)
        keep = {preset if preset in cases else cases[0] for preset, cases in by_preset.items()}
        if quick:
            keep = {case for case in keep if case.startswith("mixtral")}
        chosen = [cell for cell in chosen if cell.case in keep]
    return chosen


def conformance_on_cuda(cells: list, deadline: float) -> list[dict]:
    from conformance.runner import run_cell

    records = []
    for cell in cells:
        if time.perf_counter() > deadline:
            records.append({"cell": cell.id, "status": "skipped", "reason": "time budget (--budget-s) spent"})
            continue
        record = run_cell(cell, "autoep", device="cuda")
        records.append({key: record.get(key) for key in ("cell", "case", "dtype", "status", "detail", "reason",
                                                         "tolerance", "max_abs_diff", "block_max_abs_diff",
                                                         "seconds")})
        print(f"  {record['status']:<10} {record['seconds']:6.1f}s  {cell.id}", flush=True)
    return records


# ----------------------------------------------------------------------------- report


def print_table(report: dict) -> None:
    print(f"\n{report['device']}, peak bf16 {report['peak_bf16_tflops'] or 'unknown'} TFLOPS, torch {report['torch']}")
    conf = report["sections"].get("conformance", {})
    if "records" in conf:
        statuses: dict[str, int] = {}
        for record in conf["records"]:
            statuses[record["status"]] = statuses.get(record["status"], 0) + 1
        print(f"conformance on cuda: {statuses}")
    for name, rows in report["sections"].get("gemm", {}).get("shapes", {}).items():
        for row in rows:
            print(f"gemm {name:<14} {row['projection']:<8} grouped_mm {row['grouped_mm_tflops']:7.1f} TFLOPS  "
                  f"dense mm {row['dense_mm_tflops']:7.1f} TFLOPS  grouped/dense {row['grouped_over_dense']:.2f}")
    for name, result in report["sections"].get("layer", {}).get("shapes", {}).items():
        for variant in ("autoep", "transformers"):
            r = result[variant]
            fraction = "unknown" if r["fraction_of_peak"] is None else f"{r['fraction_of_peak']:.3f}"
            memory = "n/a" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**30:.2f} GiB"
            print(f"layer {name:<14} {variant:<12} {r['tokens_per_s']:12.0f} tok/s  {r['expert_tflops']:7.1f} TFLOPS "
                  f"({fraction} of peak)  peak mem {memory}")
    syncs = report["sections"].get("syncs", {})
    for name, result in syncs.get("shapes", {}).items():
        print(f"syncs {name:<14} autoep_size 1: {result['cuda_syncs']} CUDA syncs, {result['host_reads']} host reads "
              f"{sorted(result['host_read_sites'])}")
    for name, result in report["sections"].get("ep", {}).get("shapes", {}).items():  # a skipped section: below
        if result.get("status") == "done":
            print(f"ep {name:<17} autoep_size 2 over NCCL: {result['step_ms']:.2f} ms/step, "
                  f"{result['tokens_per_s_per_rank']:.0f} tok/s/rank, syncs/rank "
                  f"{[r['cuda_syncs'] for r in result['ranks']]}")
        else:
            print(f"ep {name}: {result.get('status')}: {result.get('reason')}")
    for name, section in report["sections"].items():
        if section.get("status") in ("skipped", "failed"):
            print(f"{name}: {section['status']}: {section.get('reason', '')[-300:]}")


def restore_numerics(settings: dict) -> None:
    """Put back CUDA math settings read by conformance.tolerances.cuda_numerics()."""
    matmul = torch.backends.cuda.matmul
    matmul.allow_tf32 = settings["matmul.allow_tf32"]
    torch.backends.cudnn.allow_tf32 = settings["cudnn.allow_tf32"]
    torch.set_float32_matmul_precision(settings["float32_matmul_precision"])
    matmul.allow_bf16_reduced_precision_reduction = settings["matmul.allow_bf16_reduced_precision_reduction"]
    matmul.allow_fp16_reduced_precision_reduction = settings["matmul.allow_fp16_reduced_precision_reduction"]


def run_section(report: dict, name: str, deadline: float, fn) -> None:
    started = time.perf_counter()
    if started > deadline:
        report["sections"][name] = {"status": "skipped", "reason": "time budget (--budget-s) spent"}
        return
    print(f"[{name}]", flush=True)
    try:
        report["sections"][name] = {"status": "done", **fn()}
    except Exception:
        report["sections"][name] = {"status": "failed", "reason": traceback.format_exc()[-3000:]}
    report["sections"][name]["seconds"] = round(time.perf_counter() - started, 1)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu-results", help="folder for gpu-results.json")
    parser.add_argument("--quick", action="store_true", help="a quarter of the tokens, fewer repeats, mixtral cells")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="sections that would start later than this are skipped (default 420)")
    parser.add_argument("--all-cases", action="store_true", help="every one-process case, not one per preset")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(no_cuda_line())
        return 0
    import transformers

    from conformance.tolerances import cuda_numerics, set_cuda_numerics

    defaults = cuda_numerics()
    started = time.perf_counter()
    deadline = started + args.budget_s
    settings = QUICK if args.quick else FULL
    name = torch.cuda.get_device_name(0)
    peak = peak_bf16_tflops(name)
    report = {"device": name, "visible_gpus": torch.cuda.device_count(), "peak_bf16_tflops": peak,
              "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
              "settings": settings, "flop_formula": FLOP_FORMULA, "cuda_numerics": set_cuda_numerics(),
              "sections": {}}
    tokens = {shape: SHAPES[shape]["tokens"] // settings["tokens_scale"] for shape in SHAPES}
    warmup, repeats = settings["warmup"], settings["repeats"]
    # The cells get at most half of the budget: the measurements after them must still run.
    cells_deadline = started + CONFORMANCE_SHARE * args.budget_s
    run_section(report, "conformance", deadline, lambda: {"records": conformance_on_cuda(
        conformance_cells(args.all_cases, args.quick), cells_deadline)})
    # The measurements run under PyTorch's default CUDA math settings (what a user gets), recorded.
    restore_numerics(defaults)
    report["performance_numerics"] = cuda_numerics()
    run_section(report, "gemm", deadline, lambda: {"shapes": {
        shape: gemm_comparison(SHAPES[shape], "cuda", warmup, repeats, tokens[shape]) for shape in SHAPES}})
    run_section(report, "layer", deadline, lambda: {"shapes": {
        shape: layer_throughput(SHAPES[shape], "cuda", warmup, repeats, tokens[shape], peak) for shape in SHAPES}})
    run_section(report, "syncs", deadline, lambda: {"shapes": {
        shape: layer_syncs(SHAPES[shape], "cuda", tokens[shape]) for shape in SHAPES}})
    if torch.cuda.device_count() < 2:
        report["sections"]["ep"] = {"status": "skipped", "reason": "EP over NCCL needs one GPU per rank: 2 ranks, "
                                                                   f"{torch.cuda.device_count()} visible"}
    else:
        run_section(report, "ep", deadline, lambda: {"shapes": {
            shape: expert_parallel(SHAPES[shape], tokens[shape], warmup, repeats) for shape in SHAPES}})
    report["seconds"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-results.json").write_text(json.dumps(report, indent=1, default=str))
    print_table(report)
    print(f"\nbenchmarks.gpu: {report['seconds']} s -> {out / 'gpu-results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
