"""nox sessions. Every install is pinned; torch==2.13.0 resolves to the local CPU build.

    nox -s conformance   the default small matrix, one session per Transformers version
    nox -s tests         the unit tests (newest pinned Transformers)
    nox -s bench         the MoE layer benchmark (`-- --quick` for a smoke run, `-- --out FILE`)
    nox -s mutants       the mutant bank: every planted bug must be killed by the suite (kill table,
                         mutants-report.json; `-- --mutant ID`, `-- --profile full`)
"""

import os

import nox

TORCH = "torch==2.13.0"
DEEPSPEED = "deepspeed==0.19.8"
# 5.0.0: first 5.x; 5.2.0: first with Qwen3.5-MoE; 5.24.0: newest 5.x that installs (pinned);
# 4.57.6: the last 4.x, whose cells must end in the documented rejection.
TRANSFORMERS_VERSIONS = ["5.24.0", "5.2.0", "5.0.0", "4.57.6"]
NEWEST = "5.24.0"

nox.options.sessions = ["conformance"]
nox.options.reuse_existing_virtualenvs = True


def _install(session, transformers_version):
    # DeepSpeed JIT-builds its CPU ops (shm comm) into TORCH_EXTENSIONS_DIR; a directory shared by
    # environments with other include paths makes each switch rebuild it, and a build killed midway
    # leaves a lock on which every later DeepSpeed start in any environment waits (measured here:
    # 25 minutes). One directory per environment.
    session.env["TORCH_EXTENSIONS_DIR"] = os.path.join(session.virtualenv.location, "torch_extensions")
    session.install(TORCH)
    session.install(TORCH, f"transformers=={transformers_version}", DEEPSPEED, "packaging", "numpy")
    session.install("--no-deps", "-e", ".")


@nox.session(python="3.11")
@nox.parametrize("transformers", TRANSFORMERS_VERSIONS)
def conformance(session, transformers):
    """Run the conformance matrix cells for one Transformers version and rebuild the report."""
    _install(session, transformers)
    session.env["PYTHONPATH"] = "."
    session.run("python", "-m", "conformance", "run", *session.posargs)
    # DeepSpeed's built-in AutoEP on the same ZeRO cells: findings about that peer (the exit
    # status depends on the autoep subject only).
    session.run("python", "-m", "conformance", "run", "--subject", "deepspeed", *session.posargs)


@nox.session(python="3.11")
def tests(session):
    """Unit tests of autoep/, reference/, matrix/ and conformance/."""
    _install(session, NEWEST)
    session.install(TORCH, "pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100")
    session.run("python", "-m", "pytest", "-n", "2", "--dist", "loadgroup", *session.posargs)


@nox.session(python="3.11")
def bench(session):
    """Benchmark one MoE layer: autoep vs the Transformers block vs a dense ceiling, and autoep_size=2."""
    _install(session, NEWEST)
    session.env["PYTHONPATH"] = "."
    session.run("python", "-m", "benchmarks.moe_layer", *session.posargs)


@nox.session(python="3.11")
def mutants(session):
    """Run the mutant bank (mutants/) on the matrix cells where each bug is active; fails on a survivor."""
    _install(session, NEWEST)
    session.env["PYTHONPATH"] = "."
    session.run("python", "-m", "mutants", *session.posargs)
