"""One MoE layer, forward + backward, in one run: autoep against the Transformers block, the
peers (DeepSpeed's AutoEP layer, Transformers' own expert parallelism), a dense ceiling and the
raw GEMM limit of this machine; then expert parallelism on 2 gloo processes.

    PYTHONPATH=. python -m benchmarks.moe_layer [--quick] [--out bench-results.json]

Shape (benchmarks/blocks.py STANDARD): H=512, I=1024, E=8 experts, top-2, 4096 tokens per process,
fp32 and bf16, one thread per process, every measurement in a fresh process
(``autoep.launch.RankPool``). Two families: mixtral (the standard) and deepseek_v3 (the same shape
plus one shared expert; the family DeepSpeed 0.19.8's AutoEP still builds on Transformers >= 5.23,
where finding DS-1 stops its mixtral preset). A variant that cannot run says why in its row.

Variants:
  autoep           the block after ``autoep.apply(model, {"autoep_size": ep, "preset_model": family})``
  autoep_experts   the stock block after ``autoep.apply(model, {"autoep_size": ep, "replacement": "experts"})``:
                   the model's own router, AutoEP's experts module (the experts-level replacement)
  transformers     the original block, Transformers' default experts implementation
  deepspeed        DeepSpeed's AutoEP layer, built by ``deepspeed.initialize`` (benchmarks/peers.py)
  torchtitan       TorchTitan's MoE, where torchtitan is installed (benchmarks/peers.py)
  transformers_ep  Transformers' expert parallelism, ``DistributedConfig(ep_size=ep)`` (benchmarks/peers.py)
  dense_ceiling    one dense SwiGLU over the routed (and shared) rows: the experts' FLOPs, no routing
  limit            the raw GEMM limit: one ``torch.mm``, one thread, the best of GEMM_SHAPES, per dtype
Expert parallelism: ep=2 on 2 processes, each rank with its own 4096 tokens (weak scaling: the
per-rank load of ep=1) and the same weights; control: autoep at ep=1 on the same 2 processes (no
communication), which shows what sharing the machine alone costs.

What is measured:
  time     time.perf_counter around each step (forward, loss, backward; gradients cleared
           before the clock starts); ``warmup`` steps, then the median of ``steps``. Under EP
           a barrier precedes each step and a step takes as long as its slowest rank.
  GFLOP/s  expert FLOPs only (blocks.FLOP_FORMULA); the router and the permutations are not counted.
  memory   peak live bytes (benchmarks/live_bytes.py): the most bytes of tensors alive at once during
           one more step, counted from the tensors (deterministic). Peak RSS growth: ru_maxrss after
           the steps minus the resident set after setup, the kernel's high-water mark reset first
           (Linux /proc/self/clear_refs). Saved for backward: bytes of the tensors packed by
           saved_tensors_hooks in one forward, summed, and the distinct non-parameter storages.
  wire     payload: bytes each rank hands ``torch.distributed.all_to_all_single`` for other ranks
           (what autoep and DeepSpeed send; Transformers' EP sends through functional collectives
           this does not see). Loopback: bytes the kernel sent over ``lo`` (/proc/net/dev) during the
           measured steps, all ranks together (gloo runs over TCP on 127.0.0.1; the barriers add a
           few hundred bytes per step): measured the same way for every variant. Theory: the
           routed rows that leave their rank under uniform routing, 4 * T*K*(ep-1)/ep rows x H x
           dtype bytes per rank and step (dispatch, combine, and both again in backward).
  profile  torch.profiler over a few more steps of every variant. Outside GEMMs: the CPU self time of
           every op in a step but the GEMM kernels (GEMM_KERNELS). autoep's shares: the
           record_function ranges of autoep/dispatch.py. Forward = autoep.dispatch + autoep.combine
           (the outer ranges; they contain count_exchange and the forward AllToAlls). AllToAll
           backward = the two ``.backward`` ranges, which nest in nothing of ours. Shares are of the
           profiled steps.
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

from benchmarks import blocks
from benchmarks.blocks import FLOP_FORMULA, STANDARD, expert_flops
from benchmarks.live_bytes import LiveBytes

SEED = 0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FAMILIES = ("mixtral", "deepseek_v3")
# Transformers' EP at ep 1 builds no mesh: it is the transformers row, which its ep 2 row is set against.
LAYER_VARIANTS = ("autoep", "autoep_experts", "transformers", "deepspeed", "torchtitan", "dense_ceiling")
EP_VARIANTS = ("autoep", "autoep_experts", "deepspeed", "transformers_ep", "torchtitan")
FULL = dict(tokens=4096, warmup=2, steps=10, profile_steps=2)
QUICK = dict(tokens=1024, warmup=1, steps=2, profile_steps=1)
RUN_TIMEOUT_S = 900.0

FORWARD_LABELS = ("autoep.dispatch", "autoep.combine")  # outer ranges: the total
NESTED_LABELS = ("autoep.count_exchange", "autoep.all_to_all.dispatch", "autoep.all_to_all.combine")
BACKWARD_LABELS = ("autoep.all_to_all.dispatch.backward", "autoep.all_to_all.combine.backward")


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


def moe_subject(variant: str, dtype: torch.dtype, tokens: int, autoep_size: int, generator: torch.Generator,
                shape: dict = STANDARD) -> Subject:
    """One MoE block of ``shape`` as ``variant`` runs it (raises peers.PeerUnavailable for a peer
    that cannot be built here)."""
    info = {}
    if variant in ("deepspeed", "transformers_ep", "torchtitan"):
        from benchmarks import peers

        block, info = peers.build(variant, shape, dtype, autoep_size)
    else:
        model = blocks.build_block_model(shape, dtype, seed=SEED)
        if variant == "autoep":
            import autoep

            autoep.apply(model, {"autoep_size": autoep_size, "preset_model": shape["family"]})
        elif variant == "autoep_experts":
            import autoep

            autoep.apply(model, {"autoep_size": autoep_size, "replacement": "experts"})
        else:
            info["experts_implementation"] = model.config._experts_implementation
        block = blocks.block_of(model)  # the rest of the model is freed on return
    if variant == "autoep_experts":  # its kernel path is read off the experts module (it outputs [T, H], not rows)
        info["experts_module"] = block.experts
    experts = block.routed_experts() if variant == "autoep" else None
    if experts is not None:
        def record_rows(module, args, out_RH):  # rows the local experts computed (received rows under EP)
            info["expert_rows"] = out_RH.shape[0]

        experts.register_forward_hook(record_rows)
    x_BTH, upstream_BTH = blocks.layer_inputs(shape, tokens, dtype, generator=generator)
    return Subject(lambda x: blocks.block_output(block(x)), x_BTH, upstream_BTH, list(block.parameters()),
                   experts, info)


def dense_subject(dtype: torch.dtype, rows: int, generator: torch.Generator, shape: dict = STANDARD) -> Subject:
    """SwiGLU over ``rows`` rows with one expert's weights: the experts' FLOPs without routing."""
    hidden, inter = shape["hidden"], shape["intermediate"]
    w_gate_up_2IH = (torch.randn(2 * inter, hidden, generator=generator) / hidden ** 0.5).to(dtype)
    w_down_HI = (torch.randn(hidden, inter, generator=generator) / inter ** 0.5).to(dtype)
    params = [w_gate_up_2IH.requires_grad_(), w_down_HI.requires_grad_()]

    def forward(x_RH: torch.Tensor) -> torch.Tensor:
        gate_RI, up_RI = F.linear(x_RH, w_gate_up_2IH).chunk(2, dim=-1)
        return F.linear(F.silu(gate_RI) * up_RI, w_down_HI)

    x_RH = torch.randn(rows, hidden, generator=generator).to(dtype).requires_grad_()
    return Subject(forward, x_RH, torch.randn(rows, hidden, generator=generator), params)


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


def loopback_tx_bytes() -> int | None:
    """Bytes sent over the loopback interface since boot (Linux /proc/net/dev), or None."""
    try:
        with open("/proc/net/dev") as dev:
            for line in dev:
                name, _, values = line.partition(":")
                if name.strip() == "lo":
                    return int(values.split()[8])  # receive has 8 fields, then transmit bytes
    except (OSError, ValueError, IndexError):
        pass
    return None


class PayloadCounter:
    """Counts the bytes this rank hands ``torch.distributed.all_to_all_single`` for other ranks
    (its own split stays local), by wrapping the function while the block is active."""

    def __init__(self) -> None:
        self.bytes = 0
        self.calls = 0

    def __enter__(self) -> "PayloadCounter":
        import torch.distributed as dist

        self._original = original = dist.all_to_all_single

        def counting(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
            peers, me = dist.get_world_size(group), dist.get_rank(group)
            row_bytes = input[0].numel() * input.element_size() if input.dim() and input.shape[0] else 0
            if input_split_sizes:
                rows = sum(size for index, size in enumerate(input_split_sizes) if index != me)
            else:
                rows = input.shape[0] * (peers - 1) // peers if input.dim() else 0
            self.bytes += rows * row_bytes
            self.calls += 1
            return original(output, input, output_split_sizes, input_split_sizes, group, async_op)

        dist.all_to_all_single = counting
        return self

    def __exit__(self, *exc) -> None:
        import torch.distributed as dist

        dist.all_to_all_single = self._original


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (Transformers' EP keeps its parameters as DTensors), else the tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def saved_for_backward(subject: Subject) -> dict:
    """Bytes autograd keeps from one forward: every packed tensor summed, and the distinct
    storages that are neither parameters nor the input."""
    own = {_local(tensor).untyped_storage().data_ptr() for tensor in (subject.x, *subject.params)}
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


# The profiler events of GEMM kernels (on a CPU ``aten::_grouped_mm`` runs ``aten::mm`` per expert, its own
# self time is the glue): what is not one of them is "outside GEMMs".
GEMM_KERNELS = frozenset({"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm"})


def profile_labels(subject: Subject, count: int, barrier: bool) -> dict:
    """Milliseconds per step: the profiled step itself (``bench.step``), inside each autoep label,
    and ``outside_gemm``: the CPU self time of every operation in the step except the GEMM kernels
    (elementwise passes, copies, gathers, allocation, collectives, Python between them)."""
    import torch.distributed as dist

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(count):
            clear_grads(subject)
            if barrier:
                dist.barrier()
            with record_function("bench.step"):
                step(subject)
    events = profiler.events()
    totals_us: dict[str, float] = {}
    for event in events:
        totals_us[event.name] = totals_us.get(event.name, 0.0) + event.cpu_time_total
    steps = [(event.time_range.start, event.time_range.end) for event in events if event.name == "bench.step"]
    outside_gemm_us = sum(event.self_cpu_time_total for event in events
                          if event.name not in GEMM_KERNELS
                          and any(start <= event.time_range.start <= end for start, end in steps))
    labels = ("bench.step",) + FORWARD_LABELS + NESTED_LABELS + BACKWARD_LABELS
    return {**{label: totals_us.get(label, 0.0) / 1e3 / count for label in labels},
            "outside_gemm": outside_gemm_us / 1e3 / count}


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
            autoep_size: int = 1, shape: dict = STANDARD) -> dict:
    """Rank side: set up one variant, time it, count its wire bytes, measure its memory, profile
    it (autoep only). ``autoep_size`` is the EP size of autoep and the peers. A peer that cannot
    be built returns ``{"unavailable": reason}``."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    distributed = dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    barrier = distributed and dist.get_world_size() > 1  # ranks step together
    dtype = DTYPES[dtype_name]
    tokens_generator = torch.Generator().manual_seed(1000 + rank)  # own tokens per rank, same weights
    if variant == "dense_ceiling":
        rows = tokens * (shape["top_k"] + blocks.shared_experts(shape))
        subject = dense_subject(dtype, rows, tokens_generator, shape)
    else:
        from benchmarks.peers import PeerUnavailable

        try:
            subject = moe_subject(variant, dtype, tokens, autoep_size, tokens_generator, shape)
        except PeerUnavailable as reason:
            return {"rank": rank, "unavailable": str(reason)}
    gc.collect()
    peak_reset = reset_peak_rss()
    rss_after_setup = rss_bytes()
    timed_steps(subject, warmup, barrier)
    if distributed:
        dist.barrier()
    loopback_before = loopback_tx_bytes()
    with PayloadCounter() as payload:
        seconds, cpu_seconds = timed_steps(subject, steps, barrier)
    if distributed:
        dist.barrier()
    loopback_after = loopback_tx_bytes()
    maxrss_after_steps = maxrss_bytes()
    live_peak = peak_live_bytes(subject)
    result = {"rank": rank, "threads": torch.get_num_threads(), "step_s": seconds, "step_cpu_s": cpu_seconds,
              "rss_after_setup_bytes": rss_after_setup, "maxrss_after_steps_bytes": maxrss_after_steps,
              "peak_rss_growth_bytes": maxrss_after_steps - rss_after_setup, "peak_rss_reset_after_setup": peak_reset,
              "peak_live_bytes": live_peak, "payload_bytes_per_step": payload.bytes / steps,
              "loopback_bytes_per_step": (None if loopback_before is None or loopback_after is None
                                          else (loopback_after - loopback_before) / steps),
              **saved_for_backward(subject)}
    result["profile_ms_per_step"] = profile_labels(subject, profile_steps, barrier) if profile_steps else None
    if subject.experts is not None:
        result["kernel_path"] = subject.experts.last_path
    if "experts_module" in subject.info:
        result["kernel_path"] = subject.info.pop("experts_module").last_path
    result.update(subject.info)
    return result


