"""Transformers' own expert parallelism as a conformance subject (``transformers_ep``).

Driven as Transformers documents it: the model is saved with ``save_pretrained`` and loaded again
with its class's ``from_pretrained(folder, distributed_config=DistributedConfig(ep_size=EP,
fsdp_size=W))`` on every rank of the ``W`` rank processes. ``ep_size`` must divide
``fsdp_size * tp_size``; with ``fsdp_size = W`` every rank sees its own micro-batch (data
parallel), the dense weights are FSDP2-sharded over the ``W`` ranks and each EP group of ``EP``
ranks holds all experts, ``E / EP`` whole experts per rank (the ``ep_dispatch_experts`` plan:
AllToAll token dispatch). On one process (``autoep_size`` 1, world 1) ``DistributedConfig`` builds
no mesh: the cell judges Transformers' documented load path of the stock model.

Gradients. FSDP2 reduces them inside ``backward`` (reduce-scatter, mean over the data-parallel
ranks), and the experts' gradients come out of Transformers' EP already reduced for the
global-batch mean loss. So this subject reports, on every rank, each parameter's *reduced*
gradient gathered into a full tensor (``DTensor.full_tensor``), and declares
``gradients = "reduced"``: the suite then checks that every rank reports the same gradients and
takes them as they are, instead of reducing local ones itself (conformance/parallel.py).

Which cells: the families whose config class has an expert-parallel plan in the installed
Transformers (``base_model_ep_plan``), built from a Transformers config (``from_pretrained``
needs a Transformers class); plain-PyTorch EP cells in both dtypes, and on one process (where it is the
stock model, loaded again) each family's default case and the interop cells in float32. It has no
DeepSpeed path: ZeRO, checkpoint and fault cells are not its job. Its failures are findings
(``HF-n``, conformance/findings.py), each cause reproduced by tests/test_findings.py.
"""

from __future__ import annotations

import logging
import shutil
import tempfile

from torch import nn

from matrix.cells import FAMILY_DEFAULT_CASES, PLAIN_CASE_IDS, expected
from matrix.experts_cases import EXPERTS_CASES
from matrix.model_case import make_config
from matrix.models import CASES_BY_ID, DEFAULT_CASES

NO_DEEPSPEED = ("Transformers' expert parallelism runs under its own FSDP2 (DistributedConfig), not under "
                "DeepSpeed: ZeRO, checkpoint and fault cells are not its job")
# On one process DistributedConfig builds no mesh: a cell judges Transformers' load path of the stock model
# (save_pretrained, from_pretrained), once per family, in float32; variants and bf16 would judge it again.
LOAD_PATH_CASES = frozenset([case.id for case in DEFAULT_CASES] + list(FAMILY_DEFAULT_CASES) +
                            [case.id for case in EXPERTS_CASES])
ONE_PROCESS_AGAIN = ("one process: DistributedConfig builds no mesh, so this cell would judge the stock model's load path "
                     "once more; it is judged on each family's default case in float32")
PLAIN_MODULES = "a model of plain nn.Modules: from_pretrained (Transformers' EP entry point) needs a Transformers class"


def ep_plan(model_or_config) -> dict:
    """The expert-parallel plan the installed Transformers declares for a model (its text config's
    class attribute ``base_model_ep_plan``), empty when it has none."""
    config = getattr(model_or_config, "config", model_or_config)
    plans = [getattr(type(config), "base_model_ep_plan", None)]
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    plans.append(getattr(type(text), "base_model_ep_plan", None))
    return next((dict(plan) for plan in plans if plan), {})


