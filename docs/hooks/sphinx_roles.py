"""MkDocs hook: render Sphinx cross-reference roles left in docstrings as code, linked where possible.

Some docstrings in ``rankmoe`` use Sphinx roles such as ``:class:`~rankmoe.RankMoEConfig``` or
``:func:`register_router```. mkdocstrings renders docstrings as Markdown, where such a role would show up
verbatim (``:class:RankMoEConfig``). This hook rewrites each role into inline code wrapped in an *optional*
autorefs cross-reference: the code links to the object's API entry when one exists, and stays plain code
otherwise (never a warning). Display follows Sphinx: ``~a.b.C`` shows ``C``, ``a.b.C`` shows ``a.b.C``.

Short names (``register_router``) are resolved by looking the name up among the objects of the
``rankmoe`` package, loaded statically with griffe (nothing is imported); a name that is ambiguous or
unknown stays plain code.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict

import griffe

log = logging.getLogger("mkdocs.hooks.sphinx_roles")

ROLE_RE = re.compile(r":(?:py:)?(class|func|meth|mod|attr|data|obj|exc):<code>(~?)([A-Za-z_][\w.]*)</code>")

_package: griffe.Object | None = None
_by_name: dict[str, set[str]] = {}


def _walk(obj: griffe.Object, by_name: dict[str, set[str]]) -> None:
    for member in obj.members.values():
        if member.is_alias:
            continue
        by_name[member.name].add(member.path)
        if member.is_module or member.is_class:
            _walk(member, by_name)


def on_config(config, **kwargs):
    global _package, _by_name
    _package = griffe.load("rankmoe", search_paths=["."], resolve_aliases=True, resolve_external=False)
    by_name: dict[str, set[str]] = defaultdict(set)
    _walk(_package, by_name)
    _by_name = dict(by_name)
    return config


def _canonical(role: str, identifier: str) -> str | None:
    """Canonical path of ``identifier`` (dotted or short), or ``None`` when unknown or ambiguous."""
    if "." in identifier:
        head, _, rest = identifier.partition(".")
        if head != "rankmoe" or _package is None:
            return None
        try:
            obj = _package[rest] if rest else _package
            if obj.is_alias:
                obj = obj.final_target
            # `rankmoe.condition` names both a module and the function it exports; a non-`mod` role
            # means the function.
            if role != "mod" and obj.is_module and obj.name in obj.members:
                obj = obj.members[obj.name]
                if obj.is_alias:
                    obj = obj.final_target
            return obj.path
        except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            return None
    paths = _by_name.get(identifier, set())
    return next(iter(paths)) if len(paths) == 1 else None


def _replace(match: re.Match) -> str:
    role, tilde, identifier = match.groups()
    shown = identifier.rsplit(".", 1)[-1] if tilde else identifier
    code = f"<code>{shown}</code>"
    target = _canonical(role, identifier)
    if target is None:
        return code
    return f'<autoref identifier="{target}" optional>{code}</autoref>'


def on_page_content(html, page, **kwargs):
    return ROLE_RE.sub(_replace, html)
