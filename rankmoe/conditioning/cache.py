"""Per-input caching of conditions: a condition is computed once per image (or prompt), not per tile or step.

Axis legend: ``b`` inputs (images or prompts) in a call, ``D`` condition dimensions.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

from rankmoe.conditioning.base import DegradationScores

Inputs = torch.Tensor | str | Sequence[Any]
"""A batch the estimator accepts: a tensor ``(b, ...)``, a prompt, a list of prompts, or any other sequence."""


def content_keys(images: torch.Tensor) -> list[str]:
    """Content hash of each item of a batch: equal keys for bit-identical items of the same shape and dtype.

    The batch is copied to the CPU once (for a GPU tensor that is one device-to-host transfer and a sync) and each
    item's bytes are hashed with SHA-256 (first 128 bits kept); dtype and item shape enter the hash. The cost is linear
    in the bytes: we measured 0.7 ms per MB on one CPU core with SHA instructions (a 512 x 512 RGB float32 image is
    3 MB: about 2 ms), about 2 ms per MB on cores without them, plus the copy to the CPU for a GPU batch. Pass your
    own keys (file names, dataset indices) to skip it.

    Args:
        images: ``(b, ...)`` tensor of any dtype.

    Returns:
        ``b`` hex strings.

    Raises:
        TypeError: If ``images`` is not a tensor.
        ValueError: For a 0-d tensor.

    Example:
        >>> a = torch.zeros(2, 3, 4, 4)
        >>> keys = content_keys(a)
        >>> keys[0] == keys[1], content_keys(a.double())[0] == keys[0]
        (True, False)
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"content_keys needs a tensor (b, ...), got {type(images).__name__}")
    if images.dim() == 0:
        raise ValueError("content_keys needs a batch (b, ...), got a 0-d tensor")
    host = images.detach().to("cpu").contiguous()
    header = f"{host.dtype}|{tuple(host.shape[1:])}|".encode()
    keys = []
    for item in host:
        digest = hashlib.sha256(header)
        digest.update(item.reshape(-1).view(torch.uint8).numpy().data)
        keys.append(digest.hexdigest()[:32])
    return keys


