"""The one place for numeric tolerances, by dtype and comparison kind.

A comparison passes when every element satisfies |actual - expected| <= atol + rtol * |expected|
(the rule of ``torch.testing.assert_close``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float
    why: str
    # "elementwise": |a-e| <= atol + rtol|e| for every element.
    # "norm": ||a-e||_2 <= rtol * ||e||_2 + atol * sqrt(numel) (aggregate error, for bf16).
    metric: str = "elementwise"
    # atol is multiplied by max(1, max|expected|): rounding is relative to the tensor's scale.
    scale_atol: bool = False
    # With a baseline (the original model's error against the same oracle), the norm bound is
    # max(rtol * ||expected||, baseline_factor * ||baseline - expected||).
    baseline_factor: float | None = None


TOLERANCES: dict[tuple[str, str], Tolerance] = {
    # float32 unit roundoff is 6e-8; a length-n dot product of terms of size M carries up to
    # ~n*u*M of rounding, so an element near zero in a tensor whose entries reach M can differ
    # by ~1e-6*M between two correct summation orders. atol is therefore in units of the
    # expected tensor's largest magnitude (scale_atol), never below the stated atol.
    # Model-level comparisons against the oracle also pass when the subject is no farther from it
    # than 2x the original Transformers model is (baseline_factor): in models whose non-MoE layers
    # amplify float32 rounding (Qwen3.5's Gated DeltaNet backward), Transformers itself sits at the
    # edge of the elementwise bound, and the subject cannot be expected to beat its own host model.
    ("float32", "single"): Tolerance(1e-5, 1e-6, "same math in float32; only summation order differs "
                                     "(grouped GEMM vs per-expert loop, fp32 combine vs index_add); atol x "
                                     "max|expected|, or within 2x Transformers' own distance to the oracle",
                                     scale_atol=True, baseline_factor=2.0),
    ("float32", "multi"): Tolerance(1e-4, 1e-5, "float32 with cross-rank reductions (AllToAll regrouping, "
                                    "gradient all-reduce order) accumulating over several steps; atol x "
                                    "max|expected|", scale_atol=True),
    ("float64", "single"): Tolerance(1e-10, 1e-12, "float64: reduction order differences are ~1e-16 relative"),
    # Central differences (f(w+h) - f(w-h)) / 2h in float64 with h = 1e-6: truncation error
    # ~h^2 |f'''| ~ 1e-12, cancellation error ~ 1e-16 |f| / h ~ 1e-10 |f|; the bound leaves 10x.
    ("float64", "finite_difference"): Tolerance(1e-6, 1e-9, "float64 central differences, h=1e-6: "
                                                "truncation ~h^2, cancellation ~1e-16|f|/h", scale_atol=True),
    # bf16 (unit roundoff u = 2^-8 = 3.9e-3): single elements legitimately differ by whole ulps
    # (Transformers rounds each expert's weighted output to bf16 and sums the k slots in bf16;
    # AutoEP sums in float32 and rounds once), so the error is measured as a relative L2 norm
    # against a float32 oracle (the same bf16 weights upcast, MoE blocks in float64). The bound
    # is max(1e-2, 2 x the error of the original Transformers model in bf16 on the same tensor):
    # AutoEP in bf16 must be about as accurate as Transformers in bf16. Backward passes through
    # cross-entropy and attention in bf16 make some gradients' own error exceed 1e-2, which is why
    # the bound follows the baseline; a routing mistake (an O(1) change of a token) exceeds both.
    # Transformers' error on one tensor of a few elements is a noisy estimate of its bf16 error
    # (Qwen3.5's dt_bias has 4 elements; with world 4 the subject measured 2.07x Transformers'
    # error on it while both stayed near 2% relative), so the baseline error of a tensor is the
    # larger of its own and Transformers' median relative error over all gradient tensors.
    # Transformers' is not the only legitimate bf16 rounding: the reference math run at the model's
    # precision (MoE blocks in float64, rounded to bf16 once, as AutoEP's float32 combine does)
    # is another, and the two can part by 5x on a tensor whose gradient is a cancelling sum
    # (5.16.1 Qwen3.5 top-4, seed 0: dt_bias of layer 0 at 1.5% for Transformers, 8.1% for the
    # reference at bf16, 8.2% for AutoEP). So the baseline of each tensor is whichever of the two
    # lies farther from the oracle (conformance.equivalence.farther_run); a routing mistake still
    # moves the subject far beyond both, which are exact math up to rounding.
    ("bfloat16", "single"): Tolerance(1e-2, 0.0, "bf16: relative L2 error vs a float32 oracle <= max(1e-2, "
                                      "2 x the bf16 error of Transformers or of the reference at bf16)", "norm",
                                      baseline_factor=2.0),
    # Cancelling means: a gradient reduced over W ranks is the mean of W micro-batch gradients, each
    # computed (and rounded) in bf16 at its own scale. Where they cancel, the mean is far smaller than
    # its terms and their rounding, relative to the terms, is a large part of it. Measured: DeepSeek-V4's
    # hc_head.hc_scale (one scalar) had per-micro-batch gradients -3.5e-3, -3.7e-3, 5.2e-3, -2.1e-3 in
    # bf16 (5.7e-3 for the third in float32: 9% apart on one micro-batch) whose mean was 1e-4 to 1e-3;
    # AutoEP landed 2.6e-4 from the oracle (4.7% of the terms), Transformers 1.6e-5 on the same draw
    # (by luck: its own error on the terms averaged 3e-4). So a "norm" bound is relative to the larger
    # of ||mean|| and the mean of the oracle's micro-batch gradients' norms, and Transformers' error on
    # the mean is floored by its mean error on the terms (RunOutput.grad_terms): AutoEP may be twice
    # as far from the oracle as Transformers is on what it sums. A tensor whose terms agree is
    # unaffected; a mis-scaled or misrouted gradient is off by O(1) of its terms.
    ("bfloat16", "multi"): Tolerance(1e-2, 0.0, "as bf16 single-process, relative to the micro-batch "
                                     "gradients' norms where their mean cancels; reductions run in float32",
                                     "norm", baseline_factor=2.0),
    ("any", "checkpoint"): Tolerance(0.0, 0.0, "checkpoints store the same bits"),
    # Interop param_order: the update (after - before) of one AdamW step (conformance.training.ADAMW,
    # eps 1e-3, so the update amplifies gradient rounding by at most lr/eps = 1) from a loaded
    # stock optimizer state. float32: gradients agree to ~1e-6 relative, the parameters (~0.3)
    # carry 3e-8 of rounding, updates are ~1e-3: atol 1e-7 (3 ulps of a parameter) + rtol 1e-3.
    # A state on the wrong parameter changes an update by O(lr) = 1e-3.
    ("float32", "optimizer_step"): Tolerance(1e-3, 1e-7, "one AdamW step from the same state: update rounding "
                                             "of ~0.3-sized float32 parameters plus 1e-6 relative gradient "
                                             "differences"),
    # bf16: an update of lr = 1e-3 is about one ulp of a 0.3-sized bf16 parameter (2^-10), so
    # a 1% gradient difference flips the rounding of single elements by a whole update; the
    # update is bounded in relative L2 norm. The optimizer state's placement is checked
    # bit-exactly on its own (interop._state_on_same_names), which is what catches a misorder.
    ("bfloat16", "optimizer_step"): Tolerance(0.5, 0.0, "bf16 AdamW updates are ~1 ulp: single elements round "
                                              "either way; relative L2 of the update", "norm"),
}

# CUDA kernels (``python -m conformance run --device cuda``, ``python -m benchmarks.gpu``). The
# subject and the original Transformers model run on the GPU; the oracle (the reference, MoE blocks
# in float64) stays on the CPU, so every bound below is measured against the same truth as on CPU.
# Conditions, enforced by set_cuda_numerics() (called wherever conformance puts a model on CUDA)
# and checked by tolerance(..., device="cuda"):
#   - TF32 OFF (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, matmul
#     precision "highest"): TF32 keeps 10 mantissa bits (u = 2^-11 = 4.9e-4), 8000x float32's
#     roundoff; a float32 comparison with TF32 on would measure TF32, not the subject.
#   - reduced-precision reductions OFF (allow_bf16/fp16_reduced_precision_reduction): cuBLAS may
#     otherwise round split-K partial sums of a bf16 GEMM to bf16; with it off every bf16 GEMM
#     accumulates in float32, as on the CPU.
# What still differs from the CPU: cuBLAS picks its algorithm per shape (split-K, other tiling),
# reductions run as trees, and index_add_/scatter_add_ (Transformers' combine and the backward of
# its gathers) add with atomics in run-dependent order. Each is a float32 sum in another order:
# worst case n*u*M for a length-n reduction of terms of size M, against the ~sqrt(n)*u*M two
# fixed CPU orders typically part by. With the tiny models' longest reductions (n ~ 64-128) that is
# ~4e-6*M, hence atol 4e-6 x max|expected| and rtol 2e-5 (the CPU bound x 2-4). The baseline rule
# is kept: the original Transformers model runs on the same GPU, so "within 2x Transformers' own
# distance to the oracle" also covers CUDA's attention kernels (SDPA's tiled float32 softmax).
# bf16: the bound is relative (max(1e-2, 2x Transformers' bf16 error on the same device and
# data)); CUDA's bf16 GEMMs accumulate in float32 (reduced-precision reduction off), in other
# orders than the CPU's, which moves both implementations' errors alike: the CPU bound holds.
# Not yet measured on a GPU: each cell records its max |diff| (benchmarks.gpu writes them), and
# these bounds are to be tightened to the measured values with 4x margin after the first run.
CUDA_TOLERANCES: dict[tuple[str, str], Tolerance] = {
    ("float32", "single"): Tolerance(2e-5, 4e-6, "float32 on CUDA, TF32 off: cuBLAS split-K / tree reductions / "
                                     "atomic index_add reorder float32 sums (worst case n*u*M, n ~ 64-128); atol x "
                                     "max|expected|, or within 2x Transformers' own (CUDA) distance to the oracle",
                                     scale_atol=True, baseline_factor=2.0),
    ("float32", "multi"): Tolerance(1e-4, 1e-5, "float32 on CUDA with NCCL reductions over several steps, TF32 "
                                    "off: the CPU multi-process bound already allows 10x the single-process "
                                    "reordering; atol x max|expected|", scale_atol=True),
    ("bfloat16", "single"): Tolerance(1e-2, 0.0, "bf16 on CUDA (float32 GEMM accumulation enforced): relative L2 "
                                      "error vs the float32 CPU oracle <= max(1e-2, 2 x Transformers' own bf16 "
                                      "error on the same GPU)", "norm", baseline_factor=2.0),
    ("bfloat16", "multi"): Tolerance(1e-2, 0.0, "as bf16 single-process on CUDA; NCCL reductions in float32",
                                     "norm", baseline_factor=2.0),
}


def cuda_numerics() -> dict[str, object]:
    """The CUDA math settings the tolerances above assume, as they are now."""
    matmul = torch.backends.cuda.matmul
    return {"matmul.allow_tf32": matmul.allow_tf32, "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "matmul.allow_bf16_reduced_precision_reduction": matmul.allow_bf16_reduced_precision_reduction,
            "matmul.allow_fp16_reduced_precision_reduction": matmul.allow_fp16_reduced_precision_reduction}


# What cuda_numerics() must read for a comparison on CUDA (see CUDA_TOLERANCES).
REQUIRED_CUDA_NUMERICS = {"matmul.allow_tf32": False, "cudnn.allow_tf32": False, "float32_matmul_precision": "highest",
                          "matmul.allow_bf16_reduced_precision_reduction": False,
                          "matmul.allow_fp16_reduced_precision_reduction": False}


def set_cuda_numerics() -> dict[str, object]:
    """Turn TF32 and reduced-precision GEMM reductions off for this process (see CUDA_TOLERANCES);
    returns the settings now in force. Harmless without a GPU (they are flags)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    return cuda_numerics()


