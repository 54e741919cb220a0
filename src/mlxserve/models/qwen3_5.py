"""Qwen3.5: Gated-DeltaNet linear attention interleaved with gated full attention.

`layer_types` (or, when absent, every `full_attention_interval`-th layer) says which layers
are full attention; the others are linear attention, whose per-row state (a short
convolution window and a [value heads, value dim, key dim] matrix, both float32) lives in
the row's RowCache (`recurrent`, keyed by linear-layer index) instead of the KV store.
Full-attention layers use the KV store exactly as the dense family does (their output is
gated by sigmoid(gate), the gate coming out of q_proj interleaved per head, and RoPE turns
only the first `partial_rotary_factor` of each head).

Norm convention: Hugging Face stores the zero-centred RMSNorm weights w of the residual-
stream and q/k norms and computes x * (1 + w); mlx-lm-converted checkpoints store 1 + w.
`sanitize` adds the 1 once, only to checkpoints in Hugging Face layout (recognised, as
mlx-lm does, by their conv1d weight shape [C, 1, K]). The gated norm inside linear attention
uses w as is in both layouts.

Dense (`qwen3_5`) and mixture-of-experts (`qwen3_5_moe`) variants share this file; vision
tower and multi-token-prediction weights are dropped by `sanitize`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.rope_utils import initialize_rope

from ..batch import StepBatch
from ..cache import KVStore, StateGather, padding_rows
from ..checks import is_whole
from . import qwen3_moe
from .compiled import compiled
from .gated_delta import gated_delta, gated_delta_step, native_fast_op
from .llama import MLP, RotaryNorm, add_linear, add_mlp, causal_lm_forward, fuse_linears, linear_like

ARCHITECTURES = ("qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text")

log = logging.getLogger("mlxserve.models")


@dataclass
class ModelArgs:
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    intermediate_size: int = 0
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    linear_num_value_heads: int = 16
    linear_num_key_heads: int = 16
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    full_attention_interval: int = 4
    layer_types: list | None = None
    rope_theta: float = 10000000.0
    partial_rotary_factor: float = 0.25
    rope_parameters: dict | None = None
    # mixture of experts (qwen3_5_moe)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        text = dict(config.get("text_config") or config)
        if "tie_word_embeddings" not in text and "tie_word_embeddings" in config:
            text["tie_word_embeddings"] = config["tie_word_embeddings"]
        text["model_type"] = config.get("model_type", text.get("model_type", "qwen3_5"))
        known = set(cls.__dataclass_fields__) - {"extra"}
        args = cls(**{k: v for k, v in text.items() if k in known and v is not None})
        rope = args.rope_parameters or {}
        args.rope_theta = rope.get("rope_theta", text.get("rope_theta", args.rope_theta))
        args.partial_rotary_factor = rope.get("partial_rotary_factor", args.partial_rotary_factor)
        _require_positive(args, "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                          "linear_num_value_heads", "linear_num_key_heads", "linear_key_head_dim",
                          "linear_value_head_dim", "linear_conv_kernel_dim", "full_attention_interval")
        if args.num_key_value_heads is None:
            args.num_key_value_heads = args.num_attention_heads
        if args.head_dim is None:
            args.head_dim = args.hidden_size // args.num_attention_heads
        _require_positive(args, "num_key_value_heads", "head_dim")
        if args.num_attention_heads % args.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({args.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({args.num_key_value_heads})")
        rotated = int(args.head_dim * args.partial_rotary_factor)
        if not 0 < rotated <= args.head_dim or rotated % 2:
            raise ValueError(f"partial_rotary_factor {args.partial_rotary_factor} of head_dim {args.head_dim} "
                             f"rotates {rotated} dims per head: RoPE needs an even number from 2 to head_dim")
        if args.num_experts and not 0 < args.num_experts_per_tok <= args.num_experts:
            raise ValueError(f"num_experts_per_tok {args.num_experts_per_tok} must be in "
                             f"1..num_experts ({args.num_experts})")
        if args.layer_types is None:
            n = args.full_attention_interval
            args.layer_types = ["full_attention" if (i + 1) % n == 0 else "linear_attention"
                                for i in range(args.num_hidden_layers)]
        if len(args.layer_types) != args.num_hidden_layers:
            raise ValueError(f"layer_types lists {len(args.layer_types)} layers, the model has "
                             f"{args.num_hidden_layers}")
        if args.linear_num_value_heads % args.linear_num_key_heads:
            raise ValueError("linear_num_value_heads must be a multiple of linear_num_key_heads")
        return args

    @property
    def rope_scaling(self) -> dict | None:
        rope = dict(self.rope_parameters or {})
        if "type" not in rope and "rope_type" in rope:
            rope["type"] = rope.pop("rope_type")
        return rope or None


def _require_positive(args: ModelArgs, *names: str) -> None:
    """A config field that sizes the model (heads, dims, layers, the attention interval) must
    be a whole number >= 1: 0 divided by later, or built a model without layers."""
    for name in names:
        value = getattr(args, name)
        if not is_whole(value, 1):
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")


class GatedRMSNorm(nn.Module):
    """RMSNorm of the output, times silu(gate), computed in float32."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones(dims)

    def __call__(self, x: mx.array, gate: mx.array, x_scale_squared: float = 1.0) -> mx.array:
        """x: the recurrence's output (float32), or c times it with c^2 = `x_scale_squared`;
        gate: in the model's dtype, which is returned. The weight multiplies in the gate's
        fused kernel, not in rms_norm's: there a weight in another dtype than x is converted
        first, a kernel of its own at every call. rms_norm(c x) with eps c^2 is exactly
        rms_norm(x) with eps: c x / sqrt(c^2 mean(x^2) + c^2 eps)."""
        normed = mx.fast.rms_norm(x, None, self.eps * x_scale_squared).astype(mx.float32)
        return (nn.silu(gate.astype(mx.float32)) * (normed * self.weight)).astype(gate.dtype)


