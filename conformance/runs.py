"""One run of the data-parallel objective on one process (forward and backward, micro-batch by
micro-batch) and its result: what every equivalence, interop and parallel case compares."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RunOutput:
    logits: torch.Tensor
    loss: torch.Tensor
    aux_loss: torch.Tensor | None
    grads: dict[str, torch.Tensor]
    # Per parameter, each micro-batch's gradient (float32 or wider, on the CPU): the terms ``grads``
    # is the mean of (see conformance.tolerances, cancelling means); None for one micro-batch.
    grad_terms: dict[str, list[torch.Tensor]] | None = None


def run_model(model, input_ids, reference: bool = False, micro_batches: int = 1) -> RunOutput:
    """Forward and backward of the data-parallel objective: the mean over ``micro_batches``
    equal slices of the batch of each slice's loss (for the cross-entropy this is the
    global-batch mean; the aux loss is a statistic of each micro-batch, as under any data-
    parallel engine, so ``aux_loss`` holds one value per micro-batch).

    Gradients are taken per micro-batch and averaged in float32 (or wider), then cast to the
    parameter dtype: the arithmetic of :func:`conformance.parallel.reduce_like_an_engine`,
    so a bf16 single-process baseline rounds like the multi-process subject it bounds."""
    named = list(model.model.named_parameters() if reference else model.named_parameters())
    input_ids = input_ids.to(named[0][1].device)  # results come back on the CPU, wherever the model ran
    sums: dict[str, torch.Tensor] = {}
    terms: dict[str, list[torch.Tensor]] = {}
    logits, losses, auxes = [], [], []
    for micro_ids in input_ids.chunk(micro_batches):
        model.zero_grad(set_to_none=True)
        if reference:
            micro_logits, loss, aux = model(input_ids=micro_ids, labels=micro_ids)
        else:
            out = model(input_ids=micro_ids, labels=micro_ids)
            micro_logits, loss, aux = out.logits, out.loss, getattr(out, "aux_loss", None)
        loss.backward()
        for name, param in named:
            if param.grad is not None:
                grad = param.grad.detach().to(torch.promote_types(param.grad.dtype, torch.float32))
                sums[name] = grad.clone() if name not in sums else sums[name] + grad
                if micro_batches > 1:
                    terms.setdefault(name, []).append(grad.cpu().clone())
        logits.append(micro_logits.detach())
        losses.append(loss.detach())
        auxes.append(None if aux is None else aux.detach().reshape(1))
    dtypes = {name: param.dtype for name, param in named}
    grads = {name: (total / micro_batches).to(dtypes[name]).cpu() for name, total in sums.items()}
    # A subject whose gradients are not the stock model's tensors carries the way back to them: TorchTitan
    # renames parameters; Transformers' EP holds DTensor shards (gathered to full tensors, collective).
    grad_terms = terms if micro_batches > 1 else None
    if (rename := getattr(model, "conformance_stock_gradients", None)) is not None:
        grads, grad_terms = rename(grads), None
    aux_loss = None if auxes[0] is None else torch.cat(auxes).cpu()
    return RunOutput(torch.cat(logits).cpu(), torch.stack(losses).mean().cpu(), aux_loss, grads, grad_terms)


def farther_run(runs: list[RunOutput], expected: RunOutput) -> RunOutput:
    """Per tensor, the value of whichever run lies farther from ``expected`` (relative L2): the
    baseline of a bf16 comparison when several legitimate bf16 implementations were run."""
    def pick(values: list[torch.Tensor | None], want: torch.Tensor | None) -> torch.Tensor | None:
        present = [v for v in values if v is not None]
        if want is None or not present:
            return present[0] if present else None
        return max(present, key=lambda v: float((v.double() - want.double()).norm()) if v.shape == want.shape
                   else float("inf"))

    def terms_error(terms: list[torch.Tensor], want: list[torch.Tensor]) -> float:
        return sum(float((term.double() - w.double()).norm()) for term, w in zip(terms, want))

    grads = {name: pick([run.grads.get(name) for run in runs], want) for name, want in expected.grads.items()}
    grad_terms = None
    if expected.grad_terms is not None:  # per tensor, the terms of the run farther from the expected terms
        grad_terms = {}
        for name, want in expected.grad_terms.items():
            present = [run.grad_terms[name] for run in runs if run.grad_terms is not None and name in run.grad_terms]
            if present:
                grad_terms[name] = max(present, key=lambda terms: terms_error(terms, want))
    return RunOutput(pick([r.logits for r in runs], expected.logits), pick([r.loss for r in runs], expected.loss),
                     pick([r.aux_loss for r in runs], expected.aux_loss),
                     {name: value for name, value in grads.items() if value is not None}, grad_terms)
