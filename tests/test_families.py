"""The family table (autoep/presets/table.py): consistent, complete for the installed
Transformers, every supported family proven by a case, every refusal reaching the user."""

from __future__ import annotations

import json
import types

import pytest

from autoep.cli import main as cli_main
from autoep.config import AutoEPConfig, AutoEPConfigError
from autoep.detect import DetectionError, resolve_preset
from autoep.presets import ALIASES, FAMILIES, MODEL_TYPE_TO_PRESET, PRESETS, REFUSED, REFUSED_MODEL_TYPES
from autoep.presets.survey import installed_families
from autoep.versions import at_least, transformers_version
from matrix.models import ALL_CASES, DEFAULT_CASES, make_config
from matrix import cells as matrix_cells
from matrix.profiles import NEWEST

# DeepSpeed 0.19.8's AutoEP preset names (deepspeed/module_inject/auto_ep_presets/).
DEEPSPEED_PRESET_NAMES = ("mixtral", "qwen3_moe", "qwen3_5_moe", "deepseek_v2", "deepseek_v3", "minimax_m3")


def test_rows_are_consistent():
    names = [family.name for family in FAMILIES]
    assert len(names) == len(set(names))
    model_types = [t for family in FAMILIES for t in family.block_classes]
    assert len(model_types) == len(set(model_types)), "a model type in two rows"
    refused = [t for refusal in REFUSED for t in refusal.model_types]
    assert len(refused) == len(set(refused)), "a model type refused twice"
    assert not set(model_types) & set(refused), "a model type both supported and refused"
    assert all(refusal.reason.strip() for refusal in REFUSED)
    assert set(ALIASES.values()) <= set(names) and not set(ALIASES) & set(names)
    assert MODEL_TYPE_TO_PRESET.keys() == set(model_types) and REFUSED_MODEL_TYPES.keys() == set(refused)


def test_deepspeed_preset_names_are_accepted_or_refused_by_name():
    for name in DEEPSPEED_PRESET_NAMES:
        if name in PRESETS:
            assert AutoEPConfig.from_dict({"preset_model": name}).preset_model == name
        else:
            with pytest.raises(AutoEPConfigError, match=f"preset_model='{name}'"):
                AutoEPConfig.from_dict({"preset_model": name})
    claimed = {family.name for family in FAMILIES if family.deepspeed_preset}
    assert claimed <= set(DEEPSPEED_PRESET_NAMES)


BLOCK_CASES = [case for case in ALL_CASES if case.preset in PRESETS and not case.ep_block]


def test_every_fused_experts_family_of_the_installed_transformers_gets_a_verdict_and_a_mode():
    """Nothing unclassified, whatever the installed version: a row (block mode), the uniform experts
    interface (experts mode), or a refusal with its reason; the refused are the table's hard refusals
    or families whose code has no interface."""
    families = installed_families()
    assert {family.status for family in families} <= {"supported", "refused"}
    for family in families:
        assert (family.status, family.mode) in (("supported", "block"), ("supported", "experts"), ("refused", "-"))
        if family.status == "refused":
            assert family.reason and (family.refusal is None or family.refusal.hard), family
    if str(transformers_version()) == NEWEST:
        supported = [family for family in families if family.status == "supported"]
        assert len(supported) >= 70 and {f.folder for f in families if f.status == "refused"} == {"llama4", "ergo"}


@pytest.mark.skipif(str(transformers_version()) != NEWEST, reason=f"the cases are complete for transformers {NEWEST}")
def test_every_experts_level_family_is_proven_by_a_case_of_the_matrix():
    from matrix.experts_cases import NOT_RUN

    experts_families = [family for family in installed_families() if family.mode == "experts"]
    case_types = {case.model_type for case in ALL_CASES if case.ep_block} | {case.preset for case in ALL_CASES} | set(NOT_RUN)
    missing = [family.folder for family in experts_families if not set(family.model_types) & case_types]
    assert not missing, f"experts-level families without a conformance case: {missing}"


def test_every_supported_family_is_proven_by_a_case_of_the_matrix():
    # Every row is proven by a case of its own (a composite VLM type shares its text model's block,
    # which the case builds).
    covered = {PRESETS[case.preset].name for case in BLOCK_CASES}
    missing = [family.name for family in FAMILIES if family.name not in covered]
    assert not missing, f"families without a conformance case: {missing}"
    for case in BLOCK_CASES:
        if case.id == "plain_mixtral":  # a model of plain modules that the mixtral row finds by structure
            continue
        family = PRESETS[case.preset]
        assert case.model_type in family.block_classes, case.id
        assert case.min_transformers == family.min_transformers, (
            f"{case.id}: case gated at {case.min_transformers}, family row at {family.min_transformers}")


