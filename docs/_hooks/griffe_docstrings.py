"""Griffe extension: read this project's docstrings as the docs mean them.

* ``Example:`` sections become ``Examples:`` (the section name griffe's Google
  parser knows), so doctest lines render as code, not as Markdown.
* Sphinx roles (``:func:`select```, ``:class:`~layerfreeze.Schedule```,
  ``:meth:`Schedule.timeline```) become cross-references resolved against
  ``layerfreeze``: one that points nowhere is a warning, so the strict build
  fails on it.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:func|class|meth|attr|mod|data|exc|obj):`(~?)([\w.]+)`")
_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.M)


def _target(name: str, obj: griffe.Object) -> str:
    if name.startswith("layerfreeze"):
        return name
    # a bare name means a member of the object itself, else of its class or module
    owner: griffe.Object | None = obj
    while "." not in name and owner is not None:
        if name in owner.members:
            return f"{owner.path}.{name}"
        owner = owner.parent
    return f"layerfreeze.{name}"


class ProjectDocstrings(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is None:
            return

        def ref(m: re.Match[str]) -> str:
            tilde, name = m.groups()
            shown = name.rsplit(".", 1)[-1] if tilde else name
            return f"[`{shown}`][{_target(name, obj)}]"

        text = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
        obj.docstring.value = _ROLE.sub(ref, text)
