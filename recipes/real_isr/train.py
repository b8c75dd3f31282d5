"""Train MoR (RankMoE routed by degradation) on a one-step Stable Diffusion super-resolution model.

Run it like any ``accelerate`` script::

    accelerate launch recipes/real_isr/train.py --config recipes/real_isr/configs/sd21-mor.yaml \\
        --pretrained_model /models/stable-diffusion-2-1-base --train_data /data/LSDIR /data/ffhq10k.txt \\
        --lpips_vgg16 /weights/vgg16-397923af.pth --lpips_heads /weights/lpips_vgg_v0.1.pth
    python recipes/real_isr/train.py --config recipes/real_isr/configs/tiny.yaml --pretrained_model /tmp/tiny-sd \\
        --train_data /tmp/hr                                      # one CPU process

One optimizer step (per micro-batch under ``gradient_accumulation_steps``):

1. degradation scores of the LR batch (the estimator, frozen) route the generator's RankMoE layers;
2. generator: ``sr, z_hat = G(lr)``; loss = ``l2 + 2 lpips + vsd + gan_weight gan + aux_loss`` (``GeneratorLoss``);
   backward, clip, step; ``rankmoe.update_selection_bias`` when the config asks for bias balancing;
3. VSD regulariser: diffusion loss of its LoRA on ``z_hat.detach()``; backward, step;
4. GAN head (``gan_weight > 0``): hinge loss on HR latents vs ``z_hat``; backward, step.

Every random draw of a step (posterior sample, VSD / GAN timesteps and noise) comes from a generator seeded with
``(seed, micro-step, process)``, and the data order and degradations from ``(seed, epoch, index)``, so a run that
stops and resumes from a checkpoint ends with the same weights as a run that never stopped.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``real_isr`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from real_isr.components import (
    Parts,
    build_optimizers,
    build_parts,
    build_train_loader,
    build_validation_batch,
)
from real_isr.losses import diffusion_loss
from real_isr.metrics import psnr
from real_isr.run_logs import CSVTracker, routing_scalars, save_validation_grid
from real_isr.run_state import load_training_state, prune_checkpoints, resolve_resume, save_training_state
from real_isr.settings import TrainSettings, parse_settings

import rankmoe

__all__ = ["main", "train"]


def _step_generator(seed: int, micro_step: int, process: int, device: torch.device) -> torch.Generator:
    entropy = np.random.SeedSequence([seed, micro_step, process]).generate_state(1)[0]
    return torch.Generator(device=device).manual_seed(int(entropy))


def _recipe(settings: TrainSettings, step: int) -> dict[str, Any]:
    return {"pretrained_model": settings.pretrained_model, "estimator": settings.estimator,
            "prompt": settings.prompt, "timestep": settings.timestep, "scale": settings.scale, "step": step}


def _accelerator(settings: TrainSettings) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration

    # a second run in the same process (tests, notebooks) may use another precision: accelerate keeps its state in
    # process-wide singletons, so start from a clean one (the process group, if any, is kept)
    AcceleratorState._reset_state()
    GradientState._reset_state()

    trackers: list[Any] = []
    logging_dir = Path(settings.output_dir) / "logs"
    if settings.report_to in ("csv", "all"):
        trackers.append(CSVTracker(logging_dir))
    if settings.report_to in ("tensorboard", "all"):
        try:
            import tensorboard  # noqa: F401
        except ImportError as error:
            raise ImportError(
                "report_to='tensorboard' needs the tensorboard package: pip install tensorboard"
            ) from error
        trackers.append("tensorboard")
    # several processes and no GPU (torchrun / accelerate launch on CPUs): accelerate only picks gloo when told cpu
    cpu_group = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(
        cpu=cpu_group,
        mixed_precision=settings.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=settings.gradient_accumulation_steps, sync_with_dataloader=False),
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=settings.output_dir, logging_dir=str(logging_dir)),
    )


def _real_latents(model: Any, hr: torch.Tensor) -> torch.Tensor:
    """HR latents from the *base* VAE encoder (adapters off), posterior mode, for the discriminator."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.vae.modules() if isinstance(m, BaseTunerLayer) and not m.disable_adapters]
    training = model.training
    try:
        for layer in layers:
            layer.enable_adapters(False)
        model.eval()
        with torch.no_grad():
            return model.encode(hr)
    finally:
        model.train(training)
        for layer in layers:
            layer.enable_adapters(True)


