"""python -m mutants [--profile smoke|default|full] [--cells N] [--mutant ID ...] [--out FOLDER]

Runs every mutant of mutants/bank.py (or those named) on the cells of the matrix profile
(matrix/profiles.py) on the installed Transformers version where its bug is active, cheapest
first, and stops at the first cell whose status is "fail": the mutant is killed there. A mutant
that passes all the cells it is run on is a SURVIVOR, a gap in the suite. Prints the kill table
and writes ``mutants-report.json`` (kill table + kill rate; the conformance report of the same
folder shows it).

``--cells N`` runs each mutant on at most N of its cheapest active cells of the profile
(default DEFAULT_CELLS; 0: all of them). Exit status: 1 if any mutant survived, else 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
import warnings
from pathlib import Path

from matrix.profiles import DEFAULT_PROFILE, PROFILES

DEFAULT_CELLS = 3


def active_cells(mutant, transformers: str, profile: str = DEFAULT_PROFILE, limit: int = DEFAULT_CELLS) -> list:
    """The cells ``mutant`` runs on: in the profile, active, expected to pass, cheapest first
    (ties keep the matrix order); at most ``limit`` of them (0: all)."""
    from matrix.cells import expected, profile_matrix, relative_cost

    cells = [cell for cell in profile_matrix(transformers, profile)
             if expected(cell).outcome == "pass" and mutant.active(cell)]
    cells.sort(key=relative_cost)
    return cells[:limit] if limit else cells


@contextlib.contextmanager
def registered(mutant):
    """The mutant in the runner's subject table for the duration of its cells (rank processes
    find it by its "module:attribute" name)."""
    from conformance.subjects import SUBJECTS

    SUBJECTS[mutant.name] = mutant
    try:
        yield mutant.name
    finally:
        del SUBJECTS[mutant.name]


def summary(detail: str, limit: int = 600) -> str:
    """What differed: the failed comparisons, or a traceback's last lines (its exception)."""
    if detail.lstrip().startswith("Traceback"):
        return detail.strip()[-limit:]
    return detail[:limit]


def hunt(mutant, transformers: str, profile: str = DEFAULT_PROFILE, limit: int = DEFAULT_CELLS) -> dict:
    """Run ``mutant`` on its cells until one fails. Returns its row of the kill table."""
    from conformance.runner import run_cell

    started = time.perf_counter()
    row = {"mutant": mutant.id, "description": mutant.description, "source": mutant.source, "killed": False,
           "killing_cell": None, "what_differed": None, "cells_run": []}
    cells = active_cells(mutant, transformers, profile, limit)
    with registered(mutant) as name:
        for cell in cells:
            record = run_cell(cell, name)
            row["cells_run"].append({"cell": cell.id, "status": record["status"], "seconds": record["seconds"]})
            if record["status"] == "fail":
                row.update(killed=True, killing_cell=cell.id, what_differed=summary(record.get("detail", "")))
                break
    if not cells:
        row["what_differed"] = f"no active cell in profile {profile!r} for Transformers {transformers}"
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def table(rows: list[dict]) -> str:
    lines = [f"{'mutant':<38} {'result':<9} {'seconds':>7}  killing cell / what differed"]
    for row in rows:
        result = "killed" if row["killed"] else "SURVIVED"
        lines.append(f"{row['mutant']:<38} {result:<9} {row['seconds']:>7.1f}  {row['killing_cell'] or '-'}")
        what = (row["what_differed"] or "").strip().splitlines()
        lines.append(f"{'':<57}{(what[-1] if what else '')[:150]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mutants", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=PROFILES, default=DEFAULT_PROFILE)
    parser.add_argument("--cells", type=int, default=DEFAULT_CELLS,
                        help=f"at most this many cheapest active cells per mutant (0: all; default {DEFAULT_CELLS})")
    parser.add_argument("--mutant", action="append", default=None, help="a mutant id (repeatable); default: all")
    parser.add_argument("--out", default=".", help="folder for mutants-report.json")
    args = parser.parse_args(argv)

    import transformers

    from autoep import launch
    from mutants.bank import BANK, BY_ID

    unknown = sorted(set(args.mutant or ()) - set(BY_ID))
    if unknown:
        parser.error(f"unknown mutant id(s) {unknown}; known: {sorted(BY_ID)}")
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    mutants = [BY_ID[mutant_id] for mutant_id in args.mutant] if args.mutant else BANK
    started = time.perf_counter()
    rows = []
    try:
        for mutant in mutants:
            rows.append(hunt(mutant, transformers.__version__, args.profile, args.cells))
            row = rows[-1]
            print(f"{'killed' if row['killed'] else 'SURVIVED':>8}  {row['mutant']}  {row['seconds']}s  "
                  f"{row['killing_cell'] or ''}", flush=True)
    finally:
        launch.close_shared_pools()
    killed = sum(row["killed"] for row in rows)
    report = {"transformers": transformers.__version__, "profile": args.profile, "cells_per_mutant": args.cells,
              "mutants": len(rows),
              "killed": killed, "kill_rate": killed / len(rows) if rows else None,
              "survivors": [row["mutant"] for row in rows if not row["killed"]],
              "seconds": round(time.perf_counter() - started, 1), "kill_table": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mutants-report.json").write_text(json.dumps(report, indent=1))
    print(table(rows))
    print(f"mutants: {killed}/{len(rows)} killed (kill rate {report['kill_rate']:.0%}), {report['seconds']}s "
          f"-> {out / 'mutants-report.json'}")
    return 1 if report["survivors"] else 0


if __name__ == "__main__":
    sys.exit(main())
