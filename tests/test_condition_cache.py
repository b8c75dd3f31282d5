"""``ConditionCache``: misses computed once in one batch, order, content keys, LRU eviction, errors, device/dtype."""

from __future__ import annotations

import pytest
import torch

from rankmoe.conditioning.base import DegradationEstimator, DegradationScores
from rankmoe.conditioning.cache import ConditionCache, content_keys


class CountingEstimator:
    """Scores ``(b, 2)`` = (mean, max) of each image, severity = mean; records every batch it is called with."""

    names = ("mean", "max")

    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []

    def __call__(self, images: torch.Tensor) -> DegradationScores:
        self.batches.append(images.clone())
        flat = images.flatten(1).float()
        scores = torch.stack([flat.mean(dim=1), flat.amax(dim=1)], dim=1)
        return DegradationScores(scores=scores, severity=flat.mean(dim=1), names=self.names)


class MeanEstimator(DegradationEstimator):
    """A real estimator subclass (validates images, returns on the images' device and dtype)."""

    names = ("mean",)

    def score(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().mean(dim=(1, 2, 3))[:, None]


def expected(images: torch.Tensor) -> DegradationScores:
    return CountingEstimator()(images)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(6, 3, 8, 8)


def test_misses_are_computed_once_in_one_batch(images) -> None:
    estimator = CountingEstimator()
    cache = ConditionCache(estimator)
    first = cache(images[:4])
    assert len(estimator.batches) == 1 and estimator.batches[0].shape[0] == 4
    second = cache(images[:4])  # all hits
    assert len(estimator.batches) == 1
    torch.testing.assert_close(second.scores, first.scores)
    torch.testing.assert_close(second.severity, first.severity)
    assert (cache.hits, cache.misses, len(cache)) == (4, 4, 4)
    for _ in range(5):  # "denoising steps": the same images again and again
        cache(images[:4])
    assert len(estimator.batches) == 1 and cache.hits == 24


def test_order_is_kept_with_mixed_hits_and_misses(images) -> None:
    estimator = CountingEstimator()
    cache = ConditionCache(estimator)
    cache(images[[1, 3]])
    order = [5, 1, 0, 3, 2, 1]
    out = cache(images[order])
    # only the three unseen images (5, 0, 2) were computed, in one batch, in order of first appearance
    assert len(estimator.batches) == 2
    torch.testing.assert_close(estimator.batches[1], images[[5, 0, 2]])
    reference = expected(images[order])
    torch.testing.assert_close(out.scores, reference.scores)
    torch.testing.assert_close(out.severity, reference.severity)
    assert out.names == ("mean", "max")
    # within-call repeat (image 1 twice) and earlier hits are counted as hits
    assert (cache.hits, cache.misses) == (3, 5)


def test_repeats_within_one_call_are_computed_once(images) -> None:
    estimator = CountingEstimator()
    cache = ConditionCache(estimator)
    out = cache(images[[2, 2, 2, 4]])
    assert estimator.batches[0].shape[0] == 2
    torch.testing.assert_close(out.scores, expected(images[[2, 2, 2, 4]]).scores)
    assert (cache.hits, cache.misses) == (2, 2)


def test_content_keys_equal_for_identical_images(images) -> None:
    copy = images.clone()
    assert content_keys(images) == content_keys(copy)
    assert len(set(content_keys(images))) == 6
    changed = images.clone()
    changed[2, 0, 0, 0] += 1e-3
    keys, changed_keys = content_keys(images), content_keys(changed)
    assert [a == b for a, b in zip(keys, changed_keys, strict=True)] == [True, True, False, True, True, True]
    assert content_keys(images.double())[0] != keys[0]  # dtype enters the key
    assert content_keys(images.reshape(6, 3, 4, 16))[0] != keys[0]  # so does the shape
    assert content_keys(images[:, :, ::2])[0] == content_keys(images[:, :, ::2].contiguous())[0]  # strides do not
    assert len(content_keys(torch.rand(2, 3, 4, 4).to(torch.bfloat16))) == 2
    estimator = CountingEstimator()
    cache = ConditionCache(estimator)
    cache(images[:2])
    cache(copy[:2])  # a different tensor with the same content: hits
    assert len(estimator.batches) == 1


def test_user_keys_skip_hashing_and_serve_tiles(images) -> None:
    estimator = CountingEstimator()
    cache = ConditionCache(estimator)
    ids = [f"img{i}.png" for i in range(3)]
    scores = cache(images[:3], keys=ids)
    tile_to_image = [0, 0, 0, 0, 1, 1, 2, 2, 2]
    per_tile = scores[tile_to_image]
    torch.testing.assert_close(per_tile.scores, expected(images[:3]).scores[tile_to_image])
    looked_up = cache.lookup([ids[i] for i in tile_to_image])
    torch.testing.assert_close(looked_up.scores, per_tile.scores)
    torch.testing.assert_close(looked_up.severity, per_tile.severity)
    assert len(estimator.batches) == 1
    with pytest.raises(KeyError, match="img9.png"):
        cache.lookup(["img0.png", "img9.png"])
    assert "img1.png" in cache and "img9.png" not in cache


def test_capacity_evicts_the_least_recently_used(images) -> None:
    estimator = CountingEstimator()
    cache = ConditionCache(estimator, capacity=3)
    cache(images[:3], keys=["a", "b", "c"])
    cache(images[[0]], keys=["a"])  # touch "a": "b" is now the least recently used
    cache(images[[3]], keys=["d"])  # evicts "b"
    assert len(cache) == 3 and "b" not in cache and all(key in cache for key in "acd")
    cache(images[[1]], keys=["b"])  # computed again, evicts "c"
    assert len(estimator.batches) == 3 and "c" not in cache
    # a batch with more distinct misses than the capacity still returns every row, in order
    out = cache(images, keys=list("uvwxyz"))
    torch.testing.assert_close(out.scores, expected(images).scores)
    assert len(cache) == 3 and all(k in cache for k in "xyz")


def test_clear_resets_rows_and_statistics(images) -> None:
    estimator = CountingEstimator()
    cache = ConditionCache(estimator)
    cache(images[:2])
    cache(images[:2])
    cache.clear()
    assert (len(cache), cache.hits, cache.misses) == (0, 0, 0)
    cache(images[:2])
    assert len(estimator.batches) == 2


def test_device_and_dtype_follow_the_images(images) -> None:
    cache = ConditionCache(MeanEstimator())
    half = cache(images[:3].half())
    assert half.scores.dtype == torch.float16 and half.severity.dtype == torch.float16
    double = cache(images[:3].half().double())  # other dtype: other content key, computed afresh
    assert double.scores.dtype == torch.float64
    cache = ConditionCache(CountingEstimator())
    cache(images[:2], keys=[0, 1])
    out = cache(images[:2].double(), keys=[0, 1])  # hits, returned in the new batch's dtype
    assert out.scores.dtype == torch.float64 and out.severity.dtype == torch.float64
    assert cache.lookup([0], dtype=torch.float16).scores.dtype == torch.float16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_results_follow_a_cuda_batch(images) -> None:
    estimator = CountingEstimator()
    cache = ConditionCache(estimator)
    cpu = cache(images[:2])
    gpu = cache(images[:2].cuda())  # same content: hits, moved to the batch's device
    assert gpu.scores.device.type == "cuda" and gpu.severity.device.type == "cuda"
    assert len(estimator.batches) == 1
    torch.testing.assert_close(gpu.scores.cpu(), cpu.scores)
    fresh = cache(images[2:4].cuda().half())  # misses computed on the GPU batch
    assert fresh.scores.device.type == "cuda" and fresh.scores.dtype == torch.float16


def test_tensor_outputs_and_prompt_keys() -> None:
    calls: list[list[str]] = []

    def embed(prompts: list[str]) -> torch.Tensor:
        calls.append(list(prompts))
        return torch.tensor([[float(len(p)), 1.0] for p in prompts])

    cache = ConditionCache(embed)
    out = cache(["ab", "abc", "ab"])
    assert torch.equal(out, torch.tensor([[2.0, 1.0], [3.0, 1.0], [2.0, 1.0]]))
    assert torch.equal(cache("abc"), torch.tensor([[3.0, 1.0]]))
    assert calls == [["ab", "abc"]]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda c, x: c(x[:3], keys=["a", "b"]), ValueError, "2 keys for a batch of 3"),
        (lambda c, x: c(x[:0]), ValueError, "empty"),
        (lambda c, x: c(x[:2], keys=[["a"], ["b"]]), TypeError, "hashable"),
        (lambda c, x: c([object(), object()]), TypeError, "pass keys"),
        (lambda c, x: c(x[0, 0, 0, 0]), ValueError, "0-d"),
        (lambda c, x: c.lookup([]), ValueError, "at least one key"),
    ],
)
def test_errors(images, call, error, match) -> None:
    with pytest.raises(error, match=match):
        call(ConditionCache(CountingEstimator()), images)


def test_estimator_contract_errors(images) -> None:
    with pytest.raises(TypeError, match="callable"):
        ConditionCache("not callable")  # type: ignore[arg-type]
    for capacity in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="capacity"):
            ConditionCache(CountingEstimator(), capacity=capacity)
    with pytest.raises(ValueError, match="1 rows for a batch of 2"):
        ConditionCache(lambda x: torch.zeros(1, 2))(images[:2])
    with pytest.raises(TypeError, match="DegradationScores or a tensor"):
        ConditionCache(lambda x: [0.0] * len(x))(images[:2])
    estimator = CountingEstimator()
    cache = ConditionCache(estimator)
    cache(images[:1])
    estimator.names = ("a", "b")
    with pytest.raises(ValueError, match="columns"):
        cache(images[1:2])
