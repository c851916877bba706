"""Property tests: the fast router (autoep.routing) against the reference router, on logits
with ties, single tokens, one dominant expert and empty experts."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from autoep.dispatch import sort_by_expert, unsort
from autoep.routing import RoutingSpec, route
from reference.moe import route_token


@st.composite
def routing_cases(draw):
    groups = draw(st.sampled_from([None, 2, 4]))
    num_experts = draw(st.sampled_from([4, 8])) if groups else draw(st.integers(1, 9))
    score_func = draw(st.sampled_from(["softmax", "sigmoid"]))
    group_size = num_experts // groups if groups else num_experts
    topk_groups = draw(st.integers(1, groups)) if groups else None
    max_k = topk_groups * group_size if groups else num_experts
    group_score = ("top2_sum" if score_func == "sigmoid" else "max") if groups else None
    if groups and group_score == "top2_sum" and group_size < 2:
        group_score = "max"
    spec = RoutingSpec(
        num_experts=num_experts, top_k=draw(st.integers(1, max_k)), score_func=score_func,
        # router matmul in the (float64) input dtype: the fp32 rounding of router_matmul_fp32 would
        # break exact ties of sums that this test is about
        router_matmul_fp32=False, use_correction_bias=draw(st.booleans()) and score_func == "sigmoid",
        num_groups=groups, topk_groups=topk_groups, group_score=group_score,
        renormalize=draw(st.booleans()), renormalize_epsilon=draw(st.sampled_from([0.0, 1e-20])),
        scale=draw(st.sampled_from([1.0, 2.5])))
    num_tokens = draw(st.integers(1, 12))
    # Small integer logits: ties are common, and exact in float32.
    logits = draw(st.lists(st.lists(st.integers(-2, 2), min_size=num_experts, max_size=num_experts),
                           min_size=num_tokens, max_size=num_tokens))
    bias = draw(st.lists(st.sampled_from([0.0, 0.25, -0.25]), min_size=num_experts, max_size=num_experts))
    return spec, torch.tensor(logits, dtype=torch.float32), torch.tensor(bias)


@settings(max_examples=300, deadline=None)
@given(routing_cases())
def test_router_matches_reference_including_ties(case):
    spec, logits_TE, bias_E = case
    # Identity router weight: the logits are the hidden states themselves. In float64 both
    # routers add scores and biases in the same IEEE order, so even ties of sums (group scores)
    # are exact and the tie rule (lower index first) is what is tested.
    logits_TE = logits_TE.double()
    _, weights_TK, ids_TK = route(spec, logits_TE, torch.eye(spec.num_experts, dtype=torch.float64), bias_E)
    for token in range(logits_TE.shape[0]):
        expected = route_token(spec, logits_TE[token], [float(b) for b in bias_E], torch.float64)
        assert ids_TK[token].tolist() == expected.experts
        torch.testing.assert_close(weights_TK[token].double(), torch.stack(expected.weights).double(),
                                   rtol=1e-6, atol=1e-7)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 6), st.integers(1, 20), st.data())
def test_sort_then_unsort_is_identity_and_counts_are_exact(num_experts, num_tokens, data):
    top_k = data.draw(st.integers(1, num_experts))
    # every token picks top_k distinct experts; some experts may get nothing
    ids = [data.draw(st.permutations(range(num_experts)))[:top_k] for _ in range(num_tokens)]
    ids_TK = torch.tensor(ids)
    hidden_TH = torch.randn(num_tokens, 3)
    rows_RH, routing = sort_by_expert(hidden_TH, ids_TK, num_experts)
    assert routing.tokens_per_expert_E.tolist() == [sum(row.count(e) for row in ids) for e in range(num_experts)]
    assert rows_RH.shape[0] == num_tokens * top_k  # exactly the routed rows, no padding
    restored = unsort(rows_RH, routing)
    assert torch.equal(restored, hidden_TH[:, None, :].expand(-1, top_k, -1))


def test_all_tokens_to_one_expert_and_single_token():
    import autoep
    from matrix.models import CASES_BY_ID

    model = CASES_BY_ID["mixtral-top1"].build()
    autoep.apply(model)
    layer = model.model.layers[0].mlp
    with torch.no_grad():
        layer.router_module().weight.zero_()
        layer.router_module().weight[2] = 1.0  # a huge logit for expert 2 on positive inputs
    x = torch.rand(1, 5, 32) + 0.5
    _, _, ids = layer.router_module()(x.reshape(5, 32))
    assert ids.flatten().tolist() == [2] * 5
    out = layer(x)
    experts = layer.routed_experts()
    gate, up = torch.nn.functional.linear(x[0], experts.gate_up_proj[2]).chunk(2, -1)
    expected = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, experts.down_proj[2])
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-6)
    single = layer(x[:, :1])
    torch.testing.assert_close(single[0, 0], expected[0], rtol=1e-5, atol=1e-6)
    assert layer(x[:, :0]).shape == (1, 0, 32)


@st.composite
def softmax_after_topk_cases(draw):
    num_experts = draw(st.integers(1, 9))
    spec = RoutingSpec(num_experts=num_experts, top_k=draw(st.integers(1, num_experts)), softmax_after_topk=True,
                       renormalize=draw(st.booleans()), scale=draw(st.sampled_from([1.0, 2.5])),
                       weights_dtype=draw(st.sampled_from(["float32", "hidden"])))
    num_tokens = draw(st.integers(1, 12))
    logits = draw(st.lists(st.lists(st.integers(-3, 3), min_size=num_experts, max_size=num_experts),
                           min_size=num_tokens, max_size=num_tokens))
    return spec, torch.tensor(logits, dtype=torch.float64)


@settings(max_examples=200, deadline=None)
@given(softmax_after_topk_cases())
def test_softmax_after_topk_matches_reference_including_ties(case):
    """Top-k on the raw logits, weights = softmax over the k chosen logits (not the top-k of a
    softmax over all experts, whose weights do not sum to 1 without renormalisation)."""
    spec, logits_TE = case
    _, weights_TK, ids_TK = route(spec, logits_TE, torch.eye(spec.num_experts, dtype=torch.float64))
    for token in range(logits_TE.shape[0]):
        expected = route_token(spec, logits_TE[token], None, torch.float64)
        assert ids_TK[token].tolist() == expected.experts
        torch.testing.assert_close(weights_TK[token].double(), torch.stack(expected.weights).double(),
                                   rtol=1e-6, atol=1e-7)
        # the softmax over the k chosen sums to 1 (times the scale) whatever `renormalize` says
        assert abs(float(weights_TK[token].sum()) - spec.scale) < 1e-9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_after_topk_matches_transformers_granitemoe_router(dtype):
    """The field against a Transformers router that takes the softmax after the top-k
    (GraniteMoeTopKRouter: float32 softmax of the k chosen logits, weights in the hidden dtype)."""
    from transformers.models.granitemoe.configuration_granitemoe import GraniteMoeConfig
    from transformers.models.granitemoe.modeling_granitemoe import GraniteMoeTopKRouter

    config = GraniteMoeConfig(hidden_size=32, num_local_experts=6, num_experts_per_tok=3)
    router = GraniteMoeTopKRouter(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=generator) / 32 ** 0.5)
    router = router.to(dtype)
    hidden_TH = torch.randn(40, 32, generator=generator).to(dtype)
    stock_logits, stock_weights, stock_ids = router(hidden_TH)
    spec = RoutingSpec(num_experts=6, top_k=3, softmax_after_topk=True, weights_dtype="hidden")
    logits, weights, ids = route(spec, hidden_TH, router.weight)
    torch.testing.assert_close(logits.float(), stock_logits.float(), rtol=0, atol=0)
    assert torch.equal(ids, stock_ids)
    assert weights.dtype == stock_weights.dtype == dtype
    torch.testing.assert_close(weights, stock_weights, rtol=0, atol=0)


def test_softmax_after_topk_refuses_what_it_does_not_describe():
    with pytest.raises(ValueError, match="softmax_after_topk needs score_func='softmax'"):
        RoutingSpec(num_experts=4, top_k=2, score_func="sigmoid", softmax_after_topk=True)
    with pytest.raises(ValueError, match="softmax_after_topk needs"):
        RoutingSpec(num_experts=4, top_k=2, softmax_after_topk=True, use_correction_bias=True)
