import contextlib
import json
import signal
import time

import pytest

from autoep import AutoEPConfig, AutoEPConfigError


def test_defaults_and_round_trip():
    config = AutoEPConfig.from_dict({"enabled": True, "autoep_size": 4, "preset_model": "mixtral"})
    assert (config.enabled, config.autoep_size, config.preset_model) == (True, 4, "mixtral")
    assert AutoEPConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("block, key, fragment", [
    ({"autoep_sise": 2}, "autoep_sise", "Did you mean 'autoep_size'"),
    ({"enabled": "yes"}, "enabled", "true or false"),
    ({"autoep_size": 0}, "autoep_size", ">= 1"),
    ({"autoep_size": 2.0}, "autoep_size", "an integer"),
    ({"load_balance_coeff": 0.01}, "load_balance_coeff", "not supported"),
    ({"expert_tensor_parallel_size": 2}, "expert_tensor_parallel_size", "only 1"),
    ({"preset_model": "llama"}, "preset_model", "Available presets: bailing_hybrid, deepseek_ocr2"),
    ({"score_func": "relu"}, "score_func", '"softmax" or "sigmoid"'),
    ({"top_k": 0}, "top_k", "integer >= 1"),
    ({"routed_scaling_factor": float("nan")}, "routed_scaling_factor", "finite"),
    ({"route_scale": 2.0, "routed_scaling_factor": 2.5}, "route_scale", "set only routed_scaling_factor"),
    ({"num_expert_groups": 4}, "num_limited_groups", "set together"),
    ({"comm_backend": "deepep"}, "comm_backend", "DeepSpeed's built-in AutoEP"),
    ({"expert_w3": "up_proj"}, "expert_w3", "fused"),
    ({"moe_layer_pattern": "model.(layers"}, "moe_layer_pattern", "regular expression"),
])
def test_rejections_name_key_and_value(block, key, fragment):
    with pytest.raises(AutoEPConfigError) as raised:
        AutoEPConfig.from_dict(block)
    message = str(raised.value)
    assert key in message and fragment in message
    assert isinstance(raised.value, ValueError)


def test_null_load_balance_coeff_is_accepted():
    assert AutoEPConfig.from_dict({"load_balance_coeff": None}).load_balance_coeff is None


def test_block_must_be_a_mapping():
    with pytest.raises(AutoEPConfigError, match="JSON object"):
        AutoEPConfig.from_dict(["enabled"])


# ------------------------------------------------------------------ hostile numbers (issue 10, item 12)

@pytest.mark.parametrize("block, key", [
    ({"route_scale": 10**400}, "route_scale"),  # math.isfinite raised OverflowError
    ({"routed_scaling_factor": -10**400}, "routed_scaling_factor"),
    ({"routed_scaling_factor": 10**5000}, "routed_scaling_factor"),  # not even printable
    ({"top_k": 10**5000}, "top_k"),
    ({"autoep_size": -10**5000}, "autoep_size"),
    ({"num_expert_groups": 2**65, "num_limited_groups": 1}, "num_expert_groups"),
])
def test_huge_integers_are_refused_naming_the_key(block, key):
    with pytest.raises(AutoEPConfigError, match=rf"^expert_parallel\.{key}") as raised:
        AutoEPConfig.from_dict(block)
    assert "integer of" in str(raised.value)  # shown by size, not by its thousands of digits


# ------------------------------------------------------- DeepSpeed keys of the wrong type (item 12)

import os  # noqa: E402

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import autoep  # noqa: E402
from matrix.models import CASES_BY_ID, ModelSnapshot  # noqa: E402

EP = {"expert_parallel": {"enabled": True, "autoep_size": 2}, "train_micro_batch_size_per_gpu": 1}
ZERO3 = {"stage": 3}


@pytest.mark.parametrize("extra, message", [
    ({"tensor_parallel": {"autotp_size": "2"}}, r"^tensor_parallel\.autotp_size='2' \(str\): must be an integer"),
    ({"tensor_parallel": None}, r"^tensor_parallel=None \(NoneType\): must be a JSON object"),
    ({"zero_optimization": None}, r"^zero_optimization=None \(NoneType\): must be a JSON object"),
    ({"zero_optimization": {"stage": "3"}}, r"^zero_optimization\.stage='3' \(str\): must be an integer"),
    ({"zero_optimization": {"stage": True}}, r"^zero_optimization\.stage=True \(bool\): must be an integer"),
    ({"zero_optimization": {"mics_shard_size": "2"}}, r"^zero_optimization\.mics_shard_size='2': .*MiCS"),
    ({"zero_optimization": {**ZERO3, "zero_hpz_partition_size": "2"}},
     r"^zero_optimization\.zero_hpz_partition_size='2' \(str\): must be an integer"),
    ({"zero_optimization": ZERO3, "sequence_parallel_size": "2"},
     r"^sequence_parallel_size='2' \(str\): must be an integer"),
    ({"zero_optimization": {**ZERO3, "zero_quantized_gradients": "false"}},
     r"^zero_optimization\.zero_quantized_gradients='false' \(str\): must be true or false"),
    ({"hybrid_engine": []}, r"^hybrid_engine=\[\] \(list\): must be a JSON object"),
    ({"use_data_before_expert_parallelism": 1}, r"^use_data_before_expert_parallelism=1 \(int\): must be true"),
    ({"zero_optimization": {**ZERO3, "zero_hpz_partition_size": 10**5000}},
     r"^zero_optimization\.zero_hpz_partition_size=<an integer of \d+ bits>: .*hpZeRO"),
])
def test_a_wrongly_typed_deepspeed_key_is_refused_naming_it(mixtral, extra, message):
    snapshot = ModelSnapshot.of(mixtral)
    with pytest.raises(AutoEPConfigError, match=message):
        autoep.initialize(model=mixtral, config={**EP, **extra})
    assert snapshot.unchanged(mixtral) and not dist.is_initialized()


