"""RRDBNet, the ESRGAN / Real-ESRGAN generator, re-implemented with BasicSR's module names.

The layout follows BasicSR's ``basicsr.archs.rrdbnet_arch.RRDBNet`` so that its state-dict keys (and therefore
RankMoE ``target_modules`` names) are the same:

- ``conv_first`` (3x3, ``num_in_ch -> num_feat``);
- ``body.{i}`` for ``i < num_block``: an :class:`RRDB` of three :class:`ResidualDenseBlock` ``rdb1 .. rdb3``, each
  with ``conv1 .. conv5`` (3x3, dense connections, LeakyReLU 0.2 after ``conv1 .. conv4``, residual scaled by 0.2);
  each RRDB adds its input back with a 0.2-scaled residual too;
- ``conv_body`` (3x3) closes the trunk, whose output is added to the ``conv_first`` features;
- two nearest-neighbour x2 upsamplings, each followed by ``conv_up1`` / ``conv_up2`` + LeakyReLU 0.2;
- ``conv_hr`` + LeakyReLU 0.2 and ``conv_last`` (3x3, ``num_feat -> num_out_ch``).

The network always upsamples its (possibly pixel-unshuffled) input by 4: for ``scale=2`` / ``scale=1`` the
input is first pixel-unshuffled by 2 / 4 (as in BasicSR), so the overall factor is ``scale``.

Registration order of the convolutions equals their order in the forward graph (``conv_first``, the body in
order, ``conv_body``, ``conv_up1``, ``conv_up2``, ``conv_hr``, ``conv_last``); weight converters rely on it.

Axis legend: ``b`` batch, ``c`` channels, ``h``/``w`` input size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SCALES = (1, 2, 4)
LRELU_SLOPE = 0.2
RESIDUAL_SCALE = 0.2


def _init_scaled_kaiming(convs: list[nn.Conv2d], scale: float) -> None:
    """BasicSR's ``default_init_weights``: Kaiming-normal (fan-in) weights times ``scale``, zero biases."""
    for conv in convs:
        nn.init.kaiming_normal_(conv.weight)
        with torch.no_grad():
            conv.weight.mul_(scale)
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3x3 convolutions with a 0.2-scaled residual.

    ``conv{k}`` sees the block input concatenated with the outputs of ``conv1 .. conv{k-1}``; ``conv1 .. conv4``
    produce ``num_grow_ch`` channels and are followed by LeakyReLU 0.2, ``conv5`` maps back to ``num_feat``.

    Args:
        num_feat: channels of the block input and output.
        num_grow_ch: channels added by each of ``conv1 .. conv4``.
    """

    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_grow_ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat + num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv3 = nn.Conv2d(num_feat + 2 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv4 = nn.Conv2d(num_feat + 3 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=LRELU_SLOPE, inplace=True)
        _init_scaled_kaiming([self.conv1, self.conv2, self.conv3, self.conv4, self.conv5], 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(b, num_feat, h, w)`` to ``(b, num_feat, h, w)``: ``x + 0.2 * conv5(...)``."""
        x1 = self.lrelu(self.conv1(x))
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * RESIDUAL_SCALE + x


class RRDB(nn.Module):
    """Residual-in-residual dense block: three :class:`ResidualDenseBlock` and a 0.2-scaled residual.

    Args:
        num_feat: channels of the block input and output.
        num_grow_ch: growth channels of each dense block.
    """

    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(b, num_feat, h, w)`` to ``(b, num_feat, h, w)``: ``x + 0.2 * rdb3(rdb2(rdb1(x)))``."""
        return self.rdb3(self.rdb2(self.rdb1(x))) * RESIDUAL_SCALE + x


class RRDBNet(nn.Module):
    """ESRGAN / Real-ESRGAN generator (BasicSR layout and state-dict keys).

    ``RRDBNet()`` (the defaults) is the Real-ESRGAN x4plus architecture (16.7 M parameters, 351 convolutions).
    The output is **not clamped**: a trained network maps ``[0, 1]`` images to values slightly outside
    ``[0, 1]``; clamp (and quantise) before scoring or saving.

    Args:
        num_in_ch: input channels (3 for RGB).
        num_out_ch: output channels (3 for RGB).
        num_feat: trunk width.
        num_block: number of :class:`RRDB` blocks in ``body``.
        num_grow_ch: growth channels of each dense block.
        scale: overall upsampling factor, one of 1, 2, 4 (1 and 2 pixel-unshuffle the input by 4 / 2 first, so
            ``h`` and ``w`` must then be multiples of 4 / 2).

    Raises:
        ValueError: for a ``scale`` outside (1, 2, 4) or a non-positive size argument.

    Example:
        >>> net = RRDBNet(num_feat=8, num_block=1, num_grow_ch=4)
        >>> net(torch.rand(2, 3, 5, 7)).shape
        torch.Size([2, 3, 20, 28])
    """

    def __init__(
        self,
        num_in_ch: int = 3,
        num_out_ch: int = 3,
        num_feat: int = 64,
        num_block: int = 23,
        num_grow_ch: int = 32,
        scale: int = 4,
    ) -> None:
        super().__init__()
        if isinstance(scale, bool) or scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
        for field, value in (
            ("num_in_ch", num_in_ch),
            ("num_out_ch", num_out_ch),
            ("num_feat", num_feat),
            ("num_grow_ch", num_grow_ch),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be a positive int, got {value!r}")
        if isinstance(num_block, bool) or not isinstance(num_block, int) or num_block < 0:
            raise ValueError(f"num_block must be a non-negative int, got {num_block!r}")
        self.scale = scale
        self.num_in_ch = num_in_ch
        self.unshuffle = {4: 1, 2: 2, 1: 4}[scale]
        self.conv_first = nn.Conv2d(num_in_ch * self.unshuffle**2, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(num_feat, num_grow_ch) for _ in range(num_block)))
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=LRELU_SLOPE, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Super-resolve a batch.

        Args:
            x: ``(b, num_in_ch, h, w)`` images in ``[0, 1]``.

        Returns:
            ``(b, num_out_ch, scale * h, scale * w)``, not clamped.

        Raises:
            ValueError: for a wrong rank or channel count, or (``scale`` 1 / 2) a size not divisible by 4 / 2.
        """
        if x.ndim != 4 or x.shape[1] != self.num_in_ch:
            raise ValueError(f"RRDBNet expects (b, {self.num_in_ch}, h, w) input, got {tuple(x.shape)}")
        if self.unshuffle > 1:
            if x.shape[-2] % self.unshuffle or x.shape[-1] % self.unshuffle:
                raise ValueError(
                    f"scale={self.scale} needs h and w divisible by {self.unshuffle}, got {tuple(x.shape[-2:])}"
                )
            x = F.pixel_unshuffle(x, self.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        feat = self.lrelu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
        feat = self.lrelu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(self.lrelu(self.conv_hr(feat)))