def _validate(accelerator: Any, parts: Parts, batch: dict[str, torch.Tensor], step: int, folder: Path
              ) -> dict[str, float]:
    model = parts.model
    model.eval()
    try:
        lr, hr = batch["lr"].to(accelerator.device), batch["hr"].to(accelerator.device)
        with torch.no_grad(), accelerator.autocast():
            scores = parts.estimator(lr) if parts.estimator is not None else None
            sr = model(lr, scores).float().clamp(0, 1)
    finally:
        model.train()
    save_validation_grid(lr, sr, hr, folder / f"step-{step:07d}.png")
    value = psnr(sr.double().cpu(), hr.double().cpu(), crop_border=0)
    return {"val/psnr": float(value[torch.isfinite(value)].mean()) if torch.isfinite(value).any() else float("inf"),
            "val/l2": float(torch.mean((sr.cpu() - hr.cpu()) ** 2))}


def _save_checkpoint(accelerator: Any, parts: Parts, optimizers: dict[str, Any], schedulers: dict[str, Any],
                     settings: TrainSettings, step: int, folder: Path) -> Path:
    temporary = folder.with_name(folder.name + ".tmp")
    accelerator.wait_for_everyone()
    save_training_state(
        temporary, model=parts.model, regularizer=parts.regularizer, discriminator=parts.discriminator,
        optimizers=optimizers, schedulers=schedulers, scaler=accelerator.scaler, state=_run_state(accelerator,
                                                                                                    settings, step),
        recipe=_recipe(settings, step), is_main_process=accelerator.is_main_process,
        process_index=accelerator.process_index)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        temporary.rename(folder)
        prune_checkpoints(settings.output_dir, settings.checkpoints_total_limit)
    accelerator.wait_for_everyone()
    return folder


def _run_state(accelerator: Any, settings: TrainSettings, step: int) -> dict[str, Any]:
    return {"global_step": step, **_identity(accelerator, settings)}


def _identity(accelerator: Any, settings: TrainSettings) -> dict[str, Any]:
    """What must match for a resume to continue the same run."""
    return {"world_size": accelerator.num_processes, "train_batch_size": settings.train_batch_size,
            "gradient_accumulation_steps": settings.gradient_accumulation_steps, "seed": settings.seed,
            "crop_size": settings.crop_size}


