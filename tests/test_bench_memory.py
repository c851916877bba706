"""Memory of the MoE layer against the Transformers block at the benchmark's shape (H=512, I=1024,
E=8, top-2, 4096 tokens), counted from the tensors (benchmarks/live_bytes.py): deterministic, so
asserted here; time is only ever measured (``nox -s bench``)."""

import pytest
import torch

from benchmarks.live_bytes import LiveBytes
from benchmarks.moe_layer import DTYPES, FULL, moe_subject, peak_live_bytes, saved_for_backward

# The bound: autoep's peak at most 0.8x the Transformers block's, saved-for-backward below it.
PEAK_RATIO_BOUND = 0.8


def test_live_bytes_counts_the_tensors_alive_at_once():
    with LiveBytes() as live:
        a = torch.zeros(1024, 256)          # 1 MiB
        b = torch.zeros(2048, 256)          # 2 MiB
        view = b[:10]                       # no new storage
        del a
        c = torch.zeros(512, 256)           # 0.5 MiB
    assert live.peak == 3 * 2**20
    assert live.now == 2.5 * 2**20 and view.untyped_storage().nbytes() == 2 * 2**20
    del b, c, view
    assert live.now == 0


def peak_and_saved(variant: str, dtype_name: str) -> tuple[int, int]:
    torch.manual_seed(0)
    subject = moe_subject(variant, DTYPES[dtype_name], FULL["tokens"], 1, torch.Generator().manual_seed(1000))
    return peak_live_bytes(subject), saved_for_backward(subject)["saved_bytes_sum"]


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_autoep_peak_memory_is_at_most_0_8x_the_transformers_block(dtype_name):
    ours_peak, ours_saved = peak_and_saved("autoep", dtype_name)
    hf_peak, hf_saved = peak_and_saved("transformers", dtype_name)
    assert ours_saved < hf_saved, (ours_saved, hf_saved)
    assert ours_peak <= PEAK_RATIO_BOUND * hf_peak, (ours_peak / hf_peak, ours_peak, hf_peak)
