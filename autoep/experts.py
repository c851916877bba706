"""Routed experts computed as grouped GEMMs over rows already sorted by expert.

Layout (Transformers 5.x fused): ``gate_up_proj [E_local, 2I, H]`` (gate rows first, then
up) and ``down_proj [E_local, H, I]``; an expert computes ``down(act(gate(x)) * up(x))``.
``torch.nn.functional.grouped_mm`` runs all experts in one call where it accepts the
dtype and strides; a per-expert ``mm`` loop covers the rest (and ``use_grouped_mm=false``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"silu": F.silu}
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm_supported(dtype: torch.dtype, hidden: int, intermediate: int) -> bool:
    """grouped_mm needs fp32/bf16/fp16 and 16-byte aligned strides for [*, H] and [*, I] rows."""
    if dtype not in _GROUPED_MM_DTYPES or not hasattr(F, "grouped_mm"):
        return False
    elements_per_16_bytes = 16 // torch.tensor([], dtype=dtype).element_size()
    return hidden % elements_per_16_bytes == 0 and intermediate % elements_per_16_bytes == 0


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


class GroupedExperts(nn.Module):
    """The experts one rank holds, as fused 3-D parameters named like the original's."""

    def __init__(self, gate_up_proj: nn.Parameter, down_proj: nn.Parameter, activation: str = "silu",
                 use_grouped_mm: bool = True, gate_up_name: str = "gate_up_proj", down_name: str = "down_proj"):
        super().__init__()
        self.gate_up_name = gate_up_name
        self.down_name = down_name
        self.register_parameter(gate_up_name, gate_up_proj)
        self.register_parameter(down_name, down_proj)
        self.activation = activation
        self.act_fn = ACTIVATIONS[activation]
        self.use_grouped_mm = use_grouped_mm
        self.last_path: str | None = None  # "grouped_mm" or "loop": which kernel ran last

    @property
    def gate_up(self) -> torch.Tensor:
        return getattr(self, self.gate_up_name)

    @property
    def down(self) -> torch.Tensor:
        return getattr(self, self.down_name)

    @property
    def num_local_experts(self) -> int:
        return self.gate_up.shape[0]

    def extra_repr(self) -> str:
        experts, two_i, hidden = self.gate_up.shape
        return (f"local_experts={experts}, hidden={hidden}, expert_width={two_i // 2}, act={self.activation}, "
                f"grouped_mm={self.use_grouped_mm}")

    def forward(self, rows_RH: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """``rows_RH`` sorted by local expert; ``tokens_per_expert_E`` counts them (sums to R)."""
        gate_up, down = self.gate_up, self.down
        rows_RH = rows_RH.to(gate_up.dtype)
        if self.use_grouped_mm and grouped_mm_supported(gate_up.dtype, gate_up.shape[2], down.shape[2]):
            self.last_path = "grouped_mm"
            offsets_E = torch.cumsum(tokens_per_expert_E, dim=0).to(torch.int32)
            gate_up_R2I = _grouped_linear(rows_RH, gate_up, offsets_E)
            gate_RI, up_RI = gate_up_R2I.chunk(2, dim=-1)
            return _grouped_linear(self.act_fn(gate_RI) * up_RI, down, offsets_E)
        self.last_path = "loop"
        outputs = []
        start = 0
        for expert, count in enumerate(tokens_per_expert_E.tolist()):
            rows = rows_RH[start:start + count]
            gate_RI, up_RI = F.linear(rows, gate_up[expert]).chunk(2, dim=-1)
            outputs.append(F.linear(self.act_fn(gate_RI) * up_RI, down[expert]))
            start += count
        if not outputs:
            return rows_RH.new_zeros(0, down.shape[1])
        return torch.cat(outputs, dim=0)
