"""`defense.label_smoothing`: the supervised (role `label`) term of every base defense, and only it.

ls = 0 computes exactly what the defenses computed before (the term is `F.cross_entropy` itself); ls > 0
equals a smoothed CE written out here, and the term's `fn` (what LAD re-evaluates) carries it too.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from pydantic import ValidationError

from robust_train.attacks import ThreatModel
from robust_train.config import validate_train_config
from robust_train.defenses import DefenseConfig, build_defense
from robust_train.defenses.losses import mart_boosted_ce, smoothed_cross_entropy, trades_loss
from robust_train.errors import ConfigError
from robust_train.step_types import StepForwards

EPS = 8 / 255
K = 10


def smoothed_ce_by_hand(logits: torch.Tensor, y: torch.Tensor, ls: float) -> torch.Tensor:
    """Target (1 - ls) one-hot + ls / K uniform: -sum_k t_k log p_k, batch mean."""
    logp = F.log_softmax(logits, dim=1)
    target = torch.full_like(logp, ls / logits.shape[1])
    target[torch.arange(len(y)), y] += 1.0 - ls
    return -(target * logp).sum(dim=1).mean()


def dm_smooth_ce(logits: torch.Tensor, y: torch.Tensor, ls: float) -> torch.Tensor:
    """DM-Improves-AT's SmoothCrossEntropyLoss: (1 - ls) * NLL + ls * mean over classes of -log p."""
    logp = F.log_softmax(logits, dim=-1)
    nll = -logp.gather(1, y.unsqueeze(1)).squeeze(1)
    return ((1.0 - ls) * nll + ls * (-logp.mean(dim=-1))).mean()


