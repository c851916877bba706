"""Tiny random models for the experts-level replacement (``expert_parallel.replacement='experts'``).

One case per Transformers MoE family that has no row in autoep/presets/table.py (FAMILIES): the
stock block and router stay and only the fused experts module (``@use_experts_implementation``)
is made expert-parallel, so every case is judged on the model's own routing. Each config keeps
the shapes tiny (vocab 96, hidden 32, 2 layers that are both MoE layers, 4 or 8 experts, top-2
unless the family forces another k, expert width 16, 64 positions), picks the plain-PyTorch
paths (no CUDA kernels) and, where the family clamps or soft-caps its SwiGLU, a limit that binds
on random weights (1.0 or less).

Families of Transformers 5.25 with MoE code that have no case here:

- gemma4_unified: no MoE. Its modeling file has no experts class (no ``@use_experts_implementation``,
  no router); Gemma4UnifiedTextConfig has no expert fields.
- step3p5: no folder of its own. Step3p7TextConfig *is* model type "step3p5" (the language model of
  step3p7), built only inside Step3p7ForConditionalGeneration (Step3p7TextModel has no LM head):
  the "step3p7" case below covers it (its model_type is "step3p5").
- bailing_hybrid: a family-table row (FAMILY_CASES in matrix/models.py covers it).

Cases that do not follow the causal-LM protocol in every respect (see the comment at each config):
"diffusion_gemma" (block diffusion: returns no loss, draws its canvas from the global RNG unless
decoder_input_ids is passed) and "openai_privacy_filter" (a token classifier with 96 labels, so
labels=input_ids works). "ergo"'s experts class (ErgoExperts) overrides the forward of its
decorated base (ErgoExpertProjections) to apply a per-expert RMSNorm to each route before the
weighted sum, which the interface's flags do not describe.
"""

from __future__ import annotations

import dataclasses

import torch

from matrix.model_case import (_MLA, _NO_SPECIAL_TOKENS, _SMALL_SPECIAL_TOKENS, COMMON, EXPERTS_MODE, ModelCase,
                                    _case, random_correction_bias)


def random_routing_bias(model: torch.nn.Module, generator: torch.Generator) -> None:
    """As random_correction_bias, also for the routing biases it does not reach: those held as
    Parameters (AFMoE's expert_bias, ERNIE's moe_statics.e_score_correction_bias, Laguna's) or
    under another name (LFM2-MoE's expert_bias buffer)."""
    names = ("e_score_correction_bias", "expert_bias")
    with torch.no_grad():
        for name, tensor in list(model.named_buffers()) + list(model.named_parameters()):
            if name.rpartition(".")[2] in names:
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))


def random_hash_routes(model: torch.nn.Module, generator: torch.Generator) -> None:
    """random_correction_bias, and for DeepSeek-V4's hash-routed layers a random frozen token -> experts
    table (tid2eid is all zeros after construction: every slot would name expert 0): top_k distinct
    experts per token id."""
    random_correction_bias(model, generator)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("tid2eid"):
                vocab, top_k = buffer.shape
                num_experts = model.config.n_routed_experts
                buffer.copy_(torch.stack([torch.randperm(num_experts, generator=generator)[:top_k]
                                          for _ in range(vocab)]))


