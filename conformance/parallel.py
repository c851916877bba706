"""Multi-process equivalence: the subject runs on W rank processes (one micro-batch each),
and its results are brought back and reduced the way a data-parallel engine reduces them.

Reduction (DESIGN section 5), done here from each rank's *local* gradients, so that it is
the suite's arithmetic and not the subject's:

- non-expert parameters (replicated): the mean over all W ranks;
- expert parameters: rank r holds experts ``[first, first + n)``; a global expert's
  gradient is the sum over the ranks that hold it (its EDP group) divided by W. Each
  holder's local gradient already carries the tokens its EP peers sent it.

With each rank's loss the mean over its micro-batch and equal micro-batches, the result is
the gradient of the global-batch mean loss, whatever ``autoep_size`` is.
"""

from __future__ import annotations


import torch

import torch.distributed as dist

from autoep import launch
from conformance.ranks import process_groups_released, rank_device
from conformance.runs import RunOutput, run_model
from conformance.subjects import subject_by_name
from matrix.models import CASES_BY_ID, ModelCase
import autoep


def subject_step_on_rank(case_id: str, subject_name: str, dtype_name: str, seed: int, block: dict,
                         input_ids: torch.Tensor) -> dict:
    """Rank side: build the case's model, let the subject parallelise it, run this rank's
    micro-batch forward and backward; return the local outputs, gradients and expert shards."""
    subject = subject_by_name(subject_name)
    model = CASES_BY_ID[case_id].build(seed=seed, dtype=getattr(torch, dtype_name)).to(rank_device())
    with process_groups_released():
        model = subject.apply(model, block)
        micro_ids = input_ids.chunk(dist.get_world_size())[dist.get_rank()]
        run = run_model(model, micro_ids)
        return {"run": run, "expert_shards": subject.expert_shards(model)}


def gradient_sums(grads_per_rank: list[dict], shards_per_rank: list[dict]) -> dict[str, torch.Tensor]:
    """Each parameter's gradient summed over every rank that holds it, as a full tensor:
    replicated parameters over all ranks, expert slices into their place among all E experts
    (summed over the EDP group holding them). Accumulates in >= float32."""
    names = grads_per_rank[0].keys()
    for grads in grads_per_rank:
        if grads.keys() != names:
            raise AssertionError(f"ranks disagree on which parameters have gradients: "
                                 f"{sorted(grads.keys() ^ names)[:4]}")
    sums = {}
    for name in names:
        local = [grads[name] for grads in grads_per_rank]
        if any(grad is None for grad in local):
            raise AssertionError(f"{name}: no gradient on rank(s) {[r for r, g in enumerate(local) if g is None]}")
        accumulate = torch.promote_types(local[0].dtype, torch.float32)
        shards = [shards.get(name) for shards in shards_per_rank]
        if shards[0] is None:
            sums[name] = torch.stack([grad.to(accumulate) for grad in local]).sum(dim=0)
            continue
        num_experts = shards[0][1]
        total = torch.zeros((num_experts,) + tuple(local[0].shape[1:]), dtype=accumulate)
        holders = torch.zeros(num_experts, dtype=torch.int64)
        for grad, (first, _) in zip(local, shards):
            total[first:first + grad.shape[0]] += grad.to(accumulate)
            holders[first:first + grad.shape[0]] += 1
        if not bool((holders == holders[0]).all()):  # every expert held by an EDP group of equal size
            raise AssertionError(f"{name}: experts are not held by equal EDP groups ({holders.tolist()})")
        sums[name] = total
    return sums


def reduced_gradients_agree(grads_per_rank: list[dict]) -> dict[str, torch.Tensor]:
    """For a subject that reduces its gradients itself (``gradients = "reduced"``: every rank
    reports each parameter's reduced gradient as a full tensor, conformance/SUBJECTS.md): every
    rank's must be the same tensors, bit for bit (one gathered result); rank 0's are returned."""
    first = grads_per_rank[0]
    for rank, grads in enumerate(grads_per_rank[1:], start=1):
        if grads.keys() != first.keys():
            raise AssertionError(f"rank {rank} reports gradients of other parameters than rank 0: "
                                 f"{sorted(grads.keys() ^ first.keys())[:4]}")
        for name, grad in grads.items():
            if (grad is None) != (first[name] is None) or (grad is not None and not torch.equal(grad, first[name])):
                raise AssertionError(f"{name}: rank {rank}'s reduced gradient differs from rank 0's")
    return first


def reduce_like_an_engine(rank_outputs: list[dict], subject=None) -> dict[str, torch.Tensor]:
    """Full gradients of the global-batch mean loss from every rank's local ones: the
    gradient sums over holders divided by W (see the module docstring). A subject whose ranks
    report reduced gradients (``gradients = "reduced"``) is taken at its word once its ranks agree."""
    if getattr(subject, "gradients", "local") == "reduced":
        return reduced_gradients_agree([output["run"].grads for output in rank_outputs])
    world = len(rank_outputs)
    sums = gradient_sums([output["run"].grads for output in rank_outputs],
                         [output["expert_shards"] for output in rank_outputs])
    dtypes = {name: grad.dtype for name, grad in rank_outputs[0]["run"].grads.items()}  # the parameters' dtypes
    return {name: (total / world).to(dtypes[name]) for name, total in sums.items()}


