"""CLIP backends for :class:`~rankmoe.conditioning.clip.ClipDegradationEstimator`: one interface, three libraries.

A backend wraps a frozen CLIP-style model (an image encoder and a text encoder that share an embedding space) and
exposes :meth:`ClipBackend.preprocess` (images in ``[0, 1]`` to the model's pixel input, in torch, batched, on the
images' device), :meth:`ClipBackend.encode_images`, :meth:`ClipBackend.encode_text` and the model's
``logit_scale``. The libraries are imported only when a backend is built.

Axis legend: ``b`` images, ``n`` prompts, ``e`` embedding width, ``h`` / ``w`` height and width.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankmoe.conditioning.clip_assets import (
    check_open_clip_inputs,
    check_sentence_transformers_path,
    check_transformers_path,
)
from rankmoe.conditioning.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageSettings, preprocess_images


def _trained_logit_scale(model: nn.Module | None) -> float | None:
    """``exp(model.logit_scale)`` (CLIP stores the log of its temperature), or ``None`` when there is none."""
    scale = getattr(model, "logit_scale", None)
    return None if scale is None else float(torch.as_tensor(scale).float().exp())


def _first_parameter(module: nn.Module) -> torch.Tensor:
    return next(iter(module.parameters()), torch.empty(0))


class ClipBackend(nn.Module, metaclass=abc.ABCMeta):
    """A frozen CLIP-style model seen through one interface (subclass it to plug in another library).

    Subclasses set :attr:`image_settings` and implement :meth:`encode_images` and :meth:`encode_text`; override
    :attr:`logit_scale` when the model has a trained temperature.
    """

    image_settings: ImageSettings

    def __init__(self, description: str) -> None:
        super().__init__()
        self.description = description

    def train(self, mode: bool = True) -> ClipBackend:
        """Backends stay in evaluation mode."""
        return super().train(False)

    @property
    def logit_scale(self) -> float | None:
        """The model's trained temperature ``exp(logit_scale)`` (about 100 for trained CLIP), or ``None``."""
        return None

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``(b, 3, h, w)`` in ``[0, 1]`` to the model's normalised pixel input (:func:`preprocess_images`)."""
        return preprocess_images(images, self.image_settings)

    @abc.abstractmethod
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image embeddings ``(b, e)`` of preprocessed pixels ``(b, 3, *image_settings.size)``."""

    @abc.abstractmethod
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text embeddings ``(n, e)`` of ``n`` prompts."""

    def extra_repr(self) -> str:
        return self.description


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def _pooled(output: Any) -> torch.Tensor:
    """``get_*_features`` returns a tensor (transformers 4) or an output with ``pooler_output`` (transformers 5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class OpenClipBackend(ClipBackend):
    """An ``open_clip`` model (needs ``open_clip_torch``, hence torchvision: ``pip install rankmoe[clip]``).

    Args:
        model: An ``open_clip`` CLIP model (``encode_image`` / ``encode_text``).
        tokenizer: Its tokenizer (``open_clip.get_tokenizer(model_name)``): a callable mapping a list of strings to
            token ids ``(n, context_length)``.
        image_settings: The input transform; default: the model's own preprocessing config.
        description: How the model is named in messages.
    """

    def __init__(
        self, model: nn.Module, tokenizer: Any, image_settings: ImageSettings | None = None, description: str = ""
    ) -> None:
        super().__init__(description or f"open_clip {type(model).__name__}")
        if not (hasattr(model, "encode_image") and hasattr(model, "encode_text")):
            raise ValueError(f"OpenClipBackend needs an open_clip model (encode_image, encode_text), got {type(model)}")
        self.model = _freeze(model)
        self.tokenizer = tokenizer
        if image_settings is None:
            import open_clip

            cfg = open_clip.get_model_preprocess_cfg(model)
            size = cfg.get("size", 224)
            image_settings = ImageSettings(
                size=(size, size) if isinstance(size, int) else tuple(size),
                mean=tuple(cfg.get("mean", OPENAI_CLIP_MEAN)),
                std=tuple(cfg.get("std", OPENAI_CLIP_STD)),
                resize_mode=cfg.get("resize_mode", "shortest"),
                interpolation="bilinear" if cfg.get("interpolation") == "bilinear" else "bicubic",
                fill=float(cfg.get("fill_color", 0)) / 255.0,
            )
        self.image_settings = image_settings

    @classmethod
    def from_pretrained(
        cls,
        model_name: str,
        pretrained: str | os.PathLike[str] | None = None,
        *,
        device: str | torch.device | None = None,
        precision: str = "fp32",
        **kwargs: Any,
    ) -> OpenClipBackend:
        """Build ``model_name`` with ``open_clip`` and load ``pretrained`` weights.

        Args:
            model_name: An ``open_clip`` architecture (``"ViT-B-32"``, ``"RN50"``, a name added with
                ``open_clip.add_model_config``) or ``"local-dir:/path"`` (a folder with ``open_clip_config.json``
                and weights).
            pretrained: A local checkpoint file (``.../open_clip_pytorch_model.bin``, ``.safetensors``, ``.pt``),
                an ``open_clip`` tag (``"laion2b_s34b_b79k"``; downloads unless cached), or ``None`` (random
                weights: tests only).
            device: Where the model lives (default: CPU).
            precision: ``open_clip`` precision (``"fp32"``, ``"fp16"``, ``"bf16"``).
            **kwargs: Passed to ``open_clip.create_model_and_transforms``.

        Raises:
            ValueError: For a folder (transformers, sentence-transformers or open_clip) passed as ``pretrained``,
                an unknown architecture or a checkpoint that does not fit the architecture.
            FileNotFoundError: For a checkpoint path that does not exist.
        """
        import open_clip

        pretrained = None if pretrained is None else os.fspath(pretrained)
        check_open_clip_inputs(model_name, pretrained, open_clip)
        try:
            model, _, _ = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained, device=device or "cpu", precision=precision, **kwargs
            )
        except RuntimeError as error:
            if "state_dict" in str(error) and pretrained is not None:
                raise ValueError(
                    f"the checkpoint {pretrained!r} does not fit open_clip model {model_name!r} "
                    f"({str(error)[:200]}...); pass the model_name it was trained with, or for a transformers CLIP "
                    "checkpoint (keys text_model.*, vision_model.*) load its folder with "
                    "TransformersClipBackend.from_pretrained"
                ) from error
            raise
        tokenizer = open_clip.get_tokenizer(model_name)
        return cls(model, tokenizer, description=f"open_clip {model_name!r} (pretrained={pretrained!r})")

    @property
    def logit_scale(self) -> float | None:
        return _trained_logit_scale(self.model)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        weight = _first_parameter(self.model)
        return self.model.encode_image(pixels.to(device=weight.device, dtype=weight.dtype))

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts))
        return self.model.encode_text(tokens.to(_first_parameter(self.model).device))


class TransformersClipBackend(ClipBackend):
    """A transformers CLIP-style model (``CLIPModel``; others with ``get_image_features`` / ``get_text_features``).

    Args:
        model: The model.
        tokenizer: Its tokenizer (``CLIPTokenizer``).
        image_settings: The input transform; default: from ``image_processor``, else the model's image size with
            OpenAI CLIP's mean/std, bicubic shortest-side resize and center crop.
        image_processor: A ``CLIPImageProcessor`` whose size, crop, mean and std are used (not called).
        description: How the model is named in messages.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        image_settings: ImageSettings | None = None,
        image_processor: Any = None,
        description: str = "",
    ) -> None:
        super().__init__(description or f"transformers {type(model).__name__}")
        if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
            raise ValueError(
                f"{self.description} is not a CLIP-style model: {type(model).__name__} has no get_image_features / "
                "get_text_features (a text-only or image-only checkpoint cannot score images against prompts)"
            )
        self.model = _freeze(model)
        self.tokenizer = tokenizer
        if image_settings is None:
            vision = getattr(model.config, "vision_config", model.config)
            image_settings = ImageSettings.from_image_processor(image_processor, vision.image_size)
        self.image_settings = image_settings

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        local_files_only: bool | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> TransformersClipBackend:
        """Load model, tokenizer and image-processor settings from a local folder or a hub id.

        Args:
            name_or_path: A folder written by ``save_pretrained`` (``config.json``, weights, tokenizer files,
                ``preprocessor_config.json``) or a hub id such as ``"openai/clip-vit-base-patch32"``.
            local_files_only: Passed to ``from_pretrained``; default ``True`` for local folders.
            device: Where the model lives (default: CPU).
            dtype: Model dtype (default: as saved / float32).

        Raises:
            ValueError: For a file, an open_clip or sentence-transformers folder, a folder without tokenizer
                files, or a model without image or text encoder.
        """
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        source = os.fspath(name_or_path)
        local = check_transformers_path(source)
        local_only = local if local_files_only is None else local_files_only
        model = AutoModel.from_pretrained(source, local_files_only=local_only)
        model = model.to(dtype) if dtype is not None else model
        hint = "save one next to the weights, e.g. with rankmoe.conditioning.clip_assets.build_clip_tokenizer(save_to=)"
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        except (OSError, ValueError, TypeError) as error:
            raise ValueError(f"no tokenizer found in {source!r} ({error}); {hint}") from error
        if len(tokenizer) < 10:  # transformers 5 builds an empty-vocabulary tokenizer when the files are missing
            raise ValueError(f"{source!r} has no tokenizer files (vocabulary of {len(tokenizer)} tokens); {hint}")
        processor = None
        if not local or (Path(source) / "preprocessor_config.json").is_file():
            try:
                processor = AutoImageProcessor.from_pretrained(source, local_files_only=local_only)
            except (OSError, ValueError):
                processor = None
        backend = cls(model, tokenizer, image_processor=processor, description=f"transformers CLIP {source!r}")
        return backend.to(device) if device is not None else backend

    @property
    def logit_scale(self) -> float | None:
        return _trained_logit_scale(self.model)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        weight = _first_parameter(self.model)
        return _pooled(self.model.get_image_features(pixel_values=pixels.to(device=weight.device, dtype=weight.dtype)))

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt")
        device = _first_parameter(self.model).device
        return _pooled(self.model.get_text_features(**{k: v.to(device) for k, v in tokens.items()}))


