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

from dataclasses import asdict, dataclass

from packaging.version import Version

from conformance.models import CASES_BY_ID, DEFAULT_CASES, VARIANT_CASES

# Transformers versions the matrix covers: the first 5.x, the first with Qwen3.5-MoE, the
# newest 5.x that installs (pinned), and the last 4.x (must be rejected clearly).
TRANSFORMERS_VERSIONS = ("5.0.0", "5.2.0", "5.24.0", "4.57.6")
DEFAULT_TRANSFORMERS = "5.24.0"
DTYPES = ("float32", "bfloat16")
# (ZeRO stage or "none" for plain PyTorch, world size, autoep_size)
# "none" with world size 1 runs in-process; larger worlds run on rank processes (the
# launcher), one micro-batch per rank, gradients reduced as an engine would.
TOPOLOGIES = (
    ("none", 1, 1), ("none", 2, 2), ("none", 4, 1), ("none", 4, 2), ("none", 4, 4),
    *((stage, 4, ep) for stage in (0, 1, 2, 3) for ep in (1, 2, 4)),
)
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

    @property
    def id(self) -> str:
        resume = f"->{self.resume}" if self.resume else ""
        interop = f"/interop-{self.interop}" if self.interop else ""
        return (f"tf{self.transformers}/{self.case}/zero-{self.zero_stage}/w{self.world_size}"
                f"-ep{self.autoep_size}{resume}{interop}/{self.dtype}")

    @property
    def topology(self) -> str:
        if self.interop:
            return f"interop {self.interop}"
        resume = f" -> {self.resume.replace('-', ' ')} (checkpoint)" if self.resume else ""
        return f"zero-{self.zero_stage} w{self.world_size} ep{self.autoep_size}{resume}"

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
    return result


def expected(cell: Cell) -> Expectation:
    case = CASES_BY_ID[cell.case]
    version = Version(cell.transformers)
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
