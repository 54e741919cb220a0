"""A float64 numpy forward pass of a qwen2 GGUF file: the reference real GGUF files are held to.

Independent of mlxserve's loader and model: weights come straight from
``gguf.quants.dequantize`` on the file's block bytes, the config from the metadata keys, and the
architecture is written out here (Qwen2: RMSNorm, grouped-query attention with q/k/v biases,
RoPE rotating halves ("neox"), SwiGLU MLP, untied or tied output). Weights are dequantized once
and kept as float32 (which holds gguf's values exactly); every product runs in float64.
"""

from __future__ import annotations

import gguf
import numpy as np

from mlxserve.quant.gguf_metadata import open_gguf

_VOCAB_CHUNK = 8192  # output rows multiplied at a time (bounds the float64 temporaries)


def _dequantize(tensor) -> np.ndarray:
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)


class Qwen2Reference:
    def __init__(self, path):
        reader = open_gguf(path)
        meta = reader.metadata
        assert meta["general.architecture"] == "qwen2"
        self.tensors = {t.name: t for t in reader.tensors}
        self.heads = meta["qwen2.attention.head_count"]
        self.kv_heads = meta["qwen2.attention.head_count_kv"]
        self.head_dim = meta["qwen2.embedding_length"] // self.heads
        self.eps = meta["qwen2.attention.layer_norm_rms_epsilon"]
        half = np.arange(0, self.head_dim, 2) / self.head_dim
        self.inv_freq = meta["qwen2.rope.freq_base"] ** -half  # float64
        names = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm",
                 "ffn_gate", "ffn_up", "ffn_down")
        self.layers = []
        for i in range(meta["qwen2.block_count"]):
            layer = {n: _dequantize(self.tensors[f"blk.{i}.{n}.weight"]) for n in names}
            for n in ("attn_q", "attn_k", "attn_v"):
                layer[f"{n}.bias"] = _dequantize(self.tensors[f"blk.{i}.{n}.bias"])
            self.layers.append(layer)
        self.norm = _dequantize(self.tensors["output_norm.weight"])
        output = self.tensors.get("output.weight", self.tensors["token_embd.weight"])
        self.output = _dequantize(output)

    def embed(self, tokens) -> np.ndarray:
        table = self.tensors["token_embd.weight"]
        rows = table.data[np.asarray(tokens)]  # only the rows these tokens need
        return gguf.quants.dequantize(rows, table.tensor_type).astype(np.float64)

    def new_cache(self) -> list[dict]:
        """Per layer: keys and values seen so far (after RoPE), [positions, kv heads, dim]."""
        shape = (0, self.kv_heads, self.head_dim)
        return [{"k": np.zeros(shape), "v": np.zeros(shape)} for _ in self.layers]

    def forward(self, tokens, cache: list[dict] | None = None) -> np.ndarray:
        """float64 logits [len(tokens), vocab] of tokens that follow what ``cache`` has seen."""
        cache = cache if cache is not None else self.new_cache()
        start = cache[0]["k"].shape[0]
        positions = np.arange(start, start + len(tokens))
        h = self.embed(tokens)
        for layer, kv in zip(self.layers, cache):
            h = h + self._attention(layer, kv, self._rms_norm(h, layer["attn_norm"]), positions)
            x = self._rms_norm(h, layer["ffn_norm"])
            gate, up = x @ layer["ffn_gate"].T.astype(np.float64), x @ layer["ffn_up"].T
            h = h + (gate / (1 + np.exp(-gate)) * up) @ layer["ffn_down"].T
        h = self._rms_norm(h, self.norm)
        return np.concatenate([h @ self.output[i:i + _VOCAB_CHUNK].T.astype(np.float64)
                               for i in range(0, self.output.shape[0], _VOCAB_CHUNK)], axis=1)

    def _rms_norm(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * weight

    def _rope(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Rotate pairs (i, i + dim/2) by position * inv_freq[i]: [tokens, heads, dim]."""
        angle = positions[:, None, None] * self.inv_freq
        cos, sin = np.cos(angle), np.sin(angle)
        first, second = np.split(x, 2, axis=-1)
        return np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)

    def _attention(self, layer: dict, kv: dict, x: np.ndarray, positions) -> np.ndarray:
        t, d = x.shape[0], self.head_dim
        q = (x @ layer["attn_q"].T + layer["attn_q.bias"]).reshape(t, self.heads, d)
        k = (x @ layer["attn_k"].T + layer["attn_k.bias"]).reshape(t, self.kv_heads, d)
        v = (x @ layer["attn_v"].T + layer["attn_v.bias"]).reshape(t, self.kv_heads, d)
        kv["k"] = np.concatenate([kv["k"], self._rope(k, positions)])
        kv["v"] = np.concatenate([kv["v"], v])
        q = self._rope(q, positions)
        group = self.heads // self.kv_heads  # query head h reads key/value head h // group
        keys = np.repeat(kv["k"], group, axis=1)  # [seen, heads, dim]
        values = np.repeat(kv["v"], group, axis=1)
        scores = np.einsum("thd,shd->hts", q, keys) / np.sqrt(d)
        seen = np.arange(keys.shape[0])
        scores = np.where(seen[None, None, :] <= positions[None, :, None], scores, -np.inf)
        weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
        weights /= weights.sum(axis=-1, keepdims=True)
        out = np.einsum("hts,shd->thd", weights, values).reshape(t, self.heads * d)
        return out @ layer["attn_output"].T
