"""Matrix profiles: which Transformers versions a profile installs. Dependency-free (the
noxfile imports it before anything is installed); which cells each profile runs on a version
is ``matrix.cells.in_profile``.

    smoke    CI-sized: the newest version, the cells that kill every mutant of mutants/bank.py
    default  the README's main job: the newest version in depth, 4.57.6's rejections
    full     every Transformers 5.x minor that changed MoE code, each with the version-sensitive
             cells, and the newest with every cell
"""

from __future__ import annotations

NEWEST = "5.25.0"  # the newest 5.x that installs (pinned)
LAST_4X = "4.57.6"  # the last 4.x: every cell must end in the documented rejection
# 5.0.0: first 5.x (fused experts); 5.2.0: first with Qwen3.5-MoE; 5.16.1, 5.20.2, 5.22.2: the
# last patch of minors that changed MoE code (experts implementations, router outputs); 5.23.0:
# the output-recorder registry signature (DeepSpeed finding DS-1); 5.24.0: the newest before 5.25 (its
# families' experts classes and the 5.25 ones differ: LongCat-Flash, Step-3.7, Bailing-hybrid's gate).
FULL_VERSIONS = (NEWEST, "5.24.0", "5.23.0", "5.22.2", "5.20.2", "5.16.1", "5.2.0", "5.0.0", LAST_4X)
PROFILE_VERSIONS = {
    "smoke": (NEWEST,),
    "default": (NEWEST, LAST_4X),
    "full": FULL_VERSIONS,
}
PROFILES = tuple(PROFILE_VERSIONS)
DEFAULT_PROFILE = "default"


def versions(profile: str) -> tuple[str, ...]:
    """The Transformers versions ``profile`` runs; a clear error for an unknown name."""
    if profile not in PROFILE_VERSIONS:
        raise ValueError(f"unknown matrix profile {profile!r}; choose one of {', '.join(PROFILES)}")
    return PROFILE_VERSIONS[profile]
