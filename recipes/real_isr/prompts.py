"""Text prompts of the one-step generator: a pluggable prompt source and its CLIP text embeddings.

OSEDiff prompts the UNet with RAM tags of the HR image in training and DAPE tags of the LR image at inference
(``shared/notes/real-isr.md`` §1.6). Both taggers are multi-GB downloads, so the recipe takes any of:

- ``""`` (the default): the empty prompt — SD's unconditional embedding, the same for every image;
- a fixed string, e.g. ``"high quality, highly detailed, sharp, 8k"``: one embedding for every image;
- a callable ``f(lr) -> list[str]`` that receives the LR batch ``(b, 3, H, W)`` in ``[0, 1]`` and returns one
  prompt per image (plug a tagger such as RAM / DAPE here when local weights exist).

Embeddings are computed without gradients (the text encoder is frozen); the fixed prompt's embedding is computed
once per device and dtype and cached.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["PromptEncoder", "PromptSource"]

PromptSource = str | Callable[[torch.Tensor], Sequence[str]]
"""A fixed prompt (``""`` = empty) or a callable ``(b, 3, H, W) LR batch in [0, 1] -> b prompts``."""


class PromptEncoder(nn.Module):
    """CLIP tokenizer + text encoder behind a prompt source; returns ``(b, n, d)`` text embeddings.

    Axis legend: ``b`` batch, ``n`` tokens (``tokenizer.model_max_length``, 77 for SD), ``d`` text hidden size (the
    UNet's ``cross_attention_dim``).

    Args:
        tokenizer: A ``CLIPTokenizer`` (padding to ``model_max_length``, truncating longer prompts).
        text_encoder: A ``CLIPTextModel``; frozen here. Its ``last_hidden_state`` is the embedding (as in SD 2.x
            pipelines, whose checkpoints already drop the last CLIP layer).
        source: The prompt source (see :data:`PromptSource`).

    Raises:
        TypeError: If ``source`` is neither a string nor a callable.
    """

    def __init__(self, tokenizer: object, text_encoder: nn.Module, source: PromptSource = "") -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self._cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self.source = source

    @property
    def source(self) -> PromptSource:
        """The prompt source; assigning a new one clears the cached embedding."""
        return self._source

    @source.setter
    def source(self, value: PromptSource) -> None:
        if not isinstance(value, str) and not callable(value):
            raise TypeError(
                f"prompt must be a string (a fixed prompt; '' for the empty prompt) or a callable "
                f"lr_batch -> list of strings, got {type(value).__name__}"
            )
        self._source = value
        self._cache = {}

    def train(self, mode: bool = True) -> PromptEncoder:
        """Keep the frozen text encoder in ``eval()`` mode whatever ``mode`` is."""
        super().train(mode)
        self.text_encoder.eval()
        return self

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Embed explicit prompts.

        Args:
            prompts: ``b`` strings.

        Returns:
            ``(b, n, d)`` embeddings on the text encoder's device and dtype.
        """
        ids = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(ids.to(device))[0]

    def forward(self, lr: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        """Embeddings of the batch's prompts: ``prompts`` when given, else the prompt source's.

        Args:
            lr: ``(b, 3, H, W)`` LR batch in ``[0, 1]`` (handed to a callable source).
            prompts: Optional ``b`` strings overriding the source for this call.

        Returns:
            ``(b, n, d)`` embeddings.

        Raises:
            ValueError: If ``prompts`` or the callable's result is not ``b`` strings.
            TypeError: If a callable source returns something other than a sequence of strings.
        """
        batch = lr.shape[0]
        if prompts is None and isinstance(self.source, str):
            first = next(self.text_encoder.parameters())
            key = (first.device, first.dtype)
            if key not in self._cache:
                self._cache = {key: self.encode([self.source])}
            return self._cache[key].expand(batch, -1, -1)
        where = "prompts"
        if prompts is None:
            prompts = self.source(lr)
            where = f"the prompt callable {getattr(self.source, '__name__', type(self.source).__name__)}"
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise TypeError(f"{where} must give a list of strings, one per image, got {type(prompts).__name__}")
        if len(prompts) != batch:
            raise ValueError(f"{where} gave {len(prompts)} prompt(s) for a batch of {batch} image(s); give one each")
        bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
        if bad:
            raise TypeError(f"{where} must give strings, got {bad[0]}")
        return self.encode(prompts)