def train(settings: TrainSettings) -> dict[str, Any]:
    """Run the training described by ``settings`` (already validated).

    Returns:
        ``{"global_step", "output_dir", "final_dir", "losses": {name: last logged mean}, "history": [(step, total)],
        "model"}`` (``model``: the trained ``OneStepSR``, unwrapped).
    """
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    accelerator = _accelerator(settings)
    output_dir = Path(settings.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "settings.json").write_text(json.dumps(settings.to_dict(), indent=2) + "\n")
    set_seed(settings.seed)  # adapter initialisation: the same on every process
    dataset, sampler, loader = build_train_loader(settings)
    parts = build_parts(settings, accelerator.device)
    validation = build_validation_batch(settings)
    optimizers = build_optimizers(settings, parts)
    n = accelerator.num_processes
    schedulers = {name: get_scheduler(settings.lr_scheduler, opt, num_warmup_steps=settings.lr_warmup_steps * n,
                                      num_training_steps=settings.max_train_steps * n)
                  for name, opt in optimizers.items()}

    generator = accelerator.prepare(parts.model)
    regularizer = accelerator.prepare(parts.regularizer) if parts.regularizer is not None else None
    loader = accelerator.prepare(loader)
    optimizers = {name: accelerator.prepare(opt) for name, opt in optimizers.items()}
    schedulers = {name: accelerator.prepare(sched) for name, sched in schedulers.items()}
    synced = [m for m in (generator, regularizer) if m is not None]

    global_step = 0
    resume = resolve_resume(settings.output_dir, settings.resume_from_checkpoint)
    if resume is not None:
        state = load_training_state(
            resume, model=parts.model, regularizer=parts.regularizer, discriminator=parts.discriminator,
            optimizers=optimizers, schedulers=schedulers, scaler=accelerator.scaler,
            process_index=accelerator.process_index, expected=_identity(accelerator, settings))
        global_step = int(state["global_step"])
        accelerator.print(f"resumed from {resume} at step {global_step}")
    if accelerator.is_main_process:
        accelerator.init_trackers("real_isr", config={k: json.dumps(v) if isinstance(v, (dict, list)) else v
                                                      for k, v in settings.to_dict().items()})

    routed = parts.model.routed_models()
    tracker = rankmoe.RoutingTracker(routed[0], window=settings.logging_steps * settings.gradient_accumulation_steps
                                     ) if routed else None
    batches_per_epoch = len(loader)
    consumed = global_step * settings.gradient_accumulation_steps
    epoch, skip = divmod(consumed, batches_per_epoch)
    sums: dict[str, float] = {}
    count = 0
    history: list[tuple[int, float]] = []
    last: dict[str, float] = {}
    progress = tqdm(total=settings.max_train_steps, initial=global_step, desc="train",
                    disable=not accelerator.is_local_main_process)
    micro_step = consumed
    while global_step < settings.max_train_steps:
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        skip = 0
        for batch in batches:
            terms = _train_micro_step(accelerator, parts, generator, regularizer, optimizers, schedulers, synced,
                                      batch, settings, micro_step)
            micro_step += 1
            if tracker is not None:
                tracker.update()
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + value
            count += 1
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress.update(1)
            if global_step % settings.logging_steps == 0 or global_step == settings.max_train_steps:
                means = torch.tensor([sums[k] / count for k in sorted(sums)], device=accelerator.device)
                means = accelerator.reduce(means, reduction="mean")
                last = {f"loss/{k}": float(v) for k, v in zip(sorted(sums), means.tolist(), strict=True)}
                logs = {**last, "lr": schedulers["generator"].get_last_lr()[0]}
                if tracker is not None:
                    logs.update(routing_scalars(tracker.log_dict()))
                accelerator.log(logs, step=global_step)
                history.append((global_step, last["loss/total"]))
                progress.set_postfix(loss=f"{last['loss/total']:.4f}",
                                     ranks=f"{logs.get('rankmoe/active_ranks', float('nan')):.2f}")
                sums, count = {}, 0
            if validation is not None and (global_step % settings.validation_steps == 0
                                           or global_step == settings.max_train_steps):
                if accelerator.is_main_process:
                    accelerator.log(_validate(accelerator, parts, validation, global_step, output_dir / "validation"),
                                    step=global_step)
                accelerator.wait_for_everyone()
            if global_step % settings.checkpointing_steps == 0:
                _save_checkpoint(accelerator, parts, optimizers, schedulers, settings, global_step,
                                 output_dir / f"checkpoint-{global_step}")
            if global_step >= settings.max_train_steps:
                break
        epoch += 1
    progress.close()
    final_dir = output_dir / "final"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_final(parts, settings, global_step, final_dir, tracker)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"global_step": global_step, "output_dir": str(output_dir), "final_dir": str(final_dir), "losses": last,
            "history": history, "model": parts.model}


def _write_final(parts: Parts, settings: TrainSettings, step: int, folder: Path,
                 tracker: rankmoe.RoutingTracker | None) -> None:
    try:
        from real_isr.trained import write_recipe_file
    except ImportError:
        from trained import write_recipe_file  # type: ignore[no-redef]
    parts.model.save_adapters(folder)
    write_recipe_file(folder, **_recipe(settings, step))
    if tracker is not None and tracker.num_updates:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return
        rankmoe.plot_routing(tracker, folder.parent / "plots")


