"""The experts' activation: found from the module Transformers' experts actually call.

Transformers builds ``experts.act_fn = ACT2FN[config.hidden_act]`` (an ``nn.Module``), and
anyone can replace it afterwards; the stock experts call whatever ``act_fn`` holds. AutoEP
therefore identifies the activation from that object (its class, and the settings that
change its function), maps it to one canonical *mathematical* name, and computes it with
its own torch function from :data:`ACTIVATIONS`. An object it cannot identify is refused.
Transformers implementations of the same function (``gelu_new``, ``gelu_pytorch_tanh``,
``gelu_accurate`` and ``gelu_fast`` are all the tanh approximation of GELU) share a name.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _relu2(x: torch.Tensor) -> torch.Tensor:
    return torch.square(F.relu(x))


def _gelu_10(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(F.gelu(x), -10.0, 10.0)


def _leaky_relu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.01)


def _laplace(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf((x - 0.707107) / (0.282095 * math.sqrt(2.0))))


def _sqrt_softplus(x: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(F.softplus(x))


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# canonical name -> the function the AutoEP experts apply
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": _gelu_tanh,
    "gelu_10": _gelu_10,
    "quick_gelu": _quick_gelu,
    "relu": F.relu,
    "relu2": _relu2,
    "relu6": F.relu6,
    "leaky_relu": _leaky_relu,
    "hardswish": F.hardswish,
    "mish": F.mish,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "laplace": _laplace,
    "sqrtsoftplus": _sqrt_softplus,
    "linear": _identity,
}

# Transformers' ``hidden_act`` names (ACT2FN keys) -> canonical name. Not listed: prelu and
# xielu, which hold learned parameters the fused experts do not carry.
CONFIG_NAMES: dict[str, str] = {
    "silu": "silu", "swish": "silu",
    "gelu": "gelu", "gelu_python": "gelu",
    "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_python_tanh": "gelu_tanh",
    "gelu_accurate": "gelu_tanh", "gelu_fast": "gelu_tanh",
    "gelu_10": "gelu_10", "quick_gelu": "quick_gelu",
    "relu": "relu", "relu2": "relu2", "relu6": "relu6", "leaky_relu": "leaky_relu",
    "hardswish": "hardswish", "mish": "mish", "sigmoid": "sigmoid", "tanh": "tanh",
    "laplace": "laplace", "sqrtsoftplus": "sqrtsoftplus", "linear": "linear",
}

# Activation classes by (module, class name) -> canonical name; classes are matched exactly
# (a subclass may change ``forward``).
_TRANSFORMERS_CLASSES = {
    "SiLUActivation": "silu", "GELUActivation": "gelu", "GELUTanh": "gelu_tanh",
    "NewGELUActivation": "gelu_tanh", "AccurateGELUActivation": "gelu_tanh", "FastGELUActivation": "gelu_tanh",
    "QuickGELUActivation": "quick_gelu", "ReLUSquaredActivation": "relu2", "MishActivation": "mish",
    "LinearActivation": "linear", "LaplaceActivation": "laplace", "SqrtSoftplusActivation": "sqrtsoftplus",
    "ClippedGELUActivation": "gelu_10",
}
_TORCH_CLASSES = {
    nn.SiLU: "silu", nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh",
    nn.Mish: "mish", nn.Hardswish: "hardswish", nn.Identity: "linear", nn.LeakyReLU: "leaky_relu",
}
_TORCH_FUNCTIONS = {
    F.silu: "silu", F.gelu: "gelu", F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.mish: "mish",
    F.hardswish: "hardswish", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.tanh: "tanh",
    F.tanh: "tanh",
}


class UnsupportedActivationError(ValueError):
    """The experts' activation is not one AutoEP computes."""


def supported() -> str:
    return ", ".join(sorted(CONFIG_NAMES))


def _settings_name(act: nn.Module, name: str) -> str | None:
    """The canonical name when ``act``'s settings keep the function ``name`` describes, else None."""
    if isinstance(act, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    if name == "leaky_relu":
        return name if act.negative_slope == 0.01 else None
    if name == "gelu_10":
        return name if (act.min, act.max) == (-10, 10) else None
    return name


def identify_activation(act: object) -> str:
    """Canonical name of the activation object ``act`` (an experts' ``act_fn``); raises
    :class:`UnsupportedActivationError` naming its class when AutoEP cannot compute it."""
    kind = type(act)
    name = None
    if kind is nn.GELU:
        name = _settings_name(act, "gelu")
    elif kind in _TORCH_CLASSES:
        name = _settings_name(act, _TORCH_CLASSES[kind])
    elif kind.__module__ == "transformers.activations" and kind.__name__ in _TRANSFORMERS_CLASSES:
        name = _settings_name(act, _TRANSFORMERS_CLASSES[kind.__name__])
    elif not isinstance(act, nn.Module) and callable(act):
        try:
            name = _TORCH_FUNCTIONS.get(act)
        except TypeError:  # unhashable callable
            name = None
    if name is None:
        detail = repr(act) if isinstance(act, nn.Module) else getattr(act, "__qualname__", repr(act))
        raise UnsupportedActivationError(
            f"activation {kind.__module__}.{kind.__qualname__} ({detail}) is not one the AutoEP experts compute; "
            f"supported: the Transformers activations {supported()} (ACT2FN[...] with their default settings), "
            "torch.nn SiLU/GELU/ReLU/ReLU6/LeakyReLU(0.01)/Sigmoid/Tanh/Mish/Hardswish/Identity, or "
            "torch.nn.functional silu/gelu/relu/relu6/mish/hardswish/sigmoid/tanh.")
    return name


# ---------------------------------------------------------------------------------------------
# Gated activations with parameters: the whole GLU, not act(gate) * up.
# "swiglu_clamped" is GPT-OSS's clamped SwiGLU (MiniMax-M3's experts and shared expert):
#     g = min(gate, limit), u = clamp(up, -limit, limit), out = (u + 1) * g * sigmoid(alpha * g)
# with alpha and limit read from the module that computes it (never assumed).
CLAMPED_SWIGLU = "swiglu_clamped"
# attributes of a module that hold a clamped activation's settings
CLAMP_ATTRIBUTES = ("swiglu_alpha", "swiglu_limit", "alpha", "limit")


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def clamped_swiglu_params(owner: object, alpha_attr: str, limit_attr: str, where: str) -> tuple[float, float]:
    """(alpha, limit) of a clamped SwiGLU, read from ``owner``'s attributes; refuses a value that
    is missing or not a finite number (limit must be > 0)."""
    values = []
    for attr in (alpha_attr, limit_attr):
        value = getattr(owner, attr, None)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UnsupportedActivationError(
                f"{where}: the clamped SwiGLU needs a finite number in {type(owner).__name__}.{attr}, found "
                f"{value!r}; AutoEP computes (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), "
                "g = clamp(gate, max=limit), with alpha and limit read from the module.")
        values.append(float(value))
    if values[1] <= 0:
        raise UnsupportedActivationError(f"{where}: {type(owner).__name__}.{limit_attr}={values[1]} must be > 0.")
    return values[0], values[1]


def has_custom_gate(experts: object) -> bool:
    """True when the experts' class defines its own ``_apply_gate`` (the gate-up -> hidden step
    that Transformers' experts kernels call), i.e. a GLU other than ``act_fn(gate) * up``."""
    gate = getattr(type(experts), "_apply_gate", None)
    return gate is not None and getattr(gate, "__name__", "") != "_default_apply_gate"
