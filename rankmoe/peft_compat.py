"""Everything that touches PEFT internals lives here: the ``PeftType`` member and the method registration.

PEFT 0.21 has no public route for out-of-tree methods: :func:`peft.utils.register_peft_method` only accepts
names that already are members of the closed ``PeftType`` enum. We add the member ``RANKMOE`` at import
time and then call the official registration function, so every PEFT registry (config, tuner, prefix) is
filled by PEFT itself. The steps are idempotent and checked: if a future PEFT changes the enum or the
registration signature, importing rankmoe fails with a message saying so instead of misbehaving later.
"""

from __future__ import annotations

import inspect
from enum import EnumMeta

import peft
from packaging import version
from peft.utils import peft_types

METHOD_NAME = "rankmoe"
PEFT_TYPE_NAME = "RANKMOE"
PREFIX = "rankmoe_"
MIN_PEFT_VERSION = "0.21.0"


def check_peft_version(installed: str | None = None) -> None:
    """Fail clearly on a PEFT release older than the supported floor.

    Args:
        installed: Version string to check; defaults to the installed ``peft.__version__``.

    Raises:
        ImportError: If the version is below ``MIN_PEFT_VERSION``.
    """
    installed = installed or peft.__version__
    if version.parse(installed) < version.parse(MIN_PEFT_VERSION):
        raise ImportError(f"rankmoe needs peft>={MIN_PEFT_VERSION}, found peft=={installed}; upgrade peft")


def ensure_peft_type_member() -> peft_types.PeftType:
    """Add ``PeftType.RANKMOE`` to PEFT's enum if it is not there yet and return it.

    The member is a ``str`` instance (``PeftType`` is a ``(str, Enum)``) whose value is ``"RANKMOE"``, so
    ``PeftType("RANKMOE")``, ``PeftType.RANKMOE``, iteration, pickling and the JSON ``"peft_type"`` string all
    work like for a built-in method.

    Raises:
        RuntimeError: If ``PeftType`` is no longer a ``str`` enum (PEFT changed; rankmoe must be updated).
    """
    enum_cls = peft_types.PeftType
    if PEFT_TYPE_NAME in enum_cls.__members__:
        return enum_cls[PEFT_TYPE_NAME]
    if not (isinstance(enum_cls, EnumMeta) and issubclass(enum_cls, str)):
        raise RuntimeError(
            f"peft {peft.__version__}: PeftType is not a str Enum any more; this rankmoe release cannot register"
        )
    member = str.__new__(enum_cls, PEFT_TYPE_NAME)
    member._name_ = PEFT_TYPE_NAME
    member._value_ = PEFT_TYPE_NAME
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    add_member = getattr(enum_cls, "_add_member_", None)  # CPython >= 3.13
    if add_member is not None:
        add_member(PEFT_TYPE_NAME, member)
    else:
        enum_cls._member_map_[PEFT_TYPE_NAME] = member
        type.__setattr__(enum_cls, PEFT_TYPE_NAME, member)
    if PEFT_TYPE_NAME not in enum_cls._member_names_:
        enum_cls._member_names_.append(PEFT_TYPE_NAME)
    enum_cls._value2member_map_[PEFT_TYPE_NAME] = member
    return member


def register_with_peft(config_cls: type, model_cls: type) -> None:
    """Register RankMoE as the PEFT method ``rankmoe`` (idempotent).

    Args:
        config_cls: :class:`~rankmoe.RankMoEConfig`.
        model_cls: :class:`~rankmoe.RankMoEModel`.

    Raises:
        RuntimeError: If another class is already registered as ``RANKMOE``, or if ``register_peft_method``
            changed its signature.
    """
    from peft import mapping

    check_peft_version()
    peft_type = ensure_peft_type_member()
    registered_config = mapping.PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if registered_config is not None:
        if registered_config is not config_cls or mapping.PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is not model_cls:
            raise RuntimeError(
                f"PEFT type {PEFT_TYPE_NAME} is already registered with {registered_config!r}; two copies of rankmoe "
                "imported under different module names?"
            )
        return
    for prefix_type, prefix in mapping.PEFT_TYPE_TO_PREFIX_MAPPING.items():
        if prefix == PREFIX:
            raise RuntimeError(f"prefix {PREFIX!r} is already used by PEFT method {prefix_type}")
    parameters = inspect.signature(peft_types.register_peft_method).parameters
    expected = {"name", "config_cls", "model_cls", "prefix"}
    if not expected <= set(parameters):
        raise RuntimeError(
            f"peft {peft.__version__}: register_peft_method takes {sorted(parameters)}, expected at least "
            f"{sorted(expected)}; this rankmoe release does not support that PEFT version"
        )
    peft_types.register_peft_method(name=METHOD_NAME, config_cls=config_cls, model_cls=model_cls, prefix=PREFIX)


def target_module_mapping() -> dict[str, list[str]]:
    """PEFT's default LoRA target modules per transformers ``model_type`` (reused as RankMoE defaults)."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    return TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
