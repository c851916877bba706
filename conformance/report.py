"""The report of one profile, merged from its parts (one per Transformers version x subject):
conformance-report.json, conformance-report.md (totals, the grid, the findings table, the mutant
kill rate), conformance-report.xml (JUnit, for CI runners) and conformance-report-<subject>.png
(a heat-map per subject: cells x outcome)."""

from __future__ import annotations

import datetime
import json
import subprocess
from pathlib import Path
from xml.etree import ElementTree

from conformance import findings
from matrix.cells import in_matrix

SYMBOLS = {"pass": "pass", "fail": "**FAIL**", "rejected_as_expected": "rejected (expected)",
           "not_applicable": "n/a", "not_implemented": "not implemented yet", "skipped": "skipped",
           "unclassified": "unclassified (no case)"}
# Heat-map colours (colour-blind safe where it matters: pass blue-green, fail vermillion).
COLOURS = {"pass": "#009E73", "fail": "#D55E00", "finding": "#E69F00", "rejected_as_expected": "#56B4E9",
           "not_applicable": "#DDDDDD", "skipped": "#BBBBBB", "not_implemented": "#F0E442", "not run": "#FFFFFF",
           "unclassified": "#CC79A7"}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_description(device: str) -> str:
    """``device`` with what it is here: "cpu", or "cuda: 2 x NVIDIA H200" ("cuda: none visible")."""
    if device != "cuda":
        return device
    import torch

    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    if not names:
        return "cuda: none visible"
    return "cuda: " + ", ".join(f"{names.count(name)} x {name}" for name in dict.fromkeys(names))


