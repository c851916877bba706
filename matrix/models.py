"""Tiny random models built from Transformers config classes (nothing is downloaded).

Each ``ModelCase`` is a family variant: the preset it needs, the config class, and the
keyword arguments that move one or more routing switches. Adding a variant is one entry.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from matrix.experts_cases import EXPERTS_CASES
from matrix.model_case import (_MLA, _NO_SPECIAL_TOKENS, _SMALL_SPECIAL_TOKENS, COMMON,  # noqa: F401
                               EXPERTS_MODE, ModelCase, ModelSnapshot, _case, keep_fp32_modules, make_config,
                               random_correction_bias)

MIXTRAL = dict(COMMON, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.0)
QWEN3 = dict(COMMON, intermediate_size=64, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
             norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], head_dim=8)
QWEN2 = dict(COMMON, intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=24,
             num_experts=4, num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[])
QWEN3_5 = dict(COMMON, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=4,
               num_experts_per_tok=2, head_dim=8, layer_types=["linear_attention", "full_attention"],
               linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
               linear_conv_kernel_dim=4)

DEEPSEEK_V2 = dict(COMMON, **_MLA, num_key_value_heads=4, intermediate_size=64, moe_intermediate_size=16,
                   n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=0,
                   topk_method="greedy", n_group=2, topk_group=1, routed_scaling_factor=1.0)
DEEPSEEK_V3 = dict(COMMON, **_MLA, num_key_value_heads=4, intermediate_size=64, moe_intermediate_size=16,
                   n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=0,
                   n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0)





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

# --- group A tiny configs (issue 12) ---
MINIMAX = dict(MIXTRAL, head_dim=8, block_size=4, layer_types=["full_attention", "linear_attention"])
QWEN3_NEXT = dict(COMMON, intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                  num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                  head_dim=8, layer_types=["linear_attention", "full_attention"], linear_num_value_heads=4,
                  linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=4)
QWEN3_VL_MOE = dict(
    text_config=dict(COMMON, intermediate_size=64, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                     decoder_sparse_step=1, mlp_only_layers=[], head_dim=8, output_router_logits=True,
                     router_aux_loss_coef=0.1,  # (the model reads both from text_config)
                     rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1],
                                          mrope_interleaved=True)),
    vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                       deepstack_visual_indexes=[0]),
    tie_word_embeddings=False)
QWEN3_OMNI_MOE = dict(
    text_config=dict(QWEN3, output_router_logits=True, router_aux_loss_coef=0.1,
                     rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1],
                                          mrope_interleaved=True)),
    vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                       deepstack_visual_indexes=[0]),
    audio_config=dict(num_mel_bins=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, d_model=16,
                      output_dim=32, downsample_hidden_size=8),
    tie_word_embeddings=False)

MINIMAX_M3 = dict(COMMON, **_NO_SPECIAL_TOKENS, head_dim=8, rotary_dim=4, intermediate_size=16,
                  shared_intermediate_size=24, dense_intermediate_size=64, num_local_experts=8, num_experts_per_tok=2,
                  routed_scaling_factor=2.0)
OLMOE = dict(COMMON, **_NO_SPECIAL_TOKENS, intermediate_size=16, num_experts=4, num_experts_per_tok=2,
             norm_topk_prob=False)
FLEX_OLMO = dict(OLMOE)
MELLUM = dict(COMMON, intermediate_size=64, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
              norm_topk_prob=True, head_dim=8)
JAMBA = dict(COMMON, intermediate_size=16, num_experts=4, num_experts_per_tok=2, expert_layer_period=1,
             expert_layer_offset=0, attn_layer_period=2, attn_layer_offset=1, use_mamba_kernels=False,
             mamba_d_state=8, mamba_d_conv=4, mamba_expand=2)
LARA_MINI = dict(COMMON, **_NO_SPECIAL_TOKENS, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                 num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, head_dim=8,
                 layer_types=["linear_attention", "full_attention"], linear_num_value_heads=4, linear_num_key_heads=2,
                 linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=4)
FLINT = dict(COMMON, intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=24,
             num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
             head_dim=8)

# --- group C tiny configs (issue 12) ---
# DeepSeek-V3-routed families: 8 experts (divisible by autoep_size 4), every layer a MoE layer.
_V3_SWITCHES = dict(moe_intermediate_size=16, num_experts_per_tok=2, n_group=1, topk_group=1, norm_topk_prob=True,
                    routed_scaling_factor=1.0)
# Groups (top-2-sum scores) limited to 2 of 4, top-3, no renormalisation, scaled.
_V3_GROUPED = dict(n_group=4, topk_group=2, num_experts_per_tok=3, norm_topk_prob=False, routed_scaling_factor=2.5)

SOLAR_OPEN = dict(COMMON, **_V3_SWITCHES, n_routed_experts=8, n_shared_experts=1, head_dim=8)
EXAONE_MOE = dict(COMMON, **_V3_SWITCHES, intermediate_size=64, num_experts=8, num_shared_experts=1,
                  first_k_dense_replace=0, head_dim=8)
BAILING_HYBRID = dict(COMMON, **_V3_SWITCHES, **_MLA, **_SMALL_SPECIAL_TOKENS, num_key_value_heads=4,
                      intermediate_size=64, num_local_experts=8, n_shared_experts=1, first_k_dense_replace=0,
                      head_dim=8, layer_group_size=2)  # layer 0 linear (KDA), layer 1 full (MLA)
KIMI_LINEAR = dict(COMMON, **_V3_SWITCHES, **_MLA, **_SMALL_SPECIAL_TOKENS, num_key_value_heads=4,
                   intermediate_size=64, num_local_experts=8, n_shared_experts=1, mlp_layer_types=["sparse", "sparse"],
                   layer_types=["linear_attention", "full_attention"], linear_head_dim=8, linear_num_heads=4)
MIMO_V2_FLASH = dict(COMMON, **_V3_SWITCHES, intermediate_size=64, n_routed_experts=8,
                     mlp_layer_types=["sparse", "sparse"], head_dim=8, v_head_dim=8)


def _v3_routed_cases(family: str, prefix: str, kwargs: dict, min_transformers: str) -> list[ModelCase]:
    """The default case of a DeepSeek-V3-routed family (model type = module = family) and its
    grouped / unnormalised / scaled / top-3 variant. Their ForCausalLM computes no aux loss."""
    extra = dict(min_transformers=min_transformers, post_init=random_correction_bias, has_aux_loss=False)
    return [_case(family, family, family, family, prefix, kwargs, **extra),
            _case(f"{family}-grouped-no_norm-scaled", family, family, family, prefix, dict(kwargs, **_V3_GROUPED),
                  **extra)]


# --- group B tiny configs (issue 12) ---
# DeepSeek-V3-routed families (8 experts, every layer a MoE layer); the DSA ones need a q_lora_rank and
# a tiny sparse-attention indexer.
_MLA_Q = dict(_MLA, q_lora_rank=16)
_DSA_INDEXER = dict(index_topk=4, index_head_dim=8, index_n_heads=2)
_ALL_SPARSE = dict(mlp_layer_types=["sparse", "sparse"])
DEEPSEEK_V32 = dict(COMMON, **_V3_SWITCHES, **_MLA_Q, **_DSA_INDEXER, **_ALL_SPARSE, num_key_value_heads=4,
                    intermediate_size=64, n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=0, head_dim=8)
GLM4_MOE = dict(COMMON, **_V3_SWITCHES, intermediate_size=64, n_routed_experts=8, n_shared_experts=1,
                first_k_dense_replace=0, head_dim=8)
GLM4_MOE_LITE = dict(COMMON, **_V3_SWITCHES, **_MLA_Q, **_ALL_SPARSE, num_key_value_heads=4, intermediate_size=64,
                     n_routed_experts=8, n_shared_experts=1)
GLM_MOE_DSA = dict(DEEPSEEK_V32)
DOTS1 = dict(COMMON, **_V3_SWITCHES, intermediate_size=64, n_routed_experts=8, n_shared_experts=1,
             first_k_dense_replace=0, head_dim=8)
DOTS3_NOTE = dict(DEEPSEEK_V32, **_SMALL_SPECIAL_TOKENS, shared_experts_intermediate_size=24)
_TEXT = {key: value for key, value in COMMON.items() if key != "tie_word_embeddings"}
# GLM-4.5V: the text config carries the aux-loss switches its ForConditionalGeneration reads; mrope
# sections sum to half the rotary width (head_dim 16 x partial_rotary_factor 0.5).
_GLM4V_MOE_TEXT = dict(_TEXT, **_V3_SWITCHES, intermediate_size=64, n_routed_experts=8, n_shared_experts=1,
                       first_k_dense_replace=0, head_dim=16, output_router_logits=True, router_aux_loss_coef=0.1,
                       rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1],
                                            partial_rotary_factor=0.5))
_GLM4V_MOE_VISION = dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=32, out_hidden_size=32, patch_size=2,
                         image_size=8, spatial_merge_size=1, temporal_patch_size=1)
_GLM4V_MOE_TOKENS = dict(image_token_id=90, video_token_id=91, image_start_token_id=92, image_end_token_id=93,
                         video_start_token_id=94, video_end_token_id=95)


def _glm4v_moe(text: dict) -> dict:
    return dict(tie_word_embeddings=False, **_GLM4V_MOE_TOKENS, text_config=text, vision_config=_GLM4V_MOE_VISION)


# Mistral-Large-4: softmax routing, always renormalised; a tiny Pixtral vision tower.
_MISTRAL_LARGE4_TEXT = dict(_TEXT, **_MLA, **_DSA_INDEXER, **_ALL_SPARSE, num_key_value_heads=4, intermediate_size=64,
                            moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                            first_k_dense_replace=0, n_group=1, topk_group=1, routed_scaling_factor=1.0, head_dim=8,
                            # the default YaRN scaling, over a window that fits max_position_embeddings 64
                            rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                 original_max_position_embeddings=16, beta_fast=32.0, beta_slow=1.0,
                                                 attention_factor=1.0))
_PIXTRAL_TINY = dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, patch_size=2, image_size=8, head_dim=8)


def _mistral_large4(text: dict) -> dict:
    return dict(tie_word_embeddings=False, image_token_index=90, text_config=text, vision_config=_PIXTRAL_TINY)


# DeepSeek-OCR-2 / Unlimited-OCR: DeepSeek-V2 routing in the language model; tiny SAM + encoder towers.
_OCR_TEXT = dict(_TEXT, **_ALL_SPARSE, num_key_value_heads=4, intermediate_size=64, moe_intermediate_size=16,
                 n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, topk_method="greedy", n_group=2,
                 topk_group=1, routed_scaling_factor=1.0, head_dim=8)
_OCR_GROUPED = dict(n_routed_experts=8, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                    num_experts_per_tok=3, routed_scaling_factor=2.5)
_SAM_TINY = dict(hidden_size=16, output_channels=8, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                 patch_size=8, window_size=2, global_attn_indexes=[0], downsample_channels=[8, 16])
_OCR_VISION = {
    "deepseek_ocr2": dict(sam_config=_SAM_TINY, encoder_config=dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=96)),
    "unlimited_ocr": dict(sam_config=dict(_SAM_TINY, mlp_dim=32), encoder_config=dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
        patch_size=8)),
}


def _vlm_cases(family: str, prefix: str, build: Callable[[dict], dict], text: dict, variant: str, changes: dict,
               **extra) -> list[ModelCase]:
    """A VLM family's default case and one variant (``changes`` applied to its text config): the
    model type is the language model's ``<family>_text``, built by ``<prefix>ForConditionalGeneration``."""
    def case(id: str, text_kwargs: dict) -> ModelCase:
        return ModelCase(id, family, f"{family}_text", f"{family}:{prefix}Config",
                         f"{family}:{prefix}ForConditionalGeneration", build(text_kwargs), **extra)
    return [case(family, text), case(f"{family}-{variant}", dict(text, **changes))]


