"""The replaced layer keeps working with what works on the original model: torch.compile,
parameter order (a stock optimizer state), every Transformers activation, the experts
implementation switch, and hooks on the block."""

from __future__ import annotations

import copy
import dataclasses
import time

import pytest
import torch
from transformers.activations import ACT2FN, GELUActivation

import autoep
from autoep.activations import CONFIG_NAMES
from autoep.detect import DetectionError
from conformance.equivalence import model_equivalence, tie_free_batch
from matrix.models import CASES_BY_ID, DEFAULT_CASES, ModelSnapshot
from conformance.subjects import SUBJECTS
from conformance.tolerances import compare, tolerance
from autoep.versions import at_least

AUTOEP = SUBJECTS["autoep"]
CASES = [c for c in DEFAULT_CASES if at_least(c.min_transformers)]
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def _batch(model, seed: int = 3, shape=(2, 8)) -> torch.Tensor:
    vocab = model.config.get_text_config().vocab_size
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _forward_backward(model, params: dict[str, torch.Tensor], input_ids) -> dict[str, torch.Tensor]:
    """Logits, loss and every parameter's gradient (no accumulation into .grad)."""
    out = model(input_ids=input_ids, labels=input_ids)
    grads = torch.autograd.grad(out.loss, list(params.values()), allow_unused=True)
    result = {"logits": out.logits.detach(), "loss": out.loss.detach()}
    result.update({f"grad {name}": g for name, g in zip(params, grads) if g is not None})
    return result


def _assert_all_close(actual: dict, expected: dict, dtype: torch.dtype) -> None:
    assert actual.keys() == expected.keys()
    tol = tolerance(dtype)
    failures = [str(c) for c in (compare(k, actual[k], expected[k], tol) for k in expected) if not c.ok]
    assert not failures, failures


def _kernels(model) -> set[str]:
    return {layer.routed_experts().last_path for _, layer in autoep.replaced_layers(model)}


# --- 1. torch.compile ------------------------------------------------------------------------

# The stock Transformers model of every case compiles with fullgraph=True (torch 2.13,
# Transformers 5.24, aot_eager, fp32 and bf16, measured), so AutoEP must too. Compiling takes
# 10-50 s a case on a loaded 2-core machine: two presets (no shared expert; shared expert with
# biased, grouped sigmoid routing) run by default, the rest with -m slow.
DEFAULT_COMPILE = {"mixtral", "deepseek_v3"}
COMPILE_CASES = [c if c.id in DEFAULT_COMPILE else pytest.param(c, marks=pytest.mark.slow) for c in CASES]


def _compiled_vs_uncompiled(model, dtype, backend: str, fullgraph: bool) -> float:
    """Compiled vs uncompiled logits, loss and gradients; returns the first call's seconds.

    fp32: within the fp32 tolerance. bf16: compiled kernels may round differently (inductor
    fuses pointwise ops in fp32: measured 1.2% relative L2 on Mixtral's logits, stock and
    AutoEP alike, closer to the oracle than uncompiled), so both are measured against the fp32
    oracle (the same model in fp32) and the compiled one must be as accurate as the uncompiled
    one: the bf16 tolerance with the uncompiled run as its baseline."""
    params = dict(model.named_parameters())
    vocab = model.config.get_text_config().vocab_size
    probe = model if autoep.replaced_layers(model) else autoep.apply(copy.deepcopy(model))  # (stock: its twin)
    input_ids, _ = tie_free_batch([probe], vocab, str(dtype).replace("torch.", ""), seed=3)
    expected = _forward_backward(model, params, input_ids)
    oracle = None
    if dtype != torch.float32:
        fp32 = copy.deepcopy(model).float()
        oracle = _forward_backward(fp32, dict(fp32.named_parameters()), input_ids)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=fullgraph)
    start = time.perf_counter()
    actual = _forward_backward(compiled, params, input_ids)
    seconds = time.perf_counter() - start
    torch._dynamo.reset()
    if oracle is None:
        _assert_all_close(actual, expected, dtype)
    else:
        assert actual.keys() == oracle.keys()
        tol = tolerance(dtype)
        comparisons = [compare(k, actual[k], oracle[k], tol, baseline=expected[k]) for k in oracle]
        assert not [str(c) for c in comparisons if not c.ok]
    return seconds


