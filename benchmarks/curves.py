"""How the cost of one MoE layer grows: time per token and peak memory against tokens, experts
(at a fixed active FLOP budget), top-k, and the EP size (weak scaling on 4 processes), for autoep
and the Transformers block. JSON plus PNG plots in one folder, named in the output.

    PYTHONPATH=. python -m benchmarks.curves [--quick] [--out-dir bench-curves]

Every point is ``benchmarks.moe_layer.measure`` (the same timing, memory and wire counting as the
layer table) on the standard shape (benchmarks/blocks.py STANDARD, Mixtral) with one knob moved:

  tokens   512 ... 16384 tokens per process (E=8, top-2), fp32 and bf16
  experts  8, 16, 32, 64 experts at top-2 and I=1024: the active FLOPs per token stay fixed while
           the parameters grow (bf16, or fp32 where bf16 is not native)
  top_k    1, 2, 4, 8 of 8 experts (likewise): the active FLOPs grow with k; GFLOP/s shows the efficiency
  ep       autoep_size 1, 2, 4 on 4 processes, 4096 tokens per rank (weak scaling; ep 1 is the control:
           the same 4 processes, no communication), fp32 and bf16: time per token, the share of
           dispatch + combine in the step, and the wire bytes against uniform routing's theory

A dtype whose raw GEMM limit here is under half of fp32's (no AMX or AVX512-BF16) is not timed, and
the output says so (benchmarks.moe_layer.timed_dtypes).

A sweep's points run one after another in one pool of rank processes (one thread each), 2 warm-up
steps each (with one, the first point of a fresh process measured 343 us/token for autoep at 512
tokens where 5 steps after 2 warm-ups give 301, the same as the Transformers block); 4 processes
share this machine's cores, so the ep curve shows the cost of the exchange on top of that sharing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from benchmarks.blocks import STANDARD
from benchmarks.moe_layer import RUN_TIMEOUT_S, across_ranks, gemm_limits, timed_dtypes

FULL = dict(tokens=(512, 1024, 2048, 4096, 8192, 16384), experts=(8, 16, 32, 64), top_k=(1, 2, 4, 8), ep=(1, 2, 4),
            ep_tokens=4096, sweep_tokens=4096, warmup=2, steps=3, profile_steps=1)
QUICK = dict(tokens=(256, 512), experts=(8, 16), top_k=(1, 2), ep=(1, 2), ep_tokens=256, sweep_tokens=256, warmup=0,
             steps=1, profile_steps=1)
EP_PROCESSES = 4


def sweeps(plan: dict, dtypes: tuple[str, ...] = ("fp32", "bf16")) -> list[tuple[str, int, list[dict]]]:
    """(sweep, processes, points): each point the keyword arguments of one ``measure`` call plus
    ``x``, the value on the curve's horizontal axis. ``dtypes``: those timed on this machine
    (moe_layer.timed_dtypes); the experts and top-k sweeps use the last of them (bf16 where it is
    native, else fp32)."""
    timing = dict(warmup=plan["warmup"], steps=plan["steps"], profile_steps=plan["profile_steps"])
    variants = ("autoep", "transformers")
    tokens = [dict(x=t, variant=v, dtype_name=d, tokens=t, shape=STANDARD, **timing)
              for d in dtypes for v in variants for t in plan["tokens"]]
    experts = [dict(x=e, variant=v, dtype_name=dtypes[-1], tokens=plan["sweep_tokens"],
                    shape=dict(STANDARD, experts=e), **timing) for v in variants for e in plan["experts"]]
    top_k = [dict(x=k, variant=v, dtype_name=dtypes[-1], tokens=plan["sweep_tokens"],
                  shape=dict(STANDARD, top_k=k), **timing) for v in variants for k in plan["top_k"]]
    ep = [dict(x=size, variant="autoep", dtype_name=d, tokens=plan["ep_tokens"], shape=STANDARD,
               autoep_size=size, **timing) for d in dtypes for size in plan["ep"]]
    processes = min(EP_PROCESSES, max(plan["ep"]))
    return [("tokens", 1, tokens), ("experts", 1, experts), ("top_k", 1, top_k), ("ep", processes, ep)]


def point_record(sweep: str, point: dict, per_rank: list[dict]) -> dict:
    shape, tokens = point["shape"], point["tokens"]
    ep = point.get("autoep_size", 1)
    return {"sweep": sweep, "x": point["x"], "variant": point["variant"], "dtype": point["dtype_name"], "ep": ep,
            "processes": len(per_rank), "tokens_per_rank": tokens, "experts": shape["experts"], "top_k": shape["top_k"],
            **across_ranks(per_rank, shape, tokens, ep, point["dtype_name"])}


def run_sweeps(plan: dict, dtypes: tuple[str, ...]) -> list[dict]:
    from autoep.launch import RankPool

    records = []
    for sweep, processes, points in sweeps(plan, dtypes):
        with RankPool(processes) as pool:
            for point in points:
                kwargs = {key: value for key, value in point.items() if key != "x"}
                print(f"curve {sweep}: {point['variant']} {point['dtype_name']} x={point['x']} on {processes} "
                      f"process(es) ...", file=sys.stderr, flush=True)
                per_rank = pool.run("benchmarks.moe_layer:measure", timeout=RUN_TIMEOUT_S, **kwargs)
                records.append(point_record(sweep, point, per_rank))
    return records


def loopback_over_theory(record: dict) -> float | None:
    """Loopback bytes per step over uniform routing's theory (None without traffic in theory or a count)."""
    theory, loopback = record["theoretical_wire_bytes_per_step_all_ranks"], record["loopback_bytes_per_step_all_ranks"]
    return loopback / theory if theory and loopback is not None else None