def _ocr(family: str) -> Callable[[dict], dict]:
    return lambda text: dict(tie_word_embeddings=False, image_token_id=90, text_config=text,
                             vision_config=_OCR_VISION[family])


# --- group E tiny configs (issue 12) ---
# GraniteMoE (top-k on the logits, then softmax over the k): every layer holds a block_sparse_moe block;
# the SWA/Shared/Hybrid variants add a shared_mlp in the decoder layer (outside the block).
GRANITEMOE = dict(COMMON, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)
GRANITEMOE_SWA = dict(GRANITEMOE, shared_intermediate_size=24, sliding_window=4)  # layer 0 full, layer 1 sliding
GRANITEMOE_SHARED = dict(GRANITEMOE, shared_intermediate_size=24)
GRANITEMOE_HYBRID = dict(GRANITEMOE, shared_intermediate_size=24, layer_types=["mamba", "attention"],
                         mamba_n_heads=4, mamba_d_state=8, mamba_chunk_size=8)  # layer 0 Mamba-2, layer 1 attention
# Qwen4-Exp's language model: every layer a sparse block (Qwen2-MoE's, gated shared expert); layer 0 a gated
# delta net, layer 1 QSA-indexed attention ("full_attention" is renamed to the version's own name for it:
# qwen_sparse_attention up to 5.16, indexed_attention later); 2 hyper-connection streams; no PLE layers.
QWEN4_EXP = dict(COMMON, head_dim=8, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=4,
                 num_experts_per_tok=2, norm_topk_prob=True, hc_count=2, hc_lowrank=8,
                 layer_types=["linear_attention", "full_attention"], linear_num_value_heads=4,
                 linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=4,
                 indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=4, indexer_compress_ratio=2)