def _depthwise_conv(window: mx.array, weight: mx.array, t: int) -> mx.array:
    """What `conv1d` (one filter per channel, no padding) computes, as K shifted multiply-adds:
    out[:, i, c] = sum_j window[:, i + j, c] * weight[c, j, 0]. Inside a compiled function
    this is one fused elementwise kernel; MLX's CUDA back-end runs a grouped convolution
    through cuDNN instead, with a graph built for every new input shape."""
    kernel = weight.shape[1]
    out = window[:, :t] * weight[:, 0, 0]
    for j in range(1, kernel):
        out = out + window[:, j : j + t] * weight[:, j, 0]
    return out


def _conv_step(window: mx.array, x: mx.array, taps: tuple) -> tuple[mx.array, mx.array]:
    """silu of `_depthwise_conv` of one new input x [n, 1, C] after the last K-1 inputs
    `window` [n, K-1, C] (float32), with the filter as its K taps [C] (`_conv_taps`): (silu of
    the convolution [n, 1, C], the next window [n, K-1, C]), the sum in the same order.

    Both are views of one [n, K, C] array, rows 0 to K-2 the next window (the old rows 1 to
    K-2, then x as float32), row K-1 the convolution's silu: one fused elementwise kernel
    computes it all, where the window and the convolution took a kernel each (their shapes
    differ). Each row is a selection among broadcast values, so no gather or copy runs; the
    convolution is computed for every row and kept in the last."""
    kernel = len(taps)
    row = mx.array([[[r] for r in range(kernel)]])  # [1, K, 1]; a constant when traced
    x = x.astype(mx.float32)
    conv = window[:, :1] * taps[0]
    for j in range(1, kernel - 1):
        conv = conv + window[:, j : j + 1] * taps[j]
    conv = conv + x * taps[kernel - 1]
    rows = mx.where(row == kernel - 1, nn.silu(conv), x)  # rows K-2 and K-1; [n, K, C]
    for r in range(kernel - 3, -1, -1):
        rows = mx.where(row == r, window[:, r + 1 : r + 2], rows)
    return rows[:, kernel - 1 :], rows[:, : kernel - 1]


