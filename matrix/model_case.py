"""The case of the conformance suite: a tiny random model built from a config class (nothing is
downloaded), and the helpers every table of cases shares (matrix/models.py,
matrix/experts_cases.py).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, tie_word_embeddings=False)


@dataclass(frozen=True)
class ModelCase:
    id: str
    preset: str
    model_type: str
    config_class: str  # "module:Class" under transformers.models
    causal_lm_class: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    min_transformers: str = "5.0.0"
    # Sets non-default buffers (e.g. a random e_score_correction_bias) after construction.
    post_init: Callable[[torch.nn.Module, torch.Generator], None] | None = None
    has_aux_loss: bool = True
    # Keys of the "expert_parallel" block every subject call of this case carries (e.g.
    # {"replacement": "experts"}: the case runs the experts-level replacement).
    ep_block: dict[str, Any] = field(default_factory=dict)
    # The error class every subject call must raise (a family refused in every mode), or None.
    refused_with: str | None = None

    def block(self, **keys) -> dict[str, Any]:
        """The case's "expert_parallel" keys with ``keys`` on top."""
        return {**self.ep_block, **keys}

    def build(self, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        config = make_config(self)
        model_class = _load(self.causal_lm_class)
        torch.manual_seed(seed)
        model = model_class(config)
        generator = torch.Generator().manual_seed(seed + 1)
        _randomize(model, generator)
        if self.post_init is not None:
            self.post_init(model, generator)
        model.eval()
        return keep_fp32_modules(model.to(dtype))


def keep_fp32_modules(model: torch.nn.Module) -> torch.nn.Module:
    """Back to float32 what the model's class keeps in float32 when it is loaded in bf16 or fp16
    (``_keep_in_fp32_modules_strict``: a router weight, a correction bias), as ``from_pretrained``
    does: a parameter or buffer whose name contains one of the entries (``*`` a wildcard, searched as
    Transformers' loader searches them); ``model.to(dtype)`` casts everything."""
    patterns = [re.compile(re.escape(entry).replace(r"\*", ".*"))
                for entry in getattr(model, "_keep_in_fp32_modules_strict", None) or ()]
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if tensor.dtype in (torch.bfloat16, torch.float16) and any(p.search(name) for p in patterns):
                tensor.data = tensor.data.float()
    return model


def _load(path: str):
    """``"folder:Class"`` under transformers.models, or ``"package.module:Class"`` (a dotted module:
    a model built from plain modules, outside Transformers)."""
    module, name = path.split(":")
    return getattr(importlib.import_module(module if "." in module else f"transformers.models.{module}"), name)


def make_config(case: ModelCase):
    config_class = _load(case.config_class)
    config = config_class(**case.kwargs)
    config.output_router_logits = case.has_aux_loss
    if hasattr(config, "router_aux_loss_coef"):
        config.router_aux_loss_coef = 0.1
    config._attn_implementation = "eager"
    return config


def _randomize(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every parameter O(1/sqrt(fan_in)) random values (HF init leaves routers at zero,
    which would make every routing decision a tie)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                fan_in = param.shape[-1]
                param.copy_(torch.randn(param.shape, generator=generator) / fan_in ** 0.5)


def random_correction_bias(model: torch.nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=generator))


def _case(id, preset, model_type, module, prefix, kwargs, **extra) -> ModelCase:
    return ModelCase(id=id, preset=preset, model_type=model_type, config_class=f"{module}:{prefix}Config",
                     causal_lm_class=f"{module}:{prefix}ForCausalLM", kwargs=kwargs, **extra)


_MLA = dict(kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
_NO_SPECIAL_TOKENS = dict(pad_token_id=None, bos_token_id=None, eos_token_id=None)  # defaults lie outside vocab 96
_SMALL_SPECIAL_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # defaults lie outside vocab 96
# The expert_parallel keys of a case that runs the experts-level replacement.
EXPERTS_MODE = {"replacement": "experts"}


@dataclass
class ModelSnapshot:
    """A model's module types and every state tensor, to prove that a rejected call left the
    model exactly as it was."""

    module_types: list
    state: dict

    @classmethod
    def of(cls, model: torch.nn.Module) -> "ModelSnapshot":
        return cls([type(m) for m in model.modules()], {n: t.detach().clone() for n, t in model.state_dict().items()})

    def unchanged(self, model: torch.nn.Module) -> bool:
        after = model.state_dict()
        return ([type(m) for m in model.modules()] == self.module_types and after.keys() == self.state.keys()
                and all(torch.equal(self.state[n], t) for n, t in after.items()))