def test_each_routing_kind_runs_on_expert_parallel_ranks_in_the_default_profile():
    default = [cell for cell in matrix_cells.profile_matrix(NEWEST, "default")]
    kinds = {matrix_cells.routing_kind(case.id) for case in BLOCK_CASES}
    for kind in kinds:
        assert any(matrix_cells.routing_kind(cell.case) == kind and cell.zero_stage == "none"
                   and cell.autoep_size > 1 for cell in default), f"routing kind {kind}: no EP cell in default"
    default_kinds = {matrix_cells.routing_kind(case.id) for case in DEFAULT_CASES}
    for kind in kinds - default_kinds:  # kinds only families have: their representative, not every family
        cells = {cell.case for cell in default if cell.autoep_size > 1 and matrix_cells.routing_kind(cell.case) == kind}
        assert len(cells) == 1, (kind, cells)


def _model_of_type(model_type: str):
    config = types.SimpleNamespace(model_type=model_type)
    return types.SimpleNamespace(config=config)


@pytest.mark.parametrize("refusal", REFUSED, ids=lambda r: r.model_types[0])
def test_a_refused_family_is_refused_by_name_with_its_reason(refusal):
    model_type = refusal.model_types[0]
    with pytest.raises(DetectionError) as raised:
        resolve_preset(_model_of_type(model_type), AutoEPConfig.from_dict({}))
    assert model_type in str(raised.value) and refusal.reason in str(raised.value)


def test_an_unknown_model_type_names_the_table():
    with pytest.raises(DetectionError, match="autoep inspect --families"):
        resolve_preset(_model_of_type("no_such_moe"), AutoEPConfig.from_dict({}))


def test_every_row_builds_its_routing_from_its_default_case():
    for case in BLOCK_CASES:
        if not at_least(case.min_transformers) or case.id == "plain_mixtral":
            continue
        family = PRESETS[case.preset]
        config = make_config(case).get_text_config()
        num_experts = next(getattr(config, f) for f in family.num_experts_fields if getattr(config, f, None))
        spec = family.routing(config, num_experts, getattr(config, family.top_k_field))
        assert spec.num_experts == num_experts and spec.score_func == family.routing.score_func


def test_inspect_families_prints_the_table(capsys):
    assert cli_main(["inspect", "--families", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_folder = {row["folder"]: row for row in rows}
    assert by_folder["mixtral"]["status"] == "supported" and by_folder["mixtral"]["family"] == "mixtral"
    assert all(row["status"] in ("supported", "refused") and row["mode"] in ("block", "experts", "-") for row in rows)
    assert cli_main(["inspect", "--families"]) == 0
    assert "fused-experts MoE families" in capsys.readouterr().out
    assert cli_main(["inspect", "--families", "mixtral"]) == 2


def test_fused_experts_outside_the_described_blocks_are_named_not_silently_left_dense(caplog):
    """Qwen3-Omni's Talker, dots.ocr's vision MoE: experts of another class beside the described
    blocks stay the stock modules (exact, but dense); detection says so, naming them."""
    import copy
    import logging

    import autoep
    from matrix.models import CASES_BY_ID

    model = CASES_BY_ID["mixtral"].build()
    model.model.talker = copy.deepcopy(model.model.layers[0].mlp.experts)
    with caplog.at_level(logging.WARNING, logger="autoep"):
        specs = autoep.inspect(model)
    assert [spec.name for spec in specs] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert "model.talker (MixtralExperts)" in caplog.text and "stay dense" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="autoep"):
        autoep.inspect(model, {"moe_layer_pattern": r"model\.layers\.\d+\.mlp"})
    assert "stay dense" not in caplog.text


def test_the_readme_lists_every_row_and_every_refusal():
    from pathlib import Path

    text = Path(__file__).resolve().parent.parent.joinpath("README.md").read_text()
    section = text[text.index("## Families"):text.index("\n## ", text.index("## Families") + 1)]
    listed = {line.split("`")[1] for line in section.splitlines() if line.startswith("| `")}
    assert listed == {family.name for family in FAMILIES}
    assert all(refusal.model_types[0] in section for refusal in REFUSED)


def test_peers_are_not_judged_on_families_they_do_not_claim():
    from conformance.subjects import SUBJECTS
    from matrix.cells import FAMILY_DEFAULT_CASES, Cell

    family_cell = Cell(NEWEST, FAMILY_DEFAULT_CASES[0], 2, 4, 2, "float32")
    seed_cell = Cell(NEWEST, "mixtral", 2, 4, 2, "float32")
    for name in ("deepspeed", "torchtitan"):
        subject = SUBJECTS[name]
        assert subject.not_applicable_reason(seed_cell) is None
        assert "family" in subject.not_applicable_reason(family_cell)
    minimax = Cell(NEWEST, "minimax_m3_vl", 2, 4, 2, "float32")  # DeepSpeed's sixth preset
    assert SUBJECTS["deepspeed"].not_applicable_reason(minimax) is None
