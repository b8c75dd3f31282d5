"""Stock ``transformers.Trainer`` support: the routing loss added to the training loss, routing statistics logged.

One call, no subclass:

```python
trainer = Trainer(model=peft_model, args=args, train_dataset=data)
rankmoe.integrations.transformers.add_rankmoe_to_trainer(trainer)
trainer.train()
```

What the call changes, on this trainer instance only (``remove()`` undoes all of it):

* ``trainer.compute_loss`` is wrapped. After each **training** forward it adds
  ``rankmoe.aux_loss(model, token_mask=attention_mask).total`` to the loss ``compute_loss`` returns, so every
  loss path of the Trainer is covered (the model's own loss, ``compute_loss_func``, label smoothing, subclasses
  such as TRL's trainers that override ``compute_loss``). Evaluation forwards
  (model in ``eval()`` mode) and forwards without autograd are left alone.
* Gradient accumulation: the Trainer divides the loss of each micro-batch by the number of accumulation
  steps, except when the loss is already normalised over the whole accumulated batch (the model accepts loss
  kwargs and gets ``num_items_in_batch``, or a ``compute_loss_func`` is set, or ``loss_is_scaled_for_ga`` is
  ``True``). The aux loss is divided by the accumulation steps exactly when the Trainer will not do it, so
  each optimizer step sees the **mean** aux loss of its micro-batches, whatever the accumulation.
* A :class:`~transformers.TrainerCallback` runs :func:`rankmoe.update_selection_bias` once per micro-batch,
  **after** its backward (``on_substep_end`` / ``on_pre_optimizer_step``), so that an activation-checkpointing
  recomputation routes with the same bias as the forward it recomputes. It is a no-op for adapters with
  ``selection_bias_update_rate = 0``.
* ``trainer.log`` is wrapped (``log_routing=True``): every training log (the one that carries ``loss``) gets
  the means since the previous log of ``rankmoe/aux_loss``, ``rankmoe/balance_loss``, ``rankmoe/z_loss`` and
  ``rankmoe/mean_active_ranks``, and ``rankmoe/dead_slots``, the number of slots (over all routed layers) that
  no token selected since the previous log. Adding them before ``Trainer.log`` runs puts them in
  ``trainer.state.log_history`` and in every reporter (TensorBoard, W&B, ...); a callback's ``on_log`` would
  come too late for both.

Axis legend: ``b`` batch, ``n`` tokens.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from rankmoe.condition import rankmoe_layers
from rankmoe.losses import aux_loss, update_selection_bias, weighted_mean
from rankmoe.losses.collect import decision_weights, routed_records
from rankmoe.routers.selection import active_ranks
from rankmoe.tracker import RoutingTracker

__all__ = ["LOG_KEYS", "RankMoETrainerHandle", "add_rankmoe_to_trainer", "aux_loss_scale"]

#: Keys :func:`add_rankmoe_to_trainer` adds to each training log (``balance_loss`` only when a balance loss is
#: configured).
LOG_KEYS = (
    "rankmoe/aux_loss", "rankmoe/balance_loss", "rankmoe/z_loss", "rankmoe/mean_active_ranks", "rankmoe/dead_slots"
)

_WRAPPED = ("compute_loss", "log")


def add_rankmoe_to_trainer(
    trainer: Trainer, *, log_routing: bool = True, use_attention_mask: bool = True
) -> RankMoETrainerHandle:
    """Make a stock ``transformers.Trainer`` (or a subclass, e.g. from TRL) train RankMoE adapters properly.

    After this call every training micro-batch adds ``rankmoe.aux_loss(model).total`` (the configured balance
    loss and z-loss of the routers) to the training loss, weighted once per optimizer step under gradient
    accumulation; runs :func:`rankmoe.update_selection_bias` after each micro-batch's backward; and, with
    ``log_routing``, adds the means since the previous log of ``rankmoe/aux_loss``, ``rankmoe/balance_loss``,
    ``rankmoe/z_loss`` and ``rankmoe/mean_active_ranks`` (over routed layers), and the number of slots no token
    selected since the previous log, ``rankmoe/dead_slots``, to each training log. The logged
    ``loss`` then includes the aux loss. Evaluation is unchanged (``eval_loss`` is the task loss alone).

    Only this trainer instance changes (its ``compute_loss`` and ``log`` are wrapped, one callback is added);
    the model is not touched. Call it before ``trainer.train()``.

    Args:
        trainer: A ``transformers.Trainer`` whose ``model`` carries RankMoE adapters (a ``PeftModel`` from
            ``get_peft_model``, or any model after ``inject_adapter_in_model``).
        log_routing: Add the routing means to the training logs.
        use_attention_mask: Leave padding out of the routing losses, the bias update and the logged statistics,
            using the batch's 2-D ``attention_mask`` ``(b, n)`` (other shapes, or no mask, count every token).
            Set it to ``False`` for models whose routed layers see sequences of another length than the
            attention mask (encoder-decoder cross attention): :func:`rankmoe.aux_loss` raises ``ValueError``
            on such a mismatch.

    Returns:
        A :class:`RankMoETrainerHandle`; ``handle.remove()`` restores the plain trainer.

    Raises:
        TypeError: If ``trainer`` is not a ``transformers.Trainer``.
        ValueError: If the trainer's model has no RankMoE layer, or RankMoE was already added to this trainer.

    Example:
        >>> import torch, rankmoe
        >>> from peft import get_peft_model
        >>> from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
        >>> from rankmoe.integrations.transformers import add_rankmoe_to_trainer
        >>> base = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
        >>> cfg = rankmoe.RankMoEConfig(r=4, num_shared_ranks=1, top_k=1, target_modules=["q_proj"],
        ...                             balance_loss="switch", balance_loss_weight=0.01, task_type="CAUSAL_LM")
        >>> data = [{"input_ids": torch.arange(8), "labels": torch.arange(8)}] * 2
        >>> args = TrainingArguments(output_dir="out", max_steps=1, logging_steps=1, report_to=[], use_cpu=True,
        ...                          save_strategy="no", per_device_train_batch_size=2, disable_tqdm=True)
        >>> trainer = Trainer(model=get_peft_model(base, cfg), args=args, train_dataset=data)
        >>> handle = add_rankmoe_to_trainer(trainer)
        >>> _ = trainer.train()  # doctest: +ELLIPSIS
        {'loss': ..., 'rankmoe/aux_loss': ...}
        ...
        >>> log = trainer.state.log_history[0]
        >>> log["rankmoe/aux_loss"] > 0
        True
        >>> handle.remove()
    """
    if not isinstance(trainer, Trainer):
        raise TypeError(f"trainer must be a transformers.Trainer (or a subclass), got {type(trainer).__name__}")
    for name in _WRAPPED:
        existing = getattr(getattr(trainer, name, None), "_rankmoe_handle", None)
        if existing is not None and existing.active:
            raise ValueError(
                f"RankMoE was already added to this trainer ({existing!r}); call handle.remove() before adding it again"
            )
    rankmoe_layers(trainer.model)  # ValueError without RankMoE layers
    if getattr(trainer.args, "n_gpu", 1) > 1:
        warnings.warn(
            "add_rankmoe_to_trainer: the Trainer runs torch.nn.DataParallel over several GPUs in one process; the "
            "routing records of the replicas are not all seen, so the aux loss covers part of the batch. Launch one "
            "process per GPU instead (torchrun / accelerate launch).",
            stacklevel=2,
        )
    handle = RankMoETrainerHandle(trainer, log_routing=log_routing, use_attention_mask=use_attention_mask)
    handle._install()
    return handle


def aux_loss_scale(trainer: Trainer, num_items_in_batch: torch.Tensor | int | None) -> float:
    """Factor for the aux loss of one micro-batch so that it counts once per optimizer step.

    Mirrors ``Trainer.training_step`` of transformers 5.24: the Trainer divides the returned loss by
    ``current_gradient_accumulation_steps`` unless it counts as already scaled for gradient accumulation
    (``trainer.loss_is_scaled_for_ga`` when set; else when the model accepts loss kwargs and
    ``num_items_in_batch`` is given, or a ``compute_loss_func`` is set). In the scaled case the aux loss must be
    divided here instead. Earlier releases apply the same rule without ``loss_is_scaled_for_ga`` (those without
    ``current_gradient_accumulation_steps`` divide by ``args.gradient_accumulation_steps``, as this function
    then does); only 5.24 is tested.

    Args:
        trainer: The trainer whose ``training_step`` will receive the loss.
        num_items_in_batch: The value ``compute_loss`` received (``None`` when the Trainer does not count items).

    Returns:
        ``1.0`` when the Trainer divides the loss itself, else ``1 / accumulation steps`` of the current step.
    """
    scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
    if scaled is None:
        scaled = (bool(getattr(trainer, "model_accepts_loss_kwargs", False)) and num_items_in_batch is not None) or (
            getattr(trainer, "compute_loss_func", None) is not None
        )
    if not scaled:
        return 1.0
    steps = getattr(trainer, "current_gradient_accumulation_steps", None) or trainer.args.gradient_accumulation_steps
    return 1.0 / max(int(steps), 1)


class _SelectionBiasCallback(TrainerCallback):
    """Runs the pending selection-bias step of the handle after each micro-batch's backward."""

    def __init__(self, handle: RankMoETrainerHandle) -> None:
        self.handle = handle

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.handle._apply_selection_bias()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.handle._apply_selection_bias()


