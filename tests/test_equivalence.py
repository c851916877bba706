"""Original Transformers model == reference == replaced model (logits, loss, aux loss, every
gradient), for every preset and routing variant, fp32 and bf16; and each block on its own."""

import pytest
import torch

from conformance.equivalence import block_equivalence, model_equivalence
from conformance.models import ALL_CASES, CASES_BY_ID
from conformance.subjects import SUBJECTS
from conformance.tolerances import tolerance
from autoep.versions import at_least

AUTOEP = SUBJECTS["autoep"]
RUNNABLE = [c for c in ALL_CASES if at_least(c.min_transformers)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", RUNNABLE, ids=lambda c: c.id)
def test_model_equivalence(case, dtype):
    result = model_equivalence(case, AUTOEP, dtype)
    assert result.ok, "\n".join(result.failures())
    pairs = set(result.comparisons)
    assert "subject~reference" in pairs
    if dtype == torch.float32:
        assert {"subject~original", "original~reference"} <= pairs
    compared = [c.what for c in result.comparisons["subject~reference"]]
    assert "logits" in compared and "loss" in compared
    assert ("aux_loss" in compared) == case.has_aux_loss
    assert sum(w.startswith("grad ") for w in compared) >= 20  # every parameter's gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", RUNNABLE, ids=lambda c: c.id)
def test_block_equivalence(case, dtype):
    for result in block_equivalence(case, AUTOEP, dtype):
        assert result.ok, "\n".join(result.failures())
        assert {"subject~reference", "subject~original"} <= set(result.comparisons)


@pytest.mark.parametrize("use_grouped_mm", [True, False], ids=["grouped_mm", "loop"])
def test_both_expert_kernels_match_reference(use_grouped_mm):
    import autoep

    case = CASES_BY_ID["qwen3_moe"]
    result = model_equivalence(case, AUTOEP, torch.float32, block={"use_grouped_mm": use_grouped_mm})
    assert result.ok, "\n".join(result.failures())
    model = autoep.apply(case.build(), {"use_grouped_mm": use_grouped_mm})
    model(input_ids=torch.tensor([[1, 2, 3]]))
    paths = {layer.routed_experts().last_path for _, layer in autoep.replaced_layers(model)}
    assert paths == {"grouped_mm" if use_grouped_mm else "loop"}


def test_unaligned_shapes_fall_back_to_loop():
    """grouped_mm refuses rows that are not 16-byte aligned (fp32: width % 4); the loop runs."""
    import autoep
    from conformance.models import MIXTRAL, ModelCase

    case = ModelCase("mixtral-I18", "mixtral", "mixtral", "mixtral:MixtralConfig", "mixtral:MixtralForCausalLM",
                     dict(MIXTRAL, intermediate_size=18))
    result = model_equivalence(case, AUTOEP, torch.float32)
    assert result.ok, "\n".join(result.failures())
    model = autoep.apply(case.build())
    model(input_ids=torch.tensor([[1, 2, 3]]))
    assert {layer.routed_experts().last_path for _, layer in autoep.replaced_layers(model)} == {"loop"}


def test_float64_layer_equals_float64_reference():
    """float64 (loop path: grouped_mm has no float64 kernel) against the float64 oracle.
    (DeepSeek routers are specified to run their matmul in float32, so a softmax family.)"""
    case = CASES_BY_ID["qwen2_moe-norm"]
    for result in block_equivalence(case, AUTOEP, torch.float64):
        comparisons = result.comparisons["subject~reference"]
        tol = tolerance(torch.float64)
        assert all(c.max_abs_diff <= tol.atol + 1e-9 for c in comparisons), comparisons


def test_tolerance_detects_a_wrong_layer():
    """The suite can fail: a layer whose routing scale is off by 1% is caught."""
    import autoep

    class ScaledSubject:
        name = "broken"

        def unavailable_reason(self):
            return None

        def apply(self, model, block):
            autoep.apply(model, {**block, "routed_scaling_factor": 1.01})
            return model

    result = model_equivalence(CASES_BY_ID["deepseek_v3"], ScaledSubject(), torch.float32)
    assert not result.ok
