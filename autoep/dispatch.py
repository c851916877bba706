"""Token dispatch and combine: sort routed rows by expert, exchange them over the EP group,
and the exact reverse. See DESIGN section 2.

Profiler labels (``torch.profiler.record_function``, free when no profiler runs):
``autoep.dispatch``, ``autoep.combine``, ``autoep.count_exchange`` and
``autoep.all_to_all.{dispatch,combine}[.backward]``.

One path for every ``autoep_size``::

    dispatch:  sort by expert          [T,H] -> rows_RH, tokens_per_expert_E  (stable)
               count exchange          all_to_all_single of tokens_per_expert_E (E int64)
               token AllToAll          rows_RH -> received rows, uneven splits, no padding
               rank-major -> expert-major permutation
    combine:   the inverse permutation, the AllToAll back (splits swapped), then the weighted
               sum per token (:func:`weighted_sum`): [R,H] expert rows -> [T,H]

With ``autoep_size == 1`` (``groups is None``) the collectives and the permutation are
skipped and the rest is unchanged. Experts are laid out contiguously over the EP group (EP
rank r holds experts ``[r*E_local, (r+1)*E_local)``), so the expert-sorted rows are already
grouped by destination rank. Every collective has its autograd adjoint: the AllToAll's
backward is the AllToAll with the splits swapped; permutations use ``index_select``, whose
backward scatters each row to exactly one place (deterministic).

Memory and determinism of the two ends (the routed rows are the biggest activations of a block):
the gather of each token's K copies (:class:`_GatherRows`) and the weighted sum back
(:class:`_WeightedSum`) are autograd functions whose backward never accumulates into shared
places: a token's gradient is the sum of its K row gradients (gathered through the inverse
permutation), and a row's gradient is its token's gradient times its weight (written to the row's
one place through the permutation), so no scatter-add runs (no atomics on CUDA) and the K terms
are summed in float32 (float64 for a float64 model), in slot order, deterministically on every
device. The weighted sum keeps only the expert rows in their own dtype for backward and works
slot by slot in both directions: no ``[T, K, H]`` temporary, only ``[T, H]`` ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.profiler import record_function

from autoep.groups import ExpertParallelGroups


@dataclass
class LocalRouting:
    """How the T*K routed rows were ordered: ``order_R[i]`` is the (token*K + slot) that sits
    at sorted row i; ``inverse_R[token*K + slot]`` is the sorted row that holds it."""

    order_R: torch.Tensor
    tokens_per_expert_E: torch.Tensor
    num_tokens: int
    top_k: int
    inverse_R: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.inverse_R is None:
            self.inverse_R = inverse_permutation(self.order_R)


@dataclass
class DispatchState:
    """What :func:`dispatch` decided, needed by :func:`combine` to undo it."""

    local: LocalRouting
    tokens_per_local_expert: torch.Tensor       # [E_local] rows the local experts receive
    groups: ExpertParallelGroups | None = None
    send_splits: list[int] | None = None        # rows sent to each EP rank
    receive_splits: list[int] | None = None     # rows received from each EP rank
    expert_major_order: torch.Tensor | None = None  # received row index at each expert-major row


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


def sort_by_expert(hidden_TH: torch.Tensor, expert_ids_TK: torch.Tensor, num_experts: int
                   ) -> tuple[torch.Tensor, LocalRouting]:
    """Rows of ``hidden_TH`` repeated per routed slot, grouped by expert id (stable: within
    one expert, token order then slot order). Returns (rows_RH, routing)."""
    num_tokens, top_k = expert_ids_TK.shape
    flat_ids_R = expert_ids_TK.reshape(-1)
    order_R = torch.argsort(flat_ids_R, stable=True)
    # Counts from where each expert's run starts in the sorted ids: always [E] (bincount's
    # length depends on the data, which torch.compile cannot trace), deterministic everywhere.
    starts = torch.searchsorted(flat_ids_R[order_R], torch.arange(num_experts + 1, device=flat_ids_R.device))
    tokens_per_expert_E = starts[1:] - starts[:-1]
    routing = LocalRouting(order_R, tokens_per_expert_E, num_tokens, top_k)
    rows_RH = _GatherRows.apply(hidden_TH, order_R, routing.inverse_R, top_k)
    return rows_RH, routing


def unsort(rows_RH: torch.Tensor, routing: LocalRouting) -> torch.Tensor:
    """Inverse of :func:`sort_by_expert`: returns ``[T, K, H]`` in token/slot order."""
    return _token_major(rows_RH, routing.inverse_R, routing.top_k)


def _token_major(rows_RH: torch.Tensor, inverse_R: torch.Tensor, top_k: int) -> torch.Tensor:
    """Expert-sorted rows gathered back into token/slot order, ``[T, K, H]``."""
    return rows_RH.index_select(0, inverse_R).view(-1, top_k, rows_RH.shape[-1])


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for a float64 model (never below float32)."""
    return torch.promote_types(dtype, torch.float32)


