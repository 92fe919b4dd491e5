"""Recurrent nets for the long-range problems: a vanilla tanh RNN (Elman 1990) and an LSTM
(Hochreiter & Schmidhuber 1997), reading the whole sequence and predicting from the last state.

Parts in depth order: `input` (input-to-hidden weights, an embedding for token inputs),
`recurrent` (hidden-to-hidden weights: where exploding and vanishing gradients live) and `head`.
Both take `hidden`, so `--set model.name=lstm` turns a task's RNN into an LSTM.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from . import dense
from .layers import MODELS, observe
from .mlp import kernel_init_kwargs


class Recurrent(nnx.Module):
    layer_order = ("input", "recurrent", "head")
    bounded_parts = ("recurrent",)  # the hidden state: tanh-bounded in both cells

    def __init__(self, meta, hidden, cell, forget_bias, kernel_init, rngs):
        gates = 4 if cell == "lstm" else 1
        init = kernel_init_kwargs(kernel_init)
        if meta.vocab_size:
            self.input = nnx.Embed(meta.vocab_size, gates * hidden, rngs=rngs)
        else:
            self.input = nnx.Linear(meta.x_shape[-1], gates * hidden, **init, rngs=rngs)
        self.recurrent = nnx.Linear(hidden, gates * hidden, use_bias=False, **init, rngs=rngs)
        self.head = nnx.Linear(hidden, meta.num_outputs, **init, dot_general=dense.dot_general,
                               rngs=rngs)
        self.cell, self.hidden, self.forget_bias = cell, hidden, forget_bias

    def __call__(self, x):
        pre = observe("input", self.input(x))  # [batch, time, gates * hidden]
        w = self.recurrent.kernel[...]
        h0 = jnp.zeros((x.shape[0], self.hidden), pre.dtype)
        inputs = jnp.swapaxes(pre, 0, 1)  # time-major for the scan
        if self.cell == "tanh":
            def step(h, z):
                h = jnp.tanh(z + h @ w)
                return h, h
            h, states = jax.lax.scan(step, h0, inputs)
        else:
            def step(carry, z):
                h, c = carry
                i, f, g, o = jnp.split(z + h @ w, 4, axis=-1)
                c = jax.nn.sigmoid(f + self.forget_bias) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
                h = jax.nn.sigmoid(o) * jnp.tanh(c)
                return (h, c), h
            (h, _), states = jax.lax.scan(step, (h0, h0), inputs)
        observe("recurrent", states)
        return observe("head", self.head(h))


def _check(cell: str, hidden: int):
    if hidden <= 0:
        raise ValueError("hidden must be positive")

    def check_meta(meta):
        if len(meta.x_shape) != (1 if meta.vocab_size else 2):
            raise ValueError(f"{cell} needs sequences [time, features] or token ids [time], "
                             f"got {meta.x_shape}")

    return check_meta


@MODELS.register("rnn", help="vanilla tanh RNN: h_t = tanh(W_in x_t + W_rec h_(t-1) + b)",
                 ref="Elman 1990; Pascanu et al. 2013")
def rnn(hidden: int = 64):
    check_meta = _check("rnn", hidden)

    def build(meta, kernel_init, rngs):
        check_meta(meta)
        return Recurrent(meta, hidden, "tanh", 0.0, kernel_init, rngs)

    return build


@MODELS.register("lstm", help="LSTM; forget_bias is added to the forget gate's pre-activation",
                 ref="Hochreiter & Schmidhuber 1997; Gers et al. 2000; Jozefowicz et al. 2015")
def lstm(hidden: int = 64, forget_bias: float = 1.0):
    check_meta = _check("lstm", hidden)

    def build(meta, kernel_init, rngs):
        check_meta(meta)
        return Recurrent(meta, hidden, "lstm", forget_bias, kernel_init, rngs)

    return build