# Candidate shapes (M, K, N) of one torch.mm for the raw GEMM limit: the layer's own GEMMs at the
# routed-row count (gate_up: R x H x 2I, down: R x I x H), and square ones that keep AMX tiles fed.
# The limit is the best of them. They run smallest first; once one call takes over GEMM_SLOW_S
# (a CPU without a native kernel for the dtype: bf16 without AMX or AVX512-BF16 runs a fallback at
# well under 1 GFLOP/s), the larger ones are skipped and that is recorded.
GEMM_SHAPES = ("square_512", "square_1024", "routed_gate_up", "routed_down", "square_2048")
GEMM_SLOW_S = 1.0
# A dtype is timed only where its GEMM limit is at least this fraction of fp32's: below it the
# layers' times would measure the CPU's fallback kernel, not the layers (reported, not hidden).
NATIVE_FRACTION_OF_FP32 = 0.5


def _gemm_shape(name: str, rows: int, shape: dict = STANDARD) -> tuple[int, int, int]:
    hidden, inter = shape["hidden"], shape["intermediate"]
    return {"routed_gate_up": (rows, hidden, 2 * inter), "routed_down": (rows, inter, hidden),
            "square_512": (512, 512, 512), "square_1024": (1024, 1024, 1024),
            "square_2048": (2048, 2048, 2048)}[name]