# ------------------------------------ ZeRO-3 with a native DeepSpeed MoE: refused up front (item 13)

def test_zero3_with_native_deepspeed_moe_is_refused_before_anything_changes(mixtral):
    from deepspeed.moe.layer import MoE

    mixtral.native_moe = MoE(hidden_size=32, expert=torch.nn.Linear(32, 32), num_experts=2, ep_size=1, k=1)
    snapshot = ModelSnapshot.of(mixtral)
    with pytest.raises(AutoEPConfigError, match=r"^zero_optimization.stage=3 with native deepspeed.moe.layer.MoE "
                                                r"modules \(\['native_moe'\]\): .*AutoEP-managed"):
        autoep.initialize(model=mixtral, config={**EP, "zero_optimization": ZERO3})
    # Before the fix the check ran inside deepspeed.initialize: blocks replaced, process group up.
    assert snapshot.unchanged(mixtral) and not dist.is_initialized()


# ------------------------------------------- `autoep inspect` with a bad config: one line (item 12)

@pytest.mark.parametrize("content, fragment", [
    ('{"expert_parallel": {"route_scale": 1' + "0" * 400 + '}}', "expert_parallel.route_scale must be a finite"),
    ('{"expert_parallel": {"top_k": "2"}}', "expert_parallel.top_k must be"),
    ('{"expert_parallel": {"moe_layer_pattern": "' + "(" * 1000 + '"}}', "expert_parallel.moe_layer_pattern="),
    ('["expert_parallel"]', "must hold a JSON object, got a list"),
    ('{"expert_parallel": ', "is not valid JSON"),
    ('{"autoep_size": 1' + "0" * 5000 + '}', "is not valid JSON"),  # beyond Python's int-reading limit
])
def test_inspect_with_a_bad_config_prints_one_line_and_fails(tmp_path, capsys, content, fragment):
    from autoep.cli import main

    path = tmp_path / "ds.json"
    path.write_text(content)
    assert main(["inspect", "mixtral", "--ep-config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("autoep inspect: error: ") and fragment in err, err
    assert err.count("\n") == 1 and "Traceback" not in err and len(err) < 1000


# ------------------------------------------------ moe_layer_pattern matching is bounded (item 14)

CATASTROPHIC = r"(.*)*X"  # exponential backtracking: measured > 5 s on one 31-character module name


@contextlib.contextmanager
def _hang_guard(seconds: int):
    """Fail (instead of hanging the suite) if the body runs longer than ``seconds``."""
    def on_alarm(*_):
        raise AssertionError(f"still running after {seconds} s: the pattern match was not bounded")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("call", ["inspect", "apply"])
def test_a_catastrophic_pattern_is_refused_within_the_budget(mixtral, monkeypatch, call):
    from autoep import detect

    monkeypatch.setattr(detect, "PATTERN_MATCH_BUDGET_S", 1.0)
    snapshot = ModelSnapshot.of(mixtral)
    start = time.monotonic()
    with _hang_guard(30), pytest.raises(detect.DetectionError, match=r"did not finish matching the model's \d+ "
                                                                     r"module names within 1 s"):
        getattr(autoep, call)(mixtral, {"moe_layer_pattern": CATASTROPHIC})
    assert time.monotonic() - start < 15  # the budget plus starting the matcher, on a loaded machine
    assert snapshot.unchanged(mixtral)


def test_a_catastrophic_pattern_in_inspect_cli_fails_with_one_line(tmp_path, capsys, monkeypatch):
    from autoep import detect
    from autoep.cli import main

    monkeypatch.setattr(detect, "PATTERN_MATCH_BUDGET_S", 1.0)
    path = tmp_path / "ep.json"
    path.write_text(json.dumps({"moe_layer_pattern": CATASTROPHIC}))
    with _hang_guard(60):
        assert main(["inspect", "mixtral", "--ep-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("autoep inspect: error: expert_parallel.moe_layer_pattern='(.*)*X' did not finish")
    assert err.count("\n") == 1


def test_a_plain_pattern_finds_the_same_blocks_as_the_preset(mixtral):
    by_class = autoep.inspect(mixtral)
    by_pattern = autoep.inspect(mixtral, {"moe_layer_pattern": r"model\.layers\.\d+\.mlp"})
    assert [s.name for s in by_pattern] == [s.name for s in by_class] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert [s.row() for s in by_pattern] == [s.row() for s in by_class]
