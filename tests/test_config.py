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
    ({"preset_model": "llama"}, "preset_model", "deepseek_v2, deepseek_v3, mixtral, qwen3_5_moe, qwen3_moe"),
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
