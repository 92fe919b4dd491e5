"""Model registry and the per-layer view of a model's parameters that telemetry reports.

A model factory takes the task's model arguments and returns a builder
`(meta, kernel_init, rngs) -> nnx.Module`. Every model names its top-level parts in depth order
(`layer_order`); parts listed in `stacked_layers` hold a leading layer axis (built with nnx.vmap and
applied with `scan_layers`), so each index along it is one layer.

Models call `observe("part", output)` on each top-level part's output (`part/3` for item 3 of a
list; `scan_layers` does it per layer of a stack), so `activation_stds` reports every layer's
activation std in the same order as the per-layer gradient norms. Outside `activation_stds` it
records nothing. Within a `tapping` block, models `tap` values of their forward pass that the
training step records (a Transformer block its largest attention logit).

Residual structure, for the inits that need it (fixup, skipinit, rezero, zero_init_residual): a
model lists in `residual_parts` the parts holding residual blocks (empty for a plain model). A
block names its residual branches (`branches`: for each, the attributes of its kernel layers and
norm layers in the order they apply, any of which may be None), and multiplies every branch by a
learnable scalar `branch_gain` (a Param, or None) when its model is built with a `branch_gain`
argument. A block inside a stacked part holds all the part's blocks along each parameter's leading
axis. A model lists in `bounded_parts` the parts whose reported output a saturating nonlinearity
bounds (an RNN's hidden state), which no rescaling of their kernel brings to unit variance.
"""

from . import cnn, mlp, resnet, rnn, transformer  # noqa: F401  (registers the models)
from .layers import (BATCHNORM_MOMENTUM, MODELS, MUTABLE, NORMS, LayerLayout, activation_stds,
                     branch_gain_param, gained, key_names, make_norm, observe, residual_blocks,
                     scan_layers, softcap, tap, tapping)

__all__ = ["BATCHNORM_MOMENTUM", "MODELS", "MUTABLE", "NORMS", "LayerLayout", "activation_stds",
           "branch_gain_param", "gained", "key_names", "make_norm", "observe", "residual_blocks",
           "scan_layers", "softcap", "tap", "tapping"]
