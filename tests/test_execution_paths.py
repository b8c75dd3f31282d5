"""The three execution paths (dense-masked, fixed-k gather, per-sample merge) compute the same function.

Every path is checked against an independent float64 reference built from the routing record,
``y_b = (W + B diag(g_b) A) x_b + bias`` per sample, and against each other (fp32, relative 1e-5).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing
from hypothesis import given
from hypothesis import strategies as st
from peft import get_peft_model
from torch import nn

import rankmoe
from rankmoe import RankMoEConfig
from rankmoe.dispatch import break_even_tokens, choose_execution_path
from rankmoe.routers.base import SlotLayout
from rankmoe.routers.selection import expand_rank_gates
from tests.strategies import slot_layouts

PATHS = ("dense", "gather", "merge")
CONDITION_DIM = 3


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def build(base: nn.Module, layout: SlotLayout, router: str = "condition", **extra) -> tuple[nn.Module, nn.Module]:
    """PEFT model around ``base`` with random (non-zero) adapter weights; returns (model, layer)."""
    kwargs = {"condition_dim": CONDITION_DIM} if router == "condition" and layout.is_routed else {}
    config = RankMoEConfig(
        r=layout.r, num_shared_ranks=layout.num_shared_ranks, expert_rank=layout.expert_rank, top_k=layout.top_k,
        num_zero_experts=layout.num_zero_experts, lora_alpha=2.0 * layout.r, router=router, router_kwargs=kwargs,
        target_modules=["layer"], init_weights=False, **extra,
    )
    model = get_peft_model(Holder(base), config)
    return model, model.base_model.model.layer


def run(model: nn.Module, layer: nn.Module, x: torch.Tensor, cond: torch.Tensor, path: str) -> torch.Tensor:
    layer.execution_path["default"] = path
    with torch.no_grad(), rankmoe.condition(model, cond):
        out = model(x)
    assert layer.last_execution_paths["default"] == path
    return out


def reference(layer: nn.Module, x: torch.Tensor, batch: int) -> torch.Tensor:
    """float64 ``(W + B diag(g_b) A) x_b + bias`` per sample, from the last routing record."""
    base = layer.get_base_layer()
    layout = layer.slot_layout["default"]
    a, b = layer.rankmoe_A["default"].double(), layer.rankmoe_B["default"].double()
    if layout.is_routed:
        gates = expand_rank_gates(layer._rankmoe_records["default"].slot_gates.double(), layout)
    else:
        gates = torch.ones(batch, layout.r, dtype=torch.float64)
    gates = gates.reshape(batch, layout.r) * layer.scaling["default"]
    outs = []
    for i in range(batch):
        delta = (b.reshape(b.shape[0], -1) * gates[i]) @ a.reshape(a.shape[0], -1)
        weight = base.weight.double() + delta.reshape(base.weight.shape)
        bias = None if base.bias is None else base.bias.double()
        if isinstance(base, nn.Linear):
            outs.append(nn.functional.linear(x[i].double(), weight, bias))
        else:
            conv = nn.functional.conv1d if isinstance(base, nn.Conv1d) else nn.functional.conv2d
            xi = x[i : i + 1].double()
            padding = base.padding
            if base.padding_mode != "zeros":
                xi = nn.functional.pad(xi, base._reversed_padding_repeated_twice, mode=base.padding_mode)
                padding = 0
            outs.append(conv(xi, weight, bias, base.stride, padding, base.dilation)[0])
    return torch.stack(outs)


def bias_zero_slots(layer: nn.Module, value: float) -> None:
    router = layer.rankmoe_router["default"] if "default" in layer.rankmoe_router else None
    if router is not None and router.layout.num_zero_experts:
        router.selection_bias[router.layout.num_experts :] += value


@given(
    layout=slot_layouts(max_rank=10),
    batch=st.integers(1, 3),
    tokens=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    features=st.tuples(st.integers(1, 6), st.integers(1, 6)),
    bias=st.booleans(),
    zero_bias=st.sampled_from([0.0, 50.0]),
)
def test_linear_paths_agree(layout, batch, tokens, features, bias, zero_bias) -> None:
    model, layer = build(nn.Linear(*features, bias=bias), layout)
    bias_zero_slots(layer, zero_bias)
    model.eval()
    x = torch.randn(batch, *tokens, features[0])
    cond = torch.randn(batch, CONDITION_DIM) * 3
    outputs = {path: run(model, layer, x, cond, path) for path in PATHS}
    expected = reference(layer, x.reshape(batch, -1, features[0]), batch).reshape(outputs["dense"].shape)
    for path, out in outputs.items():
        assert rel_err(out, expected) <= 1e-5, path
    for path in ("gather", "merge"):
        assert rel_err(outputs[path], outputs["dense"]) <= 1e-5, path


@given(
    layout=slot_layouts(max_rank=8),
    batch=st.integers(1, 3),
    dims=st.sampled_from([1, 2]),
    channels=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    padding_mode=st.sampled_from(["zeros", "reflect", "circular"]),
    size=st.integers(5, 7),
    zero_bias=st.sampled_from([0.0, 50.0]),
)
def test_conv_paths_agree(layout, batch, dims, channels, kernel, stride, dilation, padding_mode, size,
                          zero_bias) -> None:
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    base = conv(*channels, kernel, stride=stride, padding=kernel // 2, dilation=dilation, padding_mode=padding_mode)
    model, layer = build(base, layout)
    bias_zero_slots(layer, zero_bias)
    model.eval()
    x = torch.randn(batch, channels[0], *([size] * dims))
    cond = torch.randn(batch, CONDITION_DIM) * 3
    outputs = {path: run(model, layer, x, cond, path) for path in PATHS}
    expected = reference(layer, x, batch)
    for path, out in outputs.items():
        assert out.shape == expected.shape
        assert rel_err(out, expected) <= 1e-5, path


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_static_adapter_paths_agree(kind) -> None:
    """Every rank shared (no router): dense and one merged weight for the whole call agree."""
    base = nn.Linear(6, 5) if kind == "linear" else nn.Conv2d(3, 4, 3, padding=1)
    model, layer = build(base, SlotLayout(r=4, num_shared_ranks=4), router="linear")
    model.eval()
    x = torch.randn(2, 7, 6) if kind == "linear" else torch.randn(2, 3, 5, 5)
    outputs = {path: run(model, layer, x, torch.zeros(2, CONDITION_DIM), path) for path in ("dense", "merge")}
    layer.execution_path["default"] = "gather"
    with torch.no_grad():
        model(x)
    assert layer.last_execution_paths["default"] == "dense"  # gathering every rank is the dense path
    with torch.no_grad(), model.disable_adapter():
        base_out = model(x)
    assert rel_err(outputs["merge"], outputs["dense"]) <= 1e-5
    assert rel_err(outputs["dense"], base_out) > 1e-3


def training_step(model, layer, x, cond, path, device="cpu") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(model(x) ** 2).sum()`` backward on ``path`` and ``device``: the output and every gradient, on the CPU."""
    model.to(device).zero_grad(set_to_none=True)
    layer.execution_path["default"] = path
    xi = x.detach().to(device).clone().requires_grad_()
    with rankmoe.condition(model, cond.to(device)):
        out = model(xi)
        out.pow(2).sum().backward()
    assert layer.last_execution_paths["default"] == path
    grads = {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach().cpu(), {**grads, "input": xi.grad.cpu()}


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_gradients_agree_across_paths(kind) -> None:
    """A path forced in training is differentiable and gives the dense path's gradients."""
    layout = SlotLayout(r=10, num_shared_ranks=2, top_k=3, num_zero_experts=2)
    base = nn.Linear(6, 5) if kind == "linear" else nn.Conv2d(3, 4, 3, padding=1)
    model, layer = build(base, layout)
    x = torch.randn(3, 7, 6) if kind == "linear" else torch.randn(3, 3, 5, 5)
    cond = torch.randn(3, CONDITION_DIM)
    grads = {path: training_step(model, layer, x, cond, path)[1] for path in PATHS}
    assert any("router" in name for name in grads["dense"])
    for path in ("gather", "merge"):
        assert grads[path].keys() == grads["dense"].keys()
        for name, grad in grads["dense"].items():
            assert rel_err(grads[path][name], grad) <= 1e-5, (path, name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_cuda_training_matches_cpu_on_every_path(kind) -> None:
    """Outputs and gradients of every path on a GPU against the dense path on the CPU (float32, TF32 off)."""
    layout = SlotLayout(r=10, num_shared_ranks=2, top_k=3, num_zero_experts=2)
    base = nn.Linear(24, 20) if kind == "linear" else nn.Conv2d(6, 8, 3, padding=1)
    model, layer = build(base, layout)
    x = torch.randn(3, 40, 24) if kind == "linear" else torch.randn(3, 6, 9, 9)
    cond = torch.randn(3, CONDITION_DIM)

    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        expected_out, expected = training_step(model, layer, x, cond, "dense")
        for path in PATHS:
            out, grads = training_step(model, layer, x, cond, path, device="cuda")
            assert rel_err(out, expected_out) <= 1e-5, path
            assert grads.keys() == expected.keys()
            for name, grad in expected.items():
                assert rel_err(grads[name], grad) <= 1e-4, (path, name)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        model.cpu()


def test_unbatched_inputs() -> None:
    for base, x in ((nn.Linear(4, 3), torch.randn(4)), (nn.Conv2d(2, 3, 3, padding=1), torch.randn(2, 5, 5))):
        model, layer = build(base, SlotLayout(r=6, num_shared_ranks=2, top_k=2, num_zero_experts=1))
        model.eval()
        cond = torch.randn(1, CONDITION_DIM)
        outputs = [run(model, layer, x, cond, path) for path in PATHS]
        assert outputs[0].shape == base(x).shape
        for out in outputs[1:]:
            assert rel_err(out, outputs[0]) <= 1e-5


# ---------------------------------------------------------------------------------------------------- dispatch
def test_break_even_formula() -> None:
    assert break_even_tokens(320, 320) == pytest.approx(160.0)
    assert break_even_tokens(1280, 640) == pytest.approx(1280 * 640 / 1920)
    assert break_even_tokens(320, 320, kernel_numel=9) == pytest.approx(9 * 320 * 320 / (9 * 320 + 320))


@given(
    d_in=st.integers(1, 2048), d_out=st.integers(1, 2048), kernel=st.sampled_from([1, 3, 9]),
    tokens=st.integers(1, 10_000), level=st.sampled_from(["sample", "static", "token"]), training=st.booleans(),
    batch=st.integers(1, 4), is_conv=st.booleans(), device=st.sampled_from(["cpu", "cuda"]),
    ranks=st.one_of(st.none(), st.tuples(st.integers(1, 64), st.integers(1, 64))),
)
def test_auto_choice_follows_break_even_rule(d_in, d_out, kernel, tokens, level, training, batch, is_conv,
                                             device, ranks) -> None:
    rank, gathered = (None, None) if ranks is None else (max(ranks), min(ranks))
    path = choose_execution_path("auto", level=level, tokens_per_gate_set=tokens, in_features=d_in,
                                 out_features=d_out, kernel_numel=kernel, batch_size=batch, is_conv=is_conv,
                                 device_type=device, training=training, rank=rank, gathered_rank=gathered)
    threshold = d_in * kernel * d_out / (d_in * kernel + d_out)   # n*, computed independently
    if level == "token" or device != "cpu":
        assert path == "dense"
    elif training:
        # floats kept for backward per sample: dense (n, r); gather (n, k) + A rows (k, d_in kernel) + 2 x (k, d_out)
        gather_keeps_less = ranks is not None and tokens * gathered + gathered * (d_in * kernel + 2 * d_out) <= (
            tokens * rank
        )
        assert path == ("gather" if level == "sample" and gather_keeps_less else "dense")
    elif tokens > threshold and tokens >= d_in * kernel and (not is_conv or batch == 1 or level == "static"):
        assert path == "merge"
    else:
        assert path == ("gather" if level == "sample" else "dense")
    if path == "merge":
        assert tokens > threshold  # never merged below the break-even
    for forced in PATHS:
        assert choose_execution_path(forced, level=level, tokens_per_gate_set=tokens, in_features=d_in,
                                     out_features=d_out, training=training, device_type=device) == forced


def auto_path(model, layer, x, cond=None, grad=False) -> str:
    with torch.set_grad_enabled(grad), rankmoe.condition(model, torch.randn(x.shape[0], CONDITION_DIM)):
        model(x)
    return layer.last_execution_paths["default"]


def test_layer_dispatch_at_the_break_even() -> None:
    layout = SlotLayout(r=6, num_shared_ranks=2, top_k=2, num_zero_experts=1)
    model, layer = build(nn.Linear(16, 16), layout)  # n* = 8 tokens per sample; the merged weight needs >= 16
    model.eval()
    assert auto_path(model, layer, torch.randn(2, 16, 16)) == "merge"
    assert auto_path(model, layer, torch.randn(2, 15, 16)) == "gather"  # above n*, but W' larger than the output
    assert auto_path(model, layer, torch.randn(2, 8, 16)) == "gather"
    assert auto_path(model, layer, torch.randn(2, 16, 16), grad=True) == "dense"  # gradients: dense
    model.train()
    assert auto_path(model, layer, torch.randn(2, 16, 16)) == "dense"  # train() mode: dense
    # training gathers where that keeps less than dense: n (6 - 4) >= 4 (16 + 2 * 16) from n = 96 tokens
    assert auto_path(model, layer, torch.randn(2, 95, 16), grad=True) == "dense"
    assert auto_path(model, layer, torch.randn(2, 96, 16), grad=True) == "gather"
    conv_model, conv = build(nn.Conv2d(4, 4, 3, padding=1), layout)  # n* = 3.6 positions, fan-in 36
    conv_model.eval()
    assert auto_path(conv_model, conv, torch.randn(1, 4, 6, 6)) == "merge"
    assert auto_path(conv_model, conv, torch.randn(1, 4, 5, 7)) == "gather"
    assert auto_path(conv_model, conv, torch.randn(2, 4, 6, 6)) == "gather"  # batched convolutions never merge
    static_model, static = build(nn.Linear(16, 16), SlotLayout(r=4, num_shared_ranks=4), router="linear")
    static_model.eval()
    with torch.no_grad():  # static gates: all tokens of the call share one merged weight
        static_model(torch.randn(4, 4, 16))
        assert static.last_execution_paths["default"] == "merge"
        static_model(torch.randn(3, 5, 16))
        assert static.last_execution_paths["default"] == "dense"
    token_model, token = build(nn.Linear(16, 16), layout, router="linear")
    token_model.eval()
    with torch.no_grad():
        token_model(torch.randn(2, 64, 16))
    assert token.last_execution_paths["default"] == "dense"


def _saved_bytes_of_training_call(model, layer, x, cond, path) -> int:
    layer.execution_path["default"] = path
    owned = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in owned:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), rankmoe.condition(model, cond):
        model(x.requires_grad_(True)).sum().backward()
    assert layer.last_execution_paths["default"] == path
    return sum(saved.values())


@pytest.mark.parametrize(("tokens", "gather_keeps_less"), [(300, True), (30, True), (12, False)])
def test_training_gathers_exactly_where_that_keeps_less(tokens, gather_keeps_less) -> None:
    """The memory model behind the training rule, against what autograd really saves (k = 4 of r = 12)."""
    layout = SlotLayout(r=12, num_shared_ranks=2, top_k=2, num_zero_experts=1)
    model, layer = build(nn.Linear(16, 16), layout)
    x, cond = torch.randn(1, tokens, 16), torch.randn(1, CONDITION_DIM)
    dense = _saved_bytes_of_training_call(model, layer, x, cond, "dense")
    gather = _saved_bytes_of_training_call(model, layer, x, cond, "gather")
    assert (gather < dense) == gather_keeps_less
    layer.execution_path["default"] = "auto"
    assert auto_path(model, layer, x, grad=True) == ("gather" if gather_keeps_less else "dense")


def test_new_layers_take_the_mode_of_the_wrapped_layer() -> None:
    base = nn.Linear(16, 16).eval()
    model, layer = build(base, SlotLayout(r=6, num_shared_ranks=2, top_k=2, num_zero_experts=1))
    assert not layer.training and not layer.rankmoe_router["default"].training


def test_fixed_paths_refused_for_per_token_routing() -> None:
    for path in ("gather", "merge"):
        with pytest.raises(ValueError, match=f"execution_path='{path}' needs one gate set per sample"):
            RankMoEConfig(r=4, num_shared_ranks=2, top_k=1, router="linear", execution_path=path)
    with pytest.raises(ValueError, match="execution_path='fast' is not one of"):
        RankMoEConfig(r=4, num_shared_ranks=2, top_k=1, execution_path="fast")
    RankMoEConfig(r=4, num_shared_ranks=4, top_k=0, router="linear", execution_path="merge")  # nothing routed


def test_merge_refuses_active_dropout() -> None:
    layout = SlotLayout(r=6, num_shared_ranks=2, top_k=2, num_zero_experts=1)
    model, layer = build(nn.Linear(8, 8), layout, lora_dropout=0.5, execution_path="merge")
    with pytest.raises(ValueError, match="cannot apply lora_dropout"), rankmoe.condition(model, torch.randn(2, 3)):
        model(torch.randn(2, 4, 8))
    model.eval()
    with torch.no_grad(), rankmoe.condition(model, torch.randn(2, 3)):
        model(torch.randn(2, 4, 8))
    assert layer.last_execution_paths["default"] == "merge"


def test_bf16_base_with_fp32_adapter_on_every_path() -> None:
    layout = SlotLayout(r=10, num_shared_ranks=2, top_k=3, num_zero_experts=2)
    model, layer = build(nn.Linear(32, 32), layout)
    model.eval()
    x, cond = torch.randn(2, 40, 32), torch.randn(2, CONDITION_DIM)
    expected = run(model, layer, x, cond, "dense")
    layer.get_base_layer().to(torch.bfloat16)
    for path in PATHS:
        out = run(model, layer, x.bfloat16(), cond, path)
        assert out.dtype == torch.bfloat16
        assert rel_err(out, expected) <= 2e-2, path


# ---------------------------------------------------------------------------------------------------- compile
@pytest.mark.parametrize("path", ["dense", "gather", "merge", "auto"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_one_graph_across_routings(path, kind) -> None:
    torch._dynamo.reset()
    layout = SlotLayout(r=10, num_shared_ranks=2, top_k=3, num_zero_experts=2)
    base = nn.Linear(8, 8) if kind == "linear" else nn.Conv2d(3, 4, 3, padding=1)
    model, layer = build(base, layout)
    model.eval()
    layer.execution_path["default"] = path
    inner = model.base_model.model
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(inner, backend=counter, fullgraph=True)
    x = torch.randn(2, 12, 8) if kind == "linear" else torch.randn(2, 3, 5, 5)
    seen = set()
    for seed in range(4):
        torch.manual_seed(seed)
        cond = torch.randn(2, CONDITION_DIM) * 5
        bias_zero_slots(layer, 50.0 if seed == 2 else 0.0)  # one call with zero slots selected
        with torch.no_grad(), rankmoe.condition(model, cond):
            expected = inner(x)
            out = compiled(x)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        seen.add(tuple(layer._rankmoe_records["default"].top_indices.flatten().tolist()))
        bias_zero_slots(layer, -50.0 if seed == 2 else 0.0)
    assert len(seen) > 2, "the test needs different routings"
    assert counter.frame_count == 1