def measure_gemm_limit(dtype_name: str, tokens: int, warmup: int, steps: int, shape: dict = STANDARD,
                       **_ignored) -> dict:
    """Rank side: this machine's raw GEMM throughput, one thread: ``torch.mm`` on each of
    GEMM_SHAPES (inputs of ``dtype``, its output dtype), ``warmup`` calls then the median of
    ``steps``; the best shape is the physical limit every variant is set against."""
    torch.set_num_threads(1)
    dtype = DTYPES[dtype_name]
    generator = torch.Generator().manual_seed(SEED)
    sizes = {name: _gemm_shape(name, tokens * shape["top_k"], shape) for name in GEMM_SHAPES}
    shapes, skipped = {}, []
    for name in sorted(GEMM_SHAPES, key=lambda name: sizes[name][0] * sizes[name][1] * sizes[name][2]):
        m, k, n = sizes[name]
        if skipped or (shapes and max(s["seconds_median"] for s in shapes.values()) > GEMM_SLOW_S):
            skipped.append(name)
            continue
        a, b = torch.randn(m, k, generator=generator).to(dtype), torch.randn(k, n, generator=generator).to(dtype)
        seconds = []
        for index in range(warmup + max(steps, 3)):
            start = time.perf_counter()
            torch.mm(a, b)
            elapsed = time.perf_counter() - start
            if index >= warmup or elapsed > GEMM_SLOW_S:
                seconds.append(elapsed)
            if elapsed > GEMM_SLOW_S:
                break
        median = statistics.median(seconds)
        shapes[name] = {"m": m, "k": k, "n": n, "seconds_median": median, "gflops": 2 * m * k * n / median / 1e9}
    best = max(shapes, key=lambda name: shapes[name]["gflops"])
    return {"threads": torch.get_num_threads(), "shapes": shapes, "best_shape": best,
            "gflops": shapes[best]["gflops"], "skipped_slow": skipped}