class RankMoETrainerHandle:
    """What :func:`add_rankmoe_to_trainer` installed on one trainer; :meth:`remove` takes it off again.

    Made by :func:`add_rankmoe_to_trainer`, not constructed directly.

    Also a context manager: ``with add_rankmoe_to_trainer(trainer): trainer.train()`` removes it on exit.

    Attributes:
        trainer: The trainer.
        log_routing: Whether routing means are added to the training logs.
        use_attention_mask: Whether the batch's 2-D ``attention_mask`` masks padding out of the routing losses,
            the bias update and the logged statistics.
        callback: The callback running :func:`rankmoe.update_selection_bias` after each micro-batch's backward.
        last_aux: The :class:`rankmoe.AuxLoss` of the last training micro-batch (before scaling for gradient
            accumulation), ``None`` before the first one.
        last_scale: The factor the last aux loss was multiplied by before it was added (see
            :func:`aux_loss_scale`).
    """

    def __init__(self, trainer: Trainer, log_routing: bool, use_attention_mask: bool) -> None:
        self.trainer = trainer
        self.log_routing = log_routing
        self.use_attention_mask = use_attention_mask
        self.callback = _SelectionBiasCallback(self)
        self.last_aux = None
        self.last_scale = 1.0
        self._active = False
        self._previous: dict[str, Any] = {}
        self._wrappers: dict[str, Callable[..., Any]] = {}
        self._pending_bias: tuple[nn.Module, torch.Tensor | None] | None = None
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._tracker = RoutingTracker(trainer.model)

    # ------------------------------------------------------------------ install / remove
    def _install(self) -> None:
        trainer = self.trainer
        for name in _WRAPPED:
            if name in vars(trainer):
                self._previous[name] = vars(trainer)[name]
            original = getattr(trainer, name)
            wrapper = functools.wraps(original)(functools.partial(getattr(self, f"_{name}"), original))
            wrapper._rankmoe_handle = self  # type: ignore[attr-defined]
            self._wrappers[name] = wrapper
            setattr(trainer, name, wrapper)
        trainer.add_callback(self.callback)
        self._active = True

    @property
    def active(self) -> bool:
        """``True`` until :meth:`remove` is called."""
        return self._active

    def remove(self) -> None:
        """Restore the trainer's plain behaviour: no aux loss, no bias updates, no routing logs.

        Safe to call twice. If something wrapped ``compute_loss`` or ``log`` again after this handle, that
        wrapper stays in place and this handle's layer inside it just passes calls through.
        """
        if not self._active:
            return
        self._active = False
        trainer = self.trainer
        for name, wrapper in self._wrappers.items():
            if vars(trainer).get(name) is wrapper:
                if name in self._previous:
                    setattr(trainer, name, self._previous[name])
                else:
                    delattr(trainer, name)
        trainer.remove_callback(self.callback)
        self._pending_bias = None
        self._reset_sums()

    def __enter__(self) -> RankMoETrainerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (
            f"RankMoETrainerHandle(trainer={type(self.trainer).__name__}, active={self._active}, "
            f"log_routing={self.log_routing}, use_attention_mask={self.use_attention_mask})"
        )

    # ------------------------------------------------------------------ wrapped methods
    def _token_mask(self, inputs: Any) -> torch.Tensor | None:
        if not self.use_attention_mask or not hasattr(inputs, "get"):
            return None
        mask = inputs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            return mask.detach()
        return None

    def _compute_loss(self, original: Callable[..., Any], model: nn.Module, inputs: Any, *args: Any, **kwargs: Any):
        if not self._active:
            return original(model, inputs, *args, **kwargs)
        training = model.training and torch.is_grad_enabled()
        mask = self._token_mask(inputs) if training else None  # before compute_loss pops labels from inputs
        result = original(model, inputs, *args, **kwargs)
        if not training:
            return result
        num_items_in_batch = kwargs.get("num_items_in_batch", args[1] if len(args) > 1 else None)
        losses = aux_loss(model, token_mask=mask)
        self._pending_bias = (model, mask)
        if losses.num_layers == 0:
            return result
        scale = aux_loss_scale(self.trainer, num_items_in_batch)
        self.last_aux, self.last_scale = losses, scale
        if self.log_routing:
            self._accumulate(model, losses, mask)
        if isinstance(result, tuple):
            loss, *rest = result
            return (loss + scale * losses.total.to(loss.device), *rest)
        return result + scale * losses.total.to(result.device)

    def _log(self, original: Callable[..., Any], logs: dict[str, float], *args: Any, **kwargs: Any):
        if self._active and self.log_routing and "loss" in logs and self._counts:
            logs.update(self._means())
        return original(logs, *args, **kwargs)

    def _apply_selection_bias(self) -> None:
        if self._pending_bias is None:
            return
        model, mask = self._pending_bias
        self._pending_bias = None
        update_selection_bias(model, token_mask=mask)

    # ------------------------------------------------------------------ logged means
    def _reset_sums(self) -> None:
        self._sums, self._counts = {}, {}
        self._tracker.reset()

    def _add(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self._sums[key] = self._sums[key] + value.to(self._sums[key].device) if key in self._sums else value
        self._counts[key] = self._counts.get(key, 0) + 1

    @torch.no_grad()
    def _accumulate(self, model: nn.Module, losses: Any, mask: torch.Tensor | None) -> None:
        self._add("rankmoe/aux_loss", losses.total)
        for term, value in losses.terms.items():
            self._add(f"rankmoe/{term}_loss", value)
        ranks = [
            weighted_mean(active_ranks(record.flat("top_indices"), record.layout), decision_weights(record, mask, name))
            for name, _, _, record, _ in routed_records(model)
        ]
        if ranks:
            self._add("rankmoe/mean_active_ranks", torch.stack([r.to(ranks[0].device) for r in ranks]).mean())
        self._tracker.update(token_mask=mask)

    def _means(self) -> dict[str, float]:
        keys = sorted(self._sums)
        means = torch.stack([self._sums[key] / self._counts[key] for key in keys])
        loads = list(self._tracker.slot_load().values())
        slot_load = torch.cat(loads) if loads else torch.zeros(0)
        accelerator = getattr(self.trainer, "accelerator", None)
        if accelerator is not None and getattr(accelerator, "num_processes", 1) > 1:
            means = accelerator.reduce(means.to(accelerator.device), reduction="mean")
            slot_load = accelerator.reduce(slot_load.to(accelerator.device), reduction="sum")
        self._reset_sums()
        logs = dict(zip(keys, means.cpu().tolist(), strict=True))
        if loads:  # a slot is dead when no process selected it since the previous log
            logs["rankmoe/dead_slots"] = float((slot_load == 0).sum())
        return logs
