"""Merge per-version results into conformance-report.json and a Markdown grid."""

from __future__ import annotations

import json
from pathlib import Path

SYMBOLS = {"pass": "pass", "fail": "**FAIL**", "rejected_as_expected": "rejected (expected)",
           "not_applicable": "n/a", "not_implemented": "not implemented yet", "skipped": "skipped"}


def load(parts_dir: Path) -> list[dict]:
    records = []
    for path in sorted(parts_dir.glob("*.json")):
        records += json.loads(path.read_text())["records"]
    return records


def _cell_text(record: dict) -> str:
    """The outcome, and for a pass the largest difference from the reference."""
    text = SYMBOLS.get(record["status"], record["status"])
    if record["status"] == "fail" and record["subject"] != "autoep":
        text = f"fail ({record.get('finding') or 'unclassified'})"
    diffs = record.get("max_abs_diff", {})
    diff = diffs.get("subject~reference", diffs.get("subject~original"))
    return f"{text} {diff:.1e}" if record["status"] == "pass" and diff is not None else text


def markdown(records: list[dict]) -> str:
    lines = ["# AutoEP conformance report", ""]
    counts: dict[str, dict[str, int]] = {}
    for record in records:
        by_status = counts.setdefault(record["subject"], {})
        by_status[record["status"]] = by_status.get(record["status"], 0) + 1
    for subject, by_status in counts.items():
        role = "" if subject == "autoep" else " (a peer: its failures are findings)"
        lines.append(f"Totals, subject {subject}{role}: "
                     + ", ".join(f"{SYMBOLS.get(k, k)}: {v}" for k, v in sorted(by_status.items())) + "  ")
    lines += ["", "A pass shows the largest absolute difference from the reference: over logits, loss, aux "
              "loss and every gradient for zero-none cells (bf16 cells are bounded by relative L2 error; see "
              "conformance/tolerances.py); over the per-step losses and every final parameter after 3 AdamW "
              "steps for ZeRO cells (one step in bf16); for checkpoint cells (a -> b), over the 4 per-step losses and "
              "every final parameter of 2 steps on a, save, Universal conversion, 2 steps on b; for interop cells "
              "(one process, judged against the stock Transformers model, conformance/interop.py), over "
              "everything the family compares with the stock model.", ""]
    by_version: dict[str, list[dict]] = {}
    for record in records:
        by_version.setdefault(record["transformers"], []).append(record)
    for version, items in by_version.items():
        topologies = list(dict.fromkeys(_column(r) for r in items))
        rows: dict[str, dict[str, str]] = {}
        for r in items:
            row = rows.setdefault(f"{r['subject']}: {r['case']} {r['dtype']}", {})
            row[_column(r)] = _cell_text(r)
        lines += [f"## transformers {version}", "", "| cell | " + " | ".join(topologies) + " |",
                  "|---|" + "---|" * len(topologies)]
        for name, row in rows.items():
            lines.append(f"| {name} | " + " | ".join(row.get(t, "") for t in topologies) + " |")
        lines.append("")
        notes = [r for r in items if r.get("findings") or r["status"] == "fail"]
        if notes:
            lines += ["Findings and failures:", ""]
            for r in notes:
                for text in r.get("findings", []):
                    lines.append(f"- {r['cell']}: finding: {text[:300]}")
                if r["status"] == "fail":
                    detail = r.get("detail", "")
                    # A traceback's last lines say what went wrong; a comparison list its first.
                    detail = detail[-300:] if "Traceback" in detail else detail[:300]
                    lines.append(f"- {r['subject']} {r['cell']}: FAIL: {detail}".replace("\n", " | "))
            lines.append("")
    return "\n".join(lines)


def _column(record: dict) -> str:
    if record.get("interop"):
        return f"interop {record['interop']}"
    resume = f" -> {record['resume']}" if record.get("resume") else ""
    return f"zero-{record['zero_stage']} w{record['world_size']} ep{record['autoep_size']}{resume}"


def write(parts_dir: Path, json_path: Path, markdown_path: Path) -> list[dict]:
    records = load(parts_dir)
    json_path.write_text(json.dumps({"records": records}, indent=1))
    markdown_path.write_text(markdown(records))
    return records