def timed_dtypes(limits: dict[str, dict]) -> tuple[list[str], dict[str, str]]:
    """The dtypes worth timing on this machine, and why each other one is not."""
    timed, reasons = [], {}
    for dtype_name, limit in limits.items():
        if dtype_name != "fp32" and limit["gflops"] < NATIVE_FRACTION_OF_FP32 * limits["fp32"]["gflops"]:
            reasons[dtype_name] = (f"not timed: this CPU's {dtype_name} GEMM reaches {limit['gflops']:.2f} GFLOP/s "
                                   f"against fp32's {limits['fp32']['gflops']:.1f} (no native {dtype_name} matrix "
                                   "unit: AMX or AVX512-BF16); its times would measure the fallback kernel, not the "
                                   "layers")
        else:
            timed.append(dtype_name)
    return timed, reasons


def gemm_limits(plan: dict) -> dict[str, dict]:
    limits = {}
    for dtype_name in DTYPES:
        print(f"measuring the raw GEMM limit {dtype_name} ...", file=sys.stderr, flush=True)
        limits[dtype_name] = run_fresh(1, target="measure_gemm_limit", dtype_name=dtype_name, **plan)[0]
    return limits


# ----------------------------------------------------------------------------- parent side


def run_fresh(world_size: int, target: str = "measure", **kwargs) -> list[dict]:
    """``target`` (``measure`` by default) on a new pool of ``world_size`` processes, closed afterwards."""
    from autoep.launch import RankPool

    with RankPool(world_size) as pool:
        return pool.run(f"benchmarks.moe_layer:{target}", timeout=RUN_TIMEOUT_S, **kwargs)


