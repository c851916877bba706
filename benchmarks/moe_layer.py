"""One Mixtral MoE layer, forward + backward: autoep against the Transformers block and a
dense ceiling, then autoep under expert parallelism (autoep_size=2 on 2 gloo processes).

    PYTHONPATH=. python -m benchmarks.moe_layer [--quick] [--out bench-results.json]

Shapes: H=512, I=1024, E=8 experts, top-2, 4096 tokens per process; fp32 and bf16; one
thread per process. Every measurement runs in a fresh process (``autoep.launch.RankPool``).

The limit, in the same run: the raw GEMM throughput of this machine (one ``torch.mm``, one
thread, the best of GEMM_SHAPES, per dtype); every variant's GFLOP/s is also given as a fraction
of it.

Variants at autoep_size=1:
  autoep         the block after ``autoep.apply(model, {"autoep_size": 1, "preset_model": "mixtral"})``
  transformers   the original MixtralSparseMoeBlock, with Transformers' default experts implementation
  dense_ceiling  one dense SwiGLU over the T*K routed rows: the experts' FLOPs, no routing
Expert parallelism: autoep_size=2 on 2 processes, each rank with its own 4096 tokens (weak
scaling: the per-rank load of autoep_size=1) and the same weights. Control: autoep_size=1 on
the same 2 processes (no communication), which shows what sharing the machine alone costs.

What is measured:
  time     time.perf_counter around each step (forward, loss, backward; gradients cleared
           before the clock starts); ``warmup`` steps, then the median of ``steps``. Under EP
           a barrier precedes each step and a step takes as long as its slowest rank.
  GFLOP/s  expert FLOPs only (see FLOP_FORMULA); the router and the permutations are not counted.
  memory   peak live bytes (benchmarks/live_bytes.py): the most bytes of tensors alive at once during
           one more step, counted from the tensors (deterministic; the comparison the issue asks for).
           Peak RSS growth: ru_maxrss after the warm-up and measured steps minus the resident
           set after setup, with the kernel's high-water mark reset to that resident set first
           (Linux /proc/self/clear_refs), so that setup's own peak does not count. Saved for backward (deterministic): bytes of the tensors
           packed by saved_tensors_hooks in one forward of the layer, summed, and the distinct
           storages among them that are neither parameters nor the input (activations).
  shares   torch.profiler over a few more steps: the record_function ranges of autoep/dispatch.py.
           Forward = autoep.dispatch + autoep.combine (the outer ranges; they contain
           count_exchange and the forward AllToAlls). AllToAll backward = the two
           ``.backward`` ranges, which nest in nothing of ours. Shares are of the profiled steps.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks.live_bytes import LiveBytes

HIDDEN, INTERMEDIATE, EXPERTS, TOP_K = 512, 1024, 8, 2
SEED = 0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VARIANTS = ("autoep", "transformers", "dense_ceiling")
FLOP_FORMULA = ("step FLOPs = 3 (forward + backward: dX and dW each cost a forward) * 6*H*I per routed row "
                "(gate_up 2*H*2I + down 2*I*H) * T*K routed rows")
FULL = dict(tokens=4096, warmup=2, steps=10, profile_steps=2)
QUICK = dict(tokens=1024, warmup=1, steps=2, profile_steps=1)
RUN_TIMEOUT_S = 900.0

FORWARD_LABELS = ("autoep.dispatch", "autoep.combine")  # outer ranges: the total
NESTED_LABELS = ("autoep.count_exchange", "autoep.all_to_all.dispatch", "autoep.all_to_all.combine")
BACKWARD_LABELS = ("autoep.all_to_all.dispatch.backward", "autoep.all_to_all.combine.backward")


def expert_flops(routed_rows: int) -> int:
    return 3 * 6 * HIDDEN * INTERMEDIATE * routed_rows


# ----------------------------------------------------------------------------- rank side


@dataclass
class Subject:
    """What one step runs: ``forward(x)``, a loss against a fixed ``upstream`` gradient, and
    backward to ``x`` and ``params``."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    x: torch.Tensor
    upstream: torch.Tensor  # float32, the shape of forward's output
    params: list[torch.Tensor]
    experts: torch.nn.Module | None = None  # autoep's GroupedExperts
    info: dict = field(default_factory=dict)


