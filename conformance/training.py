"""Training-step equivalence under DeepSpeed: a few AdamW steps of the subject's engine on W
rank processes equal a single-process PyTorch AdamW run of the original model on the same
global batches (per-step loss and the final parameters, gathered to full tensors).

Objective of both: each optimizer step, the mean over the W x GA micro-batches of the step
of each micro-batch's loss (cross-entropy mean + the aux loss of that micro-batch). Rank r,
accumulation step g takes micro-batch ``g * W + r`` of the step's global batch.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from dataclasses import dataclass

import torch

from autoep import launch
from conformance.equivalence import NEAR_TIE, decisions_agree, layouts, min_margin
from conformance.ranks import process_groups_released, rank_device
from conformance.subjects import PLAIN_DEEPSPEED, subject_by_name
from conformance.tolerances import Comparison, compare, tolerance
from matrix.models import CASES_BY_ID, ModelCase
from reference.model import ReferenceModel
import autoep
from matrix.model_case import _load, _randomize, make_config

# eps is of the order of the gradients. With the usual 1e-8, Adam's first update is
# lr * sign(g) for every element: invariant to the gradient's scale (a mis-scaled expert
# gradient, e.g. an EDP mean instead of sum / W, would go unseen) and ill-conditioned where g is
# at rounding level (a sign flip moves the parameter by 2 lr). With eps ~ |g| the update
# depends on the gradient's magnitude and amplifies gradient rounding by at most lr / eps.
ADAMW = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-3, weight_decay=0.01)
# DeepSpeed clips the global gradient norm at 1.0 unless told otherwise (gradient_clipping's
# default in 0.19.8); the reference does the same, so the global norm over sharded experts is checked.
GRADIENT_CLIPPING = 1.0
# bf16 runs are compared over one optimizer step. Over several, bf16 rounding moves two correct
# runs apart until a near-tie top-k decision flips, and from there they are different
# trajectories. Measured (qwen3_moe, ZeRO-2, bf16, autoep_size 2 vs 1, the same DeepSpeed
# arithmetic except the expert grouping and reduction groups): router weights 1 ulp apart after
# 2 steps moved one token's logits by ~1% of the largest, flipping its 2nd/3rd expert (gap 0.9%);
# the step-3 gradient norm jumped 3.55 -> 3.69 and the update error vs float32 went 3% -> 8-11%.
# Data whose routing stays 2% away from every tie over 3 steps x 32 tokens x all layers does not
# exist at this model size. After one step both runs made the same forward on the same weights,
# and the data are drawn so that no decision there is a near-tie (NEAR_TIE, as for the bf16
# forward comparisons). Multi-step optimizer state (Adam moments, step count) is checked in
# float32, where the runs stay 1e-6 apart.
BF16_STEPS = 1


@dataclass(frozen=True)
class TrainingSetup:
    zero_stage: int
    autoep_size: int
    steps: int = 3
    grad_accum: int = 1
    micro_batch: int = 1
    seq_len: int = 8
    client_optimizer: bool = True  # False: the config's "optimizer" block, whatever the subject's route
    zero3_low_persistence: bool = False  # stage3_param_persistence_threshold tiny: routers partitioned too
    # How the optimizer reaches deepspeed.initialize (OPTIMIZER_ROUTES); None: the subject's own route.
    optimizer_route: str | None = None
    # The models' router_aux_loss_coef (None: the case's, 0.1); 0 judges a run apart from its aux loss.
    aux_loss_coef: float | None = None
    # The subject's model is built partitioned, under deepspeed.zero.Init with the engine's config
    # (ZeRO-3 only): autoep.initialize gathers, replaces and re-partitions it one block at a time.
    zero_init: bool = False


def deepspeed_config(setup: TrainingSetup, dtype_name: str, ep_block: dict | None = None) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": setup.micro_batch,
        "gradient_accumulation_steps": setup.grad_accum,
        "zero_optimization": {"stage": setup.zero_stage},
        "gradient_clipping": GRADIENT_CLIPPING,
        "expert_parallel": {**(ep_block or {}), "enabled": True, "autoep_size": setup.autoep_size},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if dtype_name == "bfloat16":
        config["bf16"] = {"enabled": True}
    if setup.zero3_low_persistence:
        config["zero_optimization"].update(stage3_param_persistence_threshold=1, stage3_max_live_parameters=1e9)
    if not setup.client_optimizer:
        config["optimizer"] = copy.deepcopy(CONFIG_ADAMW)
    return config


# The config's "optimizer" block equal to the reference's torch.optim.AdamW(**ADAMW): "torch_adam"
# makes DeepSpeed build torch.optim.AdamW itself (engine.get_optimizer_configuration), the same
# algorithm (decoupled weight decay on every parameter, bias correction, eps outside the square
# root); without it DeepSpeed picks FusedAdam or DeepSpeedCPUAdam, other implementations.
CONFIG_ADAMW = {"type": "AdamW", "params": {"lr": ADAMW["lr"], "betas": list(ADAMW["betas"]), "eps": ADAMW["eps"],
                                            "weight_decay": ADAMW["weight_decay"], "torch_adam": True}}
# "client": torch.optim.AdamW(model.parameters()) built before deepspeed.initialize; "config": the
# config's "optimizer" block (CONFIG_ADAMW), from which DeepSpeed builds the MoE parameter groups
# itself; "moe_groups_callable": a callable that DeepSpeed calls with the parameters after its
# module replacement, splitting them with split_params_into_different_moe_groups_for_optimizer
# (DeepSpeed's documented way for a client optimizer of a model with MoE layers).
OPTIMIZER_ROUTES = ("client", "config", "moe_groups_callable")


def moe_groups_adamw(parameters) -> torch.optim.AdamW:
    """torch AdamW(**ADAMW) over DeepSpeed's MoE parameter groups of ``parameters``."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(parameters), "name": "dense"})
    return torch.optim.AdamW(groups, **ADAMW)


