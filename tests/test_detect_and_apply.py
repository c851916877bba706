import copy
import re

import pytest
import torch

import autoep
from autoep import AutoEPConfigError, AutoEPMoELayer, DetectionError, UnsupportedTransformersError
from autoep.versions import at_least
from matrix.models import ALL_CASES, CASES_BY_ID


@pytest.mark.parametrize("case", [case for case in ALL_CASES if case.refused_with is None and at_least(
    case.min_transformers)], ids=lambda c: c.id)
def test_inspect_finds_every_block_and_changes_nothing(case):
    model = case.build()
    before = copy.deepcopy(model.state_dict())
    specs = autoep.inspect(model, case.block())
    # one block (or experts module) per decoder layer: a VLM's backbone sits under model.language_model; the
    # block's attribute is mlp, or feed_forward in Jamba or LFM2, block_sparse_moe in GraniteMoE, mixer in
    # NemotronH; Gemma-4's experts are the decoder layer's own; ERNIE-4.5-VL's blocks hold two experts sets
    names = [re.sub(r"^(model\.)?(language_model\.)?layers\.(\d+)(\.(mlp|feed_forward|block_sparse_moe|mixer))?"
                    r"(\.(text_moe|vision_moe))?$", r"\3", s.name) for s in specs]
    assert names in (["0", "1"], ["0", "0", "1", "1"]), names
    assert specs[0].preset in (case.preset, case.model_type)  # (an experts-level family is named by its model type)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not autoep.replaced_layers(model)


def test_apply_keeps_parameter_names_buffers_and_router_class():
    case = CASES_BY_ID["deepseek_v3"]
    model = case.build()
    names = [n for n, _ in model.named_parameters()]
    buffers = {n: b.clone() for n, b in model.named_buffers() if "e_score_correction_bias" in n}
    router_class = type(model.model.layers[0].mlp.gate)
    autoep.apply(model)
    assert sorted(n for n, _ in model.named_parameters()) == sorted(names)
    for name, value in buffers.items():  # the correction bias buffer is carried over, not reset
        assert torch.equal(model.get_buffer(name), value) and value.abs().sum() > 0
    layer = model.model.layers[0].mlp
    assert isinstance(layer, AutoEPMoELayer) and layer.local_expert_ids == tuple(range(8))
    assert isinstance(layer.router_module(), router_class)  # output recorders keep matching it
    with pytest.raises(ValueError, match="applied twice"):
        autoep.apply(model)


def test_preset_mismatch_is_rejected(mixtral):
    with pytest.raises(DetectionError, match="no MoE block of class DeepseekV3MoE|does not cover model type"):
        autoep.apply(mixtral, {"preset_model": "deepseek_v3"})


def test_autoep_size_must_divide_expert_count(mixtral):
    before = copy.deepcopy(mixtral.state_dict())
    with pytest.raises(AutoEPConfigError, match=r"autoep_size=3 does not divide the 4 experts.*\[1, 2, 4\]"):
        autoep.apply(mixtral, {"autoep_size": 3})
    assert not autoep.replaced_layers(mixtral)
    assert all(torch.equal(before[k], v) for k, v in mixtral.state_dict().items())


def test_too_old_transformers_names_installed_and_minimum(monkeypatch, mixtral):
    from packaging.version import Version

    from autoep import detect, versions

    monkeypatch.setattr(detect, "transformers_version", lambda: Version("4.57.6"))
    monkeypatch.setattr(detect, "at_least", lambda v: Version("4.57.6") >= Version(v))
    with pytest.raises(UnsupportedTransformersError, match=r"needs transformers>=5.0.0, but transformers 4.57.6.*ModuleList"):
        autoep.inspect(mixtral)
    assert versions.transformers_version() >= Version("5.0")


def test_module_list_experts_are_rejected(mixtral):
    block = mixtral.model.layers[0].mlp
    block.experts = torch.nn.ModuleList([torch.nn.Linear(32, 32) for _ in range(4)])
    with pytest.raises(UnsupportedTransformersError, match="ModuleList"):
        autoep.inspect(mixtral)


def test_shape_mismatch_is_rejected(mixtral):
    experts = mixtral.model.layers[1].mlp.experts
    experts.down_proj = torch.nn.Parameter(torch.zeros(4, 32, 40))
    with pytest.raises(DetectionError, match=r"down_proj has shape \(4, 32, 40\)"):
        autoep.apply(mixtral)
    assert not autoep.replaced_layers(mixtral)  # nothing replaced, not even layer 0


