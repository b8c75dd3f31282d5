"""RoutingTracker and the routing statistics helpers against hand counts."""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model

import rankmoe
from rankmoe import RankMoEConfig
from rankmoe.stats import overall_active_ranks
from rankmoe.tracker import RoutingTracker

LIN0 = "base_model.model.lin0"
LIN1 = "base_model.model.lin1"
# r=8 with 2 shared ranks: slots 0..5 are real experts of one rank, slots 6 and 7 are zero slots; top_k=2.
LAYOUT = {"r": 8, "num_shared_ranks": 2, "top_k": 2, "num_zero_experts": 2}


def static_model(mlp, targets=("lin0",)):
    config = RankMoEConfig(**LAYOUT, router="static", router_kwargs={"selected": [0, 1]}, target_modules=list(targets))
    return get_peft_model(mlp, config)


def route_to(model, slots, layer="lin0"):
    """Make the static router of ``layer`` select exactly ``slots`` from now on."""
    logits = torch.full((8,), -1e4)
    logits[slots] = 0.0
    model.base_model.model.get_submodule(layer).rankmoe_router["default"].logits.copy_(logits)


# the three updates used below: (selected slots, batch size); active ranks = 2 shared + selected real experts
STEPS = [([0, 1], 4), ([1, 6], 3), ([6, 7], 2)]


def run_steps(model, tracker, steps=STEPS):
    for slots, batch in steps:
        route_to(model, slots)
        model(torch.randn(batch, 16))
        assert tracker.update() == 1


def test_tracker_counts_match_hand_count(mlp) -> None:
    model = static_model(mlp)
    tracker = RoutingTracker(model)
    run_steps(model, tracker)
    # slot 0: 4 decisions, slot 1: 4 + 3, slot 6: 3 + 2, slot 7: 2; 9 decisions in all
    torch.testing.assert_close(tracker.slot_load()[LIN0], torch.tensor([4, 7, 0, 0, 0, 0, 5, 2]) / 9.0)
    assert tracker.mean_active_ranks() == {LIN0: pytest.approx((4 * 4 + 3 * 3 + 2 * 2) / 9)}
    assert tracker.overall_active_ranks() == pytest.approx(29 / 9)
    assert tracker.dead_slots() == {LIN0: [2, 3, 4, 5]}
    assert tracker.active_rank_histogram()[LIN0].tolist() == [0, 0, 2, 3, 4, 0, 0, 0, 0]
    stats = tracker.stats()[LIN0]
    assert stats.num_decisions == 9 and stats.level == "sample"
    assert stats.zero_fraction == pytest.approx(7 / 18)
    assert tracker.num_updates == 3
    logs = tracker.log_dict()
    assert logs == {
        "rankmoe/active_ranks": pytest.approx(29 / 9),
        "rankmoe/dead_slots": 4.0,
        f"rankmoe/active_ranks/{LIN0}": pytest.approx(29 / 9),
        f"rankmoe/load_max_over_mean/{LIN0}": pytest.approx((7 / 9) / (2 / 8)),
        f"rankmoe/zero_share/{LIN0}": pytest.approx(7 / 18),
        f"rankmoe/dead_slots/{LIN0}": 4.0,
    }
    assert all(type(value) is float for value in logs.values())
    assert set(tracker.log_dict(prefix="")) == {key.removeprefix("rankmoe/") for key in logs}
    summary = tracker.summary()
    assert "lin0" in summary and "2, 3, 4, 5" in summary and "3.22" in summary


def test_window_drops_old_updates(mlp) -> None:
    model = static_model(mlp)
    tracker = RoutingTracker(model, window=2)
    run_steps(model, tracker)
    # only the last two updates count: slot 1: 3, slot 6: 3 + 2, slot 7: 2; 5 decisions
    torch.testing.assert_close(tracker.slot_load()[LIN0], torch.tensor([0, 3, 0, 0, 0, 0, 5, 2]) / 5.0)
    assert tracker.mean_active_ranks()[LIN0] == pytest.approx((3 * 3 + 2 * 2) / 5)
    assert tracker.dead_slots() == {LIN0: [0, 2, 3, 4, 5]}  # slot 0 was used only in the dropped update
    assert tracker.num_updates == 2
    # an update in which the layer did not run still moves the window
    tracker.update()
    assert tracker.num_updates == 2 and tracker.stats()[LIN0].num_decisions == 2
    tracker.update()
    assert tracker.stats() == {} and tracker.dead_slots() == {} and tracker.log_dict() == {}


def test_reset_and_stale_records(mlp) -> None:
    model = static_model(mlp)
    tracker = RoutingTracker(model)
    assert tracker.update() == 0  # no forward yet
    assert "no routing tracked" in tracker.summary() and math.isnan(tracker.overall_active_ranks())
    model(torch.randn(4, 16))
    assert tracker.update() == 1
    assert tracker.update() == 0  # the same record is not counted twice
    assert tracker.stats()[LIN0].num_decisions == 4
    tracker.reset()
    assert tracker.stats() == {} and tracker.num_updates == 0
    model(torch.randn(3, 16))
    tracker.update()
    assert tracker.stats()[LIN0].num_decisions == 3