def optimizer_for(route: str, model: torch.nn.Module, config: dict):
    """(what ``deepspeed.initialize`` gets as ``optimizer``, the config) for an OPTIMIZER_ROUTES route."""
    if route == "client":
        return torch.optim.AdamW(model.parameters(), **ADAMW), config
    if route == "config":
        return None, {**config, "optimizer": copy.deepcopy(CONFIG_ADAMW)}
    if route == "moe_groups_callable":
        return moe_groups_adamw, config
    raise ValueError(f"optimizer route {route!r}: expected one of {OPTIMIZER_ROUTES}")


def build_model(case: ModelCase, seed: int, dtype: torch.dtype, setup: TrainingSetup) -> torch.nn.Module:
    """The case's model (weights from ``seed``) with the setup's aux-loss coefficient, if it sets one."""
    model = case.build(seed=seed, dtype=dtype)
    if setup.aux_loss_coef is not None:
        if not hasattr(model, "router_aux_loss_coef"):
            raise ValueError(f"aux_loss_coef={setup.aux_loss_coef}: case {case.id!r} has no router_aux_loss_coef")
        model.router_aux_loss_coef = setup.aux_loss_coef
        model.config.router_aux_loss_coef = setup.aux_loss_coef
    return model


def build_partitioned(case: ModelCase, seed: int, ds_config: dict, setup: TrainingSetup) -> torch.nn.Module:
    """The case's model built under ``deepspeed.zero.Init`` (every parameter partitioned over the
    ranks as it is created), with the weights :meth:`ModelCase.build` gives it: the randomisation and
    the case's post_init run on the gathered parameters (tiny models: all at once) and rank 0's
    values are kept. Collective: every rank."""
    import deepspeed

    if setup.zero_stage != 3:
        raise ValueError(f"zero_init needs ZeRO stage 3, got {setup.zero_stage}")
    # The class and config outside the context: zero.Init patches tensor construction, and a module
    # imported inside it (Transformers imports lazily, and torch._dynamo with it) sees the patch.
    model_class, config = _load(case.causal_lm_class), make_config(case)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        torch.manual_seed(seed)
        model = model_class(config)
    generator = torch.Generator().manual_seed(seed + 1)
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
        _randomize(model, generator)
        if case.post_init is not None:
            case.post_init(model, generator)
    if setup.aux_loss_coef is not None:
        model.router_aux_loss_coef = setup.aux_loss_coef
        model.config.router_aux_loss_coef = setup.aux_loss_coef
    return model.eval()


def global_batches(vocab: int, world_size: int, setup: TrainingSetup, seed: int = 123) -> torch.Tensor:
    """[steps, W * GA * micro_batch, seq_len] token ids."""
    generator = torch.Generator().manual_seed(seed)
    rows = world_size * setup.grad_accum * setup.micro_batch
    return torch.randint(0, vocab, (setup.steps, rows, setup.seq_len), generator=generator)


