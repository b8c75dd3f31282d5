"""torch.compile(fullgraph=True) builds one graph that serves every routing (zero slots are gates of 0)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing
from peft import get_peft_model

import rankmoe
from rankmoe import RankMoEConfig
from tests.conftest import MLP


@pytest.mark.parametrize("router", ["linear", "condition"])
def test_one_graph_for_all_routings(router) -> None:
    torch._dynamo.reset()
    kwargs = {"condition_dim": 3} if router == "condition" else {}
    model = get_peft_model(MLP(), RankMoEConfig(r=8, num_shared_ranks=2, top_k=2, num_zero_experts=2,
                                                target_modules=["lin0", "lin1"], router=router,
                                                router_kwargs=kwargs, init_weights=False)).eval()
    inner = model.base_model.model
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(inner, backend=counter, fullgraph=True)
    layer = inner.lin0
    seen = set()
    for seed in range(4):
        torch.manual_seed(seed)
        x = torch.randn(2, 5, 16) * (seed + 1)
        cond = torch.randn(2, 3) * 5
        with rankmoe.condition(model, cond):
            expected = inner(x)
            out = compiled(x)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        seen.add(tuple(layer._rankmoe_records["default"].top_indices.flatten().tolist()))
    assert len(seen) > 1, "the test needs different routings"
    assert counter.frame_count == 1
