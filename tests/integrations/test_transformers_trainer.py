"""The stock ``transformers.Trainer`` with ``add_rankmoe_to_trainer``: aux loss, gradient accumulation, logging."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from rankmoe.integrations import transformers as rt
from transformers import Trainer, TrainerCallback, TrainingArguments

import rankmoe
from tests.conftest import tiny_llama

SEQ = 12
PAD_FROM = 8  # padded samples: positions PAD_FROM.. are padding (right padding)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models train ~10x faster with one thread on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(**overrides):
    torch.manual_seed(0)
    settings = dict(
        r=8, num_shared_ranks=2, top_k=2, num_zero_experts=2, router="linear", target_modules=["q_proj", "v_proj"],
        balance_loss="switch", balance_loss_weight=0.01, z_loss_weight=1e-3, task_type="CAUSAL_LM",
    )
    settings.update(overrides)
    return get_peft_model(tiny_llama(), rankmoe.RankMoEConfig(**settings))


def make_data(n: int, seed: int = 1, pad_token: int | None = None) -> list[dict[str, torch.Tensor]]:
    """``n`` random sequences; every second one is right-padded from ``PAD_FROM`` (labels -100 there)."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for i in range(n):
        ids = torch.randint(0, 128, (SEQ,), generator=g)
        mask = torch.ones(SEQ, dtype=torch.long)
        if i % 2:
            mask[PAD_FROM:] = 0
            if pad_token is not None:
                ids[PAD_FROM:] = pad_token
        labels = ids.masked_fill(mask == 0, -100)
        data.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return data


def make_trainer(model, tmp_path, data, **overrides) -> Trainer:
    settings = dict(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, learning_rate=1e-2, disable_tqdm=True,
    )
    settings.update(overrides)
    return Trainer(model=model, args=TrainingArguments(**settings), train_dataset=data)


def router_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "rankmoe_router" in n}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(before[n], after[n]) for n in before)


def spy_task_and_aux(trainer: Trainer) -> list[tuple[float, float]]:
    """Record (task loss, independently computed aux loss) per training micro-batch, under the integration."""
    records: list[tuple[float, float]] = []
    original = trainer.compute_loss

    def compute_loss(model, inputs, *args, **kwargs):
        mask = inputs["attention_mask"]
        loss = original(model, inputs, *args, **kwargs)
        if model.training:
            records.append((float(loss.detach()), float(rankmoe.aux_loss(model, token_mask=mask).total.detach())))
        return loss

    trainer.compute_loss = compute_loss
    return records


class RouterGrads(TrainerCallback):
    """Router gradients accumulated over each optimizer step, read just before the step."""

    def __init__(self, model) -> None:
        self.model, self.grads = model, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads.append(
            {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if "rankmoe_router" in n}
        )


def train_logs(trainer: Trainer) -> list[dict[str, float]]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


# ---------------------------------------------------------------------------------------------- loss and logs
@pytest.mark.parametrize("accumulation", [1, 2])
def test_logged_loss_is_task_plus_aux(tmp_path, accumulation: int) -> None:
    model = make_model()
    trainer = make_trainer(model, tmp_path, make_data(12), gradient_accumulation_steps=accumulation)
    parts = spy_task_and_aux(trainer)  # installed first: sees the task loss before the aux loss is added
    rt.add_rankmoe_to_trainer(trainer)
    trainer.train()

    logs = train_logs(trainer)
    assert len(logs) == 3 and len(parts) == 3 * accumulation
    for step, entry in enumerate(logs):
        micro = parts[step * accumulation : (step + 1) * accumulation]
        task = sum(t for t, _ in micro)  # the model normalises by the tokens of the whole accumulated batch
        aux = sum(a for _, a in micro) / accumulation
        assert set(rt.LOG_KEYS) <= set(entry)
        assert entry["rankmoe/aux_loss"] > 0
        assert entry["rankmoe/aux_loss"] == pytest.approx(aux, rel=1e-5)
        assert entry["loss"] == pytest.approx(task + aux, rel=1e-6, abs=1e-7)
        assert entry["rankmoe/aux_loss"] == pytest.approx(
            0.01 * entry["rankmoe/balance_loss"] + 1e-3 * entry["rankmoe/z_loss"], rel=1e-4
        )
        assert 2 <= entry["rankmoe/mean_active_ranks"] <= 4  # 2 shared + up to 2 routed of expert_rank 1


