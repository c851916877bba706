"""python -m conformance run|report

run     run the matrix cells of the installed Transformers version; write
        conformance-report/<version>-<subject>.json, then rebuild the merged report
report  rebuild conformance-report.json and conformance-report.md from the parts
Exit status: 1 if any cell of the `autoep` subject failed, else 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

from conformance import report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance", description=__doc__)
    parser.add_argument("command", choices=["run", "report"])
    parser.add_argument("--subject", default="autoep")
    parser.add_argument("--case", default=None, help="only cells whose case id contains this text")
    parser.add_argument("--out", default=".", help="folder for conformance-report*")
    args = parser.parse_args(argv)
    out = Path(args.out)
    parts = out / "conformance-report"
    parts.mkdir(parents=True, exist_ok=True)
    if args.command == "run":
        import transformers

        from conformance.runner import run_matrix

        warnings.filterwarnings("ignore")
        logging.getLogger("transformers").setLevel(logging.ERROR)
        version = transformers.__version__
        records = run_matrix(version, args.subject, args.case)
        (parts / f"{version}-{args.subject}.json").write_text(json.dumps({"records": records}, indent=1))
        for record in records:
            print(f"{record['status']:>22}  {record['cell']}  {record.get('detail', '')[:160]}")
    records = report.write(parts, out / "conformance-report.json", out / "conformance-report.md")
    failed = [r for r in records if r["subject"] == "autoep" and r["status"] == "fail"]
    print(f"conformance: {len(records)} cells in report, {len(failed)} autoep failures "
          f"-> {out / 'conformance-report.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
