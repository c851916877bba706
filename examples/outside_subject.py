"""A subject defined outside the package's own (conformance/SUBJECTS.md): the worked example of
running the conformance suite on an implementation of your own.

    PYTHONPATH=. python -m conformance run --subject examples.outside_subject:PlainTorchEP --profile smoke

It stands for an implementation that parallelises a model under plain ``torch.distributed`` only
(here this package's ``autoep.apply``, to have something correct to run): it has ``apply`` and
``expert_shards`` and no DeepSpeed integration, so the suite judges it on the one-process,
plain-PyTorch expert-parallel and interop cells and records its ZeRO and checkpoint cells as not
applicable, naming ``initialize()``.
"""

from __future__ import annotations

from torch import nn


class PlainTorchEP:
    optimizer_route = "client"

    def unavailable_reason(self, cell=None) -> str | None:
        return None  # runs wherever torch does

    def apply(self, model: nn.Module, block: dict) -> nn.Module:
        """Parallelise ``model`` per the ``"expert_parallel"`` block (collective when autoep_size > 1)."""
        import autoep

        return autoep.apply(model, {"enabled": True, **block})

    def expert_shards(self, model: nn.Module) -> dict[str, tuple[int, int]]:
        """Every parameter sharded by expert: (first global expert held here, experts of the layer)."""
        import autoep

        shards = {}
        for block_name, unit in autoep.replaced_layers(model):
            for name, _ in unit.expert_named_parameters():
                shards[f"{block_name}.{unit.spec.experts_attr}.{name}"] = (unit.local_expert_ids[0], unit.num_experts)
        return shards
