"""The benchmark's accounting (benchmarks/moe_layer.py): the raw GEMM limit every variant is set
against, the rows' ratios, and the wire bytes autoep hands the AllToAll. Structure and exact
byte counts only; times are measured by ``nox -s bench``, never asserted."""

import pytest
import torch

from benchmarks.blocks import STANDARD, expert_flops
from benchmarks.moe_layer import GEMM_SHAPES, measure_gemm_limit, row, theoretical_wire_bytes


def test_gemm_limit_is_the_best_shape_measured():
    limit = measure_gemm_limit("fp32", tokens=64, warmup=0, steps=1)
    assert set(limit["shapes"]) == set(GEMM_SHAPES) and limit["threads"] == 1
    best = max(limit["shapes"].values(), key=lambda shape: shape["gflops"])
    assert limit["gflops"] == best["gflops"] == limit["shapes"][limit["best_shape"]]["gflops"] > 0
    gate_up = limit["shapes"]["routed_gate_up"]
    assert (gate_up["m"], gate_up["k"], gate_up["n"]) == (128, 512, 2048)  # 64 tokens x top-2 routed rows


def _result(step_s, live=10, saved=5):
    return {"step_s": [step_s] * 3, "step_cpu_s": [step_s] * 3, "peak_live_bytes": live, "saved_bytes_sum": saved,
            "saved_bytes_activations": 1, "peak_rss_growth_bytes": 0, "payload_bytes_per_step": 0.0,
            "loopback_bytes_per_step": None}


def test_rows_are_fractions_of_the_limit_and_ratios_to_the_block_of_their_own_family():
    tokens = 1024
    results = {}
    for family, scale in (("mixtral", 1.0), ("deepseek_v3", 3.0)):
        for dtype in ("fp32", "bf16"):
            for variant, seconds in (("autoep", 2.0), ("transformers", 4.0), ("dense_ceiling", 1.0)):
                results[family, variant, dtype, 1, 1] = [_result(seconds * scale, live=10 * scale)]
            results[family, "deepspeed", dtype, 1, 1] = [{"rank": 0, "unavailable": "DS-1: why"}]
    results["mixtral", "autoep", "bf16", 2, 2] = [_result(3.0), _result(5.0)]  # the slower rank counts
    limits = {"fp32": {"gflops": 100.0}, "bf16": {"gflops": 400.0}}
    rows = {key: row(key, per_rank, results, tokens, limits) for key, per_rank in results.items()}
    for key, r in rows.items():
        family, variant, dtype, ep, _ = key
        if variant == "deepspeed":
            assert r["unavailable"] == "DS-1: why" and "step_s_median" not in r
            continue
        gflops = expert_flops(dict(STANDARD, family=family), tokens) / r["step_s_median"] / 1e9
        assert r["gflops_per_rank"] == pytest.approx(gflops)
        assert r["fraction_of_gemm_limit"] == pytest.approx(gflops / limits[dtype]["gflops"])
    assert rows["deepseek_v3", "autoep", "fp32", 1, 1]["time_ratio_to_transformers"] == pytest.approx(0.5)
    assert rows["deepseek_v3", "autoep", "fp32", 1, 1]["time_ratio_to_dense_ceiling"] == pytest.approx(2.0)
    assert rows["deepseek_v3", "autoep", "fp32", 1, 1]["peak_live_ratio_to_transformers"] == pytest.approx(1.0)
    ep2 = rows["mixtral", "autoep", "bf16", 2, 2]
    assert ep2["step_s_median"] == 5.0 and ep2["time_ratio_to_ep1"] == pytest.approx(2.5)
    # deepseek_v3 counts its shared expert: one more row per token than mixtral's top-2.
    assert expert_flops(dict(STANDARD, family="deepseek_v3"), 10) == expert_flops(STANDARD, 10) * 3 / 2


def test_theoretical_wire_bytes_are_the_routed_rows_that_leave_the_rank():
    # 4 passes x T*K rows x (ep-1)/ep leaving x H x 2 bytes (bf16)
    assert theoretical_wire_bytes(STANDARD, 1024, 2, "bf16") == 4 * 1024 * 2 * 0.5 * 512 * 2
    assert theoretical_wire_bytes(STANDARD, 1024, 1, "fp32") == 0


def test_payload_counted_at_the_all_to_all_is_exactly_the_rows_sent_to_the_other_rank():
    """autoep_size 2 on 2 processes: the payload each rank hands all_to_all_single for the other is
    the rows that cross between the two ranks (each way, forward and backward) plus the per-expert
    counts; computed here from the same routing."""
    from autoep.launch import shared_pool

    tokens = 64
    per_rank = shared_pool(2).run("tests.test_bench_accounting:_payload_on_rank", tokens)
    for result in per_rank:
        assert result["payload_bytes_per_step"] == result["expected_bytes"] > 0, result


