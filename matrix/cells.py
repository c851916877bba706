"""The conformance matrix: axes, validity rules, and the expected outcome of every cell.

A cell is (Transformers version, model case, ZeRO stage, world size, autoep_size, dtype).
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


@dataclass(frozen=True)
class Cell:
    transformers: str
    case: str
    zero_stage: str | int
    world_size: int
    autoep_size: int
    dtype: str

    @property
    def id(self) -> str:
        return (f"tf{self.transformers}/{self.case}/zero-{self.zero_stage}/w{self.world_size}"
                f"-ep{self.autoep_size}/{self.dtype}")

    @property
    def topology(self) -> str:
        return f"zero-{self.zero_stage} w{self.world_size} ep{self.autoep_size}"

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Expectation:
    outcome: str  # "pass" | "rejected" | "not_applicable" | "not_implemented"
    reason: str = ""
    error: str | None = None  # the exception class name a rejection must raise


def cells() -> list[Cell]:
    """Every cell: default cases on every topology and dtype; routing variants on the
    one-process topology (their routing does not interact with parallelism)."""
    result = []
    for version in TRANSFORMERS_VERSIONS:
        for case in DEFAULT_CASES:
            for stage, world, ep in TOPOLOGIES:
                for dtype in DTYPES:
                    result.append(Cell(version, case.id, stage, world, ep, dtype))
        for case in VARIANT_CASES:
            for dtype in DTYPES:
                result.append(Cell(version, case.id, "none", 1, 1, dtype))
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
