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

Checkpoint folders come from elsewhere, so reading one is guarded:

- every checkpoint file is unpickled with ``weights_only=True`` and an allow-list of the few
  DeepSpeed classes its files hold (:data:`ALLOWED_GLOBALS`); a file that needs any other
  global is refused, naming the file and the global (:func:`load_file`, :func:`safe_loading`);
- after a save, the topology record lists every file of the tag folder with its size and
  SHA-256 (:func:`record_files`); loads, conversion and export check them first and name the
  file that differs (:func:`check_files`). A record without them still loads, with a warning;
- a tag (or the content of ``latest``) must name a folder inside the checkpoint folder
  (:func:`tag_folder`);
- a temporary left by a killed writer is removed by the next writer of the same output
  (:func:`remove_stale_temporaries`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import shutil
import socket
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Iterable, Mapping

import torch
from torch import nn

from autoep.api import replaced_layers
from autoep.processes import alive

FORMAT_VERSION = 1
TOPOLOGY_FILE = "autoep_topology.json"
MODEL_CONFIG_FILE = "autoep_model_config.json"  # the Transformers config, for autoep.save_pretrained


class AutoEPCheckpointError(RuntimeError):
    """A checkpoint AutoEP cannot load here (another topology, a missing or damaged file)."""


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint whose topology record lists no file checksums (saved before they were
    recorded): it loads, but damage to its files cannot be detected."""


# The globals DeepSpeed 0.19.8's checkpoint files pickle besides tensors and plain containers,
# measured with torch.serialization.get_unsafe_globals_in_checkpoint on checkpoints saved at ZeRO
# 0-3, float32 and bf16, client and config optimizers: the ZeRO stage (an Enum) and the loss
# scaler in every *optim_states.pt file at ZeRO 1-3, a fragment address per parameter in
# param_slice_mappings at ZeRO 1-2; model-states files and AutoEP's files hold none. Under fp16
# the loss scaler is a DynamicLossScaler (read in DeepSpeed's code; fp16 does not run on CPU).
ALLOWED_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
)


def _allowed_classes() -> list:
    import importlib

    classes = []
    for qualified in ALLOWED_GLOBALS:
        module, name = qualified.rsplit(".", 1)
        classes.append(getattr(importlib.import_module(module), name))
    return classes


def _refusal(path: str, names: Iterable[str]) -> AutoEPCheckpointError:
    allowed = ", ".join(name.rsplit(".", 1)[1] for name in ALLOWED_GLOBALS)
    return AutoEPCheckpointError(
        f"{path} needs {', '.join(sorted(set(names)))} to be unpickled; AutoEP loads only tensors, plain "
        f"containers and DeepSpeed's {allowed} from checkpoint files: refused, nothing in it was run (a crafted "
        "or foreign file? load the files the training job saved)")


def unsafe_globals(path: str) -> list[str]:
    """The globals a torch.save file would unpickle beyond torch's safe set and the allow-list,
    read statically from its pickle (nothing is run); an error when the file is not a readable
    torch.save archive (missing, truncated, damaged)."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    try:
        with open(path, "rb") as handle:
            if handle.read(4) != b"PK\x03\x04":  # not a zip archive: torch's legacy format (or junk)
                return []  # load_file's weights-only load is then the check
        found = get_unsafe_globals_in_checkpoint(path)
    except Exception as error:  # zipfile, pickle and torch raise several types
        raise AutoEPCheckpointError(f"{path} cannot be read (truncated or damaged?): {error}") from error
    return sorted(set(found) - set(ALLOWED_GLOBALS))


@contextlib.contextmanager
def safe_loading():
    """While active, every ``torch.load`` in this process (DeepSpeed's included, which pass
    ``weights_only=False``) unpickles with ``weights_only=True`` and :data:`ALLOWED_GLOBALS`
    (torch's documented ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` switch)."""
    import torch.serialization

    key = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        with torch.serialization.safe_globals(_allowed_classes()):
            yield
    finally:
        if before is None:
            del os.environ[key]
        else:
            os.environ[key] = before


def describe_error(error: BaseException) -> str:
    """One line for a verdict shared by every rank: an AutoEP error as it is, any other exception
    with its type (a KeyError of a damaged record, a PermissionError of an unreadable file ...)."""
    if isinstance(error, AutoEPCheckpointError):
        return str(error)
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}"[:2000]