@DTYPES
@pytest.mark.parametrize("case", COMPILE_CASES, ids=lambda c: c.id)
def test_compiled_equals_uncompiled(case, dtype):
    """fp32 used to fail (grouped_mm's fake kernel accepts only bf16); logits, loss and every
    gradient of the compiled model (fullgraph) equal the uncompiled ones."""
    model = autoep.apply(case.build(dtype=dtype))
    _compiled_vs_uncompiled(model, dtype, "aot_eager", fullgraph=True)
    assert _kernels(model) == {"grouped_mm"}


@pytest.mark.parametrize("implementation", ["eager", "batched_mm"])
def test_every_experts_implementation_compiles_fullgraph(implementation):
    """The loop (its .tolist() used to break the graph) and the batched kernel compile fullgraph."""
    model = autoep.apply(CASES_BY_ID["qwen3_moe"].build())
    model.set_experts_implementation(implementation)
    _compiled_vs_uncompiled(model, torch.float32, "aot_eager", fullgraph=True)
    assert _kernels(model) == {"loop" if implementation == "eager" else "batched_mm"}


def test_float16_compiles():
    """fp16 (also refused by grouped_mm's fake kernel) runs the same kernels compiled: equal bits."""
    model = autoep.apply(CASES_BY_ID["mixtral"].build(dtype=torch.float16))
    input_ids = _batch(model)
    expected = model(input_ids=input_ids).logits
    torch._dynamo.reset()
    actual = torch.compile(model, backend="aot_eager", fullgraph=True)(input_ids=input_ids).logits
    torch._dynamo.reset()
    assert torch.equal(actual, expected)
    assert _kernels(model) == {"grouped_mm"}


@pytest.mark.slow
@DTYPES
def test_inductor_compiled_equals_uncompiled(dtype, capsys):
    """Inductor (C++ codegen on CPU: slow); compile seconds of stock vs AutoEP are printed."""
    case = CASES_BY_ID["mixtral"]
    stock_seconds = _compiled_vs_uncompiled(case.build(dtype=dtype), dtype, "inductor", fullgraph=True)
    autoep_seconds = _compiled_vs_uncompiled(autoep.apply(case.build(dtype=dtype)), dtype, "inductor",
                                             fullgraph=True)
    with capsys.disabled():
        print(f"\ninductor {dtype}: first call (compile) stock {stock_seconds:.1f} s, autoep {autoep_seconds:.1f} s")


# --- 2. parameter order and a stock optimizer state ------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_parameter_buffer_and_state_dict_order_equal_the_original(case):
    stock = case.build()
    model = autoep.apply(case.build())
    assert [(n, p.shape) for n, p in model.named_parameters()] == [(n, p.shape) for n, p in stock.named_parameters()]
    assert [n for n, _ in model.named_buffers()] == [n for n, _ in stock.named_buffers()]
    assert list(model.state_dict()) == list(stock.state_dict())


