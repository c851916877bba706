"""The CUDA plumbing, checked on the CPU so that it cannot rot: the --device flag, which cells fit
the visible GPUs (torch.cuda.device_count patched), the report's device, the launcher's backend,
the CUDA tolerances' TF32 rule, and benchmarks.gpu (its one line without CUDA, its sections on tiny
shapes on the CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autoep.launch import backend_for
from conformance import runner
from conformance.tolerances import TOLERANCES, CUDA_TOLERANCES, cuda_numerics, set_cuda_numerics, tolerance
from matrix.cells import Cell, cells
from matrix.profiles import NEWEST

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def numerics_restored():
    from benchmarks.gpu import restore_numerics

    saved = cuda_numerics()
    yield
    restore_numerics(saved)


def _gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def _cell(**changes) -> Cell:
    base = dict(transformers=NEWEST, case="mixtral", zero_stage="none", world_size=1, autoep_size=1,
                dtype="float32")
    return Cell(**{**base, **changes})


def test_backend_for_each_device():
    assert backend_for("cpu") == "gloo"
    assert backend_for("cuda") == "nccl"
    with pytest.raises(ValueError, match="device='xpu'"):
        backend_for("xpu")


def test_which_cells_fit_two_gpus(monkeypatch):
    _gpus(monkeypatch, 2)
    assert runner.device_unfit_reason(_cell(), "cuda") is None
    assert runner.device_unfit_reason(_cell(world_size=2, autoep_size=2), "cuda") is None
    assert runner.device_unfit_reason(_cell(zero_stage=2, world_size=4, autoep_size=2), "cuda") == \
        "needs 4 GPUs, 2 visible"
    # A checkpoint cell needs GPUs for both ends: w2 -> w4.
    resume = next(c for c in cells() if c.resume == "w4-ep4" and c.world_size == 2)
    assert runner.gpus_needed(resume) == 4
    assert runner.device_unfit_reason(resume, "cuda") == "needs 4 GPUs, 2 visible"
    assert "CPU only" in runner.device_unfit_reason(_cell(interop="generate"), "cuda")
    # The CPU runs everything, whatever the GPUs.
    assert runner.device_unfit_reason(_cell(zero_stage=2, world_size=4, autoep_size=2), "cpu") is None
    with pytest.raises(ValueError, match="device='tpu'"):
        runner.device_unfit_reason(_cell(), "tpu")


def test_no_gpu_cells_are_skipped_with_the_reason(monkeypatch):
    _gpus(monkeypatch, 0)
    record = runner.run_cell(_cell(), "autoep", device="cuda")
    assert (record["status"], record["reason"], record["device"]) == ("skipped", "needs 1 GPU, 0 visible", "cuda")


def test_conformance_run_device_cuda_without_gpus_records_every_cell_skipped(monkeypatch, tmp_path, capsys):
    """`python -m conformance run --device cuda` end to end (in-process) with no GPU: every cell of the
    smoke profile's mixtral case is recorded, none runs, the part and the report name the device."""
    from conformance.__main__ import main

    _gpus(monkeypatch, 0)
    assert main(["run", "--profile", "smoke", "--case", "mixtral", "--device", "cuda", "--out", str(tmp_path)]) == 0
    part = json.loads((tmp_path / "conformance-report" / "smoke" / f"{NEWEST}-autoep-cuda.json").read_text())
    assert part["run"]["device"] == "cuda: none visible"
    records = part["records"]
    assert records and all(r["device"] == "cuda" for r in records)
    runnable = [r for r in records if r["status"] not in ("not_applicable", "not_implemented")]
    assert runnable and {r["status"] for r in runnable} == {"skipped"}
    for record in runnable:
        if record["interop"] is None:
            needed = max(record["world_size"], int(record["resume"][1]) if record["resume"] else 0)
            assert record["reason"] == f"needs {needed} GPU{'s' if needed > 1 else ''}, 0 visible", record
    report = (tmp_path / "conformance-report.md").read_text()
    assert "| cuda: none visible |" in report and "[cuda]" in report


def test_device_flag_is_checked(tmp_path, capsys):
    from conformance.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--device", "gpu", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "invalid choice: 'gpu'" in capsys.readouterr().err


def test_cuda_tolerances_refuse_tf32(numerics_restored):
    torch.backends.cuda.matmul.allow_tf32 = True
    with pytest.raises(RuntimeError, match="matmul.allow_tf32"):
        tolerance(torch.float32, "single", "cuda")
    settings = set_cuda_numerics()
    assert settings["matmul.allow_tf32"] is False and settings["float32_matmul_precision"] == "highest"
    assert tolerance(torch.float32, "single", "cuda") is CUDA_TOLERANCES[("float32", "single")]
    assert tolerance(torch.bfloat16, "multi", "cuda") is CUDA_TOLERANCES[("bfloat16", "multi")]
    assert tolerance(torch.float32, "single") is TOLERANCES[("float32", "single")]  # the CPU bound as it was
    assert tolerance(torch.float32, "checkpoint", "cuda") is TOLERANCES[("any", "checkpoint")]
    with pytest.raises(ValueError, match="device='mps'"):
        tolerance(torch.float32, "single", "mps")


def test_benchmarks_gpu_without_cuda_prints_one_line_and_exits_0():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the module would run")
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--out", "/nonexistent/never-written"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("benchmarks.gpu: no CUDA device visible"), done.stdout


