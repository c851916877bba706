"""The verification harness, installed: ``pip install "autoep[conformance]"`` ships the suite
(``conformance``), its matrix (``matrix``), the reference MoE (``reference``) and the mutant bank
(``mutants``) inside this package's folder, not as top-level packages of site-packages (those generic
names would shadow a user's own). The commands put that folder on ``sys.path`` first, then run the
suite as from a checkout; rank processes inherit the path (autoep.launch passes ``sys.path`` on).

    autoep-conformance run --profile smoke [--subject yourpkg.module:YourSubject]
    autoep-conformance report --profile smoke
    autoep-mutants [--mutant ID] [--profile P]
    python -m autoep_harness conformance|mutants ...      (the same)

From a checkout (or an editable install) the folder is the checkout itself.
"""

from __future__ import annotations

import os
import sys

HARNESS_PACKAGES = ("conformance", "matrix", "reference", "mutants")


def harness_root() -> str:
    """The folder holding the harness packages: the installed copy beside this file, else the
    checkout this package sits in (an editable install, or running from a clone)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(here, "tree"), os.path.dirname(here)):
        if all(os.path.isfile(os.path.join(candidate, name, "__init__.py")) for name in HARNESS_PACKAGES):
            return candidate
    raise ImportError(f"the harness packages {', '.join(HARNESS_PACKAGES)} are neither installed beside {here} "
                      "nor in the checkout above it: reinstall with pip install \"autoep[conformance]\"")


def use_harness() -> str:
    """Put the harness folder first on ``sys.path`` (and in PYTHONPATH, for processes started later)."""
    root = harness_root()
    if root not in sys.path:
        sys.path.insert(0, root)
    paths = [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)
    return root


def conformance_main(argv=None) -> int:
    use_harness()
    from conformance.__main__ import main

    return main(argv)


def mutants_main(argv=None) -> int:
    use_harness()
    from mutants.__main__ import main

    return main(argv)
