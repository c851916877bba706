"""The experts-level replacement (autoep/experts_level.py): the interface read right, each flag
computed as the stock experts compute it, the mode switch, the fallback where a row cannot declare
a config, tied experts kept tied, and the refusals."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import autoep
from autoep import DetectionError, launch
from autoep.experts_level import AutoEPExpertsMixin, ExpertsSpec
from autoep.interface import read_layout
from autoep.versions import at_least
from matrix.experts_cases import DIFFUSION_GEMMA_CASE
from matrix.models import CASES_BY_ID, EXPERTS_MODE, ModelCase, _case
from matrix.cells import EXPERTS_LEVEL_CASES, FLAG_REPRESENTATIVES

# What each flag name of matrix.cells.FLAG_REPRESENTATIVES means, read off an ExpertsSpec.
FLAG_TESTS = {
    "default gate (act_fn(gate) * up)": lambda spec: spec.gate.kind == "act_glu",
    "transposed": lambda spec: spec.layout.flags.is_transposed,
    "interleaved gate/up": lambda spec: not spec.layout.flags.is_concatenated,
    "biased": lambda spec: spec.layout.flags.has_bias,
    "own _apply_gate": lambda spec: spec.gate.kind not in ("act_glu", "act"),
    "gateless": lambda spec: not spec.layout.flags.has_gate,
    "post-expert norm": lambda spec: spec.layout.flags.has_post_expert_norm,
}


def _ids(seed: int = 0, shape=(2, 8)) -> torch.Tensor:
    return torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("flag", list(FLAG_REPRESENTATIVES))
def test_each_flag_representative_carries_its_flag(flag):
    case = CASES_BY_ID[FLAG_REPRESENTATIVES[flag]]
    if not at_least(case.min_transformers):
        pytest.skip(f"{case.id} needs transformers>={case.min_transformers}")
    specs = autoep.inspect(case.build(), case.block())
    assert specs and all(isinstance(spec, ExpertsSpec) for spec in specs)
    assert all(FLAG_TESTS[flag](spec) for spec in specs), (flag, [spec.row() for spec in specs])


@pytest.mark.parametrize("case", [case for case in EXPERTS_LEVEL_CASES if case.refused_with is None],
                         ids=lambda case: case.id)
def test_every_experts_case_is_replaced_at_the_experts_level_and_equals_the_stock_model(case):
    """One process, float32: logits and every gradient (the routers', the experts', a post-expert
    norm's) as the stock model's; the reference has a formula for every gate of the table."""
    if not at_least(case.min_transformers):
        pytest.skip(f"{case.id} needs transformers>={case.min_transformers}")
    stock = case.build()
    applied = autoep.apply(copy.deepcopy(stock), case.block())
    units = autoep.replaced_layers(applied)
    assert units and all(isinstance(unit, AutoEPExpertsMixin) for _, unit in units)
    assert all(unit.spec.gate.kind != "unknown" for _, unit in units), [unit.spec.gate for _, unit in units]
    ids = _ids()
    for model in (stock, applied):
        model(input_ids=ids, labels=ids).loss.backward()
    torch.testing.assert_close(applied(input_ids=ids).logits, stock(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    stock_params = dict(stock.named_parameters())
    for name, param in applied.named_parameters():
        expected = stock_params[name].grad
        assert (param.grad is None) == (expected is None), name
        if expected is not None:  # fp32: the same kernels, sums in another order
            torch.testing.assert_close(param.grad, expected, rtol=1e-5, atol=1e-6, msg=name)


def test_replacement_modes_and_their_conflicts():
    mixtral = CASES_BY_ID["mixtral"].build()
    assert {spec.mode for spec in autoep.inspect(mixtral)} == {"block"}
    assert {spec.mode for spec in autoep.inspect(mixtral, EXPERTS_MODE)} == {"experts"}
    with pytest.raises(autoep.AutoEPConfigError, match="replacement='experts'.*score_func='sigmoid'"):
        autoep.inspect(mixtral, {"replacement": "experts", "score_func": "sigmoid"})
    with pytest.raises(autoep.AutoEPConfigError, match="expert_parallel.replacement must be"):
        autoep.inspect(mixtral, {"replacement": "expert"})
    gpt_oss = CASES_BY_ID["gpt_oss"].build()
    assert {spec.mode for spec in autoep.inspect(gpt_oss)} == {"experts"}  # no row: auto takes the experts level
    with pytest.raises(DetectionError, match="gpt_oss.*has no whole-block row"):
        autoep.inspect(gpt_oss, {"replacement": "block"})


# Transformers' own DeepSeek-V3 test config (tests/models/deepseek_v3): top-8 of 8 experts with one of two
# groups kept, which no RoutingSpec declares (top_k exceeds the 4 experts of the kept group).
DEEPSEEK_V3_HF_TEST = _case("deepseek_v3-hf_test", "deepseek_v3", "deepseek_v3", "deepseek_v3", "DeepseekV3",
                            dict(CASES_BY_ID["deepseek_v3"].kwargs, n_routed_experts=8, n_group=2, topk_group=1,
                                 num_experts_per_tok=8), has_aux_loss=False)


def test_a_config_the_row_cannot_declare_runs_at_the_experts_level(caplog):
    model = DEEPSEEK_V3_HF_TEST.build()
    with pytest.raises(DetectionError, match="top_k=8 exceeds the 4 experts"):
        autoep.inspect(model, {"replacement": "block"})
    stock = copy.deepcopy(model)
    with caplog.at_level(logging.WARNING, logger="autoep"):
        autoep.apply(model)
    assert "top_k=8 exceeds" in caplog.text and "replacing the experts modules only" in caplog.text
    ids = _ids()
    torch.testing.assert_close(model(input_ids=ids).logits, stock(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


def test_families_refused_in_every_mode_are_refused_before_anything_changes():
    from transformers import Llama4TextConfig, Llama4ForCausalLM

    model = Llama4ForCausalLM(Llama4TextConfig(vocab_size=96, hidden_size=32, intermediate_size=16,
                                               intermediate_size_mlp=64, num_hidden_layers=2, num_attention_heads=4,
                                               num_key_value_heads=2, head_dim=8, num_local_experts=4))
    before = copy.deepcopy(model.state_dict())
    for mode in ("auto", "experts"):
        with pytest.raises(DetectionError, match="refuses in every mode.*Llama4TextExperts"):
            autoep.apply(model, {"replacement": mode})
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


def test_an_experts_class_that_overrides_the_interface_forward_is_not_taken_for_it():
    """A subclass of a decorated experts class that replaces its forward (as Ergo's does) computes
    something the flags do not describe: detection finds no interface module and says why."""
    model = CASES_BY_ID["mixtral"].build()
    for layer in model.model.layers:
        experts = layer.mlp.experts
        experts.__class__ = type("NormedExperts", (type(experts),),
                                 {"forward": lambda self, h, i, w: 2 * type(experts).forward(self, h, i, w)})
    with pytest.raises(DetectionError, match="override the interface's forward.*NormedExperts"):
        autoep.inspect(model, EXPERTS_MODE)


def test_an_experts_module_already_expert_parallel_by_transformers_is_refused():
    model = CASES_BY_ID["mixtral"].build()
    model.model.layers[1].mlp.experts._is_expert_parallel = True
    with pytest.raises(DetectionError, match="already expert-parallel"):
        autoep.inspect(model, EXPERTS_MODE)


def test_routing_indices_outside_the_experts_are_refused_at_run_time():
    model = autoep.apply(CASES_BY_ID["mixtral"].build(), EXPERTS_MODE)
    experts = model.model.layers[0].mlp.experts
    hidden = torch.randn(3, 32)
    with pytest.raises(ValueError, match=r"1 of 6 routed slots name an expert outside \[0, 4\)"):
        experts(hidden, torch.tensor([[0, 1], [2, 4], [3, 0]]), torch.full((3, 2), 0.5))


def test_read_layout_checks_shapes_against_the_flags():
    experts = CASES_BY_ID["mixtral"].build().model.layers[0].mlp.experts
    layout = read_layout("x", experts)
    assert (layout.num_experts, layout.hidden_size, layout.intermediate_size, layout.output_size) == (4, 32, 48, 32)
    experts.is_transposed = True  # [E, 2I, H] read as [E, in, out]: 2I inputs, H outputs -> down [E, H, I] misfits
    with pytest.raises(autoep.experts_level.ExpertsInterfaceError, match="do not fit"):
        read_layout("x", experts)


def _tied_on_rank(autoep_size: int) -> dict:
    import torch.distributed as dist

    from conformance.ranks import process_groups_released

    model = DIFFUSION_GEMMA_CASE.build()
    stock = copy.deepcopy(model)
    with process_groups_released():
        autoep.apply(model, {"replacement": "experts", "autoep_size": autoep_size})
        units = [unit for _, unit in autoep.replaced_layers(model)]
        prompt, canvas = _ids(1, (1, 6)), _ids(2, (1, 8))
        got = model(input_ids=prompt, decoder_input_ids=canvas).logits
        want = stock(input_ids=prompt, decoder_input_ids=canvas).logits
        shared = {id(param) for unit in units for _, param in unit.expert_named_parameters()}
        return {"rank": dist.get_rank(), "modules": len(units), "distinct_expert_params": len(shared),
                "max_diff": float((got - want).abs().max()), "local": units[0].local_expert_ids}


@pytest.mark.skipif(not at_least(DIFFUSION_GEMMA_CASE.min_transformers), reason="DiffusionGemma needs 5.24")
def test_experts_modules_that_share_parameters_keep_one_shared_slice():
    """DiffusionGemma's encoder and decoder share their experts' Parameters: at autoep_size 2 each
    shared Parameter becomes one slice, still shared (4 modules, 2 distinct pairs), and the model equals
    the stock one."""
    results = launch.run(2, _tied_on_rank, 2)
    for result in results:
        assert result["modules"] == 4 and result["distinct_expert_params"] == 4, result  # 2 pairs x 2 params
        assert result["max_diff"] < 1e-5, result
    assert [result["local"] for result in results] == [(0, 1), (2, 3)]


def test_a_case_builds_modules_its_class_keeps_in_float32_in_float32():
    case: ModelCase = CASES_BY_ID["deepseek_v3"]
    model = case.build(dtype=torch.bfloat16)
    biases = [buffer for name, buffer in model.named_buffers() if name.endswith("e_score_correction_bias")]
    assert biases and all(bias.dtype == torch.float32 for bias in biases)
    # DeepseekV3's _keep_in_fp32_modules_strict names "gate.weight" too: the router stays float32
    assert model.model.layers[0].mlp.gate.weight.dtype == torch.float32
    assert model.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16


def test_hooks_on_the_experts_module_keep_firing_with_the_same_values():
    """The experts module is replaced in place (its class swapped): a forward hook registered on it
    before autoep.apply sees the same inputs and outputs as on the stock model."""
    stock = CASES_BY_ID["gpt_oss"].build()
    applied = copy.deepcopy(stock)
    seen = {}

    def record(label):
        def hook(module, args, output):
            seen.setdefault(label, (args[1].clone(), output.detach()))
        return hook

    for label, model in (("stock", stock), ("applied", applied)):
        model.model.layers[1].mlp.experts.register_forward_hook(record(label))
    autoep.apply(applied, EXPERTS_MODE)
    ids = _ids()
    stock(input_ids=ids), applied(input_ids=ids)
    assert torch.equal(seen["stock"][0], seen["applied"][0])
    torch.testing.assert_close(seen["applied"][1], seen["stock"][1], rtol=1e-5, atol=1e-6)


def test_inspect_names_an_experts_level_model_from_its_model_type(capsys):
    from autoep.cli import main as cli_main

    assert cli_main(["inspect", "gpt_oss", "--json"]) == 0
    import json

    rows = json.loads(capsys.readouterr().out)
    assert rows and all(row["routing"] == "the model's own router (experts-level)" for row in rows)
    assert "transposed" in rows[0]["shared"] and "clamped_swiglu" in rows[0]["shared"]


def _no_row_for_this_rank(autoep_size: int) -> dict:
    import torch.distributed as dist

    from conformance.ranks import process_groups_released

    model = CASES_BY_ID["gpt_oss"].build()
    model.config._experts_implementation = "eager"  # the class's own forward: a loop over the experts hit
    stock_experts = copy.deepcopy(model.model.layers[0].mlp.experts)
    with process_groups_released():
        autoep.apply(model, {**EXPERTS_MODE, "autoep_size": autoep_size})
        experts = model.model.layers[0].mlp.experts
        per_rank = experts.spec.num_experts // autoep_size
        generator = torch.Generator().manual_seed(dist.get_rank())
        hidden = torch.randn(6, experts.spec.layout.hidden_size, generator=generator)
        top_k = model.config.num_experts_per_tok
        index = torch.randint(0, per_rank, (6, top_k), generator=generator)  # every slot: an expert of rank 0
        weights = torch.rand(6, top_k, generator=generator)
        results = {}
        for label, module in (("applied", experts), ("stock", stock_experts)):
            x = hidden.clone().requires_grad_(True)
            out = module(x, index, weights)
            (out * torch.arange(out.numel()).view_as(out)).sum().backward()
            results[label] = (out.detach(), x.grad)
        grads = {name: param.grad for name, param in experts.expert_named_parameters()}
        return {"rank": dist.get_rank(), "path": experts.last_path,
                "output": float((results["applied"][0] - results["stock"][0]).abs().max()),
                "input_grad": float((results["applied"][1] - results["stock"][1]).abs().max()),
                "none_grads": sorted(name for name, grad in grads.items() if grad is None),
                "grad_abs_sum": sum(float(grad.abs().sum()) for grad in grads.values() if grad is not None)}


def test_a_rank_given_no_row_runs_the_same_collectives_as_its_peers():
    """Under the eager kernel (the class's own forward) a rank whose experts receive no row must still
    run both backward AllToAlls and give its expert parameters zero gradients: found by the full profile
    (openai_privacy_filter w4-ep4, gloo aborted on a size mismatch). Every slot here names an expert of
    rank 0, so rank 1 receives nothing."""
    results = launch.run(2, _no_row_for_this_rank, 2)
    for result in results:
        assert result["output"] < 1e-5 and result["input_grad"] < 1e-5, result
        assert result["none_grads"] == [], result
    assert results[1]["path"] == "loop" and results[1]["grad_abs_sum"] == 0.0, results[1]
    assert results[0]["path"] == "eager" and results[0]["grad_abs_sum"] > 0, results[0]
