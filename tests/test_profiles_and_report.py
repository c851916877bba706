"""Matrix profiles (matrix/profiles.py, matrix.cells.in_profile), the progress lines, and the
report files: Markdown, JUnit XML, heat-maps, findings table, mutant kill rate."""

import io
import json
from xml.etree import ElementTree

import pytest

from conformance import report
from conformance.findings import FINDINGS
from conformance.runner import Progress, run_matrix
from matrix import profiles
from matrix.cells import (FAMILY_CASE_IDS, FAMILY_DEFAULT_CASES, Cell, default_matrix, expected, in_profile,
                          profile_matrix)
from mutants.__main__ import active_cells
from mutants.bank import BANK

NEWEST = profiles.NEWEST


def test_profiles_nest_and_name_their_versions():
    assert profiles.versions("smoke") == (NEWEST,)
    assert set(profiles.versions("default")) == {NEWEST, profiles.LAST_4X}
    # The full profile: every Transformers 5.x minor that changed MoE code, and the last 4.x.
    assert {"5.0.0", "5.2.0", "5.16.1", "5.20.2", "5.22.2", "5.23.0", NEWEST, "4.57.6"} <= set(profiles.versions("full"))
    with pytest.raises(ValueError, match="unknown matrix profile 'fast'; choose one of smoke, default, full"):
        profiles.versions("fast")
    smoke, default, full = (set(profile_matrix(NEWEST, p)) for p in profiles.PROFILES)
    assert smoke < default < full == set(default_matrix(NEWEST))
    # CI-sized: one float32 cell per case on one process, plus a few parallel Mixtral cells (where the
    # mutants live); the default well under full.
    one_process_fp32 = {c for c in smoke if c.zero_stage == "none" and c.world_size == 1 and c.dtype == "float32"
                        and not c.interop}
    assert len(smoke - one_process_fp32) < 15 and len(default) < len(full) / 2


def test_every_profile_runs_every_case_on_one_process_and_every_version_of_its_list():
    """Every case in the full profile on the newest version; elsewhere every case but the table's
    family variants (each family's default case still runs there)."""
    for profile in profiles.PROFILES:
        for version in profiles.versions(profile):
            cells = profile_matrix(version, profile)
            one_process = {c.case for c in cells if c.zero_stage == "none" and c.world_size == 1 and not c.interop}
            every = {c.case for c in default_matrix(version)}
            if (profile, version) != ("full", NEWEST):
                every -= FAMILY_CASE_IDS - set(FAMILY_DEFAULT_CASES)
            assert one_process == every, (profile, version)
    assert not profile_matrix("5.0.0", "default")  # not in the default profile's versions


def test_the_last_4x_runs_only_its_rejections():
    cells = profile_matrix(profiles.LAST_4X, "default")
    assert cells and all(expected(c).outcome == "rejected" for c in cells)
    assert all((c.zero_stage, c.world_size, c.interop, c.resume) == ("none", 1, None, None) for c in cells)


def test_a_peer_runs_its_documented_right_cases_in_depth_in_the_default_profile():
    peer = profile_matrix(NEWEST, "default", peer=True)
    ours = set(profile_matrix(NEWEST, "default"))
    assert set(peer) <= ours | {c for c in default_matrix(NEWEST) if c.case == "deepseek_v3"}
    v3 = {(c.zero_stage, c.autoep_size) for c in peer if c.case == "deepseek_v3" and not c.resume}
    assert {(stage, ep) for stage in (0, 1, 2, 3) for ep in (1, 2, 4)} <= v3
    assert {c.resume for c in peer if c.case == "deepseek_v3" and c.resume} >= {"w2-ep1", "w4-ep4"}


@pytest.mark.parametrize("profile", profiles.PROFILES)
def test_every_mutant_has_an_active_cell_in_every_profile(profile):
    """Structure only; `nox -s mutants -- --profile P` measures the kills."""
    for mutant in BANK:
        assert active_cells(mutant, NEWEST, profile), f"{mutant.id}: no active cell in profile {profile}"


