"""Subject adapters: how a conformance cell builds the implementation under test.

The suite never imports an implementation directly; it asks a subject to turn the
original model into its expert-parallel version. ``autoep`` is ours; ``deepspeed``
(DeepSpeed's built-in AutoEP) joins when cells run under ``deepspeed.initialize``.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

import autoep
from autoep.presets import PRESETS
from matrix.models import CASES_BY_ID


class Subject(Protocol):
    name: str
    # How its documentation says to give it an optimizer (conformance.training.OPTIMIZER_ROUTES).
    optimizer_route: str

    def unavailable_reason(self, cell=None) -> str | None:
        """None when the subject can run here (and this matrix cell), else why not."""

    def apply(self, model: nn.Module, block: dict) -> nn.Module:
        """Return the subject's replacement of ``model`` for the ``expert_parallel`` block
        (collective under torch.distributed when ``autoep_size > 1``)."""

    def expert_shards(self, model: nn.Module) -> dict[str, tuple[int, int]]:
        """For each expert parameter of the parallel model: (first global expert held here,
        number of experts in the layer). Parameters not listed are replicated."""

    def initialize(self, model: nn.Module, ds_config: dict, optimizer):
        """The subject's DeepSpeed engine for ``model`` (collective; on every rank)."""

    def full_parameters(self, engine) -> dict[str, "torch.Tensor"]:
        """Every parameter of the engine's model as this rank holds it, unpartitioned by ZeRO
        (expert tensors stay this rank's slice; see ``expert_shards``)."""

    def to_universal(self, input_folder: str, output_folder: str) -> None:
        """Convert a checkpoint tag folder saved by the subject's engine into a Universal
        Checkpoint tag folder (in this process, no job running)."""


class AutoEPSubject:
    name = "autoep"
    is_peer = False  # ours (and the mutants built on it): its failures fail the suite
    optimizer_route = "client"  # README: any client optimizer over model.parameters()

    def unavailable_reason(self, cell=None) -> str | None:
        return None

    def apply(self, model: nn.Module, block: dict) -> nn.Module:
        return autoep.apply(model, {"enabled": True, **block})

    def initialize(self, model: nn.Module, ds_config: dict, optimizer):
        engine, *_ = autoep.initialize(model=model, optimizer=optimizer, config=ds_config)
        return engine

    def full_parameters(self, engine) -> dict:
        return gathered_parameters(engine)

    def to_universal(self, input_folder: str, output_folder: str) -> None:
        autoep.to_universal(input_folder, output_folder)

    def save_pretrained(self, model: nn.Module, output_dir: str) -> None:
        """The documented Hugging Face export (README): every expert gathered, stock names."""
        autoep.save_pretrained(model, output_dir)

    def expert_shards(self, model: nn.Module) -> dict[str, tuple[int, int]]:
        shards = {}
        for layer_name, layer in autoep.replaced_layers(model):
            experts_name = f"{layer_name}.{layer.spec.experts_attr}"
            for param_name, _ in layer.expert_named_parameters():
                shards[f"{experts_name}.{param_name}"] = (layer.local_expert_ids[0], layer.num_experts)
        return shards


def gathered_parameters(engine) -> dict:
    """Parameters in float32 as full tensors (ZeRO-3 partitions gathered over their group).
    Under bf16 these are the optimizer's fp32 master weights, not the bf16 copies (whose
    rounding, ~0.4% of a weight, would hide the updates being compared)."""
    import deepspeed

    params = dict(engine.module.named_parameters())
    if engine.bfloat16_enabled():
        from deepspeed.utils import safe_get_full_fp32_param

        masters = {}
        for name, param in params.items():  # collective under ZeRO-3: every rank, same order
            master = safe_get_full_fp32_param(param)
            # ZeRO stage 0 keeps no master copy: the optimizer steps the bf16 weights themselves.
            masters[name] = (param if master is None else master).detach().float().cpu().clone()
        return masters
    if engine.zero_optimization_partition_weights():
        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {name: p.detach().float().clone() for name, p in params.items()}
    return {name: p.detach().float().clone() for name, p in params.items()}


