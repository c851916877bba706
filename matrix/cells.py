"""The conformance matrix: axes, validity rules, and the expected outcome of every cell.

A cell is (Transformers version, model case, ZeRO stage, world size, autoep_size, dtype), and
for a checkpoint cell the topology training resumes on (``resume``: ``w<world>-ep<autoep_size>``)
after a save and a Universal conversion; for an interop cell (``interop``: a family of
conformance/interop.py) the feature the subject's model is used with, one process, autoep_size 1.
``expected(cell)`` says what must happen: ``pass``, ``rejected`` (with the error class
that must be raised), ``not_applicable`` (with the reason) or ``not_implemented`` (a
capability that a later issue adds; listed, never silently absent).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import asdict, dataclass

from packaging.version import Version

from autoep.presets import PRESETS
from matrix.models import (CASES_BY_ID, DEFAULT_CASES, EXPERTS_CASES, FAMILY_CASES, PLAIN_CASES,
                                SEED_EXPERTS_CASES, VARIANT_CASES)
from matrix import profiles
from matrix.model_case import _load

# Transformers versions the matrix covers (matrix/profiles.py says why each); a profile runs a
# subset of the cells of a subset of them (``in_profile``).
TRANSFORMERS_VERSIONS = profiles.FULL_VERSIONS
DEFAULT_TRANSFORMERS = profiles.NEWEST
DTYPES = ("float32", "bfloat16")
# (ZeRO stage or "none" for plain PyTorch, world size, autoep_size)
# "none" with world size 1 runs in-process; larger worlds run on rank processes (the
# launcher), one micro-batch per rank, gradients reduced as an engine would.
TOPOLOGIES = (
    ("none", 1, 1), ("none", 2, 2), ("none", 4, 1), ("none", 4, 2), ("none", 4, 4),
    *((stage, 4, ep) for stage in (0, 1, 2, 3) for ep in (1, 2, 4)),
)
# The family cases (matrix/models.py FAMILY_CASES): every case on one process in both dtypes;
# each family's first case (its default) also on plain-PyTorch EP (world 4, autoep_size 2 and 4),
# both dtypes: a family's routing switches do not interact with parallelism, as for VARIANT_CASES.
# Their routing kind goes through ZeRO and checkpoints with the default case of that kind.
FAMILY_EP_TOPOLOGIES = (("none", 4, 2), ("none", 4, 4))


def first_case_per(key, cases, taken=()) -> tuple[str, ...]:
    """Ids of the first case of ``cases`` for each value of ``key(case)`` not in ``taken``, in order."""
    seen, first = set(taken), []
    for case in cases:
        if key(case) not in seen:
            seen.add(key(case))
            first.append(case.id)
    return tuple(first)


FAMILY_DEFAULT_CASES = first_case_per(lambda case: (case.preset, case.model_type), FAMILY_CASES)
# Checkpoint cells: ZeRO stage x (source world, autoep_size) -> (target world, autoep_size),
# float32: 2 steps, save, Universal conversion, 2 steps on the target. The converter does not
# depend on the routing, so Mixtral runs on every Transformers version and the presets with
# shared experts (Qwen2-MoE) and a correction-bias buffer (DeepSeek-V3) on the pinned one.
RESUMES = (((4, 2), (2, 1)), ((2, 2), (4, 4)), ((4, 4), (4, 2)))
CHECKPOINT_STAGES = (1, 2, 3)
CHECKPOINT_CASES = {"mixtral": TRANSFORMERS_VERSIONS, "qwen2_moe": (DEFAULT_TRANSFORMERS,),
                    "deepseek_v3": (DEFAULT_TRANSFORMERS,)}
# Interop cells: every default case x dtype on every version, one process, judged against the
# stock model (torch.compile, parameter order + stock optimizer state, generate, gradient
# checkpointing, save_pretrained -> from_pretrained). Names as in conformance/interop.FAMILIES.
INTEROP_FAMILIES = ("compile", "param_order", "generate", "grad_checkpointing", "hf_roundtrip")


# Cases whose subject call replaces only the experts modules (expert_parallel.replacement='experts'):
# the seed presets in that mode, and every family without a row (matrix/experts_cases.py); and
# the model of plain torch.nn modules, found by structure. Each on one process and on plain-PyTorch EP
# (FAMILY_EP_TOPOLOGIES), both dtypes, from its first Transformers version (an older one is the
# survey's verdict, not a rejection to prove).
EXPERTS_LEVEL_CASES = SEED_EXPERTS_CASES + EXPERTS_CASES
EXPERTS_LEVEL_CASE_IDS = frozenset(case.id for case in EXPERTS_LEVEL_CASES)
PLAIN_CASE_IDS = frozenset(case.id for case in PLAIN_CASES)
# Each flag of Transformers' experts interface (autoep/interface.py) and the case that takes it through
# ZeRO 1-3 and two Universal resumes (tests/test_experts_level.py checks each carries its flag).
FLAG_REPRESENTATIVES = {
    "default gate (act_fn(gate) * up)": "mixtral@experts",
    "transposed": "aria",
    "interleaved gate/up": "gpt_oss",
    "biased": "gpt_oss",
    "own _apply_gate": "gpt_oss",
    "gateless": "nemotron_h",
    "post-expert norm": "muse_spark",
}
EXPERTS_ZERO_CASES = tuple(dict.fromkeys(FLAG_REPRESENTATIVES.values())) + tuple(case.id for case in PLAIN_CASES)
EXPERTS_RESUMES = (((4, 2), (2, 1)), ((2, 2), (4, 4)))
# The experts-level cases taken through the interop families (compile, parameter order, generate,
# gradient checkpointing, save_pretrained round trip): the default gate and the flag-heaviest one.
EXPERTS_INTEROP_CASES = ("mixtral@experts", "gpt_oss")
# Fault cells (conformance/faults.py): a save that one rank does not survive, then a load on every
# rank: it must be refused on every rank, or restore the last complete save exactly; never a mix of
# two saves, never a hang. At world 2, autoep_size 2, float32, on the newest version.
FAULTS = ("killed-resave",)
FAULT_CELLS = (("mixtral", 0), ("mixtral", 1), ("mixtral", 2), ("mixtral", 3), ("deepseek_v3", 2),
               ("deepseek_v3", 3), ("mixtral@experts", 2))


@dataclass(frozen=True)
class Cell:
    transformers: str
    case: str
    zero_stage: str | int
    world_size: int
    autoep_size: int
    dtype: str
    resume: str | None = None  # checkpoint cells: "w<world>-ep<autoep_size>" resumed on
    interop: str | None = None  # interop cells: the family (INTEROP_FAMILIES)
    build: str | None = None  # "zero-init": the model is built partitioned under deepspeed.zero.Init (ZeRO-3)
    fault: str | None = None  # fault cells: the fault injected (FAULTS), then a load on every rank

    @property
    def id(self) -> str:
        resume = f"->{self.resume}" if self.resume else ""
        interop = f"/interop-{self.interop}" if self.interop else ""
        build = f"/{self.build}" if self.build else ""
        fault = f"/fault-{self.fault}" if self.fault else ""
        return (f"tf{self.transformers}/{self.case}/zero-{self.zero_stage}/w{self.world_size}"
                f"-ep{self.autoep_size}{resume}{interop}{build}{fault}/{self.dtype}")

    @property
    def topology(self) -> str:
        if self.interop:
            return f"interop {self.interop}"
        if self.fault:
            return f"zero-{self.zero_stage} w{self.world_size} ep{self.autoep_size} fault {self.fault}"
        resume = f" -> {self.resume.replace('-', ' ')} (checkpoint)" if self.resume else ""
        build = f" ({self.build})" if self.build else ""
        return f"zero-{self.zero_stage} w{self.world_size} ep{self.autoep_size}{resume}{build}"

    @property
    def resume_topology(self) -> tuple[int, int] | None:
        if self.resume is None:
            return None
        world, ep = self.resume.removeprefix("w").split("-ep")
        return int(world), int(ep)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Expectation:
    outcome: str  # "pass" | "rejected" | "not_applicable" | "not_implemented"
    reason: str = ""
    error: str | None = None  # the exception class name a rejection must raise


def cells() -> list[Cell]:
    """Every cell: default cases on every topology and dtype; routing variants on the
    one-process topology (their routing does not interact with parallelism); the interop
    families for every default case and dtype."""
    result = []
    for version in TRANSFORMERS_VERSIONS:
        for case in DEFAULT_CASES:
            for stage, world, ep in TOPOLOGIES:
                for dtype in DTYPES:
                    result.append(Cell(version, case.id, stage, world, ep, dtype))
        for case in VARIANT_CASES:
            for dtype in DTYPES:
                result.append(Cell(version, case.id, "none", 1, 1, dtype))
        for case in FAMILY_CASES:
            topologies = (("none", 1, 1),) + (FAMILY_EP_TOPOLOGIES if case.id in FAMILY_DEFAULT_CASES else ())
            for stage, world, ep in topologies:
                for dtype in DTYPES:
                    result.append(Cell(version, case.id, stage, world, ep, dtype))
        if version == DEFAULT_TRANSFORMERS:  # each routing kind only families have, through the engine
            for case_id in KIND_REPRESENTATIVES:
                for stage in CHECKPOINT_STAGES:
                    result.append(Cell(version, case_id, stage, 4, 2, "float32"))
                result.append(Cell(version, case_id, 2, 4, 2, "float32", "w2-ep1"))
        for case_id, versions in CHECKPOINT_CASES.items():
            if version in versions:
                for stage in CHECKPOINT_STAGES:
                    for (world, ep), (target_world, target_ep) in RESUMES:
                        result.append(Cell(version, case_id, stage, world, ep, "float32",
                                           f"w{target_world}-ep{target_ep}"))
        for case in DEFAULT_CASES:
            for family in INTEROP_FAMILIES:
                for dtype in DTYPES:
                    result.append(Cell(version, case.id, "none", 1, 1, dtype, interop=family))
        result += _experts_level_cells(version)
        if version == DEFAULT_TRANSFORMERS:
            result += _zero_init_cells(version)
            result += [Cell(version, case_id, stage, 2, 2, "float32", fault=fault)
                       for fault in FAULTS for case_id, stage in FAULT_CELLS]
    return result


# Models built partitioned under deepspeed.zero.Init (ZeRO-3): a seed preset and a family-table row
# (DeepSeek-V3 routing, shared experts) at w4 ep2 and ep4 in both dtypes, and a Universal resume.
ZERO_INIT_CASES = ("mixtral", "glm4_moe")
ZERO_INIT = "zero-init"


def _zero_init_cells(version: str) -> list[Cell]:
    result = [Cell(version, case_id, 3, 4, ep, dtype, build=ZERO_INIT) for case_id in ZERO_INIT_CASES
              for ep in (2, 4) for dtype in DTYPES]
    return result + [Cell(version, "mixtral", 3, 2, 2, "float32", "w4-ep4", build=ZERO_INIT),
                     Cell(version, "mixtral", 3, 4, 2, "float32", "w2-ep1", build=ZERO_INIT)]


def _experts_level_cells(version: str) -> list[Cell]:
    result = []
    for case in EXPERTS_LEVEL_CASES + PLAIN_CASES:
        if Version(version) < Version(case.min_transformers):
            continue
        if case.refused_with is not None:  # refused in every mode: one cell proves the refusal
            result.append(Cell(version, case.id, "none", 1, 1, "float32"))
            continue
        for stage, world, ep in (("none", 1, 1),) + FAMILY_EP_TOPOLOGIES:
            for dtype in DTYPES:
                result.append(Cell(version, case.id, stage, world, ep, dtype))
        if version != DEFAULT_TRANSFORMERS:
            continue
        if case.id in EXPERTS_ZERO_CASES:
            for stage in (0,) + CHECKPOINT_STAGES if case.id == "mixtral@experts" else CHECKPOINT_STAGES:
                result.append(Cell(version, case.id, stage, 4, 2, "float32"))
            for stage, ((world, ep), (target_world, target_ep)) in zip((2, 3), EXPERTS_RESUMES):
                result.append(Cell(version, case.id, stage, world, ep, "float32", f"w{target_world}-ep{target_ep}"))
        if case.id in EXPERTS_INTEROP_CASES:
            for family in INTEROP_FAMILIES:
                for dtype in DTYPES:
                    result.append(Cell(version, case.id, "none", 1, 1, dtype, interop=family))
    return result


def expected(cell: Cell) -> Expectation:
    case = CASES_BY_ID[cell.case]
    version = Version(cell.transformers)
    if case.refused_with is not None:
        return Expectation("rejected", f"{case.id} is refused in every mode (autoep/presets/table.py)",
                           case.refused_with)
    if cell.world_size % cell.autoep_size:
        return Expectation("not_applicable", f"autoep_size {cell.autoep_size} does not divide world size "
                                             f"{cell.world_size} (a rejection case of its own)")
    if version.major < 5:
        return Expectation("rejected", "Transformers 4.x stores experts as a ModuleList; presets need >= 5.0",
                           "UnsupportedTransformersError")
    if version < Version(case.min_transformers):
        return Expectation("rejected", f"{case.preset} needs transformers>={case.min_transformers}",
                           "UnsupportedTransformersError")
    return Expectation("pass")


def default_matrix(transformers: str) -> list[Cell]:
    return [cell for cell in cells() if cell.transformers == transformers]


# ---------------------------------------------------------------------------------------------
# Profiles (matrix/profiles.py names them and their versions): which cells each runs.
# Every profile keeps the cells that kill every mutant of mutants/bank.py (tests/test_mutants.py
# checks that each mutant has an active cell in each profile; `nox -s mutants -- --profile P`
# measures the kills).

def _one_process(cell: Cell) -> bool:
    return cell.zero_stage == "none" and cell.world_size == 1 and cell.resume is None and cell.interop is None \
        and cell.fault is None


def _is(cell: Cell, stage, world: int, ep: int, resume: str | None = None, build: str | None = None,
        fault: str | None = None) -> bool:
    return (cell.zero_stage, cell.world_size, cell.autoep_size, cell.resume, cell.build, cell.fault) == (
        stage, world, ep, resume, build, fault) and cell.interop is None


def _experts_level(cell: Cell) -> bool:
    return cell.case in EXPERTS_LEVEL_CASE_IDS or cell.case in PLAIN_CASE_IDS


def _experts_level_default(cell: Cell) -> bool:
    """Experts-level and plain-module cells in the default profile: every case on one process in float32
    (the seed presets' and the flag representatives' in bf16 too); each flag representative on EP
    (w4 ep2) and under ZeRO-2, Mixtral@experts and GPT-OSS (the flag-heaviest) through a Universal
    resume, and their parameter order and save_pretrained round trip."""
    if _one_process(cell):
        return cell.dtype == "float32" or cell.case in EXPERTS_ZERO_CASES or cell.case.endswith("@experts")
    if cell.case not in EXPERTS_ZERO_CASES or cell.dtype != "float32":
        return False
    if cell.interop is not None:
        return cell.interop in ("param_order", "hf_roundtrip")
    if cell.resume is not None:
        return cell.case in EXPERTS_INTEROP_CASES and _is(cell, 2, 4, 2, "w2-ep1")
    return _is(cell, "none", 4, 2) or _is(cell, 2, 4, 2)


def _smoke(cell: Cell) -> bool:
    """One process in float32 for every case (each routing switch), and Mixtral on the topologies
    where the parallel bugs live: EP forward/backward, EDP and replica reductions under ZeRO-0,
    ZeRO-3 partitioning, and a ZeRO-1 and a ZeRO-3 Universal resume; ZeRO-0 bf16 under EP. Of the
    table's families beyond the seed's presets: each family's default case (variants in full); every
    experts-level and plain-module case on one process in float32. One fault cell: Mixtral's killed
    re-save under ZeRO-2."""
    if cell.fault is not None:
        return cell.case == "mixtral" and cell.zero_stage == 2
    if _experts_level(cell):
        return _one_process(cell) and cell.dtype == "float32"
    if cell.build == ZERO_INIT:
        return cell.case == "mixtral" and cell.dtype == "float32" and _is(cell, 3, 4, 2, build=ZERO_INIT)
    if cell.case in FAMILY_CASE_IDS and cell.case not in FAMILY_DEFAULT_CASES:
        return False
    if cell.dtype != "float32":
        return _smoke_bf16(cell)
    if _one_process(cell):
        return True
    if cell.case != "mixtral":
        return False
    return (_is(cell, "none", 2, 2) or _is(cell, 0, 4, 1) or _is(cell, 0, 4, 2) or _is(cell, 3, 4, 1)
            or _is(cell, 1, 2, 2, "w4-ep4") or _is(cell, 3, 2, 2, "w4-ep4")
            or cell.interop == "param_order")


def _smoke_bf16(cell: Cell) -> bool:
    """bf16 where its own bug lives: ZeRO-0's low-precision optimizer clipping under EP."""
    return cell.case == "mixtral" and cell.dtype == "bfloat16" and _is(cell, 0, 4, 2)