class SentenceTransformersClipBackend(ClipBackend):
    """A sentence-transformers CLIP model (``"clip-ViT-B-32"`` style), optionally with a separate text model.

    Args:
        model: A ``SentenceTransformer`` with an image modality (a CLIP model).
        text_model: A ``SentenceTransformer`` that encodes the prompts instead, in ``model``'s space (for example
            a multilingual text model distilled into CLIP's space); default ``model``.
        image_settings: The input transform; default: from the model's image processor.
        description: How the model is named in messages.

    Raises:
        ValueError: If ``model`` has no image encoder, ``text_model`` no text encoder, or their embedding widths
            differ.
    """

    def __init__(
        self,
        model: nn.Module,
        text_model: nn.Module | None = None,
        image_settings: ImageSettings | None = None,
        description: str = "",
    ) -> None:
        super().__init__(description or f"sentence-transformers {type(model).__name__}")
        modalities = list(getattr(model, "modalities", None) or ["text", "image"])
        if "image" not in modalities:
            raise ValueError(
                f"{self.description} has no image encoder (modalities {modalities}); pass a CLIP model such as "
                "'clip-ViT-B-32' and give a text-only model as text_model="
            )
        self.model = _freeze(model)
        self.text_model = None if text_model is None else _freeze(text_model)
        encoder = self.text_model if self.text_model is not None else self.model
        if "text" not in list(getattr(encoder, "modalities", None) or ["text"]):
            raise ValueError(
                f"the text model {type(encoder).__name__} has no text encoder (modalities {encoder.modalities})"
            )
        if self.text_model is not None:
            widths = [_st_width(m) for m in (self.model, self.text_model)]
            if None not in widths and widths[0] != widths[1]:
                raise ValueError(
                    f"mismatched backends: the image model embeds into {widths[0]} dimensions but the text model "
                    f"into {widths[1]}; the text model must be trained into the image model's space"
                )
        if image_settings is None:
            processor = getattr(model[0], "processor", None)
            processor = getattr(processor, "image_processor", processor)
            vision = getattr(getattr(self.hf_model, "config", None), "vision_config", None)
            image_settings = ImageSettings.from_image_processor(processor, getattr(vision, "image_size", 224))
        self.image_settings = image_settings

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        text_model: str | os.PathLike[str] | nn.Module | None = None,
        device: str | torch.device | None = None,
        local_files_only: bool | None = None,
    ) -> SentenceTransformersClipBackend:
        """Load a sentence-transformers CLIP model from a folder (``model.save(...)``, a hub snapshot) or hub id.

        Args:
            name_or_path: Folder or hub id (``"sentence-transformers/clip-ViT-B-32"``).
            text_model: Optional separate text model (path, hub id or ``SentenceTransformer``).
            device: Where the models live (default: CPU).
            local_files_only: Passed to ``SentenceTransformer``; default ``True`` for local folders.
        """
        from sentence_transformers import SentenceTransformer

        def load(source: str | os.PathLike[str]) -> nn.Module:
            local = check_sentence_transformers_path(os.fspath(source))
            only = local if local_files_only is None else local_files_only
            return SentenceTransformer(os.fspath(source), device=str(device or "cpu"), local_files_only=only)

        text = load(text_model) if isinstance(text_model, (str, os.PathLike)) else text_model
        return cls(load(name_or_path), text, description=f"sentence-transformers {os.fspath(name_or_path)!r}")

    @property
    def hf_model(self) -> nn.Module | None:
        """The transformers model inside the sentence-transformers CLIP module (``None`` if there is none)."""
        first = self.model[0]
        return getattr(first, "model", None) or getattr(first, "auto_model", None)

    @property
    def logit_scale(self) -> float | None:
        return _trained_logit_scale(self.hf_model)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        weight = _first_parameter(self.model)
        pixels = pixels.to(device=weight.device, dtype=weight.dtype)
        # "image_text_info" keeps the legacy CLIPModel module of sentence-transformers < 5 working
        features = {"pixel_values": pixels, "modality": "image", "image_text_info": [0] * pixels.shape[0]}
        return self.model(features)["sentence_embedding"]

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        encoder = self.text_model if self.text_model is not None else self.model
        return encoder.encode(list(prompts), convert_to_tensor=True, show_progress_bar=False)


def _st_width(model: Any) -> int | None:
    for name in ("get_embedding_dimension", "get_sentence_embedding_dimension"):
        method = getattr(model, name, None)
        if method is not None:
            try:
                return method()
            except (AttributeError, ValueError, TypeError):
                return None
    return None


__all__ = [
    "ClipBackend",
    "OpenClipBackend",
    "SentenceTransformersClipBackend",
    "TransformersClipBackend",
]