class _GatherRows(torch.autograd.Function):
    """``hidden_TH[order_R // K]``: each token's row once per routed slot, expert-sorted. Backward:
    a token's gradient is the sum of its K row gradients, gathered through the inverse
    permutation and summed in slot order in the accumulation dtype (no scatter-add)."""

    @staticmethod
    def forward(ctx, hidden_TH, order_R, inverse_R, top_k):
        ctx.save_for_backward(inverse_R)
        ctx.top_k = top_k
        return hidden_TH.index_select(0, order_R // top_k)

    @staticmethod
    def backward(ctx, grad_RH):
        (inverse_R,) = ctx.saved_tensors
        inverse_TK = inverse_R.view(-1, ctx.top_k)
        # Slot by slot in slot order, through [T, H] buffers reused by every slot (no [T, K, H] one).
        grad_TH = grad_RH.index_select(0, inverse_TK[:, 0]).to(_accumulation_dtype(grad_RH.dtype))
        if ctx.top_k > 1:
            slot_TH = grad_RH.new_empty(grad_TH.shape)
            widened_TH = slot_TH if slot_TH.dtype == grad_TH.dtype else torch.empty_like(grad_TH)
            for slot in range(1, ctx.top_k):
                torch.index_select(grad_RH, 0, inverse_TK[:, slot], out=slot_TH)
                if widened_TH is not slot_TH:
                    widened_TH.copy_(slot_TH)
                grad_TH.add_(widened_TH)
        return grad_TH.to(grad_RH.dtype), None, None, None


class _WeightedSum(torch.autograd.Function):
    """``out_TH[t] = sum_k weights_TK[t, k] * rows_RH[inverse_R[t*K + k]]`` in the accumulation
    dtype, slot by slot in slot order. Saves the rows in their own dtype; no ``[T, K, H]``
    temporary in either direction, only ``[T, H]`` ones per slot (backward runs where a step's
    memory peaks). Backward, per slot: a row's gradient is its token's gradient times its weight,
    written to the row's place (``index_copy_`` through a permutation: each row once, no
    accumulation, deterministic on every device); a weight's gradient is the dot product of its
    token's gradient with its row."""

    @staticmethod
    def forward(ctx, rows_RH, weights_TK, inverse_R):
        ctx.save_for_backward(rows_RH, weights_TK, inverse_R)
        # Each slot's rows gathered ([T, H] in their own dtype), multiplied by their weights in the
        # accumulation dtype (the rows widened exactly inside the product), added to the running sum.
        weights_TK = weights_TK.to(_accumulation_dtype(rows_RH.dtype))
        inverse_TK = inverse_R.view(weights_TK.shape)
        out_TH = None
        for slot in range(weights_TK.shape[1]):
            product_TH = rows_RH.index_select(0, inverse_TK[:, slot]) * weights_TK[:, slot, None]
            out_TH = product_TH if out_TH is None else out_TH.add_(product_TH)
        return out_TH

    @staticmethod
    def backward(ctx, grad_TH):
        rows_RH, weights_TK, inverse_R = ctx.saved_tensors
        inverse_TK = inverse_R.view(weights_TK.shape)
        weights_TK_grad_dtype = weights_TK.to(grad_TH.dtype)
        grad_rows = rows_RH.new_empty(rows_RH.shape) if ctx.needs_input_grad[0] else None
        num_tokens, top_k = weights_TK.shape
        grad_weights_KT = grad_TH.new_empty(top_k, num_tokens) if ctx.needs_input_grad[1] else None
        # Two [T, H] buffers reused by every slot (fresh tensors of this size cost page faults on a
        # CPU): ``product_TH`` in grad_TH's dtype, ``slot_TH`` in the rows' (one buffer when equal).
        product_TH = torch.empty_like(grad_TH)
        slot_TH = product_TH if rows_RH.dtype == grad_TH.dtype else rows_RH.new_empty(grad_TH.shape)
        for slot in range(top_k):
            rows_of_slot = inverse_TK[:, slot]
            if grad_weights_KT is not None:  # d weight = <d out, row>, the row widened exactly
                torch.index_select(rows_RH, 0, rows_of_slot, out=slot_TH)
                if slot_TH is not product_TH:
                    product_TH.copy_(slot_TH)
                torch.sum(product_TH.mul_(grad_TH), dim=-1, out=grad_weights_KT[slot])
            if grad_rows is not None:  # d row = d out * weight in grad_TH's dtype, rounded once to the rows'
                torch.mul(grad_TH, weights_TK_grad_dtype[:, slot, None], out=product_TH)
                if slot_TH is not product_TH:
                    slot_TH.copy_(product_TH)
                grad_rows.index_copy_(0, rows_of_slot, slot_TH)
        grad_weights = None if grad_weights_KT is None else grad_weights_KT.t().to(weights_TK.dtype)
        return grad_rows, grad_weights, None


def weighted_sum(rows_RH: torch.Tensor, weights_TK: torch.Tensor, routing: LocalRouting) -> torch.Tensor:
    """Rows in the local expert-sorted order (as :func:`sort_by_expert` left them) weighted and
    summed per token: ``[T, H]`` in the accumulation dtype (float32, float64 for float64)."""
    return _WeightedSum.apply(rows_RH, weights_TK, routing.inverse_R)


def _all_to_all(rows: torch.Tensor, receive_splits: list[int], send_splits: list[int], group) -> torch.Tensor:
    received = rows.new_empty((sum(receive_splits),) + tuple(rows.shape[1:]))
    # Looked up at call time (not imported by name) so a test can count what crosses the wire.
    dist.all_to_all_single(received, rows.contiguous(), output_split_sizes=receive_splits,
                           input_split_sizes=send_splits, group=group)
    return received


class _AllToAll(torch.autograd.Function):
    """Rows exchanged over ``group`` with uneven splits; backward sends gradients back."""

    @staticmethod
    def forward(ctx, rows, receive_splits, send_splits, group, label):
        ctx.splits, ctx.group, ctx.label = (receive_splits, send_splits), group, label
        with record_function(f"autoep.all_to_all.{label}"):
            return _all_to_all(rows, receive_splits, send_splits, group)

    @staticmethod
    def backward(ctx, grad):
        receive_splits, send_splits = ctx.splits
        with record_function(f"autoep.all_to_all.{ctx.label}.backward"):
            return _all_to_all(grad, send_splits, receive_splits, ctx.group), None, None, None, None


def exchange_counts(tokens_per_expert_E: torch.Tensor, groups: ExpertParallelGroups) -> torch.Tensor:
    """Each EP rank learns how many rows every peer sends to each of its local experts:
    returns ``[ep_size, E_local]`` (source EP rank, local expert)."""
    received_E = torch.empty_like(tokens_per_expert_E)
    with record_function("autoep.count_exchange"):
        dist.all_to_all_single(received_E, tokens_per_expert_E, group=groups.ep_group)
    return received_E.view(groups.ep_size, -1)


def dispatch(hidden_TH: torch.Tensor, expert_ids_TK: torch.Tensor, num_experts: int,
             groups: ExpertParallelGroups | None) -> tuple[torch.Tensor, DispatchState]:
    """Rows for this rank's local experts, expert-major (all rows of local expert 0 from every
    source rank, then local expert 1, ...), and the state to combine them back."""
    with record_function("autoep.dispatch"):
        return _dispatch(hidden_TH, expert_ids_TK, num_experts, groups)


def _dispatch(hidden_TH, expert_ids_TK, num_experts, groups):
    rows_RH, local = sort_by_expert(hidden_TH, expert_ids_TK, num_experts)
    if groups is None or groups.ep_size == 1:
        return rows_RH, DispatchState(local, local.tokens_per_expert_E)
    ep_size = groups.ep_size
    received_counts_SE = exchange_counts(local.tokens_per_expert_E, groups)
    send_splits = local.tokens_per_expert_E.view(ep_size, -1).sum(dim=1).tolist()
    receive_splits = received_counts_SE.sum(dim=1).tolist()
    received_RH = _AllToAll.apply(rows_RH, receive_splits, send_splits, groups.ep_group, "dispatch")
    # Received rows are rank-major (source rank, then local expert); the experts need them
    # expert-major. Segment (s, e) starts at offset_SE[s, e] in the received rows.
    counts_SE = received_counts_SE
    offset_SE = (torch.cumsum(counts_SE.reshape(-1), 0) - counts_SE.reshape(-1)).view_as(counts_SE)
    counts_ES, offset_ES = counts_SE.t().reshape(-1), offset_SE.t().reshape(-1)
    target_start_ES = torch.cumsum(counts_ES, 0) - counts_ES
    total = int(counts_ES.sum())
    expert_major_order = (torch.arange(total, device=counts_ES.device)
                          + torch.repeat_interleave(offset_ES - target_start_ES, counts_ES, output_size=total))
    rows_for_experts = received_RH.index_select(0, expert_major_order)
    state = DispatchState(local, counts_SE.sum(dim=0), groups, send_splits, receive_splits, expert_major_order)
    return rows_for_experts, state


def combine(expert_rows: torch.Tensor, weights_TK: torch.Tensor, state: DispatchState) -> torch.Tensor:
    """The reverse of :func:`dispatch`: expert outputs back to their tokens, weighted by
    ``weights_TK`` and summed per token: ``[T, H]`` in the accumulation dtype."""
    with record_function("autoep.combine"):
        return weighted_sum(_return_rows(expert_rows, state), weights_TK, state.local)


def _return_rows(expert_rows: torch.Tensor, state: DispatchState) -> torch.Tensor:
    """Expert outputs back on the rank that sent their rows, in its local expert-sorted order."""
    if state.groups is None or state.groups.ep_size == 1:
        return expert_rows
    rank_major = expert_rows.index_select(0, inverse_permutation(state.expert_major_order))
    return _AllToAll.apply(rank_major, state.send_splits, state.receive_splits, state.groups.ep_group, "combine")
