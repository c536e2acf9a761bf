"""Add-on methods (SLIM, SAT, LAD, ISEAT, RWT) plug into the training step through `Addon` hooks.

Select them with `addons=[slim]`, `addons=[sat,lad]`, ...; each add-on's config lives under
`addons.<name>` (conf/addons/<name>.yaml). Classes are imported lazily by name.
"""

from __future__ import annotations

import importlib
from typing import Any

from robust_train.addons.base import Addon, AddonContext
from robust_train.errors import ConfigError

__all__ = ["ADDON_NAMES", "Addon", "AddonContext", "addon_class", "build_addons", "check_addons"]

# name -> "module:Class"
_REGISTRY = {
    "slim": "robust_train.addons.slim:SLIM",
    "sat": "robust_train.addons.sat:SAT",
    "lad": "robust_train.addons.lad:LAD",
    "iseat": "robust_train.addons.iseat:ISEAT",
    "rwt": "robust_train.addons.rwt:RWT",
}
ADDON_NAMES = tuple(_REGISTRY)


def addon_class(name: str) -> type[Addon]:
    """The class registered under `name`."""
    if name not in _REGISTRY:
        raise ConfigError(
            f"addons contains {name!r}, which is not a known add-on; allowed: {', '.join(ADDON_NAMES)}"
        )
    module, cls = _REGISTRY[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"add-on {name!r} is not available in this version ({err})") from None


def selected(run_cfg: Any) -> list[tuple[str, Any]]:
    """(name, config) of the selected add-ons, in the order they were listed."""
    node = run_cfg.get("addons") if hasattr(run_cfg, "get") else None
    if not node:
        return []
    return [(str(name), cfg) for name, cfg in node.items() if cfg is not None and cfg.get("enabled", True)]


def check_addons(run_cfg: Any) -> list[str]:
    """Problems with the selected add-ons and their combination with the base defense and each other."""
    problems: list[str] = []
    chosen = selected(run_cfg)
    names = [n for n, _ in chosen]
    defense = run_cfg.defense.get("name")
    awp = run_cfg.defense.get("awp")
    awp_on = bool(awp and awp.get("enabled"))
    for name, cfg in chosen:
        try:
            cls = addon_class(name)
        except ConfigError as err:
            problems.append(str(err))
            continue
        if defense not in cls.supported_defenses:
            allowed = ", ".join(cls.supported_defenses)
            problems.append(f"addons=[{name}] does not compose with defense={defense}; supported: {allowed}")
        if awp_on and not cls.supports_awp:
            problems.append(
                f"addons=[{name}] cannot run with defense.awp.enabled=true (two weight perturbations)"
            )
        for other in cls.conflicts_with:
            if other in names:
                problems.append(f"addons {name} and {other} cannot be combined: both perturb the weights")
        problems.extend(cls.check_config(cfg, run_cfg))
    return problems


def build_addons(run_cfg: Any, ctx_kwargs: dict[str, Any]) -> list[Addon]:
    """Instantiate the selected add-ons in config order."""
    chosen = selected(run_cfg)
    if not chosen:
        return []
    ctx = AddonContext(cfg=run_cfg, **ctx_kwargs)
    return [addon_class(name)(cfg, ctx) for name, cfg in chosen]