def write_part(path: Path, records: list[dict], profile: str, seconds: float, device: str = "cpu") -> None:
    """One version x subject: its records and when, where (``device``) and how long it ran."""
    first = records[0] if records else {}

    version = first.get("transformers")
    meta = {"profile": profile, "transformers": version, "in_matrix": version is None or in_matrix(version),
            "subject": first.get("subject"),
            "device": device_description(device),
            "cells": len(records), "seconds": round(seconds, 1), "commit": _commit(),
            "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    path.write_text(json.dumps({"run": meta, "records": records}, indent=1))


def load(parts_dir: Path) -> tuple[list[dict], list[dict]]:
    """(the parts' run metadata, every record), parts in name order."""
    runs, records = [], []
    for path in sorted(parts_dir.glob("*.json")):
        part = json.loads(path.read_text())
        runs.append(part.get("run", {"part": path.name}))
        records += part["records"]
    return runs, records


def is_peer(record: dict) -> bool:
    """Whether a record's subject is a peer (its failures are findings) rather than the subject under
    test (autoep, or an outside implementation named --subject module:attribute). Records written
    before the field existed: every subject but autoep was a peer."""
    return bool(record.get("peer", record["subject"] != "autoep"))


def outcome(record: dict) -> str:
    """A record's outcome for the heat-map and JUnit: a peer's failure is a finding."""
    if record["status"] == "fail" and is_peer(record):
        return "finding"
    return record["status"]


def _cell_text(record: dict) -> str:
    """The outcome, and for a pass the largest difference from the reference."""
    text = SYMBOLS.get(record["status"], record["status"])
    if record["status"] == "fail" and is_peer(record):
        text = f"fail ({record.get('finding') or 'unclassified'})"
    diffs = record.get("max_abs_diff", {})
    diff = diffs.get("subject~reference", diffs.get("subject~original"))
    return f"{text} {diff:.1e}" if record["status"] == "pass" and diff is not None else text


def _column(record: dict) -> str:
    if record.get("interop"):
        return f"interop {record['interop']}"
    route = f" ({record['optimizer_route']} optimizer)" if record.get("optimizer_route") else ""
    resume = f" -> {record['resume']}" if record.get("resume") else ""
    return f"zero-{record['zero_stage']} w{record['world_size']} ep{record['autoep_size']}{resume}{route}"


def _row(record: dict) -> str:
    device = record.get("device", "cpu")
    return f"{record['subject']}: {record['case']} {record['dtype']}" + ("" if device == "cpu" else f" [{device}]")


def markdown(records: list[dict], runs: list[dict] | None = None, profile: str | None = None,
             mutants: dict | None = None, heatmaps: dict[str, str] | None = None) -> str:
    lines = ["# AutoEP conformance report", ""]
    if profile:
        lines += [f"Profile `{profile}` (matrix/profiles.py, matrix.cells.in_profile).", ""]
    if runs:
        lines += ["| Transformers | subject | device | cells | seconds | commit | finished (UTC) |",
                  "|---|---|---|---|---|---|---|"]
        for run in runs:
            label = "" if run.get("in_matrix", True) else " (not in the matrix)"
            lines.append(f"| {run.get('transformers')}{label} | {run.get('subject')} | {run.get('device', 'cpu')} | "
                         f"{run.get('cells')} | "
                         f"{run.get('seconds')} | {run.get('commit')} | {run.get('finished_at')} |")
        lines.append("")
    counts: dict[str, dict[str, int]] = {}
    for record in records:
        by_status = counts.setdefault(record["subject"], {})
        by_status[record["status"]] = by_status.get(record["status"], 0) + 1
    peers = {record["subject"] for record in records if is_peer(record)}
    for subject, by_status in counts.items():
        role = " (a peer: its failures are findings)" if subject in peers else ""
        lines.append(f"Totals, subject {subject}{role}: "
                     + ", ".join(f"{SYMBOLS.get(k, k)}: {v}" for k, v in sorted(by_status.items())) + "  ")
    lines.append("")
    for subject, image in (heatmaps or {}).items():
        lines.append(f"Heat-map, {subject}: {image}  ")
    lines += ["", _mutants_section(mutants, profile), "", "## Findings about peers", "",
              "A peer's failing cell carries the id of the finding whose cause it shows; each cause is "
              "reproduced by the named test.", "", findings.table(), ""]
    lines += ["## The grid", "",
              "A pass shows the largest absolute difference from the reference: over logits, loss, aux "
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
            rows.setdefault(_row(r), {})[_column(r)] = _cell_text(r)
        lines += [f"### transformers {version}", "", "| cell | " + " | ".join(topologies) + " |",
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


def _mutants_section(mutants: dict | None, profile: str | None) -> str:
    """The mutant bank's kill rate and table from mutants-report.json (written by ``nox -s mutants``)."""
    head = "## The suite's power: the mutant bank\n\n"
    if mutants is None:
        return head + "No mutants-report.json in this folder: run `nox -s mutants` (same profile) to measure it."
    same = "" if mutants.get("profile") == profile else \
        f" (measured on profile `{mutants.get('profile')}`, not this report's `{profile}`)"
    lines = [f"{mutants['killed']}/{mutants['mutants']} mutants killed (kill rate {mutants['kill_rate']:.0%}) on "
             f"Transformers {mutants['transformers']}{same}, {mutants['seconds']} s.", "",
             "| mutant | source | killed by | seconds |", "|---|---|---|---|"]
    for row in mutants["kill_table"]:
        killer = row["killing_cell"] or "**SURVIVED**"
        lines.append(f"| {row['mutant']} | {row['source']} | {killer} | {row['seconds']} |")
    return head + "\n".join(lines)


def junit(records: list[dict], profile: str | None = None) -> str:
    """JUnit XML: one testsuite per Transformers version x subject, one testcase per cell. An
    autoep failure is a <failure>; a peer's is a <failure> typed with its finding id; a cell that
    did not run (n/a, skipped, not implemented yet) is <skipped> with its reason."""
    suites = ElementTree.Element("testsuites", name=f"autoep conformance ({profile or 'profile?'})")
    groups: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        groups.setdefault((record["transformers"], record["subject"]), []).append(record)
    for (version, subject), items in groups.items():
        failures = sum(r["status"] == "fail" for r in items)
        skipped = sum(r["status"] in ("not_applicable", "skipped", "not_implemented") for r in items)
        suite = ElementTree.SubElement(suites, "testsuite", name=f"{subject} transformers {version}",
                                       tests=str(len(items)), failures=str(failures), errors="0",
                                       skipped=str(skipped), time=f"{sum(r.get('seconds', 0) for r in items):.3f}")
        for r in items:
            case = ElementTree.SubElement(suite, "testcase", classname=f"{subject}.tf{version}", name=r["cell"],
                                          time=f"{r.get('seconds', 0):.3f}")
            if r["status"] == "fail":
                kind = (r.get("finding") or "unclassified") if is_peer(r) else "mismatch"
                failure = ElementTree.SubElement(case, "failure", type=kind,
                                                 message=(r.get("detail", "") or "")[:500])
                failure.text = "\n".join([r.get("detail", "")] + r.get("findings", []))
            elif r["status"] in ("not_applicable", "skipped", "not_implemented"):
                ElementTree.SubElement(case, "skipped", message=f"{r['status']}: {r.get('reason', '')}"[:500])
            else:
                out = ElementTree.SubElement(case, "system-out")
                out.text = f"{r['status']} {json.dumps(r.get('max_abs_diff', {}))}"
    ElementTree.indent(suites)
    return ElementTree.tostring(suites, encoding="unicode", xml_declaration=True)


def heatmap(records: list[dict], subject: str, path: Path) -> str | None:
    """Draw ``subject``'s cells as a grid (rows: version x case x dtype; columns: topology),
    coloured by outcome. Returns why not if it cannot be drawn (matplotlib missing), else None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
        from matplotlib.colors import to_rgb
        from matplotlib.patches import Patch
    except ImportError:
        return "matplotlib is not installed (the nox sessions install it)"
    items = [r for r in records if r["subject"] == subject]
    rows = list(dict.fromkeys(f"tf{r['transformers']} {r['case']} {r['dtype']}" for r in items))
    columns = list(dict.fromkeys(_column(r) for r in items))
    grid = [[to_rgb(COLOURS["not run"])] * len(columns) for _ in rows]
    seen = set()
    for r in items:
        i, j = rows.index(f"tf{r['transformers']} {r['case']} {r['dtype']}"), columns.index(_column(r))
        grid[i][j] = to_rgb(COLOURS.get(outcome(r), "#000000"))
        seen.add(outcome(r))
    figure, axes = pyplot.subplots(figsize=(2.5 + 0.32 * len(columns), 1.5 + 0.2 * len(rows)))
    axes.imshow(grid, aspect="auto", interpolation="nearest")
    axes.set_xticks(range(len(columns)), columns, rotation=70, ha="right", fontsize=7)
    axes.set_yticks(range(len(rows)), rows, fontsize=6)
    axes.set_xticks([x - 0.5 for x in range(1, len(columns))], minor=True)
    axes.set_yticks([y - 0.5 for y in range(1, len(rows))], minor=True)
    axes.grid(which="minor", color="white", linewidth=0.5)
    axes.tick_params(which="minor", length=0)
    labels = {"finding": "fail (peer finding)", "rejected_as_expected": "rejected (expected)",
              "not_applicable": "n/a", "not_implemented": "not implemented yet", "not run": "not in profile"}
    shown = [k for k in COLOURS if k in seen or k == "not run"]
    axes.legend(handles=[Patch(facecolor=COLOURS[k], edgecolor="#999999", label=labels.get(k, k)) for k in shown],
                loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7, frameon=False)
    axes.set_title(f"AutoEP conformance: subject {subject}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
    return None


def write(parts_dir: Path, out: Path, profile: str | None = None) -> list[dict]:
    """Rebuild every report file of the profile whose parts are in ``parts_dir``."""
    runs, records = load(parts_dir)
    mutants_path = out / "mutants-report.json"
    mutants = json.loads(mutants_path.read_text()) if mutants_path.exists() else None
    heatmaps = {}
    for subject in dict.fromkeys(r["subject"] for r in records):
        image = out / f"conformance-report-{subject}.png"
        why_not = heatmap(records, subject, image)
        heatmaps[subject] = f"not drawn: {why_not}" if why_not else f"`{image.name}`"
    (out / "conformance-report.json").write_text(json.dumps({"profile": profile, "runs": runs, "records": records,
                                                             "mutants": mutants}, indent=1))
    (out / "conformance-report.md").write_text(markdown(records, runs, profile, mutants, heatmaps))
    (out / "conformance-report.xml").write_text(junit(records, profile))
    return records