def small_biases(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Small random values for every 1-D parameter named ``*bias`` (LayerNorm, Linear and residual-scaling
    biases), which the O(1) values every 1-D parameter gets would otherwise turn into a common offset of
    every token's hidden state or router logits: every token would pick the same experts (PhiMoE's
    LayerNorm biases, GPT-OSS's router bias, ZAYA's residual scalings and MLP router)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and name.endswith("bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))


def random_zaya_router(model: torch.nn.Module, generator: torch.Generator) -> None:
    """small_biases, and small random balancing_biases for ZAYA's router (the last entry, -1 after
    construction, keeps the skip class out; the router's probabilities vary by ~0.01 over tokens)."""
    small_biases(model, generator)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("balancing_biases"):
                buffer.copy_(0.01 * torch.randn(buffer.shape, generator=generator))


_TEXT = {key: value for key, value in COMMON.items() if key != "tie_word_embeddings"}  # a VLM's text_config
_HEADS = dict(head_dim=8)
_MLA_Q = dict(_MLA, q_lora_rank=16)
_DSA_INDEXER = dict(index_topk=4, index_head_dim=8, index_n_heads=2)
_ALL_SPARSE = dict(mlp_layer_types=["sparse", "sparse"])
_SLIDING_FULL = dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"])
# DeepSeek-V3-style routers (sigmoid + correction bias, groups): 8 experts, every layer a MoE layer.
_V3_ROUTED = dict(moe_intermediate_size=16, num_experts_per_tok=2, n_group=1, topk_group=1, norm_topk_prob=True,
                  routed_scaling_factor=2.5, first_k_dense_replace=0)

# AFMoE: sigmoid router (nested router.gate), correction bias a Parameter on the block (expert_bias).
AFMOE = dict(COMMON, **_HEADS, intermediate_size=64, moe_intermediate_size=16, num_dense_layers=0, num_experts=4,
             num_experts_per_tok=2, num_shared_experts=1, route_scale=1.5, global_attn_every_n_layers=2,
             sliding_window=4)
# Aria's language model: experts stored transposed; intermediate_size is the expert width.
ARIA = dict(COMMON, **_HEADS, intermediate_size=16, moe_num_experts=4, moe_topk=2, moe_num_shared_experts=1)
# A.X-K1 / A.X-K2: MLA (K2 with a DSA indexer); 2 groups of 4, one kept.
AXK1 = dict(COMMON, **_MLA_Q, **_SMALL_SPECIAL_TOKENS, **_ALL_SPARSE, num_key_value_heads=4, intermediate_size=64,
            moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2,
            topk_group=1, routed_scaling_factor=2.5)
AXK2 = dict(AXK1, **_DSA_INDEXER, gated_norm_rank=8)
# Beam: float32 SwiGLU in its own _apply_gate; routed_scaling_factor on the summed output.
BEAM = dict(COMMON, **_HEADS, **_SLIDING_FULL, **_ALL_SPARSE, intermediate_size=64, moe_intermediate_size=16,
            num_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=2.5)
# Cohere2-MoE: intermediate_size is the expert width; routed and shared outputs averaged.
COHERE2_MOE = dict(COMMON, **_HEADS, pad_token_id=0, bos_token_id=1, eos_token_id=2, intermediate_size=16,
                   num_experts=4, num_experts_per_tok=2, num_shared_experts=1, sliding_window=4,
                   sliding_window_pattern=2)
# DeepSeek-V4: layer 0 hash-routed (experts = tid2eid[input_ids]), layer 1 routed by sqrtsoftplus scores; sliding-
# window attention on both layers (no compressor); 2 hyper-connection streams; clamped SwiGLU (limit 1).
DEEPSEEK_V4 = dict(COMMON, head_dim=8, partial_rotary_factor=0.5, num_key_value_heads=1, q_lora_rank=16, o_groups=2,
                   o_lora_rank=8, moe_intermediate_size=16, n_routed_experts=4, n_shared_experts=1,
                   num_experts_per_tok=2, routed_scaling_factor=1.5, layer_types=["sliding_attention"] * 2,
                   mlp_layer_types=["hash_moe", "moe"], sliding_window=4, hc_mult=2, hc_sinkhorn_iters=3,
                   index_n_heads=2, index_head_dim=8, index_topk=4, num_nextn_predict_layers=0, swiglu_limit=1.0)
# Gemma-4's language model: router and experts are children of the decoder layer (beside the dense MLP); no
# per-layer inputs; global (full-attention) layers with head_dim 8 too.
GEMMA4_TEXT = dict(COMMON, **_HEADS, **_SLIDING_FULL, global_head_dim=8, intermediate_size=64, enable_moe_block=True,
                   num_experts=4, top_k_experts=2, moe_intermediate_size=16, vocab_size_per_layer_input=96,
                   hidden_size_per_layer_input=0)
# DiffusionGemma (block diffusion): a Gemma-4 MoE encoder over the prompt and a decoder over the canvas whose layers
# share (tie) the encoder's weights, expert weights included: 4 experts modules holding 2 pairs of shared
# Parameters. Not a causal LM: forward(input_ids=prompt, decoder_input_ids=canvas) returns canvas logits and no loss
# (labels are ignored), and without decoder_input_ids the canvas (canvas_length tokens) is drawn from the global
# torch RNG: a comparison must pass decoder_input_ids or seed the RNG before each forward.
DIFFUSION_GEMMA = dict(tie_word_embeddings=True, canvas_length=8, boi_token_id=None, eoi_token_id=None,
                       image_token_id=None,
                       text_config={key: value for key, value in GEMMA4_TEXT.items()
                                    if key not in ("tie_word_embeddings", "enable_moe_block",
                                                   "vocab_size_per_layer_input", "hidden_size_per_layer_input")},
                       vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=2, head_dim=8, patch_size=2,
                                          position_embedding_size=16))
