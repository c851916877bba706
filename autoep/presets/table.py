"""The family table: one row per MoE family of Transformers 5.x that AutoEP replaces, and one
per family it refuses, with the reason.

Detection, the layer, the reference (through the RoutingSpec a row builds), the matrix and
`autoep inspect --families` read these rows. A family is added by adding a row (and, where its
routing needs a decision no field expresses yet, a new RoutingSpec field implemented in
autoep/routing.py and, independently, in reference/moe.py). Every row is proven by a tiny
random model in matrix/models.py (FAMILY_CASES) against the stock Transformers model and
the reference.
"""

from __future__ import annotations

from autoep.presets.base import Preset, Refusal, Routing

# Routing rows shared by several families (each is still one declaration).
# Mixtral: softmax over all experts in float32, top-k, always renormalised, float32 weights.
SOFTMAX_RENORM = Routing("softmax", renormalize=True, recorded="probabilities_before_5.3")
# Qwen2/Qwen3-MoE: as Mixtral, renormalised if norm_topk_prob, weights cast to the hidden dtype.
SOFTMAX_NORM_FLAG_CAST = Routing("softmax", renormalize="norm_topk_prob", weights_dtype="hidden",
                                 recorded="probabilities_before_5.3")
# Qwen3.5-MoE: always renormalised, weights cast to the hidden dtype.
SOFTMAX_RENORM_CAST = Routing("softmax", renormalize=True, weights_dtype="hidden",
                              recorded="probabilities_before_5.3")
# DeepSeek-V2: float32 router matmul, softmax, greedy or group-limited greedy (group score = max),
# never renormalised, scaled by routed_scaling_factor.
DEEPSEEK_V2 = Routing("softmax", matmul_fp32=True, grouping="topk_method", group_score="max",
                      scale_field="routed_scaling_factor")
# DeepSeek-V3: float32 router matmul, sigmoid scores, experts chosen on scores +
# e_score_correction_bias (a buffer) within the best topk_group of n_group groups (group score =
# sum of its top-2), renormalised if norm_topk_prob (+1e-20), scaled by routed_scaling_factor.
DEEPSEEK_V3 = Routing("sigmoid", matmul_fp32=True, correction_bias=True, grouping="n_group>1",
                      group_score="top2_sum", renormalize="norm_topk_prob", renormalize_epsilon=1e-20,
                      scale_field="routed_scaling_factor")

# --- group A routing rows ---
# Jamba: softmax over all experts in float32, top-k, never renormalised, weights cast to the hidden dtype.
SOFTMAX_CAST = Routing("softmax", weights_dtype="hidden")
# Lara-Mini: router matmul in float32, softmax, top-k, renormalised if norm_topk_prob (no epsilon),
# weights cast to the hidden dtype.
SOFTMAX_FP32_NORM_FLAG_CAST = Routing("softmax", matmul_fp32=True, renormalize="norm_topk_prob",
                                      weights_dtype="hidden")
# Flint: router matmul in float32, sigmoid scores (no correction bias, no groups), top-k on the scores,
# renormalised if norm_topk_prob (no epsilon), float32 weights, unscaled.
SIGMOID_FP32_NORM_FLAG = Routing("sigmoid", matmul_fp32=True, renormalize="norm_topk_prob")

# MiniMax-M3: router matmul in the hidden dtype, float32 sigmoid scores, experts chosen on scores +
# e_score_correction_bias, always renormalised (no epsilon), float32 weights, x routed_scaling_factor.
MINIMAX_M3 = Routing("sigmoid", correction_bias=True, renormalize=True, scale_field="routed_scaling_factor")

# --- group B routing rows ---
# Mistral-Large-4: float32 router matmul, softmax over all experts, top-k within the best topk_group of
# n_group groups (group score = sum of its top-2 probabilities), always renormalised (+1e-20),
# x routed_scaling_factor, float32 weights, raw float32 logits recorded.
MISTRAL_LARGE4 = Routing("softmax", matmul_fp32=True, grouping="n_group>1", group_score="top2_sum", renormalize=True,
                         renormalize_epsilon=1e-20, scale_field="routed_scaling_factor")

