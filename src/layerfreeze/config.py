"""Schedules from config dicts and files (YAML, TOML, JSON).

This module turns config data into rules (:func:`rules_from_dict`); it knows
nothing of :class:`~layerfreeze.Schedule`, which builds itself from those rules.
The shape mirrors the method calls of :class:`~layerfreeze.Schedule`::

    rules:
      - freeze: bert.embeddings
        until_epoch: 4
      - gradual_unfreeze: bert.encoder.layer
        start_epoch: 2
        lr_decay: 0.8

In each rule the key that names the kind holds its selector (or groups); the
other keys are its keyword arguments. Every problem is reported with the rule's
index and kind and the key at fault. PyYAML is imported only here, and only
when a YAML file is read.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ScheduleError, ScheduleTypeError
from .rules import _DESCRIBE, RULES, Param, Rule, _selector_ok

__all__ = ["load_config", "rules_from_dict"]

def _spec(kind: str) -> dict[str, Param]:
    """Each keyword argument of a rule kind, from the rule's own spec."""
    return {p.name: p for p in RULES[kind].params}


def _describe(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def _rule_from_dict(i: int, entry: object) -> Rule:
    if not isinstance(entry, Mapping):
        raise ScheduleTypeError(
            f"rule {i}: expected a mapping like {{'freeze': 'encoder', 'until_epoch': 2}}, got {_describe(entry)}"
        )
    kinds = [k for k in entry if k in RULES]
    if len(kinds) != 1:
        what = f"several rule kinds ({', '.join(map(repr, kinds))})" if kinds else "no rule kind"
        raise ScheduleError(
            f"rule {i}: {what}; each rule has exactly one of the keys "
            f"{', '.join(map(repr, RULES))} (keys given: {', '.join(map(repr, entry))})"
        )
    kind = kinds[0]
    where = f"rule {i} ({kind})"
    allowed = _spec(kind)
    for key, value in entry.items():
        if key == kind:
            if not _selector_ok(value):
                raise ScheduleTypeError(
                    f"{where}, key {key!r}: expected {_DESCRIBE['selector']}, got {_describe(value)}"
                )
            continue
        if key not in allowed:
            import difflib

            near = difflib.get_close_matches(str(key), list(allowed), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ScheduleError(
                f"{where}, key {key!r}: unknown key{hint} ({kind} takes {', '.join(map(repr, allowed))})"
            )
        if value is None and not allowed[key].required:
            continue
        if not allowed[key].accepts(value):
            raise ScheduleTypeError(
                f"{where}, key {key!r}: expected {allowed[key].describe()}, got {_describe(value)}"
            )
    missing = [name for name, p in allowed.items() if p.required and entry.get(name) is None]
    if missing:
        raise ScheduleError(f"{where}: missing key {missing[0]!r} ({allowed[missing[0]].describe()})")
    kwargs = {k: v for k, v in entry.items() if k != kind and v is not None}
    rule_cls: Any = RULES[kind]
    try:
        return rule_cls(entry[kind], **kwargs)
    except ScheduleTypeError as exc:
        raise ScheduleTypeError(f"{where}: {exc}") from None
    except (ScheduleError, ValueError) as exc:
        raise ScheduleError(f"{where}: {exc}") from None


def rules_from_dict(config: object) -> list[Rule]:
    """The rules of a schedule config ``{"rules": [...]}``, validated.

    Args:
        config: the dict (as read from a config file).

    Returns:
        The rules, in order; ``Schedule(rules)`` (or
        :meth:`Schedule.from_dict <layerfreeze.Schedule.from_dict>`) makes the schedule.

    Raises:
        ScheduleError: the dict does not describe a schedule; the message
            names the rule (index and kind) and the key.

    Example:
        >>> [r.kind for r in rules_from_dict({"rules": [{"gradual_unfreeze": "layers", "start_epoch": 1}]})]
        ['gradual_unfreeze']
    """
    if not isinstance(config, Mapping):
        raise ScheduleTypeError(
            f"a schedule config must be a mapping with a 'rules' list, got {_describe(config)}"
        )
    unknown = [k for k in config if k != "rules"]
    if unknown:
        raise ScheduleError(
            f"unknown top-level key {unknown[0]!r} in a schedule config; it holds only 'rules'"
        )
    rules = config.get("rules")
    if not isinstance(rules, list):
        raise ScheduleTypeError(f"key 'rules': expected a list of rules, got {_describe(rules)}")
    return [_rule_from_dict(i, entry) for i, entry in enumerate(rules)]


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ScheduleError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _load_yaml(text: str, path: Path) -> Any:
    try:
        import yaml
    except ImportError:  # pragma: no cover - depends on the installation
        raise ImportError(
            f"reading {path} needs PyYAML: pip install 'layerfreeze[config]' (or use a .toml or .json file)"
        ) from None

    class UniqueKeyLoader(yaml.SafeLoader):
        """A safe loader that refuses a key given twice in one mapping
        (plain PyYAML keeps the last one silently)."""

    def construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
        loader.flatten_mapping(node)
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            line = key_node.start_mark.line + 1
            try:
                first = seen.setdefault(key, line)
            except TypeError:
                continue  # an unhashable key: the mapping constructor reports it
            if first != line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given on line {first})", key_node.start_mark
                )
        return loader.construct_mapping(node, deep=deep)

    UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ScheduleError(f"{path}: not valid YAML: {exc}") from None


def load_config(path: str | Path) -> Any:
    """Read a config file into plain Python data, by its suffix.

    ``.yaml``/``.yml`` (PyYAML, safe loading, duplicate keys rejected),
    ``.toml`` (``tomllib``, or ``tomli`` before Python 3.11) and ``.json``
    (duplicate keys rejected).

    Raises:
        ScheduleError: an unknown suffix, a file that is not UTF-8 text, or
            that does not parse; the message names the file.
        FileNotFoundError: no such file.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml", ".json"):
        raise ScheduleError(
            f"{path}: unknown config format {suffix or '(no suffix)'!r}; use .yaml, .yml, .toml or .json"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ScheduleError(
            f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
            "save the config as UTF-8"
        ) from None
    if suffix in (".yaml", ".yml"):
        return _load_yaml(text, path)
    if suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            try:
                import tomli as tomllib
            except ImportError:
                raise ImportError(f"reading {path} on Python 3.10 needs tomli: pip install 'layerfreeze[config]'") from None
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ScheduleError(f"{path}: not valid TOML: {exc}") from None
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicates)
    except json.JSONDecodeError as exc:
        raise ScheduleError(f"{path}: not valid JSON: {exc}") from None
    except ScheduleError as exc:
        raise ScheduleError(f"{path}: {exc}") from None