def shares(profile_ms: dict | None) -> dict:
    """autoep's dispatch+combine and backward AllToAll shares of the step ({} for other variants)."""
    if not profile_ms or not profile_ms.get("autoep.dispatch"):
        return {}
    step_ms = profile_ms["bench.step"]
    forward_ms = sum(profile_ms[label] for label in FORWARD_LABELS)
    backward_ms = sum(profile_ms[label] for label in BACKWARD_LABELS)
    return {"dispatch_combine_forward_share": forward_ms / step_ms,
            "all_to_all_backward_share": backward_ms / step_ms}


def cpu_share(result: dict) -> float:
    """CPU time over wall time of the measured steps (about 1.0 for one busy thread on an idle core)."""
    return sum(result["step_cpu_s"]) / sum(result["step_s"])


def theoretical_wire_bytes(shape: dict, tokens: int, ep: int, dtype_name: str) -> float:
    """Bytes one rank sends per step under uniform routing: 4 passes (dispatch, combine, both in
    backward) of the T*K*(ep-1)/ep routed rows that leave the rank, H elements each."""
    element = torch.tensor([], dtype=DTYPES[dtype_name]).element_size()
    return 4 * tokens * shape["top_k"] * (ep - 1) / ep * shape["hidden"] * element


# A run: (family, variant, dtype, ep size, processes).
Key = tuple[str, str, str, int, int]