def run_subject_on_ranks(case: ModelCase, subject, dtype: torch.dtype, seed: int, block: dict,
                         input_ids: torch.Tensor, world_size: int, autoep_size: int, device: str = "cpu"):
    """The subject's run of the data-parallel objective, as one RunOutput (logits gathered,
    loss = mean of rank losses, aux loss per micro-batch, gradients reduced). ``device="cuda"``:
    one GPU per rank, NCCL (autoep.launch.backend_for)."""
    outputs = launch.run(world_size, subject_step_on_rank, case.id, subject.name,
                         str(dtype).replace("torch.", ""), seed, {**block, "autoep_size": autoep_size}, input_ids,
                         device=device)
    runs = [output["run"] for output in outputs]
    aux = None if runs[0].aux_loss is None else torch.cat([run.aux_loss for run in runs])
    return RunOutput(torch.cat([run.logits for run in runs]), torch.stack([run.loss for run in runs]).mean(), aux,
                     reduce_like_an_engine(outputs, subject))


class WireMeter:
    """Counts what every ``torch.distributed.all_to_all_single`` call on this rank moves,
    by wrapping the function itself (below any code of the subject)."""

    def __init__(self):
        self.calls: list[dict] = []
        self._original = None

    def __enter__(self) -> "WireMeter":
        import torch.distributed as dist

        self._original = original = dist.all_to_all_single

        def counting(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
            self.calls.append({"sent": input.numel(), "received": output.numel(), "dtype": str(input.dtype),
                               "send_splits": None if input_split_sizes is None else list(input_split_sizes)})
            return original(output, input, output_split_sizes, input_split_sizes, group, async_op)

        dist.all_to_all_single = counting
        return self

    def __exit__(self, *exc) -> None:
        import torch.distributed as dist

        dist.all_to_all_single = self._original


def block_step_on_rank(case_id: str, subject_name: str, block_name: str, dtype_name: str, seed: int,
                       autoep_size: int, router_weight: torch.Tensor | None, hidden_TH: torch.Tensor,
                       upstream_TH: torch.Tensor) -> dict:
    """Rank side of a block-level case: one MoE block of the case's model, parallelised by the
    subject, on this rank's own tokens (any count, zero included) with the objective
    ``sum(output * upstream)``. Returns the output, the input gradient, the block's local
    parameter gradients (names relative to the block), its expert shards and the wire log."""
    subject = subject_by_name(subject_name)
    model = CASES_BY_ID[case_id].build(seed=seed, dtype=getattr(torch, dtype_name))
    if router_weight is not None:
        set_router_weight(model, block_name, router_weight)
    with process_groups_released():
        model = subject.apply(model, CASES_BY_ID[case_id].block(autoep_size=autoep_size))
        block = model.get_submodule(block_name)
        block.zero_grad(set_to_none=True)
        x_TH = hidden_TH.clone().requires_grad_(True)
        with WireMeter() as meter:
            out_TH = block(x_TH.unsqueeze(0)).squeeze(0)
            (out_TH.to(torch.float64) * upstream_TH.to(torch.float64)).sum().backward()
        prefix = block_name + "."
        shards = {name[len(prefix):]: shard for name, shard in subject.expert_shards(model).items()
                  if name.startswith(prefix)}
        grads = {name: (None if p.grad is None else p.grad.detach().clone()) for name, p in block.named_parameters()}
        return {"output": out_TH.detach(), "input_grad": x_TH.grad.detach(), "grads": grads, "expert_shards": shards,
                "wire": meter.calls}


def set_router_weight(model: torch.nn.Module, block_name: str, weight_EH: torch.Tensor) -> None:
    """Overwrite the router weight of one block of an original model (to force a routing)."""
    spec = next(spec for spec in autoep.inspect(model) if spec.name == block_name)
    with torch.no_grad():
        getattr(model.get_submodule(block_name), spec.router_attr).weight.copy_(weight_EH)


def block_on_ranks(case: ModelCase, subject, block_name: str, autoep_size: int, hidden_per_rank: list,
                   upstream_per_rank: list, router_weight: torch.Tensor | None = None,
                   dtype: torch.dtype = torch.float32, seed: int = 0) -> list[dict]:
    """Run :func:`block_step_on_rank` on ``len(hidden_per_rank)`` ranks, each on its own tokens."""
    dtype_name = str(dtype).replace("torch.", "")
    calls = [((case.id, subject.name, block_name, dtype_name, seed, autoep_size, router_weight, hidden, upstream),
              {}) for hidden, upstream in zip(hidden_per_rank, upstream_per_rank)]
    return launch.shared_pool(len(calls)).run_per_rank(block_step_on_rank, calls)