# ERNIE-4.5-MoE: correction bias a [1, E] Parameter (gate.moe_statics); renormalised by max(sum, moe_norm_min).
ERNIE4_5_MOE = dict(COMMON, **_HEADS, intermediate_size=64, moe_intermediate_size=16, moe_num_experts=4, moe_k=2,
                    moe_num_shared_experts=1, moe_layer_start_index=0, moe_layer_interval=1)
# ERNIE-4.5-VL: every sparse layer holds two experts sets (text_moe, vision_moe), each with its router; a text-only
# forward routes every token through text_moe (the vision experts get no gradient): 4 experts modules. The aux loss
# reads text_config. mrope: h and w sections equal, summing with t to head_dim / 2.
ERNIE4_5_VL_MOE = dict(
    tie_word_embeddings=False,
    text_config=dict(_TEXT, **_HEADS, **_ALL_SPARSE, output_router_logits=True, router_aux_loss_coef=0.1,
                     intermediate_size=64, moe_intermediate_size=[16, 16], moe_num_experts=4, moe_k=2,
                     moe_num_shared_experts=1,
                     rope_parameters=dict(rope_type="default", rope_theta=500000.0, mrope_section=[1, 1, 2])),
    vision_config=dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=32, patch_size=2, spatial_merge_size=1,
                       temporal_merge_size=1))
# Ergo: gateless transposed relu2 experts (ErgoExpertProjections) under ErgoExperts, which applies a per-expert
# RMSNorm to every route before the weighted sum; sigmoid router with a correction bias.
ERGO = dict(COMMON, moe_intermediate_size=16, shared_intermediate_size=24, first_dense_intermediate_size=64,
            num_dense_blocks=0, num_experts=4, num_experts_per_tok=2, moe_routed_scaling_factor=2.0,
            global_attention_every_n_layers=2, sliding_window=4)
# GLM-5-Next's language model: layer 0 a KDA linear-attention layer (torch fallback), layer 1 NoPE DSA attention
# (q/k heads must be equal); 2 hyper-connection streams; clamped SwiGLU (limit 1). The aux loss reads text_config.
GLM5_NEXT = dict(
    tie_word_embeddings=False,
    text_config=dict(_TEXT, **_ALL_SPARSE, pad_token_id=0, output_router_logits=True, router_aux_loss_coef=0.1,
                     num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=0, qk_nope_head_dim=8,
                     v_head_dim=8, intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8,
                     n_shared_experts=1, num_experts_per_tok=2, routed_scaling_factor=2.5,
                     layer_types=["linear_attention", "indexed_attention"], index_topk=4, index_head_dim=8,
                     index_n_heads=2, index_kpool=2, linear_head_dim=8, linear_num_heads=4, hc_mult=2,
                     hc_sinkhorn_iters=3, swiglu_limit=1.0),
    vision_config=dict(depth=1, hidden_size=16, num_heads=2, image_size=8, patch_size=2, spatial_merge_size=1,
                       temporal_patch_size=1, out_hidden_size=32, intermediate_size=32,
                       projection_intermediate_size=32))
# GPT-OSS: transposed, interleaved, biased experts; biased router; clamped SwiGLU (limit 1 here, alpha 1.702).
GPT_OSS = dict(COMMON, **_HEADS, **_SLIDING_FULL, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
               swiglu_limit=1.0,
               rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=4.0, beta_fast=32.0, beta_slow=1.0,
                                    truncate=False, original_max_position_embeddings=16))
