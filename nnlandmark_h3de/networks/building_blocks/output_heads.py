"""Nonlinear 1x1 output heads for a decoder with many landmark channels.

A U-Net decoder's output layer is a 1x1 convolution: each of its L heatmap logits is a linear map of the
last stage's k features, so the L maps span at most k dimensions (+ a bias each). A small network for a
CPU budget (k = 8 first-stage features) has fewer than the 32 AFIDs landmarks. A hidden 1x1 layer with a
nonlinearity lifts that limit for about 2 % more time per step (32 hidden features, 32^3 x 4 patches). On
AFIDs it lowered the BCE local stage's validation error; with the MSE it did not help (docs/benchmarks.md).
"""
from __future__ import annotations

from torch import nn

__all__ = ["NonlinearOutputHead", "use_nonlinear_output_heads"]


class NonlinearOutputHead(nn.Sequential):
    """1x1 conv (in -> hidden), LeakyReLU, 1x1 conv (hidden -> out)."""

    def __init__(self, conv_op, in_channels: int, hidden: int, out_channels: int):
        super().__init__(conv_op(in_channels, hidden, 1), nn.LeakyReLU(inplace=True),
                         conv_op(hidden, out_channels, 1))


def use_nonlinear_output_heads(decoder: nn.Module, hidden: int) -> nn.Module:
    """Replace every 1x1 output convolution in `decoder.seg_layers` (one per deep-supervision scale; the
    dynamic_network_architectures U-Net layout) by a NonlinearOutputHead with `hidden` features."""
    layers = getattr(decoder, "seg_layers", None)
    if layers is None or not len(layers):
        raise TypeError(f"{type(decoder).__name__} has no seg_layers (1x1 output convolutions) to replace")
    for i, conv in enumerate(layers):
        if not isinstance(conv, nn.modules.conv._ConvNd) or any(k != 1 for k in conv.kernel_size):
            raise TypeError(f"seg_layers[{i}] is {conv!r}, not a 1x1 convolution")
        layers[i] = NonlinearOutputHead(type(conv), conv.in_channels, hidden, conv.out_channels)
    return decoder
