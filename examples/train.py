"""Train a tiny Mixtral with expert parallelism (autoep_size=2) under DeepSpeed ZeRO-2 on 2 CPU
processes, printing the loss per step.

    PYTHONPATH=. python examples/train.py [--steps 5] [--world-size 2] [--autoep-size 2] [--stage 2]

The model is a stock ``transformers.MixtralForCausalLM`` with random weights; the only change
from a plain DeepSpeed script is ``autoep.initialize`` in place of ``deepspeed.initialize`` and
the ``"expert_parallel"`` block in the config. The rank processes come from the project's
launcher (``autoep.launch``); under ``torchrun``/``deepspeed`` call :func:`train` on each rank.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch


def build_model():
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           router_jitter_noise=0.0, output_router_logits=True, max_position_embeddings=64)
    torch.manual_seed(0)  # every rank builds the same weights
    return MixtralForCausalLM(config)


def train(steps: int, autoep_size: int, stage: int) -> list[float]:
    """One rank's training loop; returns the losses it printed (rank 0 prints)."""
    import torch.distributed as dist

    import autoep

    model = build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "zero_optimization": {"stage": stage},
        "expert_parallel": {"enabled": True, "autoep_size": autoep_size, "preset_model": "mixtral"},
        "steps_per_print": 10 ** 9,
    }
    engine, _, _, _ = autoep.initialize(model=model, optimizer=optimizer, config=config)
    rank = dist.get_rank()
    # Each rank its own micro-batch, the same every step: the loss must fall as the model fits it.
    input_ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1000 + rank))
    losses = []
    for step in range(steps):
        loss = engine(input_ids=input_ids, labels=input_ids).loss
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        mean = float(mean) / dist.get_world_size()
        losses.append(mean)
        if rank == 0:
            print(f"step {step}: loss {mean:.4f}", flush=True)
    return losses


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--autoep-size", type=int, default=2)
    parser.add_argument("--stage", type=int, default=2, choices=[0, 1, 2, 3])
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # rank processes import this file as `train`
    from autoep.launch import RankPool

    with RankPool(args.world_size) as pool:
        pool.run("train:train", args.steps, args.autoep_size, args.stage)
    return 0


if __name__ == "__main__":
    sys.exit(main())