def _shared_folder() -> str:
    """One temporary folder for every rank (``save_pretrained`` writes on rank 0 only under
    torch.distributed), or this process's own."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return tempfile.mkdtemp(prefix="conformance-transformers-ep-")
    folder = [tempfile.mkdtemp(prefix="conformance-transformers-ep-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(folder, src=0)
    return folder[0]


def full_gradients(grads: dict) -> dict:
    """Every gradient as a full tensor: a DTensor (FSDP2 shard, expert shard) gathered over its mesh
    (collective: every rank calls it with the same names in the same order)."""
    from torch.distributed.tensor import DTensor

    # Gathering an expert tensor sharded over two mesh dimensions takes two all-gathers, about which
    # torch logs a warning per tensor per rank: a performance note, not a fault of the subject.
    quiet = logging.getLogger("torch.distributed.tensor._redistribute")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return {name: (grad.full_tensor() if isinstance(grad, DTensor) else grad).detach().cpu().clone()
                for name, grad in grads.items()}
    finally:
        quiet.setLevel(level)


class TransformersEPSubject:
    """Transformers' ``DistributedConfig(ep_size=...)`` (see the module docstring)."""

    name = "transformers_ep"
    is_peer = True  # its failures are findings (conformance/findings.py, HF-n)
    optimizer_route = "client"
    gradients = "reduced"  # FSDP2 and its EP reduce inside backward (conformance/SUBJECTS.md)

    def not_applicable_reason(self, cell) -> str | None:
        if cell.case in PLAIN_CASE_IDS:
            return PLAIN_MODULES
        if cell.zero_stage != "none" or cell.resume is not None or getattr(cell, "fault", None) is not None:
            return NO_DEEPSPEED
        if (expectation := expected(cell)).outcome == "rejected":
            return (f"the cell expects autoep's refusal ({expectation.reason}); Transformers' EP is judged on the "
                    f"models it runs")
        if cell.world_size == 1 and (cell.dtype != "float32" or
                                     (cell.interop is None and cell.case not in LOAD_PATH_CASES)):
            return ONE_PROCESS_AGAIN
        if cell.world_size % cell.autoep_size:
            return f"ep_size {cell.autoep_size} must divide fsdp_size * tp_size = {cell.world_size} (DistributedConfig)"
        try:
            config = make_config(CASES_BY_ID[cell.case])
        except (ImportError, AttributeError) as error:
            return f"the installed Transformers cannot build this case's config ({type(error).__name__}: {error})"
        if not ep_plan(config):
            return (f"the installed Transformers declares no expert-parallel plan (base_model_ep_plan) for "
                    f"{type(config).__name__}")
        return None

    def unavailable_reason(self, cell=None) -> str | None:
        import dataclasses
        import importlib.util

        if importlib.util.find_spec("accelerate") is None:
            return ("from_pretrained(distributed_config=...) needs accelerate, which is not installed (pip install "
                    "\"autoep[conformance]\" installs it; nox's conformance sessions do)")
        try:
            from transformers.distributed import DistributedConfig
        except ImportError:
            return "the installed Transformers has no transformers.distributed.DistributedConfig"
        missing = {"ep_size", "fsdp_size"} - {field.name for field in dataclasses.fields(DistributedConfig)}
        if missing:
            return f"the installed Transformers' DistributedConfig has no {', '.join(sorted(missing))}"
        return None

    def apply(self, model: nn.Module, block: dict) -> nn.Module:
        """Save the stock model, load it back with ``distributed_config`` (the keys of the block
        other than ``autoep_size`` are autoep's own switches: Transformers has its own plan)."""
        import torch.distributed as dist
        from transformers.distributed import DistributedConfig

        ep = int(block.get("autoep_size", 1))
        world = dist.get_world_size() if dist.is_initialized() else 1
        if ep > 1 and not dist.is_initialized():
            raise ValueError(f"autoep_size={ep} needs torch.distributed (rank processes, autoep.launch)")
        dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        device = next(model.parameters()).device
        folder = _shared_folder()
        try:
            model.save_pretrained(folder)
            if dist.is_initialized():
                dist.barrier()
            loaded = type(model).from_pretrained(
                folder, dtype=dtype, attn_implementation=model.config._attn_implementation,
                distributed_config=DistributedConfig(ep_size=ep, fsdp_size=world))
        finally:
            if dist.is_initialized():
                dist.barrier()
            if not dist.is_initialized() or dist.get_rank() == 0:
                shutil.rmtree(folder, ignore_errors=True)
        loaded.to(device).train(model.training)  # from_pretrained returns eval mode; the cell decides
        loaded.conformance_stock_gradients = full_gradients
        return loaded

    def expert_shards(self, model: nn.Module) -> dict:
        """Empty: this subject's gradients come back full and already reduced (``gradients``)."""
        return {}

    def save_pretrained(self, model: nn.Module, output_dir: str) -> None:
        model.save_pretrained(output_dir)