# --- group E routing rows ---
# GraniteMoE: router matmul in the hidden dtype, upcast to float32; top-k on the raw logits, softmax over
# the k chosen logits only, weights cast to the hidden dtype; the float32 logits are recorded.
GRANITE_TOPK_SOFTMAX = Routing("softmax", softmax_after_topk=True, weights_dtype="hidden", record_float32=True)

_DEEPSEEK_FIELDS = dict(num_experts_fields=("n_routed_experts",), top_k_field="num_experts_per_tok",
                        intermediate_field="moe_intermediate_size")

FAMILIES: tuple[Preset, ...] = (
    # --- the seed's presets (DeepSpeed's AutoEP names them too) ---
    Preset("mixtral", "Mixtral", {"mixtral": "MixtralSparseMoeBlock"}, "5.0.0",
           ("num_local_experts",), "num_experts_per_tok", "intermediate_size", SOFTMAX_RENORM,
           deepspeed_preset=True),
    Preset("qwen3_moe", "Qwen3-MoE / Qwen2-MoE",
           {"qwen3_moe": "Qwen3MoeSparseMoeBlock", "qwen2_moe": "Qwen2MoeSparseMoeBlock"}, "5.0.0",
           ("num_experts",), "num_experts_per_tok", "moe_intermediate_size", SOFTMAX_NORM_FLAG_CAST,
           shared={"qwen2_moe": ("shared_expert", "shared_expert_gate")}, deepspeed_preset=True,
           notes="also covers Qwen2-MoE (sigmoid-gated shared expert; preset_model 'qwen2_moe' names it too)"),
    Preset("qwen3_5_moe", "Qwen3.5-MoE",
           {"qwen3_5_moe_text": "Qwen3_5MoeSparseMoeBlock", "qwen3_5_moe": "Qwen3_5MoeSparseMoeBlock"}, "5.2.0",
           ("num_experts",), "num_experts_per_tok", "moe_intermediate_size", SOFTMAX_RENORM_CAST,
           shared={"qwen3_5_moe_text": ("shared_expert", "shared_expert_gate"),
                   "qwen3_5_moe": ("shared_expert", "shared_expert_gate")}, deepspeed_preset=True,
           notes="model type qwen3_5_moe_text (the VLM's language model is found too)"),
    Preset("deepseek_v2", "DeepSeek-V2", {"deepseek_v2": "DeepseekV2Moe"}, "5.0.0", **_DEEPSEEK_FIELDS,
           routing=DEEPSEEK_V2, shared={"deepseek_v2": ("shared_experts", None)}, deepspeed_preset=True,
           notes="greedy and group_limited_greedy; load_balance_coeff must stay null"),
    Preset("deepseek_v3", "DeepSeek-V3", {"deepseek_v3": "DeepseekV3MoE"}, "5.0.0", **_DEEPSEEK_FIELDS,
           routing=DEEPSEEK_V3, shared={"deepseek_v3": ("shared_experts", None)}, deepspeed_preset=True,
           notes="e_score_correction_bias buffer kept; load_balance_coeff must stay null"),
    # --- families added by structure + routing row (issue 12) ---
    # --- group A ---
    Preset("minimax", "MiniMax", {"minimax": "MiniMaxSparseMoeBlock"}, "5.0.0",
           ("num_local_experts",), "num_experts_per_tok", "intermediate_size", SOFTMAX_RENORM,
           notes="Mixtral's block and router; lightning-attention layers are left as they are"),
    Preset("qwen3_next", "Qwen3-Next", {"qwen3_next": "Qwen3NextSparseMoeBlock"}, "5.2.0",
           ("num_experts",), "num_experts_per_tok", "moe_intermediate_size", SOFTMAX_NORM_FLAG_CAST,
           shared={"qwen3_next": ("shared_expert", "shared_expert_gate")},
           notes="Qwen2-MoE's block (sigmoid-gated shared expert); gated-delta-net layers left as they are"),
    Preset("qwen3_vl_moe", "Qwen3-VL-MoE", {"qwen3_vl_moe_text": "Qwen3VLMoeTextSparseMoeBlock",
                                           "qwen3_vl_moe": "Qwen3VLMoeTextSparseMoeBlock"}, "5.20.2",
           ("num_experts",), "num_experts_per_tok", "moe_intermediate_size", SOFTMAX_RENORM_CAST,
           notes="the language model's blocks (text_config); the vision tower has no MoE"),
    Preset("qwen3_omni_moe", "Qwen3-Omni-MoE (Thinker)",
           {"qwen3_omni_moe_text": "Qwen3OmniMoeThinkerTextSparseMoeBlock",
            "qwen3_omni_moe_thinker": "Qwen3OmniMoeThinkerTextSparseMoeBlock"}, "5.2.0",
           ("num_experts",), "num_experts_per_tok", "moe_intermediate_size", SOFTMAX_NORM_FLAG_CAST,
           notes="the Thinker's language model (Qwen3-MoE's block); the full Omni model (model type "
                 "qwen3_omni_moe, with the Talker's differently sized MoE blocks) is not covered"),
    Preset("olmoe", "OLMoE", {"olmoe": "OlmoeSparseMoeBlock"}, "5.0.0",
           ("num_experts",), "num_experts_per_tok", "intermediate_size", SOFTMAX_NORM_FLAG_CAST),
    Preset("flex_olmo", "FlexOlmo", {"flex_olmo": "FlexOlmoSparseMoeBlock"}, "5.2.0",
           ("num_experts",), "num_experts_per_tok", "intermediate_size", SOFTMAX_NORM_FLAG_CAST),
    Preset("mellum", "Mellum", {"mellum": "MellumSparseMoeBlock"}, "5.16.1",
           ("num_experts",), "num_experts_per_tok", "moe_intermediate_size", SOFTMAX_NORM_FLAG_CAST,
           notes="MTP layers (num_mtp_layers) are dropped on load by Transformers and never built"),
    Preset("jamba", "Jamba", {"jamba": "JambaSparseMoeBlock"}, "5.0.0",
           ("num_experts",), "num_experts_per_tok", "intermediate_size", SOFTMAX_CAST, router_attr="router",
           notes="expert layers per expert_layer_period/offset; Mamba layers left as they are"),
    Preset("lara_mini", "Lara-Mini", {"lara_mini": "LaraMiniSparseMoeBlock"}, "5.24.0",
           ("num_experts",), "num_experts_per_tok", "moe_intermediate_size", SOFTMAX_FP32_NORM_FLAG_CAST,
           shared={"lara_mini": ("shared_expert", None)}),
    Preset("flint", "Flint", {"flint": "FlintSparseMoeBlock"}, "5.22.2",
           ("num_experts",), "num_experts_per_tok", "moe_intermediate_size", SIGMOID_FP32_NORM_FLAG,
           shared={"flint": ("shared_expert", None)}),
    # --- group B ---
    # Blocks identical to DeepseekV3MoE (router, fused experts, ungated shared_experts) under other names.
    Preset("deepseek_v32", "DeepSeek-V3.2", {"deepseek_v32": "DeepseekV32MoE"}, "5.16.1", **_DEEPSEEK_FIELDS,
           routing=DEEPSEEK_V3, shared={"deepseek_v32": ("shared_experts", None)},
           notes="DeepSeek-V3 routing; the sparse-attention indexer is left as it is"),
    Preset("glm4_moe", "GLM-4.5 / GLM-4.6 (GLM-4-MoE)", {"glm4_moe": "Glm4MoeMoE"}, "5.0.0", **_DEEPSEEK_FIELDS,
           routing=DEEPSEEK_V3, shared={"glm4_moe": ("shared_experts", None)},
           notes="DeepSeek-V3 routing; the first first_k_dense_replace layers are dense"),
    Preset("glm4_moe_lite", "GLM-4-MoE-Lite", {"glm4_moe_lite": "Glm4MoeLiteMoE"}, "5.0.0", **_DEEPSEEK_FIELDS,
           routing=DEEPSEEK_V3, shared={"glm4_moe_lite": ("shared_experts", None)},
           notes="DeepSeek-V3 routing, MLA attention"),
    Preset("glm4v_moe", "GLM-4.5V (GLM-4V-MoE)",
           {"glm4v_moe_text": "Glm4vMoeTextMoE", "glm4v_moe": "Glm4vMoeTextMoE"}, "5.20.2", **_DEEPSEEK_FIELDS,
           routing=DEEPSEEK_V3, shared={"glm4v_moe_text": ("shared_experts", None),
                                        "glm4v_moe": ("shared_experts", None)},
           notes="the VLM's language model (model type glm4v_moe_text); its aux loss reads the raw logits"),
    Preset("glm_moe_dsa", "GLM-5 (GLM-MoE-DSA)", {"glm_moe_dsa": "GlmMoeDsaMoE"}, "5.2.0", **_DEEPSEEK_FIELDS,
           routing=DEEPSEEK_V3, shared={"glm_moe_dsa": ("shared_experts", None)},
           notes="DeepSeek-V3 routing; the sparse-attention indexer is left as it is"),
    Preset("dots1", "dots.llm1", {"dots1": "Dots1MoE"}, "5.0.0", **_DEEPSEEK_FIELDS,
           routing=DEEPSEEK_V3, shared={"dots1": ("shared_experts", None)}, notes="DeepSeek-V3 routing"),
    Preset("dots3_note", "dots.3 Note",
           {"dots3_note_text": "Dots3NoteTextMoE", "dots3_note": "Dots3NoteTextMoE"}, "5.23.0", **_DEEPSEEK_FIELDS,
           routing=DEEPSEEK_V3, shared={"dots3_note_text": ("shared_experts", None),
                                        "dots3_note": ("shared_experts", None)},
           notes="the language model's blocks (model type dots3_note_text); the vision tower's own MoE blocks "
                 "(Dots3NoteVisionMoE, correction bias on the block) are left as they are"),
    Preset("mistral_large4", "Mistral-Large-4",
           {"mistral_large4_text": "MistralLarge4TextMoE", "mistral_large4": "MistralLarge4TextMoE"}, "5.22.2",
           **_DEEPSEEK_FIELDS, routing=MISTRAL_LARGE4,
           shared={"mistral_large4_text": ("shared_experts", None), "mistral_large4": ("shared_experts", None)},
           notes="the VLM's language model (model type mistral_large4_text); groups masked with 0 (not -inf) "
                 "by Transformers: the same choice while every kept expert's probability is > 0"),
    # Blocks identical to DeepseekV2Moe (softmax, greedy / group_limited_greedy, routed scaling).
    Preset("deepseek_ocr2", "DeepSeek-OCR-2",
           {"deepseek_ocr2_text": "DeepseekOcr2TextMoe", "deepseek_ocr2": "DeepseekOcr2TextMoe"}, "5.16.1",
           **_DEEPSEEK_FIELDS, routing=DEEPSEEK_V2,
           shared={"deepseek_ocr2_text": ("shared_experts", None), "deepseek_ocr2": ("shared_experts", None)},
           notes="the language model's blocks (model type deepseek_ocr2_text); DeepSeek-V2 routing"),
    Preset("unlimited_ocr", "Unlimited-OCR",
           {"unlimited_ocr_text": "UnlimitedOcrTextMoe", "unlimited_ocr": "UnlimitedOcrTextMoe"}, "5.20.2",
           **_DEEPSEEK_FIELDS, routing=DEEPSEEK_V2,
           shared={"unlimited_ocr_text": ("shared_experts", None), "unlimited_ocr": ("shared_experts", None)},
           notes="the language model's blocks (model type unlimited_ocr_text); DeepSeek-V2 routing"),
    # --- group C ---
    # DeepSeek-V3 routers (sigmoid, e_score_correction_bias buffer, top-2-sum groups, renormalised if
    # norm_topk_prob + 1e-20, routed_scaling_factor). These routers group unconditionally; at
    # n_group=1 that keeps every expert, which is what "n_group>1" grouping declares.
    Preset("solar_open", "Solar Open", {"solar_open": "SolarOpenMoE"}, "5.0.0", **_DEEPSEEK_FIELDS,
           routing=DEEPSEEK_V3, shared={"solar_open": ("shared_experts", None)},
           notes="e_score_correction_bias buffer kept; every layer is a MoE layer"),
    Preset("exaone_moe", "EXAONE-MoE", {"exaone_moe": "ExaoneMoeSparseMoEBlock"}, "5.2.0", ("num_experts",),
           "num_experts_per_tok", "moe_intermediate_size", DEEPSEEK_V3,
           shared={"exaone_moe": ("shared_experts", None)},
           notes="dense layers (mlp_layer_types 'dense') are left as they are"),
    Preset("bailing_hybrid", "Bailing (Ling) hybrid", {"bailing_hybrid": "BailingHybridMoE"}, "5.20.2",
           ("num_local_experts",), "num_experts_per_tok", "moe_intermediate_size", DEEPSEEK_V3,
           shared={"bailing_hybrid": ("shared_experts", None)},
           notes="config aliases: num_experts, num_experts_per_token, moe_renormalize, num_expert_group"),
    Preset("kimi_linear", "Kimi Linear", {"kimi_linear": "KimiLinearMoE"}, "5.20.2", ("num_local_experts",),
           "num_experts_per_tok", "moe_intermediate_size", DEEPSEEK_V3,
           shared={"kimi_linear": ("shared_experts", None)},
           notes="config aliases: num_experts, num_experts_per_token, moe_renormalize, num_expert_group"),
    Preset("mimo_v2_flash", "MiMo-V2-Flash", {"mimo_v2_flash": "MiMoV2FlashMoE"}, "5.16.1", **_DEEPSEEK_FIELDS,
           routing=DEEPSEEK_V3, notes="no shared experts; the first layer is dense by default"),
    # --- group D ---
    Preset("minimax_m3", "MiniMax-M3",
           {"minimax_m3_vl_text": "MiniMaxM3VLSparseMoeBlock"}, "5.16.1",
           ("num_local_experts",), "num_experts_per_tok", "intermediate_size", MINIMAX_M3,
           shared={"minimax_m3_vl_text": ("shared_experts", None)},
           clamped_swiglu=("swiglu_alpha", "swiglu_limit"), deepspeed_preset=True,
           notes="model type minimax_m3_vl_text (the VLM's language model is found by it); clamped GPT-OSS SwiGLU experts and shared expert (fused "
                 "gate_up_proj Linear), alpha/limit read from the modules; routed_scaling_factor scales the "
                 "routed sum (applied to the weights: the same sum)"),
    # --- group E ---
    # GraniteMoE blocks (GraniteMoeMoE: `router` + fused `experts`, found at layers.i.block_sparse_moe).
    # The SWA/Shared/Hybrid variants' shared_mlp sits in the decoder layer, outside the block. Before 5.22
    # the router returned (top_k_index, top_k_weights, router_logits) (recorded at index 2; SWA from 5.20),
    # before 5.20 it recorded no router logits at all (its own aux loss fails), and 5.0-5.2 had other blocks.
    Preset("granitemoe", "GraniteMoE", {"granitemoe": "GraniteMoeMoE"}, "5.22.2",
           ("num_local_experts",), "num_experts_per_tok", "intermediate_size", GRANITE_TOPK_SOFTMAX,
           router_attr="router"),
    Preset("granitemoe_swa", "GraniteMoE-SWA", {"granitemoe_swa": "GraniteMoeSWAMoE"}, "5.20.2",
           ("num_local_experts",), "num_experts_per_tok", "intermediate_size", GRANITE_TOPK_SOFTMAX,
           router_attr="router", notes="the decoder layer's shared_mlp (outside the block) is left as it is"),
    Preset("granitemoeshared", "GraniteMoE-Shared", {"granitemoeshared": "GraniteMoeSharedMoE"}, "5.22.2",
           ("num_local_experts",), "num_experts_per_tok", "intermediate_size", GRANITE_TOPK_SOFTMAX,
           router_attr="router", notes="the decoder layer's shared_mlp (outside the block) is left as it is"),
    Preset("granitemoehybrid", "GraniteMoE-Hybrid (Granite 4.0)", {"granitemoehybrid": "GraniteMoeHybridMoE"},
           "5.22.2", ("num_local_experts",), "num_experts_per_tok", "intermediate_size", GRANITE_TOPK_SOFTMAX,
           router_attr="router", notes="Mamba-2 layers and the decoder layer's shared_mlp are left as they are"),
    Preset("qwen4_exp", "Qwen4-Exp",
           {"qwen4_exp_text": "Qwen4ExpTextSparseMoeBlock", "qwen4_exp": "Qwen4ExpTextSparseMoeBlock"}, "5.16.1",
           ("num_experts",), "num_experts_per_tok", "moe_intermediate_size", SOFTMAX_NORM_FLAG_CAST,
           shared={"qwen4_exp_text": ("shared_expert", "shared_expert_gate"),
                   "qwen4_exp": ("shared_expert", "shared_expert_gate")},
           notes="model type qwen4_exp_text (the VLM's language model is found too); Qwen2-MoE's block; gated "
                 "delta net, QSA indexer, hyper-connections and PLE layers are left as they are"),
)

