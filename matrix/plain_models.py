"""A Mixtral-shaped model built from plain ``torch.nn`` modules: no Transformers class anywhere.

DeepSpeed's own AutoEP unit tests build such a model (``config.model_type == "mixtral"``, a block
with a ``gate`` Linear and ``experts.gate_up_proj`` / ``down_proj`` of Mixtral's shapes) and expect
it to be found by its structure, replaced and trained. It is the whole-block detection's case for
"names and shapes, whatever the class": its block class is not ``MixtralSparseMoeBlock``, its
experts are not ``@use_experts_implementation`` (so no experts-level replacement is possible),
and its config is not a Transformers config.

Its routing is Mixtral's (softmax over all experts in float32, top-k, renormalised); its experts
compute ``down(silu(gate x) * up x)`` per expert in a loop.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn


class PlainMixtralConfig:
    """Not a Transformers config: plain attributes, ``get_text_config`` for the harness."""

    model_type = "mixtral"

    def __init__(self, vocab_size: int = 96, hidden_size: int = 32, intermediate_size: int = 48,
                 num_local_experts: int = 4, num_experts_per_tok: int = 2, num_hidden_layers: int = 2,
                 hidden_act: str = "silu", router_jitter_noise: float = 0.0, **extra):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_local_experts, self.num_experts_per_tok = num_local_experts, num_experts_per_tok
        self.num_hidden_layers, self.hidden_act, self.router_jitter_noise = num_hidden_layers, hidden_act, \
            router_jitter_noise
        for key, value in extra.items():
            setattr(self, key, value)

    def get_text_config(self):
        return self


class PlainExperts(nn.Module):
    def __init__(self, config: PlainMixtralConfig):
        super().__init__()
        experts, hidden, inner = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * inner, hidden))
        self.down_proj = nn.Parameter(torch.empty(experts, hidden, inner))
        self.act_fn = nn.SiLU()

    def forward(self, hidden_TH: torch.Tensor, index_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        out_TH = torch.zeros_like(hidden_TH)
        for expert in range(self.gate_up_proj.shape[0]):
            token, slot = torch.where(index_TK == expert)
            if token.numel():
                gate, up = F.linear(hidden_TH[token], self.gate_up_proj[expert]).chunk(2, dim=-1)
                y = F.linear(self.act_fn(gate) * up, self.down_proj[expert])
                out_TH.index_add_(0, token, (y * weights_TK[token, slot, None]).to(out_TH.dtype))
        return out_TH


class PlainMoEBlock(nn.Module):
    def __init__(self, config: PlainMixtralConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.experts = PlainExperts(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        hidden_TH = hidden_states.reshape(-1, shape[-1])
        probabilities = torch.softmax(self.gate(hidden_TH).float(), dim=-1)
        weights_TK, index_TK = probabilities.topk(self.top_k, dim=-1)
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return self.experts(hidden_TH, index_TK, weights_TK).reshape(shape)


class PlainLayer(nn.Module):
    def __init__(self, config: PlainMixtralConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.hidden_size)
        self.mlp = PlainMoEBlock(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.mlp(self.norm(hidden_states))


class PlainMixtralModel(nn.Module):
    def __init__(self, config: PlainMixtralConfig):
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(PlainLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(input_ids)
        for layer in self.layers:
            hidden = layer(hidden)
        return self.norm(hidden)


class PlainMixtralForCausalLM(nn.Module):
    """Embedding, residual MoE layers (at ``model.layers.<i>.mlp``, where Transformers' Mixtral has
    them), a final norm and an LM head; ``forward(input_ids, labels)`` returns ``.logits`` and
    ``.loss`` (next-token cross-entropy), like a Transformers causal LM."""

    def __init__(self, config: PlainMixtralConfig):
        super().__init__()
        self.config = config
        self.model = PlainMixtralModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, output_router_logits: bool = False):
        """(The model has no aux loss: ``output_router_logits`` changes nothing.)"""
        logits = self.lm_head(self.model(input_ids))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return SimpleNamespace(logits=logits, loss=loss, aux_loss=None)