def check_cuda_numerics() -> None:
    """Refuse a CUDA comparison under settings the CUDA tolerances do not cover."""
    now = cuda_numerics()
    wrong = {key: value for key, value in now.items() if value != REQUIRED_CUDA_NUMERICS[key]}
    if wrong:
        raise RuntimeError(
            f"CUDA comparison under {wrong}: the CUDA tolerances (conformance/tolerances.py CUDA_TOLERANCES) "
            f"assume {REQUIRED_CUDA_NUMERICS} (TF32 off: float32 GEMMs would otherwise keep 10 mantissa bits). "
            "Call conformance.tolerances.set_cuda_numerics() before running on CUDA.")


# Interop generate: a greedy pick whose top-1 / top-2 logit gap is below this fraction of the
# largest |logit| counts as a near-tie (the prompt is redrawn). bf16: the subject's logits may
# differ from Transformers' by ~1% relative (the bf16 bound above), elementwise by a few ulps
# (2^-8 = 0.4% of the largest logit each); 3% is ~8 ulps, beyond what two correct bf16
# implementations part by. float32: 100x the float32 elementwise bound.
ARGMAX_NEAR_TIE = {"float32": 1e-3, "bfloat16": 3e-2}


def tolerance(dtype: torch.dtype | str, kind: str = "single", device: str = "cpu") -> Tolerance:
    """The bound for ``dtype`` and comparison ``kind``; ``device="cuda"``: for a subject that ran on
    CUDA (CUDA_TOLERANCES where CUDA kernels need their own bound, after checking the CUDA math
    settings; the CPU bound where its justification holds as it is, e.g. checkpoints' bits)."""
    name = dtype if isinstance(dtype, str) else str(dtype).replace("torch.", "")
    if kind == "checkpoint":
        return TOLERANCES[("any", "checkpoint")]
    if device == "cuda":
        check_cuda_numerics()
        if (name, kind) in CUDA_TOLERANCES:
            return CUDA_TOLERANCES[(name, kind)]
    elif device != "cpu":
        raise ValueError(f"device={device!r}: tolerances are stated for 'cpu' and 'cuda'")
    return TOLERANCES[(name, kind)]


