"""The clamped GPT-OSS SwiGLU experts (Preset.clamped_swiglu, MiniMax-M3): the AutoEP experts and
the reference against Transformers' own experts and hand-computed values; alpha/limit are read
from the modules, and experts with a clamp no row declares are refused."""

import math

import pytest
import torch

import autoep
from autoep import DetectionError
from autoep.activations import clamped_swiglu
from autoep.experts import GroupedExperts
from matrix.models import CASES_BY_ID
from reference.moe import GATED_FORMULAS

CASE = "minimax_m3_vl-clamp0.5-alpha1.2-top3"


def test_formula_by_hand():
    gate = torch.tensor([10.0, -1.0, 0.25])
    up = torch.tensor([10.0, -10.0, 0.25])
    alpha, limit = 1.5, 7.0

    def expected(g, u):
        g, u = min(g, limit), max(min(u, limit), -limit)
        return (u + 1) * g / (1 + math.exp(-alpha * g))

    want = torch.tensor([expected(10.0, 10.0), expected(-1.0, -10.0), expected(0.25, 0.25)])
    torch.testing.assert_close(clamped_swiglu(gate, up, alpha, limit), want)
    torch.testing.assert_close(GATED_FORMULAS["swiglu_clamped"](gate, up, alpha, limit), want)


def test_grouped_experts_match_the_transformers_experts():
    model = CASES_BY_ID[CASE].build()
    stock = model.model.layers[0].mlp.experts
    hidden_TH = torch.randn(12, 32, generator=torch.Generator().manual_seed(3))
    ids_TK = torch.arange(12 * 3).reshape(12, 3) % 8
    weights_TK = torch.ones(12, 3)
    expected = stock(hidden_TH, ids_TK, weights_TK)
    experts = GroupedExperts(stock.gate_up_proj, stock.down_proj, activation="swiglu_clamped",
                             use_grouped_mm=False, activation_params=(1.2, 0.5))
    order = torch.sort(ids_TK.flatten(), stable=True).indices
    rows = experts(hidden_TH.repeat_interleave(3, dim=0)[order], torch.bincount(ids_TK.flatten(), minlength=8))
    got = torch.zeros_like(rows).index_copy_(0, order, rows).reshape(12, 3, 32).sum(dim=1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="needs \\(alpha, limit\\)"):
        GroupedExperts(stock.gate_up_proj, stock.down_proj, activation="swiglu_clamped")


def test_alpha_and_limit_are_read_from_the_modules():
    model = CASES_BY_ID[CASE].build()
    specs = autoep.inspect(model)
    assert {(s.activation, s.activation_params, s.shared_activation, s.shared_activation_params) for s in specs} == {
        ("swiglu_clamped", (1.2, 0.5), "swiglu_clamped", (1.2, 0.5))}
    model.model.layers[1].mlp.experts.swiglu_limit = None
    with pytest.raises(DetectionError, match="swiglu_limit, found None"):
        autoep.inspect(model, {"replacement": "block"})


def test_a_clamp_no_row_declares_is_refused():
    model = CASES_BY_ID[CASE].build()
    with pytest.raises(DetectionError, match="clamp settings .*swiglu_limit.*declares no other"):
        autoep.inspect(model, {"preset_model": "mixtral", "moe_layer_pattern": r"model\.layers\.\d+\.mlp"})
    mixtral = CASES_BY_ID["mixtral"].build()
    mixtral.model.layers[0].mlp.experts.limit = 7.0
    with pytest.raises(DetectionError, match="clamp settings \\{'limit': 7.0\\}"):
        autoep.inspect(mixtral, {"replacement": "block"})
    # At the experts level the stock experts' own gate runs (Mixtral's ignores a `limit` attribute).
    assert [spec.mode for spec in autoep.inspect(mixtral)] == ["experts", "experts"]


def test_experts_with_their_own_gate_are_refused():
    mixtral = CASES_BY_ID["mixtral"].build()
    experts = mixtral.model.layers[1].mlp.experts
    experts.__class__ = type("CustomGateExperts", (type(experts),), {"_apply_gate": lambda self, x: x})
    with pytest.raises(DetectionError, match="CustomGateExperts._apply_gate"):
        autoep.inspect(mixtral, {"replacement": "block"})
    # The experts level calls the class's own gate; the reference has no formula for it and says so.
    specs = autoep.inspect(mixtral)
    assert [spec.mode for spec in specs] == ["experts", "experts"] and specs[1].gate.kind == "unknown"