def _adamw_step(model, optimizer, input_ids) -> None:
    optimizer.zero_grad()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    optimizer.step()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_stock_optimizer_state_loads_and_resumes(case):
    """AdamW state saved from the stock model after a step loads into the applied model's
    optimizer, and the next step gives the stock model's parameters."""
    stock = case.build()
    stock_opt = torch.optim.AdamW(stock.parameters(), lr=1e-2)
    _adamw_step(stock, stock_opt, _batch(stock, seed=1))
    model = autoep.apply(case.build())
    model.load_state_dict(stock.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    optimizer.load_state_dict(copy.deepcopy(stock_opt.state_dict()))
    second = _batch(stock, seed=2)
    _adamw_step(stock, stock_opt, second)
    _adamw_step(model, optimizer, second)
    _assert_all_close(dict(model.named_parameters()), dict(stock.named_parameters()), torch.float32)


# --- 3. activations --------------------------------------------------------------------------

@pytest.mark.parametrize("hidden_act", sorted(CONFIG_NAMES))
def test_every_transformers_activation_matches_stock_and_reference(hidden_act):
    base = CASES_BY_ID["mixtral"]
    case = dataclasses.replace(base, id=f"mixtral-{hidden_act}", kwargs=dict(base.kwargs, hidden_act=hidden_act))
    result = model_equivalence(case, AUTOEP, torch.float32)
    assert result.ok, "\n".join(result.failures())
    assert {"subject~original", "subject~reference"} <= set(result.comparisons)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_gelu_on_every_preset(case):
    """Transformers' own test configs use gelu; experts and shared experts both take it."""
    case = dataclasses.replace(case, id=f"{case.id}-gelu", kwargs=dict(case.kwargs, hidden_act="gelu"))
    result = model_equivalence(case, AUTOEP, torch.float32)
    assert result.ok, "\n".join(result.failures())
    assert {s.activation for s in autoep.inspect(case.build())} == {"gelu"}


def test_activation_with_learned_parameters_is_refused(mixtral):
    for spec in autoep.inspect(mixtral):
        mixtral.get_submodule(spec.name).experts.act_fn = ACT2FN["prelu"]
    snapshot = ModelSnapshot.of(mixtral)
    with pytest.raises(DetectionError, match=r"experts\.act_fn.*PReLU.*supported: .*gelu_new"):
        autoep.apply(mixtral, {"replacement": "block"})
    assert snapshot.unchanged(mixtral)


def test_activation_with_learned_parameters_runs_at_the_experts_level(mixtral):
    """The experts level calls the experts' own act_fn: PReLU's learned slope is a replicated
    parameter of the experts module, and its gradient comes out as the stock model's (the
    memory-lean path, which differentiates only the gate and up halves, is not taken)."""
    for spec in autoep.inspect(mixtral):
        mixtral.get_submodule(spec.name).experts.act_fn = ACT2FN["prelu"]
    stock = copy.deepcopy(mixtral)
    autoep.apply(mixtral)
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    for model in (stock, mixtral):
        model(input_ids=ids, labels=ids).loss.backward()
    slopes = [name for name, _ in stock.named_parameters() if name.endswith("act_fn.weight")]
    assert len(slopes) == 2
    for name, param in mixtral.named_parameters():
        torch.testing.assert_close(param.grad, dict(stock.named_parameters())[name].grad, rtol=1e-5, atol=1e-7)


# --- 4. experts implementation ----------------------------------------------------------------

KERNEL_OF = {"eager": "loop", "grouped_mm": "grouped_mm", "batched_mm": "batched_mm"}


@pytest.mark.parametrize("implementation", sorted(KERNEL_OF))
def test_set_experts_implementation_after_apply_switches_the_kernel(implementation):
    stock = CASES_BY_ID["qwen3_moe"].build()
    model = autoep.apply(copy.deepcopy(stock))
    stock.set_experts_implementation(implementation)
    model.set_experts_implementation(implementation)
    params, stock_params = dict(model.named_parameters()), dict(stock.named_parameters())
    input_ids = _batch(stock)
    _assert_all_close(_forward_backward(model, params, input_ids),
                      _forward_backward(stock, stock_params, input_ids), torch.float32)
    assert _kernels(model) == {KERNEL_OF[implementation]}


def test_experts_implementation_from_pretrained_is_honoured(tmp_path):
    stock = CASES_BY_ID["deepseek_v3"].build()
    stock.save_pretrained(tmp_path)
    loaded = type(stock).from_pretrained(tmp_path, experts_implementation="batched_mm")
    model = autoep.apply(loaded)
    model(input_ids=_batch(model))
    assert _kernels(model) == {"batched_mm"}


def test_use_grouped_mm_false_sets_the_eager_implementation(mixtral):
    model = autoep.apply(mixtral, {"use_grouped_mm": False})
    assert model.get_experts_implementation()[""] == "eager"
    model(input_ids=_batch(model))
    assert _kernels(model) == {"loop"}


def test_unsupported_experts_implementation_is_refused(mixtral):
    mixtral.set_experts_implementation("sonicmoe")
    snapshot = ModelSnapshot.of(mixtral)
    expected = r"experts_implementation='sonicmoe'.*set_experts_implementation\('grouped_mm'\)"
    with pytest.raises(ValueError, match=expected):
        autoep.apply(mixtral)
    assert snapshot.unchanged(mixtral)
    mixtral.set_experts_implementation("grouped_mm")
    autoep.apply(mixtral)
    mixtral.set_experts_implementation("deepgemm")  # after apply: refused at the next call
    with pytest.raises(ValueError, match=r"experts_implementation='deepgemm'.*'batched_mm' / 'eager'"):
        mixtral(input_ids=_batch(mixtral))


# --- 5. hooks and a swapped act_fn ------------------------------------------------------------

def _record_block_hooks(model, name: str, seen: dict) -> list:
    block = model.get_submodule(name)
    return [
        block.register_forward_pre_hook(lambda m, args: seen["pre"].append(args[0].detach().clone())),
        block.register_forward_hook(lambda m, args, kwargs, out: seen["forward"].append(out.detach().clone()),
                                    with_kwargs=True, always_call=True),
        block.register_forward_hook(lambda m, args, out: out * 2.0),  # changes the model's output
        block.register_full_backward_hook(lambda m, grad_in, grad_out: seen["backward"].append(grad_out[0].clone())),
    ]


def test_block_hooks_are_carried_over():
    case = CASES_BY_ID["qwen2_moe"]
    stock = case.build()
    model = case.build()
    name = autoep.inspect(model)[0].name
    stock_seen, seen = {"pre": [], "forward": [], "backward": []}, {"pre": [], "forward": [], "backward": []}
    _record_block_hooks(stock, name, stock_seen)
    handles = _record_block_hooks(model, name, seen)
    autoep.apply(model)
    input_ids = _batch(model)
    _assert_all_close(_forward_backward(model, dict(model.named_parameters()), input_ids),
                      _forward_backward(stock, dict(stock.named_parameters()), input_ids), torch.float32)
    for kind in stock_seen:
        assert len(seen[kind]) == len(stock_seen[kind]) == 1, kind
        _assert_all_close({kind: seen[kind][0]}, {kind: stock_seen[kind][0]}, torch.float32)
    for handle in handles:  # the handles taken before apply remove the hooks from the replacement
        handle.remove()
    model(input_ids=input_ids)
    assert len(seen["forward"]) == 1 and not model.get_submodule(name)._forward_hooks


@pytest.mark.parametrize("where", ["experts", "backward_hook", "state_dict_hook", "forward_override"])
def test_hooks_that_cannot_be_carried_are_refused(mixtral, where):
    name = autoep.inspect(mixtral)[-1].name
    block = mixtral.get_submodule(name)
    if where == "experts":
        block.experts.register_forward_hook(lambda m, args, out: None)
        expected = r"experts module 'experts' has hooks \(forward_hooks\).*Register the hook on the MoE block"
    elif where == "backward_hook":
        block.register_backward_hook(lambda m, grad_in, grad_out: None)
        expected = r"register_backward_hook\(\).*register_full_backward_hook\(\)"
    elif where == "state_dict_hook":
        block.register_state_dict_post_hook(lambda m, state, prefix, local: None)
        expected = r"state_dict / load_state_dict hooks"
    else:
        block.forward = block.forward
        expected = r"forward replaced on the instance"
    snapshot = ModelSnapshot.of(mixtral)
    with pytest.raises(ValueError, match=f"MoE block '{name}'.*{expected}"):
        autoep.apply(mixtral)
    assert snapshot.unchanged(mixtral)


def _experts_act_fn_gelu(post_init):
    def swap(model, generator):
        if post_init is not None:
            post_init(model, generator)
        for module in model.modules():
            if hasattr(module, "gate_up_proj") and hasattr(module, "act_fn"):
                module.act_fn = GELUActivation()
    return swap


@pytest.mark.parametrize("case", [CASES_BY_ID["mixtral"], CASES_BY_ID["deepseek_v3"]], ids=lambda c: c.id)
def test_act_fn_swapped_after_construction_is_followed(case):
    """config.hidden_act says silu, the experts call gelu: AutoEP (and the reference) follow the
    module, as the stock experts do."""
    case = dataclasses.replace(case, id=f"{case.id}-act_fn_gelu", post_init=_experts_act_fn_gelu(case.post_init))
    assert case.build().config.hidden_act == "silu"
    result = model_equivalence(case, AUTOEP, torch.float32)
    assert result.ok, "\n".join(result.failures())
    assert {s.activation for s in autoep.inspect(case.build())} == {"gelu"}