def tie_free_global_batches(case: ModelCase, dtype: torch.dtype, world_size: int, setup: TrainingSetup,
                            seed: int = 0, data_seed: int = 123, tries: int = 100) -> torch.Tensor:
    """``global_batches`` from the first data seed (``data_seed`` on) whose micro-batches make no
    near-tie routing decision on the initial weights (in the model's dtype and in float32)."""
    model = case.build(seed=seed, dtype=dtype)
    specs = layouts(autoep.inspect(model, case.block()))
    oracles = [ReferenceModel(model, specs),  # (deep copies)
               ReferenceModel(model.float(), specs, compute_dtype=torch.float64)]
    threshold = NEAR_TIE[str(dtype).replace("torch.", "")]
    if oracles[0].experts_level:  # no declared routing whose margins could be measured: the oracles must agree

        def usable(ids):
            return decisions_agree(oracles, ids)
    else:
        def usable(ids):
            return all(min_margin(oracle, ids) > threshold for oracle in oracles)
    for attempt in range(tries):
        batches = global_batches(model.config.get_text_config().vocab_size, world_size, setup, data_seed + attempt)
        micro = [micro_batch(batches, step, accum, rank, world_size, setup) for step in range(setup.steps)
                 for accum in range(setup.grad_accum) for rank in range(world_size)]
        if all(usable(ids) for ids in micro):
            return batches
    raise AssertionError(f"no global batch without routing near-ties (threshold {threshold}, or decisions that "
                         f"differ between the oracles) in {tries} draws")


def micro_batch(batches: torch.Tensor, step: int, accum: int, rank: int, world: int, setup: TrainingSetup):
    index = accum * world + rank
    return batches[step, index * setup.micro_batch:(index + 1) * setup.micro_batch]


def _deepspeed_cached_groups() -> list:
    """The process groups DeepSpeed's group module holds in its globals (created once, e.g. the
    sequence-data-parallel group, and reused by every later engine)."""
    import torch.distributed as dist
    from deepspeed.utils import groups

    found = []

    def visit(value, depth=0):
        if isinstance(value, dist.ProcessGroup):
            found.append(value)
        elif depth < 2 and isinstance(value, dict):
            for item in value.values():
                visit(item, depth + 1)
        elif depth < 2 and isinstance(value, (list, tuple)):
            for item in value:
                visit(item, depth + 1)

    for value in vars(groups).values():
        visit(value)
    return found


@contextlib.contextmanager
def process_globals_restored():
    """DeepSpeed's ZeRO-3 engine replaces ``torch.nn.functional.linear`` for the rest of the
    process (``memory_efficient_linear``; its log says it "will persist unless manually
    reset"). Rank processes are shared between runs, so without this a run's linears (and their
    bf16 rounding) would depend on which cells ran before it: measured, qwen2_moe ZeRO-2 bf16
    passed alone but failed (k_proj.bias update) after ZeRO-3 cells. Each run leaves the process
    as it found it (also DeepSpeed's expert-group registry, and the process groups the run
    created: ``process_groups_released``, and the engines it built: ``_destroy_engines``)."""
    import torch.nn.functional as F
    from deepspeed.utils import groups, logger

    # DeepSpeed's warnings (e.g. "MPU is not provided" on every Universal load) would bury the
    # conformance run's progress lines; a failing run's traceback still says what went wrong.
    logger_level = logger.level
    logger.setLevel(logging.ERROR)

    # DeepSpeed's registry of expert-parallel groups, by name: a later run with another
    # autoep_size in the same process would otherwise see both (and ZeRO-1/2 Universal loading
    # slices experts by the largest registered group, not the engine's).
    registries = [groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_PARALLEL_GROUP_RANKS,
                  groups._EXPERT_DATA_PARALLEL_GROUP, groups._EXPERT_DATA_PARALLEL_GROUP_RANKS]
    names = [set(registry) for registry in registries]
    linear = F.linear
    stack_length, engines_before = _zero3_module_stack_length(), len(_ENGINES)
    # The groups are released when this block exits, after the registries below drop theirs.
    with process_groups_released(keep=_deepspeed_cached_groups):
        try:
            yield
        finally:
            _destroy_engines(since=engines_before)
            _release_zero3_globals(stack_length)
            F.linear = linear
            logger.setLevel(logger_level)
            for registry, before in zip(registries, names):
                for name in set(registry) - before:
                    del registry[name]


