"""The dense decoder family: Llama, Mistral, Qwen2 and Qwen3.

They differ only in small switches: Q/K/V biases (Qwen2), per-head Q/K RMSNorm (Qwen3),
an explicit head_dim, tied embeddings and RoPE scaling. Parameter names follow Hugging Face
/ mlx-lm, so the same safetensors and our GGUF loader fill them.

The forward pass takes a `StepBatch`: every row's new tokens flattened into one sequence, so
each weight matrix is read once per step however many rows there are. Only attention looks
at rows, through the KV store (cache.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.rope_utils import initialize_rope

from ..batch import StepBatch
from ..cache import KVStore, scatter_kv
from .compiled import active, compiled

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class ModelArgs:
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int | None = None
    rope_theta: float = 10000.0
    rope_traditional: bool = False
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        known = set(cls.__dataclass_fields__) - {"extra"}
        args = cls(**{k: v for k, v in config.items() if k in known and v is not None})
        if "tie_word_embeddings" not in config:
            # Hugging Face's default differs per architecture: Llama ties unless told not to.
            args.tie_word_embeddings = args.model_type == "llama"
        if config.get("rope_parameters") and "rope_theta" not in config:
            # transformers >= 5 nests RoPE settings under rope_parameters.
            params = config["rope_parameters"]
            args.rope_theta = params.get("rope_theta", args.rope_theta)
            if params.get("rope_type", "default") != "default":
                args.rope_scaling = params
        if args.num_key_value_heads is None:
            args.num_key_value_heads = args.num_attention_heads
        if args.head_dim is None:
            args.head_dim = args.hidden_size // args.num_attention_heads
        return args

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias or self.model_type == "qwen2"

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "qwen3"


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = d = args.head_dim
        self.scale = d**-0.5
        dim = args.hidden_size
        self.q_proj = nn.Linear(dim, self.n_heads * d, bias=args.qkv_bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * d, bias=args.qkv_bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * d, bias=args.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * d, dim, bias=args.attention_bias)
        if args.qk_norm:
            self.q_norm = nn.RMSNorm(d, eps=args.rms_norm_eps)
            self.k_norm = nn.RMSNorm(d, eps=args.rms_norm_eps)
        self.rope = initialize_rope(
            d, args.rope_theta, args.rope_traditional, args.rope_scaling, args.max_position_embeddings
        )
        self._rotary = None  # set by fuse(); underscored: not a parameter

    def project(self, x: mx.array, positions: mx.array) -> tuple[mx.array, mx.array]:
        """Queries [T, heads, head_dim] and keys and values side by side [T, 2 * kv_heads,
        head_dim] (the form the KV write takes, cache.scatter_kv) of the flat tokens, RoPE
        applied."""
        T = x.shape[0]
        if self._rotary is not None:
            return self._project_fused(x, positions)
        if "qkv_proj" in self:
            q, k, v = mx.split(self.qkv_proj(x), self.qkv_splits, axis=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(T, self.n_heads, self.head_dim)
        k = k.reshape(T, self.n_kv_heads, self.head_dim)
        v = v.reshape(T, self.n_kv_heads, self.head_dim)
        if "q_norm" in self:
            q = self.q_norm(q)
            k = self.k_norm(k)
        # RoPE wants [batch, ..., seq, dim] with one offset per batch entry: treat every
        # token as its own length-1 sequence so each gets its own position.
        q = self.rope(q[:, :, None, :], offset=positions)[:, :, 0, :]
        k = self.rope(k[:, :, None, :], offset=positions)[:, :, 0, :]
        return q, mx.concatenate([k, v], axis=1)

    def _project_fused(self, x: mx.array, positions: mx.array) -> tuple[mx.array, mx.array]:
        """`project` from the fused Q/K/V matrix, with the Q/K norms and RoPE as one
        elementwise pass over every head (see RotaryNorm; V's pass through): two kernels
        where two norms and two RoPE calls took four, and K and V come out side by side for
        the KV write. Q and KV are views of that pass's output."""
        T, heads, kv_heads = x.shape[0], self.n_heads, self.n_kv_heads
        qkv = self.qkv_proj(x).reshape(T, heads + 2 * kv_heads, *self._rotary.view)
        normed = qkv
        if "q_norm" in self:
            # One RMSNorm over every head, V's included (RotaryNorm keeps V's raw values): the
            # Q/K part alone is not contiguous when T > 1 and would be copied first.
            normed = mx.fast.rms_norm(qkv.reshape(T, heads + 2 * kv_heads, -1), None, self.q_norm.eps)
            normed = normed.reshape(qkv.shape)
        out = self._rotary(normed, positions, qkv)
        return out[:, :heads], out[:, heads:]

    def fuse(self) -> None:
        """One matmul for Q, K and V (fewer kernel launches per step), when the three
        projections share their type and quantization; then, for plain RoPE over whole heads,
        the Q/K norms and RoPE as one elementwise pass."""
        fused = fuse_linears([self.q_proj, self.k_proj, self.v_proj])
        if fused is None:
            return
        self.qkv_splits = [self.n_heads * self.head_dim, (self.n_heads + self.n_kv_heads) * self.head_dim]
        self.qkv_proj = fused
        del self.q_proj, self.k_proj, self.v_proj
        rope = self.rope
        if type(rope) is nn.RoPE and rope.dims == self.head_dim and not rope.traditional:
            weights = None
            if "q_norm" in self:
                weights = (self.q_norm.weight, self.n_heads, self.k_norm.weight, self.n_kv_heads)
            self._rotary = RotaryNorm(self.head_dim, rope.base, rope.scale, weights,
                                      heads=(self.n_heads + self.n_kv_heads, self.n_kv_heads))


class RotaryNorm:
    """The Q/K norm weights and RoPE (non-traditional) of Q and K heads side by side, and
    the heads after them (V's) passed through from a second input: elementwise only, so
    that under mx.compile it is one fused kernel, whose output holds K and V adjacent, as
    the KV write takes them (cache.scatter_kv). `heads` = (turned, kept): how many heads
    are turned, how many after them kept (None: every head turns).

    RoPE turns each pair (x1, x2) = (x[i], x[i + r/2]) of a head's first r = `rotary_dims`
    channels (all of them by default; the rest pass through) by the angle position * scale *
    inv_freq[i]: (x1 cos - x2 sin, x2 cos + x1 sin). With the head seen as `view`, [d / r, 2,
    r/2], the pair's other half is a reversed view of the same array, so no concatenation is
    needed; groups after the first get frequency 0, so cosine 1 and sine 0 exactly. inv_freq
    is computed as MLX's RoPE kernel computes it: 2^(-(i / (r/2)) * log2(base)).
    """

    def __init__(self, head_dim: int, base: float, scale: float, norm_weights: tuple | None,
                 rotary_dims: int | None = None, heads: tuple[int, int] | None = None):
        rotary_dims = rotary_dims or head_dim
        turned, kept = heads or (0, 0)
        half, groups = rotary_dims // 2, head_dim // rotary_dims
        self.view = (groups, 2, half)
        self.scale = scale
        inv_freq = mx.power(2.0, -(mx.arange(half, dtype=mx.float32) / half) * math.log2(base))
        # [groups, 1, half]: only the first group turns.
        self.inv_freq = mx.concatenate([inv_freq[None], mx.zeros((groups - 1, half))])[:, None, :]
        self.sign = mx.array([[-1.0], [1.0]])  # the sin term's sign per half
        self.weight = self.weight_swapped = None
        if norm_weights is not None:
            q_weight, q_heads, k_weight, kv_heads = norm_weights
            weight = mx.concatenate([mx.broadcast_to(q_weight, (q_heads, head_dim)),
                                     mx.broadcast_to(k_weight, (kv_heads, head_dim)),
                                     mx.ones((kept, head_dim), q_weight.dtype)])
            self.weight = weight.reshape(q_heads + kv_heads + kept, *self.view)
            self.weight_swapped = self.weight[:, :, ::-1, :] * self.sign
        self.kept_mask = (mx.arange(turned + kept) >= turned)[:, None, None, None] if kept else None
        # Evaluated here: a lazy array built on the loading thread cannot be evaluated on
        # the engine's thread (MLX's streams belong to their thread).
        mx.eval(self.inv_freq, self.sign,
                *(a for a in (self.weight, self.weight_swapped, self.kept_mask) if a is not None))

    def __call__(self, x: mx.array, positions: mx.array, kept: mx.array | None = None) -> mx.array:
        """x [T, heads, *view] (a view is fine) -> [T, heads, d]. With kept heads, the
        output has `kept`'s values there (an array shaped as x; x may be a normed copy of
        it)."""
        T, heads = x.shape[:2]
        dtype = x.dtype
        # The sin term's sign goes with the swapped half (in its weight, if any), not with
        # the sine, and no multiply by a scale of 1: the positions' side of the kernel is the
        # deepest, and MLX fuses a chain of operations only so deep (one step more left the
        # positions' conversion outside, a kernel of its own).
        swapped = x[:, :, :, ::-1, :]
        if self.weight is not None:
            x, swapped = x * self.weight, swapped * self.weight_swapped
        else:
            swapped = swapped * self.sign
        # Positions expanded before anything else: an expand between elementwise operations
        # would split the fused kernel in two.
        angle = positions[:, None, None, None, None].astype(mx.float32)
        if self.scale != 1.0:
            angle = angle * self.scale
        angle = angle * self.inv_freq
        cos, sin = mx.cos(angle), mx.sin(angle)
        out = (x * cos + swapped * sin).astype(dtype)
        if self.kept_mask is not None:
            # Every head is turned and the kept ones' results dropped: a selection is
            # elementwise and fuses into the same kernel, where a concatenation would copy.
            out = mx.where(self.kept_mask, kept, out)
        return out.reshape(T, heads, -1)


def add_linear(residual: mx.array, x: mx.array, linear: nn.Module) -> mx.array:
    """residual + linear(x). For a plain bias-free Linear and more than one row it is one
    matrix product with the sum in its epilogue (mx.addmm): one kernel where two were
    launched. One row stays a product and an add: MLX's CUDA back-end runs a one-row product
    as its own matrix-vector kernel but the same addmm through cuBLASLt, whose per-call setup
    cost more host time than the saved launch (H200, scripts/profile_step.py)."""
    if x.shape[0] > 1 and type(linear) is nn.Linear and "bias" not in linear:
        return mx.addmm(residual, x, linear.weight.T)
    return residual + linear(x)


@partial(mx.compile, shapeless=True)
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    return nn.silu(gate) * up


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, hidden = args.hidden_size, args.intermediate_size
        self.gate_proj = nn.Linear(dim, hidden, bias=args.mlp_bias)
        self.up_proj = nn.Linear(dim, hidden, bias=args.mlp_bias)
        self.down_proj = nn.Linear(hidden, dim, bias=args.mlp_bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.activation(x))

    def added_to(self, residual: mx.array, x: mx.array) -> mx.array:
        """residual + self(x), the sum taken by the down projection (see add_linear)."""
        return add_linear(residual, self.activation(x), self.down_proj)

    def activation(self, x: mx.array) -> mx.array:
        if "gate_up_proj" not in self:
            return swiglu(self.gate_proj(x), self.up_proj(x))
        gate_up = self.gate_up_proj(x)
        if x.shape[0] == 1:
            # One row: halves taken as 1-d views, so that the product gets plain strides.
            # As [1, n] views of the [1, 2n] row, their stride (2n) passes to the product,
            # and MLX copies such an operand before the next matrix product. (A reshape,
            # not [0], which MLX gathers.)
            gate, up = mx.split(gate_up.reshape(-1), 2)
            return swiglu(gate, up)[None]
        gate, up = mx.split(gate_up, 2, axis=-1)
        return swiglu(gate, up)

    def fuse(self) -> None:
        fused = fuse_linears([self.gate_proj, self.up_proj])
        if fused is not None:
            self.gate_up_proj = fused
            del self.gate_proj, self.up_proj


def fuse_linears(layers: list[nn.Module]) -> nn.Module | None:
    """Concatenate linear layers along their outputs, or None when they differ in kind,
    dtype, bias or quantization (e.g. a GGUF file that mixes quant types per tensor)."""
    first = layers[0]
    kind = type(first)
    if kind not in (nn.Linear, nn.QuantizedLinear) or any(type(layer) is not kind for layer in layers):
        return None
    keys = set(first)
    if any(set(layer) != keys for layer in layers) or any(layer[k] is None for layer in layers for k in keys):
        return None
    if kind is nn.QuantizedLinear:
        if any((l.bits, l.group_size, l.mode) != (first.bits, first.group_size, first.mode) for l in layers):
            return None
    if any(layer[k].dtype != first[k].dtype for layer in layers for k in keys):
        return None
    return linear_like(first, {k: mx.concatenate([layer[k] for layer in layers], axis=0) for k in keys})


def linear_like(layer: nn.Module, arrays: dict[str, mx.array]) -> nn.Module:
    """A linear layer of `layer`'s kind (plain or quantized, with its quantization) holding
    `arrays` (weight, and bias, scales or biases where it has them)."""
    kind = type(layer)
    new = kind.__new__(kind)
    nn.Module.__init__(new)
    for attr in ("group_size", "bits", "mode"):
        if hasattr(layer, attr):
            setattr(new, attr, getattr(layer, attr))
    for key, value in arrays.items():
        setattr(new, key, value)
    if kind is nn.QuantizedLinear:
        new.freeze()
    return new


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.self_attn = Attention(args, layer)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    # The layer protocol of run_layers: before (pure), mix (eager, reads and writes the
    # cache), after (pure).
    @property
    def kv_layer(self) -> int:
        return self.self_attn.layer

    def before_inputs(self, batch: StepBatch) -> tuple:
        return (batch.positions,)

    def traced_mix_inputs(self, batch: StepBatch) -> None:
        """Attention's mix is never traced (see run_layers)."""
        return None

    def before(self, x: mx.array, positions: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        return self.self_attn.project(self.input_layernorm(x), positions)

    def mix(self, projected: tuple, batch: StepBatch, cache: KVStore, written: bool) -> tuple:
        return cache.attend(self.self_attn.layer, projected, batch, self.self_attn.scale, written)

    def after(self, x: mx.array, attention: mx.array) -> mx.array:
        h = add_linear(x, attention, self.self_attn.o_proj)
        return add_mlp(h, self.mlp, self.post_attention_layernorm(h))


def add_mlp(residual: mx.array, mlp: nn.Module, x: mx.array) -> mx.array:
    """residual + mlp(x); a dense MLP adds it in its last matrix product."""
    if isinstance(mlp, MLP):
        return mlp.added_to(residual, x)
    return residual + mlp(x)


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs, block: type = TransformerBlock):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [block(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


class Model(nn.Module):
    """Causal LM over a StepBatch. `model(batch, cache)` returns logits for
    `batch.logit_rows` only (prefill chunks need just their last position), or None when no
    row wants any."""

    block = TransformerBlock  # the decoder layer; a variant (e.g. Qwen3-MoE) names its own

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Backbone(args, self.block)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    @property
    def layers(self):
        return self.model.layers

    def fuse(self) -> None:
        """Merge projections that read the same input, after the weights are loaded."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

    def kv_shape(self) -> tuple[int, int, int]:
        """(attention layers, kv heads, head dim) for sizing the KV pools."""
        return self.args.num_hidden_layers, self.args.num_key_value_heads, self.args.head_dim

    def __call__(self, batch: StepBatch, cache: KVStore) -> mx.array | None:
        return causal_lm_forward(self, batch, cache)

    def sanitize(self, weights: dict) -> dict:
        """Drop checkpoint entries that have no parameter here."""
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
            weights.pop("lm_head.scales", None)
            weights.pop("lm_head.biases", None)
        return weights


def run_layers(layers: list, h: mx.array, batch: StepBatch, cache: KVStore) -> tuple:
    """The decoder layers over the step's hidden states h [T, hidden]. Returns (h before the
    last layer's `after`, the last layer, that piece's other inputs); the caller runs it.

    A layer is `before` (norms, projections; pure), `mix` (attention or recurrence, which
    read and write per-row state), then `after` (output projection, MLP; pure). The pure
    work between two eager mixes runs as one compiled piece (see compiled.py): one call for
    the host to make instead of one per function.
    - An attention layer's mix is eager, as the keys it reads change length at every step.
      When the step's K/V go to a single shelf write covering every token
      (KVStore.whole_write: decoding steps), that write happens inside the piece before it,
      as its scatters have the same shapes at every step; otherwise mix does it.
    - A layer whose mix can run traced for this step (`traced_mix_inputs` not None: a
      linear-attention layer's recurrence in a decoding step, whose shapes hold from step to
      step) has it inside the piece, with its `after` and the next layer's `before`: a
      piece then spans layers up to the next eager mix (a hybrid model's three linear
      layers and the next full-attention layer's projections).
    The outputs of the layers in `batch.capture` (a DFlash draft's context, spec/dflash.py)
    are set, concatenated in that order, as `batch.captured` [T, len(capture) x hidden]:
    layer j's output is what enters layer j + 1, taken inside the piece that computes it.
    """
    whole = cache.whole_write(batch)
    tracing = active(batch.compile)  # else every mix runs eagerly (for comparisons)
    wanted = set(batch.capture)
    captured: dict[int, mx.array] = {}
    previous, carry = None, ()
    i = 0
    while i < len(layers):
        first = i
        span, states = [], []
        while True:  # layers up to an eager mix or the last layer
            layer = layers[i]
            i += 1
            span.append(layer)
            states.append(layer.traced_mix_inputs(batch) if tracing else None)
            if states[-1] is None or i == len(layers):
                break
        last = span[-1]
        shelf = rows = None
        if whole is not None and states[-1] is None and last.kv_layer is not None:
            shelf, rows = whole.shelf.kv[last.kv_layer], whole.rows
        inputs = tuple(layer.before_inputs(batch) for layer in span)
        # A one-layer piece whose mix is eager is "joint"; a longer one, or one ending in a
        # traced mix, is named by its length: a layer starts spans of one extent only
        # (decoding steps), and the compiled function keeps the span it was made with.
        name = "joint" if len(span) == 1 and states[0] is None else f"span{len(span)}"
        # Per layer of the span: whether what enters it (the previous layer's output) is wanted.
        taps = tuple(j - 1 in wanted for j in range(first, i))
        if any(taps):
            name += "_taps" + "".join("1" if t else "0" for t in taps)
        piece = compiled(span[0], name, partial(_span, previous, tuple(span), taps), batch.compile)
        h, out, new_states, written, tapped = piece(h, carry, inputs, tuple(states), shelf, rows)
        captured.update(zip([j - 1 for j, t in zip(range(first, i), taps) if t], tapped))
        for layer, state in zip(span, new_states):
            layer.traced_mix_done(batch, state)
        if shelf is not None:
            cache.put(last.kv_layer, whole, written)
        carry = out if states[-1] is not None else last.mix(out, batch, cache, shelf is not None)
        previous = last
    if wanted:
        batch.captured = mx.concatenate([captured[j] for j in batch.capture], axis=-1)
    return h, previous, carry


def _span(previous, span: tuple, taps: tuple, x: mx.array, carry: tuple, inputs: tuple, states: tuple,
          shelf: mx.array | None, rows: mx.array | None) -> tuple:
    """previous.after, then for each layer of the span its before, traced mix and after,
    but for the last layer: its before, and its traced mix (states[-1] given) or the K/V
    write (a shelf given); see run_layers. A span of one layer with an eager mix is the
    pure work between two mixes: previous.after, layer.before, the K/V write. Returns (the residual stream before the last
    layer's after, what comes next of the last layer: its traced mix's output or what its
    eager mix needs, the traced mixes' new states, the written shelf, the hidden states
    entering the layers that `taps` marks)."""
    if previous is not None:
        x = previous.after(x, *carry)
    new_states, tapped = [], []
    for layer, layer_inputs, state, tap in zip(span, inputs, states, taps):
        if tap:
            tapped.append(x)
        projected = layer.before(x, *layer_inputs)
        if state is None:
            break  # the last layer's mix is eager
        out, new = layer.traced_mix(projected, state)
        new_states.append(new)
        if layer is not span[-1]:
            x = layer.after(x, *out)
    else:
        return x, out, tuple(new_states), (), tuple(tapped)
    written = ()
    if shelf is not None:
        q, kv, *rest = projected
        written = scatter_kv(shelf, kv, rows)
        projected = (q, *rest)
    return x, projected, tuple(new_states), written, tuple(tapped)


def causal_lm_forward(lm: nn.Module, batch: StepBatch, cache: KVStore) -> mx.array | None:
    """Embedding, the layers, then the head for the rows that want logits: the forward pass
    of every model family here (`lm` has .args, .model.{embed_tokens, layers, norm}, and
    .lm_head unless its embeddings are tied)."""
    h = lm.model.embed_tokens(batch.tokens)
    h, last, carry = run_layers(lm.model.layers, h, batch, cache)
    if batch.logit_rows.size == 0:
        # A prefill-only step: its product is the state it wrote. (No zero-row head either:
        # MLX's CUDA back-end rejects zero-size kernels.)
        return None
    h = compiled(last, "last", last.after, batch.compile)(h, *carry)
    if batch.logit_rows.size != h.shape[0]:  # else every token wants logits, in order
        h = h[batch.logit_rows]
    h = batch.hidden = lm.model.norm(h)
    if lm.args.tie_word_embeddings:
        return lm.model.embed_tokens.as_linear(h)
    return lm.lm_head(h)
