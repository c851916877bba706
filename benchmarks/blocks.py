"""The one model builder of the benchmarks (``moe_layer``, ``curves``, ``gpu``): a one-layer
Transformers MoE model of a given shape with random weights, its MoE block, inputs, one step.

A shape is a dict: ``family`` (mixtral, qwen3_moe or deepseek_v3), ``hidden`` (H), ``intermediate``
(I, each expert's width), ``experts`` (E), ``top_k`` (K); ``tokens`` where a shape fixes them.
deepseek_v3 is built with one shared expert of width I, ``n_group = topk_group = 1`` (greedy top-k
over sigmoid scores with the correction bias, as in the published configs with one group) and
``routed_scaling_factor`` 1.0; it is the family DeepSpeed 0.19.8's AutoEP can still build on
Transformers >= 5.23 (finding DS-1 blocks the others), so the peers are compared on it too.
"""

from __future__ import annotations

import torch

STANDARD = dict(family="mixtral", hidden=512, intermediate=1024, experts=8, top_k=2)
FLOP_FORMULA = ("step FLOPs = 3 (forward + backward: dX and dW each cost a forward) * 6*H*I per routed row "
                "(gate_up 2*H*2I + down 2*I*H) * T*K routed rows (+ T rows per shared expert)")


def shared_experts(shape: dict) -> int:
    return 1 if shape["family"] == "deepseek_v3" else 0


def expert_flops(shape: dict, tokens: int) -> float:
    """FLOPs of one forward + backward of the experts (routed and shared); router not counted."""
    rows = tokens * (shape["top_k"] + shared_experts(shape))
    return 18.0 * shape["hidden"] * shape["intermediate"] * rows


def block_config(shape: dict):
    """The Transformers config of a one-layer model of ``shape``."""
    from transformers import DeepseekV3Config, MixtralConfig, Qwen3MoeConfig

    hidden, inter, experts, top_k = shape["hidden"], shape["intermediate"], shape["experts"], shape["top_k"]
    heads = max(1, hidden // 128)
    common = dict(hidden_size=hidden, num_hidden_layers=1, vocab_size=128, num_attention_heads=heads,
                  num_key_value_heads=heads)
    family = shape["family"]
    if family == "mixtral":
        return MixtralConfig(intermediate_size=inter, num_local_experts=experts, num_experts_per_tok=top_k,
                             router_jitter_noise=0.0, **common)
    if family == "qwen3_moe":
        return Qwen3MoeConfig(intermediate_size=inter, moe_intermediate_size=inter, num_experts=experts,
                              num_experts_per_tok=top_k, head_dim=hidden // heads, norm_topk_prob=True,
                              decoder_sparse_step=1, mlp_only_layers=[], **common)
    if family == "deepseek_v3":
        return DeepseekV3Config(intermediate_size=inter, moe_intermediate_size=inter, n_routed_experts=experts,
                                num_experts_per_tok=top_k, n_shared_experts=1, n_group=1, topk_group=1,
                                first_k_dense_replace=0, routed_scaling_factor=1.0, norm_topk_prob=True,
                                q_lora_rank=None, kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32,
                                v_head_dim=32, **common)
    raise ValueError(f"shape family {family!r}: expected 'mixtral', 'qwen3_moe' or 'deepseek_v3'")


def build_block_model(shape: dict, dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> torch.nn.Module:
    """A one-layer model of ``shape`` built on ``device`` in ``dtype``, the same weights on every
    process: matrices N(0, 1/fan_in), vectors 1 + N(0, 0.01) (Transformers leaves the router at
    zero, which would make every routing decision a tie), the correction bias N(0, 0.01)."""
    from transformers import AutoModelForCausalLM

    config = block_config(shape)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator(device=device).manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, param.shape[-1] ** -0.5, generator=generator)
            else:
                param.normal_(1.0, 0.1, generator=generator)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0.0, 0.1, generator=generator)
    return model.to(dtype).train()


def block_of(model: torch.nn.Module) -> torch.nn.Module:
    return model.model.layers[0].mlp


def layer_inputs(shape: dict, tokens: int, dtype: torch.dtype, device: str = "cpu", seed: int = 2,
                 generator: torch.Generator | None = None):
    """``x`` [1, T, H] in ``dtype`` (requires grad) and a fixed float32 upstream gradient, drawn in that
    order from ``generator`` (default: a new one seeded with ``seed``)."""
    generator = generator or torch.Generator(device=device).manual_seed(seed)
    x_BTH = torch.randn(1, tokens, shape["hidden"], device=device, generator=generator).to(dtype).requires_grad_()
    upstream_BTH = torch.randn(1, tokens, shape["hidden"], device=device, generator=generator)
    return x_BTH, upstream_BTH


def block_output(out) -> torch.Tensor:
    """The hidden states of a block's output (some blocks return (hidden, router_logits))."""
    return out[0] if isinstance(out, tuple) else out


def block_step(block: torch.nn.Module, x_BTH: torch.Tensor, upstream_BTH: torch.Tensor) -> None:
    """Forward and backward of the block with a fixed upstream gradient; gradients cleared first."""
    block.zero_grad(set_to_none=True)
    x_BTH.grad = None
    (block_output(block(x_BTH)).float() * upstream_BTH).sum().backward()
