"""AutoAttack through the official code (the `pyautoattack` package), behind a thin adapter
(docs/methods/autoattack.md#adapter).

The adapter runs the official attacks in the standard order, each only on the points that are still
robust, exactly as `run_standard_evaluation` does. It calls the official runner once per attack so
that it can (1) record the robust accuracy after every attack and (2) save a state file after every
attack, from which an interrupted evaluation resumes. `pyautoattack`'s own state restore is not used
because its restore path leaves `y_adv` undefined when an attack still has points to perturb.
"""

from __future__ import annotations

import importlib
import logging
import time
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from robust_train.attacks.base import Attack, AttackConfig, Objective, attack_mode
from robust_train.attacks.threat import ThreatModel
from robust_train.errors import ConfigError
from robust_train.io import atomic_write
from robust_train.registry import ATTACKS
from robust_train.schema import NonNegativeInt, PositiveInt

VERSIONS = {
    "standard": ["apgd-ce", "apgd-t", "fab-t", "square"],
    "lite": ["apgd-ce", "apgd-t"],
}
_NORMS = {"linf": "Linf", "l2": "L2"}


def load_autoattack_class() -> tuple[type, str, str]:
    """The official AutoAttack class, its package name and version (pyautoattack, else GitHub autoattack)."""
    from importlib import metadata

    for module, dist in (("pyautoattack", "pyautoattack"), ("autoattack", "autoattack")):
        try:
            cls = importlib.import_module(module).AutoAttack
        except ImportError:
            continue
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            version = "unknown"
        return cls, module, version
    raise ConfigError("AutoAttack needs the `pyautoattack` package: pip install pyautoattack")


class _LogCapture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


class AutoAttackConfig(AttackConfig):
    """`autoattack`: the official attacks of `version`; eps and norm default to the run's threat model.

    `state_path` (null: the evaluation sets one in its output folder) lets a long evaluation resume.
    """

    version: Literal["standard", "lite"] = "standard"
    seed: NonNegativeInt = 0
    batch_size: PositiveInt = 500
    state_path: str | None = None


@ATTACKS.register("autoattack", schema=AutoAttackConfig)
class AutoAttack(Attack):
    """AutoAttack `standard` (APGD-CE, APGD-T, FAB-T, Square) or `lite` (APGD-CE, APGD-T).

    Works on a whole evaluation set at once (`whole_set`): the official code batches internally.
    After a call, `report` holds the robust accuracy after each attack, the official log lines and
    the package that ran.
    """

    name = "autoattack"
    whole_set = True

    def __init__(
        self,
        threat: ThreatModel,
        version: str = "standard",
        seed: int = 0,
        batch_size: int = 500,
        state_path: str | Path | None = None,
    ) -> None:
        super().__init__(bn_mode="eval")
        if version not in VERSIONS:
            raise ConfigError(f"autoattack version={version!r} is not known; allowed: {', '.join(VERSIONS)}")
        if threat.norm not in _NORMS:
            raise ConfigError(f"AutoAttack supports norms {', '.join(_NORMS)}, not {threat.norm!r}")
        self.threat = threat
        self.version = version
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.state_path = Path(state_path) if state_path else None
        self.report: dict[str, Any] = {}
        if version == "lite":
            self.name = "autoattack_lite"

    def make_official(self, model: nn.Module, device: torch.device) -> Any:
        """The official AutoAttack object with the standard version's parameters."""
        cls, _, _ = load_autoattack_class()
        return cls(model, norm=_NORMS[self.threat.norm], eps=self.threat.eps, version="standard",
                   device=str(device), seed=self.seed)  # fmt: skip

    def _load_state(self, n: int, device: torch.device, x: torch.Tensor) -> dict[str, Any] | None:
        if self.state_path is None or not self.state_path.exists():
            return None
        state = torch.load(self.state_path, map_location=device, weights_only=True)
        fingerprint = self._fingerprint(x)
        if state.get("fingerprint") != fingerprint or state.get("attacks") != VERSIONS[self.version]:
            raise ConfigError(
                f"AutoAttack state {self.state_path} belongs to another evaluation (other data, eps or "
                "version); delete it to start over"
            )
        return state

    def _fingerprint(self, x: torch.Tensor) -> list[float]:
        return [float(x.shape[0]), float(x.double().sum()), self.threat.eps, float(self.seed)]

    def _save_state(self, state: dict[str, Any]) -> None:
        if self.state_path is not None:
            atomic_write(self.state_path, lambda tmp: torch.save(state, tmp))

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, objective: Objective | None = None
    ) -> torch.Tensor:
        if objective is not None:
            raise ConfigError("AutoAttack uses its own losses; it cannot ascend a custom objective")
        with attack_mode(model, "eval"):
            return self.perturb(model, x, y, objective)  # type: ignore[arg-type]

    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, objective: Objective
    ) -> torch.Tensor:
        device = x.device
        x = x.detach()
        attacks = VERSIONS[self.version]
        state = self._load_state(x.shape[0], device, x)
        if state is None:
            with torch.no_grad():
                robust = torch.cat(
                    [model(x[i : i + self.batch_size]).argmax(1) == y[i : i + self.batch_size]
                     for i in range(0, x.shape[0], self.batch_size)]
                )  # fmt: skip
            state = {
                "fingerprint": self._fingerprint(x),
                "attacks": attacks,
                "done": {},
                "robust": robust,
                "x_adv": x.clone(),
                "clean_accuracy": 100.0 * robust.sum().item() / robust.numel(),
            }
            self._save_state(state)
        robust, x_adv = state["robust"].to(device), state["x_adv"].to(device)
        official = self.make_official(model, device)
        _, package, version = load_autoattack_class()
        capture = _LogCapture()
        logger = logging.getLogger("auto-attack")
        old_level, old_propagate = logger.level, logger.propagate
        logger.addHandler(capture)
        logger.setLevel(logging.DEBUG)
        # The package's per-batch debug lines go to the report only, not to the console and cli.log.
        logger.propagate = False
        try:
            for attack in attacks:
                if attack in state["done"]:
                    continue
                start = time.perf_counter()
                idx = robust.nonzero().flatten()
                if idx.numel() > 0:
                    official.attacks_to_run = [attack]
                    adv, _ = official.run_standard_evaluation(x[idx], y[idx], batch_size=self.batch_size)
                    with torch.no_grad():
                        fooled = torch.cat(
                            [model(adv[i : i + self.batch_size]).argmax(1) != y[idx][i : i + self.batch_size]
                             for i in range(0, idx.numel(), self.batch_size)]
                        )  # fmt: skip
                    x_adv[idx[fooled]] = adv[fooled]
                    robust[idx[fooled]] = False
                state["done"][attack] = {
                    "robust_accuracy": 100.0 * robust.sum().item() / robust.numel(),
                    "time_s": round(time.perf_counter() - start, 3),
                }
                state["robust"], state["x_adv"] = robust, x_adv
                self._save_state(state)
        finally:
            logger.removeHandler(capture)
            logger.setLevel(old_level)
            logger.propagate = old_propagate
        self.report = {
            "package": package,
            "package_version": version,
            "version": self.version,
            "attacks": attacks,
            "clean_accuracy": state["clean_accuracy"],
            "robust_accuracy_after": {a: d["robust_accuracy"] for a, d in state["done"].items()},
            "time_s_per_attack": {a: d["time_s"] for a, d in state["done"].items()},
            "log": capture.lines,
        }
        return x_adv

    def describe(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "attacks": VERSIONS[self.version],
            "norm": self.threat.norm,
            "eps": self.threat.eps,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "bn_mode": "eval",
        }
