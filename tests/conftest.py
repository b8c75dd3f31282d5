"""Shared fixtures: hypothesis profiles, deterministic seeds, tiny models built from configs (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import rankmoe  # noqa: F401  (registers the PEFT method)

settings.register_profile(
    "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One share of the cores per pytest-xdist worker: oversubscribed OpenMP threads spin against each other and made
# small convolutions 30-60x slower on 2 cores. Subprocesses (docs examples, torchrun) inherit the same share.
_THREADS = max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))
torch.set_num_threads(_THREADS)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class MLP(torch.nn.Module):
    """Two linear layers with a ReLU: ``(b, n, 16) -> (b, n, 8)``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = torch.nn.Linear(16, 32)
        self.act = torch.nn.ReLU()
        self.lin1 = torch.nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.act(self.lin0(x)))


class ConvNet(torch.nn.Module):
    """Conv2d stack: ``(b, 3, h, w) -> (b, 6, h/2, w/2)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = torch.nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.act = torch.nn.SiLU()
        self.conv1 = torch.nn.Conv2d(8, 6, kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(self.act(self.conv0(x)))


@pytest.fixture
def mlp() -> MLP:
    return MLP()


@pytest.fixture
def convnet() -> ConvNet:
    return ConvNet()


def tiny_llama():
    """A 2-layer Llama causal LM (hidden 32, vocab 128) built from a config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def tiny_unet():
    """A tiny diffusers ``UNet2DConditionModel`` built from a config."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=4,
        attention_head_dim=2,
    ).eval()
