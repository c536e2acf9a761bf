"""Registries of the pluggable parts: attacks, base defenses, add-ons and models.

A class joins a registry with a decorator that also names its config schema:

    @ATTACKS.register("pgd", schema=PGDConfig)
    class PGD(Attack): ...

Config nodes select an entry by `name` (`defense.name: trades`, `eval.attacks.x.name: pgd`); validation
checks the node against the entry's schema, and the builders construct the class from the validated
schema. A plugin package registers its own classes the same way in its own module and announces the
module under the entry-point group `robust_train.plugins` (see `load_plugins`), so adding an attack,
defense or add-on touches one Python file and one YAML outside `robust_train/`.

This module imports nothing from the package at import time (the parts are imported by `load_plugins`
when a name is first looked up), so any layer may import it without a cycle.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Generic, TypeVar

from robust_train.errors import ConfigError

PLUGIN_GROUP = "robust_train.plugins"

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered class and the schema of its config node."""

    name: str
    cls: T
    schema: Any
    module: str


class Registry(Generic[T]):
    """Name -> (class, schema) for one kind of part; names are unique."""

    def __init__(self, kind: str, key: str) -> None:
        self.kind = kind  # "attack", "defense", ...
        self.key = key  # the config key that names an entry, for messages ("defense.name")
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, schema: Any = None) -> Callable[[T], T]:
        """Class decorator: register `cls` under `name` with its config `schema`."""

        def decorate(cls: T) -> T:
            module = getattr(cls, "__module__", "?")
            old = self._entries.get(name)
            if old is not None and (old.module, getattr(old.cls, "__qualname__", "")) != (
                module,
                getattr(cls, "__qualname__", ""),
            ):
                raise ConfigError(
                    f"{self.kind} {name!r} is registered twice: by {old.module} and by {module}"
                )
            self._entries[name] = Entry(name, cls, schema, module)
            return cls

        return decorate

    def get(self, name: Any, key: str | None = None) -> Entry[T]:
        """The entry named `name`; ConfigError with the closest names otherwise."""
        load_plugins()
        entry = self._entries.get(str(name)) if isinstance(name, str) else None
        if entry is None:
            close = difflib.get_close_matches(str(name), list(self._entries), n=1, cutoff=0.5)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            raise ConfigError(
                f"{key or self.key}={name!r} is not a known {self.kind}{hint} "
                f"(allowed: {', '.join(sorted(self._entries))})"
            )
        return entry

    def peek(self, name: str) -> Entry[T] | None:
        """The entry named `name` if already registered, without importing any part (import-time use)."""
        return self._entries.get(name)

    def names(self) -> list[str]:
        load_plugins()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        load_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        load_plugins()
        return iter(list(self._entries.values()))


ATTACKS: Registry[Any] = Registry("attack", "attack.name")
DEFENSES: Registry[Any] = Registry("defense", "defense.name")
ADDONS: Registry[Any] = Registry("add-on", "addons")
MODELS: Registry[Any] = Registry("model", "model.name")
DATASETS: Registry[Any] = Registry("dataset", "dataset.name")

# Hydra config group of each registry's schema defaults (`schema/<group>/<name>`, see store_schema_defaults).
_GROUPS: dict[str, Registry[Any]] = {
    "attack": ATTACKS,
    "defense": DEFENSES,
    "addons": ADDONS,
    "model": MODELS,
    "dataset": DATASETS,
}
# Schemas of the config nodes that are not picked from a registry, by their Hydra config path under
# `schema/` ("trainer", "eval", "logger/wandb"); the modules that define them add them here.
NODE_SCHEMAS: dict[str, Any] = {}

_loaded = False
_stored: frozenset[tuple[str, str, int]] = frozenset()


def load_plugins() -> None:
    """Import every module announced under the `robust_train.plugins` entry-point group (once).

    The package's own parts are imported first, so a plugin may subclass them.
    """
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in (
        "robust_train.attacks",
        "robust_train.defenses",
        "robust_train.addons",
        "robust_train.models",
        "robust_train.data",
        "robust_train.config",  # the run-level nodes (trainer, eval, logger) in NODE_SCHEMAS
    ):
        importlib.import_module(module)
    for ep in metadata.entry_points(group=PLUGIN_GROUP):
        try:
            ep.load()
        except Exception as err:  # a broken plugin must say which one, not fail somewhere later
            raise ConfigError(
                f"plugin {ep.name!r} ({ep.value}) failed to import: {type(err).__name__}: {err}"
            ) from err


def store_schema_defaults() -> None:
    """Every schema's defaults as a Hydra config: `schema/<group>/<name>` and `schema/<node>`.

    A group's YAML extends them (`defaults: [/schema/model/resnet18@_here_, _self_]`) and lists only
    the values that differ, so each default is written once, in the schema, while a `key=value`
    override still finds its key in the composed config (Hydra refuses keys it has not composed).
    Called on every composition of robust-train's configs (by the search-path plugin); cheap after
    the first call, and again complete after a plugin registers more parts.
    """
    global _stored
    load_plugins()
    entries = [(f"schema/{group}", e.name, e.schema) for group, reg in _GROUPS.items() for e in reg]
    entries += [("schema/" + path.rpartition("/")[0] if "/" in path else "schema",
                 path.rpartition("/")[2], schema) for path, schema in NODE_SCHEMAS.items()]  # fmt: skip
    key = frozenset((group, name, id(schema)) for group, name, schema in entries if schema is not None)
    if key == _stored:
        return
    from hydra.core.config_store import ConfigStore

    from robust_train.schema import defaults_node

    store = ConfigStore.instance()
    for group, name, schema in entries:
        if schema is not None:
            registered = None if group == "schema" else name
            store.store(group=group, name=name, node=defaults_node(schema, registered))
    _stored = key
