"""Small pre-LN Transformer encoder for sequence classification (text, ListOps).

Token (or feature) embedding plus learned positions; `depth` identical blocks
h += [gain *] attn(LN(h)); h += [gain *] mlp(LN(h)) (`gain`: a learnable scalar per block when
branch_gain is given); a final LayerNorm; mean pooling over non-padding positions
(token 0 pads); a linear head. `qk_norm=true` applies LayerNorm to queries and keys per head, the
logit-growth fix studied by Dehghani et al. 2023 and Wortsman et al. 2023; `attn_softcap=c`
soft-caps the attention logits to c * tanh(logits / c) (Gemma 2).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from . import dense
from .layers import MODELS, branch_gain_param, gained, observe, scan_layers, softcap, tap
from .mlp import kernel_init_kwargs

MASKED = -1e9  # attention logit of a padding key: softmax weight exactly 0 in float32


class Embedding(nnx.Module):
    def __init__(self, meta, dim, kernel_init, rngs):
        if meta.vocab_size:
            self.tokens = nnx.Embed(meta.vocab_size, dim, rngs=rngs)
        else:
            self.tokens = nnx.Linear(meta.x_shape[-1], dim, **kernel_init_kwargs(kernel_init),
                                     rngs=rngs)
        self.positions = nnx.Param(
            jax.nn.initializers.normal(0.02)(rngs.params(), (meta.x_shape[0], dim)))

    def __call__(self, x):
        return self.tokens(x) + self.positions[...]


class Block(nnx.Module):
    """Pre-LN encoder block: an attention branch (q_norm and k_norm inside it) and an MLP branch."""

    branches = (("norm1", "qkv", "out"), ("norm2", "mlp_in", "mlp_out"))

    def __init__(self, dim, heads, mlp_ratio, qk_norm, branch_gain, kernel_init, rngs,
                 attn_softcap=None):
        init = kernel_init_kwargs(kernel_init)
        self.heads = heads
        self.attn_softcap = attn_softcap
        head_dim = dim // heads
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.qkv = nnx.Linear(dim, 3 * dim, **init, rngs=rngs)
        self.q_norm = nnx.LayerNorm(head_dim, rngs=rngs) if qk_norm else None
        self.k_norm = nnx.LayerNorm(head_dim, rngs=rngs) if qk_norm else None
        self.out = nnx.Linear(dim, dim, **init, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.mlp_in = nnx.Linear(dim, mlp_ratio * dim, **init, rngs=rngs)
        self.mlp_out = nnx.Linear(mlp_ratio * dim, dim, **init, rngs=rngs)
        self.branch_gain = branch_gain_param(branch_gain)

    def attention(self, z, mask):
        batch, length, dim = z.shape
        q, k, v = jnp.split(self.qkv(z).reshape(batch, length, 3 * self.heads, -1), 3, axis=2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
        if self.attn_softcap is not None:
            logits = softcap(logits, self.attn_softcap)
        pairs = mask[:, None, :, None] & mask[:, None, None, :]  # both positions hold tokens
        tap("attn_logit_max", jnp.max(jnp.where(pairs, jnp.abs(logits), 0.0)))
        logits = jnp.where(mask[:, None, None, :], logits, MASKED)
        weights = jax.nn.softmax(logits, axis=-1)
        return self.out(jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, dim))

    def __call__(self, h, mask):
        h = h + gained(self.branch_gain, self.attention(self.norm1(h), mask))
        return h + gained(self.branch_gain, self.mlp_out(jax.nn.gelu(self.mlp_in(self.norm2(h)))))


class Transformer(nnx.Module):
    layer_order = ("embed", "blocks", "final_norm", "head")
    stacked_layers = ("blocks",)
    residual_parts = ("blocks",)

    def __init__(self, meta, *, dim, depth, heads, mlp_ratio, qk_norm, branch_gain, kernel_init,
                 rngs, attn_softcap=None):
        self.embed = Embedding(meta, dim, kernel_init, rngs)

        @nnx.split_rngs(splits=depth)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs):
            return Block(dim, heads, mlp_ratio, qk_norm, branch_gain, kernel_init, rngs,
                         attn_softcap)

        self.blocks = make_blocks(rngs)
        self.final_norm = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, meta.num_outputs, **kernel_init_kwargs(kernel_init),
                               dot_general=dense.dot_general, rngs=rngs)
        self.tokens = bool(meta.vocab_size)

    def __call__(self, x):
        mask = x != 0 if self.tokens else jnp.ones(x.shape[:2], bool)
        h = observe("embed", self.embed(x))
        h = scan_layers(self, "blocks", h, mask)
        h = observe("final_norm", self.final_norm(h))
        weights = mask[..., None].astype(h.dtype)
        pooled = (h * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
        return observe("head", self.head(pooled))


@MODELS.register("transformer",
                 help="pre-LN Transformer encoder, mean-pooled; qk_norm=true: LayerNorm on q and "
                 "k; attn_softcap=c: attention logits soft-capped to c * tanh(logits / c)",
                 ref="Vaswani et al. 2017; Xiong et al. 2020 (pre-LN); Wortsman et al. 2023; "
                 "Gemma Team 2024 (soft-capping)")
def transformer(dim: int = 64, depth: int = 2, heads: int = 4, mlp_ratio: int = 4,
                qk_norm: bool = False, branch_gain: float | None = None,
                attn_softcap: float | None = None):
    if min(dim, depth, heads, mlp_ratio) <= 0:
        raise ValueError("dim, depth, heads and mlp_ratio must be positive")
    if attn_softcap is not None and not attn_softcap > 0:
        raise ValueError("attn_softcap must be positive")
    if dim % heads:
        raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")

    def build(meta, kernel_init, rngs):
        if len(meta.x_shape) != (1 if meta.vocab_size else 2):
            raise ValueError(f"transformer needs token ids [time] or sequences [time, features], "
                             f"got {meta.x_shape}")
        return Transformer(meta, dim=dim, depth=depth, heads=heads, mlp_ratio=mlp_ratio,
                           qk_norm=qk_norm, branch_gain=branch_gain, kernel_init=kernel_init,
                           rngs=rngs, attn_softcap=attn_softcap)

    return build
