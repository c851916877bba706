"""nox sessions. Every install is pinned; torch==2.13.0 resolves to the local CPU build.

    nox -s conformance   the default matrix profile, one session per Transformers version of the
                         profile (`-- --profile smoke|default|full`; matrix/profiles.py;
                         `-- --device cuda`: on the visible GPUs, one per rank, NCCL): autoep, then
                         the peers deepspeed and (on CPU) transformers_ep, into one report
    nox -s tests         the unit tests (newest pinned Transformers)
    nox -s findings      each peer finding (DS-n, HF-n) reproduced on every 5.x version of the full profile
    nox -s titan         TorchTitan's MoE replacement as a subject (opt-in; its own pinned dependencies)
    nox -s bench         the MoE layer benchmark with its peers and the cost curves (`-- --quick` for a smoke
                         run, `-- --out FILE`, `-- --out-dir DIR`)
    nox -s gpu           the GPU path (benchmarks/gpu.py; `-- --quick`, `-- --out DIR`); without CUDA it
                         says so in one line and exits 0
    nox -s mutants       the mutant bank: every planted bug must be killed by the suite (kill table,
                         mutants-report.json; `-- --profile P`, `-- --mutant ID`, `-- --cells 0`)
"""

import os
import sys

import nox

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from matrix.profiles import DEFAULT_PROFILE, FULL_VERSIONS, NEWEST, PROFILES, versions  # noqa: E402

TORCH = "torch==2.13.0"
DEEPSPEED = "deepspeed==0.19.8"
MATPLOTLIB = "matplotlib==3.11.2"  # the report's heat-maps
ACCELERATE = "accelerate==1.15.0"  # Transformers' from_pretrained(distributed_config=...) needs it (transformers_ep)

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


def _profile(posargs) -> tuple[str, list[str]]:
    """``--profile NAME`` (or ``--profile=NAME``) from the session's arguments, and the rest."""
    args, profile = list(posargs), DEFAULT_PROFILE
    for i, arg in enumerate(args):
        if arg == "--profile" and i + 1 < len(args):
            profile = args[i + 1]
            del args[i:i + 2]
            break
        if arg.startswith("--profile="):
            profile = arg.split("=", 1)[1]
            del args[i]
            break
    if profile not in PROFILES:
        raise SystemExit(f"nox: unknown matrix profile {profile!r}; choose one of {', '.join(PROFILES)}")
    return profile, args