@dataclass
class Comparison:
    what: str
    max_abs_diff: float
    max_excess: float  # max of |a-e| - (atol + rtol |e|); <= 0 means within tolerance
    ok: bool

    def __str__(self) -> str:
        return f"{self.what}: max|diff|={self.max_abs_diff:.3g} ({'ok' if self.ok else 'OUT OF TOLERANCE'})"


def compare(what: str, actual: torch.Tensor, expected: torch.Tensor, tol: Tolerance,
            baseline: torch.Tensor | None = None, baseline_relative: float | None = None,
            terms_norm: float | None = None, baseline_terms_error: float | None = None) -> Comparison:
    """``baseline``: another implementation's value of the same tensor (its error scales a
    bound that has a ``baseline_factor``); ``baseline_relative``: that implementation's typical
    relative error over many tensors, a floor for its error on this one (see TOLERANCES).
    ``terms_norm``: where ``expected`` is the mean of several micro-batches' values, the mean of
    their norms: the scale their rounding is relative to (a "norm" bound is relative to the larger
    of it and ``||expected||``); ``baseline_terms_error``: the mean over those micro-batches of the
    baseline's error on each, a floor for its error on the mean (see TOLERANCES, cancelling means)."""
    if actual.shape != expected.shape:
        return Comparison(f"{what} (shape {tuple(actual.shape)} vs {tuple(expected.shape)})", float("inf"),
                          float("inf"), False)
    actual64 = actual.detach().to(torch.float64)
    expected64 = expected.detach().to(torch.float64)
    if actual64.numel() == 0:
        return Comparison(what, 0.0, 0.0, True)
    diff = (actual64 - expected64).abs()
    finite = bool(torch.isfinite(actual64).all() and torch.isfinite(expected64).all())
    if tol.metric == "norm":
        scale = max(float(expected64.norm()), terms_norm or 0.0)
        bound = tol.rtol * scale + tol.atol * actual64.numel() ** 0.5
        if baseline is not None and tol.baseline_factor is not None:
            baseline_error = float((baseline.detach().to(torch.float64) - expected64).norm())
            if baseline_relative is not None:
                baseline_error = max(baseline_error, baseline_relative * scale)
            baseline_error = max(baseline_error, baseline_terms_error or 0.0)
            bound = max(bound, tol.baseline_factor * baseline_error)
        max_excess = float(diff.norm()) - bound
    else:
        atol = tol.atol * max(1.0, float(expected64.abs().max())) if tol.scale_atol else tol.atol
        max_excess = float((diff - (atol + tol.rtol * expected64.abs())).max())
        if max_excess > 0 and baseline is not None and tol.baseline_factor is not None:
            baseline_error = float((baseline.detach().to(torch.float64) - expected64).abs().max())
            max_excess = min(max_excess, float(diff.max()) - tol.baseline_factor * baseline_error)
    return Comparison(what, float(diff.max()), max_excess, finite and max_excess <= 0)


def assert_close(what: str, actual: torch.Tensor, expected: torch.Tensor, tol: Tolerance) -> Comparison:
    result = compare(what, actual, expected, tol)
    if not result.ok:
        raise AssertionError(f"{result} [rtol={tol.rtol}, atol={tol.atol}: {tol.why}]")
    return result


def checks_record(checks: list) -> dict:
    """The record of a cell judged by a list of comparisons against the reference."""
    failures = [str(check) for check in checks if not check.ok]
    return {"status": "pass" if not failures else "fail", "detail": "; ".join(failures[:5]),
            "max_abs_diff": {"subject~reference": max(check.max_abs_diff for check in checks)}}