class PlainDeepSpeedSubject:
    """The original model under plain ``deepspeed.initialize`` (no expert parallelism): the
    baseline that measures what DeepSpeed's own bf16 training departs from the fp32 reference."""

    name = "conformance.subjects:PLAIN_DEEPSPEED"
    optimizer_route = "client"

    def unavailable_reason(self, cell=None) -> str | None:
        return None

    def initialize(self, model: nn.Module, ds_config: dict, optimizer):
        import deepspeed

        config = {key: value for key, value in ds_config.items() if key != "expert_parallel"}
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        return engine

    def full_parameters(self, engine) -> dict:
        return gathered_parameters(engine)

    def expert_shards(self, model: nn.Module) -> dict:
        return {}


PLAIN_DEEPSPEED = PlainDeepSpeedSubject()


class DeepSpeedBuiltinSubject:
    """DeepSpeed's own AutoEP, driven through ``deepspeed.initialize`` with the same
    ``"expert_parallel"`` block: a peer whose results are findings, not our exit status.

    Its layer renames parameters (``router.gate.weight``; experts split into ``w1`` gate,
    ``w3`` up, ``w2`` down; ``shared_experts``, ``shared_experts_gate``); they are mapped back
    to the Transformers names (gate and up stacked into ``gate_up_proj``) for comparison.

    Its optimizer comes from the config's ``"optimizer"`` block, as DeepSpeed documents for MoE
    models: the engine then builds the MoE parameter groups itself. A plain client optimizer
    built before ``initialize`` keeps one non-MoE group, which DeepSpeed's ZeRO-1/2 refuse
    (finding DS-0, a documented rejection; conformance/findings.py)."""

    name = "deepspeed"
    is_peer = True  # its failures are findings (conformance/findings.py)
    optimizer_route = "config"

    def not_applicable_reason(self, cell) -> str | None:
        """The families DeepSpeed's AutoEP claims are its presets (mixtral, qwen3_moe, qwen3_5_moe,
        deepseek_v2, deepseek_v3, minimax_m3): every other family of the table is not its job."""
        case = CASES_BY_ID[cell.case]
        if case.ep_block.get("replacement") == "experts":
            return ("an experts-level cell (expert_parallel.replacement='experts'): DeepSpeed's AutoEP replaces whole "
                    "blocks of its presets only")
        family = PRESETS.get(case.preset)
        if family is None or not family.deepspeed_preset:
            return f"DeepSpeed's AutoEP has no preset for the {case.preset} family"
        return None

    def unavailable_reason(self, cell=None) -> str | None:
        try:
            from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer  # noqa: F401
        except ImportError:
            return "the installed DeepSpeed has no built-in AutoEP"
        if cell is not None and cell.zero_stage == "none":
            return "DeepSpeed's AutoEP runs only inside deepspeed.initialize: ZeRO cells only"
        if cell is not None and cell.dtype != "float32":
            return "the deepspeed subject runs the float32 cells"
        return None

    def initialize(self, model: nn.Module, ds_config: dict, optimizer):
        import deepspeed

        # Where the blocks and their submodules are, for the name mapping (kept on the model).
        model.conformance_specs = autoep.inspect(model)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        return engine

    def to_universal(self, input_folder: str, output_folder: str) -> None:
        """DeepSpeed's own converter, ``ds_to_universal``, as its command line runs it."""
        import argparse

        from deepspeed.checkpoint.ds_to_universal import main

        main(argparse.Namespace(input_folder=input_folder, output_folder=output_folder, num_extract_workers=1,
                                num_merge_workers=1, keep_temp_folder=False, strict=True,
                                inject_missing_state=False))

    @staticmethod
    def _layers(model: nn.Module):
        from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

        return [(name, module) for name, module in model.named_modules() if isinstance(module, AutoEPMoELayer)]

    def full_parameters(self, engine) -> dict:
        import torch

        params = gathered_parameters(engine)
        renamed = {}
        for spec in engine.module.conformance_specs:
            prefix = spec.name + "."
            local = {name[len(prefix):]: params.pop(name) for name in list(params) if name.startswith(prefix)}
            experts = f"{prefix}{spec.experts_attr}."
            renamed[f"{prefix}{spec.router_attr}.weight"] = local.pop("router.gate.weight")
            local.pop("router.e_score_correction_bias", None)  # a buffer in Transformers
            renamed[experts + spec.gate_up_name] = torch.cat([local.pop("experts.w1"), local.pop("experts.w3")], 1)
            renamed[experts + spec.down_name] = local.pop("experts.w2")
            for name, value in local.items():
                name = name.replace("shared_experts_gate.", f"{spec.shared_gate_attr}.", 1) \
                    if name.startswith("shared_experts_gate.") else name
                name = name.replace("shared_experts.", f"{spec.shared_attr}.", 1) \
                    if name.startswith("shared_experts.") else name
                renamed[prefix + name] = value
        renamed.update(params)
        return renamed

    def expert_shards(self, model: nn.Module) -> dict:
        shards = {}
        for name, layer in self._layers(model):
            spec = next((s for s in getattr(model, "conformance_specs", []) if s.name == name), None)
            first = layer.ep_rank * layer.num_local_experts
            gate_up, down = (spec.gate_up_name, spec.down_name) if spec else ("gate_up_proj", "down_proj")
            experts = spec.experts_attr if spec else "experts"
            for param in (gate_up, down):
                shards[f"{name}.{experts}.{param}"] = (first, layer.num_experts)
        return shards