def _granite_cases(family: str, prefix: str, kwargs: dict, variant: str, changes: dict,
                   min_transformers: str) -> list[ModelCase]:
    """A GraniteMoE family's default case (model type = module = family) and one variant."""
    return [_case(family, family, family, family, prefix, kwargs, min_transformers=min_transformers),
            _case(f"{family}-{variant}", family, family, family, prefix, dict(kwargs, **changes),
                  min_transformers=min_transformers)]


# One case per family added by a row of autoep/presets/table.py (plus variants that move its
# switches): judged on one process and on plain-PyTorch EP (world 4, autoep_size 2 and 4) in
# both dtypes (matrix.cells.FAMILY_TOPOLOGIES); the ZeRO stages and Universal resumes are covered
# per routing kind by DEFAULT_CASES.
FAMILY_CASES: list[ModelCase] = [
    # --- families added by issue 12 ---
    # --- group A ---
    _case("minimax", "minimax", "minimax", "minimax", "MiniMax", MINIMAX),
    _case("minimax-top1", "minimax", "minimax", "minimax", "MiniMax", dict(MINIMAX, num_experts_per_tok=1)),
    _case("qwen3_next", "qwen3_next", "qwen3_next", "qwen3_next", "Qwen3Next", QWEN3_NEXT, min_transformers="5.2.0"),
    _case("qwen3_next-no_norm", "qwen3_next", "qwen3_next", "qwen3_next", "Qwen3Next",
          dict(QWEN3_NEXT, norm_topk_prob=False), min_transformers="5.2.0"),
    ModelCase("qwen3_vl_moe", "qwen3_vl_moe", "qwen3_vl_moe_text", "qwen3_vl_moe:Qwen3VLMoeConfig",
              "qwen3_vl_moe:Qwen3VLMoeForConditionalGeneration", QWEN3_VL_MOE, min_transformers="5.20.2"),
    ModelCase("qwen3_omni_moe", "qwen3_omni_moe", "qwen3_omni_moe_text", "qwen3_omni_moe:Qwen3OmniMoeThinkerConfig",
              "qwen3_omni_moe:Qwen3OmniMoeThinkerForConditionalGeneration", QWEN3_OMNI_MOE, min_transformers="5.2.0"),
    _case("olmoe", "olmoe", "olmoe", "olmoe", "Olmoe", OLMOE),
    _case("olmoe-norm", "olmoe", "olmoe", "olmoe", "Olmoe", dict(OLMOE, norm_topk_prob=True)),
    _case("flex_olmo", "flex_olmo", "flex_olmo", "flex_olmo", "FlexOlmo", FLEX_OLMO, min_transformers="5.2.0"),
    _case("flex_olmo-norm", "flex_olmo", "flex_olmo", "flex_olmo", "FlexOlmo", dict(FLEX_OLMO, norm_topk_prob=True),
          min_transformers="5.2.0"),
    _case("mellum", "mellum", "mellum", "mellum", "Mellum", MELLUM, min_transformers="5.16.1"),
    _case("mellum-no_norm", "mellum", "mellum", "mellum", "Mellum", dict(MELLUM, norm_topk_prob=False),
          min_transformers="5.16.1"),
    _case("jamba", "jamba", "jamba", "jamba", "Jamba", JAMBA),
    _case("jamba-top1", "jamba", "jamba", "jamba", "Jamba", dict(JAMBA, num_experts_per_tok=1)),
    _case("lara_mini", "lara_mini", "lara_mini", "lara_mini", "LaraMini", LARA_MINI, min_transformers="5.24.0"),
    _case("lara_mini-no_norm", "lara_mini", "lara_mini", "lara_mini", "LaraMini",
          dict(LARA_MINI, norm_topk_prob=False), min_transformers="5.24.0"),
    _case("flint", "flint", "flint", "flint", "Flint", FLINT, min_transformers="5.22.2"),
    _case("flint-no_norm", "flint", "flint", "flint", "Flint", dict(FLINT, norm_topk_prob=False),
          min_transformers="5.22.2"),
    # --- group B ---
    *_v3_routed_cases("deepseek_v32", "DeepseekV32", DEEPSEEK_V32, "5.16.1"),
    *_v3_routed_cases("glm4_moe", "Glm4Moe", GLM4_MOE, "5.0.0"),
    *_v3_routed_cases("glm4_moe_lite", "Glm4MoeLite", GLM4_MOE_LITE, "5.0.0"),
    *_v3_routed_cases("glm_moe_dsa", "GlmMoeDsa", GLM_MOE_DSA, "5.2.0"),
    *_v3_routed_cases("dots1", "Dots1", DOTS1, "5.0.0"),
    ModelCase("dots3_note", "dots3_note", "dots3_note_text", "dots3_note:Dots3NoteTextConfig",
              "dots3_note:Dots3NoteForCausalLM", DOTS3_NOTE, min_transformers="5.23.0",
              post_init=random_correction_bias, has_aux_loss=False),
    ModelCase("dots3_note-grouped-no_norm-scaled", "dots3_note", "dots3_note_text", "dots3_note:Dots3NoteTextConfig",
              "dots3_note:Dots3NoteForCausalLM", dict(DOTS3_NOTE, **_V3_GROUPED), min_transformers="5.23.0",
              post_init=random_correction_bias, has_aux_loss=False),
    *_vlm_cases("glm4v_moe", "Glm4vMoe", _glm4v_moe, _GLM4V_MOE_TEXT, "grouped-no_norm-scaled", _V3_GROUPED,
                min_transformers="5.20.2", post_init=random_correction_bias),
    *_vlm_cases("mistral_large4", "MistralLarge4", _mistral_large4, _MISTRAL_LARGE4_TEXT, "grouped-scaled",
                dict(n_group=4, topk_group=2, num_experts_per_tok=3, routed_scaling_factor=2.5),
                min_transformers="5.22.2", has_aux_loss=False),
    *_vlm_cases("deepseek_ocr2", "DeepseekOcr2", _ocr("deepseek_ocr2"), _OCR_TEXT, "group_limited-scaled",
                _OCR_GROUPED, min_transformers="5.16.1", has_aux_loss=False),
    *_vlm_cases("unlimited_ocr", "UnlimitedOcr", _ocr("unlimited_ocr"), _OCR_TEXT, "group_limited-scaled",
                _OCR_GROUPED, min_transformers="5.20.2", has_aux_loss=False),
    # --- group C ---
    *_v3_routed_cases("solar_open", "SolarOpen", SOLAR_OPEN, "5.0.0"),
    *_v3_routed_cases("exaone_moe", "ExaoneMoe", EXAONE_MOE, "5.2.0"),
    *_v3_routed_cases("bailing_hybrid", "BailingHybrid", BAILING_HYBRID, "5.20.2"),
    *_v3_routed_cases("kimi_linear", "KimiLinear", KIMI_LINEAR, "5.20.2"),
    *_v3_routed_cases("mimo_v2_flash", "MiMoV2Flash", MIMO_V2_FLASH, "5.16.1"),
    # --- group D ---
    ModelCase("minimax_m3_vl", "minimax_m3", "minimax_m3_vl_text", "minimax_m3_vl:MiniMaxM3VLTextConfig",
              "minimax_m3_vl:MiniMaxM3VLForCausalLM", MINIMAX_M3, min_transformers="5.16.1",
              post_init=random_correction_bias),
    # a small limit and another alpha: the clamps bind on most units (alpha/limit are read, not assumed)
    ModelCase("minimax_m3_vl-clamp0.5-alpha1.2-top3", "minimax_m3", "minimax_m3_vl_text",
              "minimax_m3_vl:MiniMaxM3VLTextConfig", "minimax_m3_vl:MiniMaxM3VLForCausalLM",
              dict(MINIMAX_M3, swiglu_limit=0.5, swiglu_alpha=1.2, num_experts_per_tok=3, routed_scaling_factor=1.0),
              min_transformers="5.16.1", post_init=random_correction_bias),
    # --- group E ---
    *_granite_cases("granitemoe", "GraniteMoe", GRANITEMOE, "top1", dict(num_experts_per_tok=1), "5.22.2"),
    _case("granitemoe-E8-top3", "granitemoe", "granitemoe", "granitemoe", "GraniteMoe",
          dict(GRANITEMOE, num_local_experts=8, num_experts_per_tok=3), min_transformers="5.22.2"),
    *_granite_cases("granitemoe_swa", "GraniteMoeSWA", GRANITEMOE_SWA, "no_shared-top1",
                    dict(shared_intermediate_size=0, num_experts_per_tok=1), "5.20.2"),
    *_granite_cases("granitemoeshared", "GraniteMoeShared", GRANITEMOE_SHARED, "top1", dict(num_experts_per_tok=1),
                    "5.22.2"),
    *_granite_cases("granitemoehybrid", "GraniteMoeHybrid", GRANITEMOE_HYBRID, "E8-top3",
                    dict(num_local_experts=8, num_experts_per_tok=3), "5.22.2"),
    ModelCase("qwen4_exp", "qwen4_exp", "qwen4_exp_text", "qwen4_exp:Qwen4ExpTextConfig",
              "qwen4_exp:Qwen4ExpForCausalLM", QWEN4_EXP, min_transformers="5.16.1"),
    ModelCase("qwen4_exp-no_norm-top1", "qwen4_exp", "qwen4_exp_text", "qwen4_exp:Qwen4ExpTextConfig",
              "qwen4_exp:Qwen4ExpForCausalLM", dict(QWEN4_EXP, norm_topk_prob=False, num_experts_per_tok=1),
              min_transformers="5.16.1"),
]

# The seed presets run at the experts level (expert_parallel.replacement='experts': the stock router
# and block, AutoEP's experts): both modes must agree with the stock model (matrix.cells).
SEED_EXPERTS_CASES = [dataclasses.replace(case, id=f"{case.id}@experts", ep_block=EXPERTS_MODE)
                      for case in DEFAULT_CASES]

# A Mixtral-shaped model of plain torch.nn modules (matrix/plain_models.py): found by its structure.
PLAIN_CASES = [ModelCase("plain_mixtral", "mixtral", "mixtral", "matrix.plain_models:PlainMixtralConfig",
                         "matrix.plain_models:PlainMixtralForCausalLM", {}, has_aux_loss=False)]


ALL_CASES = DEFAULT_CASES + VARIANT_CASES + FAMILY_CASES + SEED_EXPERTS_CASES + PLAIN_CASES + EXPERTS_CASES
CASES_BY_ID = {case.id: case for case in ALL_CASES}