def across_ranks(per_rank: list[dict], shape: dict, tokens: int, ep: int, dtype_name: str) -> dict:
    """What the table and the curves read from one run's per-rank results: the step time of the
    slowest rank (per step, then the median), GFLOP/s per rank, peak live bytes of the largest rank,
    wire bytes per step of all ranks (payload, loopback, theory), the mean profile shares (None
    where a rank was not profiled), the CPU time outside GEMMs per step of the largest rank and the
    mean CPU share."""
    slowest_s = [max(steps) for steps in zip(*(result["step_s"] for result in per_rank))]
    median = statistics.median(slowest_s)
    rank_shares = [shares(result.get("profile_ms_per_step")) for result in per_rank]
    outside_gemm = [(result.get("profile_ms_per_step") or {}).get("outside_gemm") for result in per_rank]
    return {"step_s_median": median, "step_s_slowest_rank": slowest_s, "time_per_token_us": median / tokens * 1e6,
            "gflops_per_rank": expert_flops(shape, tokens) / median / 1e9,
            "peak_live_bytes": max(result["peak_live_bytes"] for result in per_rank),
            **{name: statistics.mean(s[name] for s in rank_shares) if all(rank_shares) else None
               for name in ("dispatch_combine_forward_share", "all_to_all_backward_share")},
            "payload_bytes_per_step_all_ranks": sum(result["payload_bytes_per_step"] for result in per_rank),
            "loopback_bytes_per_step_all_ranks": per_rank[0].get("loopback_bytes_per_step"),
            "theoretical_wire_bytes_per_step_all_ranks": len(per_rank) * theoretical_wire_bytes(shape, tokens, ep,
                                                                                               dtype_name),
            "outside_gemm_ms_per_step": max(outside_gemm) if None not in outside_gemm else None,
            "cpu_share": statistics.mean(cpu_share(result) for result in per_rank)}


def row(key: Key, per_rank: list[dict], results: dict, tokens: int, limits: dict[str, dict]) -> dict:
    """One table row: :func:`across_ranks`, the fraction of the GEMM limit, ratios to the
    Transformers block and the dense ceiling of the same family and dtype (on one process) and to
    the same variant at ep 1, saved-for-backward bytes and the kernel."""
    family, variant, dtype_name, ep, processes = key
    base = {"family": family, "variant": variant, "dtype": dtype_name, "ep": ep, "processes": processes,
            "tokens_per_rank": tokens}
    unavailable = next((result["unavailable"] for result in per_rank if "unavailable" in result), None)
    if unavailable:
        return {**base, "unavailable": unavailable}
    common = across_ranks(per_rank, dict(STANDARD, family=family), tokens, ep, dtype_name)
    median, live = common["step_s_median"], common["peak_live_bytes"]

    def reference(name: str) -> dict | None:  # ``name`` at ep 1 on one process, same family and dtype
        found = results.get((family, name, dtype_name, 1, 1))
        return None if not found or "unavailable" in found[0] else found[0]

    hf, dense = reference("transformers"), reference("dense_ceiling")
    ep1 = reference("transformers" if variant == "transformers_ep" else variant) if ep > 1 else None
    saved = max(result["saved_bytes_sum"] for result in per_rank)
    return {**base, **common,
            "fraction_of_gemm_limit": common["gflops_per_rank"] / limits[dtype_name]["gflops"],
            "time_ratio_to_transformers": median / statistics.median(hf["step_s"]) if hf else None,
            "time_ratio_to_dense_ceiling": median / statistics.median(dense["step_s"]) if dense else None,
            "time_ratio_to_ep1": median / statistics.median(ep1["step_s"]) if ep1 else None,
            "peak_live_ratio_to_transformers": live / hf["peak_live_bytes"] if hf else None,
            "saved_bytes_sum": saved, "saved_ratio_to_transformers": saved / hf["saved_bytes_sum"] if hf else None,
            "saved_bytes_activations": max(result["saved_bytes_activations"] for result in per_rank),
            "peak_rss_growth_bytes": max(result["peak_rss_growth_bytes"] for result in per_rank),
            "kernel": per_rank[0].get("kernel_path") or per_rank[0].get("experts_implementation")
            or per_rank[0].get("kernel"),
            "expert_rows_per_rank": [result.get("expert_rows") for result in per_rank],
            "ranks": per_rank}


def plan_runs(dtypes: list[str]) -> list[Key]:
    """Every run of the benchmark, in order: the layer on one process (each family, dtype and
    variant), then EP on 2 processes (the control, then ep 2 for autoep and the peers)."""
    runs: list[Key] = []
    for family in FAMILIES:
        for dtype_name in dtypes:
            runs += [(family, variant, dtype_name, 1, 1) for variant in LAYER_VARIANTS]
    for family in FAMILIES:
        for dtype_name in dtypes:
            runs.append((family, "autoep", dtype_name, 1, 2))
            runs += [(family, variant, dtype_name, 2, 2) for variant in EP_VARIANTS]
    return runs


