"""AllToAll dispatch and combine on real rank processes, one MoE block at a time.

Each rank feeds its own tokens (any count, zero included) through the block with the
objective sum(output * upstream); the outputs and input gradients (per token) and the
parameter gradients (summed over the ranks holding each parameter) must equal the float64
reference block run on all ranks' tokens at once. The edge cases force routings by
construction; the wire test counts what every all_to_all_single call moves.
"""

import pytest
import torch

import autoep
from conformance.equivalence import NEAR_TIE, _correction_bias, _margins, layouts
from matrix.models import CASES_BY_ID
from conformance.parallel import block_on_ranks, gradient_sums, set_router_weight
from conformance.subjects import SUBJECTS
from conformance.tolerances import compare, tolerance
from reference.model import block_weights
from reference.moe import reference_block
from autoep import launch

pytestmark = pytest.mark.xdist_group("ranks")

AUTOEP = SUBJECTS["autoep"]
BLOCK = "model.layers.0.mlp"
HIDDEN = 32


def _reference(case, router_weight, hidden_TH, upstream_TH, dtype=torch.float32):
    original = case.build(dtype=dtype)
    if router_weight is not None:
        set_router_weight(original, BLOCK, router_weight)
    spec = next(spec for spec in autoep.inspect(original) if spec.name == BLOCK)
    block = original.get_submodule(BLOCK)
    x_TH = hidden_TH.clone().requires_grad_(True)
    out_TH, logits_TE, routes = reference_block(spec.routing, block_weights(block, layouts([spec])[0]), x_TH,
                                                compute_dtype=torch.float64)
    (out_TH.to(torch.float64) * upstream_TH.to(torch.float64)).sum().backward()
    grads = {name: p.grad for name, p in block.named_parameters() if p.grad is not None}
    router = getattr(block, spec.router_attr)
    margin = min(_margins(spec.routing, logits_TE, _correction_bias(router, spec.routing)), default=1.0)
    return {"output": out_TH.detach(), "input_grad": x_TH.grad, "grads": grads, "routes": routes, "margin": margin}


def _forced_router(chosen: list[int], num_experts: int, generator) -> torch.Tensor:
    """Router weight under which every token (with hidden[:, 0] = 4) scores ~+12 on the
    ``chosen`` experts and ~-12 on the others."""
    weight_EH = 0.05 * torch.randn(num_experts, HIDDEN, generator=generator)
    weight_EH[:, 0] = torch.tensor([3.0 if e in chosen else -3.0 for e in range(num_experts)])
    return weight_EH


def run_scenario(case_id: str, autoep_size: int, token_counts: list[int], chosen: list[int] | None = None,
                 seed: int = 0):
    """Run the block on ``len(token_counts)`` ranks and compare with the reference; returns
    (rank outputs, reference)."""
    case = CASES_BY_ID[case_id]
    generator = torch.Generator().manual_seed(seed)
    num_experts = next(iter(autoep.inspect(case.build()))).num_experts
    router_weight = _forced_router(chosen, num_experts, generator) if chosen is not None else None
    for _ in range(100):  # inputs away from routing near-ties (see NEAR_TIE)
        hidden = [torch.randn(count, HIDDEN, generator=generator) for count in token_counts]
        if chosen is not None:
            for tokens in hidden:
                tokens[:, 0] = 4.0
        upstream = [torch.randn(count, HIDDEN, generator=generator) for count in token_counts]
        reference = _reference(case, router_weight, torch.cat(hidden), torch.cat(upstream))
        if reference["margin"] > NEAR_TIE["float32"]:
            break
    outputs = block_on_ranks(case, AUTOEP, BLOCK, autoep_size, hidden, upstream, router_weight)
    tol = tolerance(torch.float32, "multi")
    checks = [compare("output", torch.cat([o["output"] for o in outputs]), reference["output"], tol),
              compare("input grad", torch.cat([o["input_grad"] for o in outputs]), reference["input_grad"], tol)]
    sums = gradient_sums([o["grads"] for o in outputs], [o["expert_shards"] for o in outputs])
    assert sums.keys() == reference["grads"].keys()
    checks += [compare(f"grad {name}", sums[name], reference["grads"][name], tol) for name in sums]
    failures = [str(check) for check in checks if not check.ok]
    assert not failures, failures
    return outputs, reference