# TorchTitan's MoE replacement (conformance/titan.py) is registered always and imports torchtitan
# only when used; where it is not installed its unavailable_reason says to run `nox -s titan`.
from conformance.titan import TorchTitanSubject  # noqa: E402
from conformance.transformers_ep import TransformersEPSubject  # noqa: E402

SUBJECTS: dict[str, Subject] = {"autoep": AutoEPSubject(), "deepspeed": DeepSpeedBuiltinSubject(),
                                "torchtitan": TorchTitanSubject(), "transformers_ep": TransformersEPSubject()}


def unknown_subject_message(name: str, why: str = "") -> str:
    """One line for ``--subject NAME`` that names no subject."""
    return (f"conformance: unknown subject {name!r}{': ' + why if why else ''}; registered here: "
            f"{', '.join(sorted(SUBJECTS))}, or 'package.module:attribute' naming a subject object (the Subject "
            "protocol: conformance/SUBJECTS.md)")


class UnknownSubject(LookupError):
    """``--subject`` names neither a registered subject nor an importable ``module:attribute``."""


def subject_by_name(name: str) -> Subject:
    """A registered subject, or ``"module:attribute"`` naming a subject object defined anywhere
    importable: your own implementation under test (conformance/SUBJECTS.md), or a deliberately
    broken one of the mutant bank. Rank processes find a subject by the same name."""
    if name in SUBJECTS:
        return SUBJECTS[name]
    if ":" in name:
        import importlib

        module, _, attribute = name.partition(":")
        try:
            target = importlib.import_module(module)
            for part in attribute.split("."):
                target = getattr(target, part)
        except (ImportError, AttributeError) as error:
            raise UnknownSubject(unknown_subject_message(name, f"{type(error).__name__}: {error}")) from None
        if isinstance(target, type):  # a class: its instance (the protocol's methods are instance methods)
            target = target()
        if not isinstance(getattr(target, "name", None), str):
            target.name = name  # how rank processes find it again
        return target
    raise UnknownSubject(unknown_subject_message(name))


# The methods the Subject protocol names, and the cells that call each (conformance/SUBJECTS.md).
PROTOCOL = {
    "apply": "one-process, plain-PyTorch expert-parallel, interop and rejection cells",
    "expert_shards": "plain-PyTorch expert-parallel cells and ZeRO cells (which experts a rank holds)",
    "initialize": "ZeRO cells (DeepSpeed engines), checkpoint cells and fault cells",
    "full_parameters": "ZeRO cells and checkpoint cells (parameters after the steps)",
    "to_universal": "checkpoint cells (Universal conversion, resume on another topology)",
    "unavailable_reason": "every cell (None: the subject can run here)",
}


def methods_for(cell) -> tuple[str, ...]:
    """The protocol methods a cell calls on its subject."""
    if cell.interop is not None:
        return ("apply",)
    if getattr(cell, "fault", None) is not None:
        return ("initialize",)
    if cell.resume is not None:
        return ("initialize", "full_parameters", "expert_shards", "to_universal")
    if cell.zero_stage != "none":
        return ("initialize", "full_parameters", "expert_shards")
    return ("apply",) if cell.world_size == 1 else ("apply", "expert_shards")


def missing_method_reason(subject, cell) -> str | None:
    """Why a cell is not applicable to a subject that lacks a method it calls (never a crash)."""
    missing = [name for name in methods_for(cell) if not callable(getattr(subject, name, None))]
    if not missing:
        return None
    return (f"the subject has no {', '.join(f'{name}()' for name in missing)}, which this cell calls "
            f"({PROTOCOL[missing[0]]}; conformance/SUBJECTS.md)")
