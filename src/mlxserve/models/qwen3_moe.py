"""Qwen3-MoE: Qwen3's attention (per-head Q/K RMSNorm) with routed mixture-of-experts MLPs.

Routing as mlx-lm's qwen3_moe / Hugging Face's Qwen3MoeSparseMoeBlock: softmax over all
experts (in float32), the top `num_experts_per_tok`, their weights renormalised to sum to 1
when `norm_topk_prob`; no shared expert. Layer i is sparse unless it is listed in
`mlp_only_layers` or (i + 1) is not a multiple of `decoder_sparse_step`; dense layers use the
plain SwiGLU MLP of width `intermediate_size`.

Hugging Face checkpoints store each expert separately (`mlp.experts.{e}.gate_proj.weight`);
`sanitize` stacks them into SwitchGLU's [experts, out, in] layout (`mlp.switch_mlp.*`), which
is what mlx-lm-converted checkpoints and our GGUF loader already hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchGLU

from . import llama
from .llama import MLP

ARCHITECTURES = ("qwen3_moe",)


@dataclass
class ModelArgs(llama.ModelArgs):
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: list = field(default_factory=list)
    norm_topk_prob: bool = False

    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        config = dict(config)
        config.setdefault("tie_word_embeddings", False)  # Hugging Face's Qwen3MoeConfig default
        args = super().from_config(config)
        if args.num_experts and not 0 < args.num_experts_per_tok <= args.num_experts:
            raise ValueError(f"num_experts_per_tok {args.num_experts_per_tok} must be in "
                             f"1..num_experts ({args.num_experts})")
        return args

    @property
    def qk_norm(self) -> bool:
        return True

    def is_sparse(self, layer: int) -> bool:
        return (layer not in self.mlp_only_layers and self.num_experts > 0
                and (layer + 1) % self.decoder_sparse_step == 0)


class SparseMoE(nn.Module):
    """Top-k routed SwiGLU experts."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.norm_topk_prob = args.norm_topk_prob
        self.gate = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.switch_mlp = SwitchGLU(args.hidden_size, args.moe_intermediate_size, args.num_experts)

    def __call__(self, x: mx.array) -> mx.array:
        probs = mx.softmax(self.gate(x), axis=-1, precise=True)
        chosen = mx.argpartition(probs, kth=-self.top_k, axis=-1)[..., -self.top_k:]
        weights = mx.take_along_axis(probs, chosen, axis=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        y = self.switch_mlp(x, chosen)
        return (y * weights[..., None]).sum(axis=-2).astype(y.dtype)

    def fuse(self) -> None:
        pass  # the experts are gathered per token; nothing to merge


class TransformerBlock(llama.TransformerBlock):
    def __init__(self, args: ModelArgs, layer: int):
        nn.Module.__init__(self)
        self.self_attn = llama.Attention(args, layer)
        self.mlp = SparseMoE(args) if args.is_sparse(layer) else MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


class Model(llama.Model):
    """Causal LM over a StepBatch (see llama.Model)."""

    block = TransformerBlock

    def sanitize(self, weights: dict) -> dict:
        """Stack Hugging Face's per-expert weights into SwitchGLU's layout, then as llama."""
        weights = dict(weights)
        for layer in range(self.args.num_hidden_layers):
            prefix = f"model.layers.{layer}.mlp"
            if f"{prefix}.experts.0.gate_proj.weight" not in weights:
                continue
            for proj in ("gate_proj", "up_proj", "down_proj"):
                for leaf in ("weight", "scales", "biases"):
                    names = [f"{prefix}.experts.{e}.{proj}.{leaf}" for e in range(self.args.num_experts)]
                    if names[0] not in weights:
                        continue
                    missing = [n for n in names if n not in weights]
                    if missing:
                        raise ValueError(f"checkpoint lacks {missing[0]} (layer {layer} has "
                                         f"{self.args.num_experts} experts)")
                    weights[f"{prefix}.switch_mlp.{proj}.{leaf}"] = mx.stack([weights.pop(n) for n in names])
        return super().sanitize(weights)