def test_token_level_counts_and_severity_match_hand_count(mlp) -> None:
    model = get_peft_model(mlp, RankMoEConfig(**LAYOUT, router="linear", router_kwargs={"init_scale": 5.0},
                                              target_modules=["lin0", "lin1"]))
    tracker = RoutingTracker(model)
    hand = {name: {"slots": [0] * 8, "ranks": [0] * 9, "pairs": []} for name in (LIN0, LIN1)}
    severities = []
    for shape in [(2, 5, 16), (3, 16), (4, 2, 3, 16)]:
        batch = shape[0]
        severity = torch.rand(batch)
        severities.append(severity)
        with rankmoe.condition(model, None, severity=severity):
            model(torch.randn(*shape))
        tracker.update()
        for name in hand:
            top = model.get_submodule(name)._rankmoe_records["default"].top_indices
            for sample in range(batch):
                sample_ranks = []
                for decision in top[sample].reshape(-1, 2).tolist():
                    for slot in decision:
                        hand[name]["slots"][slot] += 1
                    ranks = 2 + sum(slot < 6 for slot in decision)
                    hand[name]["ranks"][ranks] += 1
                    sample_ranks.append(ranks)
                hand[name]["pairs"].append((sum(sample_ranks) / len(sample_ranks), float(severity[sample])))
    histograms, loads = tracker.active_rank_histogram(), tracker.slot_load()
    layer_pairs = tracker.layer_severity_pairs()
    for name, counts in hand.items():
        decisions = sum(counts["ranks"])
        assert decisions == 2 * 5 + 3 + 4 * 2 * 3
        assert histograms[name].tolist() == counts["ranks"]
        torch.testing.assert_close(loads[name], torch.tensor(counts["slots"]) / decisions)
        assert tracker.dead_slots()[name] == [i for i, c in enumerate(counts["slots"]) if c == 0]
        ranks, severity = layer_pairs[name]
        torch.testing.assert_close(ranks, torch.tensor([p[0] for p in counts["pairs"]]))
        torch.testing.assert_close(severity, torch.tensor([p[1] for p in counts["pairs"]]))
    ranks, severity = tracker.severity_pairs()
    expected = [(a[0] + b[0]) / 2 for a, b in zip(hand[LIN0]["pairs"], hand[LIN1]["pairs"], strict=True)]
    torch.testing.assert_close(ranks, torch.tensor(expected))
    torch.testing.assert_close(severity, torch.cat(severities))


def condition_model(mlp):
    config = RankMoEConfig(**LAYOUT, router="condition", router_kwargs={"condition_dim": 3},
                           target_modules=["lin0", "lin1"])
    model = get_peft_model(mlp, config)
    # logits = W c: e0 -> slots {0, 1} (4 ranks), e1 -> {0, 6} (3 ranks), e2 -> zero slots {6, 7} (2 ranks)
    weight = torch.zeros(8, 3)
    weight[0] = torch.tensor([10.0, 5.0, 0.0])
    weight[1] = torch.tensor([10.0, 0.0, 0.0])
    weight[6] = torch.tensor([0.0, 5.0, 10.0])
    weight[7] = torch.tensor([0.0, 0.0, 10.0])
    for name in ("lin0", "lin1"):
        proj = model.base_model.model.get_submodule(name).rankmoe_router["default"].proj
        with torch.no_grad():
            proj.weight.copy_(weight)
            proj.bias.zero_()
    return model


def test_severity_pairs_line_up_with_samples(mlp) -> None:
    model = condition_model(mlp)
    tracker = RoutingTracker(model, window=10)
    eye = torch.eye(3)
    cond = eye[[0, 1, 2, 1]]
    severity = torch.tensor([0.9, 0.5, 0.1, 0.4])
    with rankmoe.condition(model, cond, severity=severity):
        model(torch.randn(4, 16))
    tracker.update()
    with rankmoe.condition(model, eye[[2, 0]], severity=torch.tensor([0.2, 0.7])):
        model(torch.randn(2, 16))
    tracker.update()
    with rankmoe.condition(model, eye[[0]]):  # no severity: counted, but no pairs
        model(torch.randn(1, 16))
    tracker.update()
    expected_ranks = torch.tensor([4.0, 3.0, 2.0, 3.0, 2.0, 4.0])
    expected_severity = torch.tensor([0.9, 0.5, 0.1, 0.4, 0.2, 0.7])
    for name in (LIN0, LIN1):
        ranks, sev = tracker.layer_severity_pairs()[name]
        torch.testing.assert_close(ranks, expected_ranks)
        torch.testing.assert_close(sev, expected_severity)
        assert tracker.stats()[name].num_decisions == 7
        assert tracker.dead_slots()[name] == [2, 3, 4, 5]
    ranks, sev = tracker.severity_pairs()
    torch.testing.assert_close(ranks, expected_ranks)
    torch.testing.assert_close(sev, expected_severity)
    assert tracker.mean_active_ranks()[LIN0] == pytest.approx((18 + 4) / 7)