# preset_model names that select a row under another name.
ALIASES: dict[str, str] = {"qwen2_moe": "qwen3_moe"}

# Families without a routing row. A reason says why the table has no row for the family (what its
# routing needs that no Routing field declares); such a family runs at the experts level (the model's
# own router, AutoEP's experts; autoep/experts_level.py) wherever its experts module has Transformers'
# uniform interface. ``hard=True``: refused in every mode (not even its experts can be made exact).
REFUSED: tuple[Refusal, ...] = (
    Refusal(("llama4", "llama4_text"),
            "Llama4TextExperts is not Transformers' uniform experts interface: Llama4TextMoe multiplies every token "
            "by its routing score before the experts and runs every expert on every token (experts(routed_in) "
            "receives no expert index per row), so there is nothing to dispatch; its experts are also stored "
            "transposed ([E, H, 2I], [E, I, H])", hard=True),
    Refusal(("ergo",),
            "ErgoExperts replaces the forward of its @use_experts_implementation base (ErgoExpertProjections) to "
            "apply a per-expert RMSNorm (post_expert_norm.weight [E, H], indexed by each route's expert) to every "
            "route before the weighted sum: the interface's flags do not describe it, and the norm's weight is "
            "itself per expert", versions=">=5.25.0", hard=True),
    # --- group A ---
    Refusal(("nemotron_h",),
            "not implemented yet: NemotronH experts have no gate (up_proj [E, I, H], act(x up) down with "
            "mlp_hidden_act), the block may project into and out of a latent space around the experts "
            "(fc1_latent_proj / fc2_latent_proj), its shared expert is an up/down MLP, and it accumulates in float32"),
    Refusal(("phimoe",),
            "PhiMoE routes with SparseMixer: exactly 2 experts per token whatever num_experts_per_tok says, "
            "chosen by Gumbel sampling in training, each weight a softmax over the experts within a "
            "router_jitter_noise-relative margin of the best remaining one, with a custom (Heun third-order) "
            "gradient (PhimoeMultiplier); neither the sampling nor that gradient is a deterministic top-k"),
    # --- group B ---
    # Describable, but each needs a decision the layer and the reference do not implement yet:
    Refusal(("mistral4",),
            "not implemented yet: the router matmul, softmax, renormalisation and scaling run in the hidden dtype "
            "(in bf16 the chosen experts differ from float32 scoring on some tokens)"),
    Refusal(("glm5_next", "glm5_next_text"),
            "not implemented yet: the experts (and shared expert) compute silu(clamp(gate, max=L)) * clamp(up, -L, L) "
            "with L = config.swiglu_limit and have no act_fn"),
    Refusal(("kolibri1",),
            "not implemented yet: experts are chosen by top-k on raw logits + correction bias, and weighted by the "
            "sigmoid of the chosen logits"),
    Refusal(("laguna",),
            "not implemented yet: an optional tanh soft-cap on the router logits (moe_router_logit_softcapping), "
            "moe_routed_scaling_factor applied to the summed expert output in the hidden dtype, and the correction "
            "bias held as a Parameter"),
    Refusal(("deepseek_v4",),
            "DeepSeek-V4's DeepseekV4SparseMoeBlock routes its first mlp_layer_types == 'hash_moe' layers (3 by "
            "default) with DeepseekV4HashRouter: the experts of a token are a frozen lookup tid2eid[input_ids] "
            "(a [vocab, top_k] buffer), and the block's forward takes input_ids, so the choice is a function of the "
            "token id, not of a top-k over router scores (its other layers also score with config.scoring_func, "
            "'sqrtsoftplus' by default, and run a clamped SwiGLU, silu(clamp(gate, max=swiglu_limit)) * "
            "clamp(up, -swiglu_limit, swiglu_limit))"),
    # --- group C ---
    # Describable, but each needs a decision the layer and the reference do not implement yet:
    Refusal(("afmoe",),
            "not implemented yet: the router weight is nested (router.gate.weight) and the correction bias is a "
            "Parameter on the block (expert_bias) passed to the router; AutoEP reads both from the router"),
    Refusal(("aria", "aria_text"),
            "not implemented yet: top-k on the hidden-dtype logits then a softmax over the k in the hidden dtype, "
            "and experts stored transposed (gate_up_proj [E, H, 2I], down_proj [E, I, H])"),
    Refusal(("axk1",),
            "not implemented yet: the block applies its own RMSNorm (post_mlp_layernorm) to routed + shared output"),
    Refusal(("axk2",),
            "not implemented yet: group-limited routing whenever n_group is set, and experts of dropped groups "
            "masked with 0.0 instead of -inf (a kept expert whose score + bias < 0 loses to a dropped one)"),
    Refusal(("beam",),
            "not implemented yet: routed_scaling_factor multiplies the summed expert output in the hidden dtype "
            "(not the weights) and the experts compute their SwiGLU in float32"),
    Refusal(("cohere2_moe",),
            "not implemented yet: top-k on the hidden-dtype logits, then softmax (or, with "
            "expert_selection_fn='sigmoid', sigmoid) over the k, and routed and shared outputs averaged "
            "(shared_expert_combination_strategy='average')"),
    Refusal(("ernie4_5_moe",),
            "not implemented yet: the correction bias is a [1, E] Parameter at gate.moe_statics, and the top-k "
            "weights are divided by max(sum, moe_norm_min) instead of sum + epsilon"),
    Refusal(("hunyuan_v1_moe",),
            "not implemented yet: the router weight is nested (gate.wg, an nn.Linear), the shared MLP is "
            "shared_mlp, and num_experts / moe_topk may be per-layer lists"),
    Refusal(("hy_v3",),
            "not implemented yet: the correction bias is a buffer on the block passed to the router, and "
            "enable_moe_fp32_combine adds routed and shared outputs in float32"),
    Refusal(("hy_v4", "hy_v4_vl", "hy_v4_vl_text"),
            "not implemented yet: the experts have no act_fn and apply a clamped SwiGLU (gate <= swiglu_limit, up "
            "within +-swiglu_limit) without the GPT-OSS alpha/+1 terms"),
    Refusal(("ernie4_5_vl_moe", "ernie4_5_vl_moe_text"),
            "ERNIE-4.5-VL's MoE block (Ernie4_5_VLMoeMoeBlock) holds two expert sets, text_moe and vision_moe, "
            "each with its own router, and sends every token to one of them by its moe_mm_token_type_ids "
            "(an extra forward input, text vs image/video): a per-token choice of expert set, not one router "
            "over one set of experts (its routers also choose on softmax + a [1, E] correction bias stored in "
            "gate.moe_statics and renormalise by max(sum, moe_norm_min))"),
    # --- group D ---
    # Describable, but each needs a decision the layer and the reference do not implement yet:
    Refusal(("gpt_oss",),
            "not implemented yet: GptOssExperts store gate_up_proj transposed [E, H, 2I] with gate and up "
            "interleaved (columns ::2 / 1::2) and carry biases (gate_up_proj_bias, down_proj_bias), the router "
            "Linear has a bias, and the activation is the clamped SwiGLU (alpha 1.702, limit 7)"),
    Refusal(("openai_privacy_filter",),
            "not implemented yet: a biased router and GPT-OSS's experts (transposed, biased, clamped SwiGLU; gate "
            "and up concatenated, not interleaved), computed in float32 by its eager forward"),
    Refusal(("minimax_m2",),
            "not implemented yet: MiniMaxM2SparseMoeBlock holds the e_score_correction_bias buffer on the block "
            "itself and passes it to gate.forward; AutoEP reads the correction bias from the router"),
    Refusal(("lfm2_moe",),
            "not implemented yet: Lfm2MoeSparseMoeBlock computes sigmoid, top-k, renormalisation (+1e-6) and "
            "scaling in the hidden dtype, and its expert_bias correction buffer lives on the block"),
    Refusal(("step3p7",),
            "not implemented yet: Step3p7 experts clamp after the activation (min(act(gate), L) * clamp(up, -L, L)) "
            "with a per-layer limit L from swiglu_limits, and the shared expert has its own clamp"),
    Refusal(("inkling_text", "inkling_mm_model"),
            "InklingMoE's router weight scores routed and shared experts together, weights are a softmax over "
            "logsigmoid of the chosen and shared logits times a learned global_scale, and the shared experts are "
            "gated by router gammas: no RoutingSpec field describes this"),
    Refusal(("inkling2", "inkling2_text", "inkling2_loop", "inkling2_loop_text"),
            "not implemented yet: the routing is DeepSeek-V3's without groups, but the experts apply a soft-capped "
            "SwiGLU (softcap(gate) * sigmoid(gate) * softcap(up), caps mlp_gate_softcap / mlp_up_softcap)"),
    Refusal(("muse_spark",),
            "MuseSpark's block projects tokens before and after the experts (pre_expert_proj, a centred RMSNorm, "
            "post_expert_proj), normalises each expert's output (post_expert_norm) and scales the logits by "
            "output_multiplier: not a router + fused experts block"),
    Refusal(("gemma4", "gemma4_text", "diffusion_gemma", "diffusion_gemma_text"),
            "Gemma-4 has no MoE block module: router and experts are children of the decoder layer, and the router "
            "normalises its input (RMSNorm, a learned scale) and scales each expert (per_expert_scale)"),
    Refusal(("longcat_flash",),
            "LongcatFlashMoE mixes zero_expert_num identity ('zero-compute') experts into the routing: a token's "
            "top-k may pick experts that return the input scaled by their weight instead of an MLP, and "
            "LongcatFlashExperts.gate_up_proj holds n_routed_experts + zero_expert_num rows while down_proj holds "
            "n_routed_experts; the router (router.classifier) scores all of them with a softmax"),
    Refusal(("zaya",),
            "ZayaRouter is an MLP (down_proj + RMSNorm + two GELU Linears with biases + out_proj), not a Linear(H, E), "
            "adds the previous layer's router state (router_states_scale), and scores an extra 'skip' expert whose "
            "choice drops that slot: neither a single router weight nor a fixed top-k of real experts"),
)