def margin_term(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MART's -log(1.0001 - max_{k != y} q_k + 1e-12), batch mean (unchanged by smoothing)."""
    q = F.softmax(logits, dim=1)
    wrong = q.clone()
    wrong[torch.arange(len(y)), y] = -1.0
    return (-torch.log(1.0001 - wrong.max(dim=1).values + 1e-12)).mean()


@pytest.fixture
def logits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(6, K, generator=g, dtype=torch.float64)
    adv = clean + 0.7 * torch.randn(6, K, generator=g, dtype=torch.float64)
    return clean, adv, torch.tensor([0, 3, 3, 9, 5, 1])


def _defense(name: str, **extra):
    cfg = {"name": name, **extra}
    if name != "standard":
        cfg["attack"] = {
            "name": "pgd",
            "steps": 2,
            "step": 2 / 255,
            "random_start": "normal",
            "bn_mode": "eval",
        }
    return build_defense(OmegaConf.create(cfg), ThreatModel("linf", EPS))


class FixedLogits(torch.nn.Module):
    """A 'model' mapping each input batch to fixed logits (the clean or the adversarial ones)."""

    def __init__(self, clean: torch.Tensor, adv: torch.Tensor, x: torch.Tensor) -> None:
        super().__init__()
        self.clean, self.adv, self.x = clean, adv, x

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        return self.clean if inp is self.x else self.adv


def _outer(name: str, logits, **extra):
    clean, adv, y = logits
    x, x_adv = torch.zeros(6, 3, 2, 2), torch.ones(6, 3, 2, 2)
    defense = _defense(name, **extra)
    out = StepForwards(FixedLogits(clean, adv, x), x, y, None if name == "standard" else x_adv)
    return defense, defense.outer_loss(out)


# The label term of each defense: (its name, the branch whose logits it reads).
LABEL_TERMS = {"standard": ("ce", 0), "pgd_at": ("ce_adv", 1), "trades": ("ce_clean", 0), "mart": ("bce", 1)}


@pytest.mark.parametrize("name", list(LABEL_TERMS))
def test_zero_smoothing_is_bit_exact_and_the_term_fn_is_plain_ce(name: str, logits) -> None:
    clean, adv, y = logits
    _, loss = _outer(name, logits)
    default_defense, _ = _outer(name, logits, label_smoothing=0.0)
    assert default_defense.cfg.label_smoothing == 0.0
    term_name, branch = LABEL_TERMS[name]
    term = loss.terms[term_name]
    z = (clean, adv)[branch]
    if name == "mart":
        assert term.fn is mart_boosted_ce
        assert torch.equal(term.value, F.cross_entropy(z, y) + margin_term(z, y))
    else:
        assert term.fn is F.cross_entropy
        assert torch.equal(term.value, F.cross_entropy(z, y))
    if name == "trades":
        assert torch.equal(loss.total(), trades_loss(clean, adv, y, 6.0)[0])


@pytest.mark.parametrize("ls", [0.1, 0.3])
@pytest.mark.parametrize("name", list(LABEL_TERMS))
def test_smoothing_applies_to_the_label_term_and_its_fn(name: str, ls: float, logits) -> None:
    clean, adv, y = logits
    _, plain = _outer(name, logits)
    _, loss = _outer(name, logits, label_smoothing=ls)
    term_name, branch = LABEL_TERMS[name]
    z = (clean, adv)[branch]
    expected = smoothed_ce_by_hand(z, y, ls) + (margin_term(z, y) if name == "mart" else 0.0)
    torch.testing.assert_close(loss.terms[term_name].value, expected)
    assert loss.label is loss.terms[term_name]
    # The recomputation an add-on uses (LAD on its perturbed forward) smooths the same way.
    other = torch.randn(6, K, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    expected_other = smoothed_ce_by_hand(other, y, ls) + (margin_term(other, y) if name == "mart" else 0.0)
    fn = loss.terms[term_name].fn
    assert fn is not None
    torch.testing.assert_close(fn(other, y), expected_other)
    # Every other term is untouched (TRADES' KL, MART's weighted KL).
    for key, term in plain.terms.items():
        if key != term_name:
            assert torch.equal(loss.terms[key].value, term.value), key


def test_smoothed_ce_equals_the_dm_improves_at_loss(logits) -> None:
    clean, _, y = logits
    for ls in (0.0, 0.1, 0.5):
        torch.testing.assert_close(smoothed_cross_entropy(ls)(clean, y), dm_smooth_ce(clean, y, ls))
    assert smoothed_cross_entropy(0.0) is F.cross_entropy


def test_smoothing_leaves_the_attack_objective_alone(tiny_model, batch) -> None:
    x, y = batch
    for name in ("pgd_at", "mart"):
        plain = _defense(name).inner_objective(x, y)(tiny_model.eval(), x)
        smooth = _defense(name, label_smoothing=0.2).inner_objective(x, y)(tiny_model, x)
        assert torch.equal(plain, smooth), name


def test_smoothing_with_lad_reevaluates_the_smoothed_term(compose) -> None:
    # With TRADES, LAD mixes in label.fn evaluated on its perturbed forward of x (trades_gamma < 1).
    from robust_train.addons import build_addons
    from robust_train.builders import model_from_config
    from robust_train.data import build_dataset
    from robust_train.training.step import TrainStep

    def lad_loss(ls: float) -> tuple[float, float]:
        cfg = compose([
            "dataset=synthetic", "dataset.train_size=16", "dataset.val_size=4", "dataset.test_size=4",
            "model.width=0.0625", "defense=trades", "addons=[lad]", "addons.lad.trades_gamma=0.5",
            f"defense.label_smoothing={ls}", "defense.attack.steps=1", "logger=none",
        ])  # fmt: skip
        validate_train_config(cfg)
        torch.manual_seed(0)
        data = build_dataset(cfg.dataset, 0)
        model = model_from_config(cfg.model, data)
        threat = ThreatModel("linf", EPS)
        defense = build_defense(cfg.defense, threat)
        addons = build_addons(cfg, {"model": model, "defense": defense, "threat": threat, "num_classes": 10,
                                    "seed": 0})  # fmt: skip
        for a in addons:
            a.on_epoch_start(int(cfg.trainer.epochs))
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        m = TrainStep(model, defense, opt, addons)(data.train_x[:8].float() / 255, data.train_y[:8])
        return float(m["lad/label_lad"]), float(m["ce_clean"])

    plain, smooth = lad_loss(0.0), lad_loss(0.4)
    # Both evaluations of the label term move with the smoothing: the base's and LAD's (through `fn`).
    assert plain[0] != smooth[0] and plain[1] != smooth[1]


def test_config_range_typo_and_a_defense_that_does_not_smooth(compose) -> None:
    for bad in ("1.0", "-0.1"):
        with pytest.raises(ConfigError, match=r"defense\.label_smoothing"):
            validate_train_config(compose([f"defense.label_smoothing={bad}", "logger=none"]))
    with pytest.raises(ConfigError, match=r"did you mean `defense\.label_smoothing`"):
        validate_train_config(compose(["+defense.label_smoothng=0.1", "logger=none"]))
    validate_train_config(compose(["defense=trades", "defense.label_smoothing=0.1", "logger=none"]))

    class HardLabels(DefenseConfig):
        adversarial: ClassVar[bool] = False
        name: Literal["hard"] = "hard"

    assert HardLabels().label_smoothing == 0.0
    with pytest.raises(ValidationError, match="defense=hard does not apply label smoothing"):
        HardLabels(label_smoothing=0.1)