def _train_micro_step(accelerator: Any, parts: Parts, generator: Any, regularizer: Any, optimizers: dict[str, Any],
                      schedulers: dict[str, Any], synced: list[Any], batch: dict[str, Any],
                      settings: TrainSettings, micro_step: int) -> dict[str, float]:
    device = accelerator.device
    rng = _step_generator(settings.seed, micro_step, accelerator.process_index, device)
    lr, hr = batch["lr"].to(device), batch["hr"].to(device)
    b = lr.shape[0]
    text_pos = parts.text_pos.expand(b, -1, -1)
    with accelerator.accumulate(*synced):
        scores = parts.estimator(lr) if parts.estimator is not None else None
        head = parts.discriminator.head if parts.discriminator is not None else None
        if head is not None:
            head.requires_grad_(False)  # the generator's GAN term must not train the head
        with accelerator.autocast():
            sr, z_hat = generator(lr, scores, generator=rng, return_latents=True)
            terms = parts.loss(sr, hr, z_hat, parts.model.routed_models(), text_pos, parts.text_neg, rng)
        accelerator.backward(terms["total"])
        if head is not None:
            head.requires_grad_(True)
        if accelerator.sync_gradients and settings.max_grad_norm:
            accelerator.clip_grad_norm_(parts.model.trainable_parameters(), settings.max_grad_norm)
        optimizers["generator"].step()
        schedulers["generator"].step()
        optimizers["generator"].zero_grad(set_to_none=True)
        if accelerator.sync_gradients:
            _update_selection_bias(accelerator, parts)
        out = {key: float(value.detach()) for key, value in terms.items()}
        if regularizer is not None:
            with accelerator.autocast():
                reg_loss = diffusion_loss(regularizer, z_hat, text_pos, parts.schedule, rng)
            accelerator.backward(reg_loss)
            if accelerator.sync_gradients and settings.max_grad_norm:
                accelerator.clip_grad_norm_([p for p in regularizer.parameters() if p.requires_grad],
                                            settings.max_grad_norm)
            optimizers["regularizer"].step()
            schedulers["regularizer"].step()
            optimizers["regularizer"].zero_grad(set_to_none=True)
            out["regularizer"] = float(reg_loss.detach())
        if parts.discriminator is not None:
            z_real = _real_latents(parts.model, hr)
            with accelerator.autocast():
                d_loss = parts.discriminator.discriminator_loss(z_real, z_hat, text_pos, rng)
            accelerator.backward(d_loss)
            if accelerator.sync_gradients:
                _average_gradients(accelerator, parts.discriminator.head.parameters())
            optimizers["discriminator"].step()
            schedulers["discriminator"].step()
            optimizers["discriminator"].zero_grad(set_to_none=True)
            out["discriminator"] = float(d_loss.detach())
    if not all(math.isfinite(v) for v in out.values()):
        raise FloatingPointError(f"non-finite loss at micro-step {micro_step}: {out}")
    return out


def _update_selection_bias(accelerator: Any, parts: Parts) -> None:
    """Bias balancing (configs with ``selection_bias_update_rate > 0``), then the mean bias over processes, so that
    every process selects with the same bias (each saw only its own share of the batch)."""
    for model in parts.model.routed_models():
        if not rankmoe.update_selection_bias(model) or accelerator.num_processes == 1:
            continue
        for _, layer in rankmoe.rankmoe_layers(model):
            for router in layer.rankmoe_router.values():
                router.selection_bias.copy_(accelerator.reduce(router.selection_bias.clone(), reduction="mean"))


def _average_gradients(accelerator: Any, params: Any) -> None:
    """All-reduce the GAN head's gradients by hand (the head is called through ``GANLoss``, not a DDP wrapper)."""
    if accelerator.num_processes == 1:
        return
    for param in params:
        if param.grad is not None:
            param.grad = accelerator.reduce(param.grad, reduction="mean")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the options (``--config`` preset + flags) and train; see :func:`train`."""
    return train(parse_settings(argv))


if __name__ == "__main__":
    main()
