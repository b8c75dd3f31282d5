"""Run PEFT's own generic tuner tests against RankMoE.

How it works:

1. ``scripts/fetch_peft_tests.py`` puts ``testing_common.py``, ``testing_utils.py``, ``test_custom_models.py`` and
   ``test_config.py`` of the *installed* PEFT version into ``tests/upstream/peft_tests/`` (git-ignored). This
   conftest calls it; it does nothing when the files of that version are already there.
2. This conftest imports those modules under the names pytest gives them, so pytest reuses the same module
   objects, and appends RankMoE rows to upstream's parametrization tables before pytest collects them.
3. :func:`pytest_collection_modifyitems` keeps only the RankMoE items of those modules, deselects the tests that
   need the Hugging Face Hub and skips the upstream expectations that cannot hold for RankMoE, each with its reason.

Every RankMoE item has "RankMoE" in its id, so ``pytest tests/upstream -k RankMoE`` selects exactly them.

Environment variables:

* ``RANKMOE_UPSTREAM_TESTS``: ``auto`` (default; fetch, and if that fails skip these tests with a warning),
  ``required`` (a failed fetch is an error) or ``off`` (do not collect them).
* ``RANKMOE_UPSTREAM_ALL_METHODS=1``: keep upstream's items of the other PEFT methods too (thousands, slow).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import rankmoe  # noqa: F401  (registers the PEFT method RANKMOE before upstream's modules are imported)
from rankmoe import RankMoEConfig

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
FETCH_SCRIPT = REPO_ROOT / "scripts" / "fetch_peft_tests.py"
UPSTREAM_DIR = HERE / "peft_tests"
MODE = os.environ.get("RANKMOE_UPSTREAM_TESTS", "auto").strip().lower()
ALL_METHODS = os.environ.get("RANKMOE_UPSTREAM_ALL_METHODS", "") not in ("", "0")
MARKER = "RankMoE"

# --------------------------------------------------------------------------------------------------------------------
# RankMoE rows for upstream's tables
# --------------------------------------------------------------------------------------------------------------------
# Upstream's generic tests build the config from these kwargs and, where a test needs an adapter that is not the
# identity, turn ``init_weights`` off themselves (``testing_utils.set_init_weights_false``: for a config class it does
# not know it sets ``init_weights=False``, which is RankMoE's field). The upstream LoRA rows of ``TEST_CASES`` leave
# the init at its default, and so do ours; the multi-adapter and mixed-batch tables set ``init_weights=False``
# explicitly upstream, and so do ours.
#
# The ``condition`` router is not in this matrix: it routes on a per-sample condition that has to be set with
# ``rankmoe.condition(model, cond)`` around every forward, and upstream's tests build and call their models
# themselves. Its routing is covered by our own tests.

ALL_SHARED = {"r": 8, "num_shared_ranks": 8, "top_k": 0}  # no router: a plain LoRA of rank 8
TOKEN_ZERO = {"r": 8, "num_shared_ranks": 2, "top_k": 2, "num_zero_experts": 2, "router": "linear"}
POOLED = {"r": 8, "num_shared_ranks": 2, "expert_rank": 2, "top_k": 2, "router": "pooled"}
STATIC = {"r": 8, "num_shared_ranks": 2, "top_k": 3, "num_zero_experts": 1, "router": "static"}
TOKEN = {"r": 8, "num_shared_ranks": 2, "top_k": 2, "router": "linear"}

# (test_name, model_id, config_cls, config_kwargs); model ids are those of upstream's MockTransformerWrapper.
RANKMOE_TEST_CASES: list[tuple[str, str, type, dict[str, Any]]] = [
    # the target_modules / modules_to_save / alpha+dropout variants of upstream's "Vanilla MLP n LoRA" rows
    ("Vanilla MLP 1 RankMoE all shared", "MLP", RankMoEConfig, {"target_modules": "lin0", **ALL_SHARED}),
    ("Vanilla MLP 2 RankMoE all shared", "MLP", RankMoEConfig, {"target_modules": ["lin0"], **ALL_SHARED}),
    ("Vanilla MLP 3 RankMoE all shared", "MLP", RankMoEConfig, {"target_modules": ["lin1"], **ALL_SHARED}),
    ("Vanilla MLP 4 RankMoE all shared", "MLP", RankMoEConfig, {"target_modules": ["lin0", "lin1"], **ALL_SHARED}),
    (
        "Vanilla MLP 5 RankMoE all shared modules_to_save",
        "MLP",
        RankMoEConfig,
        {"target_modules": ["lin0"], "modules_to_save": ["lin1"], **ALL_SHARED},
    ),
    (
        "Vanilla MLP 6 RankMoE all shared alpha dropout",
        "MLP",
        RankMoEConfig,
        {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1, **ALL_SHARED},
    ),
    # routers
    ("Vanilla MLP 7 RankMoE token router zero slots", "MLP", RankMoEConfig, {"target_modules": "lin0", **TOKEN_ZERO}),
    (
        "Vanilla MLP 8 RankMoE token router zero slots",
        "MLP",
        RankMoEConfig,
        {"target_modules": ["lin0", "lin1"], **TOKEN_ZERO},
    ),
    (
        "Vanilla MLP 9 RankMoE token router modules_to_save",
        "MLP",
        RankMoEConfig,
        {"target_modules": ["lin0"], "modules_to_save": ["lin1"], **TOKEN},
    ),
    (
        "Vanilla MLP 10 RankMoE pooled router expert_rank 2",
        "MLP",
        RankMoEConfig,
        {"target_modules": ["lin0", "lin1"], **POOLED},
    ),
    ("Vanilla MLP 11 RankMoE static router", "MLP", RankMoEConfig, {"target_modules": ["lin0", "lin1"], **STATIC}),
    # convolutions and transformers' Conv1D
    (
        "Embedding + transformers Conv1D 1 RankMoE token router",
        "EmbConv1D",
        RankMoEConfig,
        {"target_modules": ["conv1d"], **TOKEN},
    ),
    ("Conv1d 1 RankMoE token router", "Conv1d", RankMoEConfig, {"target_modules": ["conv1d"], **TOKEN}),
    ("Conv1d 2 RankMoE all shared", "Conv1d", RankMoEConfig, {"target_modules": ["conv1d"], **ALL_SHARED}),
    ("Conv2d 1 RankMoE token router", "Conv2d", RankMoEConfig, {"target_modules": ["conv2d"], **TOKEN}),
    (
        "Conv2d 2 RankMoE token router zero slots",
        "Conv2d",
        RankMoEConfig,
        {"target_modules": ["conv2d", "lin0"], **TOKEN_ZERO},
    ),
    ("Conv2d 3 RankMoE pooled router", "Conv2d", RankMoEConfig, {"target_modules": ["conv2d"], **POOLED}),
    ("Conv2d 4 RankMoE static router", "Conv2d", RankMoEConfig, {"target_modules": ["conv2d"], **STATIC}),
]

# (test_name, tuner_method, config_cls, config_kwargs_1, config_kwargs_2); upstream uses its MLP for these.
RANKMOE_MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES: list[tuple[str, str, type, dict[str, Any], dict[str, Any]]] = [
    (
        f"RankMoE {label} {placement}",
        "rankmoe",
        RankMoEConfig,
        {"target_modules": ["lin0"], "init_weights": False, **kwargs},
        {"target_modules": [second], "init_weights": False, **kwargs},
    )
    for label, kwargs in (("all shared", ALL_SHARED), ("token router", TOKEN_ZERO), ("static router", STATIC))
    for placement, second in (("Same", "lin0"), ("Different", "lin1"))
]

# (test_name, config0, config1); upstream's MLP with two adapters on lin0. The mixed-batch check compares the rows of
# a mixed batch with full-batch outputs using torch.allclose at its default tolerances, while the adapter of a
# sub-batch runs its GEMMs on 3 instead of 9 rows, which MKL may round differently (~1e-6 here, for LoRA as well).
# The rows below are chosen so that those rounding differences stay within the tolerance (a static pair with r=8
# and r=16 did not; upstream's LoRA pair passes for the same reason, not by construction).
RANKMOE_MIXED_ADAPTER_TEST_CASES: list[tuple[str, RankMoEConfig, RankMoEConfig]] = [
    (
        "RankMoE token router mixed adapter",
        RankMoEConfig(target_modules=["lin0"], init_weights=False, **TOKEN_ZERO),
        RankMoEConfig(target_modules=["lin0"], init_weights=False, **{**TOKEN, "r": 16}),
    ),
    (
        "RankMoE pooled router mixed adapter",
        RankMoEConfig(target_modules=["lin0"], init_weights=False, **POOLED),
        RankMoEConfig(target_modules=["lin0"], init_weights=False, **ALL_SHARED),
    ),
    (
        "RankMoE static router mixed adapter",
        RankMoEConfig(target_modules=["lin0"], init_weights=False, **STATIC),
        RankMoEConfig(target_modules=["lin0"], init_weights=False, **STATIC, router_kwargs={"selected": [3, 4, 6]}),
    ),
]

# --------------------------------------------------------------------------------------------------------------------
# Deselected and skipped upstream tests
# --------------------------------------------------------------------------------------------------------------------
# Tests that load a config from the Hugging Face Hub: ``PEFT_MODELS_TO_TEST`` in test_config.py, i.e.
# ``peft-internal-testing/tiny-opt-lora-revision`` at revision ``test``. Offline (HF_HUB_OFFLINE=1, as our tests run)
# they fail for every PEFT method with "Can't find 'adapter_config.json'", so they are deselected by name:
# 3 tests, 1 RankMoE item each. (Every RankMoE row of test_custom_models.py uses local mock models; the Hub-loading
# tests there are LoRA-specific and not parametrized by method, so the RankMoE filter already drops them.)
HUB_TESTS: frozenset[tuple[str, str]] = frozenset(
    {
        ("test_config.py", "test_from_pretrained"),
        ("test_config.py", "test_from_pretrained_cache_dir"),
        ("test_config.py", "test_save_pretrained_with_runtime_config"),
    }
)

# RankMoE can merge an adapter into the base weight only when its routing does not depend on the input (every rank
# shared, or router='static'); for an input-dependent router there is no single dense weight and RankMoELayer.merge
# raises a ValueError on purpose. Upstream's hook for "this method cannot merge",
# testing_common._skip_if_merging_not_supported, knows only PEFT's own classes; it is wrapped below so that the
# merging tests skip (after their non-merging part has run) for routed RankMoE adapters.
MERGE_SKIP_REASON = "RankMoE merges only input-independent routing (all ranks shared or router='static')"

# Merging tests that do not call upstream's hook (they take config objects): skipped at collection for routed adapters.
MERGING_TESTS_WITHOUT_HOOK: frozenset[str] = frozenset({"test_mixed_adapter_batches_merged_raises"})

# Upstream expectations that cannot hold for one RankMoE row: (test name, row name) -> reason.
NOT_APPLICABLE: dict[tuple[str, str], str] = {
    # The test trains 3 SGD steps with lr=0.5 on the raw integer inputs arange(90) and requires every trainable
    # parameter to move by more than 1e-4. After the first step lin0's adapter has grown lin1's input so much that
    # lin1's router logits are ~[41, -1, -34] before that router was ever updated (its step-1 gradient is 0 because
    # B starts at 0); the softmax is saturated, the top-2-of-3 gate weights no longer depend on the logits, and lin1's
    # router gets gradients of ~1e-6 and then exactly 0. With standard-normal inputs every parameter moves. Any
    # softmax router on unnormalised inputs behaves like this; the token-router rows happen to stay unsaturated.
    ("test_only_params_are_updated", "Vanilla MLP 10 RankMoE pooled router expert_rank 2"): (
        "router softmax saturates on upstream's unnormalised inputs (arange(90), lr=0.5): lin1's router gets no "
        "gradient after step 1"
    ),
}


# --------------------------------------------------------------------------------------------------------------------
# Fetching and importing upstream's modules
# --------------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _fetch_lock() -> Iterator[None]:
    """Serialise fetching between processes (pytest-xdist workers load this conftest each)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, fetching is still atomic per folder
        yield
        return
    digest = hashlib.sha1(str(UPSTREAM_DIR).encode()).hexdigest()[:12]
    lock_path = Path(tempfile.gettempdir()) / f"rankmoe-peft-tests-{digest}.lock"
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _load_fetch_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_rankmoe_fetch_peft_tests", FETCH_SCRIPT)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {FETCH_SCRIPT}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ensure_upstream_tests() -> str | None:
    """Fetch upstream's tests if needed; return why they are unavailable, or ``None`` if they are there."""
    fetch_script = _load_fetch_script()
    try:
        with _fetch_lock():
            fetch_script.fetch(UPSTREAM_DIR)
    except fetch_script.FetchError as exc:
        return f"could not fetch PEFT's tests ({exc})"
    return None


