"""Original Transformers model == reference == replaced model (logits, loss, aux loss, every
gradient), for every preset and routing variant, fp32 and bf16; and each block on its own."""

import pytest
import torch

from conformance.equivalence import block_equivalence, model_equivalence
from matrix.models import ALL_CASES, CASES_BY_ID
from conformance.subjects import SUBJECTS
from conformance.tolerances import tolerance
from autoep.versions import at_least

AUTOEP = SUBJECTS["autoep"]
RUNNABLE = [c for c in ALL_CASES if at_least(c.min_transformers) and c.refused_with is None]


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
    # every parameter's gradient (gradient names that differ between the runs are a failure above)
    assert sum(w.startswith("grad ") for w in compared) >= min(20, len(list(case.build().parameters())) // 2)


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
    from matrix.models import MIXTRAL, ModelCase

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


class ScaledSubject:
    """A broken subject: autoep with its routed scale multiplied by ``factor``."""
    name = "broken"

    def __init__(self, factor: float):
        self.factor = factor

    def unavailable_reason(self):
        return None

    def apply(self, model, block):
        import autoep

        autoep.apply(model, {**block, "routed_scaling_factor": self.factor})
        return model


def test_tolerance_detects_a_wrong_layer():
    """The suite can fail: a layer whose routing scale is off by 1% is caught."""
    result = model_equivalence(CASES_BY_ID["deepseek_v3"], ScaledSubject(1.01), torch.float32)
    assert not result.ok


def test_farther_run_takes_each_tensor_from_the_run_farther_from_the_oracle():
    """The bf16 baseline: per tensor, whichever legitimate bf16 run lies farther from the oracle."""
    from conformance.runs import RunOutput, farther_run

    oracle = RunOutput(torch.zeros(2), torch.tensor(1.0), None, {"a": torch.zeros(3), "b": torch.zeros(3)})
    near = RunOutput(torch.full((2,), 0.1), torch.tensor(1.5), None, {"a": torch.full((3,), 0.1),
                                                                     "b": torch.full((3,), 0.9)})
    far = RunOutput(torch.full((2,), 0.2), torch.tensor(1.1), None, {"a": torch.full((3,), 0.5),
                                                                    "b": torch.full((3,), 0.2)})
    picked = farther_run([near, far], oracle)
    assert torch.equal(picked.logits, far.logits) and torch.equal(picked.loss, near.loss)
    assert torch.equal(picked.grads["a"], far.grads["a"]) and torch.equal(picked.grads["b"], near.grads["b"])
    assert picked.aux_loss is None


def test_a_tie_free_batch_is_assembled_sequence_by_sequence_and_can_be_drawn_again(monkeypatch):
    """After the whole-batch draws, the batch is assembled from sequences drawn one by one (each tie-free
    alone), checked whole, and its recorded seed draws it again; the whole-batch draws come first."""
    from conformance import equivalence

    def tie_free(models, input_ids, dtype_name):  # a stand-in: a sequence is tie-free if it starts even
        return bool((input_ids[:, 0] % 2 == 0).all())

    monkeypatch.setattr(equivalence, "away_from_ties", tie_free)
    vocab, shape = 97, (6, 5)
    whole = [seed for seed in range(10, 10 + equivalence.WHOLE_BATCH_DRAWS)
             if tie_free(None, equivalence.batch(vocab, seed, shape), "")]
    assert not whole  # (1/64 per draw: the whole-batch draws find none here)
    ids, drawn = equivalence.tie_free_batch([], vocab, "bfloat16", 10, shape=shape)
    assert ids.shape == shape and tie_free(None, ids, "")
    assert drawn.startswith("rows:")
    seeds = [int(seed) for seed in drawn.removeprefix("rows:").split(",")]
    assert torch.equal(ids, torch.cat([equivalence.batch(vocab, seed, (1, shape[1])) for seed in seeds]))
    # a seed whose whole batch is tie-free is taken as it was before (an int)
    first = next(seed for seed in range(1000) if tie_free(None, equivalence.batch(vocab, seed, (2, 5)), ""))
    assert equivalence.tie_free_batch([], vocab, "bfloat16", first, shape=(2, 5))[1] == first


def test_a_cancelling_mean_is_judged_at_the_scale_of_its_terms():
    """A bf16 gradient reduced over ranks is the mean of micro-batch gradients, each rounded at its own
    scale: where they cancel (DeepSeek-V4's hc_scale, terms ~5e-3, mean ~2e-4), the bound is relative
    to the terms and Transformers' error is measured on the terms; a mis-scaled mean still fails."""
    from conformance.equivalence import _compare_runs
    from conformance.runs import RunOutput

    tol = tolerance(torch.bfloat16, "multi")
    terms = [torch.tensor([-3.5e-3]), torch.tensor([-3.7e-3]), torch.tensor([5.7e-3]), torch.tensor([1.0e-3])]
    mean = sum(terms) / 4  # -1.25e-4
    stock_terms = [t + torch.tensor([(-1) ** i * 3e-4]) for i, t in enumerate(terms)]  # bf16-sized errors
    oracle = RunOutput(torch.zeros(2), torch.tensor(1.0), None, {"w": mean}, {"w": terms})
    stock = RunOutput(torch.zeros(2), torch.tensor(1.0), None, {"w": mean + 1e-5}, {"w": stock_terms})

    def judged(value):
        subject = RunOutput(torch.zeros(2), torch.tensor(1.0), None, {"w": value})
        return [c for c in _compare_runs(subject, oracle, tol, False, stock) if c.what == "grad w"][0]

    assert judged(mean + 4e-4).ok  # 3x the mean, 1.3x the stock's error on the terms
    assert not judged(mean + 8e-4).ok  # beyond 2x the stock's error on the terms
    assert not judged(mean * 2 + 5e-3).ok  # off by O(1) of a term
    # without the terms (one micro-batch), the bound is relative to the mean itself
    assert not _compare_runs(RunOutput(torch.zeros(2), torch.tensor(1.0), None, {"w": mean + 4e-4}),
                             RunOutput(torch.zeros(2), torch.tensor(1.0), None, {"w": mean}), tol, False,
                             RunOutput(torch.zeros(2), torch.tensor(1.0), None, {"w": mean + 1e-5}))[-1].ok


@pytest.mark.parametrize("case_id", ["deepseek_v3", "qwen3_5_moe-top4"])
def test_bf16_bound_still_detects_a_wrong_layer(case_id):
    """With the two-baseline bf16 bound (Transformers, and the reference at bf16), a routed scale
    off by 5% is still caught."""
    result = model_equivalence(CASES_BY_ID[case_id], ScaledSubject(1.05), torch.bfloat16)
    assert not result.ok