def test_progress_prints_one_line_per_cell_with_a_counter_and_the_time_left():
    cells = [Cell(NEWEST, "mixtral", "none", 1, 1, "float32"), Cell(NEWEST, "mixtral", 3, 4, 2, "float32")]
    stream = io.StringIO()
    meter = Progress(cells, "autoep test", stream)
    meter.finished(cells[0], {"status": "pass", "seconds": 2.0})
    meter.finished(cells[1], {"status": "fail", "finding": "DS-4", "seconds": 9.5})
    lines = stream.getvalue().splitlines()
    assert lines[0] == "autoep test: 2 cells"
    assert lines[1].startswith("[  1/2] pass") and cells[0].id in lines[1] and "left)" in lines[1]
    assert lines[2].startswith("[  2/2] fail (DS-4)") and "about 0m00s left" in lines[2]


def test_a_profile_run_prints_progress_and_labels_its_records():
    stream = io.StringIO()
    records = run_matrix(NEWEST, "autoep", case_filter="mixtral-top1", profile="smoke", progress=stream)
    assert [r["status"] for r in records] == ["pass"] and records[0]["profile"] == "smoke"
    assert stream.getvalue().count("\n") == 2 and "[  1/1] pass" in stream.getvalue()


def _records():
    def record(subject, status, cell, **extra):
        return {"cell": cell.id, **cell.to_json(), "subject": subject, "status": status, "seconds": 1.5,
                "findings": [], **extra}
    a = Cell(NEWEST, "mixtral", "none", 1, 1, "float32")
    b = Cell(NEWEST, "mixtral", 2, 4, 2, "float32")
    return [record("autoep", "pass", a, max_abs_diff={"subject~reference": 1e-7}),
            record("autoep", "fail", b, detail="logits OUT OF TOLERANCE"),
            record("deepspeed", "skipped", a, reason="ZeRO cells only"),
            record("deepspeed", "fail", b, detail="TypeError: x", finding="DS-1", findings=["DS-1 (peer failure): y"])]


def test_junit_xml_has_a_suite_per_version_and_subject_and_types_peer_failures_by_finding():
    root = ElementTree.fromstring(report.junit(_records(), "default"))
    suites = {s.get("name"): s for s in root.iter("testsuite")}
    assert set(suites) == {f"autoep transformers {NEWEST}", f"deepspeed transformers {NEWEST}"}
    ours, peer = suites[f"autoep transformers {NEWEST}"], suites[f"deepspeed transformers {NEWEST}"]
    assert (ours.get("tests"), ours.get("failures"), ours.get("skipped")) == ("2", "1", "0")
    assert (peer.get("tests"), peer.get("failures"), peer.get("skipped")) == ("2", "1", "1")
    assert [f.get("type") for f in ours.iter("failure")] == ["mismatch"]
    assert [f.get("type") for f in peer.iter("failure")] == ["DS-1"]
    assert "ZeRO cells only" in next(peer.iter("skipped")).get("message")


