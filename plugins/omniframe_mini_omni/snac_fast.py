"""Torch-level pieces of :func:`omniframe_mini_omni.snac_codec.speed_up`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MatmulConvTranspose1d(nn.Module):
    """``nn.ConvTranspose1d`` (groups 1, dilation 1, zero padding) as ``x^T @ W`` + overlap-add.

    Every input step t contributes ``x[:, :, t] @ W`` (Cout x K values) to output positions
    t * stride .. t * stride + K - 1; ``F.fold`` sums the overlaps, then ``padding`` is cropped
    from both ends (``output_padding`` extra on the right, taken from the cropped margin).
    """

    @staticmethod
    def supports(conv: nn.ConvTranspose1d) -> bool:
        return (
            conv.groups == 1
            and conv.dilation == (1,)
            and conv.padding_mode == "zeros"
            and isinstance(conv.padding, tuple)
            and conv.output_padding[0] <= conv.padding[0]
        )

    def __init__(self, conv: nn.ConvTranspose1d) -> None:
        super().__init__()
        c_in, c_out, k = conv.weight.shape
        self.c_out, self.kernel = c_out, k
        self.stride = conv.stride[0]
        self.pad = int(conv.padding[0])
        self.output_padding = conv.output_padding[0]
        self.weight = nn.Parameter(conv.weight.detach(), requires_grad=False)  # (Cin, Cout, K)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(),
                                                                requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:  # (B, Cin, T) -> (B, Cout, T')
        B, c_in, T = x.shape
        c_out, k, s = self.c_out, self.kernel, self.stride
        cols = torch.matmul(x.transpose(1, 2), self.weight.reshape(c_in, c_out * k))
        cols = cols.transpose(1, 2)  # (B, Cout * K, T): fold's column layout
        full = (T - 1) * s + k
        y = F.fold(cols, output_size=(1, full), kernel_size=(1, k), stride=(1, s))
        length = full - 2 * self.pad + self.output_padding
        y = y[:, :, 0, self.pad : self.pad + length]  # (B, Cout, T')
        return y if self.bias is None else y + self.bias[:, None]