def build_mixtral(dtype: torch.dtype) -> torch.nn.Module:
    """A 1-layer Mixtral with random weights (the same on every process)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from conformance.models import _randomize

    config = MixtralConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_local_experts=EXPERTS,
                           num_experts_per_tok=TOP_K, num_hidden_layers=1, vocab_size=32, num_attention_heads=8,
                           num_key_value_heads=8, router_jitter_noise=0.0)
    torch.manual_seed(SEED)
    model = MixtralForCausalLM(config)
    _randomize(model, torch.Generator().manual_seed(SEED + 1))  # HF init leaves the router at zero
    return model.to(dtype).train()


def moe_subject(variant: str, dtype: torch.dtype, tokens: int, autoep_size: int,
                generator: torch.Generator) -> Subject:
    model = build_mixtral(dtype)
    info = {}
    if variant == "autoep":
        import autoep

        autoep.apply(model, {"autoep_size": autoep_size, "preset_model": "mixtral"})
    else:
        info["experts_implementation"] = model.config._experts_implementation
    block = model.model.layers[0].mlp  # the rest of the model is freed on return
    experts = block.routed_experts() if variant == "autoep" else None
    if experts is not None:
        def record_rows(module, args, out_RH):  # rows the local experts computed (received rows under EP)
            info["expert_rows"] = out_RH.shape[0]

        experts.register_forward_hook(record_rows)
    x_BTH = torch.randn(1, tokens, HIDDEN, generator=generator).to(dtype).requires_grad_()
    upstream_BTH = torch.randn(1, tokens, HIDDEN, generator=generator)
    return Subject(block, x_BTH, upstream_BTH, list(block.parameters()), experts, info)


def dense_subject(dtype: torch.dtype, rows: int, generator: torch.Generator) -> Subject:
    """SwiGLU over ``rows`` rows with one expert's weights: the experts' FLOPs without routing."""
    w_gate_up_2IH = (torch.randn(2 * INTERMEDIATE, HIDDEN, generator=generator) / HIDDEN ** 0.5).to(dtype)
    w_down_HI = (torch.randn(HIDDEN, INTERMEDIATE, generator=generator) / INTERMEDIATE ** 0.5).to(dtype)
    params = [w_gate_up_2IH.requires_grad_(), w_down_HI.requires_grad_()]

    def forward(x_RH: torch.Tensor) -> torch.Tensor:
        gate_RI, up_RI = F.linear(x_RH, w_gate_up_2IH).chunk(2, dim=-1)
        return F.linear(F.silu(gate_RI) * up_RI, w_down_HI)

    x_RH = torch.randn(rows, HIDDEN, generator=generator).to(dtype).requires_grad_()
    return Subject(forward, x_RH, torch.randn(rows, HIDDEN, generator=generator), params)


def step(subject: Subject) -> None:
    out = subject.forward(subject.x)
    (out.float() * subject.upstream).sum().backward()


def clear_grads(subject: Subject) -> None:
    for tensor in (subject.x, *subject.params):
        tensor.grad = None


def timed_steps(subject: Subject, count: int, barrier: bool) -> tuple[list[float], list[float]]:
    """Wall seconds per step, and this process's CPU seconds per step (all its threads): on a
    busy machine CPU < wall shows the process waiting for a core (or, under EP, for a peer)."""
    import torch.distributed as dist

    wall_s, cpu_s = [], []
    for _ in range(count):
        clear_grads(subject)
        if barrier:
            dist.barrier()
        start, start_cpu = time.perf_counter(), time.process_time()
        step(subject)
        wall_s.append(time.perf_counter() - start)
        cpu_s.append(time.process_time() - start_cpu)
    return wall_s, cpu_s


def saved_for_backward(subject: Subject) -> dict:
    """Bytes autograd keeps from one forward: every packed tensor summed, and the distinct
    storages that are neither parameters nor the input."""
    own = {tensor.untyped_storage().data_ptr() for tensor in (subject.x, *subject.params)}
    total = 0
    activations: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            activations[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = subject.forward(subject.x)
    del out
    return {"saved_bytes_sum": total, "saved_bytes_activations": sum(activations.values())}


def peak_live_bytes(subject: Subject) -> int:
    """The most bytes of tensors alive at once during one step (gradients cleared first)."""
    clear_grads(subject)
    with LiveBytes() as live:
        step(subject)
    return live.peak


def profile_labels(subject: Subject, count: int, barrier: bool) -> dict:
    """Milliseconds per step inside each autoep label, and the profiled step itself."""
    import torch.distributed as dist

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(count):
            clear_grads(subject)
            if barrier:
                dist.barrier()
            with record_function("bench.step"):
                step(subject)
    totals_us: dict[str, float] = {}
    for event in profiler.events():
        totals_us[event.name] = totals_us.get(event.name, 0.0) + event.cpu_time_total
    labels = ("bench.step",) + FORWARD_LABELS + NESTED_LABELS + BACKWARD_LABELS
    return {label: totals_us.get(label, 0.0) / 1e3 / count for label in labels}


def rss_bytes() -> int:
    """The current resident set (Linux: /proc/self/statm)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def reset_peak_rss() -> bool:
    """Reset the high-water mark behind ru_maxrss to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def measure(variant: str, dtype_name: str, tokens: int, warmup: int, steps: int, profile_steps: int,
            autoep_size: int = 1) -> dict:
    """Rank side: set up one variant, time it, measure its memory, profile it (autoep only).
    ``autoep_size`` counts only for the autoep variant."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank = dist.get_rank() if dist.is_initialized() else 0
    barrier = dist.is_initialized() and dist.get_world_size() > 1  # ranks step together
    dtype = DTYPES[dtype_name]
    tokens_generator = torch.Generator().manual_seed(1000 + rank)  # own tokens per rank, same weights
    if variant == "dense_ceiling":
        subject = dense_subject(dtype, tokens * TOP_K, tokens_generator)
    else:
        subject = moe_subject(variant, dtype, tokens, autoep_size, tokens_generator)
    gc.collect()
    peak_reset = reset_peak_rss()
    rss_after_setup = rss_bytes()
    timed_steps(subject, warmup, barrier)
    seconds, cpu_seconds = timed_steps(subject, steps, barrier)
    maxrss_after_steps = maxrss_bytes()
    live_peak = peak_live_bytes(subject)
    result = {"rank": rank, "threads": torch.get_num_threads(), "step_s": seconds, "step_cpu_s": cpu_seconds,
              "rss_after_setup_bytes": rss_after_setup, "maxrss_after_steps_bytes": maxrss_after_steps,
              "peak_rss_growth_bytes": maxrss_after_steps - rss_after_setup, "peak_rss_reset_after_setup": peak_reset,
              "peak_live_bytes": live_peak,
              **saved_for_backward(subject)}
    if subject.experts is not None:
        result["kernel_path"] = subject.experts.last_path
        result["profile_ms_per_step"] = profile_labels(subject, profile_steps, barrier) if profile_steps else None
    result.update(subject.info)
    return result


