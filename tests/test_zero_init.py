"""Models built partitioned under ZeRO-3 (``deepspeed.zero.Init``, and Transformers'
``from_pretrained`` under ``HfDeepSpeedConfig``): detection on the recorded full shapes, one block
gathered at a time, the new experts partitioned over the expert-data-parallel group, and everything
after equal to the model built whole; the refusals before anything changes."""

from __future__ import annotations

import glob
import os

import pytest
import torch

import autoep
from autoep import launch
from autoep.config import AutoEPConfigError
from matrix.models import CASES_BY_ID
from conformance.tolerances import compare, tolerance
from conformance.training import (ADAMW, CONFIG_ADAMW, TrainingSetup, build_partitioned, deepspeed_config,
                                  global_batches, micro_batch, reference_training, train_on_rank)

WORLD, STEPS = 4, 2
pytestmark = pytest.mark.xdist_group("ranks4")


def _train_and_save(zero_init: bool, folder: str, case_id: str = "mixtral", autoep_size: int = 2) -> list[dict]:
    setup = TrainingSetup(3, autoep_size, steps=STEPS, zero_init=zero_init)
    batches = global_batches(96, WORLD, setup)
    return launch.run(WORLD, train_on_rank, case_id, "autoep", "float32", 0, setup, batches, save_to=folder)


def _universal_tensors(folder: str) -> dict[str, torch.Tensor]:
    out = folder + "-universal"
    autoep.to_universal(folder, out)
    found = {}
    for path in sorted(glob.glob(os.path.join(out, "zero", "*", "*.pt"))):
        record = torch.load(path, weights_only=True)
        key = os.path.relpath(path, out)
        found[key] = record["param"] if isinstance(record, dict) and "param" in record else record
    return found


def test_a_partitioned_build_trains_and_saves_exactly_as_the_whole_build(tmp_path):
    """Mixtral, ZeRO-3, w4 ep2: the same per-step losses, final parameters and checkpoint (every
    tensor of its Universal conversion: fp32 weights, exp_avg, exp_avg_sq, step), built whole or
    under zero.Init."""
    whole = _train_and_save(False, str(tmp_path / "whole" / "step2"))
    partitioned = _train_and_save(True, str(tmp_path / "partitioned" / "step2"))
    for a, b in zip(whole, partitioned):
        assert a["losses"] == b["losses"]
        assert a["params"].keys() == b["params"].keys()
        for name in a["params"]:
            assert torch.equal(a["params"][name], b["params"][name]), name
    saved_whole = _universal_tensors(str(tmp_path / "whole" / "step2"))
    saved_partitioned = _universal_tensors(str(tmp_path / "partitioned" / "step2"))
    assert saved_whole.keys() == saved_partitioned.keys() and any("exp_avg_sq" in key for key in saved_whole)
    for key, value in saved_whole.items():
        assert torch.equal(value, saved_partitioned[key]), key


def _peak_on_rank(layers: int, autoep_size: int) -> dict:
    import torch.distributed as dist

    from autoep import engine as autoep_engine
    from benchmarks.live_bytes import LiveBytes
    from matrix.model_case import ModelCase
    from conformance.training import process_globals_restored

    case = ModelCase("mixtral-wide", "mixtral", "mixtral", "mixtral:MixtralConfig", "mixtral:MixtralForCausalLM",
                     dict(CASES_BY_ID["mixtral"].kwargs, num_hidden_layers=layers, hidden_size=64,
                          intermediate_size=256, num_local_experts=8, num_attention_heads=4, num_key_value_heads=2))
    setup = TrainingSetup(3, autoep_size, zero_init=True)
    config = deepspeed_config(setup, "float32")
    # DeepSpeed's default ZeRO-3 buckets (5e8 elements) would dominate initialize's peak: small ones here
    config["zero_optimization"].update(reduce_bucket_size=2 ** 16, stage3_prefetch_bucket_size=2 ** 16)
    with process_globals_restored():
        model = build_partitioned(case, 0, config, setup)
        full_bytes = sum(param.ds_numel * param.element_size() for param in model.parameters())
        block = model.model.layers[0].mlp
        block_bytes = sum(param.ds_numel * param.element_size() for param in block.parameters())
        experts_bytes = sum(param.ds_numel * param.element_size() for name, param in model.named_parameters()
                            if ".experts." in name)
        peaks = {}
        apply = autoep_engine.apply

        def measured_apply(*args, **kwargs):
            with LiveBytes() as live:
                result = apply(*args, **kwargs)
            peaks["replacement"] = live.peak
            return result

        autoep_engine.apply = measured_apply
        try:
            # The optimizer from the config: a client optimizer built before initialize holds the replaced
            # blocks' parameters (their shards, which the rank held before anyway) until initialize points it
            # at the new ones, after the last block.
            with LiveBytes() as live:
                engine, *_ = autoep.initialize(model=model, config={**config, "optimizer": CONFIG_ADAMW})
        finally:
            autoep_engine.apply = apply
        local = sum(param.ds_tensor.numel() * param.element_size() for param in engine.module.parameters())
        return {"rank": dist.get_rank(), "full_bytes": full_bytes, "block_bytes": block_bytes,
                "experts_bytes": experts_bytes,
                "replacement_peak": peaks["replacement"], "initialize_peak": live.peak, "local_shard_bytes": local}


