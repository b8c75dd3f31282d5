"""``gated_update``: same values and gradients as the plain autograd graph, less kept for backward."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
import torch._dynamo.testing
from hypothesis import given, settings

from rankmoe.gated_update import gated_update


def _reference(result, hidden, matrix_b, gates, channels_first):
    """The plain graph: ``result + B (g * h)`` with autograd's own backward."""
    if gates.shape != hidden.shape:  # per sample (b, r)
        gates = gates.unsqueeze(-1) if channels_first else gates.unsqueeze(1)
    if channels_first:
        return result + torch.einsum("or,brn->bon", matrix_b, hidden * gates)
    return result + (hidden * gates) @ matrix_b.t()


def _inputs(batch, tokens, rank, out, per_token, channels_first, dtype=torch.float64):
    generator = torch.Generator().manual_seed(batch * 1000 + tokens * 10 + rank)

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype).requires_grad_(True)

    if channels_first:
        hidden, result = rand(batch, rank, tokens), rand(batch, out, tokens)
        gates = rand(batch, rank, tokens) if per_token else rand(batch, rank)
    else:
        hidden, result = rand(batch, tokens, rank), rand(batch, tokens, out)
        gates = rand(batch, tokens, rank) if per_token else rand(batch, rank)
    return result, hidden, rand(out, rank), gates


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3), tokens=st.integers(1, 9), rank=st.integers(1, 6), out=st.integers(1, 7),
    per_token=st.booleans(), channels_first=st.booleans(),
)
def test_values_and_gradients_match_plain_autograd(batch, tokens, rank, out, per_token, channels_first) -> None:
    inputs = _inputs(batch, tokens, rank, out, per_token, channels_first)
    grad_out = torch.randn_like(inputs[0])
    ours = gated_update(*inputs, channels_first=channels_first)
    grads = torch.autograd.grad(ours, inputs, grad_out)
    expected = _reference(*inputs, channels_first)
    expected_grads = torch.autograd.grad(expected, inputs, grad_out)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    for name, got, want in zip(("result", "hidden", "B", "gates"), grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=lambda m, n=name: f"grad of {n}: {m}")


@pytest.mark.parametrize("channels_first", [False, True])
@pytest.mark.parametrize("per_token", [False, True])
def test_twice_differentiable(channels_first, per_token) -> None:
    inputs = _inputs(2, 3, 4, 5, per_token, channels_first)
    assert torch.autograd.gradgradcheck(
        lambda *t: gated_update(*t, channels_first=channels_first), inputs, eps=1e-6, atol=1e-5
    )


def test_frozen_inputs_get_no_gradient() -> None:
    result, hidden, matrix_b, gates = _inputs(2, 4, 3, 5, per_token=False, channels_first=False)
    gates = gates.detach()
    matrix_b = matrix_b.detach()
    out = gated_update(result, hidden, matrix_b, gates)
    out.sum().backward()
    assert hidden.grad is not None and result.grad is not None
    assert matrix_b.grad is None and gates.grad is None


def _saved_bytes(fn) -> int:
    saved: dict[int, int] = {}

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved.values())


@pytest.mark.parametrize("tokens", [64, 4])  # 64 >= o: gates folded into B; 4 < o: gates multiply h
@pytest.mark.parametrize("channels_first", [False, True])
def test_keeps_hidden_gates_and_b_only(channels_first, tokens) -> None:
    """The plain graph keeps ``h``, ``g``, ``g * h`` and ``B``; ours drops the ``(b, n, r)`` product."""
    # per-sample gates: the plain graph of the folded form keeps a gated copy of B instead, (b, o, r)
    batch, rank, out = 2, 8, 16
    inputs = _inputs(batch, tokens, rank, out, per_token=False, channels_first=channels_first, dtype=torch.float32)
    hidden_bytes = batch * tokens * rank * 4
    gate_bytes = batch * rank * 4
    b_bytes = out * rank * 4
    ours = _saved_bytes(lambda: gated_update(*inputs, channels_first=channels_first))
    plain = _saved_bytes(lambda: _reference(*inputs, channels_first))
    assert ours == hidden_bytes + gate_bytes + b_bytes
    assert plain - ours >= hidden_bytes  # the product the plain graph keeps on top


def test_inference_skips_the_autograd_function() -> None:
    inputs = [t.detach() for t in _inputs(1, 5, 3, 4, per_token=True, channels_first=False)]
    with torch.no_grad():
        out = gated_update(*inputs)
    assert out.grad_fn is None
    torch.testing.assert_close(out, _reference(*inputs, False))


def test_compiles_to_one_graph_with_backward() -> None:
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(lambda *t: gated_update(*t, channels_first=True), backend=counter, fullgraph=True)
    inputs = _inputs(2, 6, 3, 4, per_token=False, channels_first=True, dtype=torch.float32)
    out = compiled(*inputs)
    grads = torch.autograd.grad(out.sum(), inputs)
    expected = torch.autograd.grad(_reference(*inputs, True).sum(), inputs)
    assert counter.frame_count == 1
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels_first", [False, True])
def test_backward_under_autocast_matches_plain_autograd(channels_first) -> None:
    """Under bf16 autocast the backward mixes bf16 outputs with fp32 weights as autograd's own nodes do."""
    inputs = _inputs(2, 8, 4, 6, per_token=False, channels_first=channels_first, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = gated_update(*inputs, channels_first=channels_first)
        expected = _reference(*[t.to(torch.bfloat16) for t in inputs], channels_first)
    grads = torch.autograd.grad(ours.float().sum(), inputs)
    expected_grads = torch.autograd.grad(expected.float().sum(), inputs)
    assert ours.dtype == torch.bfloat16
    for tensor, got, want in zip(inputs, grads, expected_grads, strict=True):
        assert got.dtype == tensor.dtype
        torch.testing.assert_close(got, want.float(), rtol=3e-2, atol=3e-2)


def test_gates_of_another_shape_are_refused() -> None:
    result, hidden, matrix_b, _ = _inputs(1, 4, 3, 5, per_token=False, channels_first=False)
    with pytest.raises(ValueError, match=r"gates of shape \(1, 1, 3\) fit neither hidden \(1, 4, 3\)"):
        gated_update(result, hidden, matrix_b, torch.ones(1, 1, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("channels_first", [False, True])
@pytest.mark.parametrize("per_token", [False, True])
def test_cuda_under_bf16_autocast_matches_plain_autograd(channels_first, per_token) -> None:
    inputs = [
        t.detach().cuda().requires_grad_(True)
        for t in _inputs(2, 64, 8, 32, per_token=per_token, channels_first=channels_first, dtype=torch.float32)
    ]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours = gated_update(*inputs, channels_first=channels_first)
        expected = _reference(*[t.to(torch.bfloat16) for t in inputs], channels_first)
    grads = torch.autograd.grad(ours.float().sum(), inputs)
    expected_grads = torch.autograd.grad(expected.float().sum(), inputs)

    def relative(a, b):  # bf16 rounds the two graphs differently element by element: compare the whole tensor
        return float((a.float() - b.float()).norm() / b.float().norm())

    assert ours.dtype == torch.bfloat16
    assert relative(ours, expected) <= 1e-2
    for tensor, got, want in zip(inputs, grads, expected_grads, strict=True):
        assert got.dtype == tensor.dtype and got.device == tensor.device
        assert relative(got, want) <= 1e-2