# Candidate shapes (M, K, N) of one torch.mm for the raw GEMM limit: the layer's own three GEMMs at
# the routed-row count (gate_up: R x H x 2I, down: R x I x H, and a backward one, R x H x I
# transposed), and square ones that keep AMX tiles fed. The limit is the best of them.
GEMM_SHAPES = ("routed_gate_up", "routed_down", "square_1024", "square_2048")


def _gemm_shape(name: str, rows: int) -> tuple[int, int, int]:
    return {"routed_gate_up": (rows, HIDDEN, 2 * INTERMEDIATE), "routed_down": (rows, INTERMEDIATE, HIDDEN),
            "square_1024": (1024, 1024, 1024), "square_2048": (2048, 2048, 2048)}[name]


def measure_gemm_limit(dtype_name: str, tokens: int, warmup: int, steps: int, **_ignored) -> dict:
    """Rank side: this machine's raw GEMM throughput, one thread: ``torch.mm`` on each of
    GEMM_SHAPES (inputs of ``dtype``, its output dtype), ``warmup`` calls then the median of
    ``steps``; the best shape is the physical limit every variant is set against."""
    torch.set_num_threads(1)
    dtype = DTYPES[dtype_name]
    generator = torch.Generator().manual_seed(SEED)
    shapes = {}
    for name in GEMM_SHAPES:
        m, k, n = _gemm_shape(name, tokens * TOP_K)
        a, b = torch.randn(m, k, generator=generator).to(dtype), torch.randn(k, n, generator=generator).to(dtype)
        seconds = []
        for index in range(warmup + max(steps, 3)):
            start = time.perf_counter()
            torch.mm(a, b)
            if index >= warmup:
                seconds.append(time.perf_counter() - start)
        median = statistics.median(seconds)
        shapes[name] = {"m": m, "k": k, "n": n, "seconds_median": median, "gflops": 2 * m * k * n / median / 1e9}
    best = max(shapes, key=lambda name: shapes[name]["gflops"])
    return {"threads": torch.get_num_threads(), "shapes": shapes, "best_shape": best,
            "gflops": shapes[best]["gflops"]}