# Hunyuan-MoE-V1: intermediate_size is the expert (and shared MLP) width; router nested (gate.wg).
HUNYUAN_V1_MOE = dict(COMMON, **_HEADS, intermediate_size=16, num_experts=4, moe_topk=2)
# HY-V3: correction bias a buffer on the block; fp32 combine of routed + shared.
HY_V3 = dict(COMMON, **_HEADS, **_ALL_SPARSE, intermediate_size=64, moe_intermediate_size=16, num_experts=4,
             num_experts_per_tok=2, num_shared_experts=1, router_scaling_factor=2.5)
# HY-V4: MLA + DSA indexer, 2 hyper-connection streams, clamped SwiGLU without act_fn terms (limit 1).
HY_V4 = dict(COMMON, **_MLA_Q, **_DSA_INDEXER, **_SMALL_SPECIAL_TOKENS, **_ALL_SPARSE, num_key_value_heads=4,
             intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
             num_experts_per_tok=2, routed_scaling_factor=2.5, hc_mult=2, swiglu_limit=1.0)
# HY-V4-VL: HY-V4's language model (mrope sections summing to qk_rope_head_dim / 2) with a tiny vision tower.
HY_V4_VL = dict(tie_word_embeddings=False,
                text_config=dict({key: value for key, value in HY_V4.items() if key != "tie_word_embeddings"},
                                 rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                      mrope_section=[2, 1, 1])),
                vision_config=dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                                   out_hidden_size=32, patch_size=2, spatial_merge_size=1, max_image_size=16))
# Inkling: the router scores routed and shared experts together; layer 0 sliding, layer 1 full (hybrid).
INKLING = dict(COMMON, **_HEADS, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8,
               sliding_window_size=4, d_rel=8, rel_extent=16, layer_types=["hybrid_sliding", "hybrid"],
               intermediate_size=64, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2,
               n_shared_experts=1, route_scale=2.0, logits_mup_width_multiplier=1.0)
# Inkling2: soft-capped SwiGLU in its own _apply_gate (caps 1 and 2 bind); float32 router (its weight is in
# _keep_in_fp32_modules_strict).
INKLING2 = dict(COMMON, **_HEADS, unpadded_vocab_size=96, eos_token_id=2, swa_num_attention_heads=4,
                swa_num_key_value_heads=2, swa_head_dim=8, sliding_window_size=4, d_rel=8, rel_extent=16,
                log_scaling_n_floor=16, layer_types=["hybrid_sliding", "hybrid"], moe_intermediate_size=16,
                n_routed_experts=4, num_experts_per_tok=2, route_scale=2.0, n_layers_per_attn_res_block=1,
                mlp_gate_softcap=1.0, mlp_up_softcap=2.0)
# Inkling2-Loop: layer 1 is the looped core, run twice per forward (its experts are called twice).
INKLING2_LOOP = dict(INKLING2, loop_layer_index_start=1, loop_layer_index_end=2, loop_num_passes=2, loop_gate_rank=8)
# Kolibri-1: top-k on raw logits + correction bias, sigmoid weights.
KOLIBRI1 = dict(COMMON, **_HEADS, **_SLIDING_FULL, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                num_experts=4, num_experts_per_tok=2)
# Kolibri-1.1: head_dim a multiple of 16 (NVFP4 K/V rounding); layer 1 an indexed-attention layer with its indexer.
KOLIBRI1_1 = dict(KOLIBRI1, head_dim=16, mlp_only_layers=[], layer_types=["sliding_attention", "indexed_attention"],
                  index_layers=[1], index_topk=4, index_pool_size=16, index_compression=4, index_num_heads=2,
                  index_num_local_tokens=2, index_num_sink_tokens=1)