def _received_rows(outputs) -> list[int]:
    """Rows each rank's experts received (the dispatch AllToAll's output, in rows)."""
    return [o["wire"][1]["received"] // HIDDEN if o["wire"] else None for o in outputs]


def test_rank_with_no_tokens():
    outputs, _ = run_scenario("mixtral", 2, [0, 9])
    assert outputs[0]["output"].shape == (0, HIDDEN)
    assert outputs[0]["wire"][1]["sent"] == 0  # the token AllToAll sends nothing from rank 0


def test_rank_that_receives_no_tokens():
    # Experts 0 and 1 live on EP rank 0; every token picks exactly them (top-2).
    outputs, _ = run_scenario("mixtral", 2, [6, 5], chosen=[0, 1])
    assert _received_rows(outputs) == [22, 0]
    # Rank 1's experts saw no token: their gradients exist (the engine reduces them) and are zero.
    for name, shard in outputs[1]["expert_shards"].items():
        grad = outputs[1]["grads"][name]
        assert grad is not None and not bool(grad.any())


def test_every_token_routed_to_one_expert():
    outputs, _ = run_scenario("mixtral-top1", 4, [3, 4, 5, 2], chosen=[3])
    assert _received_rows(outputs) == [0, 0, 0, 14]


def test_micro_batch_of_one_token():
    run_scenario("mixtral", 2, [1, 1])
    run_scenario("qwen2_moe", 4, [1, 1, 1, 1])  # with a gated shared expert; autoep_size=4


def test_token_counts_not_divisible_by_anything_convenient():
    run_scenario("mixtral", 4, [7, 13, 1, 5])
    run_scenario("deepseek_v3", 2, [11, 3])  # 8 experts, 4 per rank, correction bias


def test_top_k_equals_number_of_experts():
    run_scenario("mixtral-topk_eq_E", 2, [5, 7])
    run_scenario("mixtral-topk_eq_E", 4, [3, 2, 6, 1])


@pytest.mark.parametrize("world_size,autoep_size", [(2, 2), (4, 2), (4, 4)])
def test_all_to_all_moves_exactly_the_routed_rows(world_size, autoep_size):
    token_counts = [5, 9, 2, 7][:world_size]
    outputs, reference = run_scenario("mixtral", autoep_size, token_counts, seed=7)
    num_experts, top_k = 4, 2
    per_rank = num_experts // autoep_size
    owner = [route_rank for route_rank in range(world_size) for _ in range(token_counts[route_rank])]
    for rank, output in enumerate(outputs):
        ep_group = range(rank - rank % autoep_size, rank - rank % autoep_size + autoep_size)
        first = (rank % autoep_size) * per_rank
        # Rows rank's experts receive: every routed slot of its EP group's tokens that picks one of them.
        received = sum(1 for token, route in enumerate(reference["routes"]) if owner[token] in ep_group
                       for expert in route.experts if first <= expert < first + per_rank)
        sent = token_counts[rank] * top_k
        expected = [
            (num_experts, num_experts),            # count exchange: one count per expert
            (sent * HIDDEN, received * HIDDEN),    # dispatch
            (received * HIDDEN, sent * HIDDEN),    # combine
            (sent * HIDDEN, received * HIDDEN),    # combine backward
            (received * HIDDEN, sent * HIDDEN),    # dispatch backward
        ]
        assert [(call["sent"], call["received"]) for call in output["wire"]] == expected, f"rank {rank}"
        assert output["wire"][0]["dtype"] == "torch.int64"
    # Over the EP group, what is sent is exactly what is received: T*K rows, no padding.
    assert sum(o["wire"][1]["sent"] for o in outputs) == sum(token_counts) * top_k * HIDDEN


def test_autoep_size_one_runs_no_collective():
    outputs, _ = run_scenario("mixtral", 1, [4, 6])
    assert [o["wire"] for o in outputs] == [[], []]


def router_finite_differences_on_rank(case_id: str, autoep_size: int, hidden_TH, upstream_TH, step: float):
    """Rank side: this rank's analytic router-weight gradient, and its local objective at
    w +- step for every router weight entry (the same perturbation on every rank, in lockstep)."""
    model = autoep.apply(CASES_BY_ID[case_id].build(dtype=torch.float64), {"autoep_size": autoep_size})
    block = model.get_submodule(BLOCK)
    weight = block.router_module().weight

    def objective(x_TH):
        return (block(x_TH.unsqueeze(0)).squeeze(0) * upstream_TH).sum()

    objective(hidden_TH).backward()
    plus, minus = [], []
    with torch.no_grad():
        flat = weight.view(-1)
        for index in range(flat.numel()):
            original = float(flat[index])
            flat[index] = original + step
            plus.append(float(objective(hidden_TH)))
            flat[index] = original - step
            minus.append(float(objective(hidden_TH)))
            flat[index] = original
    return weight.grad.clone(), torch.tensor(plus, dtype=torch.float64), torch.tensor(minus, dtype=torch.float64)


def test_router_gradient_matches_finite_differences_through_dispatch():
    case, step = CASES_BY_ID["mixtral"], 1e-6
    generator = torch.Generator().manual_seed(11)
    for _ in range(100):  # routing decisions far from ties: no decision may flip within +-step
        hidden = [torch.randn(count, HIDDEN, generator=generator, dtype=torch.float64) for count in (6, 5)]
        upstream = [torch.randn(count, HIDDEN, generator=generator, dtype=torch.float64) for count in (6, 5)]
        reference = _reference(case, None, torch.cat(hidden), torch.cat(upstream), dtype=torch.float64)
        if reference["margin"] > 1e-3:
            break
    calls = [((case.id, 2, h, u, step), {}) for h, u in zip(hidden, upstream)]
    results = launch.shared_pool(2).run_per_rank(router_finite_differences_on_rank, calls)
    analytic = sum(result[0] for result in results)
    numeric = ((sum(result[1] for result in results) - sum(result[2] for result in results)) / (2 * step))
    result = compare("router weight gradient vs central differences", analytic,
                     numeric.view_as(analytic), tolerance("float64", "finite_difference"))
    assert result.ok, str(result)
    assert float(analytic.abs().max()) > 1e-3  # the check is not vacuous
    # ... and the same gradient as the float64 reference block.
    router_grad = reference["grads"]["gate.weight"]
    assert compare("router grad vs reference", analytic, router_grad, tolerance("float64")).ok
