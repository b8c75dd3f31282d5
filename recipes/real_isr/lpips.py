"""LPIPS-VGG as a training loss, offline: a VGG16 feature net and the lpips linear heads from local files.

Reimplements ``lpips.LPIPS(net="vgg", version="0.1")`` (lpips 0.1.4, BSD-2) without the package or a download:

- backbone: ``torchvision.models.vgg16`` ``features`` (same module indices, so a torchvision state dict file such
  as ``vgg16-397923af.pth`` loads as is; only its ``features.*`` keys are read), tapped after relu1_2, relu2_2,
  relu3_3, relu4_3 and relu5_3;
- linear heads: the lpips package's ``weights/v0.1/vgg.pth`` (keys ``lin0.model.1.weight`` ..
  ``lin4.model.1.weight``, shapes ``(1, c, 1, 1)``);
- distance: scaling layer ``(x - shift) / scale``, channel-wise unit normalisation of every tap, squared
  difference, 1x1 head, spatial mean, sum over the five taps.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["LPIPS", "VGG16_TAPS", "load_state_dict_file", "vgg16_features"]

LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
VGG16_TAPS = (4, 9, 16, 23, 30)
"""End indices (exclusive) in ``vgg16().features`` of the slices ending at relu1_2, relu2_2, relu3_3, relu4_3,
relu5_3 (as ``lpips.pretrained_networks.vgg16``)."""
_TAP_CHANNELS = (64, 128, 256, 512, 512)


def vgg16_features() -> nn.Sequential:
    """``torchvision.models.vgg16(weights=None).features`` built alone (no 120 M-parameter classifier).

    Returns:
        An ``nn.Sequential`` with torchvision's module indices (``0.weight`` .. ``28.bias``).
    """
    layers: list[nn.Module] = []
    channels = 3
    for item in _VGG16_CFG:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, int(item), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = int(item)
    return nn.Sequential(*layers)


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a ``.safetensors`` file or a ``torch.save`` state dict (``weights_only``) on the CPU.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


class LPIPS(nn.Module):
    """LPIPS-VGG v0.1 distance with weights from local files; frozen (no parameter requires grad).

    Inputs are images in ``[-1, 1]`` (as ``lpips.LPIPS(normalize=False)``); map ``[0, 1]`` images with
    ``2 * x - 1`` first.

    Args:
        backbone_weights: A torchvision VGG16 state dict file (``vgg16-397923af.pth``; keys ``features.N.*``).
        lpips_weights: The lpips package's ``vgg.pth`` (keys ``lin{k}.model.1.weight``, ``(1, c, 1, 1)``).
        allow_random: Allow a missing file: random backbone and constant heads ``1 / c`` (tests and plumbing
            only; the distance is then not LPIPS).

    Raises:
        ValueError: If a weight file is missing and ``allow_random`` is false, or a file lacks a key / has a wrong
            shape.

    Example:
        >>> loss = LPIPS(allow_random=True)
        >>> x = torch.rand(2, 3, 32, 32) * 2 - 1
        >>> loss(x, x).tolist()
        [0.0, 0.0]
    """

    def __init__(
        self,
        backbone_weights: str | os.PathLike[str] | None = None,
        lpips_weights: str | os.PathLike[str] | None = None,
        *,
        allow_random: bool = False,
    ) -> None:
        super().__init__()
        missing = [name for name, value in (("backbone_weights", backbone_weights), ("lpips_weights", lpips_weights))
                   if value is None]
        if missing and not allow_random:
            raise ValueError(
                f"LPIPS needs local weight files, missing {missing}: pass backbone_weights= a torchvision VGG16 state "
                "dict (vgg16-397923af.pth) and lpips_weights= the lpips package's weights/v0.1/vgg.pth, or "
                "allow_random=True for tests"
            )
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        features = vgg16_features()
        starts = (0,) + VGG16_TAPS[:-1]
        self.slices = nn.ModuleList(features[a:b] for a, b in zip(starts, VGG16_TAPS, strict=True))
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in _TAP_CHANNELS)
        with torch.no_grad():
            for lin, channels in zip(self.lins, _TAP_CHANNELS, strict=True):
                lin.weight.fill_(1.0 / channels)
        if backbone_weights is not None:
            self.load_backbone(load_state_dict_file(backbone_weights))
        if lpips_weights is not None:
            self.load_heads(load_state_dict_file(lpips_weights))
        self.requires_grad_(False).eval()

    def load_backbone(self, state: dict[str, torch.Tensor]) -> None:
        """Copy ``features.N.weight`` / ``features.N.bias`` of a torchvision VGG16 state dict (other keys ignored)."""
        with torch.no_grad():
            for block in self.slices:
                for local, module in block.named_children():
                    if not isinstance(module, nn.Conv2d):
                        continue
                    for kind in ("weight", "bias"):
                        key = f"features.{local}.{kind}"  # slices keep torchvision indices
                        if key not in state:
                            raise ValueError(f"backbone state dict lacks {key!r}; is it a torchvision VGG16?")
                        target = getattr(module, kind)
                        if tuple(state[key].shape) != tuple(target.shape):
                            raise ValueError(f"{key!r} has shape {tuple(state[key].shape)}, expected "
                                             f"{tuple(target.shape)}")
                        target.copy_(state[key])

    def load_heads(self, state: dict[str, torch.Tensor]) -> None:
        """Copy ``lin{k}.model.1.weight`` ``(1, c, 1, 1)`` of the lpips package's ``vgg.pth``."""
        with torch.no_grad():
            for k, lin in enumerate(self.lins):
                key = f"lin{k}.model.1.weight"
                if key not in state:
                    raise ValueError(f"lpips head state dict lacks {key!r}; is it lpips' weights/v0.1/vgg.pth?")
                if tuple(state[key].shape) != tuple(lin.weight.shape):
                    raise ValueError(f"{key!r} has shape {tuple(state[key].shape)}, expected {tuple(lin.weight.shape)}")
                lin.weight.copy_(state[key])

    def train(self, mode: bool = True) -> LPIPS:
        """Stay in eval mode (the net is a fixed metric)."""
        return super().train(False)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Unit-normalised taps of ``(b, 3, H, W)`` images in ``[-1, 1]``: five ``(b, c_k, H_k, W_k)`` tensors."""
        h = (x - self.shift.to(x.dtype)) / self.scale.to(x.dtype)
        taps = []
        for block in self.slices:
            h = block(h)
            taps.append(h / (h.square().sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return taps

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """LPIPS distance per sample.

        Args:
            x: ``(b, 3, H, W)`` in ``[-1, 1]``.
            y: ``(b, 3, H, W)`` in ``[-1, 1]``.

        Returns:
            ``(b,)`` distances (differentiable in ``x`` and ``y``).

        Raises:
            ValueError: If the shapes differ or are not ``(b, 3, H, W)``.
        """
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS needs two (b, 3, H, W) tensors of one shape, got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}")
        total = x.new_zeros(x.shape[0])
        for fx, fy, lin in zip(self.features(x), self.features(y), self.lins, strict=True):
            total = total + lin((fx - fy).square()).mean(dim=(1, 2, 3))
        return total