# Laguna: tanh soft-cap on the router logits (2.0, binds), scaling on the summed output, correction bias a Parameter.
LAGUNA = dict(COMMON, **_HEADS, **_SLIDING_FULL, **_ALL_SPARSE, intermediate_size=64, moe_intermediate_size=16,
              shared_expert_intermediate_size=24, num_experts=4, num_experts_per_tok=2, moe_routed_scaling_factor=2.0,
              moe_router_logit_softcapping=2.0)
# LFM2-MoE: layer 0 a short-conv layer, layer 1 attention; routing in the hidden dtype, expert_bias on the block.
LFM2_MOE = dict(COMMON, intermediate_size=64, moe_intermediate_size=16, num_dense_layers=0, num_experts=4,
                num_experts_per_tok=2, routed_scaling_factor=1.5, layer_types=["conv", "full_attention"])
# LongCat-Flash: each decoder layer holds one MoE block (beside two attention and two dense MLP sublayers), so
# num_layers=2 (num_hidden_layers 4) gives 2 MoE blocks; zero_expert_num=4 identity experts take part in the routing
# (the block maps them to weight-0 slots on real experts before calling the experts).
LONGCAT_FLASH = dict({key: value for key, value in COMMON.items() if key != "num_hidden_layers"}, **_MLA_Q,
                     **_SMALL_SPECIAL_TOKENS, num_layers=2, num_key_value_heads=4, head_dim=8, ffn_hidden_size=64,
                     expert_ffn_hidden_size=16, n_routed_experts=4, zero_expert_num=4, moe_topk=2,
                     routed_scaling_factor=2.0)
MINICPM5_MOE = dict(COMMON, **_HEADS, **_SMALL_SPECIAL_TOKENS, **_ALL_SPARSE, intermediate_size=64,
                    moe_intermediate_size=16, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                    routed_scaling_factor=2.5)
# MiniMax-M2: correction bias a buffer on the block, passed to the router.
MINIMAX_M2 = dict(COMMON, **_HEADS, **_NO_SPECIAL_TOKENS, intermediate_size=16, num_local_experts=4,
                  num_experts_per_tok=2)
# Mistral-4: routing in the hidden dtype; YaRN over a window that fits 64 positions.
MISTRAL4 = dict(COMMON, **_MLA_Q, num_key_value_heads=4, intermediate_size=64, moe_intermediate_size=16,
                n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=0,
                n_group=1, topk_group=1, routed_scaling_factor=1.0,
                rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                     original_max_position_embeddings=16, beta_fast=32.0, beta_slow=1.0,
                                     mscale_all_dim=1.0, mscale=1.0, llama_4_scaling_beta=0.1,
                                     max_position_embeddings=64))
# MuseSpark's language model: tokens projected into a 16-wide expert space (pre_expert_proj + centred RMSNorm) and
# back; each expert's output normalised (has_post_expert_norm); tiny vision and audio towers.
MUSE_SPARK = dict(
    tie_word_embeddings=False, out_hidden_size=32, projector_hidden_size=32,
    text_config=dict(_TEXT, **_HEADS, **_ALL_SPARSE, bos_token_id=1, eos_token_id=2, intermediate_size=64,
                     moe_intermediate_size=16, moe_hidden_size=16, num_local_experts=4, num_experts_per_tok=2,
                     routed_scaling_factor=1.5, sliding_window=4, output_multiplier=1.0),
    vision_config=dict(patch_size=2, pos_emb_height=4, pos_emb_width=4, num_attention_heads=2, num_hidden_layers=1,
                       hidden_size=16, intermediate_size=32, patch_temporal=1, merge_size=1,
                       max_position_embeddings=16),
    audio_config=dict(patch_sizes=[2, 2], hidden_sizes=[8, 16], depths=[1, 1], num_hidden_layers=2, out_hidden_size=32))
# NemotronH: one block per layer ("moe" x 2, no attention or Mamba layer: no cache needed); gateless relu2 experts
# running in a 16-wide latent space (fc1_latent_proj / fc2_latent_proj around them).
NEMOTRON_H = dict(COMMON, **_HEADS, layers_block_type=["moe", "moe"], use_mamba_kernels=False, use_cache=False,
                  intermediate_size=64, moe_intermediate_size=16, moe_shared_expert_intermediate_size=24,
                  moe_latent_size=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2,
                  topk_group=1, routed_scaling_factor=2.5, ssm_state_size=8, mamba_num_heads=4, mamba_head_dim=8,
                  n_groups=1, chunk_size=8)