def _version_sensitive(cell: Cell) -> bool:
    """What a Transformers minor can change, run on every version of the full profile: the
    blocks' numerics in both dtypes, the interop with Transformers' features (compile on
    Mixtral), the engine's view of every family (ZeRO-2), a Universal resume. A family of the table
    beyond the seed's presets: its default case on one process in float32 (its variants and bf16 on
    the newest only: the dtype paths are the layer's, not the Transformers minor's). Experts-level
    cases: on one process in float32. The fault cells run on the newest only (what they prove is the
    subject's save and load, not a Transformers minor's)."""
    if cell.fault is not None:
        return False
    if _experts_level(cell):
        return _one_process(cell) and cell.dtype == "float32"
    if cell.case in FAMILY_CASE_IDS:
        return cell.case in FAMILY_DEFAULT_CASES and _one_process(cell) and cell.dtype == "float32"
    if _smoke(cell) or _one_process(cell):
        return True
    if cell.interop is not None:
        return cell.dtype == "float32" and (cell.interop != "compile" or cell.case == "mixtral")
    return cell.dtype == "float32" and (_is(cell, 2, 4, 2) or (cell.case == "mixtral" and _is(cell, 2, 4, 2, "w2-ep1")))


# The cases the default profile takes through the ZeRO stages: Mixtral (the plain softmax top-k
# family) and DeepSeek-V3 (sigmoid scores, correction bias, shared experts; the peer's
# documented-right case).
DEEP_CASES = ("mixtral", "deepseek_v3")
# The Universal resumes of a peer in the default profile (stage, source world, autoep_size, target):
# DeepSeek-V3's two documented-right ones (DeepSpeed: ZeRO-2 w4-ep2 -> w2-ep1, ZeRO-1 w2-ep2 -> w4-ep4).
PEER_RESUMES = ((2, 4, 2, "w2-ep1"), (1, 2, 2, "w4-ep4"))


