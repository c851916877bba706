"""The interop conformance families (conformance/interop.py): registered for every version,
case and dtype; a real cell passes; and each family fails a subject with the bug it exists to
catch, so that none can pass silently."""

from __future__ import annotations

import pytest
import torch
import transformers

import autoep
from conformance import interop
from matrix.models import CASES_BY_ID, DEFAULT_CASES
from conformance.report import markdown
from conformance.runner import run_cell
from conformance.subjects import SUBJECTS
from matrix.cells import (DEFAULT_TRANSFORMERS, DTYPES, EXPERTS_INTEROP_CASES, INTEROP_FAMILIES, TRANSFORMERS_VERSIONS,
                          Cell, cells, expected)

MIXTRAL = CASES_BY_ID["mixtral"]


def interop_cell(family: str, dtype: str = "float32", case: str = "mixtral") -> Cell:
    return Cell(transformers.__version__, case, "none", 1, 1, dtype, interop=family)


def test_every_family_of_the_matrix_has_its_checks():
    assert set(interop.FAMILY_CHECKS) == set(INTEROP_FAMILIES)


def test_every_version_case_dtype_and_family_is_a_cell_with_its_expected_outcome():
    registered = {(c.transformers, c.case, c.dtype, c.interop) for c in cells() if c.interop}
    assert registered == {(v, case.id, dtype, family) for v in TRANSFORMERS_VERSIONS for case in DEFAULT_CASES
                          for dtype in DTYPES for family in INTEROP_FAMILIES} | {
        (DEFAULT_TRANSFORMERS, case_id, dtype, family) for case_id in EXPERTS_INTEROP_CASES for dtype in DTYPES
        for family in INTEROP_FAMILIES}
    assert len({c.id for c in cells()}) == len(cells())
    assert expected(Cell("5.24.0", "deepseek_v3", "none", 1, 1, "bfloat16", interop="compile")).outcome == "pass"
    assert expected(Cell("4.57.6", "mixtral", "none", 1, 1, "float32", interop="generate")).error == \
        "UnsupportedTransformersError"
    assert expected(Cell("5.0.0", "qwen3_5_moe", "none", 1, 1, "float32", interop="param_order")).outcome == \
        "rejected"


def test_a_passing_cell_and_its_report_column():
    record = run_cell(interop_cell("hf_roundtrip"))
    assert record["status"] == "pass", record["detail"]
    assert record["max_abs_diff"]["subject~original"] == 0.0  # weights and logits bit-identical
    generate = run_cell(interop_cell("generate", "bfloat16"))
    assert generate["status"] == "pass", generate["detail"]
    assert generate["measured"]["argmax_margin"] > 0.03  # the tie-free rule (tolerances.ARGMAX_NEAR_TIE)
    grid = markdown([record, generate])
    assert "| interop hf_roundtrip | interop generate |" in grid and "| autoep: mixtral float32 | pass" in grid


def test_the_engine_only_peer_is_not_applicable():
    record = run_cell(interop_cell("param_order"), "deepspeed")
    assert record["status"] == "not_applicable" and "in-process apply()" in record["reason"]


def test_unknown_family_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown interop family 'compiled'.*compile, param_order"):
        interop.run_family("compiled", MIXTRAL, SUBJECTS["autoep"], torch.float32)


class PlantedSubject:
    """AutoEP with one deliberate bug planted on each replaced layer after ``apply``."""

    def __init__(self, name: str, plant):
        self.name, self.plant = name, plant

    def unavailable_reason(self, cell=None):
        return None

    def apply(self, model, block):
        model = SUBJECTS["autoep"].apply(model, block)
        for _, layer in autoep.replaced_layers(model):
            self.plant(layer)
        return model


def _output_hook(layer, when, change):
    layer.register_forward_hook(lambda module, args, output: change(output) if when(args[0]) else output)


def router_registered_last(layer):
    """The router registered after the experts (the pre-fix order of some presets)."""
    layer._modules[layer.spec.router_attr] = layer._modules.pop(layer.spec.router_attr)


def decode_step_drops_experts(layer):
    """One-token decode steps (KV cache) return no expert output."""
    _output_hook(layer, lambda hidden: hidden.shape[1] == 1, torch.zeros_like)


def recompute_differs(layer):
    """The forward recomputed in the backward pass (checkpointing) differs from the first one,
    like a layer reading state left by its latest forward. (The activations saved inside the
    block change, which is what the backward pass uses.)"""
    layer.register_forward_pre_hook(
        lambda module, args: (args[0] * 1.5,) if torch._C._current_autograd_node() is not None else None)


def compiled_path_differs(layer):
    """A code path taken only under torch.compile that scales the output by 1%."""
    _output_hook(layer, lambda hidden: torch.compiler.is_compiling(), lambda out: out * 1.01)


def experts_renamed_in_state_dict(layer):
    """Expert weights saved under another name (w13), as a layer with its own layout would."""
    experts = layer.spec.experts_attr

    def rename(module, state, prefix, metadata):
        key = f"{prefix}{experts}.{layer.spec.gate_up_name}"
        state[f"{prefix}{experts}.w13"] = state.pop(key)
    layer._register_state_dict_hook(rename)


@pytest.mark.parametrize("family, plant, dtype, message", [
    ("param_order", router_registered_last, "float32", "parameter names differ from the stock model's"),
    ("param_order", router_registered_last, "bfloat16", "loaded AdamW state exp_avg"),
    ("generate", decode_step_drops_experts, "bfloat16", "greedy generate token ids"),
    ("grad_checkpointing", recompute_differs, "float32", "checkpointed subject~checkpointed stock: grad"),
    ("hf_roundtrip", experts_renamed_in_state_dict, "float32", "from_pretrained loads every key"),
    ("compile", compiled_path_differs, "float32", "compiled subject~compiled stock: logits"),
])
def test_each_family_fails_its_planted_bug(family, plant, dtype, message):
    subject = PlantedSubject(f"planted-{plant.__name__}", plant)
    result = interop.run_family(family, MIXTRAL, subject, getattr(torch, dtype))
    failures = result.failures()
    assert failures and any(message in failure for failure in failures), failures
    # The same family passes the unplanted subject (the planted bug is what it caught).
    assert not interop.run_family(family, MIXTRAL, SUBJECTS["autoep"], getattr(torch, dtype)).failures()