def _import_upstream(name: str) -> ModuleType:
    """Import ``peft_tests.<name>`` relative to this package, i.e. under the name pytest will use for it."""
    if not __package__:
        raise pytest.UsageError(
            "tests/upstream/conftest.py was imported outside its package (--import-mode=importlib?); PEFT's tests "
            "use relative imports and need the default --import-mode=prepend"
        )
    return importlib.import_module(f".peft_tests.{name}", __package__)


# --------------------------------------------------------------------------------------------------------------------
# Extending upstream's tables
# --------------------------------------------------------------------------------------------------------------------
def _append_rows(table: list[Any], rows: list[Any]) -> None:
    """Append ``rows`` to ``table`` in place (idempotent by test name, the first entry of a row)."""
    present = {row[0] for row in table}
    table.extend(row for row in rows if row[0] not in present)


def _merges_statically(config: RankMoEConfig) -> bool:
    """Whether ``config``'s routing is input-independent, i.e. the adapter can be merged."""
    return not config.slot_layout.is_routed or config.router == "static"


def _rankmoe_aware_merge_skip(original: Callable[..., None]) -> Callable[..., None]:
    """Wrap upstream's ``_skip_if_merging_not_supported`` so it also skips routed RankMoE adapters."""

    def skip_if_merging_not_supported(model_id: str, config_cls: type, config_kwargs: dict[str, Any]) -> None:
        if config_cls is RankMoEConfig and not _merges_statically(RankMoEConfig(**config_kwargs)):
            pytest.skip(MERGE_SKIP_REASON)
        original(model_id, config_cls, config_kwargs)

    skip_if_merging_not_supported.__wrapped__ = original  # type: ignore[attr-defined]
    return skip_if_merging_not_supported