def test_max_samples_keeps_the_latest_pairs(mlp) -> None:
    model = condition_model(mlp)
    tracker = RoutingTracker(model, max_samples=5)
    eye = torch.eye(3)
    for rows, sev in [([0, 1, 2, 1], [0.9, 0.5, 0.1, 0.4]), ([2, 0, 0, 1], [0.2, 0.7, 0.3, 0.6])]:
        with rankmoe.condition(model, eye[rows], severity=torch.tensor(sev)):
            model(torch.randn(4, 16))
        tracker.update()
    ranks, sev = tracker.severity_pairs()
    torch.testing.assert_close(ranks, torch.tensor([3.0, 2.0, 4.0, 4.0, 3.0]))
    torch.testing.assert_close(sev, torch.tensor([0.4, 0.2, 0.7, 0.3, 0.6]))
    assert tracker.stats()[LIN0].num_decisions == 8  # counts are not limited


def test_tracker_follows_the_named_adapter(mlp) -> None:
    model = static_model(mlp)
    other = RankMoEConfig(**LAYOUT, router="static", router_kwargs={"selected": [6, 7]}, target_modules=["lin0"])
    model.add_adapter("other", other)
    model.set_adapter("other")
    model(torch.randn(3, 16))
    tracked_other = RoutingTracker(model, adapter_name="other")
    tracked_default = RoutingTracker(model, adapter_name="default")
    active = RoutingTracker(model)
    assert tracked_other.update() == 1 and tracked_default.update() == 0 and active.update() == 1
    assert tracked_other.dead_slots() == {LIN0: [0, 1, 2, 3, 4, 5]}
    assert tracked_other.mean_active_ranks() == {LIN0: 2.0} == active.mean_active_ranks()


def test_overall_active_ranks_helper(mlp) -> None:
    model = get_peft_model(mlp, RankMoEConfig(**LAYOUT, target_modules=["lin0", "lin1"]))
    model(torch.randn(2, 3, 16))
    stats = rankmoe.routing_stats(model)
    assert overall_active_ranks(stats) == pytest.approx(
        (stats[LIN0].mean_active_ranks + stats[LIN1].mean_active_ranks) / 2
    )
    assert math.isnan(overall_active_ranks({}))
    assert f"{overall_active_ranks(stats):12.2f}" in rankmoe.routing_summary(model).splitlines()[-1]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"window": 0}, "window"),
        ({"window": True}, "window"),
        ({"window": 2.5}, "window"),
        ({"max_samples": 0}, "max_samples"),
        ({"adapter_name": ""}, "adapter_name"),
        ({"adapter_name": 3}, "adapter_name"),
    ],
)
def test_tracker_rejects_bad_arguments(mlp, kwargs, match) -> None:
    model = static_model(mlp)
    with pytest.raises(ValueError, match=match):
        RoutingTracker(model, **kwargs)


def test_tracker_rejects_models_without_rankmoe_layers(mlp) -> None:
    with pytest.raises(ValueError, match="no RankMoE layer"):
        RoutingTracker(mlp)
    with pytest.raises(ValueError, match="model"):
        RoutingTracker("model")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prefix"):
        RoutingTracker(static_model(mlp)).log_dict(prefix=3)  # type: ignore[arg-type]


def test_token_mask_leaves_padding_out_of_stats_and_tracker() -> None:
    """Masked positions count nowhere: the statistics equal those of a forward on the real tokens alone."""
    from peft import get_peft_model

    import rankmoe
    from tests.conftest import MLP

    config = rankmoe.RankMoEConfig(r=8, num_shared_ranks=2, top_k=2, num_zero_experts=2, target_modules=["lin0"],
                                   router="linear", router_kwargs={"init_scale": 3.0})
    model = get_peft_model(MLP(), config)
    x = torch.randn(2, 6, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    masked_tracker, plain_tracker = RoutingTracker(model), RoutingTracker(model)
    model(x)
    masked = rankmoe.routing_stats(model, token_mask=mask)["base_model.model.lin0"]
    masked_tracker.update(token_mask=mask)
    model(x[mask.bool()].unsqueeze(0))
    plain = rankmoe.routing_stats(model)["base_model.model.lin0"]
    plain_tracker.update()
    assert masked.num_decisions == plain.num_decisions == 8
    torch.testing.assert_close(masked.slot_load, plain.slot_load)
    assert masked.mean_active_ranks == pytest.approx(plain.mean_active_ranks)
    assert masked.zero_fraction == pytest.approx(plain.zero_fraction)
    torch.testing.assert_close(masked_tracker.slot_load()["base_model.model.lin0"],
                               plain_tracker.slot_load()["base_model.model.lin0"])
    assert masked_tracker.mean_active_ranks() == pytest.approx(plain_tracker.mean_active_ranks())