# ----------------------------------------------------------------------------- parent side


def run_fresh(world_size: int, target: str = "measure", **kwargs) -> list[dict]:
    """``target`` (``measure`` by default) on a new pool of ``world_size`` processes, closed afterwards."""
    from autoep.launch import RankPool

    with RankPool(world_size) as pool:
        return pool.run(f"benchmarks.moe_layer:{target}", timeout=RUN_TIMEOUT_S, **kwargs)


def shares(profile_ms: dict | None) -> dict:
    if not profile_ms:
        return {}
    step_ms = profile_ms["bench.step"]
    forward_ms = sum(profile_ms[label] for label in FORWARD_LABELS)
    backward_ms = sum(profile_ms[label] for label in BACKWARD_LABELS)
    return {"dispatch_combine_forward_share": forward_ms / step_ms,
            "all_to_all_backward_share": backward_ms / step_ms}


def cpu_share(result: dict) -> float:
    """CPU time over wall time of the measured steps (about 1.0 for one busy thread on an idle core)."""
    return sum(result["step_cpu_s"]) / sum(result["step_s"])


def layer_rows(results: dict[tuple[str, str], dict], tokens: int, limits: dict[str, dict]) -> list[dict]:
    """One row per variant and dtype; ``limits``: measure_gemm_limit's result per dtype."""
    flops = expert_flops(tokens * TOP_K)
    rows = []
    for dtype_name in DTYPES:
        median = {variant: statistics.median(results[variant, dtype_name]["step_s"]) for variant in VARIANTS}
        for variant in VARIANTS:
            result = results[variant, dtype_name]
            gflops = flops / median[variant] / 1e9
            rows.append({"variant": variant, "dtype": dtype_name, "autoep_size": 1, "tokens": tokens,
                         "step_s_median": median[variant], "gflops": gflops,
                         "fraction_of_gemm_limit": gflops / limits[dtype_name]["gflops"],
                         "time_ratio_to_dense_ceiling": median[variant] / median["dense_ceiling"],
                         "time_ratio_to_transformers": median[variant] / median["transformers"],
                         "peak_live_ratio_to_transformers": result["peak_live_bytes"]
                         / results["transformers", dtype_name]["peak_live_bytes"],
                         "saved_ratio_to_transformers": result["saved_bytes_sum"]
                         / results["transformers", dtype_name]["saved_bytes_sum"],
                         "step_cpu_s_median": statistics.median(result["step_cpu_s"]), "cpu_share": cpu_share(result),
                         **shares(result.get("profile_ms_per_step")), **result})
    return rows