def test_the_report_has_the_findings_table_the_kill_rate_and_a_heat_map_per_subject(tmp_path):
    pytest.importorskip("matplotlib", reason="the nox sessions install matplotlib for the heat-maps")
    parts = tmp_path / "conformance-report" / "default"
    parts.mkdir(parents=True)
    records = _records()
    report.write_part(parts / f"{NEWEST}-autoep.json", records[:2], "default", 12.0)
    report.write_part(parts / f"{NEWEST}-deepspeed.json", records[2:], "default", 3.0)
    kill_table = [{"mutant": "padding_rows_leak", "source": "classic", "killing_cell": records[0]["cell"],
                   "seconds": 2.4}, {"mutant": "other", "source": "x", "killing_cell": None, "seconds": 9.0}]
    (tmp_path / "mutants-report.json").write_text(json.dumps(
        {"transformers": NEWEST, "profile": "default", "mutants": 2, "killed": 1, "kill_rate": 0.5,
         "seconds": 11.4, "kill_table": kill_table}))
    assert len(report.write(parts, tmp_path, "default")) == 4
    text = (tmp_path / "conformance-report.md").read_text()
    assert "1/2 mutants killed (kill rate 50%)" in text and "| other | x | **SURVIVED** | 9.0 |" in text
    assert all(f"| {finding.id} | {finding.kind} |" in text for finding in FINDINGS)
    assert "| " + NEWEST + " | autoep | cpu | 2 | 12.0 |" in text
    assert "fail (DS-1)" in text and "pass 1.0e-07" in text
    for subject in ("autoep", "deepspeed"):
        image = (tmp_path / f"conformance-report-{subject}.png").read_bytes()
        assert image[:8] == b"\x89PNG\r\n\x1a\n" and len(image) > 2000
    assert json.loads((tmp_path / "conformance-report.json").read_text())["mutants"]["killed"] == 1
    ElementTree.parse(tmp_path / "conformance-report.xml")


def test_the_report_says_how_to_measure_the_kill_rate_when_it_is_missing():
    assert "run `nox -s mutants`" in report.markdown(_records(), profile="smoke")



def test_a_peer_gets_no_labelled_rejection_cell_where_the_case_itself_is_refused():
    from conformance.findings import rejection_records

    # On 4.x every case is refused before any engine is built: DS-0 (a DeepSpeed refusal) cannot apply.
    assert rejection_records(profiles.LAST_4X, "deepspeed") == []


def process_groups_gloo_threads_and_engines_on_rank() -> tuple[int, int, int]:
    import gc
    import glob

    import torch.distributed.distributed_c10d as c10d
    from deepspeed.runtime.engine import DeepSpeedEngine

    gc.collect()
    names = [open(path).read().strip() for path in glob.glob("/proc/self/task/*/comm")]
    engines = sum(isinstance(obj, DeepSpeedEngine) for obj in gc.get_objects())
    return len(c10d._world.pg_map), sum(name.startswith(("pt_gloo", "gloo")) for name in names), engines


def test_cells_leave_no_engines_process_groups_or_gloo_threads_behind_on_shared_ranks():
    """Rank processes are shared between cells; a gloo group keeps its threads until the last
    reference to it goes. Measured before the fix: every ZeRO-1/2/3 cell left its engine (model,
    optimizer state, groups) alive, +6 gloo threads per cell and +12 per Universal resume, 893
    threads per rank after ~500 cells, cells 5-100x slower. Causes: engines never destroyed
    (``engine.destroy()`` removes the ZeRO optimizer's gradient hooks, which live in autograd's C++
    nodes, invisible to Python's cycle collector), and two ZeRO-3 module globals
    (conformance/training.py ``_release_zero3_globals``). Every cell now leaves the groups, the
    gloo threads and the engines as it found them."""
    from autoep import launch
    from conformance.runner import run_cell

    warm = Cell(NEWEST, "mixtral", 0, 4, 2, "float32")
    assert run_cell(warm)["status"] == "pass"  # DeepSpeed's cached groups created once
    before = launch.run(4, process_groups_gloo_threads_and_engines_on_rank)
    assert all(engines == 0 for _, _, engines in before), before
    for cell in (Cell(NEWEST, "mixtral", 2, 4, 2, "float32"), Cell(NEWEST, "mixtral", 3, 4, 2, "float32"),
                 Cell(NEWEST, "mixtral", 3, 4, 2, "float32", "w4-ep4"), Cell(NEWEST, "mixtral", "none", 4, 2, "float32")):
        assert run_cell(cell)["status"] == "pass", cell.id
        after = launch.run(4, process_groups_gloo_threads_and_engines_on_rank)
        for (groups, threads, engines), (groups_0, threads_0, _) in zip(after, before):
            assert (groups, engines) == (groups_0, 0), (cell.id, after, before)
            assert threads <= threads_0, (cell.id, after, before)
