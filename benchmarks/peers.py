"""The peers' MoE blocks for the layer benchmark, each built the way its project documents, on
the rank processes of ``autoep.launch`` (gloo on CPU), from the same weights as autoep's
(benchmarks/blocks.py):

  deepspeed        DeepSpeed 0.19.8's AutoEP: ``deepspeed.initialize`` with the config's
                   ``"expert_parallel"`` block (and its ``"optimizer"`` block, as DeepSpeed documents for
                   AutoEP; ZeRO stage 0, ``"bf16"`` for bf16); the block is the engine's
                   ``model.layers[0].mlp``, DeepSpeed's replacement layer, called on its own.
  torchtitan       TorchTitan 0.3.0's MoE (its Hugging Face backend's replacement, as conformance/titan.py
                   applies it), where torchtitan is installed (``nox -s titan``'s environment).
  transformers_ep  Transformers' own expert parallelism: the model saved and loaded again with
                   ``from_pretrained(..., distributed_config=DistributedConfig(ep_size=ep, fsdp_size=ep))``
                   (``ep_size`` must divide ``fsdp_size * tp_size``; each rank then holds E/ep whole experts
                   and FSDP2 shards the dense weights, so the layer is unsharded once before its block is
                   called on its own). At ep 1 this is the Transformers block itself (no mesh).

A peer that cannot be built raises :class:`PeerUnavailable` with the reason: for DeepSpeed, the
finding (conformance/findings.py) whose signature the error carries, else the error itself.
"""

from __future__ import annotations

import shutil
import tempfile
import traceback

import torch

from benchmarks import blocks

# Engines and models the blocks belong to: kept alive for the life of the rank process.
_KEEP: list = []


class PeerUnavailable(Exception):
    pass


PEERS = ("deepspeed", "transformers_ep", "torchtitan")


def build(variant: str, shape: dict, dtype: torch.dtype, ep: int) -> tuple[torch.nn.Module, dict]:
    if variant == "deepspeed":
        return deepspeed_block(shape, dtype, ep)
    if variant == "transformers_ep":
        return transformers_ep_block(shape, dtype, ep)
    if variant == "torchtitan":
        return torchtitan_block(shape, dtype, ep)
    raise ValueError(f"peer variant {variant!r}: expected one of {', '.join(PEERS)}")


def reason_not_run(variant: str, family: str, dtype_name: str, timed: list[str]) -> str | None:
    """Why a peer is not run here, decided before any process starts (None: run it)."""
    if variant != "torchtitan":
        return None
    from conformance.titan import NOT_INSTALLED, titan_installed

    if not titan_installed():
        return NOT_INSTALLED + " (run this module with that environment's python for its rows)"
    if family != "mixtral":
        return ("TT-2: TorchTitan's converter drops the correction bias of this family (the conformance subject "
                "refuses the model)")
    if "bf16" not in timed:
        return ("TT-5: TorchTitan's experts compute in bf16 whatever the model dtype, and bf16 is not timed on this "
                "CPU (see above)")
    return None


def torchtitan_block(shape: dict, dtype: torch.dtype, ep: int) -> tuple[torch.nn.Module, dict]:
    """TorchTitan 0.3.0's MoE swapped into the model by its Hugging Face backend, as the
    conformance subject does it (conformance/titan.py)."""
    from conformance.titan import TorchTitanSubject

    model = blocks.build_block_model(shape, dtype)
    TorchTitanSubject().apply(model, {"autoep_size": ep})
    _KEEP.append(model)
    return blocks.block_of(model), {"kernel": "torchtitan MoE (experts in bf16, TT-5)"}


def deepspeed_config(ep: int, family: str, dtype: torch.dtype) -> dict:
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 0}, "steps_per_print": 10 ** 9,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
              "expert_parallel": {"enabled": True, "autoep_size": ep, "preset_model": family}}
    if dtype == torch.bfloat16:
        config["bf16"] = {"enabled": True}
    return config


def _deepspeed_reason(error: BaseException, family: str) -> str:
    import transformers

    from conformance.findings import classify

    detail = "".join(traceback.format_exception(error))
    record = {"subject": "deepspeed", "transformers": transformers.__version__, "case": family, "zero_stage": 0,
              "resume": None, "detail": detail, "dtype": "float32", "autoep_size": 1, "world_size": 1}
    try:
        finding = classify(record)
    except (KeyError, TypeError):  # a finding's predicate needs a field a layer benchmark has no value for
        finding = None
    last = detail.strip().splitlines()[-1]
    if finding is not None:
        return f"{finding.id}: {finding.cause} ({last})"
    return f"deepspeed.initialize raised (unclassified): {last}"


def deepspeed_block(shape: dict, dtype: torch.dtype, ep: int) -> tuple[torch.nn.Module, dict]:
    import deepspeed

    model = blocks.build_block_model(shape, torch.float32)  # the engine casts to bf16 itself
    try:
        engine, *_ = deepspeed.initialize(model=model, config=deepspeed_config(ep, shape["family"], dtype))
    except Exception as error:  # noqa: BLE001 (every failure is reported with its cause)
        raise PeerUnavailable(_deepspeed_reason(error, shape["family"])) from error
    _KEEP.append(engine)
    block = engine.module.model.layers[0].mlp
    parameter = next(block.parameters())
    if parameter.dtype != dtype:
        raise PeerUnavailable(f"DeepSpeed's engine left the block in {parameter.dtype}, not {dtype}")
    return block, {"kernel": type(block).__name__}


def transformers_ep_block(shape: dict, dtype: torch.dtype, ep: int) -> tuple[torch.nn.Module, dict]:
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    source = blocks.build_block_model(shape, dtype)
    if ep == 1:  # DistributedConfig(ep_size=1) builds no mesh: the block as Transformers runs it
        return blocks.block_of(source), {"kernel": source.config._experts_implementation}
    import torch.distributed as dist

    # Under torch.distributed save_pretrained writes on rank 0 only: one folder, named by rank 0.
    folder = [tempfile.mkdtemp(prefix="bench-transformers-ep-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(folder, src=0)
    folder = folder[0]
    source.save_pretrained(folder)
    del source
    dist.barrier()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, distributed_config=DistributedConfig(ep_size=ep, fsdp_size=ep))
    except Exception as error:  # noqa: BLE001
        last = "".join(traceback.format_exception(error)).strip().splitlines()[-1]
        raise PeerUnavailable(f"from_pretrained(distributed_config=DistributedConfig(ep_size={ep})) raised: {last}")
    finally:
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(folder)
    model.train()
    layer = model.model.layers[0]
    if hasattr(layer, "unshard"):  # an FSDP2 unit: gather its dense weights for standalone calls
        layer.unshard()
    _KEEP.append(model)
    block = blocks.block_of(model)
    gate_up = block.experts.gate_up_proj
    local = gate_up.to_local() if hasattr(gate_up, "to_local") else gate_up
    if local.shape[0] != shape["experts"] // ep:
        raise PeerUnavailable(f"Transformers' EP left {local.shape[0]} experts on a rank, not {shape['experts'] // ep}")
    return block, {"kernel": f"{model.config._experts_implementation} + AllToAllEP", "local_experts": local.shape[0]}