def _option(args, name: str, default: str | None = None) -> str | None:
    """``NAME VALUE`` (or ``NAME=VALUE``) among the arguments passed on to the conformance run."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
    return default


@nox.session(python="3.11")
@nox.parametrize("transformers", FULL_VERSIONS)
def conformance(session, transformers):
    """Run the profile's cells for one Transformers version and rebuild the profile's report
    (`-- --device cuda`: the cells that fit the visible GPUs, on CUDA with NCCL)."""
    profile, args = _profile(session.posargs)
    if transformers not in versions(profile):
        session.skip(f"Transformers {transformers} is not in profile {profile!r} (`-- --profile full` runs it)")
    _install(session, transformers)
    session.install(TORCH, MATPLOTLIB, ACCELERATE)
    session.env["PYTHONPATH"] = "."
    if _option(args, "--device", "cpu") == "cuda":  # DeepSpeed's accelerator here; the launcher sets every rank's from the device
        session.env["DS_ACCELERATOR"] = "cuda"
    # Exit 1 means a cell of the subject under test failed (in the merged report): the peer still runs
    # on this version, and the verdict is taken once both are in the report (the `report` step below).
    session.run("python", "-m", "conformance", "run", "--profile", profile, *args, success_codes=[0, 1])
    # On Transformers 4.x every cell is autoep's documented rejection (measured: all 100 cells of each peer
    # not applicable), so the peers are not started there.
    if _option(args, "--subject") is None and not transformers.startswith("4."):
        # DeepSpeed's built-in AutoEP on its cells of the profile: findings about that peer (the exit
        # status depends on the subjects under test only). With `-- --subject X` only X runs.
        session.run("python", "-m", "conformance", "run", "--subject", "deepspeed", "--profile", profile, *args,
                    success_codes=[0, 1])
        # Transformers' own expert parallelism (DistributedConfig(ep_size=...)): findings HF-n, on CPU.
        if _option(args, "--device", "cpu") == "cpu":
            session.run("python", "-m", "conformance", "run", "--subject", "transformers_ep", "--profile", profile,
                        *args, success_codes=[0, 1])
    out = _option(args, "--out")
    session.run("python", "-m", "conformance", "report", "--profile", profile, *(["--out", out] if out else []))


@nox.session(python="3.11")
@nox.parametrize("transformers", [v for v in FULL_VERSIONS if not v.startswith("4.")])
def findings(session, transformers):
    """Reproduce each peer finding on the Transformers version where it lives (tests/test_findings.py:
    DS-1 on >= 5.23, DS-2 on 5.0, DS-5 on 5.0-5.2, DS-7's engine part on 5.3-5.22, HF-1 on >= 5.24,
    HF-2 on 5.20-5.22; the others on every version)."""
    _install(session, transformers)
    session.install(TORCH, ACCELERATE, "pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100")
    session.run("python", "-m", "pytest", "tests/test_findings.py", "-p", "no:cacheprovider", *session.posargs)


@nox.session(python="3.11")
def tests(session):
    """Unit tests of autoep/, reference/, matrix/ and conformance/."""
    _install(session, NEWEST)
    # nox too: tests/test_device_plumbing.py drives the sessions' functions with a fake session
    session.install(TORCH, MATPLOTLIB, ACCELERATE, "pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100",
                    "nox>=2025.2")
    session.run("python", "-m", "pytest", "-n", "2", "--dist", "loadgroup", *session.posargs)


@nox.session(python="3.11")
def titan(session):
    """TorchTitan's MoE replacement as a conformance subject (opt-in: its wheel pulls datasets, tyro,
    wandb, tensorboard, spmd_types and triton, never in the default install): its tests, then its
    cells of the profile (`-- --profile P`) into the same report as findings."""
    profile, args = _profile(session.posargs)
    _install(session, NEWEST)
    # triton: torchtitan's token dispatcher imports it unconditionally (it then runs on CPU).
    session.install(TORCH, f"transformers=={NEWEST}", DEEPSPEED, "torchtitan==0.3.0", "triton==3.9.0", MATPLOTLIB,
                    "pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100")
    session.env["PYTHONPATH"] = "."
    session.run("python", "-m", "pytest", "tests/test_titan.py", "-p", "no:cacheprovider")
    session.run("python", "-m", "conformance", "run", "--subject", "torchtitan", "--profile", profile, *args)


@nox.session(python="3.11")
def bench(session):
    """Benchmark one MoE layer in one run: autoep, the Transformers block, DeepSpeed's AutoEP layer,
    Transformers' EP, a dense ceiling and the raw GEMM limit, at ep 1 and 2; then the cost curves
    (tokens, experts, top-k, autoep_size on 4 processes) as JSON and PNG. `-- --quick` for a smoke run;
    `-- --out FILE` names the table's JSON, `-- --out-dir DIR` the curves' folder."""
    _install(session, NEWEST)
    session.install(TORCH, MATPLOTLIB, ACCELERATE)
    session.env["PYTHONPATH"] = "."
    known = {"--quick", "--out", "--out-dir"}
    for i, arg in enumerate(session.posargs):
        previous = session.posargs[i - 1] if i else None
        if arg.split("=", 1)[0] not in known and previous not in ("--out", "--out-dir"):
            session.error(f"nox -s bench: unknown argument {arg!r}; use --quick, --out FILE, --out-dir DIR")
    quick = ["--quick"] if "--quick" in session.posargs else []
    out = _option(session.posargs, "--out")
    out_dir = _option(session.posargs, "--out-dir")
    session.run("python", "-m", "benchmarks.moe_layer", *quick, *(["--out", out] if out else []))
    session.run("python", "-m", "benchmarks.curves", *quick, *(["--out-dir", out_dir] if out_dir else []))


@nox.session(python="3.11")
def gpu(session):
    """The GPU path (benchmarks/gpu.py): one-process conformance cells on CUDA, grouped_mm vs mm, the
    layer's tokens/s, TFLOPS against the device's peak, peak memory and device-to-host syncs per step.
    On a CUDA machine torch==2.13.0 resolves to its CUDA build; without CUDA the module exits 0."""
    _install(session, NEWEST)
    session.env["PYTHONPATH"] = "."
    session.run("python", "-m", "benchmarks.gpu", *session.posargs)


@nox.session(python="3.11")
def mutants(session):
    """Run the mutant bank (mutants/) on the profile's cells where each bug is active; fails on a survivor."""
    _install(session, NEWEST)
    session.env["PYTHONPATH"] = "."
    session.run("python", "-m", "mutants", *session.posargs)
