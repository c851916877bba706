"""The experts' memory-lean backward (autoep/experts.py ``_ExpertsMLP``) and the gather-only
dispatch/combine (autoep/dispatch.py ``_GatherRows``, ``_WeightedSum``): the same gradients as plain
autograd over the same kernels, less kept for backward than the Transformers block, and a clear
refusal of a second backward through one graph."""

import pytest
import torch

from autoep.dispatch import sort_by_expert, unsort, weighted_sum
from autoep.experts import GroupedExperts, linear_by_kernel
from conformance.tolerances import assert_close, tolerance


def experts_and_rows(activation, params, dtype, seed=0, rows=300, hidden=16, inter=32, experts=4):
    generator = torch.Generator().manual_seed(seed)
    gate_up = torch.nn.Parameter((torch.randn(experts, 2 * inter, hidden, generator=generator) * 0.3).to(dtype))
    down = torch.nn.Parameter((torch.randn(experts, hidden, inter, generator=generator) * 0.3).to(dtype))
    module = GroupedExperts(gate_up, down, activation, activation_params=params)
    counts = torch.tensor([rows // 2, 0, rows // 3, rows - rows // 2 - rows // 3])
    x = torch.randn(rows, hidden, generator=generator).to(dtype).requires_grad_()
    upstream = torch.randn(rows, hidden, generator=generator)
    return module, x, counts, upstream


def plain_autograd(module, x, counts):
    """The same kernels without the custom backward: the path torch.compile and batched_mm take."""
    kernel = module.kernel()
    gate_up_RO = linear_by_kernel(kernel, x, module.gate_up, counts, None)
    return linear_by_kernel(kernel, module.gate_fn(*gate_up_RO.chunk(2, dim=-1)), module.down, counts, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("implementation", ["grouped_mm", "eager"])
@pytest.mark.parametrize("activation,params", [("silu", ()), ("gelu", ()), ("swiglu_clamped", (1.702, 7.0))])
@pytest.mark.parametrize("rows", [300, 2500], ids=["one-slice", "three-slices"])  # backward's row slices
def test_lean_backward_matches_plain_autograd(activation, params, implementation, dtype, rows):
    module, x, counts, upstream = experts_and_rows(activation, params, dtype, rows=rows)
    module.default_implementation = implementation
    grads = []
    for forward in (lambda: module(x, counts), lambda: plain_autograd(module, x, counts)):
        module.zero_grad(set_to_none=True)
        x.grad = None
        out = forward()
        (out.float() * upstream).sum().backward()
        grads.append((out.detach(), x.grad, module.gate_up.grad, module.down.grad))
    for lean, plain in zip(*grads):
        # The same ops on the same values: equal to the last bit (SiLU's in-place rewrite runs
        # silu_backward and the products autograd runs; others use autograd on the recomputation).
        assert torch.equal(lean, plain)


def test_a_second_backward_through_one_graph_is_refused():
    module, x, counts, upstream = experts_and_rows("silu", (), torch.float32)
    loss = (module(x, counts) * upstream).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward through the same graph"):
        loss.backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_weighted_sum_matches_the_gather_then_sum_in_the_accumulation_dtype(dtype):
    generator = torch.Generator().manual_seed(3)
    tokens, top_k, experts, hidden = 37, 3, 5, 8
    hidden_TH = torch.randn(tokens, hidden, generator=generator).to(dtype).requires_grad_()
    ids_TK = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)])
    weights_TK = torch.rand(tokens, top_k, generator=generator).requires_grad_()
    upstream = torch.randn(tokens, hidden, generator=generator, dtype=torch.float64)
    accumulate = torch.promote_types(dtype, torch.float32)

    rows_RH, routing = sort_by_expert(hidden_TH, ids_TK, experts)
    rows_RH = rows_RH * 2.0  # stand-in for the experts
    out = weighted_sum(rows_RH, weights_TK, routing)
    assert out.dtype == accumulate
    (out.double() * upstream).sum().backward()
    ours = (out.detach(), hidden_TH.grad, weights_TK.grad)

    hidden_TH.grad = weights_TK.grad = None
    rows_TKH = hidden_TH.index_select(0, ids_TK.new_tensor(range(tokens)).repeat_interleave(top_k)).view(
        tokens, top_k, hidden) * 2.0
    plain = (rows_TKH.to(accumulate) * weights_TK.to(accumulate).unsqueeze(-1)).sum(dim=1)
    (plain.double() * upstream).sum().backward()
    # Same products; sums in slot order vs torch's reduction and index_add (bf16: index_add rounds
    # every addition to bf16, the gather-sum once).
    for what, got, want in zip(("out", "d hidden", "d weights"), ours, (plain.detach(), hidden_TH.grad, weights_TK.grad)):
        assert_close(what, got.float() if dtype == torch.bfloat16 else got,
                     want.float() if dtype == torch.bfloat16 else want, tolerance(dtype))
    assert torch.equal(unsort(rows_RH.detach(), routing).sum(dim=1), rows_TKH.detach().sum(dim=1))
