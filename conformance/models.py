"""Tiny random models built from Transformers config classes (nothing is downloaded).

Each ``ModelCase`` is a family variant: the preset it needs, the config class, and the
keyword arguments that move one or more routing switches. Adding a variant is one entry.
"""

from __future__ import annotations

import importlib
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
        return model.to(dtype)


def _load(path: str):
    module, name = path.split(":")
    return getattr(importlib.import_module(f"transformers.models.{module}"), name)


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


MIXTRAL = dict(COMMON, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.0)
QWEN3 = dict(COMMON, intermediate_size=64, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
             norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], head_dim=8)
QWEN2 = dict(COMMON, intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=24,
             num_experts=4, num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[])
QWEN3_5 = dict(COMMON, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=4,
               num_experts_per_tok=2, head_dim=8, layer_types=["linear_attention", "full_attention"],
               linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
               linear_conv_kernel_dim=4)
_MLA = dict(kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
DEEPSEEK_V2 = dict(COMMON, **_MLA, num_key_value_heads=4, intermediate_size=64, moe_intermediate_size=16,
                   n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=0,
                   topk_method="greedy", n_group=2, topk_group=1, routed_scaling_factor=1.0)
DEEPSEEK_V3 = dict(COMMON, **_MLA, num_key_value_heads=4, intermediate_size=64, moe_intermediate_size=16,
                   n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=0,
                   n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0)


def _case(id, preset, model_type, module, prefix, kwargs, **extra) -> ModelCase:
    return ModelCase(id=id, preset=preset, model_type=model_type, config_class=f"{module}:{prefix}Config",
                     causal_lm_class=f"{module}:{prefix}ForCausalLM", kwargs=kwargs, **extra)


# The default case of each preset (plus Qwen2-MoE), then the variants that move every routing switch.
DEFAULT_CASES = [
    _case("mixtral", "mixtral", "mixtral", "mixtral", "Mixtral", MIXTRAL),
    _case("qwen3_moe", "qwen3_moe", "qwen3_moe", "qwen3_moe", "Qwen3Moe", QWEN3),
    _case("qwen2_moe", "qwen3_moe", "qwen2_moe", "qwen2_moe", "Qwen2Moe", QWEN2),
    ModelCase("qwen3_5_moe", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_5_moe:Qwen3_5MoeTextConfig",
              "qwen3_5_moe:Qwen3_5MoeForCausalLM", QWEN3_5, min_transformers="5.2.0"),
    _case("deepseek_v2", "deepseek_v2", "deepseek_v2", "deepseek_v2", "DeepseekV2", DEEPSEEK_V2, has_aux_loss=False),
    _case("deepseek_v3", "deepseek_v3", "deepseek_v3", "deepseek_v3", "DeepseekV3", DEEPSEEK_V3,
          post_init=random_correction_bias, has_aux_loss=False),
]

VARIANT_CASES = [
    _case("mixtral-top1", "mixtral", "mixtral", "mixtral", "Mixtral", dict(MIXTRAL, num_experts_per_tok=1)),
    _case("mixtral-topk_eq_E", "mixtral", "mixtral", "mixtral", "Mixtral", dict(MIXTRAL, num_experts_per_tok=4)),
    _case("mixtral-E5", "mixtral", "mixtral", "mixtral", "Mixtral", dict(MIXTRAL, num_local_experts=5)),
    _case("qwen3_moe-no_norm", "qwen3_moe", "qwen3_moe", "qwen3_moe", "Qwen3Moe", dict(QWEN3, norm_topk_prob=False)),
    _case("qwen3_moe-E6-top3", "qwen3_moe", "qwen3_moe", "qwen3_moe", "Qwen3Moe",
          dict(QWEN3, num_experts=6, num_experts_per_tok=3)),
    _case("qwen2_moe-norm", "qwen3_moe", "qwen2_moe", "qwen2_moe", "Qwen2Moe", dict(QWEN2, norm_topk_prob=True)),
    _case("qwen2_moe-top1", "qwen3_moe", "qwen2_moe", "qwen2_moe", "Qwen2Moe", dict(QWEN2, num_experts_per_tok=1)),
    ModelCase("qwen3_5_moe-top4", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_5_moe:Qwen3_5MoeTextConfig",
              "qwen3_5_moe:Qwen3_5MoeForCausalLM", dict(QWEN3_5, num_experts_per_tok=4), min_transformers="5.2.0"),
    _case("deepseek_v2-group_limited", "deepseek_v2", "deepseek_v2", "deepseek_v2", "DeepseekV2",
          dict(DEEPSEEK_V2, n_routed_experts=8, topk_method="group_limited_greedy", n_group=4, topk_group=2,
               num_experts_per_tok=3, routed_scaling_factor=2.5), has_aux_loss=False),
    # As the published DeepSeek-V2-Lite config: greedy routing with a single group (finding DS-3:
    # DeepSpeed's AutoEP routes greedy + n_group > 1 group-limited, and matches with n_group=1).
    _case("deepseek_v2-greedy-n_group1", "deepseek_v2", "deepseek_v2", "deepseek_v2", "DeepseekV2",
          dict(DEEPSEEK_V2, n_group=1, topk_group=1), has_aux_loss=False),
    _case("deepseek_v2-E6-top1", "deepseek_v2", "deepseek_v2", "deepseek_v2", "DeepseekV2",
          dict(DEEPSEEK_V2, n_routed_experts=6, num_experts_per_tok=1, routed_scaling_factor=0.5), has_aux_loss=False),
    _case("deepseek_v3-grouped-scaled", "deepseek_v3", "deepseek_v3", "deepseek_v3", "DeepseekV3",
          dict(DEEPSEEK_V3, n_group=4, topk_group=2, num_experts_per_tok=3, routed_scaling_factor=2.5),
          post_init=random_correction_bias, has_aux_loss=False),
    _case("deepseek_v3-no_norm-topk_eq_E", "deepseek_v3", "deepseek_v3", "deepseek_v3", "DeepseekV3",
          dict(DEEPSEEK_V3, n_routed_experts=4, num_experts_per_tok=4, norm_topk_prob=False,
               routed_scaling_factor=1.5), post_init=random_correction_bias, has_aux_loss=False),
]

ALL_CASES = DEFAULT_CASES + VARIANT_CASES
CASES_BY_ID = {case.id: case for case in ALL_CASES}


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