def build_engine(case_id: str, subject_name: str, dtype_name: str, seed: int, setup: TrainingSetup,
                 load_universal: bool = False):
    """Rank side: the subject's engine for the case's model (weights from ``seed``), its AdamW
    built the subject's way (``optimizer_route``, see OPTIMIZER_ROUTES), or the setup's."""

    subject = subject_by_name(subject_name)
    config = deepspeed_config(setup, dtype_name, CASES_BY_ID[case_id].ep_block)
    if setup.zero_init:
        model = build_partitioned(CASES_BY_ID[case_id], seed, config, setup).train()
    else:
        model = build_model(CASES_BY_ID[case_id], seed, torch.float32, setup).train()
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    if not setup.client_optimizer:
        return _registered(subject.initialize(model, config, None))
    route = setup.optimizer_route or getattr(subject, "optimizer_route", "client")
    optimizer, config = optimizer_for(route, model, config)
    return _registered(subject.initialize(model, config, optimizer))


# Engines built by ``build_engine``; each ``process_globals_restored`` block destroys those built inside it.
_ENGINES: list = []


def _registered(engine):
    _ENGINES.append(engine)
    return engine


def _destroy_engines(since: int = 0) -> None:
    """``engine.destroy()`` (DeepSpeed's documented release) for every engine of the run: its
    ZeRO optimizer removes the gradient-accumulation hooks it put on the parameters. Those hooks
    live in autograd's C++ nodes, which Python's cycle collector cannot see through, so without
    this every engine, its model, optimizer state and process groups stayed alive for the life of
    the rank process: measured, +6 gloo threads per ZeRO-1/2/3 cell and +12 per Universal resume
    on every 4-rank worker (893 threads each after ~500 cells of the full profile, load average
    190, a 2-s compile cell taking 370 s)."""
    while len(_ENGINES) > since:  # only the engines of this run (an enclosing run keeps its own)
        engine = _ENGINES.pop()
        destroy = getattr(engine, "destroy", None)
        if destroy is not None:
            try:
                destroy()
            except Exception:  # a run that failed half-way: release what can be released
                pass


def _zero3_module_stack_length() -> int:
    from deepspeed.runtime.zero import parameter_offload

    return len(getattr(parameter_offload, "FWD_MODULE_STACK", ()))


def _release_zero3_globals(stack_length: int) -> None:
    """Two module-level references DeepSpeed 0.19.8's ZeRO-3 keeps to every engine's model after
    ``engine.destroy()``: each engine appends its top module to ``parameter_offload.FWD_MODULE_STACK``
    and never pops it, and ``PartitionedParameterCoordinator.__params_to_release`` is an unbounded
    ``functools.lru_cache`` on a method, keyed by (coordinator, module, step). Both kept each ZeRO-3
    cell's model, optimizer and process groups alive in the shared rank processes (measured: +6
    gloo threads per ZeRO-3 cell with ``destroy()`` alone). Restored to what they held before."""
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    stack = getattr(parameter_offload, "FWD_MODULE_STACK", None)
    if stack is not None:
        del stack[stack_length:]
    method = getattr(PartitionedParameterCoordinator, "_PartitionedParameterCoordinator__params_to_release", None)
    for candidate in (method, *(cell.cell_contents for cell in getattr(method, "__closure__", None) or ())):
        clear = getattr(candidate, "cache_clear", None)
        if clear is not None:
            clear()


def clips_param_grads(engine) -> bool:
    """Whether the engine clips ``param.grad`` in place and then steps a torch optimizer over the
    module's parameters (DeepSpeed's fp32 ZeRO-0 path, ``engine.clip_fp32_gradients``): there the
    clip coefficient it applied is observable, whatever norm it reports."""
    return (engine.zero_optimization_stage() == 0 and not (engine.bfloat16_enabled() or engine.fp16_enabled())
            and isinstance(engine.optimizer, torch.optim.Optimizer) and engine.gradient_clipping() > 0)


def _local_grad_square(engine) -> float:
    """The squared L2 norm of this rank's ``param.grad`` tensors."""
    return sum(float(p.grad.detach().double().pow(2).sum()) for p in engine.module.parameters() if p.grad is not None)


