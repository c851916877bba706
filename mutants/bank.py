"""The mutants: each the ``autoep`` subject with one planted bug, its source, and the matrix
cells where that bug is active.

A mutant's name is ``mutants.bank:<id>`` (``conformance.subjects.subject_by_name`` resolves it
through this module's ``__getattr__``), which is how rank processes find it. Bugs are planted
on the instances a subject hands out: a router's or experts module's ``forward`` replaced on
that module, a router's ``RoutingSpec`` replaced on that router, gradient hooks on that
model's parameters, methods of that engine object, files written by that conversion. The one
module-level function a mutant swaps (``autoep.checkpoint.write_experts``) is restored in a
``finally`` of the engine call that needs it: rank processes are shared between cells.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os

import torch
import torch.nn.functional as F

import autoep
from autoep.presets import PRESETS
from matrix.models import CASES_BY_ID, make_config
from conformance.subjects import AutoEPSubject

# ---------------------------------------------------------------------------------------------
# Where a bug can be active: predicates over matrix.cells.Cell.


def experts_level(cell) -> bool:
    """A cell whose subject replaces only the experts modules (the model's own router runs): the
    bugs planted on AutoEP's router or on its whole-block experts have nothing to act on there."""
    return bool(CASES_BY_ID[cell.case].ep_block.get("replacement") == "experts")


@functools.lru_cache(maxsize=None)
def experts_specs(case_id: str) -> tuple:
    """The experts-level specs (autoep.experts_level.ExpertsSpec) of a case's model."""
    case = CASES_BY_ID[case_id]
    return tuple(autoep.inspect(case.build(), case.block()))


@functools.lru_cache(maxsize=None)
def _case_routing(case_id: str):
    """The RoutingSpec a case's family row builds from its config (expert count, top-k, scale ...)."""
    case = CASES_BY_ID[case_id]
    family = PRESETS[case.preset]
    config = make_config(case)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    num_experts = next(getattr(config, f) for f in family.num_experts_fields if getattr(config, f, None) is not None)
    return family.routing(config, num_experts, getattr(config, family.top_k_field))


def _top_k(cell) -> int:
    return _case_routing(cell.case).top_k


def _num_experts(cell) -> int:
    return _case_routing(cell.case).num_experts


def _renormalize_from_config(cell) -> bool:
    """The family decides renormalisation by a config flag (norm_topk_prob)."""
    return isinstance(PRESETS[CASES_BY_ID[cell.case].preset].routing.renormalize, str)


def equivalence_cell(cell) -> bool:
    """A forward/backward or training cell (not a checkpoint, interop or fault cell)."""
    return cell.resume is None and cell.interop is None and cell.fault is None


def block_equivalence_cell(cell) -> bool:
    """An equivalence cell whose subject replaces whole blocks (AutoEP's router and experts run)."""
    return equivalence_cell(cell) and not experts_level(cell)


def checkpoint_cell(cell) -> bool:
    return cell.resume is not None


def fault_cell(cell) -> bool:
    return cell.fault is not None


# ---------------------------------------------------------------------------------------------
# Planting helpers (per instance).


def _wrap_forward(module: torch.nn.Module, wrapper) -> None:
    """``module.forward`` becomes ``wrapper(module, original_forward, *args)`` on this instance."""
    module.forward = functools.partial(wrapper, module, module.forward)


def _routers(model):
    return [layer.router_module() for _, layer in autoep.replaced_layers(model)]


def _change_routing(model, **changes) -> None:
    for router in _routers(model):
        router.autoep_routing = dataclasses.replace(router.autoep_routing, **changes)


class Mutant(AutoEPSubject):
    """The autoep subject with one bug. ``plant_model`` runs on the model the subject returns
    (from ``apply``, and from ``initialize`` unless ``model_bug_in_engine`` is False);
    ``plant_engine`` on the engine from ``initialize``."""

    id = ""
    description = ""
    source = ""
    model_bug_in_engine = True

    @property
    def name(self) -> str:
        return f"mutants.bank:{self.id}"

    def active(self, cell) -> bool:
        raise NotImplementedError

    def plant_model(self, model) -> None:
        pass

    def plant_engine(self, engine) -> None:
        pass

    def apply(self, model, block):
        model = super().apply(model, block)
        self.plant_model(model)
        return model

    def initialize(self, model, ds_config, optimizer):
        engine = super().initialize(model, ds_config, optimizer)
        if self.model_bug_in_engine:
            self.plant_model(engine.module)
        self.plant_engine(engine)
        return engine


# ---------------------------------------------------------------------------------------------
# Gradient and reduction bugs.


class ExpertGradScaledByEP(Mutant):
    id = "expert_grad_scaled_by_ep"
    description = "expert gradients multiplied by autoep_size before the optimizer step"
    source = "DeepSpeed #5618"

    def active(self, cell):
        return equivalence_cell(cell) and cell.autoep_size > 1

    def plant_model(self, model):
        for _, layer in autoep.replaced_layers(model):
            if layer.ep_groups is None:
                continue
            for _, param in layer.expert_named_parameters():
                param.register_hook(lambda grad, size=layer.ep_groups.ep_size: grad * size)


class EDPNotReduced(Mutant):
    id = "edp_not_reduced"
    description = "expert gradients not all-reduced over the expert-data-parallel group (ZeRO-0 engine path)"
    source = "NeMo #1260 class"

    def active(self, cell):
        return (equivalence_cell(cell) and cell.zero_stage == 0 and cell.world_size // cell.autoep_size > 1
                and cell.autoep_size > 1 and cell.dtype == "float32")

    def plant_engine(self, engine):
        original = engine._get_gradients_for_reduction

        def without_expert_reduction():
            dense, experts = original()
            return dense, {name: [] for name in experts}  # the EDP all-reduce is skipped

        engine._get_gradients_for_reduction = without_expert_reduction


class RouterReplicasDrift(Mutant):
    id = "router_replicas_drift"
    description = "router gradients not all-reduced: each rank steps its replicated router with its own gradient"
    source = "TorchTitan #2387/#2416"

    def active(self, cell):
        return block_equivalence_cell(cell) and cell.zero_stage == 0 and cell.world_size > 1 and cell.dtype == "float32"

    def plant_engine(self, engine):
        original = engine._get_gradients_for_reduction
        routers = [router.weight for router in _routers(engine.module)]

        def without_router_reduction():
            dense, experts = original()
            skipped = {weight.grad.data_ptr() for weight in routers if weight.grad is not None}
            return [grad for grad in dense if grad.data_ptr() not in skipped], experts

        engine._get_gradients_for_reduction = without_router_reduction


class ClipNormMeanOfLocalNorms(Mutant):
    id = "clip_norm_mean_of_local_norms"
    description = ("ZeRO-0 fp32 clipping by the mean over ranks of each rank's local gradient norm (each rank "
                   "holds only its own experts: the norm is too small), not the global norm")
    source = "DeepSpeed runtime/utils.py clip_grad_norm_ (finding DS-6)"

    def active(self, cell):
        # Where ranks hold different experts: with autoep_size 1 every rank's gradient is the full one.
        return (equivalence_cell(cell) and cell.zero_stage == 0 and cell.autoep_size > 1
                and cell.dtype == "float32")

    def plant_engine(self, engine):
        from deepspeed.runtime.utils import clip_grad_norm_

        def clip_fp32_gradients():  # AutoEPEngine's, with DeepSpeed's norm in place of clip_by_global_norm's
            norm = clip_grad_norm_(parameters=engine.module.parameters(), max_norm=engine.gradient_clipping(),
                                   mpu=engine.mpu)
            engine._global_grad_norm = float(norm)

        engine.clip_fp32_gradients = clip_fp32_gradients


class LowPrecisionClipIgnoresExperts(Mutant):
    id = "low_precision_clip_ignores_experts"
    description = ("ZeRO-0 bf16 clipping by the norm of the non-expert gradients only (DeepSpeed's "
                   "FP16_UnfusedOptimizer drops the expert part): every step clipped too little under EP")
    source = "DeepSpeed runtime/fp16/unfused_optimizer.py step (found by this suite's clipping-norm check)"

    def active(self, cell):
        return equivalence_cell(cell) and cell.zero_stage == 0 and cell.autoep_size > 1 and cell.dtype == "bfloat16"

    def plant_engine(self, engine):
        # AutoEPEngine gives the optimizer instance a global-norm unscale_and_clip_grads; without it
        # the class's method clips with the norm DeepSpeed computed (experts left out).
        engine.optimizer.__dict__.pop("unscale_and_clip_grads", None)


class MissingGradContributions(Mutant):
    id = "missing_grad_contributions"
    description = "routed experts' input detached: the MoE path adds nothing to the hidden-state gradient"
    source = "Transformers #48205"

    def active(self, cell):
        return block_equivalence_cell(cell)

    def plant_model(self, model):
        for _, layer in autoep.replaced_layers(model):
            _wrap_forward(layer.routed_experts(), lambda module, forward, rows, counts: forward(rows.detach(), counts))


class RouterGradWrongLossRight(Mutant):
    id = "router_grad_wrong_loss_right"
    description = ("routing weights' gradient delivered to the wrong top-k slot (forward values exact, so the "
                   "loss is right)")
    source = "Transformers #48687"

    def active(self, cell):
        return block_equivalence_cell(cell) and _top_k(cell) > 1

    @staticmethod
    def _forward(router, forward, hidden):
        recorded, weights, expert_ids = forward(hidden)
        rolled = weights.roll(1, dims=-1)  # slot k's gradient goes to slot k-1's weight
        return recorded, weights.detach() + (rolled - rolled.detach()), expert_ids

    def plant_model(self, model):
        for router in _routers(model):
            _wrap_forward(router, self._forward)


# ---------------------------------------------------------------------------------------------
# Routing bugs.


class CorrectionBiasDropped(Mutant):
    id = "correction_bias_dropped"
    description = "e_score_correction_bias dropped on replacement: experts chosen on the raw scores"
    source = "DeepSpeed #8358"

    def active(self, cell):
        return block_equivalence_cell(cell) and cell.case.startswith("deepseek_v3")

    def plant_model(self, model):
        _change_routing(model, use_correction_bias=False)


GROUP_LIMITED_CASES = ("deepseek_v2-group_limited", "deepseek_v3-grouped-scaled")


class GroupLimitedAsGreedy(Mutant):
    id = "group_limited_as_greedy"
    description = "group-limited top-k run as plain greedy top-k over all experts"
    source = "classic EP mistake (DeepSeek topk_method / n_group, topk_group ignored)"

    def active(self, cell):
        return block_equivalence_cell(cell) and cell.case in GROUP_LIMITED_CASES

    def plant_model(self, model):
        _change_routing(model, num_groups=None, topk_groups=None, group_score=None)


class RoutedScalingNotApplied(Mutant):
    id = "routed_scaling_not_applied"
    description = "routed_scaling_factor not applied to the routing weights"
    source = "classic EP mistake (DeepSeek routed_scaling_factor)"

    def active(self, cell):
        return block_equivalence_cell(cell) and _case_routing(cell.case).scale != 1.0

    def plant_model(self, model):
        _change_routing(model, scale=1.0)


class NormTopkPolarity(Mutant):
    id = "norm_topk_prob_polarity"
    description = "norm_topk_prob read with the wrong polarity (renormalises when false, not when true)"
    source = "classic EP mistake (Qwen/DeepSeek norm_topk_prob)"

    def active(self, cell):
        return block_equivalence_cell(cell) and _renormalize_from_config(cell)

    def plant_model(self, model):
        for router in _routers(model):
            router.autoep_routing = dataclasses.replace(router.autoep_routing,
                                                        renormalize=not router.autoep_routing.renormalize)


class RouterLogitsSlotSwapped(Mutant):
    id = "router_logits_slot_swapped"
    description = "the router_logits slot holds the other quantity (probabilities for logits or back)"
    source = "Transformers #45120/#45131 class (router_logits held probabilities)"

    def active(self, cell):
        return block_equivalence_cell(cell) and CASES_BY_ID[cell.case].has_aux_loss

    def plant_model(self, model):
        for router in _routers(model):
            other = "probabilities" if router.autoep_routing.recorded_output == "logits" else "logits"
            router.autoep_routing = dataclasses.replace(router.autoep_routing, recorded_output=other)


class CapacityTokenDrop(Mutant):
    id = "capacity_token_drop"
    description = "assignments beyond a capacity of ceil(T*K/E) per expert dropped, in a library that promises dropless"
    source = "classic EP mistake (GShard/Switch capacity factor 1.0 left on)"
    capacity_factor = 1.0

    def active(self, cell):
        return block_equivalence_cell(cell) and _top_k(cell) < _num_experts(cell)

    @classmethod
    def _forward(cls, router, forward, hidden):
        recorded, weights, expert_ids = forward(hidden)
        num_tokens, top_k = expert_ids.shape
        num_experts = recorded.shape[-1]
        capacity = math.ceil(cls.capacity_factor * num_tokens * top_k / num_experts)
        flat = expert_ids.reshape(-1)  # token-major: earlier tokens are served first
        position = (F.one_hot(flat, num_experts).cumsum(0) - 1).gather(1, flat[:, None]).view_as(expert_ids)
        return recorded, weights * (position < capacity).to(weights.dtype), expert_ids

    def plant_model(self, model):
        for router in _routers(model):
            _wrap_forward(router, self._forward)


class RouterWrongAfterZero3Partitioning(Mutant):
    id = "router_wrong_after_zero3_partitioning"
    description = ("at ZeRO-3, from the 2nd forward on (trace-driven release), the router reads its released "
                   "weight: only this rank's partition, zeros elsewhere")
    source = "DeepSpeed PR #8379 class (router weight released under ZeRO-3)"

    def active(self, cell):
        return block_equivalence_cell(cell) and cell.zero_stage == 3 and cell.dtype == "float32"

    def plant_model(self, model):
        pass  # planted on the engine: only ZeRO-3 partitions

    @staticmethod
    def _forward(router, forward, hidden):
        import torch.distributed as dist

        from autoep.routing import route

        router.mutant_calls = getattr(router, "mutant_calls", 0) + 1
        weight = router.weight
        if router.mutant_calls > 1:
            numel, rank, world = weight.numel(), dist.get_rank(), dist.get_world_size()
            chunk = math.ceil(numel / world)
            mask = torch.zeros(numel, dtype=weight.dtype, device=weight.device)
            mask[rank * chunk:(rank + 1) * chunk] = 1
            weight = weight * mask.view_as(weight)
        spec = router.autoep_routing
        bias = router.e_score_correction_bias if spec.use_correction_bias else None
        return route(spec, hidden.reshape(-1, weight.shape[1]), weight, bias)

    def plant_engine(self, engine):
        if engine.zero_optimization_stage() == 3:
            for router in _routers(engine.module):
                _wrap_forward(router, self._forward)


# ---------------------------------------------------------------------------------------------
# Dispatch and expert-layout bugs.


class PaddingRowsLeak(Mutant):
    id = "padding_rows_leak"
    description = ("each expert's rows padded to a multiple of 8 for the grouped GEMM; the first R output rows "
                   "taken, so padding rows' outputs leak into the tokens'")
    source = "classic EP mistake (alignment padding not stripped)"
    align = 8

    @classmethod
    def _forward(cls, experts, forward, rows, counts):
        pieces, start = [], 0
        for count in counts.tolist():
            pieces.append(rows[start:start + count])
            pieces.append(rows.new_zeros((-count) % cls.align, rows.shape[1]))
            start += count
        padded_counts = counts + (-counts) % cls.align
        return forward(torch.cat(pieces), padded_counts)[:rows.shape[0]]

    def active(self, cell):
        return block_equivalence_cell(cell)

    def plant_model(self, model):
        for _, layer in autoep.replaced_layers(model):
            _wrap_forward(layer.routed_experts(), self._forward)


class ExpertsWrongOrderOnRank(Mutant):
    id = "experts_wrong_order_on_rank"
    description = "the last EP rank holds its slice of experts in reverse order"
    source = "classic EP mistake (local expert slice permuted)"
    model_bug_in_engine = False

    def active(self, cell):
        if not (equivalence_cell(cell) and cell.zero_stage == "none" and cell.autoep_size > 1):
            return False
        experts = experts_specs(cell.case)[0].num_experts if experts_level(cell) else _num_experts(cell)
        return experts // cell.autoep_size > 1

    def plant_model(self, model):
        with torch.no_grad():
            for _, layer in autoep.replaced_layers(model):
                groups = layer.ep_groups
                if groups is not None and groups.ep_rank == groups.ep_size - 1:
                    for _, param in layer.expert_named_parameters():
                        param.copy_(param.flip(0))


# ---------------------------------------------------------------------------------------------
# Experts-level bugs: the interface's flags (autoep/interface.py) misread by the replaced experts.


def _experts_units(model):
    from autoep.experts_level import AutoEPExpertsMixin

    return [unit for _, unit in autoep.replaced_layers(model) if isinstance(unit, AutoEPExpertsMixin)]


def _flag_on(cell, flag: str, value: bool) -> bool:
    return (equivalence_cell(cell) and experts_level(cell) and CASES_BY_ID[cell.case].refused_with is None
            and any(getattr(spec.layout.flags, flag) == value for spec in experts_specs(cell.case)))


def _misread_flag(model, flag: str, value: bool) -> None:
    """The replaced experts read ``flag`` as ``value`` (their computation follows spec.layout.flags)."""
    for unit in _experts_units(model):
        flags = dataclasses.replace(unit.spec.layout.flags, **{flag: value})
        unit.spec = dataclasses.replace(unit.spec, layout=dataclasses.replace(unit.spec.layout, flags=flags))


class ExpertBiasesDropped(Mutant):
    id = "expert_biases_dropped"
    description = "experts-level: the experts' biases (gate_up_proj_bias, down_proj_bias) not added"
    source = "classic mistake porting GPT-OSS experts to a grouped GEMM (has_bias ignored)"

    def active(self, cell):
        return _flag_on(cell, "has_bias", True)

    def plant_model(self, model):
        _misread_flag(model, "has_bias", False)


class InterleavedReadAsConcatenated(Mutant):
    id = "interleaved_read_as_concatenated"
    description = ("experts-level: an interleaved gate/up projection (GPT-OSS: columns ::2 / 1::2) handed to the "
                   "gate step as if it were concatenated halves, re-interleaved")
    source = "classic mistake converting GPT-OSS checkpoints (is_concatenated=False misread)"

    def active(self, cell):
        return _flag_on(cell, "is_concatenated", False)

    @staticmethod
    def _apply_gate(unit, projected):
        half = projected.shape[-1] // 2  # the halves taken as gate and up, then interleaved for the class's gate
        reordered = torch.stack([projected[..., :half], projected[..., half:]], dim=-1).flatten(-2)
        return type(unit)._apply_gate(unit, reordered)

    def plant_model(self, model):
        for unit in _experts_units(model):
            if not unit.spec.layout.flags.is_concatenated:
                unit._apply_gate = functools.partial(self._apply_gate, unit)


class PostExpertNormSkipped(Mutant):
    id = "post_expert_norm_skipped"
    description = "experts-level: the post-expert norm (has_post_expert_norm, MuseSpark) not applied"
    source = "classic mistake reimplementing the experts outside the decorator (a flag's step dropped)"

    def active(self, cell):
        return _flag_on(cell, "has_post_expert_norm", True)

    def plant_model(self, model):
        _misread_flag(model, "has_post_expert_norm", False)


# ---------------------------------------------------------------------------------------------
# ZeRO-3 partitioned-build bugs.


class WrongSliceFromGatheredBlock(Mutant):
    id = "wrong_slice_from_gathered_block"
    description = ("a model built under deepspeed.zero.Init: each rank slices the next EP rank's experts from the "
                   "gathered block (the slice offset taken from the wrong rank)")
    source = "classic mistake gathering ZeRO-3 partitions for expert sharding (DeepSpeed's AutoEP zero.Init tests)"

    def active(self, cell):
        return cell.build == "zero-init" and cell.autoep_size > 1 and cell.resume is None

    def initialize(self, model, ds_config, optimizer):
        from autoep import engine as autoep_engine

        original = autoep_engine._ZeRO3PartitionedBuild.gather
        ep = ds_config["expert_parallel"]["autoep_size"]

        @contextlib.contextmanager
        def gather_shifted(build, params):
            with original(build, params):
                shifts = [param.shape[0] // ep for param in params]  # one EP rank's experts
                with torch.no_grad():
                    for param, shift in zip(params, shifts):
                        param.data = param.data.roll(-shift, dims=0)
                try:
                    yield
                finally:
                    with torch.no_grad():
                        for param, shift in zip(params, shifts):
                            param.data = param.data.roll(shift, dims=0)

        autoep_engine._ZeRO3PartitionedBuild.gather = gather_shifted
        try:
            return super().initialize(model, ds_config, optimizer)
        finally:
            autoep_engine._ZeRO3PartitionedBuild.gather = original


# ---------------------------------------------------------------------------------------------
# Checkpoint bugs.


class UniversalMomentsLost(Mutant):
    id = "universal_moments_lost"
    description = "Universal conversion reshards the weights but writes Adam's exp_avg / exp_avg_sq as zeros"
    source = "DeepSpeed #8147"

    def active(self, cell):
        return checkpoint_cell(cell)

    def to_universal(self, input_folder, output_folder):
        from autoep.checkpoint import folder_files, read_topology, record_files, write_topology

        super().to_universal(input_folder, output_folder)
        zero = os.path.join(output_folder, "zero")
        for name in os.listdir(zero):
            for key in ("exp_avg", "exp_avg_sq"):
                path = os.path.join(zero, name, f"{key}.pt")
                if os.path.isfile(path):
                    record = torch.load(path, weights_only=True)
                    record["param"] = torch.zeros_like(record["param"])
                    torch.save(record, path)
        topology = read_topology(output_folder)  # the converter records the files it wrote
        write_topology(output_folder, dataclasses.replace(
            topology, files=record_files(output_folder, folder_files(output_folder))))


class OnlyEPRank0ExpertsSaved(Mutant):
    id = "only_ep_rank0_experts_saved"
    description = "the save writes EP rank 0's experts into every EP rank's expert file"
    source = "classic EP mistake (DeepSpeed's model file at ZeRO 0-2 keeps only EP rank 0's experts)"

    def active(self, cell):
        return checkpoint_cell(cell) and cell.zero_stage in (1, 2) and cell.autoep_size > 1

    def plant_engine(self, engine):
        original = engine.save_checkpoint

        def save_checkpoint(*args, **kwargs):
            import torch.distributed as dist

            from autoep import checkpoint

            groups = engine._autoep_groups()
            if groups is None:
                return original(*args, **kwargs)
            rank0 = checkpoint.local_expert_state(engine.module)
            for name in sorted(rank0):  # collective over the EP group: every rank, same order
                dist.broadcast(rank0[name], src=groups.ep_ranks[0], group=groups.ep_group)
            write_experts = checkpoint.write_experts

            def write_rank0_experts(folder, ep_rank, model):
                payload = {"format_version": checkpoint.FORMAT_VERSION, "ep_rank": ep_rank, "experts": rank0,
                           "first_expert": {name: 0 for name, _ in autoep.replaced_layers(model)}}
                torch.save(payload, os.path.join(folder, checkpoint.expert_file(ep_rank)))

            checkpoint.write_experts = write_rank0_experts
            try:
                return original(*args, **kwargs)
            finally:
                checkpoint.write_experts = write_experts

        engine.save_checkpoint = save_checkpoint


class Zero3SharedStepAfterLoad(Mutant):
    id = "zero3_shared_step_after_load"
    description = ("after a Universal load at ZeRO-3 every optimizer sub-group shares one step tensor (Adam "
                   "increments it once per sub-group per step)")
    source = "DeepSpeed 0.19.8 ZeRO-3 Universal load (the workaround in autoep/engine.py undone)"

    def active(self, cell):
        return checkpoint_cell(cell) and cell.zero_stage == 3

    def plant_engine(self, engine):
        original = engine.load_checkpoint

        def load_checkpoint(*args, **kwargs):
            result = original(*args, **kwargs)
            if engine.zero_optimization_stage() == 3 and engine.load_universal_checkpoint():
                states = [state for state in engine.optimizer.optimizer.state.values()
                          if torch.is_tensor(state.get("step"))]
                for state in states[1:]:
                    state["step"] = states[0]["step"]
            return result

        engine.load_checkpoint = load_checkpoint


class SaveNotATransaction(Mutant):
    id = "save_not_a_transaction"
    description = ("a save marks the tag's record complete (without checksums) before writing its files, as "
                   "AutoEP did before issue 24: a re-save killed half-way loads as a mix of two saves")
    source = "AutoEP before issue 24 (item 1: global_steps 2 with Adam step 1 after a killed re-save)"

    def active(self, cell):
        return fault_cell(cell) and cell.fault == "killed-resave"

    def plant_engine(self, engine):
        original = engine.save_checkpoint

        def save_checkpoint(*args, **kwargs):
            from autoep import checkpoint

            write_topology = checkpoint.write_topology

            def complete_at_once(folder, topology):
                write_topology(folder, dataclasses.replace(topology, state="complete"))

            checkpoint.write_topology = complete_at_once
            try:
                return original(*args, **kwargs)
            finally:
                checkpoint.write_topology = write_topology

        engine.save_checkpoint = save_checkpoint


BANK: list[Mutant] = [cls() for cls in (
    ExpertGradScaledByEP, CorrectionBiasDropped, UniversalMomentsLost, RouterWrongAfterZero3Partitioning,
    RouterGradWrongLossRight, MissingGradContributions, EDPNotReduced, RouterReplicasDrift, ClipNormMeanOfLocalNorms,
    LowPrecisionClipIgnoresExperts, PaddingRowsLeak, CapacityTokenDrop, GroupLimitedAsGreedy, RoutedScalingNotApplied, NormTopkPolarity,
    RouterLogitsSlotSwapped, ExpertsWrongOrderOnRank, OnlyEPRank0ExpertsSaved, Zero3SharedStepAfterLoad,
    ExpertBiasesDropped, InterleavedReadAsConcatenated, PostExpertNormSkipped, WrongSliceFromGatheredBlock,
    SaveNotATransaction)]
BY_ID: dict[str, Mutant] = {mutant.id: mutant for mutant in BANK}


def __getattr__(name: str) -> Mutant:  # "mutants.bank:<id>" (conformance.subjects.subject_by_name)
    try:
        return BY_ID[name]
    except KeyError:
        raise AttributeError(f"module 'mutants.bank' has no mutant {name!r}; known: {sorted(BY_ID)}") from None
