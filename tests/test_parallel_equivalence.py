"""Expert parallelism on real rank processes equals the single-process reference.

World sizes 1, 2 and 4 with every autoep_size dividing them, every preset: each rank runs
its own micro-batch of one global batch; logits (gathered), the global-batch loss, the aux
loss (per micro-batch) and every gradient (reduced as an engine reduces them, see
conformance/parallel.py) equal the reference, in float32 at the multi-process tolerance.
"""

import pytest
import torch

import autoep
from autoep.versions import at_least
from conformance.equivalence import model_equivalence
from matrix.models import DEFAULT_CASES
from conformance.parallel import subject_step_on_rank
from conformance.subjects import SUBJECTS
from conformance.tolerances import compare, tolerance
from autoep import launch

AUTOEP = SUBJECTS["autoep"]
RUNNABLE = [case for case in DEFAULT_CASES if at_least(case.min_transformers)]
TOPOLOGIES = [(1, 1), (2, 1), (2, 2), (4, 1), (4, 2), (4, 4)]  # (world size, autoep_size)

pytestmark = pytest.mark.xdist_group("ranks")  # one xdist worker owns the rank pools


def _check(result):
    assert result.ok, "\n".join(result.failures())
    # bf16 is bounded against the oracle, with Transformers' own bf16 error as the baseline.
    assert "subject~reference" in result.comparisons
    assert "subject~original" in result.comparisons or result.dtype == "bfloat16"
    compared = [c.what for c in result.comparisons["subject~reference"]]
    assert sum(what.startswith("grad ") for what in compared) >= 20  # every parameter's gradient


@pytest.mark.parametrize("world_size,autoep_size", TOPOLOGIES, ids=lambda v: str(v))
@pytest.mark.parametrize("case", RUNNABLE, ids=lambda c: c.id)
def test_parallel_model_equivalence_fp32(case, world_size, autoep_size):
    _check(model_equivalence(case, AUTOEP, torch.float32, world_size=world_size, autoep_size=autoep_size))


@pytest.mark.parametrize("case", [c for c in RUNNABLE if c.id in ("mixtral", "deepseek_v3")], ids=lambda c: c.id)
def test_parallel_model_equivalence_bf16(case):
    _check(model_equivalence(case, AUTOEP, torch.bfloat16, world_size=4, autoep_size=2))


def _expert_grads(case, world_size, autoep_size, input_ids):
    outputs = launch.run(world_size, subject_step_on_rank, case.id, "autoep", "float32", 0,
                         {"autoep_size": autoep_size}, input_ids)
    from conformance.parallel import reduce_like_an_engine

    grads = reduce_like_an_engine(outputs)
    expert_names = outputs[0]["expert_shards"].keys()
    return {name: grads[name] for name in expert_names}


@pytest.mark.parametrize("case", [c for c in RUNNABLE if c.id in ("mixtral", "qwen2_moe")], ids=lambda c: c.id)
def test_expert_gradients_do_not_depend_on_autoep_size(case):
    input_ids = torch.randint(0, 96, (4, 8), generator=torch.Generator().manual_seed(3))
    by_size = {ep: _expert_grads(case, 4, ep, input_ids) for ep in (1, 2, 4)}
    tol = tolerance(torch.float32, "multi")
    assert by_size[1].keys() == by_size[2].keys() == by_size[4].keys() and by_size[1]
    for ep in (2, 4):
        for name, grad in by_size[ep].items():
            assert grad.shape == by_size[1][name].shape
            result = compare(f"{name} at autoep_size={ep} vs 1", grad, by_size[1][name], tol)
            assert result.ok, str(result)
            assert float(grad.abs().max()) > 0


def apply_and_report_on_rank(case_id: str, block: dict) -> dict:
    """Rank side of the rejection test: apply, and report the error and whether the model
    (module types and every tensor) is unchanged."""
    from matrix.models import CASES_BY_ID, ModelSnapshot

    model = CASES_BY_ID[case_id].build()
    snapshot = ModelSnapshot.of(model)
    try:
        autoep.apply(model, block)
        error = None
    except Exception as caught:
        error = f"{type(caught).__name__}: {caught}"
    return {"error": error, "unchanged": snapshot.unchanged(model)}


