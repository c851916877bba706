"""python -m conformance run|report [--profile smoke|default|full] [--subject NAME] [--case TEXT] [--device cpu|cuda]

run     run the cells of the profile (matrix/profiles.py, matrix.cells.in_profile) on the installed
        Transformers version, one progress line per finished cell; write
        conformance-report/<profile>/<version>-<subject>.json, then rebuild the merged report.
        --device cuda: the subject runs on CUDA (one GPU per rank, NCCL) against the CPU reference;
        cells needing more GPUs than are visible (and interop cells) are recorded "skipped" with
        the reason; the part is <version>-<subject>-cuda.json and the report names the device
report  rebuild the profile's report from its parts: conformance-report.json, .md (grid, findings
        table, mutant kill rate from mutants-report.json when present), .xml (JUnit) and
        conformance-report-<subject>.png (heat-map per subject)
--subject: a registered subject (autoep, deepspeed, torchtitan, transformers_ep) or 'package.module:attribute' naming your
        own implementation (conformance/SUBJECTS.md); a subject without a method a cell calls gets that
        cell marked not applicable, naming the method.
Exit status: 1 if any cell of a subject under test (not a peer: autoep, or an outside subject) failed, else 0.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

from conformance import report
from matrix.cells import in_matrix
from matrix.profiles import DEFAULT_PROFILE, NEWEST, PROFILES, versions
from autoep import launch
from conformance.runner import run_matrix
from conformance.subjects import UnknownSubject, subject_by_name


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance", description=__doc__)
    parser.add_argument("command", choices=["run", "report"])
    parser.add_argument("--subject", default="autoep")
    parser.add_argument("--case", default=None, help="only cells whose case id contains this text")
    parser.add_argument("--profile", choices=PROFILES, default=DEFAULT_PROFILE)
    parser.add_argument("--out", default=".", help="folder for conformance-report*")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where the subject runs (cuda: one GPU per rank, NCCL; default cpu)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    parts = out / "conformance-report" / args.profile
    parts.mkdir(parents=True, exist_ok=True)
    if args.command == "run":
        import transformers

        try:
            subject = subject_by_name(args.subject)
        except UnknownSubject as error:
            print(str(error), file=sys.stderr)
            return 2
        check = getattr(subject, "unavailable_reason", None)
        if check is not None and (why := check()) is not None:
            if not getattr(subject, "is_peer", False):
                print(f"conformance: subject {args.subject!r} cannot run here: {why}", file=sys.stderr)
                return 2
            # A peer that cannot run on this installation (transformers_ep on a Transformers without
            # DistributedConfig(ep_size=...)): its cells are recorded skipped with the reason, in the report.
            print(f"conformance: peer {args.subject!r} cannot run here: {why}; its cells are recorded skipped")

        warnings.filterwarnings("ignore")
        logging.getLogger("transformers").setLevel(logging.ERROR)
        version = transformers.__version__
        if not in_matrix(version):
            print(f"conformance: Transformers {version} is not in the matrix (pinned: {', '.join(versions('full'))}): "
                  f"running the cells profile {args.profile!r} gives {NEWEST} for every case this build has, "
                  "expected as the family table's version bounds say; the report labels the version",
                  file=sys.stderr)
        elif version not in versions(args.profile):
            print(f"conformance: Transformers {version} is not in profile {args.profile!r} "
                  f"({', '.join(versions(args.profile))}); nothing to run", file=sys.stderr)
            return 2
        started = time.perf_counter()
        try:
            records = run_matrix(version, args.subject, args.case, args.profile, device=args.device)
        finally:
            launch.close_shared_pools()
        suffix = "" if args.device == "cpu" else f"-{args.device}"
        report.write_part(parts / f"{version}-{args.subject}{suffix}.json", records, args.profile,
                          time.perf_counter() - started, device=args.device)
    records = report.write(parts, out, args.profile)
    failed = [r for r in records if not report.is_peer(r) and r["status"] == "fail"]
    print(f"conformance: {len(records)} cells in the {args.profile} report, {len(failed)} failures of the subjects "
          f"under test -> {out / 'conformance-report.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