def test_peak_memory_of_initialize_is_one_block_plus_the_shards():
    """A 12-layer model built under zero.Init on 4 ranks, autoep_size 2. Counted from the tensors
    created during the call (benchmarks/live_bytes.py; the model's own shards predate it): while the
    blocks are replaced a rank holds one block gathered whole, this EP rank's slice of it and the
    shards of the new experts built so far (each rank keeps E / world experts of every layer: the
    slice split over the EDP group), and the replaced blocks' shards are released as it goes; never
    the model, nor all of its experts."""
    results = launch.run(WORLD, _peak_on_rank, 12, 2)
    for result in results:
        block, experts = result["block_bytes"], result["experts_bytes"]
        # block gathered + its EP slice (1/2) + the new shards of all experts (1/world) + the replaced block's
        # own shard re-made when its gather ends (1/world of a block: freed with the block) + 64 KiB for the
        # small tensors of the step (router weights' shards, counts, offsets)
        bound = block + block / 2 + experts / WORLD + block / WORLD + 2 ** 16
        assert result["replacement_peak"] <= bound, result
        assert result["replacement_peak"] < experts / 2 < result["full_bytes"] / 2, result
    print({key: value for key, value in results[0].items() if key != "rank"})


def test_a_stage_other_than_3_with_a_partitioned_model_is_refused_before_anything_changes():
    model = CASES_BY_ID["mixtral"].build()
    name, param = next(iter(model.named_parameters()))
    param.ds_id = 0  # as zero.Init marks a parameter (without DeepSpeed's converter here)
    with pytest.raises(AutoEPConfigError, match=f"{name}.*a ZeRO parameter without DeepSpeed's converter"):
        autoep.initialize(model=model, config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
                                               "expert_parallel": {"enabled": True}})
    param.convert_to_zero_parameters = lambda param_list: None
    with pytest.raises(AutoEPConfigError, match=f"zero_optimization.stage=2, but parameter '{name}' is partitioned"):
        autoep.initialize(model=model, config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2},
                                               "expert_parallel": {"enabled": True}})
    with pytest.raises(ValueError, match=f"parameter '{name}'.*partitioned by DeepSpeed ZeRO-3.*autoep.initialize"):
        autoep.apply(model)
    assert not autoep.replaced_layers(model)


def _from_pretrained_on_rank(path: str, autoep_size: int, steps: int, out: str, batches: torch.Tensor) -> dict:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from conformance.training import process_globals_restored

    setup = TrainingSetup(3, autoep_size, steps=steps, grad_accum=4 // dist.get_world_size())
    config = deepspeed_config(setup, "float32")
    with process_globals_restored():
        keep_alive = HfDeepSpeedConfig(config)  # from_pretrained builds every parameter partitioned (ZeRO-3)
        model = AutoModelForCausalLM.from_pretrained(path)
        partitioned = all(hasattr(param, "ds_id") for param in model.parameters())
        model.config.router_aux_loss_coef = 0.1
        engine, *_ = autoep.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), **ADAMW),
                                       config=config)
        losses = []
        for step in range(steps):
            for accum in range(setup.grad_accum):
                ids = micro_batch(batches, step, accum, dist.get_rank(), dist.get_world_size(), setup)
                loss = engine(input_ids=ids, labels=ids).loss
                engine.backward(loss)
                engine.step()
            losses.append(float(loss))
        autoep.save_pretrained(engine, out)
        del keep_alive
        return {"partitioned": partitioned, "losses": losses}


@pytest.mark.parametrize("world", [2, 4])
def test_from_pretrained_under_zero3_applies_trains_and_exports_back(tmp_path, world):
    """save_pretrained of a tiny model, then on ``world`` ranks HfDeepSpeedConfig + from_pretrained
    (weights loaded partitioned), autoep.initialize at autoep_size 2, two AdamW steps, and
    autoep.save_pretrained; the export loads into the stock class and equals a single-process run of
    the same steps. With no step the export equals the saved model bit for bit."""
    from transformers import MixtralForCausalLM

    case = CASES_BY_ID["mixtral"]
    source = str(tmp_path / "source")
    case.build().save_pretrained(source)
    setup = TrainingSetup(3, 2, steps=STEPS, grad_accum=4 // world)
    batches = global_batches(96, world, setup)
    untouched = str(tmp_path / "untouched")
    results = launch.run(world, _from_pretrained_on_rank, source, 2, 0, untouched, batches)
    assert all(result["partitioned"] for result in results)
    exported = MixtralForCausalLM.from_pretrained(untouched).state_dict()
    original = MixtralForCausalLM.from_pretrained(source).state_dict()
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[name], original[name]) for name in original)
    trained = str(tmp_path / "trained")
    launch.run(world, _from_pretrained_on_rank, source, 2, STEPS, trained, batches)
    want = reference_training(case, torch.float32, 0, TrainingSetup(3, 1, steps=STEPS, grad_accum=4 // world), world,
                              batches)
    got = dict(MixtralForCausalLM.from_pretrained(trained).named_parameters())
    tol = tolerance(torch.float32, "multi")
    failures = [str(check) for check in (compare(name, got[name].detach(), value, tol)
                                         for name, value in want["params"].items()) if not check.ok]
    assert not failures, failures[:4]