def _patch_merge_hook(*modules: ModuleType) -> None:
    """Replace ``_skip_if_merging_not_supported`` in every module that imported it by name."""
    for module in modules:
        original = module._skip_if_merging_not_supported
        if not hasattr(original, "__wrapped__"):
            module._skip_if_merging_not_supported = _rankmoe_aware_merge_skip(original)


def _extend_custom_models(module: ModuleType) -> None:
    _append_rows(module.TEST_CASES, RANKMOE_TEST_CASES)
    if RankMoEConfig not in module.ALL_PEFT_CONFIG_CLASSES:
        module.ALL_PEFT_CONFIG_CLASSES.append(RankMoEConfig)
    _append_rows(module.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES, RANKMOE_MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES)
    if hasattr(module, "MIXED_ADAPTER_TEST_CASES"):
        _append_rows(module.MIXED_ADAPTER_TEST_CASES, RANKMOE_MIXED_ADAPTER_TEST_CASES)


def _replace_parametrize_values(func: Any, old: Any, new: Any) -> None:
    """Rewrite ``func``'s ``parametrize`` marks whose values are the object ``old`` to use ``new``."""
    marks = getattr(func, "pytestmark", None)
    if not marks:
        return
    rewritten = []
    for mark in marks:
        if mark.name == "parametrize" and len(mark.args) >= 2 and mark.args[1] is old:
            mark = pytest.mark.parametrize(mark.args[0], new, *mark.args[2:], **mark.kwargs).mark
        rewritten.append(mark)
    func.pytestmark = rewritten


