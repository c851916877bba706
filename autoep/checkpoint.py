"""AutoEP's own part of a DeepSpeed checkpoint: the topology record and the expert shards.

DeepSpeed 0.19.8 writes a model file that, under ZeRO 0-2, holds only EP rank 0's experts
(../shared/notes/deepspeed-universal-checkpoint.md); on load it copies them onto every rank.
So next to DeepSpeed's files, in the same tag folder, AutoEP writes:

- ``autoep_topology.json`` (global rank 0): the format version, world size, ``autoep_size``,
  ZeRO stage, dtype, and every MoE layer with its preset and expert count. A regular load
  whose topology differs fails before anything is read (the fix: Universal conversion).
- ``autoep_experts_ep<r>.pt`` (ZeRO 0-2; written by EDP rank 0 of EP rank ``r``): the live
  weights of EP rank ``r``'s local experts, ``{parameter name: [E/ep, ...] tensor}``. Under
  ZeRO-3 every rank's ``zero_pp_rank_*`` shard already holds its own expert partitions.

Everything is written to a temporary name and renamed into place, so a file either exists
whole or not at all. This module knows nothing of DeepSpeed's engine; ``autoep.engine`` calls it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Mapping

import torch
from torch import nn

from autoep.api import replaced_layers

FORMAT_VERSION = 1
TOPOLOGY_FILE = "autoep_topology.json"
MODEL_CONFIG_FILE = "autoep_model_config.json"  # the Transformers config, for autoep.save_pretrained


class AutoEPCheckpointError(RuntimeError):
    """A checkpoint AutoEP cannot load here (another topology, a missing or damaged file)."""


def load_file(path: str, weights_only: bool = True):
    """``torch.load`` on CPU, with an error naming the file when it is missing or damaged."""
    if not os.path.isfile(path):
        raise AutoEPCheckpointError(f"{path} is missing: the checkpoint is incomplete")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as error:  # torch raises several types for a truncated or corrupt file
        raise AutoEPCheckpointError(f"{path} cannot be read (truncated or damaged?): {error}") from error


def write_model_config(folder: str, model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is not None:
        _atomic_write(os.path.join(folder, MODEL_CONFIG_FILE), lambda path: _write_text(path, config.to_json_string()))


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)


def expert_file(ep_rank: int) -> str:
    return f"autoep_experts_ep{ep_rank:03d}.pt"


@dataclass(frozen=True)
class Topology:
    world_size: int
    autoep_size: int
    zero_stage: int
    dtype: str
    layers: dict[str, dict]  # layer name -> {"preset", "num_experts"}
    experts: dict[str, int]  # expert parameter name -> number of experts (dim 0 of the full tensor)
    rank_layout: list[list[int]]  # per global rank: [EP rank, EDP rank]
    format_version: int = FORMAT_VERSION

    def describe(self) -> str:
        counts = sorted({layer["num_experts"] for layer in self.layers.values()})
        presets = sorted({layer["preset"] for layer in self.layers.values()})
        return (f"world size {self.world_size}, autoep_size {self.autoep_size}, ZeRO stage {self.zero_stage}, "
                f"{self.dtype}, preset {'/'.join(presets)}, {len(self.layers)} MoE layers of "
                f"{'/'.join(map(str, counts))} experts")

    def mismatch(self, other: "Topology") -> list[str]:
        """The fields a regular (non-Universal) load needs equal, and how they differ."""
        fields = ("world_size", "autoep_size", "zero_stage", "layers", "rank_layout")
        return [f"{field}: {getattr(self, field)!r} vs {getattr(other, field)!r}" for field in fields
                if getattr(self, field) != getattr(other, field)]


def model_topology(model: nn.Module, world_size: int, autoep_size: int, zero_stage: int, dtype: torch.dtype,
                   rank_layout: list[list[int]]) -> Topology:
    layers = {name: {"preset": layer.spec.preset, "num_experts": layer.num_experts}
              for name, layer in replaced_layers(model)}
    experts = {name: next(layer.num_experts for layer_name, layer in replaced_layers(model)
                          if name.startswith(layer_name + "."))
               for name, _ in _live_expert_parameters(model)}
    return Topology(world_size, autoep_size, zero_stage, str(dtype).replace("torch.", ""), layers, experts,
                    [list(entry) for entry in rank_layout])


def _atomic_write(path: str, write) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_topology(folder: str, topology: Topology) -> None:
    _atomic_write(os.path.join(folder, TOPOLOGY_FILE),
                  lambda path: _write_text(path, json.dumps(asdict(topology), indent=1, sort_keys=True)))


def read_topology(folder: str) -> Topology:
    path = os.path.join(folder, TOPOLOGY_FILE)
    if not os.path.isfile(path):
        raise AutoEPCheckpointError(
            f"{path} is missing: this checkpoint was not saved by an engine from autoep.initialize (or is "
            "incomplete); AutoEP cannot tell which experts each rank saved")
    try:
        with open(path) as handle:
            record = json.load(handle)
        topology = Topology(**record)
    except (ValueError, TypeError) as error:
        raise AutoEPCheckpointError(f"{path} is damaged or of an unknown format: {error}") from error
    if topology.format_version != FORMAT_VERSION:
        raise AutoEPCheckpointError(f"{path}: format_version {topology.format_version}, this autoep reads "
                                    f"{FORMAT_VERSION}")
    return topology


def check_same_topology(folder: str, current: Topology) -> Topology:
    """The saved topology, or an error naming both when a regular load cannot use it."""
    saved = read_topology(folder)
    _check_model(folder, saved, current)
    differences = saved.mismatch(current)
    if differences:
        raise AutoEPCheckpointError(
            f"checkpoint {folder} was saved with {saved.describe()}; this job runs {current.describe()} "
            f"({'; '.join(differences)}). A regular load needs the same topology. To resume on another world "
            f"size or autoep_size, convert it with `autoep to-universal --input_folder {folder} "
            "--output_folder <new tag folder>` and load that with \"checkpoint\": {\"load_universal\": true}")
    return saved


def check_same_model(folder: str, current: Topology) -> None:
    """For a Universal load: world size and autoep_size may change; the MoE layers, their
    presets and expert counts may not."""
    if not os.path.isfile(os.path.join(folder, TOPOLOGY_FILE)):
        return  # a Universal Checkpoint not written by autoep.to_universal: DeepSpeed checks shapes
    _check_model(folder, read_topology(folder), current)


def _check_model(folder: str, saved: Topology, current: Topology) -> None:
    if saved.layers != current.layers or saved.experts != current.experts:
        raise AutoEPCheckpointError(
            f"checkpoint {folder} holds a model with {saved.describe()}; this job's model has {current.describe()}: "
            "a checkpoint of another model, preset or expert count cannot be loaded")


def local_expert_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """{parameter name: this rank's local expert slice}, detached CPU copies."""
    return {name: param.detach().to("cpu", copy=True) for name, param in _live_expert_parameters(model)}


def write_experts(folder: str, ep_rank: int, model: nn.Module) -> None:
    payload = {"format_version": FORMAT_VERSION, "ep_rank": ep_rank, "experts": local_expert_state(model),
               "first_expert": {name: layer.local_expert_ids[0] for name, layer in replaced_layers(model)}}
    _atomic_write(os.path.join(folder, expert_file(ep_rank)), lambda path: torch.save(payload, path))


def read_experts(folder: str, ep_rank: int, model: nn.Module) -> dict[str, torch.Tensor]:
    """EP rank ``ep_rank``'s saved experts, checked against this rank's expert slices."""
    path = os.path.join(folder, expert_file(ep_rank))
    if not os.path.isfile(path):
        raise AutoEPCheckpointError(f"{path} is missing: the experts of EP rank {ep_rank} were not saved "
                                    "(an incomplete or foreign checkpoint)")
    payload = load_file(path)
    saved: Mapping[str, torch.Tensor] = payload.get("experts", {}) if isinstance(payload, dict) else {}
    live = dict(_live_expert_parameters(model))
    if saved.keys() != live.keys():
        raise AutoEPCheckpointError(f"{path} holds experts {sorted(saved)[:4]}..., this model has "
                                    f"{sorted(live)[:4]}...: another model or preset")
    for name, param in live.items():
        if saved[name].shape != param.shape:
            raise AutoEPCheckpointError(f"{path}: {name} has shape {tuple(saved[name].shape)}, this rank's "
                                        f"expert slice has {tuple(param.shape)}")
    return dict(saved)


@torch.no_grad()
def restore_experts(saved: Mapping[str, torch.Tensor], model: nn.Module) -> None:
    """Copy experts read by :func:`read_experts` into this rank's live expert parameters."""
    for name, param in _live_expert_parameters(model):
        param.copy_(saved[name].to(param.device, param.dtype))


def _live_expert_parameters(model: nn.Module):
    for layer_name, layer in replaced_layers(model):
        for name, param in layer.routed_experts().named_parameters():
            yield f"{layer_name}.{layer.spec.experts_attr}.{name}", param
