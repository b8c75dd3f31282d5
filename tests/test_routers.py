"""Router registry, user routers chosen by name, and routing statistics against hand computation."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model

import rankmoe
from rankmoe import RankMoEConfig
from rankmoe.routers import ROUTERS, Router, register_router, unregister_router
from rankmoe.routers.base import RoutingInputs


@pytest.fixture
def first_feature_router():
    @register_router("first_feature")
    class FirstFeatureRouter(Router):
        """Per-sample router: slot i gets logit scale * i * mean(x[..., 0])."""

        level = "sample"

        def __init__(self, layout, spec, scale: float = 1.0) -> None:
            super().__init__(layout, spec)
            self.scale = scale

        def forward(self, inputs: RoutingInputs) -> torch.Tensor:
            feature = inputs.x.reshape(inputs.batch_size, -1, inputs.x.shape[-1])[:, :, 0].mean(1)
            slots = torch.arange(self.layout.num_slots, dtype=feature.dtype, device=feature.device)
            return self.scale * feature[:, None] * slots

    yield FirstFeatureRouter
    unregister_router("first_feature")


def test_builtin_routers_are_registered() -> None:
    assert {"linear", "pooled", "condition", "static"} <= set(ROUTERS.names())


def test_duplicate_or_bad_registration_is_an_error(first_feature_router) -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_router("first_feature")(first_feature_router)
    with pytest.raises(ValueError, match="subclass of rankmoe.routers.Router"):
        register_router("not_a_router")(object)
    with pytest.raises(ValueError, match="lower-case identifier"):
        register_router("Bad Name")


def test_user_router_by_name_saves_and_loads(first_feature_router, mlp, tmp_path) -> None:
    base = copy.deepcopy(mlp)
    config = RankMoEConfig(r=6, num_shared_ranks=2, top_k=1, num_zero_experts=1, router="first_feature",
                           router_kwargs={"scale": 5.0}, target_modules=["lin0"], init_weights=False)
    model = get_peft_model(mlp, config)
    x = torch.randn(3, 2, 16)
    x[:, :, 0] = torch.tensor([1.0, -1.0, 0.5])[:, None]
    out = model(x)
    # positive feature -> highest slot (the zero slot, index 4) wins; negative -> slot 0
    record = model.base_model.model.lin0._rankmoe_records["default"]
    assert record.top_indices[:, 0].tolist() == [4, 0, 4]
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(base, tmp_path)
    torch.testing.assert_close(loaded(x), out, rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown key"):
        RankMoEConfig(router="first_feature", router_kwargs={"scal": 1.0}, target_modules=["lin0"])


def test_routing_stats_match_hand_computation(mlp) -> None:
    config = RankMoEConfig(r=5, num_shared_ranks=1, expert_rank=2, top_k=1, num_zero_experts=1,
                           router="static", router_kwargs={"selected": [2]}, target_modules=["lin0"])
    model = get_peft_model(mlp, config)
    model(torch.randn(4, 16))
    stats = rankmoe.routing_stats(model)["base_model.model.lin0"]
    # always the zero slot (slot 2): only the shared rank is active
    assert stats.mean_active_ranks == 1.0 and stats.zero_fraction == 1.0
    assert stats.slot_load.tolist() == [0.0, 0.0, 1.0]
    assert stats.num_decisions == 4 and stats.level == "sample"

    layer = model.base_model.model.lin0
    layer.rankmoe_router["default"].logits.copy_(torch.tensor([0.0, -1e4, -1e4]))
    model(torch.randn(4, 16))
    stats = rankmoe.routing_stats(model)["base_model.model.lin0"]
    assert stats.mean_active_ranks == 3.0 and stats.zero_fraction == 0.0
    assert "lin0" in rankmoe.routing_summary(model)


def test_records_are_overwritten_not_appended(mlp) -> None:
    model = get_peft_model(mlp, RankMoEConfig(r=4, num_shared_ranks=1, top_k=1, target_modules=["lin0"]))
    layer = model.base_model.model.lin0
    model(torch.randn(2, 3, 16))
    first = layer._rankmoe_records["default"]
    model(torch.randn(5, 16))
    assert len(layer._rankmoe_records) == 1
    assert layer._rankmoe_records["default"] is not first
    assert layer._rankmoe_records["default"].probs.shape == (5, 3)
