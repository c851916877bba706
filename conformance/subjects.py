"""Subject adapters: how a conformance cell builds the implementation under test.

The suite never imports an implementation directly; it asks a subject to turn the
original model into its expert-parallel version. ``autoep`` is ours; ``deepspeed``
(DeepSpeed's built-in AutoEP) joins when cells run under ``deepspeed.initialize``.
"""

from __future__ import annotations

from typing import Protocol

from torch import nn


class Subject(Protocol):
    name: str

    def unavailable_reason(self) -> str | None:
        """None when the subject can run here, else why not."""

    def apply(self, model: nn.Module, block: dict) -> nn.Module:
        """Return the subject's replacement of ``model`` for the ``expert_parallel`` block."""


class AutoEPSubject:
    name = "autoep"

    def unavailable_reason(self) -> str | None:
        return None

    def apply(self, model: nn.Module, block: dict) -> nn.Module:
        import autoep

        return autoep.apply(model, {"enabled": True, **block})


SUBJECTS: dict[str, Subject] = {"autoep": AutoEPSubject()}