def _extend_config_tests(module: ModuleType) -> None:
    """Add ``(RankMoEConfig, {})`` to test_config.py's tuple ``ALL_CONFIG_CLASSES``.

    The tuple is immutable and already captured by the ``parametrize`` marks of the test methods, so the marks are
    rewritten to the extended tuple.
    """
    old = module.ALL_CONFIG_CLASSES
    if any(row[0] is RankMoEConfig for row in old):
        return
    new = (*old, (RankMoEConfig, {}))
    for obj in list(vars(module).values()):
        if isinstance(obj, type) and obj.__name__.startswith("Test"):
            for attr in vars(obj).values():
                _replace_parametrize_values(attr, old, new)
        elif callable(obj) and getattr(obj, "__name__", "").startswith("test"):
            _replace_parametrize_values(obj, old, new)
    module.ALL_CONFIG_CLASSES = new
    layer_indexing = getattr(module, "LAYER_INDEXING_CONFIG_CLASSES", None)
    if isinstance(layer_indexing, list):  # RankMoEConfig has layers_to_transform and layers_pattern
        _append_rows(layer_indexing, [(RankMoEConfig, {})])


UNAVAILABLE: str | None = None
EXTENDED_MODULES: list[ModuleType] = []
DESELECTED: dict[str, int] = {"other PEFT methods": 0, "need the Hugging Face Hub": 0}
collect_ignore: list[str] = []

if MODE == "off":
    collect_ignore.append("peft_tests")
