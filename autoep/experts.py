"""Routed experts computed as grouped GEMMs over rows already sorted by expert.

Layout (Transformers 5.x fused): ``gate_up_proj [E_local, 2I, H]`` (gate rows first, then
up) and ``down_proj [E_local, H, I]``; an expert computes ``down(act(gate(x)) * up(x))``.

Three kernels, chosen at every call by the experts implementation Transformers' own experts
read (``config._experts_implementation``, set by ``model.set_experts_implementation()`` or
``from_pretrained(..., experts_implementation=...)``):

- ``grouped_mm``: ``torch.nn.functional.grouped_mm``, all experts in one call, where it accepts
  the dtype and strides; otherwise the loop.
- ``eager``: a per-expert ``mm`` loop (also ``expert_parallel.use_grouped_mm: false``).
- ``batched_mm``: each routed row's expert weights gathered, then one batched matmul (no
  data-dependent shapes; memory ``rows x 3 x H x I``).

Under ``torch.compile`` nothing data-dependent is traced: grouped_mm's fake kernel accepts
only bf16 in torch 2.13, so for other dtypes grouped_mm runs inside the opaque custom op
``autoep::expert_linear`` (the same kernel as uncompiled, its own backward op), and the loop
(whose ``.tolist()`` would break the graph) runs inside the same op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from autoep.activations import ACTIVATIONS, CLAMPED_SWIGLU, clamped_swiglu

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Transformers' experts implementations the AutoEP experts run (the first is Transformers' default).
EXPERTS_IMPLEMENTATIONS = ("grouped_mm", "batched_mm", "eager")


def check_experts_implementation(value, where: str = "the model") -> str:
    """The experts implementation ``value`` (``config._experts_implementation``) as one of
    :data:`EXPERTS_IMPLEMENTATIONS`; anything else is refused."""
    if value is None:
        return "grouped_mm"
    if value not in EXPERTS_IMPLEMENTATIONS:
        raise ValueError(
            f"{where}: experts_implementation={value!r} (config._experts_implementation, set by "
            "model.set_experts_implementation() or from_pretrained(..., experts_implementation=...)) has no "
            "AutoEP counterpart. The AutoEP experts run 'grouped_mm' (one grouped GEMM), 'batched_mm' (gathered "
            "expert weights, one batched matmul) or 'eager' (a per-expert loop): call "
            "model.set_experts_implementation('grouped_mm') (or 'batched_mm' / 'eager').")
    return value


def grouped_mm_supported(dtype: torch.dtype, *widths: int) -> bool:
    """grouped_mm needs fp32/bf16/fp16 and 16-byte aligned strides for rows of every width
    (hidden, expert width, and the output width when it differs)."""
    if dtype not in _GROUPED_MM_DTYPES or not hasattr(F, "grouped_mm"):
        return False
    elements_per_16_bytes = 16 // torch.tensor([], dtype=dtype).element_size()
    return all(width % elements_per_16_bytes == 0 for width in widths)


def kernel_for(implementation: str, dtype: torch.dtype, widths: tuple[int, ...]) -> str:
    """The kernel an experts implementation runs: "batched_mm", "grouped_mm" where it accepts the
    dtype and row widths, else (and for "eager") the per-expert "loop"."""
    if implementation == "batched_mm":
        return "batched_mm"
    if implementation == "grouped_mm" and grouped_mm_supported(dtype, *widths):
        return "grouped_mm"
    return "loop"


def linear_by_kernel(kernel: str, rows_RK: torch.Tensor, weight_EOK: torch.Tensor, counts_E: torch.Tensor,
                     expert_R: torch.Tensor | None) -> torch.Tensor:
    """Each row times its expert's weight ``[E, out, in]`` with ``kernel`` ("grouped_mm", "batched_mm"
    (needs ``expert_R``, each row's local expert) or "loop"); rows sorted by expert, ``counts_E`` each.
    Under torch.compile, grouped_mm in a dtype its fake kernel refuses, and the loop, run inside the
    opaque op :func:`expert_linear`."""
    if kernel == "batched_mm":
        return _batched_linear(rows_RK, weight_EOK, expert_R)
    compiling = torch.compiler.is_compiling()
    if kernel == "grouped_mm" and not (compiling and weight_EOK.dtype != torch.bfloat16):
        return _grouped_linear(rows_RK, weight_EOK, _offsets(counts_E))
    if compiling:
        return expert_linear(rows_RK, weight_EOK, counts_E, kernel == "grouped_mm")
    return _loop_linear(rows_RK, weight_EOK, counts_E)


def expert_mlp(rows_RK: torch.Tensor, gate_up_EOK: torch.Tensor, down_EOK: torch.Tensor, counts_E: torch.Tensor,
               grouped: bool, gate_fn, activation: str) -> torch.Tensor:
    """``down(gate_fn(gate, up))`` per expert, gate/up the halves of ``gate_up`` (both weights
    ``[E, out, in]``), with the activation recomputed in backward (:class:`_ExpertsMLP`);
    ``activation == "silu"`` takes the fused SiLU path, anything else autograd on ``gate_fn``."""
    return _ExpertsMLP.apply(rows_RK, gate_up_EOK, down_EOK, counts_E, grouped, gate_fn, activation)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm's
    backward rejects expanded, stride-0 gradients such as those of ``y.sum()``)."""

    @staticmethod
    def forward(ctx, tensor):
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _grouped_linear(rows_RK: torch.Tensor, weight_EOK: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    # weight [E, out, in] -> [E, in, out] view; rows of expert e are rows_RK[offs[e-1]:offs[e]].
    out_RO = F.grouped_mm(rows_RK, weight_EOK.transpose(-2, -1), offs=offsets_E)
    return _ContiguousGrad.apply(out_RO)


def _offsets(counts_E: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(counts_E, dim=0).to(torch.int32)


def _host_counts(counts_E) -> list[int]:
    """The per-expert row counts as Python ints: a list is used as it is (read once by the caller),
    a tensor is read back (one device-to-host read)."""
    return counts_E if isinstance(counts_E, list) else counts_E.tolist()


def _loop_linear(rows_RK: torch.Tensor, weight_EOK: torch.Tensor, counts_E) -> torch.Tensor:
    """``F.linear`` of each expert's rows with its weight, one ``mm`` per expert."""
    outputs, start = [], 0
    for expert, count in enumerate(_host_counts(counts_E)):
        outputs.append(F.linear(rows_RK[start:start + count], weight_EOK[expert]))
        start += count
    if not outputs:
        return rows_RK.new_zeros(0, weight_EOK.shape[1])
    return torch.cat(outputs, dim=0)


# The opaque op torch.compile sees (see the module docstring): grouped=True runs grouped_mm,
# grouped=False the loop; the same arithmetic as uncompiled in both directions.
@torch.library.custom_op("autoep::expert_linear", mutates_args=())
def expert_linear(rows_RK: torch.Tensor, weight_EOK: torch.Tensor, counts_E: torch.Tensor,
                  grouped: bool) -> torch.Tensor:
    return _expert_linear_impl(rows_RK, weight_EOK, counts_E, grouped)


def _expert_linear_impl(rows_RK, weight_EOK, counts_E, grouped: bool) -> torch.Tensor:
    """Each expert's rows times its weight: grouped_mm (counts a tensor) or the loop (counts a
    tensor or the list already read back)."""
    if grouped:
        return F.grouped_mm(rows_RK, weight_EOK.transpose(-2, -1), offs=_offsets(counts_E))
    return _loop_linear(rows_RK, weight_EOK, counts_E)


@expert_linear.register_fake
def _(rows_RK, weight_EOK, counts_E, grouped):
    return rows_RK.new_empty(rows_RK.shape[0], weight_EOK.shape[1])


@torch.library.custom_op("autoep::expert_linear_backward", mutates_args=())
def expert_linear_backward(rows_RK: torch.Tensor, weight_EOK: torch.Tensor, counts_E: torch.Tensor,
                           grad_RO: torch.Tensor, grouped: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(d rows, d weight) of :func:`expert_linear`: dX = dY W_e and dW_e = dY^T X per expert."""
    return _expert_linear_backward_impl(rows_RK, weight_EOK, counts_E, grad_RO, grouped)


def _expert_linear_backward_impl(rows_RK, weight_EOK, counts_E, grad_RO, grouped: bool):
    grad_RO = grad_RO.contiguous()
    counts_E = counts_E if grouped else _host_counts(counts_E)  # the loop reads the counts once
    return (_expert_input_grad(weight_EOK, grad_RO, counts_E, grouped),
            _expert_weight_grad(rows_RK, grad_RO, counts_E, grouped))


@expert_linear_backward.register_fake
def _(rows_RK, weight_EOK, counts_E, grad_RO, grouped):
    return torch.empty_like(rows_RK), torch.empty_like(weight_EOK)


def _setup_context(ctx, inputs, output):
    rows_RK, weight_EOK, counts_E, grouped = inputs
    ctx.save_for_backward(rows_RK, weight_EOK, counts_E)
    ctx.grouped = grouped


def _backward(ctx, grad_RO):
    rows_RK, weight_EOK, counts_E = ctx.saved_tensors
    grad_rows, grad_weight = expert_linear_backward(rows_RK, weight_EOK, counts_E, grad_RO, ctx.grouped)
    return grad_rows, grad_weight, None, None


expert_linear.register_autograd(_backward, setup_context=_setup_context)


class _ExpertsMLP(torch.autograd.Function):
    """``down(gate_fn(gate_up(rows)))`` for every local expert, keeping for backward only the
    rows and the gate/up projection: the activation and its product with ``up`` (two ``[R, I]``
    tensors autograd would keep) are recomputed from the projection in backward. The same kernels
    and the same arithmetic as without recomputation, in both directions.

    Backward touches each ``[R, I]`` element few times and allocates no ``[R, I]`` tensor beside
    the one ``d hidden`` it needs: ``d hidden = d out down`` first, then one pass of row slices
    (:func:`_gate_backward_rows`) evaluates the activation once per element and writes ``d gate``
    and ``d up`` over the projection and the recomputed ``hidden`` over ``d hidden``, from which
    ``d down = d out^T hidden`` follows. Because its backward consumes what it saved, it runs
    once: a second backward through the same graph (``retain_graph=True``) is refused with a
    clear error instead of reading overwritten values."""

    @staticmethod
    def forward(ctx, rows_RK, gate_up_EOK, down_EOK, counts_E, grouped, gate_fn, activation):
        # The loop reads the counts back once per step (forward and backward share the list).
        counts = counts_E if grouped else counts_E.tolist()
        gate_up_RO = _expert_linear_impl(rows_RK, gate_up_EOK, counts, grouped)
        gate_RI, up_RI = gate_up_RO.chunk(2, dim=-1)
        # SiLU: the product written over the activation (the same values as silu(gate) * up, one
        # [R, I] tensor fewer).
        hidden_RI = F.silu(gate_RI).mul_(up_RI) if activation == "silu" else gate_fn(gate_RI, up_RI)
        out_RH = _expert_linear_impl(hidden_RI, down_EOK, counts, grouped)
        ctx.save_for_backward(rows_RK, gate_up_EOK, down_EOK, counts_E, gate_up_RO)
        ctx.grouped, ctx.gate_fn, ctx.activation, ctx.consumed = grouped, gate_fn, activation, False
        ctx.host_counts = None if grouped else counts
        return out_RH

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_RH):
        if ctx.consumed:
            raise RuntimeError(
                "AutoEP experts: a second backward through the same graph (retain_graph=True). The experts "
                "recompute their activation in backward and overwrite the saved projection with its gradient, so "
                "their backward runs once per forward; run the forward again for another backward.")
        rows_RK, gate_up_EOK, down_EOK, counts_E, gate_up_RO = ctx.saved_tensors
        grouped = ctx.grouped
        counts_E = counts_E if grouped else ctx.host_counts
        grad_RH = grad_RH.contiguous()
        grad_hidden_RI = _expert_input_grad(down_EOK, grad_RH, counts_E, grouped)  # d hidden = d out down
        ctx.consumed = True
        slices = list(_row_slices(gate_up_RO.shape[0]))
        # SiLU's two slice temporaries, allocated once and reused by every slice
        scratch = [grad_hidden_RI.new_empty(slices[0].stop - slices[0].start, grad_hidden_RI.shape[1])
                   for _ in range(2)] if ctx.activation == "silu" and slices else None
        for rows in slices:
            gate_RI, up_RI = gate_up_RO[rows].chunk(2, dim=-1)
            _gate_backward_rows(ctx.gate_fn, ctx.activation, gate_RI, up_RI, grad_hidden_RI[rows], scratch)
        del scratch  # before the weight gradients are allocated
        hidden_RI, grad_gate_up_RO = grad_hidden_RI, gate_up_RO  # what the slices left in the two buffers
        grad_down = _expert_weight_grad(hidden_RI, grad_RH, counts_E, grouped)  # d down = d out^T hidden
        del hidden_RI, grad_hidden_RI
        grad_rows, grad_gate_up = _expert_linear_backward_impl(rows_RK, gate_up_EOK, counts_E, grad_gate_up_RO,
                                                               grouped)
        return grad_rows, grad_gate_up, grad_down, None, None, None, None


def _gate_backward_rows(gate_fn, activation: str, gate_RI: torch.Tensor, up_RI: torch.Tensor,
                        grad_hidden_RI: torch.Tensor, scratch: list[torch.Tensor] | None) -> None:
    """For ``hidden = gate_fn(gate, up)`` and ``d hidden``, in place: ``gate_RI`` becomes d gate,
    ``up_RI`` d up and ``grad_hidden_RI`` the recomputed ``hidden``. SiLU with the ops autograd
    would run, the activation evaluated once: d up = d hidden * silu(gate), d gate =
    silu_backward(d hidden * up, gate), hidden = silu(gate) * up; ``scratch``: two buffers of at
    least these rows for its temporaries (None for other activations). Otherwise autograd on the
    recomputation of these rows."""
    if activation == "silu":
        rows = gate_RI.shape[0]
        act_RI = torch.ops.aten.silu.out(gate_RI, out=scratch[0][:rows])
        grad_act_RI = torch.mul(up_RI, grad_hidden_RI, out=scratch[1][:rows])
        torch.ops.aten.silu_backward.grad_input(grad_act_RI, gate_RI, grad_input=gate_RI)  # d gate
        grad_up_RI = torch.mul(grad_hidden_RI, act_RI, out=grad_act_RI)  # d act is spent: its buffer takes d up
        torch.mul(act_RI, up_RI, out=grad_hidden_RI)                      # hidden (d hidden is spent)
        up_RI.copy_(grad_up_RI)
        return
    with torch.enable_grad():
        gate, up = gate_RI.detach().requires_grad_(), up_RI.detach().requires_grad_()
        hidden_RI = gate_fn(gate, up)
    grad_gate_RI, grad_up_RI = torch.autograd.grad(hidden_RI, (gate, up), grad_hidden_RI)
    grad_hidden_RI.copy_(hidden_RI.detach())
    gate_RI.copy_(grad_gate_RI)
    up_RI.copy_(grad_up_RI)


# Backward rewrites [R, I] tensors in at most this many row slices of at least _MIN_SLICE_ROWS
# rows: the slice temporaries stay a fraction of [R, I] while the number of kernel launches stays
# small (on a GPU each slice costs a few launches).
_SLICES, _MIN_SLICE_ROWS = 4, 1024


def _row_slices(num_rows: int):
    step = max(_MIN_SLICE_ROWS, -(-num_rows // _SLICES))
    return (slice(start, start + step) for start in range(0, num_rows, step))


def _expert_input_grad(weight_EOK, grad_RO, counts_E, grouped: bool) -> torch.Tensor:
    """d rows = d out W_e per expert."""
    if grouped:
        return F.grouped_mm(grad_RO, weight_EOK, offs=_offsets(counts_E))
    grad_rows, start = grad_RO.new_empty(grad_RO.shape[0], weight_EOK.shape[2]), 0
    for expert, count in enumerate(_host_counts(counts_E)):
        grad_rows[start:start + count] = grad_RO[start:start + count] @ weight_EOK[expert]
        start += count
    return grad_rows


def _expert_weight_grad(rows_RK, grad_RO, counts_E, grouped: bool) -> torch.Tensor:
    """d W_e = d out^T rows per expert, ``[E, out, in]``."""
    if grouped:
        return F.grouped_mm(grad_RO.t(), rows_RK, offs=_offsets(counts_E))
    counts = _host_counts(counts_E)
    grad_weight = grad_RO.new_zeros(len(counts), grad_RO.shape[1], rows_RK.shape[1])
    start = 0
    for expert, count in enumerate(counts):
        grad_weight[expert] = grad_RO[start:start + count].t() @ rows_RK[start:start + count]
        start += count
    return grad_weight


def _batched_linear(rows_RK: torch.Tensor, weight_EOK: torch.Tensor, expert_R: torch.Tensor) -> torch.Tensor:
    """Each row times its own expert's weight: gather [R, out, in], one ``bmm``."""
    return torch.bmm(weight_EOK[expert_R], rows_RK.unsqueeze(-1)).squeeze(-1)


class GroupedExperts(nn.Module):
    """The experts one rank holds, as fused 3-D parameters named like the original's."""

    def __init__(self, gate_up_proj: nn.Parameter, down_proj: nn.Parameter, activation: str = "silu",
                 use_grouped_mm: bool = True, gate_up_name: str = "gate_up_proj", down_name: str = "down_proj",
                 hf_config=None, down_first: bool = False, activation_params: tuple[float, ...] = ()):
        """``hf_config``: the Transformers config whose ``_experts_implementation`` the original
        experts read at every call (the kernel then follows it); without one, ``use_grouped_mm``
        picks grouped_mm or the loop. ``down_first``: register ``down`` before ``gate_up``
        (the original's order, so parameter order and optimizer state line up).
        ``activation_params``: (alpha, limit) of ``activation="swiglu_clamped"``; empty otherwise."""
        super().__init__()
        self.gate_up_name = gate_up_name
        self.down_name = down_name
        for name, param in ((down_name, down_proj), (gate_up_name, gate_up_proj))[::1 if down_first else -1]:
            self.register_parameter(name, param)
        if activation == CLAMPED_SWIGLU:
            if len(activation_params) != 2:
                raise ValueError(f"activation {activation!r} needs (alpha, limit), got {activation_params!r}")
            self.act_fn = None
        elif activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not one of {', '.join(ACTIVATIONS)}, {CLAMPED_SWIGLU}")
        elif activation_params:
            raise ValueError(f"activation {activation!r} takes no parameters, got {activation_params!r}")
        else:
            self.act_fn = ACTIVATIONS[activation]
        self.activation = activation
        self.activation_params = tuple(activation_params)
        self.hf_config = hf_config
        self.default_implementation = "grouped_mm" if use_grouped_mm else "eager"
        self.last_path: str | None = None  # "grouped_mm", "loop" or "batched_mm": which kernel ran last

    def implementation(self) -> str:
        """The experts implementation in force now: Transformers' setting, else the default."""
        requested = getattr(self.hf_config, "_experts_implementation", None) if self.hf_config is not None else None
        return check_experts_implementation(requested or self.default_implementation, "AutoEP experts")

    @property
    def use_grouped_mm(self) -> bool:
        return self.implementation() == "grouped_mm"

    @property
    def gate_up(self) -> torch.Tensor:
        return getattr(self, self.gate_up_name)

    @property
    def down(self) -> torch.Tensor:
        return getattr(self, self.down_name)

    @property
    def num_local_experts(self) -> int:
        return tuple(getattr(self.gate_up, "ds_shape", None) or self.gate_up.shape)[0]

    def extra_repr(self) -> str:
        # (a ZeRO-3 parameter's full shape is in ds_shape: its local tensor is empty between uses)
        experts, two_i, hidden = tuple(getattr(self.gate_up, "ds_shape", None) or self.gate_up.shape)
        act = self.activation + (f"{self.activation_params}" if self.activation_params else "")
        return (f"local_experts={experts}, hidden={hidden}, expert_width={two_i // 2}, act={act}, "
                f"implementation={self.implementation()}")

    def kernel(self) -> str:
        """What the next call runs: "grouped_mm", "batched_mm" or "loop"."""
        gate_up, down = self.gate_up, self.down
        return kernel_for(self.implementation(), gate_up.dtype, (gate_up.shape[2], down.shape[2]))

    def forward(self, rows_RH: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """``rows_RH`` sorted by local expert; ``tokens_per_expert_E`` counts them (sums to R)."""
        gate_up, down = self.gate_up, self.down
        rows_RH = rows_RH.to(gate_up.dtype)
        kernel = self.kernel()
        self.last_path = kernel
        expert_R = None
        if kernel == "batched_mm":
            expert_R = torch.repeat_interleave(torch.arange(gate_up.shape[0], device=rows_RH.device),
                                               tokens_per_expert_E, output_size=rows_RH.shape[0])
        if kernel != "batched_mm" and not torch.compiler.is_compiling() and torch.is_grad_enabled():
            # The memory-lean path (activation recomputed in backward); under torch.compile the
            # partitioner decides what to recompute, and batched_mm keeps its gathered weights.
            return expert_mlp(rows_RH, gate_up, down, tokens_per_expert_E, kernel == "grouped_mm", self.gate_fn,
                              self.activation)
        gate_up_RO = linear_by_kernel(kernel, rows_RH, gate_up, tokens_per_expert_E, expert_R)
        return linear_by_kernel(kernel, self.gate_fn(*gate_up_RO.chunk(2, dim=-1)), down, tokens_per_expert_E,
                                expert_R)

    def gate_fn(self, gate_RI: torch.Tensor, up_RI: torch.Tensor) -> torch.Tensor:
        """The gated activation: ``act(gate) * up``, or the clamped SwiGLU."""
        if self.act_fn is None:
            return clamped_swiglu(gate_RI, up_RI, *self.activation_params)
        return self.act_fn(gate_RI) * up_RI
