"""Token permutation: sort routed rows by expert, and the exact inverse.

With ``autoep_size == 1`` every expert is local and no collective runs; the same
sort / unsort is the first and last step of the expert-parallel AllToAll path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LocalRouting:
    """How the T*K routed rows were ordered: ``order_R[i]`` is the (token*K + slot) that sits
    at sorted row i."""

    order_R: torch.Tensor
    tokens_per_expert_E: torch.Tensor
    num_tokens: int
    top_k: int


def sort_by_expert(hidden_TH: torch.Tensor, expert_ids_TK: torch.Tensor, num_experts: int
                   ) -> tuple[torch.Tensor, LocalRouting]:
    """Rows of ``hidden_TH`` repeated per routed slot, grouped by expert id (stable: within
    one expert, token order then slot order). Returns (rows_RH, routing)."""
    num_tokens, top_k = expert_ids_TK.shape
    flat_ids_R = expert_ids_TK.reshape(-1)
    order_R = torch.argsort(flat_ids_R, stable=True)
    tokens_per_expert_E = torch.bincount(flat_ids_R, minlength=num_experts)
    rows_RH = hidden_TH.index_select(0, order_R // top_k)
    return rows_RH, LocalRouting(order_R, tokens_per_expert_E, num_tokens, top_k)


def unsort(rows_RH: torch.Tensor, routing: LocalRouting) -> torch.Tensor:
    """Inverse of :func:`sort_by_expert`: returns ``[T, K, H]`` in token/slot order."""
    inverse_R = torch.empty_like(routing.order_R)
    inverse_R[routing.order_R] = torch.arange(routing.order_R.numel(), device=routing.order_R.device)
    return rows_RH.index_select(0, inverse_R).view(routing.num_tokens, routing.top_k, rows_RH.shape[-1])
