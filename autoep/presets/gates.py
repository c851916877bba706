"""The gate step of experts modules, declared: what each ``_apply_gate`` of Transformers computes.

The experts-level replacement calls the module's own ``_apply_gate`` (so it computes whatever
the class computes); this table exists for the reference, which computes the experts from their
formulas (``reference/experts.py``) and so must be told which formula a class's gate is, and
where its constants live (read from the module, never assumed). ``gate`` and ``up`` are the two
halves of the up projection when the decorator's ``is_concatenated`` is set, else its even and
odd columns (the reference takes the layout from the flag, not from the class).

Kinds (``L`` a limit, ``a`` an alpha, ``act`` the module's ``act_fn``):

- ``act_glu``            act(gate) * up (Transformers' default gate)
- ``act_then_clamp``     min(act(gate), L) * clamp(up, -L, L); no clamp when L is None
- ``clamp_then_act``     act(min(gate, L)) * clamp(up, -L, L)
- ``clamp_then_silu``    silu(min(gate, L)) * clamp(up, -L, L) (the class calls F.silu, not act_fn)
- ``clamped_swiglu``     (clamp(up, -L, L) + 1) * g * sigmoid(a * g), g = min(gate, L) (GPT-OSS)
- ``softcapped_swiglu``  cg * tanh(gate / cg) * sigmoid(gate) * cu * tanh(up / cu) (act_fn(gate, up))

A class whose ``_apply_gate`` is not in the table still runs experts-level (the replacement calls
it); the reference then has no formula for it and says so (``kind == "unknown"``).
"""

from __future__ import annotations

from dataclasses import dataclass

# experts class name -> (kind, attribute paths of its constants on the experts module)
CUSTOM_GATES: dict[str, tuple[str, tuple[str, ...]]] = {
    "BeamExperts": ("act_glu", ()),  # computed in float32 and rounded back
    "Step3p7Experts": ("act_then_clamp", ("limit",)),
    "BailingHybridExperts": ("act_then_clamp", ("limit",)),
    "DeepseekV4Experts": ("clamp_then_act", ("limit",)),
    "HYV4Experts": ("clamp_then_silu", ("swiglu_limit",)),
    "HYV4VLExperts": ("clamp_then_silu", ("swiglu_limit",)),
    "Glm5NextTextExperts": ("clamp_then_silu", ("swiglu_limit",)),
    "GptOssExperts": ("clamped_swiglu", ("alpha", "limit")),
    "OpenAIPrivacyFilterExperts": ("clamped_swiglu", ("alpha", "limit")),
    "MiniMaxM3VLExperts": ("clamped_swiglu", ("swiglu_alpha", "swiglu_limit")),
    "Inkling2Experts": ("softcapped_swiglu", ("act_fn.gate_softcap.softcap", "act_fn.up_softcap.softcap")),
    "Inkling2LoopExperts": ("softcapped_swiglu", ("act_fn.gate_softcap.softcap", "act_fn.up_softcap.softcap")),
}
GATE_KINDS = ("act_glu", "act_then_clamp", "clamp_then_act", "clamp_then_silu", "clamped_swiglu",
              "softcapped_swiglu", "unknown")


@dataclass(frozen=True)
class GateFormula:
    """What an experts module's gate step computes: a kind of the table above, its constants
    (``None`` for an unset limit) and the activation name (``autoep.activations``) where the kind
    uses ``act_fn``."""

    kind: str
    params: tuple[float | None, ...] = ()
    activation: str | None = None

    def describe(self) -> str:
        act = f"{self.activation}, " if self.activation and self.kind not in ("act_glu",) else ""
        if self.kind == "act_glu":
            return f"{self.activation}(gate) * up"
        values = ", ".join("None" if value is None else f"{value:g}" for value in self.params)
        return f"{self.kind}({act}{values})"

# Experts classes whose own (eager) forward computes the projections and the gate in float32 and rounds
# once at the end: under experts_implementation="eager" (OpenAI's privacy filter defaults to it) the
# reference then rounds only the experts' output, not the values between the projections.
FLOAT32_EAGER = ("OpenAIPrivacyFilterExperts",)