AXES = {"tokens": "tokens per process", "experts": "experts (top-2, active FLOPs fixed)",
        "top_k": "top-k (of 8 experts)", "ep": f"autoep_size (on {EP_PROCESSES} processes, weak scaling)"}


def plot(records: list[dict], out_dir: str) -> list[str]:
    """One PNG per sweep: time per token (left) and, beside it, peak live memory, or for the ep
    sweep the dispatch+combine share and the wire bytes against theory. Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for sweep in AXES:
        points = [r for r in records if r["sweep"] == sweep]
        if not points:
            continue
        figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        series = sorted({(r["variant"], r["dtype"]) for r in points})
        for variant, dtype in series:
            line = sorted((r for r in points if (r["variant"], r["dtype"]) == (variant, dtype)), key=lambda r: r["x"])
            xs = [r["x"] for r in line]
            left.plot(xs, [r["time_per_token_us"] for r in line], marker="o", label=f"{variant} {dtype}")
            if sweep == "ep":
                right.plot(xs, [100 * (r["dispatch_combine_forward_share"] or 0) for r in line], marker="o",
                           label=f"dispatch+combine share % {dtype}")
                right.plot(xs, [100 * (loopback_over_theory(r) or 0) for r in line],
                           marker="x", linestyle="--", label=f"loopback bytes / theory % {dtype}")
            else:
                right.plot(xs, [r["peak_live_bytes"] / 2**20 for r in line], marker="o", label=f"{variant} {dtype}")
        ticks = sorted({r["x"] for r in points})
        for axis in (left, right):
            axis.set_xlabel(AXES[sweep])
            if sweep in ("tokens", "experts"):
                axis.set_xscale("log", base=2)
            axis.set_xticks(ticks, [str(tick) for tick in ticks])
            axis.grid(True, alpha=0.3)
            axis.legend(fontsize=8)
        left.set_ylabel("time per token (us), forward + backward")
        right.set_ylabel("percent" if sweep == "ep" else "peak live memory (MiB)")
        figure.suptitle(f"MoE layer cost against {AXES[sweep]} (H={STANDARD['hidden']}, I={STANDARD['intermediate']})")
        figure.tight_layout()
        path = os.path.join(out_dir, f"curve-{sweep}.png")
        figure.savefig(path, dpi=110)
        plt.close(figure)
        paths.append(path)
    return paths


def print_records(records: list[dict]) -> None:
    header = (f"{'sweep':<8}{'x':>7}{'variant':<14}{'dtype':<6}{'ep':>3}{'pr':>3}{'us/tok':>9}{'GFLOP/s':>9}"
              f"{'live MiB':>10}{'d+c':>6}{'lo/theory':>10}{'cpu':>5}")
    print(header)
    print("-" * len(header))
    for r in records:
        wire = loopback_over_theory(r)
        wire = "-" if wire is None else f"{wire:.2f}"
        share = r["dispatch_combine_forward_share"]
        print(f"{r['sweep']:<8}{r['x']:>7} {r['variant']:<13}{r['dtype']:<6}{r['ep']:>3}{r['processes']:>3}"
              f"{r['time_per_token_us']:>9.1f}{r['gflops_per_rank']:>9.1f}{r['peak_live_bytes'] / 2**20:>10.1f}"
              f"{'-' if share is None else f'{share:.0%}':>6}{wire:>10}{r['cpu_share']:>5.0%}")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default="bench-curves", help="folder for curves.json and the PNGs")
    parser.add_argument("--quick", action="store_true", help="smoke test: two small points per sweep")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    os.makedirs(args.out_dir, exist_ok=True)
    limits = gemm_limits(dict(tokens=plan["sweep_tokens"], warmup=plan["warmup"], steps=plan["steps"]))
    dtypes, not_timed = timed_dtypes(limits)
    for dtype_name, reason in not_timed.items():
        print(f"{dtype_name}: {reason}", file=sys.stderr, flush=True)
    records = run_sweeps(plan, tuple(dtypes))
    print()
    for dtype_name, reason in not_timed.items():
        print(f"{dtype_name}: {reason}")
    print_records(records)
    with open(os.path.join(args.out_dir, "curves.json"), "w") as out:
        json.dump({"plan": {key: list(value) if isinstance(value, tuple) else value for key, value in plan.items()},
                   "shape": STANDARD, "gemm_limit": limits, "not_timed": not_timed, "records": records}, out,
                  indent=1)
    paths = plot(records, args.out_dir)
    print(f"\ncurves: {os.path.join(args.out_dir, 'curves.json')} and {', '.join(paths)}")
    return records


if __name__ == "__main__":
    main()