def _conv_taps(weight: mx.array) -> tuple:
    """A depthwise filter [C, K, 1] as its K taps [C], float32 (exactly the weight's values,
    as the products with the float32 window promote them anyway), evaluated: taken once, not
    sliced and converted inside every step (each a node the host replays per call, and
    conversions deepen the fused kernel past what MLX fuses into one)."""
    taps = tuple(weight[:, j, 0].astype(mx.float32) for j in range(weight.shape[1]))
    mx.eval(taps)
    return taps


def _decay(rate: mx.array, a: mx.array, dt_bias: mx.array) -> mx.array:
    """Per-token decay exp(rate * softplus(a + dt_bias)), float32; rate is -exp(A_log)
    (GatedDeltaNet._decay_parameters)."""
    return mx.exp(rate * nn.softplus(a + dt_bias))


class GatedDeltaNet(nn.Module):
    """Linear attention. Rows of a batch group run together; each row's conv window and
    delta-rule state come from, and go back to, its RowCache. DecoderLayer runs it in three
    pieces: `project`, `mix` (the per-row recurrence) and `output`."""

    def __init__(self, args: ModelArgs, index: int):
        super().__init__()
        self.index = index  # among the linear layers
        self.n_v = args.linear_num_value_heads
        self.n_k = args.linear_num_key_heads
        self.d_k = args.linear_key_head_dim
        self.d_v = args.linear_value_head_dim
        self.key_dim = self.n_k * self.d_k
        self.value_dim = self.n_v * self.d_v
        self.kernel = args.linear_conv_kernel_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        dim = args.hidden_size
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim, bias=False)
        self.in_proj_qkv = nn.Linear(dim, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(dim, self.value_dim, bias=False)
        self.in_proj_b = nn.Linear(dim, self.n_v, bias=False)
        self.in_proj_a = nn.Linear(dim, self.n_v, bias=False)
        self.dt_bias = mx.ones(self.n_v)
        self.A_log = mx.zeros(self.n_v)
        self.norm = GatedRMSNorm(self.d_v, args.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, dim, bias=False)

    def state_bytes(self) -> int:
        """Bytes of one row's state in this layer, float32: its conv window and delta-rule
        state. A decoding row's window is K-1 rows of a K-row array (see _conv_step), which
        it keeps alive, so K rows are counted."""
        return 4 * (self.kernel * self.conv_dim + self.n_v * self.d_v * self.d_k)

    def fuse(self) -> None:
        """One matmul for all four input projections (fewer kernel launches per decode step),
        or two (qkv+z, b+a) when their types or quantization differ."""
        fused = fuse_linears([self.in_proj_qkv, self.in_proj_z, self.in_proj_b, self.in_proj_a])
        if fused is not None:
            self.in_proj_qkvzba = fused
            del self.in_proj_qkv, self.in_proj_z, self.in_proj_b, self.in_proj_a
            return
        fused = fuse_linears([self.in_proj_qkv, self.in_proj_z])
        if fused is not None:
            self.in_proj_qkvz = fused
            del self.in_proj_qkv, self.in_proj_z
        fused = fuse_linears([self.in_proj_b, self.in_proj_a])
        if fused is not None:
            self.in_proj_ba = fused
            del self.in_proj_b, self.in_proj_a

    def project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array, mx.array]:
        conv, value, heads = self.conv_dim, self.value_dim, self.n_v
        if "in_proj_qkvzba" in self:
            return tuple(mx.split(self.in_proj_qkvzba(x), [conv, conv + value, conv + value + heads], axis=-1))
        if "in_proj_qkvz" in self:
            qkv, z = mx.split(self.in_proj_qkvz(x), [conv], axis=-1)
        else:
            qkv, z = self.in_proj_qkv(x), self.in_proj_z(x)
        if "in_proj_ba" in self:
            b, a = mx.split(self.in_proj_ba(x), [heads], axis=-1)
        else:
            b, a = self.in_proj_b(x), self.in_proj_a(x)
        return qkv, z, b, a

    def mix(self, batch: StepBatch, qkv: mx.array, a: mx.array, b: mx.array) -> mx.array:
        """The recurrence, group by group, each row from its own state: [T, Hv, Dv]."""
        outputs = [self._group(g, qkv, a, b) for g in batch.groups]
        if batch.padding:
            outputs.append(padding_rows(outputs[-1], batch.padding))
        return outputs[0] if len(outputs) == 1 else mx.concatenate(outputs)

    def added_to(self, residual: mx.array, y: mx.array, z: mx.array) -> mx.array:
        """residual + the output projection of the gated-normed recurrence output."""
        # The recurrence's outputs come sqrt(d_k) times too large (see _recur).
        y = self.norm(y, z.reshape(-1, self.n_v, self.d_v), x_scale_squared=self.d_k)
        return add_linear(residual, y.reshape(y.shape[0], -1), self.out_proj)

    def _group(self, g, qkv: mx.array, a: mx.array, b: mx.array) -> mx.array:
        n, t = g.n_rows, g.tokens_per_row
        span = slice(g.offset, g.offset + n * t)
        self._made_constants()
        conv_state, state = self._gathered(g)
        if t == 1:
            step = compiled(self, "one_token", self._one_token, True)
            out, window, state = step(qkv[span], a[span], b[span], conv_state, state)
        else:
            recur = compiled(self, "recur", self._recur, True)  # at every length: see compiled.py
            out, window, state = recur(qkv[span].reshape(n, t, -1), a[span].reshape(n, t, self.n_v),
                                       b[span].reshape(n, t, self.n_v), conv_state, state)
        g.state_gather.target.layers[self.index] = (window, state)
        return out

    def traced_states(self, batch: StepBatch) -> tuple | None:
        """Each group's gathered (conv windows, states) when this step's recurrence may run
        inside a compiled piece (llama.run_layers): a decoding step (one token per row, no
        padding) that runs compiled, whose shapes hold from step to step. None otherwise:
        `mix` runs it, eagerly around its own compiled recurrence."""
        if not batch.compile or batch.max_tokens_per_row != 1 or batch.padding:
            return None
        self._made_constants()
        return tuple(self._gathered(g) for g in batch.groups)

    def _gathered(self, g) -> tuple[mx.array, mx.array]:
        """A group's rows' (conv windows, states) as the step starts (see StateGather, made
        by the step's first linear layer)."""
        if g.state_gather is None:
            g.state_gather = StateGather(g.caches)
        return g.state_gather.gather(self.index, self._zero_state)

    def traced_mix(self, qkv: mx.array, a: mx.array, b: mx.array, states: tuple) -> tuple[mx.array, tuple]:
        """`mix` of a decoding step, pure, from the groups' states (traced_states): (the
        output [T, Hv, Dv], each group's new (window, state)). The groups' rows follow each
        other in the flat order, as many as their states have."""
        outputs, new, offset = [], [], 0
        for conv_state, state in states:
            n = conv_state.shape[0]
            rows = slice(offset, offset + n)
            offset += n
            out, window, state = self._one_token(qkv[rows], a[rows], b[rows], conv_state, state)
            outputs.append(out)
            new.append((window, state))
        return (outputs[0] if len(outputs) == 1 else mx.concatenate(outputs)), tuple(new)

    def store_states(self, batch: StepBatch, new: tuple) -> None:
        """Hand traced_mix's new states to the rows (their groups' target batches)."""
        for g, state in zip(batch.groups, new):
            g.state_gather.target.layers[self.index] = state

    def _one_token(self, qkv: mx.array, a: mx.array, b: mx.array, conv_state: mx.array,
                   state: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """`_recur` of one token per row, qkv [n, C], a and b [n, Hv]: decoding. Off Metal
        (see gated_delta.py) its own form, with every array reshaped once from its input
        (each reshape or slice is a node the host replays at every call); decay and beta in
        the step's broadcast shape, so that they are computed inside its fused kernel."""
        n = qkv.shape[0]
        if native_fast_op():
            return self._recur(qkv[:, None], a[:, None], b[:, None], conv_state, state)
        conv_out, window = _conv_step(conv_state, qkv[:, None], self._taps())
        # float32 from here, as in _recur
        qk, v = mx.split(conv_out, [2 * self.key_dim], axis=-1)
        # The L2 norms of q and k as in _recur (q's read-out scale left to the output's norm).
        qk = mx.fast.rms_norm(qk.reshape(n, 2 * self.n_k, self.d_k), self._l2_norm_weight(), 1e-6 / self.d_k)
        rate, dt_bias = self._decay_parameters()
        heads = (n, *rate.shape)
        decay = _decay(rate, a.reshape(heads), dt_bias)
        out, state = gated_delta_step(qk, v, decay, mx.sigmoid(b.reshape(heads)), state)
        return out, window, state

    def _recur(self, qkv: mx.array, a: mx.array, b: mx.array, conv_state: mx.array,
               state: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """One group's rows [n, t, ...] from their conv windows and states: (outputs
        [n * t, Hv, Dv], sqrt(d_k) times the reference's; the new conv windows, the new
        states)."""
        n, t = qkv.shape[0], qkv.shape[1]
        # Kept in float32 from here: the recurrence computes in float32 anyway, and its output
        # goes through GatedRMSNorm, which returns the model's dtype.
        if t == 1:
            conv_out, window = _conv_step(conv_state, qkv, self._taps())
        else:
            window = mx.concatenate([conv_state, qkv.astype(mx.float32)], axis=1)
            conv_out = nn.silu(_depthwise_conv(window, self.conv1d.weight, t))
            window = window[:, -(self.kernel - 1):]
        qk, v = mx.split(conv_out, [2 * self.key_dim], axis=-1)
        v = v.reshape(n, t, self.n_v, self.d_v)
        # L2-normalise q and k, eps added to the sum of squares: rms_norm with the weight
        # 1/sqrt(d_k) and eps / d_k (it adds eps to the mean). One norm for both: q's
        # read-out scale 1/sqrt(d_k) is left out, so the outputs (linear in q) come out
        # sqrt(d_k) times too large, which the output's norm undoes exactly (added_to).
        qk = mx.fast.rms_norm(qk.reshape(n, t, 2 * self.n_k, self.d_k), self._l2_norm_weight(), 1e-6 / self.d_k)
        q, k = qk[:, :, : self.n_k], qk[:, :, self.n_k :]
        rate, dt_bias = self._decay_parameters()
        decay = _decay(rate.reshape(-1), a, dt_bias.reshape(-1))
        out, state = gated_delta(q, k, v, decay, mx.sigmoid(b), state)
        return out.reshape(n * t, self.n_v, self.d_v), window, state

    def _made_constants(self) -> None:
        """Make the arrays the recurrence reads besides its inputs before it is traced (a
        trace only reads them)."""
        self._l2_norm_weight()
        self._decay_parameters()
        self._taps()

    def _taps(self) -> tuple:
        """The convolution's taps (`_conv_taps`), remade when the weight is replaced."""
        found = self.__dict__.get("_conv_taps")
        if found is None or found[0] is not self.conv1d.weight:
            found = (self.conv1d.weight, _conv_taps(self.conv1d.weight))
            object.__setattr__(self, "_conv_taps", found)
        return found[1]

    def _l2_norm_weight(self) -> mx.array:
        """The rms_norm weight (float32, as q and k are) that makes it an L2 norm: 1/sqrt(d_k),
        scaling inside the norm's kernel instead of in a kernel of its own. Not a parameter:
        kept out of the Module tree."""
        found = self.__dict__.get("_l2_weight")
        if found is None:
            found = mx.full((self.d_k,), self.d_k**-0.5, mx.float32)
            mx.eval(found)
            object.__setattr__(self, "_l2_weight", found)
        return found

    def _decay_parameters(self) -> tuple[mx.array, mx.array]:
        """-exp(A_log) (float32) and dt_bias, shaped [key heads, value heads per key head, 1,
        1] for gated_delta_step (flattened again for the other forms): computed and reshaped
        outside the compiled recurrence, as
        each operation on them there deepened the step's fused kernel past what MLX fuses
        into one (the decay then took kernels of its own). Remade when the parameters are
        replaced (loading weights)."""
        found = self.__dict__.get("_decay_shaped")
        if found is None or found[0] is not self.A_log or found[1] is not self.dt_bias:
            heads = (self.n_k, self.n_v // self.n_k, 1, 1)
            shaped = (-mx.exp(self.A_log.astype(mx.float32)).reshape(heads), self.dt_bias.reshape(heads))
            mx.eval(shaped)
            found = (self.A_log, self.dt_bias, *shaped)
            object.__setattr__(self, "_decay_shaped", found)
        return found[2], found[3]

    def _zero_state(self) -> tuple[mx.array, mx.array]:
        return (mx.zeros((self.kernel - 1, self.conv_dim), mx.float32),
                mx.zeros((self.n_v, self.d_v, self.d_k), mx.float32))


def _take_rows(layer: nn.Module, rows: mx.array) -> nn.Module | None:
    """A linear layer (plain or quantized) with only these output rows, or None for another
    kind of layer."""
    if type(layer) not in (nn.Linear, nn.QuantizedLinear):
        return None
    return linear_like(layer, {key: mx.take(layer[key], rows, axis=0) for key in layer})


class GatedAttention(nn.Module):
    """Full attention whose output is scaled by sigmoid(gate) per channel."""

    def __init__(self, args: ModelArgs, index: int):
        super().__init__()
        self.index = index  # among the full-attention layers: its KV store layer
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = d = args.head_dim
        self.scale = d**-0.5
        dim = args.hidden_size
        self.q_proj = nn.Linear(dim, 2 * self.n_heads * d, bias=args.attention_bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * d, bias=args.attention_bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * d, bias=args.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * d, dim, bias=args.attention_bias)
        self.q_norm = nn.RMSNorm(d, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(d, eps=args.rms_norm_eps)
        self.rope = initialize_rope(int(d * args.partial_rotary_factor), args.rope_theta, False,
                                    args.rope_scaling, args.max_position_embeddings)
        self._rotary = None  # set by fuse(); underscored: not a parameter

    def fuse(self) -> None:
        """One matmul for Q (with its gate), K and V, when they share type and quantization.
        With plain RoPE over a whole number of groups of each head, its rows are ordered Q,
        K, V, gate (q_proj holds each head's Q and gate side by side), so that the Q and K
        heads are adjacent: their norms and RoPE are then one norm and one elementwise pass
        (llama.RotaryNorm over the first channels of each head), two kernels where two norms
        and two RoPE calls took four."""
        rope, d = self.rope, self.head_dim
        if type(rope) is nn.RoPE and not rope.traditional and d % rope.dims == 0:
            q_and_gate = mx.arange(2 * self.n_heads * d).reshape(self.n_heads, 2, d)
            q_part = _take_rows(self.q_proj, q_and_gate[:, 0].reshape(-1))
            gate_part = _take_rows(self.q_proj, q_and_gate[:, 1].reshape(-1))
            fused = None
            if q_part is not None and gate_part is not None:
                fused = fuse_linears([q_part, self.k_proj, self.v_proj, gate_part])
            if fused is not None:
                self.qkvg_proj = fused
                del self.q_proj, self.k_proj, self.v_proj
                weights = (self.q_norm.weight, self.n_heads, self.k_norm.weight, self.n_kv_heads)
                self._rotary = RotaryNorm(d, rope.base, rope.scale, weights, rotary_dims=rope.dims,
                                          heads=(self.n_heads + self.n_kv_heads, self.n_kv_heads))
                return
        fused = fuse_linears([self.q_proj, self.k_proj, self.v_proj])
        if fused is not None:
            self.qkv_proj = fused
            del self.q_proj, self.k_proj, self.v_proj

    def project(self, x: mx.array, positions: mx.array) -> tuple[mx.array, ...]:
        """Queries [T, heads, head_dim], keys and values side by side [T, 2 * kv_heads,
        head_dim] (RoPE applied; the KV write's form, see llama.Attention.project) and the
        output gate."""
        T = x.shape[0]
        if self._rotary is not None:
            heads, kv_heads = self.n_heads, self.n_kv_heads
            out = self.qkvg_proj(x).reshape(T, 2 * (heads + kv_heads), self.head_dim)
            # One RMSNorm over every head, V's and the gate's included (RotaryNorm keeps V's
            # raw values; the gate's are not used): the Q/K part alone is not contiguous when
            # T > 1 and would be copied first.
            normed = mx.fast.rms_norm(out, None, self.q_norm.eps)
            view = (T, 2 * (heads + kv_heads), *self._rotary.view)
            qkv_heads = heads + 2 * kv_heads  # the gate's heads follow
            qkv = self._rotary(normed.reshape(view)[:, :qkv_heads], positions, out.reshape(view)[:, :qkv_heads])
            return qkv[:, :heads], qkv[:, heads:], out[:, qkv_heads:].reshape(T, -1)
        if "qkv_proj" in self:
            q_width, kv_width = 2 * self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
            q, k, v = mx.split(self.qkv_proj(x), [q_width, q_width + kv_width], axis=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, gate = mx.split(q.reshape(T, self.n_heads, 2 * self.head_dim), 2, axis=-1)
        q = self.q_norm(q)
        k = self.k_norm(k.reshape(T, self.n_kv_heads, self.head_dim))
        v = v.reshape(T, self.n_kv_heads, self.head_dim)
        # one length-1 sequence per token, so each token gets its own position (see llama.py)
        q = self.rope(q[:, :, None, :], offset=positions)[:, :, 0, :]
        k = self.rope(k[:, :, None, :], offset=positions)[:, :, 0, :]
        return q, mx.concatenate([k, v], axis=1), gate.reshape(T, -1)

    def added_to(self, residual: mx.array, attention: mx.array, gate: mx.array) -> mx.array:
        """residual + the output projection of the gated attention output."""
        return add_linear(residual, attention * mx.sigmoid(gate), self.o_proj)


class SparseMoE(qwen3_moe.SparseMoE):
    """Qwen3-MoE's top-k routed experts plus one always-on shared expert scaled by a sigmoid
    gate."""

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.shared_expert = MLP(_mlp_args(args.hidden_size, args.shared_expert_intermediate_size))
        self.shared_expert_gate = nn.Linear(args.hidden_size, 1, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return super().__call__(x) + mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)

    def fuse(self) -> None:
        self.shared_expert.fuse()


def _mlp_args(hidden: int, intermediate: int):
    return SimpleNamespace(hidden_size=hidden, intermediate_size=intermediate, mlp_bias=False)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, kind: str, index: int):
        super().__init__()
        self.is_linear = kind == "linear_attention"
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(args, index)
        else:
            self.self_attn = GatedAttention(args, index)
        if args.num_experts:
            self.mlp = SparseMoE(args)
        else:
            self.mlp = MLP(_mlp_args(args.hidden_size, args.intermediate_size))
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    # The layer protocol of llama.run_layers: before (pure), mix (the recurrence or the
    # attention, which read and write per-row state: eager, or traced in decoding steps for
    # the recurrence), after (pure).
    @property
    def kv_layer(self) -> int | None:
        return None if self.is_linear else self.self_attn.index

    def before_inputs(self, batch: StepBatch) -> tuple:
        return () if self.is_linear else (batch.positions,)

    def before(self, x: mx.array, *positions: mx.array) -> tuple[mx.array, ...]:
        normed = self.input_layernorm(x)
        if self.is_linear:
            return self.linear_attn.project(normed)
        return self.self_attn.project(normed, *positions)

    def traced_mix_inputs(self, batch: StepBatch) -> tuple | None:
        """A linear layer's recurrence runs traced in decoding steps (see run_layers)."""
        return self.linear_attn.traced_states(batch) if self.is_linear else None

    def traced_mix(self, projected: tuple, states: tuple) -> tuple[tuple, tuple]:
        """`mix`, traced: (the after-piece's inputs besides x, the new states)."""
        qkv, z, b, a = projected
        out, new = self.linear_attn.traced_mix(qkv, a, b, states)
        return (out, z), new

    def traced_mix_done(self, batch: StepBatch, new: tuple) -> None:
        self.linear_attn.store_states(batch, new)

    def mix(self, projected: tuple, batch: StepBatch, cache: KVStore, written: bool) -> tuple:
        """The after-piece's inputs besides x: linear attention's recurrence output and its
        z, or full attention's output and its gate."""
        if self.is_linear:
            qkv, z, b, a = projected
            return self.linear_attn.mix(batch, qkv, a, b), z
        return cache.attend(self.self_attn.index, projected, batch, self.self_attn.scale, written)

    def after(self, x: mx.array, mixed: mx.array, extra: mx.array) -> mx.array:
        h = (self.linear_attn if self.is_linear else self.self_attn).added_to(x, mixed, extra)
        return add_mlp(h, self.mlp, self.post_attention_layernorm(h))


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        counters = {"linear_attention": 0, "full_attention": 0}
        self.layers = []
        for kind in args.layer_types:
            if kind not in counters:
                raise ValueError(f"unknown layer type '{kind}'")
            self.layers.append(DecoderLayer(args, kind, counters[kind]))
            counters[kind] += 1
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


class Model(nn.Module):
    """Causal LM over a StepBatch, like llama.Model, for the hybrid architecture."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Backbone(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    @property
    def layers(self):
        return self.model.layers

    def fuse(self) -> None:
        for layer in self.model.layers:
            layer.mlp.fuse()
            (layer.linear_attn if layer.is_linear else layer.self_attn).fuse()

    def kv_shape(self) -> tuple[int, int, int]:
        full = sum(1 for layer in self.model.layers if not layer.is_linear)
        return full, self.args.num_key_value_heads, self.args.head_dim

    def state_bytes_per_row(self) -> int:
        """Bytes of one row's recurrent state (all linear layers)."""
        return sum(layer.linear_attn.state_bytes() for layer in self.model.layers if layer.is_linear)

    def __call__(self, batch: StepBatch, cache: KVStore) -> mx.array | None:
        return causal_lm_forward(self, batch, cache)

    def sanitize(self, weights: dict) -> dict:
        """Map Hugging Face (`model.language_model.*`) and mlx-lm (`language_model.model.*`)
        names to ours, drop vision and MTP weights, and convert Hugging Face layouts."""
        out, dropped = {}, set()
        for key, value in weights.items():
            name = key
            for old, new in (("model.language_model.", "model."), ("language_model.model.", "model."),
                             ("language_model.lm_head.", "lm_head.")):
                if name.startswith(old):
                    name = new + name[len(old):]
                    break
            if name.startswith(("model.visual", "visual", "vision_tower", "model.vision")) or "mtp." in name:
                dropped.add(name.split(".")[0] if not name.startswith("model.") else name.split(".")[1])
                continue
            out[name] = value
        if dropped:
            log.info("ignoring weights not used for text generation: %s", ", ".join(sorted(dropped)))
        hf_layout = any(k.endswith("conv1d.weight") and v.shape[-1] != 1 for k, v in out.items())
        zero_centred = (".input_layernorm.weight", ".post_attention_layernorm.weight",
                        "model.norm.weight", ".q_norm.weight", ".k_norm.weight")
        for layer in range(self.args.num_hidden_layers):
            prefix = f"model.layers.{layer}.mlp"
            if f"{prefix}.experts.gate_up_proj" in out:  # experts stacked, gate and up in one
                gate_up = out.pop(f"{prefix}.experts.gate_up_proj")
                mid = gate_up.shape[-2] // 2
                out[f"{prefix}.switch_mlp.gate_proj.weight"] = gate_up[..., :mid, :]
                out[f"{prefix}.switch_mlp.up_proj.weight"] = gate_up[..., mid:, :]
                out[f"{prefix}.switch_mlp.down_proj.weight"] = out.pop(f"{prefix}.experts.down_proj")
        for key, value in list(out.items()):
            if key.endswith("conv1d.weight") and value.shape[-1] != 1:
                out[key] = value.moveaxis(2, 1)  # [C, 1, K] -> MLX's [C, K, 1]
            elif hf_layout and key.endswith(zero_centred) and value.ndim == 1:
                out[key] = value + 1.0
        if self.args.tie_word_embeddings:
            for suffix in ("weight", "scales", "biases"):
                out.pop(f"lm_head.{suffix}", None)
        return out