def routing_kind(case_id: str) -> str:
    """The routing kind of a case's family row (autoep.presets.base.Routing.kind); an experts-level case
    routes with the model's own router ("experts-level")."""
    if case_id in EXPERTS_LEVEL_CASE_IDS:
        return "experts-level"
    return PRESETS[CASES_BY_ID[case_id].preset].routing.kind


# The family case that represents each routing kind no default case has: on plain-PyTorch EP in
# the default profile (every family's one-process cells run in every profile), and in the full
# profile also under ZeRO 1-3 (w4 ep2) and through a Universal resume (ZeRO-2 w4 ep2 -> w2 ep1).
KIND_REPRESENTATIVES = first_case_per(lambda case: routing_kind(case.id), FAMILY_CASES,
                                      {routing_kind(case.id) for case in DEFAULT_CASES})
FAMILY_CASE_IDS = frozenset(case.id for case in FAMILY_CASES)


def _default(cell: Cell) -> bool:
    """The newest version in depth, sized to the README's 12 minutes (measured here: 11 min 43 s,
    installs included): every case in both dtypes on one process and on EP topologies, Mixtral
    and DeepSeek-V3 through every ZeRO stage x autoep_size and every Universal resume, every
    other family under ZeRO-1/2/3 and in one resume, bf16 under ZeRO, every interop family. Of the
    table's families beyond the seed's presets: each family's default case on one process in both
    dtypes, and the representative of each routing kind no seed preset has on EP (w4 ep2). Experts-level
    cases: :func:`_experts_level_default`. Fault cells: a killed re-save of Mixtral (ZeRO-2, ZeRO-3),
    DeepSeek-V3 (ZeRO-2) and Mixtral at the experts level (ZeRO-2)."""
    if cell.fault is not None:
        return cell.zero_stage in (2, 3) and (cell.case == "mixtral" or cell.zero_stage == 2)
    if _experts_level(cell):
        return _experts_level_default(cell)
    if cell.build == ZERO_INIT:  # fp32 at ep 2 for both cases, the seed preset's bf16, and one resume
        return (cell.resume is None and cell.autoep_size == 2 and (cell.dtype == "float32" or cell.case == "mixtral")) \
            or _is(cell, 3, 2, 2, "w4-ep4", build=ZERO_INIT)
    if cell.case in FAMILY_CASE_IDS:
        if cell.case not in FAMILY_DEFAULT_CASES:
            return False
        return _one_process(cell) or (cell.case in KIND_REPRESENTATIVES and cell.dtype == "float32"
                                      and _is(cell, "none", 4, 2))
    if _smoke(cell) or _one_process(cell):
        return True
    if cell.interop is not None:
        if cell.interop == "compile":  # 6-30 s each: Mixtral in both dtypes (every family in full)
            return cell.case == "mixtral"
        return cell.dtype == "float32" or cell.case == "mixtral"
    if cell.resume is not None:
        return cell.case in DEEP_CASES or _is(cell, 2, 4, 2, "w2-ep1")
    if cell.zero_stage == "none":
        if cell.dtype != "float32":
            return cell.case in DEEP_CASES and _is(cell, "none", 4, 2)
        return cell.case == "mixtral" or _is(cell, "none", 2, 2) or _is(cell, "none", 4, 4)
    if cell.dtype != "float32":
        return _is(cell, 2, 4, 2) or (cell.case in DEEP_CASES and (_is(cell, 1, 4, 2) or _is(cell, 3, 4, 4)))
    if cell.case in DEEP_CASES:
        return True
    return _is(cell, 1, 4, 2) or _is(cell, 2, 4, 2) or _is(cell, 3, 4, 4)