def peer_ratios(rows: list[dict]) -> list[dict]:
    """autoep against every other variant measured at the same family, dtype, EP size and process
    count: step time and peak live bytes, autoep's over the other's (< 1: autoep faster, smaller)."""
    measured = {(r["family"], r["variant"], r["dtype"], r["ep"], r["processes"]): r for r in rows
                if "unavailable" not in r}
    ratios = []
    for (family, variant, dtype_name, ep, processes), ours in measured.items():
        if variant not in ("autoep", "autoep_experts"):
            continue
        for (f, other, d, e, p), theirs in measured.items():
            if (f, d, e, p) == (family, dtype_name, ep, processes) and other != variant:
                ratios.append({"family": family, "dtype": dtype_name, "ep": ep, "processes": processes,
                               "variant": variant, "peer": other,
                               "time_ratio": ours["step_s_median"] / theirs["step_s_median"],
                               "peak_live_ratio": ours["peak_live_bytes"] / theirs["peak_live_bytes"]})
    return ratios


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def _ratio(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def print_tables(report: dict) -> None:
    meta = report["meta"]
    shape = STANDARD
    print(f"\nMoE layer benchmark: torch {meta['torch']}, transformers {meta['transformers']}, "
          f"deepspeed {meta['deepspeed']}, {meta['threads_per_process']} thread per process, "
          f"H={shape['hidden']} I={shape['intermediate']} E={shape['experts']} top-{shape['top_k']}, "
          f"{meta['tokens_per_process']} tokens per process (deepseek_v3: + 1 shared expert)")
    print(f"{FLOP_FORMULA}")
    before, after = meta["load_average_1min_before_after"]
    print(f"time: {meta['timing']}; load average (1 min) before/after the run: {before:.2f} / {after:.2f}\n")
    for dtype_name, limit in report["gemm_limit"].items():
        best = limit["shapes"][limit["best_shape"]]
        tried = ", ".join(f"{name} {shape['gflops']:.0f}" for name, shape in limit["shapes"].items())
        slow = f"; not tried (a smaller one took over {GEMM_SLOW_S:.0f} s): {', '.join(limit['skipped_slow'])}" \
            if limit.get("skipped_slow") else ""
        print(f"raw GEMM limit {dtype_name}: {limit['gflops']:.1f} GFLOP/s (torch.mm, one thread; {tried}; "
              f"best {limit['best_shape']} {best['m']}x{best['k']}x{best['n']}{slow})")
    for dtype_name, reason in report.get("not_timed", {}).items():
        print(f"{dtype_name}: {reason}")
    print()
    header = (f"{'family':<12}{'variant':<16}{'dtype':<6}{'ep':>3}{'pr':>3}{'step ms':>9}{'us/tok':>8}"
              f"{'GFLOP/s':>9}{'/limit':>7}{'t/hf':>6}{'t/dense':>8}{'t/ep1':>6}{'live MiB':>9}{'live/hf':>8}"
              f"{'saved/hf':>9}{'wire MiB':>9}{'lo MiB':>8}{'theory':>8}{'d+c':>6}{'nonGEMM':>8}{'cpu':>5}  kernel")
    print(header)
    print("-" * len(header))
    for r in report["rows"]:
        lead = f"{r['family']:<12}{r['variant']:<16}{r['dtype']:<6}{r['ep']:>3}{r['processes']:>3}"
        if "unavailable" in r:
            print(f"{lead}  not run: {r['unavailable']}")
            continue
        share = r.get("dispatch_combine_forward_share")
        print(f"{lead}{r['step_s_median'] * 1e3:>9.1f}{r['time_per_token_us']:>8.1f}{r['gflops_per_rank']:>9.1f}"
              f"{r['fraction_of_gemm_limit']:>7.0%}{_ratio(r['time_ratio_to_transformers']):>6}"
              f"{_ratio(r['time_ratio_to_dense_ceiling']):>8}{_ratio(r['time_ratio_to_ep1']):>6}"
              f"{mib(r['peak_live_bytes']):>9}{_ratio(r['peak_live_ratio_to_transformers']):>8}"
              f"{_ratio(r['saved_ratio_to_transformers']):>9}{mib(r['payload_bytes_per_step_all_ranks']):>9}"
              f"{mib(r['loopback_bytes_per_step_all_ranks']):>8}{mib(r['theoretical_wire_bytes_per_step_all_ranks']):>8}"
              f"{'' if share is None else f'{share:.0%}':>6}{_ratio(r['outside_gemm_ms_per_step'], '.0f'):>8}"
              f"{r['cpu_share']:>5.0%}  {r['kernel'] or ''}")
    print("\nautoep (whole block, and experts level) over each other variant at the same family, dtype, ep and "
          "processes (step time; peak live bytes):")
    for r in report.get("peer_ratios", []):
        print(f"  {r['variant']:<16}{r['family']:<12}{r['dtype']:<6}ep {r['ep']} on {r['processes']}: / {r['peer']:<16}"
              f"time {r['time_ratio']:.2f}  live {r['peak_live_ratio']:.2f}")
    print("\nep, pr: EP size and processes (ep 1 on 2 processes: the control, no communication). step ms: median step "
          "of the slowest rank; us/tok: per token of one rank. /limit: GFLOP/s over the raw GEMM limit of the dtype. "
          "t/hf, t/dense: step time over the Transformers block's, the dense ceiling's (same family and dtype, one "
          "process; < 1 is faster); t/ep1: over the same variant at ep 1 on one process (weak scaling, ideal 1.0). "
          "live: peak bytes of live tensors in one step (largest rank); saved/hf: saved-for-backward bytes over the "
          "block's. wire: payload handed to all_to_all_single for other ranks, lo: loopback bytes measured, theory: "
          "uniform routing (module docstring), per step, all ranks. d+c: autoep.dispatch + autoep.combine, share of "
          "the forward+backward step. nonGEMM: CPU ms per step outside the GEMM kernels (profiler self time of every "
          "other op: elementwise passes, copies, gathers, collectives; largest rank). cpu: CPU time / wall time (the "
          f"{os.cpu_count()} cores are shared).")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-results.json", help="JSON results (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1024 tokens, 1 warm-up, 2 steps")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL

    import deepspeed
    import transformers

    from benchmarks.peers import reason_not_run

    load_before = os.getloadavg()
    limits = gemm_limits(plan)
    dtypes, not_timed = timed_dtypes(limits)
    for reason in not_timed.values():
        print(reason, file=sys.stderr, flush=True)
    results: dict[Key, list[dict]] = {}
    for key in plan_runs(dtypes):
        family, variant, dtype_name, ep, processes = key
        reason = reason_not_run(variant, family, dtype_name, dtypes)
        if reason:
            results[key] = [{"rank": 0, "unavailable": reason}]
            continue
        print(f"measuring {family} {variant} {dtype_name} ep={ep} on {processes} process(es) ...", file=sys.stderr,
              flush=True)
        results[key] = run_fresh(processes, variant=variant, dtype_name=dtype_name, autoep_size=ep,
                                 shape=dict(STANDARD, family=family), **plan)
    for key, per_rank in results.items():
        if key[1] in ("autoep", "autoep_experts") and per_rank[0].get("kernel_path") != "grouped_mm":
            print(f"warning: autoep {key} ran {per_rank[0].get('kernel_path')!r}, not grouped_mm", file=sys.stderr)
    report = {
        "meta": {"torch": torch.__version__, "transformers": transformers.__version__,
                 "deepspeed": deepspeed.__version__,
                 "python": platform.python_version(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
                 "threads_per_process": 1, "shape": STANDARD,
                 "tokens_per_process": plan["tokens"], "flop_formula": FLOP_FORMULA,
                 "timing": (f"time.perf_counter per step, {plan['warmup']} warm-up then median of {plan['steps']}; "
                            "EP: barrier before each step, slowest rank"),
                 "plan": plan, "quick": args.quick},
        "gemm_limit": limits,
        "not_timed": not_timed,
        "rows": [row(key, per_rank, results, plan["tokens"], limits) for key, per_rank in results.items()],
    }
    report["peer_ratios"] = peer_ratios(report["rows"])
    report["meta"]["load_average_1min_before_after"] = [load_before[0], os.getloadavg()[0]]
    print_tables(report)
    with open(args.out, "w") as out:
        json.dump(report, out, indent=1)
    print(f"\nJSON: {args.out}")
    return report


if __name__ == "__main__":
    main()