# OpenAI privacy filter: a token classifier (96 labels, so labels=input_ids is valid); GPT-OSS-like experts
# (transposed, biased; clamped SwiGLU with limit 1) computed in float32.
OPENAI_PRIVACY_FILTER = dict(COMMON, **_HEADS, pad_token_id=0, eos_token_id=None, intermediate_size=16,
                             num_local_experts=4, num_experts_per_tok=2, sliding_window=4, swiglu_limit=1.0,
                             num_labels=96, rope_parameters=dict(rope_type="default", rope_theta=150000.0))
# PhiMoE: SparseMixer routing (always 2 experts; eval-mode, so no sampling).
PHIMOE = dict(COMMON, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)
# GLM-4-MoE and DeepSeek-V3 classes under their own config classes (model types sarvam_moe, param2moe, sarvam_mla).
SARVAM_MOE = dict(COMMON, **_HEADS, **_V3_ROUTED, intermediate_size=64, n_routed_experts=8, n_shared_experts=1)
PARAM2MOE = dict(SARVAM_MOE)
SARVAM_MLA = dict(COMMON, **_MLA, **_V3_ROUTED, num_key_value_heads=4, intermediate_size=64, n_routed_experts=8,
                  n_shared_experts=1)
# Step-3.7's language model (model type step3p5): per-layer clamps after the activation (swiglu_limits 1 and 0.5,
# both bind), the shared expert with its own; sigmoid routing with a correction bias; routed output scaled.
STEP3P7 = dict(
    tie_word_embeddings=False,
    text_config=dict(_TEXT, **_HEADS, **_SLIDING_FULL, **_ALL_SPARSE, intermediate_size=64, moe_intermediate_size=16,
                     share_expert_dim=24, n_routed_experts=4, num_experts_per_tok=2, moe_router_scaling_factor=2.0,
                     swiglu_limits=[1.0, 0.5], swiglu_limits_shared=[2.0, 1.0]),
    vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=2,
                       mlp_ratio=2.0, max_position_embeddings=16))
# ZAYA: top-1 only (validated); an MLP router with a 5th 'skip' class (its slots are masked to expert 0 with
# weight 0 before the experts); router state carried between layers.
ZAYA = dict(COMMON, **_HEADS, pad_token_id=0, bos_token_id=2, eos_token_id=3, moe_intermediate_size=16, num_experts=4,
            num_experts_per_tok=1, router_hidden_size=16)


def _vlm(id: str, model_type: str, module: str, prefix: str, kwargs: dict, **extra) -> ModelCase:
    """A family whose language model is built inside ``<prefix>ForConditionalGeneration``."""
    return ModelCase(id, id, model_type, f"{module}:{prefix}Config", f"{module}:{prefix}ForConditionalGeneration",
                     kwargs, **extra)


_5_24 = dict(min_transformers="5.24.0")
# New in 5.25 (ergo, kolibri1_1, minicpm5_moe, param2moe), or built by 5.24 without the interface: 5.24's
# LongcatFlashExperts and Step3p7Experts are not decorated @use_experts_implementation.
_5_25 = dict(min_transformers="5.25.0")