def load_file(path: str):
    """``torch.load`` on CPU with ``weights_only=True`` and the allow-list; an error naming the
    file when it is missing or damaged, and naming the file and the global when it needs any
    other class or function."""
    if not os.path.isfile(path):
        raise AutoEPCheckpointError(f"{path} is missing: the checkpoint is incomplete")
    refused = unsafe_globals(path)
    if refused:
        raise _refusal(path, refused)
    try:
        with safe_loading():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # the weights-only unpickler refused something
        names = re.findall(r"GLOBAL ([\w.]+)", str(error))
        if names:
            raise _refusal(path, names) from None
        raise AutoEPCheckpointError(f"{path} cannot be read safely: {str(error).splitlines()[0]}") from None
    except Exception as error:  # torch raises several types for a truncated or corrupt file
        raise AutoEPCheckpointError(f"{path} cannot be read (truncated or damaged?): {error}") from error


# ---- where a checkpoint's files are --------------------------------------------------------

def refuse_link(folder: str, path: str) -> None:
    """A checkpoint file must resolve inside its folder (a symbolic link to elsewhere is refused, as a
    tag leading out of the checkpoint folder is)."""
    real_folder, real_path = os.path.realpath(folder), os.path.realpath(path)
    if os.path.commonpath([real_folder, real_path]) != real_folder:
        raise AutoEPCheckpointError(
            f"{path} resolves to {real_path}, outside the checkpoint folder {folder} (a symbolic link): refused, "
            "nothing was read")


def tag_folder(base: str, tag, what: str = "tag") -> str:
    """``base/tag``, refused unless it names a folder inside ``base`` (no absolute path, no
    '..', no symbolic link leading out): a tag, or the content of ``latest``, comes with the
    checkpoint folder and must not point a load elsewhere."""
    text = str(tag)
    parts = re.split(r"[\\/]", text)
    if not text.strip() or os.path.isabs(text) or ".." in parts:
        raise AutoEPCheckpointError(
            f"{what} {text!r} must name a folder inside {base} (a relative name without '..', e.g. "
            "global_step100): refused, nothing was loaded")
    folder = os.path.join(base, text)
    real_base, real_folder = os.path.realpath(base), os.path.realpath(folder)
    if os.path.commonpath([real_base, real_folder]) != real_base:
        raise AutoEPCheckpointError(
            f"{what} {text!r} resolves to {real_folder}, outside {base} (through a symbolic link): refused, "
            "nothing was loaded")
    return folder


def read_latest(base: str, name: str = "latest") -> str | None:
    """The tag named by ``base/name`` (None when there is no such file), checked by :func:`tag_folder`."""
    path = os.path.join(base, name)
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as handle:
        raw = handle.read(4097)
    try:
        tag = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise AutoEPCheckpointError(f"{path} is not UTF-8 text (a damaged or crafted file): it must hold a tag "
                                    "name; refused, nothing was loaded") from None
    if len(raw) > 4096 or any(ord(char) < 32 for char in tag):
        raise AutoEPCheckpointError(f"{path} holds {'over 4096 bytes' if len(raw) > 4096 else 'a control character'}"
                                    ": it must hold one tag name; refused, nothing was loaded")
    tag_folder(base, tag, f"{path} names tag")
    return tag


def write_latest(base: str, tag: str, name: str = "latest") -> None:
    _atomic_write(os.path.join(base, name), lambda path: _write_text(path, tag))