class ConditionCache:
    """An LRU cache in front of a condition source: each input is scored once, later calls reuse its row.

    Wraps any callable ``estimator(batch) -> DegradationScores`` (an image
    :class:`~rankmoe.conditioning.base.DegradationEstimator`, a
    :class:`~rankmoe.conditioning.text.TextAnchorConditioner`) or ``estimator(batch) -> Tensor (b, ...)``. A call
    looks up every input by key, runs the estimator **once, in one batch, on the misses only** (an input repeated
    within a call counts once), stores one row per key and returns all rows in input order.

    Keys: by default the content hash of each tensor item (:func:`content_keys`; costs a device-to-host copy and
    about 0.7 ms per MB) or the prompt itself for strings; pass ``keys`` (file names, dataset indices, any hashable)
    to skip hashing. Other inputs (lists of PIL images, ...) need ``keys``.

    Device and dtype: rows are stored detached, as the estimator returned them; the result of a call on a tensor
    batch is moved to the batch's device and — for a floating batch — cast to its dtype (like a degradation
    estimator's output). Calls on prompts return rows as stored.

    Typical uses:

    - **Denoising steps / epochs**: call ``cache(images, keys=ids)`` at every step; only the first call per image
      runs the estimator.
    - **Tiles**: score the full images once, ``scores = cache(images, keys=ids)``, then give each tile its image's
      row with ``scores[tile_to_image]`` (``DegradationScores`` supports index lists), or, where only an id is at
      hand, ``cache.lookup([image_id] * n_tiles)``. Do not pass tiles as the batch: a miss would score the tile,
      not the image.

    Not thread-safe; statistics count inputs, not calls.

    Attributes:
        estimator: The wrapped condition source.
        capacity: Maximum number of stored rows, or ``None``.
        hits: Inputs served from the cache (repeats within a call and :meth:`lookup` keys included).
        misses: Inputs the estimator computed.

    Args:
        estimator: Callable mapping a batch to ``DegradationScores`` or a tensor with one row per input.
        capacity: Maximum number of stored rows (least recently used are evicted first); ``None`` for no limit.

    Raises:
        TypeError: If ``estimator`` is not callable.
        ValueError: If ``capacity`` is not a positive integer or ``None``.

    Example:
        >>> calls = []
        >>> def estimator(x):
        ...     calls.append(len(x))
        ...     return DegradationScores(x.mean(dim=(1, 2, 3))[:, None], x.amax(dim=(1, 2, 3)), ("mean",))
        >>> cache = ConditionCache(estimator, capacity=100)
        >>> images = torch.rand(4, 3, 8, 8)
        >>> first = cache(images, keys=["a", "b", "c", "d"])
        >>> again = cache(images[[3, 0]], keys=["d", "a"])   # hits only: no estimator call
        >>> calls, cache.hits, cache.misses, torch.equal(again.scores, first.scores[[3, 0]])
        ([4], 2, 4, True)
    """

    def __init__(self, estimator: Callable[[Any], DegradationScores | torch.Tensor], capacity: int | None = 1024):
        if not callable(estimator):
            raise TypeError(f"estimator must be callable (batch -> DegradationScores), got {type(estimator).__name__}")
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1):
            raise ValueError(f"capacity must be a positive integer or None, got {capacity!r}")
        self.estimator = estimator
        self.capacity = capacity
        self._rows: OrderedDict[Hashable, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self._names: tuple[str, ...] | None = None
        self._kind: str | None = None  # "scores" (DegradationScores) or "tensor"
        self.hits = 0
        self.misses = 0

    # ------------------------------------------------------------------------------------------------ inspection

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._rows

    def __repr__(self) -> str:
        return (
            f"ConditionCache(estimator={type(self.estimator).__name__}, capacity={self.capacity}, size={len(self)}, "
            f"hits={self.hits}, misses={self.misses})"
        )

    def clear(self) -> None:
        """Drop every stored row and reset the statistics."""
        self._rows.clear()
        self._names = None
        self._kind = None
        self.hits = 0
        self.misses = 0

    # ------------------------------------------------------------------------------------------------ calls

    def keys_of(self, inputs: Inputs) -> list[Hashable]:
        """Default keys of a batch: content hashes of tensor items, the strings themselves for prompts.

        Raises:
            TypeError: For other inputs (pass ``keys``).
        """
        if isinstance(inputs, torch.Tensor):
            return list(content_keys(inputs))
        if isinstance(inputs, str):
            return [inputs]
        if isinstance(inputs, Sequence) and all(isinstance(item, str) for item in inputs):
            return list(inputs)
        raise TypeError(
            f"no default key for inputs of type {type(inputs).__name__}; pass keys=[...] (one hashable per input)"
        )

    def __call__(self, inputs: Inputs, keys: Sequence[Hashable] | None = None) -> DegradationScores | torch.Tensor:
        """Conditions of a batch, computing only the inputs not seen before.

        Args:
            inputs: The batch the estimator takes: a tensor ``(b, ...)``, a prompt, a list of ``b`` prompts or any
                sequence of ``b`` inputs.
            keys: ``b`` hashable ids (file names, indices); default: :meth:`keys_of`.

        Returns:
            What the estimator returns — ``DegradationScores`` with ``scores`` ``(b, D)`` and ``severity``
            ``(b,)``, or a tensor ``(b, ...)`` — in input order; on the batch's device (and floating dtype) for a
            tensor batch.

        Raises:
            ValueError: For an empty batch, a number of keys different from ``b``, an estimator returning the wrong
                number of rows or different column names than before.
            TypeError: For unhashable keys, inputs without default keys, or an estimator returning something other
                than ``DegradationScores`` or a tensor (or switching between the two).
        """
        if isinstance(inputs, str):
            inputs = [inputs]
        size = _batch_size(inputs)
        if size == 0:
            raise ValueError("the batch is empty; pass at least one input")
        keys = self.keys_of(inputs) if keys is None else list(keys)
        if len(keys) != size:
            raise ValueError(f"got {len(keys)} keys for a batch of {size} inputs; pass one key per input")
        for key in keys:
            if not isinstance(key, Hashable):
                raise TypeError(f"keys must be hashable, got {type(key).__name__} {key!r}")

        rows: list[tuple[torch.Tensor, torch.Tensor | None] | None] = [None] * size
        miss_first: dict[Hashable, int] = {}  # key -> position in the batch of its first occurrence
        for position, key in enumerate(keys):
            if key in self._rows:
                self._rows.move_to_end(key)
                rows[position] = self._rows[key]
                self.hits += 1
            elif key in miss_first:
                self.hits += 1  # a repeat within this call: computed once with its first occurrence
            else:
                miss_first[key] = position
                self.misses += 1

        if miss_first:
            fresh = self._compute([miss_first[key] for key in miss_first], inputs)
            for key, row in zip(miss_first, fresh, strict=True):
                self._rows[key] = row
                self._rows.move_to_end(key)
            computed = dict(zip(miss_first, fresh, strict=True))
            for position, key in enumerate(keys):
                if rows[position] is None:
                    rows[position] = computed[key]
            self._evict()

        device = inputs.device if isinstance(inputs, torch.Tensor) else None
        dtype = inputs.dtype if isinstance(inputs, torch.Tensor) and inputs.is_floating_point() else None
        return self._assemble(rows, device, dtype)  # type: ignore[arg-type]

    def lookup(
        self, keys: Sequence[Hashable], device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> DegradationScores | torch.Tensor:
        """Stored conditions by key, without inputs (for example the image id of each tile).

        Args:
            keys: ``b`` keys already seen by a call.
            device: Device of the result; default: as stored.
            dtype: Dtype of the result; default: as stored.

        Returns:
            ``DegradationScores`` ``(b, D)`` / ``(b,)`` or a tensor ``(b, ...)``, in key order. Every key counts as
            a hit and becomes the most recently used.

        Raises:
            KeyError: Naming the keys that are not stored (never computed, or evicted).
            ValueError: For no keys.
        """
        keys = list(keys)
        if not keys:
            raise ValueError("lookup needs at least one key")
        missing = [key for key in dict.fromkeys(keys) if key not in self._rows]
        if missing:
            raise KeyError(
                f"{len(missing)} key(s) not in the cache (never computed or evicted): {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}; call the cache with the inputs first"
            )
        rows = []
        for key in keys:
            self._rows.move_to_end(key)
            rows.append(self._rows[key])
        self.hits += len(keys)
        return self._assemble(rows, device, dtype)

    # ------------------------------------------------------------------------------------------------ internals

    def _compute(self, positions: list[int], inputs: Inputs) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        if positions == list(range(_batch_size(inputs))):
            batch: Any = inputs  # all new: no gather copy
        elif isinstance(inputs, torch.Tensor):
            batch = inputs[torch.tensor(positions, device=inputs.device)]
        else:
            batch = [inputs[position] for position in positions]
        output = self.estimator(batch)
        if isinstance(output, DegradationScores):
            kind, names, values, severity = "scores", output.names, output.scores, output.severity
        elif isinstance(output, torch.Tensor) and output.dim() >= 1:
            kind, names, values, severity = "tensor", None, output, None
        else:
            raise TypeError(
                f"the estimator must return DegradationScores or a tensor with one row per input, got "
                f"{type(output).__name__}"
            )
        if values.shape[0] != len(positions):
            raise ValueError(
                f"the estimator returned {values.shape[0]} rows for a batch of {len(positions)} inputs; it must "
                "return one row per input"
            )
        if self._kind is not None and kind != self._kind:
            raise TypeError(
                f"the estimator returned a {kind} result, but the cache holds {self._kind} rows; clear() it first"
            )
        if self._names is not None and names != self._names:
            raise ValueError(
                f"the estimator returned columns {list(names or ())}, but the cache holds columns "
                f"{list(self._names)}; clear() it first"
            )
        self._kind, self._names = kind, names
        values = values.detach()
        if severity is None:
            return [(values[index].clone(), None) for index in range(len(positions))]
        severity = severity.detach()
        return [(values[index].clone(), severity[index].clone()) for index in range(len(positions))]

    def _evict(self) -> None:
        if self.capacity is None:
            return
        while len(self._rows) > self.capacity:
            self._rows.popitem(last=False)

    def _assemble(
        self,
        rows: list[tuple[torch.Tensor, torch.Tensor | None]],
        device: str | torch.device | None,
        dtype: torch.dtype | None,
    ) -> DegradationScores | torch.Tensor:
        reference = rows[0][0]
        device = reference.device if device is None else device
        values = torch.stack([row[0].to(device) for row in rows])
        if dtype is not None:
            values = values.to(dtype)
        if self._kind == "tensor":
            return values
        severity = torch.stack([row[1].to(device) for row in rows])  # type: ignore[union-attr]
        if dtype is not None:
            severity = severity.to(dtype)
        return DegradationScores(scores=values, severity=severity, names=self._names or ())


def _batch_size(inputs: Inputs) -> int:
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() == 0:
            raise ValueError("inputs must be a batch (b, ...), got a 0-d tensor")
        return int(inputs.shape[0])
    if isinstance(inputs, Sequence):
        return len(inputs)
    raise TypeError(f"inputs must be a tensor (b, ...) or a sequence of inputs, got {type(inputs).__name__}")