def test_routers_learn_only_with_the_call(tmp_path) -> None:
    # init_weights=True: B = 0, so on the first step the task loss gives the routers no gradient at all.
    plain = make_model()
    before = router_weights(plain)
    make_trainer(plain, tmp_path / "plain", make_data(4), max_steps=1).train()
    assert not changed(before, router_weights(plain))

    model = make_model()
    before = router_weights(model)
    trainer = make_trainer(model, tmp_path / "rankmoe", make_data(4), max_steps=1)
    rt.add_rankmoe_to_trainer(trainer)
    trainer.train()
    after = router_weights(model)
    assert all(not torch.equal(before[n], after[n]) for n in before)  # every router moved


# ---------------------------------------------------------------------------------------------- accumulation
def _aux_only_router_grads(tmp_path, mode: str, accumulation: int, checkpointing: bool) -> dict[str, torch.Tensor]:
    model = make_model()
    data = make_data(2)  # a batch of two (one padded) — twice per step with accumulation 2
    overrides = dict(
        max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=accumulation,
        train_sampling_strategy="sequential", optim="sgd", max_grad_norm=0.0, gradient_checkpointing=checkpointing,
    )
    trainer = make_trainer(model, tmp_path / f"{mode}{accumulation}{checkpointing}", data * accumulation, **overrides)
    if mode == "trainer_divides":
        trainer.model_accepts_loss_kwargs = False  # no num_items_in_batch: training_step divides by the steps
    elif mode == "compute_loss_func":

        def loss_func(outputs, labels, num_items_in_batch=None):
            logits = outputs.logits[:, :-1].flatten(0, 1).float()
            loss = F.cross_entropy(logits, labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")
            return loss / num_items_in_batch

        trainer.compute_loss_func = loss_func
    grads = RouterGrads(model)
    trainer.add_callback(grads)
    handle = rt.add_rankmoe_to_trainer(trainer)
    forwards = []
    rankmoe.rankmoe_layers(model)[0][1].register_forward_pre_hook(lambda *_: forwards.append(1))
    trainer.train()
    assert len(forwards) == accumulation * (2 if checkpointing else 1)  # checkpointing recomputes in backward
    expected_scale = 1.0 if mode == "trainer_divides" else 1.0 / accumulation
    assert handle.last_scale == pytest.approx(expected_scale)
    assert len(grads.grads) == 1
    return grads.grads[0]


@pytest.mark.parametrize("mode", ["model_normalises", "trainer_divides", "compute_loss_func", "checkpointing"])
def test_gradient_accumulation_weights_aux_once_per_step(tmp_path, mode: str) -> None:
    """Router gradients of one step on batch X equal those of two accumulated micro-batches X, X.

    With B = 0 the task loss gives the routers no gradient on the first step, so these are the aux loss's alone.
    ``checkpointing``: the accumulated run uses (non-reentrant) activation checkpointing, the reference does not.
    """
    one = _aux_only_router_grads(tmp_path, mode, accumulation=1, checkpointing=False)
    two = _aux_only_router_grads(tmp_path, mode, accumulation=2, checkpointing=mode == "checkpointing")
    assert any(g.abs().max() > 0 for g in one.values())
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------------------------------------- masking
def test_attention_mask_leaves_padding_out(tmp_path) -> None:
    """Right padding + causal attention: what sits at padded positions cannot change the real tokens' routing."""

    def first_log(pad_token: int, use_attention_mask: bool) -> dict[str, float]:
        model = make_model()
        trainer = make_trainer(model, tmp_path / f"{pad_token}{use_attention_mask}", make_data(2, pad_token=pad_token),
                               max_steps=1)
        rt.add_rankmoe_to_trainer(trainer, use_attention_mask=use_attention_mask)
        trainer.train()
        return train_logs(trainer)[0]

    keys = ("rankmoe/aux_loss", "rankmoe/balance_loss", "rankmoe/z_loss", "rankmoe/mean_active_ranks")
    masked = [first_log(pad, True) for pad in (0, 77)]
    unmasked = [first_log(pad, False) for pad in (0, 77)]
    for key in keys:
        assert masked[0][key] == pytest.approx(masked[1][key], rel=1e-6)
    assert any(unmasked[0][key] != pytest.approx(unmasked[1][key], rel=1e-6) for key in keys)
    assert masked[0]["rankmoe/aux_loss"] != pytest.approx(unmasked[0]["rankmoe/aux_loss"], rel=1e-6)


# ---------------------------------------------------------------------------------------------- bias balancing
def test_selection_bias_updated_after_each_backward(tmp_path, monkeypatch) -> None:
    model = make_model(balance_loss=None, balance_loss_weight=0.0, z_loss_weight=0.0, selection_bias_update_rate=0.1)
    calls: list[bool] = []
    update = rt.update_selection_bias

    def spy(model_, token_mask=None):
        router = next(p for n, p in model.named_parameters() if "rankmoe_router" in n)
        calls.append(router.grad is not None)  # gradients exist: the micro-batch's backward has run
        return update(model_, token_mask=token_mask)

    monkeypatch.setattr(rt, "update_selection_bias", spy)
    biases = {n: b.clone() for n, b in model.named_buffers() if n.endswith("selection_bias")}
    assert biases
    trainer = make_trainer(model, tmp_path, make_data(8), max_steps=2, gradient_accumulation_steps=2)
    rt.add_rankmoe_to_trainer(trainer)
    trainer.train()
    assert calls == [True] * 4  # once per micro-batch, always after its backward
    after = dict(model.named_buffers())
    assert any(not torch.equal(after[n], b) for n, b in biases.items())
    # no loss weights: nothing is added, and the logs still carry the active ranks
    assert "rankmoe/mean_active_ranks" in train_logs(trainer)[0]


# ---------------------------------------------------------------------------------------------- remove, eval, errors
def test_remove_restores_plain_trainer(tmp_path) -> None:
    model = make_model()
    trainer = make_trainer(model, tmp_path, make_data(4), max_steps=1)
    callbacks = list(trainer.callback_handler.callbacks)
    handle = rt.add_rankmoe_to_trainer(trainer)
    assert "compute_loss" in vars(trainer) and "log" in vars(trainer)
    with pytest.raises(ValueError, match="already added"):
        rt.add_rankmoe_to_trainer(trainer)
    handle.remove()
    handle.remove()  # idempotent
    assert not handle.active
    assert "compute_loss" not in vars(trainer) and "log" not in vars(trainer)
    assert trainer.callback_handler.callbacks == callbacks

    before = router_weights(model)
    trainer.train()
    assert not changed(before, router_weights(model))  # B = 0 and no aux loss: routers get no gradient
    assert not any(key.startswith("rankmoe/") for key in train_logs(trainer)[0])

    with rt.add_rankmoe_to_trainer(trainer) as again:  # adding again works; the context manager removes it
        assert again.active
    assert not again.active and "compute_loss" not in vars(trainer)


def test_evaluation_loss_is_task_loss(tmp_path) -> None:
    model = make_model()
    data = make_data(4)
    trainer = make_trainer(model, tmp_path, data, per_device_eval_batch_size=2)
    model.train()
    _ = model(**{k: torch.stack([d[k] for d in data]) for k in data[0]})  # routing records exist
    plain = trainer.evaluate(eval_dataset=data)["eval_loss"]
    handle = rt.add_rankmoe_to_trainer(trainer)
    assert trainer.evaluate(eval_dataset=data)["eval_loss"] == pytest.approx(plain, rel=1e-6)
    assert handle.last_aux is None  # no training micro-batch seen
    assert not any(k.startswith("rankmoe/") for entry in trainer.state.log_history for k in entry)


def test_errors(tmp_path) -> None:
    with pytest.raises(TypeError, match="transformers.Trainer"):
        rt.add_rankmoe_to_trainer(object())
    plain = make_trainer(tiny_llama(), tmp_path, make_data(2))
    with pytest.raises(ValueError, match="no RankMoE layer"):
        rt.add_rankmoe_to_trainer(plain)


def test_dead_slots_are_logged(tmp_path) -> None:
    """``rankmoe/dead_slots`` counts the slots no token selected since the previous log, over all layers."""
    model = make_model()
    layers = rankmoe.rankmoe_layers(model)
    for _, layer in layers:
        router = layer.rankmoe_router["default"]
        router.proj.bias.requires_grad_(False)
        with torch.no_grad():
            router.proj.bias[0] = -1e4  # slot 0 can never win top-2 of the 8 slots
    trainer = make_trainer(model, tmp_path, make_data(12), learning_rate=1e-4)
    selected_per_step: list[dict[str, set[int]]] = []
    original = trainer.compute_loss

    def compute_loss(model, inputs, *args, **kwargs):  # hand count: the slots each micro-batch selected
        loss = original(model, inputs, *args, **kwargs)
        real = inputs["attention_mask"].bool()
        selected_per_step.append({
            name: set(layer._rankmoe_records["default"].top_indices[real].flatten().tolist())
            for name, layer in layers
        })
        return loss

    trainer.compute_loss = compute_loss
    rt.add_rankmoe_to_trainer(trainer)
    trainer.train()
    logs = train_logs(trainer)
    assert len(logs) == len(selected_per_step) == 3
    for entry, selected in zip(logs, selected_per_step, strict=True):
        expected = sum(8 - len(slots) for slots in selected.values())
        assert all(0 not in slots for slots in selected.values())
        assert entry["rankmoe/dead_slots"] == expected >= len(layers)
