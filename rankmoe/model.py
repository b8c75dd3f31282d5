"""`RankMoEModel`: the PEFT tuner that injects RankMoE layers into a model."""

from __future__ import annotations

import re
from contextlib import contextmanager
from functools import partial
from typing import Any

from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from rankmoe import peft_compat
from rankmoe.config import RankMoEConfig
from rankmoe.layer import RankMoELayer, create_rankmoe_module


def _adapter_names_pre_forward_hook(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], adapter_names: list[str]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


class RankMoEModel(BaseTuner):
    """PEFT tuner for :class:`~rankmoe.RankMoEConfig` (used through ``get_peft_model`` / ``inject_adapter_in_model``).

    Default target modules for known transformers architectures are PEFT's LoRA defaults.

    Args:
        model: The model to adapt.
        peft_config: The adapter's :class:`~rankmoe.RankMoEConfig` (or configs by adapter name, as PEFT passes them).
        adapter_name: Name of the first adapter.
        low_cpu_mem_usage: Create the adapter weights on the meta device (PEFT's option).
        state_dict: Optional state dict used to find the target modules (PEFT's option).
    """

    prefix: str = peft_compat.PREFIX
    tuner_layer_cls = RankMoELayer
    target_module_mapping = peft_compat.target_module_mapping()

    def _create_and_replace(
        self,
        config: RankMoEConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        if isinstance(target, RankMoELayer):
            target.update_layer(adapter_name, config)
            return
        new_module = create_rankmoe_module(target, adapter_name, config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """Checkpoint key of a model key: drop the adapter name after every ``rankmoe_*`` container.

        ``...lin0.rankmoe_A.default`` becomes ``...lin0.rankmoe_A`` and ``...lin0.rankmoe_router.default.proj.weight``
        becomes ``...lin0.rankmoe_router.proj.weight``, so an adapter saved under one name loads under any other.
        """
        pattern = rf"(\.{re.escape(cls.prefix)}[A-Za-z0-9_]+)\.{re.escape(adapter_name)}(?=\.|$)"
        return re.sub(pattern, r"\1", key)

    def _check_new_adapter_config(self, config: RankMoEConfig) -> None:
        super()._check_new_adapter_config(config)
        if config.bias != "none":
            others = [name for name, cfg in self.peft_config.items() if cfg is not config and cfg.bias != "none"]
            if others:
                raise ValueError(
                    f"only one adapter may have bias != 'none'; adapter(s) {others} already train biases"
                )

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        """Route ``adapter_names=[...]`` (one adapter name per sample, ``"__base__"`` for none) to every layer."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        known = set()
        for module in self.modules():
            if isinstance(module, RankMoELayer):
                known |= set(module.rankmoe_A.keys())
        unexpected = {name for name in adapter_names if name != "__base__"} - known
        if unexpected:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unexpected))}")
        handles = []
        for module in self.modules():
            if isinstance(module, RankMoELayer):
                hook = partial(_adapter_names_pre_forward_hook, adapter_names=list(adapter_names))
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
