"""`RankMoEConfig`: the PEFT configuration of a RankMoE adapter."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from peft.config import PeftConfig

from rankmoe.dispatch import EXECUTION_PATHS
from rankmoe.losses.registry import BALANCE_LOSSES
from rankmoe.routers.base import SlotLayout
from rankmoe.routers.registry import ROUTERS
from rankmoe.utils.validation import (
    check_bool,
    check_int,
    check_json_object,
    check_positive_float,
    check_probability,
)


@dataclass
class RankMoEConfig(PeftConfig):
    """Configuration of a RankMoE adapter: a LoRA whose ranks are experts.

    The ``r`` ranks split into ``num_shared_ranks`` always-on ranks (positions ``0 .. m-1``) and
    ``(r - m) / expert_rank`` routed experts of ``expert_rank`` ranks each. The router scores the routed
    experts plus ``num_zero_experts`` zero slots in one softmax and keeps ``top_k`` of them per token (or per
    sample); a selected zero slot contributes nothing, so the number of active ranks varies between
    ``m + expert_rank * max(0, top_k - num_zero_experts)`` and ``m + expert_rank * min(top_k, num_experts)``.
    The layer computes ``y = W x + B (g * (A x))`` where the gate ``g`` (shared 1, routed = router weight,
    unselected 0) carries the
    scaling ``lora_alpha / r``.

    Every field is plain JSON. Impossible combinations raise ``ValueError`` naming the field and value.

    Args:
        r: Total ranks (shared + routed).
        num_shared_ranks: Always-on ranks at fixed positions.
        expert_rank: Ranks per routed expert (1 = every rank is an expert, as in MoR).
        top_k: Slots (real experts or zero slots) selected per token / sample; 0 only when there is nothing to
            route.
        num_zero_experts: Zero-expert slots that compete with the routed experts and compute nothing.
        lora_alpha: Scaling numerator; the update is scaled by ``lora_alpha / r``.
        lora_dropout: Dropout on the adapter input.
        target_modules: Module names (list: exact or suffix match; str: regex) to adapt; ``"all-linear"`` as in
            PEFT; ``None`` uses PEFT's LoRA defaults for known transformers architectures.
        exclude_modules: Module names (list or regex) not to adapt.
        layers_to_transform: Layer indices to adapt (with ``layers_pattern``), as in PEFT.
        layers_pattern: Name of the layer list (for ``layers_to_transform``).
        modules_to_save: Extra modules trained and saved in full.
        init_weights: ``True``: ``A`` Kaiming-uniform and ``B = 0`` (the adapter starts as the identity);
            ``False``: both random (for tests).
        bias: ``"none"`` or ``"all"`` (train every bias of the model).
        router: Registered router name: ``linear`` (per token), ``pooled`` (per sample, pooled input),
            ``condition`` (per sample, external condition; needs ``router_kwargs['condition_dim']``), ``static``
            (fixed) or a name registered with :func:`rankmoe.register_router`.
        router_kwargs: Keyword arguments of the router (plain JSON).
        balance_loss: Registered balance loss (``switch``, ``degradation_aware``, ``z_loss``, or one registered with
            :func:`rankmoe.register_balance_loss`) or ``None``. Applied by :func:`rankmoe.aux_loss`.
        balance_loss_kwargs: Keyword arguments of the balance loss (plain JSON).
        balance_loss_weight: Weight of the balance loss (>= 0).
        z_loss_weight: Weight of the router z-loss (>= 0).
        selection_bias_update_rate: Step ``gamma`` of bias balancing (DeepSeek-V3 style): each call of
            :func:`rankmoe.update_selection_bias` moves a per-slot bias, used for top-k selection only, by
            ``gamma`` toward balanced load. 0 turns it off.
        target_active_ranks: Mean active ranks per routing decision that every layer is steered toward by moving
            its zero slots' selection bias (needs ``selection_bias_update_rate > 0`` and zero slots). ``None``: no
            budget.
        execution_path: How the layer computes the update: ``"auto"`` (default) picks per call by the break-even
            rule of :mod:`rankmoe.dispatch`; ``"dense"`` (all ranks, gate on the r-wide intermediate; the path of
            training and per-token routing), ``"gather"`` (per sample, only the active ranks, a static count) or
            ``"merge"`` (per sample, ``W + B diag(g) A`` is formed and the base layer runs once with it). All
            paths compute the same function; ``"gather"`` and ``"merge"`` need per-sample or static routing.

    Example:
        >>> cfg = RankMoEConfig(r=40, num_shared_ranks=8, top_k=8, num_zero_experts=4, target_modules=["q"])
        >>> (cfg.num_experts, cfg.num_slots)
        (32, 36)
    """

    r: int = field(default=8, metadata={"help": "Total ranks (shared + routed)."})
    num_shared_ranks: int = field(default=2, metadata={"help": "Always-on ranks at the first positions."})
    expert_rank: int = field(default=1, metadata={"help": "Ranks per routed expert."})
    top_k: int = field(default=2, metadata={"help": "Slots selected per token / sample."})
    num_zero_experts: int = field(default=0, metadata={"help": "Zero-expert slots."})
    lora_alpha: float = field(default=8, metadata={"help": "Scaling numerator (scaling = lora_alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or regex to adapt."}
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or regex not to adapt."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Layer indices to adapt."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the layer list, used with layers_to_transform."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules trained and saved in full."}
    )
    init_weights: bool = field(default=True, metadata={"help": "True: B = 0 (identity start)."})
    bias: Literal["none", "all"] = field(default="none", metadata={"help": "'none' or 'all'."})
    router: str = field(default="linear", metadata={"help": "Registered router name."})
    router_kwargs: dict[str, Any] = field(default_factory=dict, metadata={"help": "Router keyword arguments."})
    balance_loss: str | None = field(default=None, metadata={"help": "Registered balance loss name or None."})
    balance_loss_kwargs: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Balance loss keyword arguments."}
    )
    balance_loss_weight: float = field(default=0.0, metadata={"help": "Weight of the balance loss."})
    z_loss_weight: float = field(default=0.0, metadata={"help": "Weight of the router z-loss."})
    selection_bias_update_rate: float = field(
        default=0.0, metadata={"help": "Step of the selection-only bias balancing (0 = off)."}
    )
    target_active_ranks: float | None = field(
        default=None, metadata={"help": "Mean active ranks per layer to steer toward (needs bias balancing)."}
    )

    execution_path: str = field(
        default="auto", metadata={"help": "'auto', 'dense', 'gather' or 'merge' (see rankmoe.dispatch)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        from peft.utils.peft_types import PeftType

        self.peft_type = PeftType.RANKMOE
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        self.validate()

    @property
    def slot_layout(self) -> SlotLayout:
        """The :class:`~rankmoe.routers.SlotLayout` described by this config."""
        return SlotLayout.from_config(self)

    @property
    def num_experts(self) -> int:
        """Real routed experts, ``(r - num_shared_ranks) // expert_rank``."""
        return self.slot_layout.num_experts

    @property
    def num_slots(self) -> int:
        """Slots the router scores: routed experts plus zero slots."""
        return self.slot_layout.num_slots

    def validate(self) -> None:
        """Check every field and their combinations.

        Raises:
            ValueError: Naming the field and the value, and what would be valid.
        """
        check_int("r", self.r, minimum=1)
        check_int("num_shared_ranks", self.num_shared_ranks, minimum=0)
        if self.num_shared_ranks > self.r:
            raise ValueError(f"num_shared_ranks={self.num_shared_ranks} exceeds r={self.r}; use at most r")
        check_int("expert_rank", self.expert_rank, minimum=1)
        routed = self.r - self.num_shared_ranks
        if routed % self.expert_rank:
            raise ValueError(
                f"the {routed} routed ranks (r={self.r} - num_shared_ranks={self.num_shared_ranks}) are not "
                f"divisible by expert_rank={self.expert_rank}"
            )
        check_int("num_zero_experts", self.num_zero_experts, minimum=0)
        check_int("top_k", self.top_k, minimum=0)
        num_slots = routed // self.expert_rank + self.num_zero_experts
        if num_slots == 0 and self.top_k != 0:
            raise ValueError(
                f"top_k={self.top_k} but there is nothing to route (every rank is shared and num_zero_experts=0); "
                "set top_k=0"
            )
        if num_slots > 0 and not 1 <= self.top_k <= num_slots:
            raise ValueError(
                f"top_k={self.top_k} must be between 1 and the {num_slots} routed slots "
                f"({routed // self.expert_rank} experts + num_zero_experts={self.num_zero_experts})"
            )
        check_positive_float("lora_alpha", self.lora_alpha)
        check_probability("lora_dropout", self.lora_dropout)
        check_bool("init_weights", self.init_weights)
        if self.bias not in ("none", "all"):
            raise ValueError(f"bias must be 'none' or 'all', got {self.bias!r}")
        self._validate_targets()
        self._validate_router(num_slots)
        self._validate_losses()
        self._validate_bias_balancing()
        self._validate_execution_path()

    def _validate_execution_path(self) -> None:
        path = self.execution_path
        if not isinstance(path, str) or path not in EXECUTION_PATHS:
            raise ValueError(f"execution_path={path!r} is not one of {list(EXECUTION_PATHS)}")
        if path in ("gather", "merge") and self.slot_layout.is_routed:
            router = ROUTERS.get(self.router)
            if router.level == "token" and not router.is_static:
                raise ValueError(
                    f"execution_path={path!r} needs one gate set per sample, but router={self.router!r} routes per "
                    "token; use execution_path='dense' or 'auto', or a per-sample router ('pooled', 'condition')"
                )

    def _validate_targets(self) -> None:
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is None or isinstance(value, str):
                continue
            if not isinstance(value, (set, list, tuple)) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{name} must be None, a regex string or a list of strings, got {value!r}")
        if self.modules_to_save is not None and (
            not isinstance(self.modules_to_save, (list, tuple))
            or not all(isinstance(v, str) for v in self.modules_to_save)
        ):
            raise ValueError(f"modules_to_save must be None or a list of strings, got {self.modules_to_save!r}")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("layers_to_transform cannot be used when target_modules is a regex string")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(f"layers_pattern={self.layers_pattern!r} needs layers_to_transform as well")

    def _validate_router(self, num_slots: int) -> None:
        if not isinstance(self.router, str):
            raise ValueError(f"router must be a registered router name (str), got {self.router!r}")
        if self.router not in ROUTERS:
            raise ValueError(f"router={self.router!r} is not registered; registered routers: {ROUTERS.names()}")
        check_json_object("router_kwargs", self.router_kwargs)
        if num_slots > 0:
            ROUTERS.get(self.router).check_kwargs(self.router_kwargs, self.slot_layout)

    def _validate_losses(self) -> None:
        if self.balance_loss is not None and (
            not isinstance(self.balance_loss, str) or self.balance_loss not in BALANCE_LOSSES
        ):
            raise ValueError(
                f"balance_loss={self.balance_loss!r} is not registered; use None or one of {BALANCE_LOSSES.names()}"
            )
        check_json_object("balance_loss_kwargs", self.balance_loss_kwargs)
        if self.balance_loss is not None:
            BALANCE_LOSSES.get(self.balance_loss).check_kwargs(self.balance_loss_kwargs)
        check_positive_float("balance_loss_weight", self.balance_loss_weight, allow_zero=True)
        check_positive_float("z_loss_weight", self.z_loss_weight, allow_zero=True)

    def _validate_bias_balancing(self) -> None:
        rate = check_positive_float("selection_bias_update_rate", self.selection_bias_update_rate, allow_zero=True)
        layout = self.slot_layout
        if rate > 0 and (not layout.is_routed or ROUTERS.get(self.router).is_static):
            raise ValueError(
                f"selection_bias_update_rate={rate} needs routed slots and a learned router, but router="
                f"{self.router!r} with {layout.num_slots} routed slots has nothing to balance; set it to 0"
            )
        target = self.target_active_ranks
        if target is None:
            return
        check_positive_float("target_active_ranks", target, allow_zero=True)
        if rate == 0 or layout.num_zero_experts == 0 or layout.num_experts == 0:
            raise ValueError(
                f"target_active_ranks={target} is steered through the zero slots' selection bias: it needs "
                f"selection_bias_update_rate > 0 (got {rate}), num_zero_experts > 0 (got {layout.num_zero_experts}) "
                f"and routed experts (got {layout.num_experts})"
            )
        low = layout.num_shared_ranks + layout.expert_rank * max(0, layout.top_k - layout.num_zero_experts)
        high = layout.num_shared_ranks + layout.expert_rank * min(layout.top_k, layout.num_experts)
        if not low <= target <= high:
            raise ValueError(
                f"target_active_ranks={target} is out of reach: with this layout each routing decision uses between "
                f"{low} and {high} ranks; choose a target in [{low}, {high}]"
            )