def test_unknown_submodule_is_never_replaced(mixtral):
    mixtral.model.layers[0].mlp.extra = torch.nn.Linear(32, 32)
    with pytest.raises(DetectionError, match="does not fully understand"):
        autoep.apply(mixtral, {"replacement": "block"})


def test_unknown_submodule_falls_back_to_the_experts_level(mixtral, caplog):
    """The whole block cannot be replaced (it holds something the row does not describe), but its
    experts can: the stock block code still runs (whatever ``extra`` does), only its experts are
    AutoEP's. Exact."""
    mixtral.model.layers[0].mlp.extra = torch.nn.Linear(32, 32)
    stock = copy.deepcopy(mixtral)
    with caplog.at_level("WARNING", logger="autoep"):
        autoep.apply(mixtral)
    assert "does not fully understand" in caplog.text and "replacing the experts modules only" in caplog.text
    assert [type(unit).__name__ for _, unit in autoep.replaced_layers(mixtral)] == ["AutoEPMixtralExperts"] * 2
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(mixtral(input_ids=ids).logits, stock(input_ids=ids).logits)


def test_router_jitter_is_rejected_by_the_whole_block_replacement():
    case = CASES_BY_ID["mixtral"]
    model = case.build()
    model.config.router_jitter_noise = 0.1
    with pytest.raises(DetectionError, match="router_jitter_noise=0.1"):
        autoep.apply(model, {"replacement": "block"})


def test_router_jitter_runs_at_the_experts_level_exactly():
    """At the experts level the stock router runs, jitter included: in training mode, from the same
    random state, the applied model equals the stock one bitwise."""
    model = CASES_BY_ID["mixtral"].build()
    model.config.router_jitter_noise = 0.1
    for layer in model.model.layers:
        layer.mlp.jitter_noise = 0.1
    stock = copy.deepcopy(model)
    autoep.apply(model)
    assert autoep.inspect(stock)[0].mode == "experts"
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    outputs = []
    for candidate in (stock, model):
        candidate.train()
        torch.manual_seed(5)
        outputs.append(candidate(input_ids=ids).logits)
    torch.manual_seed(6)
    other = stock(input_ids=ids).logits
    assert torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[0], other)


def test_model_type_without_preset():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(DetectionError, match="model_type='llama' has no built-in AutoEP preset"):
        autoep.apply(model)


def test_disabled_block_leaves_model_unchanged(mixtral):
    assert autoep.apply(mixtral, {"enabled": False}) is mixtral
    assert not autoep.replaced_layers(mixtral)


def test_routing_overrides_change_the_spec(mixtral):
    specs = autoep.inspect(mixtral, {"top_k": 1, "route_norm": False, "routed_scaling_factor": 2.0})
    assert (specs[0].routing.top_k, specs[0].routing.renormalize, specs[0].routing.scale) == (1, False, 2.0)


def test_cli_inspect_prints_table(capsys):
    from autoep.cli import main

    assert main(["inspect", "mixtral"]) == 0
    out = capsys.readouterr().out
    assert "MixtralForCausalLM: 32 MoE blocks" in out and "model.layers.31.mlp" in out
    assert main(["inspect", "llama"]) == 2
    assert "no built-in AutoEP preset" in capsys.readouterr().err


def test_shared_experts_are_never_dropped():
    model = CASES_BY_ID["qwen2_moe"].build()
    specs = autoep.inspect(model)
    assert (specs[0].shared_kind, specs[0].shared_attr, specs[0].shared_gate_attr) == (
        "sigmoid_gated", "shared_expert", "shared_expert_gate")
    with pytest.raises(DetectionError, match="does not fully understand"):
        autoep.inspect(model, {"has_shared_experts": False})
    with pytest.raises(DetectionError, match="shared_experts_gate_pattern='shared_expert_gate' names a gate"):
        autoep.inspect(CASES_BY_ID["mixtral"].build(), {"shared_experts_gate_pattern": "shared_expert_gate"})


def test_cli_inspect_reads_a_config_file(tmp_path, capsys):
    from autoep.cli import main
    from matrix.models import make_config

    path = tmp_path / "config.json"
    make_config(CASES_BY_ID["deepseek_v3"]).to_json_file(path)
    assert main(["inspect", str(path), "--json"]) == 0
    assert '"preset": "deepseek_v3"' in capsys.readouterr().out