def train_steps(engine, batches: torch.Tensor, steps, setup: TrainingSetup,
                clipping: dict | None = None) -> list[float]:
    """Rank side: one optimizer step per entry of ``steps`` (with gradient accumulation);
    returns this rank's loss per step, averaged over its micro-batches.

    ``clipping``: filled, per optimizer step, with "reported" (``engine.get_global_grad_norm()``,
    None where the engine records none) and, where ``clips_param_grads``, "coefficient": the clip
    coefficient the engine applied, this rank's gradient norm when its optimizer steps (a step
    pre-hook) over that after the last backward (reduced gradients, before ``engine.step()``)."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    observe = clipping is not None and clips_param_grads(engine)
    seen = {}
    hook = engine.optimizer.register_step_pre_hook(
        lambda *_: seen.__setitem__("after", _local_grad_square(engine))) if observe else None
    losses = []
    try:
        for step in steps:
            step_losses = []
            for accum in range(setup.grad_accum):
                ids = micro_batch(batches, step, accum, rank, world, setup).to(engine.device)
                loss = engine(input_ids=ids, labels=ids).loss
                engine.backward(loss)
                boundary = accum == setup.grad_accum - 1
                if observe and boundary:
                    seen.clear()
                    before = _local_grad_square(engine)
                engine.step()
                if clipping is not None and boundary:
                    norm = engine.get_global_grad_norm()
                    clipping.setdefault("reported", []).append(None if norm is None else float(norm))
                    if observe:
                        after = seen.get("after", float("nan"))  # nan: the optimizer did not step
                        clipping.setdefault("coefficient", []).append((after / before) ** 0.5 if before > 0
                                                                      else float("nan"))
                step_losses.append(float(loss.detach()))
            losses.append(sum(step_losses) / len(step_losses))
    finally:
        if hook is not None:
            hook.remove()
    return losses


def train_on_rank(case_id: str, subject_name: str, dtype_name: str, seed: int, setup: TrainingSetup,
                  batches: torch.Tensor, first_step: int = 0, save_to: str | None = None,
                  load_universal: str | None = None) -> dict:
    """Rank side: the subject's engine trains steps ``first_step .. setup.steps - 1``; returns
    this rank's per-step losses and its parameters (full tensors, or local expert slices with
    shards). ``load_universal``: a Universal Checkpoint tag folder loaded first; ``save_to``:
    a tag folder saved to at the end."""
    import os


    subject = subject_by_name(subject_name)
    rank_device()  # on CUDA: the math settings the tolerances assume (DeepSpeed places the model itself)
    with process_globals_restored():
        engine = build_engine(case_id, subject_name, dtype_name, seed, setup, load_universal is not None)
        if load_universal is not None:
            path, _ = engine.load_checkpoint(os.path.dirname(load_universal), tag=os.path.basename(load_universal))
            if path is None:
                raise RuntimeError(f"nothing was loaded from {load_universal}")
        clipping = {}
        losses = train_steps(engine, batches, range(first_step, setup.steps), setup, clipping)
        if save_to is not None:
            engine.save_checkpoint(os.path.dirname(save_to), tag=os.path.basename(save_to))
        return {"losses": losses, "params": on_cpu(subject.full_parameters(engine)),
                "expert_shards": subject.expert_shards(engine.module), "clipping": clipping}


def on_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A rank's tensors as they travel back to the parent (which may have no GPU)."""
    return {name: tensor.cpu() for name, tensor in tensors.items()}