def model_files(topology: "Topology") -> list[str]:
    """DeepSpeed's model-states files of a tag folder saved with ``topology``."""
    if topology.zero_stage == 3:
        return [f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt" for rank in range(topology.world_size)]
    return ["mp_rank_00_model_states.pt"]


def optimizer_file(topology: "Topology", rank: int) -> str:
    """DeepSpeed's ZeRO 1-3 optimizer shard of global rank ``rank`` (bf16 runs prefix ``bf16_``)."""
    prefix = "bf16_" if topology.dtype == "bfloat16" else ""
    return f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def expected_files(topology: "Topology") -> list[str]:
    """The files every tag folder saved with ``topology`` holds (DeepSpeed's and AutoEP's)."""
    names = model_files(topology)
    if topology.zero_stage >= 1:
        names += [optimizer_file(topology, rank) for rank in range(topology.world_size)]
    if topology.zero_stage < 3:
        names += [expert_file(ep) for ep in sorted({ep for ep, _ in topology.rank_layout})]
    return names


# ---- file checksums --------------------------------------------------------------------------

def file_digest(path: str) -> dict:
    """{"size": bytes, "sha256": hex digest} of one file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"size": os.path.getsize(path), "sha256": digest.hexdigest()}


def folder_files(folder: str) -> list[str]:
    """Every regular file under ``folder`` (relative, '/'-separated, sorted), except the
    topology record itself and writers' temporaries."""
    names = []
    for root, _, files in os.walk(folder):
        for name in files:
            relative = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if relative != TOPOLOGY_FILE and _TEMPORARY.search(name) is None:
                names.append(relative)
    return sorted(names)


def record_files(folder: str, names: Iterable[str]) -> dict[str, dict]:
    """{relative name: :func:`file_digest`} for ``names`` in ``folder``."""
    return {name: file_digest(os.path.join(folder, name)) for name in names}


def check_files(folder: str, topology: "Topology | None", names: Iterable[str], rank: int = 0,
                world: int = 1) -> list[str]:
    """What is wrong with the files ``names`` of ``folder`` (an empty list when nothing), for
    this rank's share: every rank checks that each file exists and has the recorded size; rank
    ``rank`` of ``world`` also checks every ``world``-th file's SHA-256 against the record and
    that it is a readable torch archive needing no global beyond the allow-list. Without a
    recorded checksum (an older record) a warning says the files cannot be verified."""
    recorded = topology.files if topology is not None else None
    if recorded is None:
        warnings.warn(f"{folder}: the checkpoint records no file checksums (saved by an older autoep or not by "
                      "autoep); damage to its files cannot be detected", UnverifiedCheckpointWarning, stacklevel=2)
        recorded = {}
    problems = []
    for index, name in enumerate(sorted(set(names))):
        path = os.path.join(folder, name)
        try:
            refuse_link(folder, path)
        except AutoEPCheckpointError as error:
            problems.append(str(error))
            continue
        if not os.path.isfile(path):
            problems.append(f"{path} is missing (an incomplete checkpoint)")
            continue
        record = recorded.get(name)
        if record is not None and os.path.getsize(path) != record["size"]:
            problems.append(f"{path} is {os.path.getsize(path)} bytes, the checkpoint recorded {record['size']} "
                            "(truncated or overwritten)")
            continue
        if index % world != rank:
            continue
        if record is not None and file_digest(path)["sha256"] != record["sha256"]:
            problems.append(f"{path} differs from the checkpoint's recorded SHA-256 (corrupted or modified "
                            "after the save)")
            continue
        if name.endswith(".pt"):
            try:
                refused = unsafe_globals(path)
            except AutoEPCheckpointError as error:
                problems.append(str(error))
                continue
            if refused:
                problems.append(str(_refusal(path, refused)))
    return problems


def verify_files(folder: str, topology: "Topology", names: Iterable[str]) -> None:
    """:func:`check_files` for a single process (the offline tools): an error naming every file
    that differs."""
    problems = check_files(folder, topology, names)
    if problems:
        raise AutoEPCheckpointError(f"checkpoint {folder} failed verification: {'; '.join(problems)}")


# ---- temporaries -----------------------------------------------------------------------------

_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
# "<final>.tmp-<pid>" (older writers) or "<final>.tmp-<host>-<pid>".
_TEMPORARY = re.compile(r"\.tmp-(?:(?P<host>[A-Za-z0-9_.]+)-)?(?P<pid>\d+)$")


def temporary_path(final: str) -> str:
    """Where this process writes ``final`` before renaming it into place."""
    return f"{final}.tmp-{_HOST}-{os.getpid()}"


def remove_stale_temporaries(final: str) -> list[str]:
    """Remove the temporaries of ``final`` left by writers on this host that are no longer
    running (killed mid-write); a running writer's, and another host's, are left alone.
    Returns the paths removed."""
    parent, base = os.path.split(os.path.abspath(final))
    removed = []
    if not os.path.isdir(parent):
        return removed
    for entry in os.listdir(parent):
        if not entry.startswith(base + ".tmp-"):
            continue
        match = _TEMPORARY.fullmatch(entry[len(base):])
        if match is None or match["host"] not in (None, _HOST) or alive(int(match["pid"])):
            continue
        path = os.path.join(parent, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        removed.append(path)
    return removed


def write_model_config(folder: str, model: nn.Module) -> None:
    """The model's Transformers config, for ``autoep export-hf``; a model whose ``config`` is not a
    Transformers config (a model built from plain modules) has none to record."""
    config = getattr(model, "config", None)
    if config is not None and callable(getattr(config, "to_json_string", None)):
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
    # relative file name -> {"size", "sha256"}: every file of the tag folder, recorded after the
    # save (None: not recorded, e.g. a record written before the files)
    files: dict[str, dict] | None = None
    # "incomplete" from before the save's first file until every rank's files are written and
    # checksummed, then "complete" (a record written before this field existed counts as complete)
    state: str = "complete"

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
    remove_stale_temporaries(path)
    temporary = temporary_path(path)
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_topology(folder: str, topology: Topology) -> None:
    _atomic_write(os.path.join(folder, TOPOLOGY_FILE),
                  lambda path: _write_text(path, json.dumps(asdict(topology), indent=1, sort_keys=True)))


# Bounds on what a record may claim (a crafted record must not make a tool do unbounded work): more
# ranks than this is no AutoEP job, and no model has more MoE layers, experts or files.
MAX_RECORD_WORLD = 1 << 16
MAX_RECORD_ENTRIES = 1 << 20
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def _field_error(path: str, field: str, value, want: str) -> AutoEPCheckpointError:
    from autoep.config import show

    return AutoEPCheckpointError(f"{path}: field {field!r} is {show(value)}, expected {want} (a damaged or crafted "
                                 "record: refused)")


def _check_record(path: str, record) -> None:
    """Every field of a topology record has the type and range AutoEP writes (one error naming the
    field, never a KeyError or TypeError from deeper down)."""
    if not isinstance(record, dict):
        raise AutoEPCheckpointError(f"{path} holds a JSON {type(record).__name__}, not a topology record")

    def integer(field, low, high):
        value = record.get(field)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _field_error(path, field, value, f"an integer from {low} to {high}")
        return value

    world = integer("world_size", 1, MAX_RECORD_WORLD)
    integer("autoep_size", 1, world)
    integer("zero_stage", 0, 3)
    integer("format_version", 0, 1 << 20)
    if record.get("dtype") not in DTYPE_NAMES:
        raise _field_error(path, "dtype", record.get("dtype"), f"one of {', '.join(DTYPE_NAMES)}")
    if record.get("state", "complete") not in ("complete", "incomplete"):
        raise _field_error(path, "state", record.get("state"), "'complete' or 'incomplete'")
    layers = record.get("layers")
    if not isinstance(layers, dict) or len(layers) > MAX_RECORD_ENTRIES or not all(
            isinstance(entry, dict) and isinstance(entry.get("preset"), str) and isinstance(entry.get("num_experts"), int)
            and not isinstance(entry.get("num_experts"), bool) and 1 <= entry["num_experts"] <= MAX_RECORD_ENTRIES
            for entry in layers.values()):
        raise _field_error(path, "layers", layers, "an object of {\"preset\": name, \"num_experts\": integer} per layer")
    experts = record.get("experts")
    if not isinstance(experts, dict) or len(experts) > MAX_RECORD_ENTRIES or not all(
            isinstance(count, int) and not isinstance(count, bool) and 1 <= count <= MAX_RECORD_ENTRIES
            for count in experts.values()):
        raise _field_error(path, "experts", experts, "an object of expert counts per parameter")
    layout = record.get("rank_layout")
    if not isinstance(layout, list) or len(layout) != world or not all(
            isinstance(entry, list) and len(entry) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                  and 0 <= v < world for v in entry)
            for entry in layout):
        raise _field_error(path, "rank_layout", layout, f"a list of {world} [EP rank, EDP rank] pairs")
    files = record.get("files")
    if files is not None and (not isinstance(files, dict) or len(files) > MAX_RECORD_ENTRIES or not all(
            isinstance(name, str) and isinstance(entry, dict) and isinstance(entry.get("size"), int)
            and not isinstance(entry.get("size"), bool) and entry["size"] >= 0 and isinstance(entry.get("sha256"), str)
            and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]) for name, entry in files.items())):
        raise _field_error(path, "files", files, "an object of {\"size\": bytes, \"sha256\": hex digest} per file")
    unknown = sorted(set(record) - {field.name for field in fields(Topology)})
    if unknown:
        raise _field_error(path, unknown[0], record[unknown[0]], "no such field (a record of another format)")


