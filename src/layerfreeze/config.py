"""Schedules from config dicts and files (YAML, TOML, JSON).

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
from typing import TYPE_CHECKING, Any

from torch import nn

from .errors import ScheduleError
from .rules import RULES, Rule, ScheduleTypeError

if TYPE_CHECKING:
    from .schedule import Schedule

__all__ = ["load_config", "schedule_from_dict"]

_INT = "an int"
_NUMBER = "a number"
_SELECTOR = "a selector (a string, or a list of strings)"
_MODE = "'norm', 'eval' or 'keep'"

#: each kind's keyword arguments and the type each takes
_KEYS: dict[str, dict[str, str]] = {
    "freeze": {
        "exclude": _SELECTOR,
        "from_epoch": _INT,
        "until_epoch": _INT,
        "from_step": _INT,
        "until_step": _INT,
        "mode": _MODE,
    },
    "gradual_unfreeze": {"start_epoch": _INT, "every": _INT, "lr_decay": _NUMBER, "mode": _MODE},
    "progressive_freeze": {
        "start": _NUMBER,
        "end": _NUMBER,
        "total_epochs": _INT,
        "total_steps": _INT,
        "mode": _MODE,
    },
    "adaptive_freeze": {"check_every": _INT, "percentile": _NUMBER, "min_trainable": _INT, "mode": _MODE},
}
_REQUIRED = {
    "freeze": (),
    "gradual_unfreeze": ("start_epoch",),
    "progressive_freeze": ("start", "end"),
    "adaptive_freeze": ("check_every",),
}


def _type_ok(value: object, expected: str) -> bool:
    if expected == _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected == _NUMBER:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected == _MODE:
        return value in ("norm", "eval", "keep")
    return _selector_ok(value)


def _selector_ok(value: object) -> bool:
    if isinstance(value, (list, tuple)):
        return bool(value) and all(_selector_ok(v) and not isinstance(v, (list, tuple)) for v in value)
    if isinstance(value, str):
        return bool(value.strip())
    # from Python (not from a file) a class or a callable selector is fine too
    return (isinstance(value, type) and issubclass(value, nn.Module)) or (
        callable(value) and not isinstance(value, type)
    )


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
    allowed = _KEYS[kind]
    for key, value in entry.items():
        if key == kind:
            if not _selector_ok(value):
                raise ScheduleTypeError(f"{where}, key {key!r}: expected {_SELECTOR}, got {_describe(value)}")
            continue
        if key not in allowed:
            import difflib

            near = difflib.get_close_matches(str(key), list(allowed), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ScheduleError(
                f"{where}, key {key!r}: unknown key{hint} ({kind} takes {', '.join(map(repr, allowed))})"
            )
        if value is None and key not in _REQUIRED[kind]:
            continue
        if not _type_ok(value, allowed[key]):
            raise ScheduleTypeError(f"{where}, key {key!r}: expected {allowed[key]}, got {_describe(value)}")
    missing = [k for k in _REQUIRED[kind] if entry.get(k) is None]
    if missing:
        raise ScheduleError(f"{where}: missing key {missing[0]!r} ({allowed[missing[0]]})")
    kwargs = {k: v for k, v in entry.items() if k != kind and v is not None}
    rule_cls: Any = RULES[kind]
    try:
        return rule_cls(entry[kind], **kwargs)
    except ScheduleTypeError as exc:
        raise ScheduleTypeError(f"{where}: {exc}") from None
    except (ScheduleError, ValueError) as exc:
        raise ScheduleError(f"{where}: {exc}") from None


def schedule_from_dict(config: object, cls: type[Schedule] | None = None) -> Schedule:
    """Build a :class:`~layerfreeze.Schedule` from ``{"rules": [...]}``.

    Args:
        config: the dict (as read from a config file).
        cls: the schedule class to build (a subclass of Schedule).

    Raises:
        ScheduleError: the dict does not describe a schedule; the message
            names the rule (index and kind) and the key.

    Example:
        >>> schedule_from_dict({"rules": [{"gradual_unfreeze": "layers", "start_epoch": 1}]})
        Schedule([{'gradual_unfreeze': 'layers', 'start_epoch': 1}])
    """
    from .schedule import Schedule

    make = cls or Schedule
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
    return make([_rule_from_dict(i, entry) for i, entry in enumerate(rules)])


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
        ScheduleError: an unknown suffix, or a file that does not parse.
        FileNotFoundError: no such file.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml", ".json"):
        raise ScheduleError(
            f"{path}: unknown config format {suffix or '(no suffix)'!r}; use .yaml, .yml, .toml or .json"
        )
    text = path.read_text(encoding="utf-8")
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