def test_autoep_size_must_divide_world_size():
    # mixtral has 4 experts: autoep_size=4 divides them but not a world of 2.
    outcomes = launch.run(2, apply_and_report_on_rank, "mixtral", {"autoep_size": 4})
    for outcome in outcomes:
        assert outcome["unchanged"]
        assert outcome["error"].startswith("AutoEPConfigError: expert_parallel.autoep_size=4 does not divide the "
                                           "data-parallel world size 2; valid sizes for this model and world "
                                           "size 2: [1, 2]")


def test_autoep_size_above_one_needs_torch_distributed(mixtral):
    from matrix.models import ModelSnapshot

    snapshot = ModelSnapshot.of(mixtral)
    with pytest.raises(RuntimeError, match=r"autoep_size=2 needs torch.distributed to be initialized"):
        autoep.apply(mixtral, {"autoep_size": 2})
    assert snapshot.unchanged(mixtral)


class SwappedExpertsSubject:
    """AutoEP with a deliberate bug: odd EP ranks hold their experts in reversed order (a
    wrong slice). The multi-process suite must fail it."""

    name = "test_parallel_equivalence:SWAPPED"

    def unavailable_reason(self):
        return None

    def apply(self, model, block):
        model = AUTOEP.apply(model, block)
        for _, layer in autoep.replaced_layers(model):
            if layer.ep_groups is not None and layer.ep_groups.ep_rank % 2 == 1:
                with torch.no_grad():
                    for param in layer.routed_experts().parameters():
                        param.copy_(param.flip(0))
        return model

    def expert_shards(self, model):
        return AUTOEP.expert_shards(model)


SWAPPED = SwappedExpertsSubject()


def test_suite_detects_a_wrong_expert_slice():
    case = next(c for c in RUNNABLE if c.id == "mixtral")
    result = model_equivalence(case, SWAPPED, torch.float32, world_size=2, autoep_size=2)
    assert not result.ok
    failed = {c.what for c in result.comparisons["subject~reference"] if not c.ok}
    assert "logits" in failed and "grad model.layers.0.mlp.experts.gate_up_proj" in failed


def reduced_step_on_rank(case_id: str, autoep_size: int, input_ids) -> dict:
    """Rank side: one micro-batch, then autoep.reduce_gradients; the reduced local gradients."""
    import torch.distributed as dist

    from matrix.models import CASES_BY_ID

    model = autoep.apply(CASES_BY_ID[case_id].build(), {"autoep_size": autoep_size})
    micro_ids = input_ids.chunk(dist.get_world_size())[dist.get_rank()]
    model(input_ids=micro_ids, labels=micro_ids).loss.backward()
    autoep.reduce_gradients(model)
    return {"grads": {n: p.grad.clone() for n, p in model.named_parameters()},
            "expert_shards": AUTOEP.expert_shards(model)}


@pytest.mark.parametrize("autoep_size", [1, 2, 4])
def test_reduce_gradients_reduces_like_an_engine(autoep_size):
    from conformance.parallel import reduce_like_an_engine

    input_ids = torch.randint(0, 96, (4, 8), generator=torch.Generator().manual_seed(5))
    expected = reduce_like_an_engine(launch.run(4, subject_step_on_rank, "qwen2_moe", "autoep", "float32", 0,
                                                {"autoep_size": autoep_size}, input_ids))
    tol = tolerance(torch.float32, "multi")
    for rank, result in enumerate(launch.run(4, reduced_step_on_rank, "qwen2_moe", autoep_size, input_ids)):
        assert result["grads"].keys() == expected.keys()
        for name, grad in result["grads"].items():
            first, _ = result["expert_shards"].get(name, (0, None))
            want = expected[name][first:first + grad.shape[0]] if name in result["expert_shards"] else expected[name]
            comparison = compare(f"rank {rank} {name}", grad, want, tol)
            assert comparison.ok, str(comparison)