def _peer_default(cell: Cell) -> bool:
    """A peer in the default profile: our selection off DeepSpeed (one process, plain-PyTorch EP,
    interop: for a peer that runs without DeepSpeed), and under DeepSpeed where its documentation
    says it is right (DeepSeek-V3 through every ZeRO stage x autoep_size and the two Universal
    resumes) plus each class of finding once per family (ZeRO-2, a ZeRO-3 resume). A peer's
    ``unavailable_reason`` turns the cells it cannot run into skipped records with the reason. Fault
    cells: in full."""
    if cell.fault is not None:
        return False
    if cell.zero_stage == "none" or cell.case in FAMILY_CASE_IDS or _experts_level(cell):  # (ZeRO in full)
        return _default(cell)
    if cell.dtype != "float32":
        return False
    if cell.resume is not None:
        return (cell.case == "deepseek_v3" and any(_is(cell, *r) for r in PEER_RESUMES)) \
            or (cell.case == "mixtral" and _is(cell, 3, 2, 2, "w4-ep4"))
    return cell.case == "deepseek_v3" or _is(cell, 2, 4, 2)


def in_profile(cell: Cell, profile: str, peer: bool = False) -> bool:
    """Whether ``profile`` runs ``cell`` for ``autoep`` (and its mutants), or for a peer."""
    if cell.transformers not in profiles.versions(profile):
        return False
    if Version(cell.transformers).major < 5:  # a rejection does not depend on the topology
        return _one_process(cell) and (cell.case not in FAMILY_CASE_IDS or cell.case in FAMILY_DEFAULT_CASES)
    if profile == "smoke":
        return _smoke(cell)
    if profile == "default":
        return _peer_default(cell) if peer else _default(cell)
    if peer and cell.zero_stage == "none":
        # A peer off DeepSpeed (transformers_ep, torchtitan) is judged on the default selection of those
        # cells on the newest and on the version-sensitive ones elsewhere: every family variant at four
        # ranks would add about 20 minutes to the full profile (measured for transformers_ep: 664 cells).
        return _peer_default(cell) if cell.transformers == profiles.NEWEST else _version_sensitive(cell)
    if cell.transformers == profiles.NEWEST:  # full
        return True
    return _version_sensitive(cell)


