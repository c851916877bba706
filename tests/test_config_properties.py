"""Property tests of config validation: a generated ``expert_parallel`` block or DeepSpeed
config, however hostile (huge ints, inf/nan, bools, strings, nested lists/dicts, null), is
either accepted or refused with an :class:`AutoEPConfigError` that names the key; no other
exception ever escapes, and an accepted block never crashes detection.

Examples per run (hypothesis ``max_examples``): ``BLOCK_EXAMPLES`` + ``EXTREME_EXAMPLES`` +
``DEEPSPEED_EXAMPLES`` generated configs; ``test_property_over_its_generated_configs`` checks
that each property tried all of its own.
"""

from dataclasses import fields

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import autoep
from autoep.config import MAX_INT, AutoEPConfig, AutoEPConfigError
from autoep.detect import DetectionError
from autoep.engine import validate_deepspeed_config
from matrix.models import CASES_BY_ID

BLOCK_EXAMPLES, EXTREME_EXAMPLES, DEEPSPEED_EXAMPLES = 1000, 250, 600
TRIED = {"block": 0, "extreme": 0, "deepspeed": 0}

# 10**400 overflows a float; 10**5000 cannot even be printed (Python's int-to-str limit), so
# it is built by a map (hypothesis itself prints the elements of a sampled_from).
HUGE_INTS = st.sampled_from([10**400, -10**400, 2**63, 2**64 + 1, MAX_INT, MAX_INT + 1]) | \
    st.just(5000).map(lambda digits: 10**digits)
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), HUGE_INTS,
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
    st.sampled_from(["auto", "softmax", "sigmoid", "mixtral", "", "2", "true", "(", "a{99999999999}",
                     "(" * 2000 + ")" * 2000]))
HOSTILE = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=4), inner, max_size=3), max_leaves=5)
BLOCK_KEYS = [f.name for f in fields(AutoEPConfig)] + ["comm_backend", "autoep_sise", ""]


def _names_a_key(message: str, keys) -> bool:
    return any(f"expert_parallel.{key}" in message or repr(key) in message for key in keys)


@settings(max_examples=BLOCK_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(BLOCK_KEYS), HOSTILE, max_size=4))
def a_hostile_block_is_accepted_or_refused_naming_a_key(block):
    TRIED["block"] += 1
    try:
        AutoEPConfig.from_dict(block)
    except AutoEPConfigError as error:
        assert _names_a_key(str(error), block), str(error)
        assert len(str(error)) < 1000  # a hostile value is shown bounded


@pytest.fixture(scope="module")
def deepseek_v3():
    return CASES_BY_ID["deepseek_v3-grouped-scaled"].build()


POSITIVE_INTS = st.integers(1, 8) | st.sampled_from([MAX_INT, MAX_INT + 1, 10**400])
POSITIVE_FLOATS = st.floats(min_value=0.0, exclude_min=True, allow_infinity=False) | st.sampled_from([10**400])
EXTREME_BLOCK = st.fixed_dictionaries({}, optional={
    "top_k": POSITIVE_INTS | st.just("auto"), "autoep_size": POSITIVE_INTS,
    "num_expert_groups": POSITIVE_INTS, "num_limited_groups": POSITIVE_INTS,
    "route_scale": POSITIVE_FLOATS, "routed_scaling_factor": POSITIVE_FLOATS | st.just("auto"),
    "score_func": st.sampled_from(["auto", "softmax", "sigmoid"]), "route_norm": st.none() | st.booleans(),
    "has_shared_experts": st.none() | st.booleans(), "use_grouped_mm": st.booleans()})


@settings(max_examples=EXTREME_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(EXTREME_BLOCK)
def an_accepted_block_with_extreme_values_never_crashes_detection(deepseek_v3, block):
    """Well-typed but extreme values (huge counts, tiny or huge scales): refused naming the key,
    or accepted and then detected or refused by detection, always as a ValueError."""
    TRIED["extreme"] += 1
    try:
        config = AutoEPConfig.from_dict({**block, "enabled": True})
    except AutoEPConfigError as error:
        assert _names_a_key(str(error), block), str(error)
        return
    try:
        specs = autoep.inspect(deepseek_v3, config)
    except DetectionError as error:
        assert "expert_parallel" in str(error) or "top_k" in str(error), str(error)
        return
    assert len(specs) == 2


def _section(keys: dict):
    """A DeepSpeed config section: an object holding some of ``keys``, or a hostile non-object."""
    return st.fixed_dictionaries({}, optional=keys) | HOSTILE


DEEPSPEED_CONFIG = st.fixed_dictionaries({}, optional={
    "zero_optimization": _section({
        "stage": st.integers(0, 3) | HOSTILE, "mics_shard_size": HOSTILE,
        "zero_hpz_partition_size": st.integers(0, 2) | HOSTILE,
        "zero_quantized_gradients": st.booleans() | HOSTILE}),
    "tensor_parallel": _section({"autotp_size": st.integers(0, 2) | HOSTILE}),
    "hybrid_engine": _section({"enabled": st.booleans() | HOSTILE}),
    "sequence_parallel_size": st.integers(0, 2) | HOSTILE,
    "use_data_before_expert_parallelism": st.booleans() | HOSTILE,
    "train_micro_batch_size_per_gpu": st.just(1),
})


def _key_paths(config: dict) -> list[str]:
    paths = list(config)
    for section, value in config.items():
        if isinstance(value, dict):
            paths += [f"{section}.{key}" for key in value]
    return paths


@settings(max_examples=DEEPSPEED_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(DEEPSPEED_CONFIG)
def a_hostile_deepspeed_config_is_accepted_or_refused_naming_the_key(ds_config):
    TRIED["deepspeed"] += 1
    try:
        validate_deepspeed_config(ds_config)
    except AutoEPConfigError as error:
        message = str(error)
        assert any(message.startswith(f"{path}=") for path in _key_paths(ds_config)), message
        assert len(message) < 1000


PROPERTIES = {
    "block": (a_hostile_block_is_accepted_or_refused_naming_a_key, BLOCK_EXAMPLES, False),
    "extreme": (an_accepted_block_with_extreme_values_never_crashes_detection, EXTREME_EXAMPLES, True),
    "deepspeed": (a_hostile_deepspeed_config_is_accepted_or_refused_naming_the_key, DEEPSPEED_EXAMPLES, False),
}


@pytest.mark.parametrize("name", list(PROPERTIES))
def test_property_over_its_generated_configs(name, request):
    """Each property runs its hypothesis search here and must have tried every example it
    promises (the count is checked in the same test, so it holds under any test distribution)."""
    prop, examples, needs_model = PROPERTIES[name]
    TRIED[name] = 0
    prop(request.getfixturevalue("deepseek_v3")) if needs_model else prop()
    print(f"generated configs tried by {name}: {TRIED[name]}")
    assert TRIED[name] == examples