def test_benchmarks_gpu_sections_on_tiny_shapes_on_the_cpu():
    """The measurement code on the CPU (perf_counter instead of CUDA events): numbers of the right
    kind, and the host-read counter finds the per-expert loop's .tolist() (once per step, in the
    experts' forward) and nothing on the grouped_mm path."""
    from benchmarks import gpu

    tiny = {"family": "mixtral", "hidden": 64, "intermediate": 128, "experts": 4, "top_k": 2, "tokens": 32}
    gemm = gpu.gemm_comparison(tiny, "cpu", 0, 1)
    assert [row["projection"] for row in gemm] == ["gate_up", "down"]
    assert gemm[0]["flop"] == 2 * 64 * 64 * 256 and all(row["grouped_mm_tflops"] > 0 for row in gemm)
    layer = gpu.layer_throughput(tiny, "cpu", 0, 1)
    assert layer["autoep"]["kernel"] == "grouped_mm" and layer["autoep"]["tokens_per_s"] > 0
    assert layer["autoep"]["expert_tflops"] == pytest.approx(
        18 * 64 * 128 * 32 * 2 / (layer["autoep"]["step_ms"] * 1e-3) / 1e12)
    assert layer["transformers"]["peak_memory_bytes"] is None  # CUDA only
    tolist = torch.Tensor.tolist
    assert gpu.layer_syncs(tiny, "cpu", 32)["host_reads"] == 0
    eager = gpu.layer_syncs(tiny, "cpu", 32, experts_implementation="eager")
    assert eager["kernel"] == "loop"
    # One read of the counts per step: the experts' forward reads them once for both expert linears and
    # its backward reuses the list.
    assert eager["host_reads"] == 1 and all(site.startswith("Tensor.tolist() at autoep/experts.py:") and
                                            site.endswith(" forward") for site in eager["host_read_sites"])
    assert torch.Tensor.tolist is tolist and "tolist" not in vars(torch.Tensor)  # the wrappers are gone


def test_peak_table():
    from benchmarks.gpu import peak_bf16_tflops

    assert peak_bf16_tflops("NVIDIA H200") == 989.0
    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_bf16_tflops("Some Future GPU") is None


def test_nox_passes_the_device_on():
    pytest.importorskip("nox")
    sys.path.insert(0, str(REPO))
    import noxfile

    assert noxfile._option(["--profile", "smoke", "--device", "cuda"], "--device", "cpu") == "cuda"
    assert noxfile._option(["--device=cuda"], "--device", "cpu") == "cuda"
    assert noxfile._option(["--profile", "smoke"], "--device", "cpu") == "cpu"
    assert noxfile._option(["--out", "/tmp/x", "--device", "cuda"], "--out") == "/tmp/x"


def test_nox_conformance_runs_the_peer_after_an_autoep_failure_and_then_takes_the_verdict():
    """An autoep failure (exit 1) must not stop the DeepSpeed run of that version: both runs accept
    exit 1, and the last step (the report) fails the session when any autoep cell failed."""
    pytest.importorskip("nox")
    sys.path.insert(0, str(REPO))
    import noxfile

    class Session:
        posargs = ["--profile", "smoke", "--out", "/tmp/o"]
        env: dict = {}
        virtualenv = type("V", (), {"location": "/tmp/venv"})()
        calls: list = []

        def install(self, *args, **kwargs):
            pass

        def skip(self, why):
            raise AssertionError(why)

        def run(self, *args, **kwargs):
            self.calls.append((args, kwargs))

    session = Session()
    noxfile.conformance(session, noxfile.NEWEST)
    runs = [(args[3:], kwargs.get("success_codes")) for args, kwargs in session.calls]
    assert runs[0][0][0] == "run" and "--subject" not in runs[0][0] and runs[0][1] == [0, 1]
    assert runs[1][0][:3] == ("run", "--subject", "deepspeed") and runs[1][1] == [0, 1]
    assert runs[2][0][:3] == ("run", "--subject", "transformers_ep") and runs[2][1] == [0, 1]
    assert runs[3] == (("report", "--profile", "smoke", "--out", "/tmp/o"), None)
    # On Transformers 4.x every peer cell is not applicable: only autoep's run and the report.
    Session.calls = []
    session.posargs = ["--profile", "default", "--out", "/tmp/o"]
    noxfile.conformance(session, "4.57.6")
    runs = [args[3:] for args, kwargs in Session.calls]
    assert [run[0] for run in runs] == ["run", "report"] and "--subject" not in runs[0], runs


def test_nox_bench_passes_its_options_on_and_refuses_an_unknown_one():
    pytest.importorskip("nox")
    sys.path.insert(0, str(REPO))
    import noxfile

    class Session:
        env: dict = {}
        virtualenv = type("V", (), {"location": "/tmp/venv"})()

        def __init__(self, posargs):
            self.posargs, self.calls = posargs, []

        def install(self, *args, **kwargs):
            pass

        def error(self, why):
            raise SystemExit(why)

        def run(self, *args, **kwargs):
            self.calls.append(args)

    session = Session(["--quick", "--out", "b.json", "--out-dir=curves"])
    noxfile.bench(session)
    assert session.calls == [("python", "-m", "benchmarks.moe_layer", "--quick", "--out", "b.json"),
                             ("python", "-m", "benchmarks.curves", "--quick", "--out-dir", "curves")]
    with pytest.raises(SystemExit, match="unknown argument '--tokens'"):
        noxfile.bench(Session(["--tokens", "4096"]))