def read_topology(folder: str, allow_incomplete: bool = False) -> Topology:
    """The folder's topology record, every field checked; an incomplete save (a job stopped while
    saving, or re-saving into the tag) is refused unless ``allow_incomplete``."""
    path = os.path.join(folder, TOPOLOGY_FILE)
    if not os.path.isfile(path):
        raise AutoEPCheckpointError(
            f"{path} is missing: this checkpoint was not saved by an engine from autoep.initialize (or is "
            "incomplete); AutoEP cannot tell which experts each rank saved")
    refuse_link(folder, path)
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    except (ValueError, OSError) as error:  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
        raise AutoEPCheckpointError(f"{path} is damaged or of an unknown format: {error}") from error
    _check_record(path, record)
    topology = Topology(**record)
    if topology.format_version != FORMAT_VERSION:
        raise AutoEPCheckpointError(f"{path}: format_version {topology.format_version}, this autoep reads "
                                    f"{FORMAT_VERSION}")
    if topology.state != "complete" and not allow_incomplete:
        raise AutoEPCheckpointError(
            f"checkpoint {folder} is an incomplete save (its record says so from before the first file was written "
            "until every rank's files were written and checksummed: the saving job stopped half-way, or was "
            "re-saving into this tag): refused, nothing was loaded. Load the previous tag (`latest` names the last "
            "complete one) and save again.")
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


def check_same_model(folder: str, current: Topology) -> Topology | None:
    """For a Universal load: world size and autoep_size may change; the MoE layers, their
    presets and expert counts may not. The saved topology, or None when there is none."""
    if not os.path.isfile(os.path.join(folder, TOPOLOGY_FILE)):
        return None  # a Universal Checkpoint not written by autoep.to_universal: DeepSpeed checks shapes
    saved = read_topology(folder)
    _check_model(folder, saved, current)
    return saved


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
        for name, param in layer.expert_named_parameters():
            yield f"{layer_name}.{layer.spec.experts_attr}.{name}", param