def expert_parallel_rows(results: dict[tuple[int, str], list[dict]], ep1: dict[str, float], tokens: int
                         ) -> list[dict]:
    rows = []
    for (ep_size, dtype_name), per_rank in results.items():
        slowest_s = [max(steps) for steps in zip(*(result["step_s"] for result in per_rank))]
        median = statistics.median(slowest_s)
        rank_shares = [shares(result["profile_ms_per_step"]) for result in per_rank]
        rows.append({
            "variant": "autoep", "dtype": dtype_name, "autoep_size": ep_size, "processes": len(per_rank),
            "tokens_per_rank": tokens,
            "step_s_median": median, "step_s_slowest_rank": slowest_s,
            "time_per_token_us": median / tokens * 1e6,
            "time_per_token_ratio_to_ep1": median / ep1[dtype_name],
            "tokens_per_s_all_ranks": tokens * len(per_rank) / median,
            "cpu_share": statistics.mean(cpu_share(result) for result in per_rank),
            "gflops_per_rank": expert_flops(tokens * TOP_K) / median / 1e9,
            "dispatch_combine_forward_share": statistics.mean(s["dispatch_combine_forward_share"] for s in rank_shares),
            "all_to_all_backward_share": statistics.mean(s["all_to_all_backward_share"] for s in rank_shares),
            "peak_rss_growth_bytes_max": max(result["peak_rss_growth_bytes"] for result in per_rank),
            "saved_bytes_activations_max": max(result["saved_bytes_activations"] for result in per_rank),
            "expert_rows_per_rank": [result.get("expert_rows") for result in per_rank],
            "ranks": per_rank})
    return rows


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def print_tables(report: dict) -> None:
    meta = report["meta"]
    print(f"\nMoE layer benchmark: torch {meta['torch']}, transformers {meta['transformers']}, "
          f"{meta['threads_per_process']} thread per process, H={HIDDEN} I={INTERMEDIATE} E={EXPERTS} top-{TOP_K}, "
          f"{meta['tokens_per_process']} tokens per process")
    print(f"{meta['flop_formula']} = {meta['expert_flops_per_step'] / 1e9:.2f} GFLOP per step")
    before, after = meta["load_average_1min_before_after"]
    print(f"time: {meta['timing']}; load average (1 min) before/after the run: {before:.2f} / {after:.2f}\n")
    for dtype_name, limit in report["gemm_limit"].items():
        best = limit["shapes"][limit["best_shape"]]
        tried = ", ".join(f"{name} {shape['gflops']:.0f}" for name, shape in limit["shapes"].items())
        print(f"raw GEMM limit {dtype_name}: {limit['gflops']:.1f} GFLOP/s (torch.mm, one thread; {tried}; "
              f"best {limit['best_shape']} {best['m']}x{best['k']}x{best['n']})")
    print()
    header = (f"{'variant':<14}{'dtype':<6}{'step ms':>9}{'GFLOP/s':>9}{'/limit':>8}{'t/dense':>9}{'t/hf':>7}"
              f"{'live MiB':>10}{'live/hf':>8}{'RSS+ MiB':>10}{'saved MiB':>11}{'saved/hf':>9}{'act MiB':>9}"
              f"{'disp+comb':>11}{'cpu':>6}  kernel")
    print(header)
    print("-" * len(header))
    for row in report["layer"]:
        share = row.get("dispatch_combine_forward_share")
        kernel = row.get("kernel_path") or row.get("experts_implementation") or "dense F.linear"
        print(f"{row['variant']:<14}{row['dtype']:<6}{row['step_s_median'] * 1e3:>9.1f}{row['gflops']:>9.1f}"
              f"{row['fraction_of_gemm_limit']:>8.0%}"
              f"{row['time_ratio_to_dense_ceiling']:>9.2f}{row['time_ratio_to_transformers']:>7.2f}"
              f"{mib(row['peak_live_bytes']):>10}{row['peak_live_ratio_to_transformers']:>8.2f}"
              f"{mib(row['peak_rss_growth_bytes']):>10}{mib(row['saved_bytes_sum']):>11}"
              f"{row['saved_ratio_to_transformers']:>9.2f}{mib(row['saved_bytes_activations']):>9}{'' if share is None else f'{share:.1%}':>11}"
              f"{row['cpu_share']:>6.0%}  {kernel}")
    print("\n/limit: GFLOP/s over the raw GEMM limit of the same dtype (above). t/dense, t/hf: step time / step time of dense_ceiling, of transformers (same dtype; < 1 is faster). "
          "live: peak bytes of live tensors in one step (benchmarks/live_bytes.py); live/hf, saved/hf: over "
          "transformers' (same dtype). RSS+: peak RSS growth over setup (allocator-dependent). saved: bytes saved for backward (all packed tensors; "
          "act: distinct non-parameter storages). disp+comb: autoep.dispatch + autoep.combine, forward. "
          "cpu: CPU time / wall time of the steps (well under 100%: the machine was busy).\n")
    header = (f"{'dtype':<6}{'ep':>3}{'procs':>6}{'step ms':>9}{'us/token':>10}{'t/ep1':>7}{'tok/s all':>11}"
              f"{'disp+comb fwd':>15}{'a2a bwd':>9}{'RSS+ MiB':>10}{'cpu':>6}  expert rows per rank")
    print(header)
    print("-" * len(header))
    for row in report["expert_parallel"]:
        print(f"{row['dtype']:<6}{row['autoep_size']:>3}{row['processes']:>6}{row['step_s_median'] * 1e3:>9.1f}"
              f"{row['time_per_token_us']:>10.1f}{row['time_per_token_ratio_to_ep1']:>7.2f}"
              f"{row['tokens_per_s_all_ranks']:>11.0f}{row['dispatch_combine_forward_share']:>15.1%}"
              f"{row['all_to_all_backward_share']:>9.1%}{mib(row['peak_rss_growth_bytes_max']):>10}"
              f"{row['cpu_share']:>6.0%}  {row['expert_rows_per_rank']}")
    print(f"\n{meta['tokens_per_process']} tokens per process (weak scaling); the 2 processes share this machine's "
          f"{os.cpu_count()} cores. ep=1 on 2 processes: the control, no communication. us/token = step time / tokens "
          "per process; t/ep1 = that over autoep's time on 1 process (ideal 1.0). Shares: of the profiled step, "
          "mean over ranks; a2a bwd: the AllToAll backward ranges (they include waiting for the slower rank); "
          "cpu < 100% under EP: waiting for the peer, or for a core.")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-results.json", help="JSON results (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1024 tokens, 1 warm-up, 2 steps")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL

    import transformers

    load_before = os.getloadavg()
    layer_results = {}
    for dtype_name in DTYPES:
        for variant in VARIANTS:
            print(f"measuring {variant} {dtype_name} ...", file=sys.stderr, flush=True)
            layer_results[variant, dtype_name] = run_fresh(1, variant=variant, dtype_name=dtype_name, **plan)[0]
    limits = {}
    for dtype_name in DTYPES:
        print(f"measuring the raw GEMM limit {dtype_name} ...", file=sys.stderr, flush=True)
        limits[dtype_name] = run_fresh(1, target="measure_gemm_limit", dtype_name=dtype_name, **plan)[0]
    for dtype_name in DTYPES:
        if layer_results["autoep", dtype_name]["kernel_path"] != "grouped_mm":
            print(f"warning: autoep {dtype_name} ran {layer_results['autoep', dtype_name]['kernel_path']!r}, "
                  "not grouped_mm", file=sys.stderr)
    ep_results = {}
    for dtype_name in DTYPES:
        for autoep_size in (1, 2):  # 1: the control, two independent processes
            print(f"measuring autoep_size={autoep_size} on 2 processes, {dtype_name} ...", file=sys.stderr, flush=True)
            ep_results[autoep_size, dtype_name] = run_fresh(2, variant="autoep", dtype_name=dtype_name,
                                                            autoep_size=autoep_size, **plan)
    layer = layer_rows(layer_results, plan["tokens"], limits)
    ep1 = {row["dtype"]: row["step_s_median"] for row in layer if row["variant"] == "autoep"}
    report = {
        "meta": {"torch": torch.__version__, "transformers": transformers.__version__,
                 "python": platform.python_version(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
                 "threads_per_process": layer_results["autoep", "fp32"]["threads"],
                 "hidden": HIDDEN, "intermediate": INTERMEDIATE, "experts": EXPERTS, "top_k": TOP_K,
                 "tokens_per_process": plan["tokens"], "routed_rows_per_process": plan["tokens"] * TOP_K,
                 "flop_formula": FLOP_FORMULA, "expert_flops_per_step": expert_flops(plan["tokens"] * TOP_K),
                 "timing": (f"time.perf_counter per step, {plan['warmup']} warm-up then median of {plan['steps']}; "
                            "EP: barrier before each step, slowest rank"),
                 "plan": plan, "quick": args.quick,
                 "load_average_1min_before_after": [load_before[0], os.getloadavg()[0]]},
        "gemm_limit": limits,
        "layer": layer,
        "expert_parallel": expert_parallel_rows(ep_results, ep1, plan["tokens"]),
    }
    print_tables(report)
    with open(args.out, "w") as out:
        json.dump(report, out, indent=1)
    print(f"\nJSON: {args.out}")
    return report


if __name__ == "__main__":
    main()