def profile_matrix(transformers: str, profile: str, peer: bool = False) -> list[Cell]:
    """The cells ``profile`` runs on ``transformers`` (for a peer if ``peer``), in matrix order. A
    Transformers version the matrix does not list (:func:`in_matrix`) runs too: :func:`unlisted_matrix`."""
    if not in_matrix(transformers):
        return unlisted_matrix(transformers, profile, peer)
    return [cell for cell in default_matrix(transformers) if in_profile(cell, profile, peer)]


def in_matrix(transformers: str) -> bool:
    return transformers in TRANSFORMERS_VERSIONS


@functools.lru_cache(maxsize=None)
def case_available(case_id: str) -> bool:
    """Whether the installed Transformers has the classes a case builds (its config and model class)."""
    case = CASES_BY_ID[case_id]
    try:
        _load(case.config_class), _load(case.causal_lm_class)
    except (ImportError, AttributeError):
        return False
    return True


def unlisted_matrix(transformers: str, profile: str, peer: bool = False) -> list[Cell]:
    """The cells of ``profile`` on a Transformers the matrix does not list: a 5.x runs the cells the
    profile gives the newest pinned version, for every case whose classes the installed build has (a
    newer build: all of them; an older one: the families it has), each expected as the family table's
    version bounds say (:func:`expected` reads the case's first version); the experts-level cases from
    the first version their tiny configs were verified on. A 4.x runs the last 4.x's cells."""
    version = Version(transformers)
    listed = profiles.LAST_4X if version.major < 5 else DEFAULT_TRANSFORMERS
    chosen = []
    for cell in default_matrix(listed):
        if not in_profile(cell, profile, peer) or not case_available(cell.case):
            continue
        case = CASES_BY_ID[cell.case]
        if (cell.case in EXPERTS_LEVEL_CASE_IDS or cell.case in PLAIN_CASE_IDS) and \
                version < Version(case.min_transformers):
            continue
        chosen.append(dataclasses.replace(cell, transformers=transformers))
    return chosen


def relative_cost(cell: Cell) -> float:
    """Rough cost of a cell in seconds on this 2-core machine, warm (measured per kind: one
    process 0.3-5 s, a 4-rank ZeRO cell 3-10 s, a Universal resume 6-8 s, a compile 10-30 s);
    for the time-left estimate and cheapest-first orders."""
    bf16 = cell.dtype == "bfloat16"
    if cell.fault is not None:  # two launches (train, save, the killed re-save; the loads)
        return 12.0
    if cell.interop is not None:
        return (12.0 if bf16 else 20.0) if cell.interop == "compile" else 1.0
    if cell.resume is not None:
        return 8.0
    if cell.zero_stage != "none":
        return (2.0 + cell.world_size) * (1.5 if bf16 else 1.0)
    return 1.5 if cell.world_size == 1 else 1.0 + cell.world_size