def _payload_on_rank(tokens: int) -> dict:
    import torch.distributed as dist

    from benchmarks.moe_layer import measure

    result = measure("autoep", "fp32", tokens, warmup=0, steps=1, profile_steps=0, autoep_size=2)
    # The same routing again: the router of the same weights on the same tokens.
    from benchmarks.blocks import build_block_model, block_of

    rank = dist.get_rank()
    router = block_of(build_block_model(STANDARD, torch.float32)).gate
    local = STANDARD["experts"] // 2

    def leaving(source: int) -> int:  # rows of rank ``source`` routed to the other rank's experts
        x = torch.randn(1, tokens, STANDARD["hidden"], generator=torch.Generator().manual_seed(1000 + source))
        with torch.no_grad():
            logits = torch.nn.functional.linear(x.view(-1, STANDARD["hidden"]), router.weight)
        return int(((logits.topk(STANDARD["top_k"], dim=-1).indices // local) != source).sum())

    # Dispatch and the combine's backward send this rank's leaving rows; the combine and the
    # dispatch's backward send back the rows the other rank sent here.
    rows = 2 * (leaving(rank) + leaving(1 - rank))
    counts_bytes = local * 8  # the count exchange: one int64 per expert of the other rank
    result["expected_bytes"] = rows * STANDARD["hidden"] * 4 + counts_bytes
    return result


def test_curves_plan_moves_one_knob_per_sweep_and_plots_every_sweep(tmp_path):
    from benchmarks import curves

    plan = curves.QUICK
    for sweep, processes, points in curves.sweeps(plan):
        for point in points:
            shape = point["shape"]
            moved = {key for key in ("experts", "top_k") if shape[key] != STANDARD[key]}
            assert moved <= ({"experts"} if sweep == "experts" else {"top_k"} if sweep == "top_k" else set())
            assert point["x"] == {"tokens": point["tokens"], "experts": shape["experts"], "top_k": shape["top_k"],
                                  "ep": point.get("autoep_size")}[sweep]
        assert processes == (max(plan["ep"]) if sweep == "ep" else 1)

    def fake(sweep, x, variant, dtype, ep=1):
        return {"sweep": sweep, "x": x, "variant": variant, "dtype": dtype, "ep": ep, "time_per_token_us": 1.0 + x,
                "peak_live_bytes": 2**20 * x, "dispatch_combine_forward_share": 0.1 if ep > 1 else 0.0,
                "loopback_bytes_per_step_all_ranks": 10.0 * (ep - 1),
                "theoretical_wire_bytes_per_step_all_ranks": 10.0 * (ep - 1)}

    records = [fake(s, x, v, "bf16") for s in ("tokens", "experts", "top_k") for x in (1, 2) for v in ("autoep", "transformers")]
    records += [fake("ep", x, "autoep", "bf16", ep=x) for x in (1, 2)]
    paths = curves.plot(records, str(tmp_path))
    assert [p.rsplit("/", 1)[1] for p in paths] == ["curve-tokens.png", "curve-experts.png", "curve-top_k.png",
                                                    "curve-ep.png"]
    assert all((tmp_path / p.rsplit("/", 1)[1]).read_bytes()[:4] == b"\x89PNG" for p in paths)


TINY = dict(hidden=64, intermediate=128, experts=4, top_k=2)


@pytest.mark.parametrize("variant,family", [("deepspeed", "deepseek_v3"), ("transformers_ep", "mixtral")])
def test_peer_blocks_compute_the_transformers_block_at_ep_2(variant, family):
    """The bench times a peer only as built by benchmarks/peers.py: at ep 2 on 2 processes each
    rank's output and input gradient equal the stock Transformers block's on its own tokens
    (float32), so a peer row times the same computation as autoep's."""
    from autoep.launch import RankPool

    # Fresh processes: the peers leave process-wide state behind (DeepSpeed's expert-group registry,
    # Transformers' device meshes), which must not reach the shared pools of other tests.
    with RankPool(2) as pool:
        outcomes = pool.run("tests.test_bench_accounting:_peer_against_block", variant, family)
    for outcome in outcomes:
        assert outcome["local_experts"] == TINY["experts"] // 2, outcome
        assert outcome["output"] and outcome["input_grad"], outcome


def _peer_against_block(variant: str, family: str) -> dict:
    import torch.distributed as dist

    from benchmarks.blocks import block_of, block_output, build_block_model, layer_inputs
    from benchmarks.peers import build
    from conformance.tolerances import compare, tolerance

    shape = dict(TINY, family=family)
    block, _ = build(variant, shape, torch.float32, 2)
    stock = block_of(build_block_model(shape, torch.float32))
    x, upstream = layer_inputs(shape, 32, torch.float32, seed=10 + dist.get_rank())
    outputs, grads = [], []
    for module in (block, stock):
        x.grad = None
        out = block_output(module(x))
        (out.float() * upstream).sum().backward()
        outputs.append(out.detach())
        grads.append(x.grad.clone())
    tol = tolerance(torch.float32)
    experts = [m for name, m in block.named_modules() if name.endswith("experts")][0]
    local = next(p for p in experts.parameters() if p.dim() == 3)
    local = local.to_local() if hasattr(local, "to_local") else local
    return {"local_experts": local.shape[0],
            "output": compare("output", outputs[0], outputs[1], tol).ok,
            "input_grad": compare("input grad", grads[0], grads[1], tol).ok}


def test_a_dtype_without_a_native_gemm_is_not_timed_and_the_output_says_why(monkeypatch):
    from benchmarks import moe_layer

    timed, reasons = moe_layer.timed_dtypes({"fp32": {"gflops": 90.0}, "bf16": {"gflops": 1.3}})
    assert timed == ["fp32"] and "bf16 GEMM reaches 1.30 GFLOP/s against fp32's 90.0" in reasons["bf16"]
    assert moe_layer.timed_dtypes({"fp32": {"gflops": 90.0}, "bf16": {"gflops": 400.0}}) == (["fp32", "bf16"], {})
    # A call slower than GEMM_SLOW_S stops the larger shapes (a fallback kernel would take minutes on them).
    monkeypatch.setattr(moe_layer, "GEMM_SLOW_S", 0.0)
    limit = moe_layer.measure_gemm_limit("fp32", tokens=64, warmup=2, steps=3)
    (tried,) = limit["shapes"]  # the smallest: 64 tokens x top-2 = 128 rows x I x H
    assert tried == limit["best_shape"] == "routed_down"
    assert set(limit["skipped_slow"]) == set(moe_layer.GEMM_SHAPES) - {tried}


def test_autoep_is_set_against_every_peer_measured_beside_it():
    from benchmarks.moe_layer import peer_ratios

    def r(variant, seconds, live, ep=1, processes=1, family="mixtral"):
        return {"family": family, "variant": variant, "dtype": "fp32", "ep": ep, "processes": processes,
                "step_s_median": seconds, "peak_live_bytes": live}

    rows = [r("autoep", 1.0, 80), r("transformers", 2.0, 100), r("dense_ceiling", 0.5, 40),
            {"family": "mixtral", "variant": "deepspeed", "dtype": "fp32", "ep": 1, "processes": 1,
             "unavailable": "DS-1"},
            r("autoep", 3.0, 60, ep=2, processes=2), r("transformers_ep", 6.0, 90, ep=2, processes=2),
            r("transformers", 1.0, 1, family="deepseek_v3")]  # another family: never compared
    ratios = {(x["ep"], x["peer"]): (x["time_ratio"], x["peak_live_ratio"]) for x in peer_ratios(rows)}
    assert ratios == {(1, "transformers"): (0.5, 0.8), (1, "dense_ceiling"): (2.0, 2.0),
                      (2, "transformers_ep"): (0.5, 60 / 90)}


def test_torchtitan_rows_say_why_they_are_not_run(monkeypatch):
    from benchmarks import peers
    from conformance import titan

    assert peers.reason_not_run("deepspeed", "mixtral", "fp32", ["fp32"]) is None
    monkeypatch.setattr(titan, "titan_installed", lambda: False)
    assert peers.reason_not_run("torchtitan", "mixtral", "fp32", ["fp32", "bf16"]).startswith(titan.NOT_INSTALLED)
    monkeypatch.setattr(titan, "titan_installed", lambda: True)
    assert peers.reason_not_run("torchtitan", "deepseek_v3", "fp32", ["fp32", "bf16"]).startswith("TT-2")
    assert peers.reason_not_run("torchtitan", "mixtral", "fp32", ["fp32"]).startswith("TT-5")
    assert peers.reason_not_run("torchtitan", "mixtral", "fp32", ["fp32", "bf16"]) is None


def test_outside_gemm_time_is_the_step_less_the_gemm_kernels_only():
    from benchmarks.moe_layer import Subject, profile_labels

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 1024, generator=generator).requires_grad_()
    weight = torch.randn(1024, 1024, generator=generator).requires_grad_()
    upstream = torch.randn(1024, 1024, generator=generator)
    elementwise = profile_labels(Subject(lambda t: torch.sigmoid(t) * t, x, upstream, []), count=2, barrier=False)
    # no GEMM in the step: every microsecond of it is outside (self times sum to the step's total)
    assert elementwise["outside_gemm"] == pytest.approx(elementwise["bench.step"], rel=1e-6)
    assert elementwise.get("autoep.dispatch", 0.0) == 0.0
    gemm = profile_labels(Subject(lambda t: t @ weight, x, upstream, [weight]), count=2, barrier=False)
    # The three mm (forward, d x, d weight: 6.4 GFLOP) are left out; what remains (a mul and a sum over
    # 1024 x 1024, autograd glue) is a small part of the step on any CPU: a structural bound, not a speed.
    assert 0.0 < gemm["outside_gemm"] < 0.5 * gemm["bench.step"]
