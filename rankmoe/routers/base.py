"""Router interface: slot layout, layer geometry, routing inputs and the router base class.

Axis legend used throughout: ``b`` batch, ``n`` tokens, ``d`` features, ``r`` ranks, ``s`` routed slots
(real routed experts followed by zero-expert slots), ``c`` condition width.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

RoutingLevel = Literal["token", "sample"]
LayerKind = Literal["linear", "conv"]


@dataclass(frozen=True)
class SlotLayout:
    """How the ``r`` ranks of one adapter are split into shared ranks, routed experts and zero slots.

    Ranks ``0 .. num_shared_ranks - 1`` are shared (gate 1, always on). The remaining ranks form
    ``num_experts`` routed experts of ``expert_rank`` consecutive ranks each. The router scores
    ``num_slots = num_experts + num_zero_experts`` slots; slot ``i < num_experts`` is real expert ``i``,
    the slots after them are zero experts that contribute nothing.

    Args:
        r: Total number of ranks.
        num_shared_ranks: Always-on ranks at the first positions.
        expert_rank: Ranks per routed expert.
        top_k: Slots selected per token / sample.
        num_zero_experts: Zero-expert slots competing with the real experts.
    """

    r: int
    num_shared_ranks: int = 0
    expert_rank: int = 1
    top_k: int = 0
    num_zero_experts: int = 0

    @property
    def num_routed_ranks(self) -> int:
        """Ranks that belong to routed experts (``r - num_shared_ranks``)."""
        return self.r - self.num_shared_ranks

    @property
    def num_experts(self) -> int:
        """Real routed experts."""
        return self.num_routed_ranks // self.expert_rank

    @property
    def num_slots(self) -> int:
        """Slots the router scores: real experts plus zero slots."""
        return self.num_experts + self.num_zero_experts

    @property
    def gathered_rank(self) -> int:
        """Ranks a fixed-k gather reads per routing decision: ``num_shared_ranks + expert_rank * top_k``."""
        return self.num_shared_ranks + self.expert_rank * self.top_k

    @property
    def is_routed(self) -> bool:
        """Whether a router is needed at all (False when every rank is shared)."""
        return self.num_slots > 0

    @classmethod
    def from_config(cls, config: Any) -> SlotLayout:
        """Build the layout from a :class:`~rankmoe.RankMoEConfig` (or any object with the same fields)."""
        return cls(
            r=config.r,
            num_shared_ranks=config.num_shared_ranks,
            expert_rank=config.expert_rank,
            top_k=config.top_k,
            num_zero_experts=config.num_zero_experts,
        )


@dataclass(frozen=True)
class LayerSpec:
    """Geometry of the adapted base layer, as routers need it.

    Args:
        kind: ``"linear"`` (``nn.Linear``, transformers ``Conv1D``) or ``"conv"`` (``nn.Conv1d`` / ``nn.Conv2d``).
        in_features: Input features (input channels for convolutions).
        conv_dim: Spatial dimensions of a convolution (1 or 2); 0 for linear layers.
        kernel_size: Convolution kernel size per spatial dimension.
        stride: Convolution stride per spatial dimension.
        padding: Convolution padding per spatial dimension (or a string such as ``"same"``).
        dilation: Convolution dilation per spatial dimension.
        padding_mode: Convolution padding mode (``"zeros"``, ``"reflect"``, ``"replicate"``, ``"circular"``).
    """

    kind: LayerKind
    in_features: int
    conv_dim: int = 0
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    padding_mode: str = "zeros"

    @classmethod
    def from_conv(cls, conv: nn.Conv1d | nn.Conv2d) -> LayerSpec:
        """Describe a ``nn.Conv1d`` / ``nn.Conv2d``."""
        return cls(
            kind="conv",
            in_features=conv.in_channels,
            conv_dim=len(conv.kernel_size),
            kernel_size=tuple(conv.kernel_size),
            stride=tuple(conv.stride),
            padding=conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
            dilation=tuple(conv.dilation),
            padding_mode=conv.padding_mode,
        )


@dataclass
class RoutingInputs:
    """What a router may look at for one forward call of one layer.

    Args:
        x: The layer input: ``(..., d)`` for linear layers, ``(b, d, *spatial)`` for convolutions.
        batch_size: Samples in ``x`` (its first dimension; 1 for an unbatched input).
        condition: External per-sample condition ``(b, c)`` set with :func:`rankmoe.condition`, or ``None``.
        severity: Per-sample severity ``(b,)`` in ``[0, 1]``, or ``None``.
    """

    x: torch.Tensor
    batch_size: int
    condition: torch.Tensor | None = None
    severity: torch.Tensor | None = None


class Router(nn.Module, metaclass=abc.ABCMeta):
    """Base class of routers: map :class:`RoutingInputs` to slot logits.

    Subclasses set ``level`` and implement :meth:`forward`. A ``"sample"`` router returns logits
    ``(b, s)``; a ``"token"`` router returns logits with the slots last and the token axes of the
    layer *output*: ``(..., s)`` for linear layers and ``(b, *spatial_out, s)`` for convolutions.
    Top-k selection and gate construction are shared (see :mod:`rankmoe.routers.selection`) so that
    every router obeys the same slot semantics.

    Every router also owns a ``selection_bias`` buffer ``(s,)`` (zeros unless bias balancing is enabled with
    ``RankMoEConfig(selection_bias_update_rate=...)``). It is added to the logits for top-k *selection only*, never
    to the gate values, and it is saved and loaded with the adapter.

    Args:
        layout: Slot layout of the adapter.
        spec: Geometry of the adapted layer.
    """

    level: ClassVar[RoutingLevel] = "token"
    """``"token"``: one decision per token (logits keep the token axes); ``"sample"``: one per sample ``(b, s)``."""
    requires_condition: ClassVar[bool] = False
    """Whether the router reads ``RoutingInputs.condition``; the layer then refuses to run without one."""
    is_static: ClassVar[bool] = False
    """Whether the logits never depend on the input (then :meth:`fixed_logits` returns them and merging works)."""
    reads_input: ClassVar[bool] = True
    """Whether the logits may depend on ``RoutingInputs.x``. ``False`` (logits from the condition and the router's
    own parameters only) lets a layer at inference reuse one routing for repeated calls under the same condition
    tensor, e.g. the steps of a diffusion sampler; leave ``True`` when in doubt."""

    def __init__(self, layout: SlotLayout, spec: LayerSpec) -> None:
        super().__init__()
        self.layout = layout
        self.spec = spec
        self.register_buffer("selection_bias", torch.zeros(layout.num_slots))

    @classmethod
    def check_kwargs(cls, kwargs: dict[str, Any], layout: SlotLayout) -> None:
        """Validate ``router_kwargs`` before any layer is built.

        Raises:
            ValueError: Naming ``router_kwargs``, the offending key and value.
        """
        import inspect

        params = inspect.signature(cls.__init__).parameters
        accepted = [p for p in params if p not in ("self", "layout", "spec")]
        has_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown and not has_var_kw:
            raise ValueError(
                f"router_kwargs has unknown key(s) {unknown} for router {cls.__name__}; accepted keys: {accepted}"
            )

    def reset_parameters(self, init_weights: bool = True) -> None:
        """(Re)initialise the router. The default leaves parameters as constructed."""

    def fixed_logits(self) -> torch.Tensor:
        """Slot logits ``(s,)`` of a static router (``is_static = True``).

        Raises:
            ValueError: For routers whose logits depend on the input.
        """
        raise ValueError(f"{type(self).__name__} routes per input; it has no fixed logits")

    @abc.abstractmethod
    def forward(self, inputs: RoutingInputs) -> torch.Tensor:
        """Return slot logits for ``inputs`` (see the class docstring for shapes)."""
