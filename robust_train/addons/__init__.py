"""Add-on methods (SLIM, SAT, LAD, ISEAT, RWT) plug into the training step through `Addon` hooks.

Select them with `addons=[slim]`, `addons=[sat,lad]`, ...; each add-on's config lives under
`addons.<name>` and is validated by the schema registered with its class
(`robust_train.registry.ADDONS`), so a plugin add-on is selected and checked the same way.
"""

from __future__ import annotations

from typing import Any

# The add-on modules register their classes on import.
from robust_train.addons import iseat, lad, rwt, sat, slim  # noqa: F401
from robust_train.addons.base import Addon, AddonConfig, AddonContext, addon_config
from robust_train.errors import ConfigError
from robust_train.registry import ADDONS, DEFENSES
from robust_train.schema import check_node

__all__ = [
    "Addon",
    "AddonConfig",
    "AddonContext",
    "addon_config",
    "build_addons",
    "check_addon",
    "check_addons",
    "selected",
    "supported_defenses",
]


def selected(run_cfg: Any) -> list[tuple[str, Any]]:
    """(name, config) of the selected add-ons, in the order they were listed."""
    node = run_cfg.get("addons") if hasattr(run_cfg, "get") else None
    if not node:
        return []
    return [(str(name), cfg) for name, cfg in node.items() if cfg is not None and cfg.get("enabled", True)]


def supported_defenses(cls: type[Addon]) -> list[str]:
    """The registered base defenses `cls` composes with, in registration order."""
    if cls.supported_defenses is not None:
        return list(cls.supported_defenses)
    return [
        e.name
        for e in DEFENSES
        if not cls.needs_adversarial or getattr(e.cls, "train_branch", "clean") == "adv"
    ]


def check_addon(name: str, node: Any, run_cfg: Any = None) -> list[str]:
    """Problems of one add-on node: its schema's, then its run-level rules (`check_config`)."""
    try:
        entry = ADDONS.get(name, key="addons")
    except ConfigError as err:
        return [str(err)]
    config, problems = check_node(entry.schema, node, f"addons.{name}")
    # Run-level rules are reported with the node's own problems, so one round trip shows all of them.
    return problems + entry.cls.check_config(config, run_cfg)


def check_addons(run_cfg: Any) -> list[str]:
    """Problems with the selected add-ons' nodes and their combination with the base defense and
    each other (an empty list: fine)."""
    problems: list[str] = []
    chosen = selected(run_cfg)
    names = [n for n, _ in chosen]
    defense_node = run_cfg.get("defense") if hasattr(run_cfg, "get") else None
    defense = defense_node.get("name") if defense_node is not None else None
    awp = defense_node.get("awp") if defense_node is not None else None
    awp_on = bool(awp and awp.get("enabled"))
    for name, cfg in chosen:
        try:
            cls = ADDONS.get(name, key="addons").cls
        except ConfigError as err:
            problems.append(str(err))
            continue
        problems.extend(check_addon(name, cfg, run_cfg))
        supported = supported_defenses(cls)
        if defense in DEFENSES and defense not in supported:
            allowed = ", ".join(supported)
            problems.append(f"addons=[{name}] does not compose with defense={defense}; supported: {allowed}")
        if awp_on and not cls.supports_awp:
            problems.append(
                f"addons=[{name}] cannot run with defense.awp.enabled=true (two weight perturbations)"
            )
        for other in cls.conflicts_with:
            if other in names:
                problems.append(f"addons {name} and {other} cannot be combined: both perturb the weights")
    return problems


def build_addons(run_cfg: Any, ctx_kwargs: dict[str, Any]) -> list[Addon]:
    """Instantiate the selected add-ons in config order, each from its validated config."""
    chosen = selected(run_cfg)
    if not chosen:
        return []
    ctx = AddonContext(cfg=run_cfg, **ctx_kwargs)
    addons = []
    for name, cfg in chosen:
        cls = ADDONS.get(name, key="addons").cls
        addons.append(cls(addon_config(name, cfg), ctx))
    return addons