def reference_training(case: ModelCase, dtype: torch.dtype, seed: int, setup: TrainingSetup, world_size: int,
                       batches: torch.Tensor) -> dict:
    """Single-process PyTorch AdamW in float32 on the original model, same micro-batches, same
    objective. For a bf16 subject it starts from the bf16-rounded weights (what DeepSpeed's
    fp32 master weights start from), so that only the training arithmetic differs."""
    model = build_model(case, seed, dtype, setup).float().train()
    optimizer = torch.optim.AdamW(model.parameters(), **ADAMW)
    count = world_size * setup.grad_accum
    losses, norms = [], []
    for step in range(setup.steps):
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for accum in range(setup.grad_accum):
            for rank in range(world_size):
                ids = micro_batch(batches, step, accum, rank, world_size, setup)
                loss = model(input_ids=ids, labels=ids).loss
                (loss / count).backward()
                total += float(loss.detach())
        if GRADIENT_CLIPPING > 0:  # DeepSpeed's convention: 0 means no clipping
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), GRADIENT_CLIPPING)))
        optimizer.step()
        losses.append(total / count)
    return {"losses": torch.tensor(losses), "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "grad_norms": torch.tensor(norms, dtype=torch.float64)}  # total norm before clipping, per step


def assemble(rank_results: list[dict]) -> dict[str, torch.Tensor]:
    """Full parameters from every rank's: replicated ones must agree across ranks; expert
    slices are placed among all E experts (and must agree across their EDP group)."""
    names = rank_results[0]["params"].keys()
    full = {}
    for name in names:
        values = [result["params"][name] for result in rank_results]
        shards = [result["expert_shards"].get(name) for result in rank_results]
        if shards[0] is None:
            for rank, value in enumerate(values[1:], 1):
                if not torch.equal(value, values[0]):
                    raise AssertionError(f"{name}: rank {rank} differs from rank 0 "
                                         f"(max {float((value - values[0]).abs().max()):.3g}); replicas diverged")
            full[name] = values[0]
            continue
        num_experts = shards[0][1]
        tensor = torch.full((num_experts,) + tuple(values[0].shape[1:]), float("nan"), dtype=values[0].dtype)
        for value, (first, _) in zip(values, shards):
            placed = tensor[first:first + value.shape[0]]
            if not bool(torch.isnan(placed).all()) and not torch.equal(placed, value):
                raise AssertionError(f"{name}: EDP replicas of experts {first}.. differ")
            tensor[first:first + value.shape[0]] = value
        if bool(torch.isnan(tensor).any()):
            raise AssertionError(f"{name}: some experts are held by no rank")
        full[name] = tensor
    return full


def run_training(case: ModelCase, subject, dtype: torch.dtype, setup: TrainingSetup, world_size: int = 4,
                 seed: int = 0, device: str = "cpu") -> tuple[dict, dict]:
    """(subject: losses [steps] averaged over ranks + assembled params, reference). ``device``:
    where the subject's engine runs (one GPU per rank on CUDA); the reference runs on the CPU."""
    if dtype == torch.float32:
        batches = global_batches(case.build(seed=seed).config.get_text_config().vocab_size, world_size, setup)
    else:
        batches = tie_free_global_batches(case, dtype, world_size, setup, seed)
    dtype_name = str(dtype).replace("torch.", "")
    results = launch.run(world_size, train_on_rank, case.id, subject.name, dtype_name, seed, setup, batches,
                         device=device)
    losses = torch.tensor([result["losses"] for result in results]).mean(dim=0)
    subject_run = {"losses": losses, "params": assemble(results),
                   "clipping": [result["clipping"] for result in results]}
    return subject_run, reference_training(case, dtype, seed, setup, world_size, batches)


def initial_parameters(case: ModelCase, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """The weights training starts from, in float32 (bf16-rounded for a bf16 run)."""
    return {name: p.detach().float() for name, p in case.build(seed=seed, dtype=dtype).named_parameters()}


def clipping_checks(ranks: list[dict], reference_norms: torch.Tensor, tol, baseline: list[dict] | None = None) -> list:
    """The gradient norm each optimizer step was clipped with (the subject's ``clipping`` record of
    every rank, see ``train_steps``) against the reference's total norm before clipping. Clipping
    scales every gradient, so a wrong norm moves every parameter, but by little: DeepSpeed's ZeRO-0
    mean of local norms (DS-6) is 1.2% small at deepseek_v3 ep2 and moves the parameters 9.6e-6
    after 3 steps, inside the parameter tolerance; the norm itself is 1e-2 off, the tolerance 1e-4.

    "grad norm": ``engine.get_global_grad_norm()`` on every rank, where the engine reports one (a
    subject that reports none is not judged on it and the record says so). "clip coefficient":
    where the engine clips ``param.grad`` before a torch optimizer (``clips_param_grads``), the
    coefficient it applied against DeepSpeed's formula min(1, max_norm / (norm + 1e-6)) on the
    reference norm: what the engine did, whatever it reports. ``baseline``: another run's records
    (bf16: plain DeepSpeed's), for a tolerance with a baseline factor."""

    steps = len(reference_norms)
    reported = [rank.get("reported", []) for rank in ranks]
    checks = []
    if all(value is None for values in reported for value in values):
        checks.append(Comparison("grad norm not checked: engine.get_global_grad_norm() is None (this engine records "
                                 "no norm here, e.g. DeepSpeed's ZeRO-0 fp32 path)", 0.0, 0.0, True))
    elif any(len(values) != steps or None in values for values in reported):
        checks.append(Comparison(f"grad norm: engine.get_global_grad_norm() reported {reported} over {steps} "
                                 "steps (None on some)", float("inf"), float("inf"), False))
    else:
        base = None
        if baseline is not None and all(None not in rank.get("reported", [None]) for rank in baseline):
            base = torch.tensor([rank["reported"] for rank in baseline], dtype=torch.float64)
        checks.append(compare("grad norm (engine.get_global_grad_norm, every rank, per step)",
                              torch.tensor(reported, dtype=torch.float64), reference_norms.expand(len(ranks), steps),
                              tol, base))
    coefficients = [rank["coefficient"] for rank in ranks if "coefficient" in rank]
    if coefficients:
        expected = (GRADIENT_CLIPPING / (reference_norms + 1e-6)).clamp(max=1.0)
        checks.append(compare("clip coefficient applied (every rank, per step)",
                              torch.tensor(coefficients, dtype=torch.float64), expected.expand(len(ranks), steps),
                              tol))
    return checks


def compare_training(case: ModelCase, subject, dtype: torch.dtype, setup: TrainingSetup, world_size: int = 4,
                     seed: int = 0, device: str = "cpu") -> list:
    """Run the subject and the reference and compare per-step losses and final parameters.

    float32: elementwise at the multi-process tolerance. bf16: the *update* of each parameter
    (final - initial; the weights themselves would hide it under their own rounding) and the
    losses, as relative L2 error against the float32 reference, bounded by max(1e-2, 2 x the
    error of a baseline: the original model trained by plain DeepSpeed in bf16 at the same
    ZeRO stage), over BF16_STEPS steps. Measured (one step, qwen2_moe, ZeRO-2): median relative
    update error 2.1% for AutoEP, 2.0% for the baseline; over 3 steps ~36% for both at ZeRO 0
    (which steps the bf16 weights themselves, where updates below half an ulp are lost).
    """

    got, want = run_training(case, subject, dtype, setup, world_size, seed, device)
    if got["params"].keys() != want["params"].keys():
        raise AssertionError(f"parameter names differ: {sorted(got['params'].keys() ^ want['params'].keys())[:4]}")
    if dtype == torch.float32:
        tol = tolerance(torch.float32, "multi", device)
        return [compare("per-step loss", got["losses"], want["losses"], tol)] + \
            clipping_checks(got["clipping"], want["grad_norms"], tol) + \
            [compare(f"param {name}", got["params"][name], value, tol) for name, value in want["params"].items()]
    if setup.steps != BF16_STEPS:
        raise ValueError(f"TrainingSetup.steps={setup.steps}: {dtype} runs are compared over {BF16_STEPS} step "
                         "(see BF16_STEPS: over more, bf16 rounding flips near-tie routing decisions)")
    tol = tolerance(dtype, "multi", device)
    baseline, _ = run_training(case, PLAIN_DEEPSPEED, dtype, dataclasses.replace(setup, autoep_size=1), world_size,
                               seed, device)
    initial = initial_parameters(case, dtype, seed)
    updates = {name: value - initial[name] for name, value in want["params"].items()}
    base_updates = {name: baseline["params"][name] - initial[name] for name in updates}
    # The baseline's typical relative error, a floor for its error on one small tensor (as in
    # the bf16 forward/backward comparisons, see conformance/tolerances.py).
    ratios = sorted(float((base_updates[n] - u).double().norm() / u.double().norm()) for n, u in updates.items()
                    if bool(u.any()))
    typical = ratios[len(ratios) // 2]
    checks = [compare("per-step loss", got["losses"], want["losses"], tol, baseline["losses"], typical)]
    checks += clipping_checks(got["clipping"], want["grad_norms"], tol, baseline["clipping"])
    for name, update in updates.items():
        checks.append(compare(f"update {name}", got["params"][name] - initial[name], update, tol, base_updates[name],
                              typical))
    return checks