else:
    UNAVAILABLE = _ensure_upstream_tests()
    if UNAVAILABLE is not None:
        if MODE == "required":
            raise pytest.UsageError(f"RANKMOE_UPSTREAM_TESTS=required but {UNAVAILABLE}")
        warnings.warn(f"skipping PEFT's upstream tests: {UNAVAILABLE}", stacklevel=1)
        collect_ignore.append("peft_tests")
    else:
        EXTENDED_MODULES.append(_import_upstream("test_custom_models"))
        _extend_custom_models(EXTENDED_MODULES[-1])
        _patch_merge_hook(_import_upstream("testing_common"), EXTENDED_MODULES[-1])
        EXTENDED_MODULES.append(_import_upstream("test_config"))
        _extend_config_tests(EXTENDED_MODULES[-1])


# --------------------------------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------------------------------
def pytest_configure(config: pytest.Config) -> None:
    # markers that upstream's pyproject.toml registers and the fetched modules use (we run with --strict-markers)
    for line in (
        "bitsandbytes: PEFT upstream: bitsandbytes integration tests",
        "single_gpu_tests: PEFT upstream: tests that run on a single GPU",
        "multi_gpu_tests: PEFT upstream: tests that run on multiple GPUs",
        "regression: PEFT upstream: regression suite",
    ):
        config.addinivalue_line("markers", line)


def pytest_report_header(config: pytest.Config) -> str:
    if MODE == "off":
        return "rankmoe upstream PEFT tests: off (RANKMOE_UPSTREAM_TESTS=off)"
    if UNAVAILABLE is not None:
        return f"rankmoe upstream PEFT tests: SKIPPED, {UNAVAILABLE}"
    return f"rankmoe upstream PEFT tests: peft {(UPSTREAM_DIR / 'VERSION').read_text().strip()} in {UPSTREAM_DIR}"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if UNAVAILABLE is not None:
        terminalreporter.write_line(f"rankmoe: PEFT's upstream tests were NOT run: {UNAVAILABLE}", yellow=True)
    elif any(DESELECTED.values()):
        counts = ", ".join(f"{count} {why}" for why, count in DESELECTED.items() if count)
        terminalreporter.write_line(f"rankmoe: upstream PEFT items deselected by tests/upstream/conftest.py: {counts}")


def _is_upstream(item: pytest.Item) -> bool:
    return UPSTREAM_DIR in item.path.parents


def _rankmoe_configs(item: pytest.Item) -> list[RankMoEConfig]:
    """The RankMoE configs an upstream item is parametrized with (empty for other methods)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    configs = [value for value in params.values() if isinstance(value, RankMoEConfig)]
    if params.get("config_cls") is RankMoEConfig:
        for name in ("config_kwargs", "config_kwargs_1", "config_kwargs_2"):
            if isinstance(params.get(name), dict):
                configs.append(RankMoEConfig(**params[name]))
    return configs


def _row_name(item: pytest.Item) -> str | None:
    """The ``test_name`` parameter of an upstream item (the first entry of its table row), if any."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return params.get("test_name")


def _check_module_identity(item: pytest.Item) -> None:
    """Fail if pytest collected another copy of an upstream module than the one extended with RankMoE rows."""
    module = item.getparent(pytest.Module)
    if module is not None and module.obj.__name__.endswith(("test_custom_models", "test_config")):
        if not any(module.obj is extended for extended in EXTENDED_MODULES):
            raise pytest.UsageError(
                f"{module.obj.__name__} was imported twice: tests/upstream/conftest.py added the RankMoE rows to "
                f"{[m.__name__ for m in EXTENDED_MODULES]}, not to the module pytest collected (import mode or "
                "package layout of tests/ changed?)"
            )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keep: list[pytest.Item] = []
    deselected: list[pytest.Item] = []
    for item in items:
        if not _is_upstream(item):
            keep.append(item)
            continue
        _check_module_identity(item)
        name = getattr(item, "originalname", item.name)
        if not (MARKER in item.nodeid or ALL_METHODS):
            DESELECTED["other PEFT methods"] += 1
            deselected.append(item)
            continue
        if (item.path.name, name) in HUB_TESTS:
            DESELECTED["need the Hugging Face Hub"] += 1
            deselected.append(item)
            continue
        row = _row_name(item)
        if (name, row) in NOT_APPLICABLE:
            item.add_marker(pytest.mark.skip(reason=f"not applicable to RankMoE: {NOT_APPLICABLE[name, row]}"))
        elif name in MERGING_TESTS_WITHOUT_HOOK and not all(_merges_statically(c) for c in _rankmoe_configs(item)):
            item.add_marker(pytest.mark.skip(reason=MERGE_SKIP_REASON))
        keep.append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = keep
