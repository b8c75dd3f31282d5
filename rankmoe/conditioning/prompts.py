"""Text-prompt pairs for CLIP degradation estimation: the default set and validation of user sets.

Each degradation dimension is a pair ``(positive, negative)``: a prompt describing a clean image and one describing
the degradation. The score of an image along the dimension is the probability of the *negative* prompt (see
:class:`~rankmoe.conditioning.clip.ClipDegradationEstimator`), so higher means more degraded.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

DEFAULT_PROMPTS_VERSION = "rankmoe-v1"
"""Version of :data:`DEFAULT_PROMPTS`; changes whenever a prompt string or the order changes."""


@dataclass(frozen=True)
class PromptPair:
    """One degradation dimension: a name and its (positive, negative) prompts.

    Attributes:
        name: Dimension name, the column name of the scores (``"blur"``).
        positive: Prompt of the clean image (``"a sharp photo"``).
        negative: Prompt of the degraded image (``"a blurry photo"``); its probability is the score.
    """

    name: str
    positive: str
    negative: str

    def __post_init__(self) -> None:
        for field in ("name", "positive", "negative"):
            value = getattr(self, field)
            if not isinstance(value, str):
                raise TypeError(f"PromptPair.{field} must be a string, got {type(value).__name__} {value!r}")
            if not value.strip():
                raise ValueError(f"PromptPair.{field} must be a non-empty string, got {value!r} (pair {self.name!r})")
        if self.positive.strip() == self.negative.strip():
            raise ValueError(
                f"prompt pair {self.name!r} has the same positive and negative prompt {self.positive!r}; its score "
                "would always be 0.5"
            )


DEFAULT_PROMPTS: tuple[PromptPair, ...] = (
    PromptPair("quality", "a high quality photo", "a low quality photo"),
    PromptPair("blur", "a sharp photo", "a blurry photo"),
    PromptPair("noise", "a clean photo", "a noisy photo"),
    PromptPair("resolution", "a high resolution photo", "a low resolution photo"),
    PromptPair("edges", "a photo with sharp edges", "a photo with soft edges"),
    PromptPair("detail", "a detailed photo", "a photo lacking detail"),
    PromptPair("compression", "a photo without compression artifacts", "a photo with JPEG compression artifacts"),
)
"""Our default prompt set (version :data:`DEFAULT_PROMPTS_VERSION`): seven dimensions in this column order.

MoR names six of its seven dimensions (overall quality, blur, noise, resolution, edge sharpness, detail) and
publishes none of its prompt strings; the seventh dimension (compression artifacts) and every string here are
ours.
"""

PromptsLike = Mapping[str, tuple[str, str]] | Iterable[PromptPair | tuple[str, str, str]]
"""Prompt pairs as ``{name: (positive, negative)}`` or a sequence of :class:`PromptPair` / ``(name, pos, neg)``."""


def prompt_pairs(prompts: PromptsLike | None = None) -> tuple[PromptPair, ...]:
    """Validate a prompt set and return it as an immutable tuple of :class:`PromptPair`.

    Args:
        prompts: ``{name: (positive, negative)}``, a sequence of :class:`PromptPair` or ``(name, positive,
            negative)`` triples, or ``None`` for :data:`DEFAULT_PROMPTS`.

    Returns:
        The pairs in the given order (dictionary order for a mapping).

    Raises:
        TypeError: For entries that are neither pairs nor triples of strings.
        ValueError: For an empty set, an empty prompt, a pair with equal prompts or duplicate names.

    Example:
        >>> prompt_pairs({"blur": ("a sharp photo", "a blurry photo")})[0].negative
        'a blurry photo'
        >>> len(prompt_pairs())
        7
    """
    if prompts is None:
        return DEFAULT_PROMPTS
    if isinstance(prompts, str):
        raise TypeError(f"prompts must be a mapping or a sequence of prompt pairs, got the string {prompts!r}")
    pairs: list[PromptPair] = []
    if isinstance(prompts, Mapping):
        for name, value in prompts.items():
            if isinstance(value, str) or not isinstance(value, (tuple, list)) or len(value) != 2:
                raise TypeError(
                    f"prompts[{name!r}] must be a (positive, negative) pair of strings, got {value!r}"
                )
            pairs.append(PromptPair(name, value[0], value[1]))
    else:
        for item in prompts:
            if isinstance(item, PromptPair):
                pairs.append(item)
            elif isinstance(item, (tuple, list)) and len(item) == 3:
                pairs.append(PromptPair(*item))
            else:
                raise TypeError(
                    f"each prompt entry must be a PromptPair or a (name, positive, negative) triple, got {item!r}"
                )
    if not pairs:
        raise ValueError("the prompt set is empty; pass at least one (positive, negative) pair, or None for defaults")
    names = [pair.name for pair in pairs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"prompt names must be unique, got duplicates {duplicates} in {names}")
    return tuple(pairs)