_CASES: list[ModelCase] = [
    _case("afmoe", "afmoe", "afmoe", "afmoe", "Afmoe", AFMOE, **_5_24, post_init=random_routing_bias,
          has_aux_loss=False),
    ModelCase("aria", "aria", "aria_text", "aria:AriaTextConfig", "aria:AriaTextForCausalLM", ARIA, **_5_24,
              has_aux_loss=False),
    _case("axk1", "axk1", "axk1", "axk1", "AXK1", AXK1, **_5_24, post_init=random_correction_bias, has_aux_loss=False),
    _case("axk2", "axk2", "axk2", "axk2", "AXK2", AXK2, **_5_24, post_init=random_correction_bias, has_aux_loss=False),
    _case("beam", "beam", "beam", "beam", "Beam", BEAM, **_5_24, post_init=random_correction_bias, has_aux_loss=False),
    _case("cohere2_moe", "cohere2_moe", "cohere2_moe", "cohere2_moe", "Cohere2Moe", COHERE2_MOE, **_5_24,
          has_aux_loss=False),
    _case("deepseek_v4", "deepseek_v4", "deepseek_v4", "deepseek_v4", "DeepseekV4", DEEPSEEK_V4, **_5_24,
          post_init=random_hash_routes),
    ModelCase("diffusion_gemma", "diffusion_gemma", "diffusion_gemma_text", "diffusion_gemma:DiffusionGemmaConfig",
              "diffusion_gemma:DiffusionGemmaForBlockDiffusion", DIFFUSION_GEMMA, **_5_24, has_aux_loss=False),
    _case("ergo", "ergo", "ergo", "ergo", "Ergo", ERGO, **_5_25, post_init=random_correction_bias, has_aux_loss=False,
          refused_with="DetectionError"),
    _case("ernie4_5_moe", "ernie4_5_moe", "ernie4_5_moe", "ernie4_5_moe", "Ernie4_5_Moe", ERNIE4_5_MOE, **_5_24,
          post_init=random_routing_bias),
    _vlm("ernie4_5_vl_moe", "ernie4_5_vl_moe_text", "ernie4_5_vl_moe", "Ernie4_5_VLMoe", ERNIE4_5_VL_MOE, **_5_24,
         post_init=random_routing_bias),
    ModelCase("gemma4", "gemma4", "gemma4_text", "gemma4:Gemma4TextConfig", "gemma4:Gemma4ForCausalLM", GEMMA4_TEXT,
              **_5_24, has_aux_loss=False),
    _vlm("glm5_next", "glm5_next_text", "glm5_next", "Glm5Next", GLM5_NEXT, **_5_24, post_init=random_correction_bias),
    _case("gpt_oss", "gpt_oss", "gpt_oss", "gpt_oss", "GptOss", GPT_OSS, **_5_24, post_init=small_biases),
    ModelCase("hunyuan_v1_moe", "hunyuan_v1_moe", "hunyuan_v1_moe", "hunyuan_v1_moe:HunYuanMoEV1Config",
              "hunyuan_v1_moe:HunYuanMoEV1ForCausalLM", HUNYUAN_V1_MOE, **_5_24, has_aux_loss=False),
    _case("hy_v3", "hy_v3", "hy_v3", "hy_v3", "HYV3", HY_V3, **_5_24, post_init=random_correction_bias,
          has_aux_loss=False),
    _case("hy_v4", "hy_v4", "hy_v4", "hy_v4", "HYV4", HY_V4, **_5_24, post_init=random_correction_bias,
          has_aux_loss=False),
    _vlm("hy_v4_vl", "hy_v4_vl_text", "hy_v4_vl", "HYV4VL", HY_V4_VL, **_5_24, post_init=random_correction_bias,
         has_aux_loss=False),
    ModelCase("inkling", "inkling", "inkling_text", "inkling:InklingTextConfig", "inkling:InklingForCausalLM",
              INKLING, **_5_24, post_init=random_correction_bias, has_aux_loss=False),
    ModelCase("inkling2", "inkling2", "inkling2_text", "inkling2:Inkling2TextConfig", "inkling2:Inkling2ForCausalLM",
              INKLING2, **_5_24, post_init=random_correction_bias, has_aux_loss=False),
    ModelCase("inkling2_loop", "inkling2_loop", "inkling2_loop_text", "inkling2_loop:Inkling2LoopTextConfig",
              "inkling2_loop:Inkling2LoopForCausalLM", INKLING2_LOOP, **_5_24, post_init=random_correction_bias,
              has_aux_loss=False),
    _case("kolibri1", "kolibri1", "kolibri1", "kolibri1", "Kolibri1", KOLIBRI1, **_5_24,
          post_init=random_correction_bias, has_aux_loss=False),
    _case("kolibri1_1", "kolibri1_1", "kolibri1_1", "kolibri1_1", "Kolibri1_1", KOLIBRI1_1, **_5_25,
          post_init=random_correction_bias, has_aux_loss=False),
    _case("laguna", "laguna", "laguna", "laguna", "Laguna", LAGUNA, **_5_24, post_init=random_routing_bias),
    _case("lfm2_moe", "lfm2_moe", "lfm2_moe", "lfm2_moe", "Lfm2Moe", LFM2_MOE, **_5_24, post_init=random_routing_bias,
          has_aux_loss=False),
    _case("longcat_flash", "longcat_flash", "longcat_flash", "longcat_flash", "LongcatFlash", LONGCAT_FLASH, **_5_25,
          post_init=random_correction_bias, has_aux_loss=False),
    _case("minicpm5_moe", "minicpm5_moe", "minicpm5_moe", "minicpm5_moe", "MiniCPM5Moe", MINICPM5_MOE, **_5_25,
          post_init=random_correction_bias, has_aux_loss=False),
    _case("minimax_m2", "minimax_m2", "minimax_m2", "minimax_m2", "MiniMaxM2", MINIMAX_M2, **_5_24,
          post_init=random_correction_bias),
    _case("mistral4", "mistral4", "mistral4", "mistral4", "Mistral4", MISTRAL4, **_5_24, has_aux_loss=False),
    _vlm("muse_spark", "muse_spark_text", "muse_spark", "MuseSpark", MUSE_SPARK, **_5_24,
         post_init=random_correction_bias, has_aux_loss=False),
    _case("nemotron_h", "nemotron_h", "nemotron_h", "nemotron_h", "NemotronH", NEMOTRON_H, **_5_24,
          post_init=random_correction_bias, has_aux_loss=False),
    ModelCase("openai_privacy_filter", "openai_privacy_filter", "openai_privacy_filter",
              "openai_privacy_filter:OpenAIPrivacyFilterConfig",
              "openai_privacy_filter:OpenAIPrivacyFilterForTokenClassification", OPENAI_PRIVACY_FILTER, **_5_24,
              post_init=small_biases, has_aux_loss=False),
    ModelCase("param2moe", "param2moe", "param2moe", "param2moe:Param2MoeConfig", "glm4_moe:Glm4MoeForCausalLM",
              PARAM2MOE, **_5_25, post_init=random_correction_bias, has_aux_loss=False),
    _case("phimoe", "phimoe", "phimoe", "phimoe", "Phimoe", PHIMOE, **_5_24, post_init=small_biases),
    ModelCase("sarvam_mla", "sarvam_mla", "sarvam_mla", "sarvam_mla:SarvamMLAConfig",
              "deepseek_v3:DeepseekV3ForCausalLM", SARVAM_MLA, **_5_24, post_init=random_correction_bias,
              has_aux_loss=False),
    ModelCase("sarvam_moe", "sarvam_moe", "sarvam_moe", "sarvam_moe:SarvamMoEConfig", "glm4_moe:Glm4MoeForCausalLM",
              SARVAM_MOE, **_5_24, post_init=random_correction_bias, has_aux_loss=False),
    _vlm("step3p7", "step3p5", "step3p7", "Step3p7", STEP3P7, **_5_25, post_init=random_correction_bias,
         has_aux_loss=False),
    _case("zaya", "zaya", "zaya", "zaya", "Zaya", ZAYA, **_5_24, post_init=random_zaya_router, has_aux_loss=False),
]

# Not run as a case: DiffusionGemma is not a causal LM (no loss, labels ignored; its canvas is drawn from
# the global RNG), and its encoder and decoder share their experts' Parameters (tied experts are kept
# shared by autoep.apply; tests/test_experts_level.py). Its tiny config stays above for that test.
NOT_RUN = {"diffusion_gemma": "not a causal LM (returns no loss, draws its canvas from the global RNG); its tied "
                              "experts are covered by tests/test_experts_level.py"}
# Every case runs the experts-level replacement explicitly (the "auto" fallback to it is tested apart).
EXPERTS_CASES: list[ModelCase] = [dataclasses.replace(case, ep_block=EXPERTS_MODE)
                                  for case in _CASES if case.id not in NOT_RUN]
DIFFUSION_GEMMA_CASE = next(case for case in _CASES if case.id == "diffusion_gemma")
