"""Small convolutional net: 3x3 conv layers (each followed by norm, activation and 2x2 max pooling),
a dense hidden layer and a linear head; LeNet-style, for MNIST-sized images."""

from __future__ import annotations

from flax import nnx

from . import dense
from .layers import MODELS, NORMS, make_norm, observe
from .mlp import ACTIVATIONS, kernel_init_kwargs
from .resnet import IMAGE_AXES, conv3x3


class ConvLayer(nnx.Module):
    def __init__(self, cin, cout, norm, activation, kernel_init, rngs):
        self.conv = conv3x3(cin, cout, 1, norm == "none", kernel_init, rngs)
        self.norm = make_norm(norm, cout, rngs, IMAGE_AXES)
        self.activation = activation

    def __call__(self, x):
        h = self.conv(x)
        h = ACTIVATIONS[self.activation](self.norm(h) if self.norm is not None else h)
        return nnx.max_pool(h, (2, 2), strides=(2, 2))


class CNN(nnx.Module):
    layer_order = ("convs", "dense", "head")

    def __init__(self, image_shape, num_outputs, *, channels, hidden, norm, activation,
                 kernel_init, rngs):
        height, width, cin = image_shape
        layers = []
        for cout in channels:
            layers.append(ConvLayer(cin, cout, norm, activation, kernel_init, rngs))
            cin, height, width = cout, height // 2, width // 2
        self.convs = nnx.List(layers)
        init = kernel_init_kwargs(kernel_init)
        self.dense = nnx.Linear(height * width * cin, hidden, **init, rngs=rngs)
        self.head = nnx.Linear(hidden, num_outputs, **init, dot_general=dense.dot_general,
                               rngs=rngs)
        self.activation = activation

    def __call__(self, x):
        h = x
        for i, layer in enumerate(self.convs):
            h = observe(f"convs/{i}", layer(h))
        h = observe("dense", ACTIVATIONS[self.activation](self.dense(h.reshape(h.shape[0], -1))))
        return observe("head", self.head(h))


@MODELS.register("cnn", help="conv layers (3x3, pool 2x2) then a dense layer and a linear head",
                 ref="LeCun et al. 1998")
def cnn(channels: tuple = (32, 64), hidden: int = 128, norm: str = "none",
        activation: str = "relu"):
    channels = tuple(channels)
    if not channels or not all(isinstance(c, int) and c > 0 for c in channels):
        raise ValueError("channels must be a non-empty list of positive integers")
    if hidden <= 0:
        raise ValueError("hidden must be positive")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}")

    def build(meta, kernel_init, rngs):
        if len(meta.x_shape) != 3 or min(meta.x_shape[:2]) < 2 ** len(channels):
            raise ValueError(f"cnn with {len(channels)} pooling layers needs images of at least "
                             f"{2 ** len(channels)}x{2 ** len(channels)}, got {meta.x_shape}")
        return CNN(meta.x_shape, meta.num_outputs, channels=channels, hidden=hidden, norm=norm,
                   activation=activation, kernel_init=kernel_init, rngs=rngs)

    return build
