"""The direct-preference loss family: DPO and its variants, one function per loss type.

Every loss maps per-pair sequence log-probs to per-pair losses ``(B,)``. Notation (all ``(B,)``):
``pc``/``pr`` policy log-probs of the chosen/rejected completion (summed over its tokens),
``rc``/``rr`` the reference's, ``nc``/``nr`` completion lengths in tokens;
``cl = pc - rc`` and ``rl = pr - rr`` the log-ratios, ``d = cl - rl``; ``β`` = ``beta``,
``ε`` = ``label_smoothing``. Names and formulas follow TRL where TRL has the same name, with two
deliberate differences: ``sigmoid`` applies ``label_smoothing`` (conservative DPO), and NLL terms
are per-sequence means (invariant to gradient accumulation and data-parallel sharding) rather than
token means over the batch.

Reference-free losses (``simpo``, ``cpo``, ``orpo``, ``sft``) ignore ``rc``/``rr``; ``ipo`` and
``sigmoid_norm`` normalise log-ratios by length; ``simpo`` and ``orpo`` use length-averaged
log-probs; those need ``chosen_lengths``/``rejected_lengths``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from prefl.losses.dpo import DPOSettings


#: :class:`PairLogps`' short names of the :class:`~prefl.losses.dpo.DPOSettings` fields
_SETTING_NAMES = {
    "beta": "beta",
    "eps": "label_smoothing",
    "gamma": "simpo_gamma",
    "tau": "discopop_tau",
}


@dataclass(frozen=True)
class PairLogps:
    """The inputs of one loss evaluation (see the module docstring for the notation), with the
    :class:`~prefl.losses.dpo.DPOSettings` that holds ``β``, ``ε``, ``γ`` and ``τ``."""

    pc: Tensor
    pr: Tensor
    rc: Tensor | None
    rr: Tensor | None
    nc: Tensor | None
    nr: Tensor | None
    settings: DPOSettings

    def __getattr__(self, name: str) -> float:
        """The loss formulas' short names for settings fields: ``beta`` (β), ``eps``
        (``label_smoothing``, ε), ``gamma`` (``simpo_gamma``, γ), ``tau`` (``discopop_tau``, τ)."""
        if name in _SETTING_NAMES:
            return getattr(self.settings, _SETTING_NAMES[name])
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def cl(self) -> Tensor:
        """Chosen log-ratio ``pc - rc``."""
        return self.pc - self.rc

    @property
    def rl(self) -> Tensor:
        """Rejected log-ratio ``pr - rr``."""
        return self.pr - self.rr

    def lengths(self, name: str) -> tuple[Tensor, Tensor]:
        """``(nc, nr)`` clamped to >= 1; an error naming the loss when they are missing."""
        if self.nc is None or self.nr is None:
            raise ValueError(f"loss_type {name!r} needs chosen_lengths and rejected_lengths")
        return self.nc.clamp(min=1).to(self.pc.dtype), self.nr.clamp(min=1).to(self.pc.dtype)


def _smoothed_sigmoid(z: Tensor, eps: float) -> Tensor:
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def sigmoid(x: PairLogps) -> Tensor:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290), with cDPO label smoothing (Mitchell 2023):
    ``-(1-ε)·logσ(β·d) - ε·logσ(-β·d)``."""
    return _smoothed_sigmoid(x.beta * (x.cl - x.rl), x.eps)


def sigmoid_norm(x: PairLogps) -> Tensor:
    """Length-normalised DPO (as in Tülu 3, arXiv:2411.15124): ``-logσ(β·(cl/nc - rl/nr))``."""
    nc, nr = x.lengths("sigmoid_norm")
    return -F.logsigmoid(x.beta * (x.cl / nc - x.rl / nr))


def hinge(x: PairLogps) -> Tensor:
    """SLiC / RSO hinge loss (Zhao et al. 2023, arXiv:2305.10425; Liu et al. 2023,
    arXiv:2309.06657): ``relu(1 - β·d)``."""
    return torch.relu(1 - x.beta * (x.cl - x.rl))


def ipo(x: PairLogps) -> Tensor:
    """IPO (Azar et al. 2023, arXiv:2310.12036), β = τ: ``(d - 1/(2β))²``, with each log-ratio
    divided by its completion length when lengths are given (as TRL does)."""
    if x.nc is None and x.nr is None:
        d = x.cl - x.rl
    else:
        nc, nr = x.lengths("ipo")
        d = x.cl / nc - x.rl / nr
    return (d - 1 / (2 * x.beta)) ** 2


def robust(x: PairLogps) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024, arXiv:2403.00409), unbiased under label-flip rate ε:
    ``(-(1-ε)·logσ(β·d) + ε·logσ(-β·d)) / (1-2ε)``."""
    z = x.beta * (x.cl - x.rl)
    return (-(1 - x.eps) * F.logsigmoid(z) + x.eps * F.logsigmoid(-z)) / (1 - 2 * x.eps)


def exo_pair(x: PairLogps) -> Tensor:
    """EXO (Ji et al. 2024, arXiv:2402.00856), pairwise: reverse KL between the model's and the
    smoothed label distribution, ``σ(z)(logσ(z) - log(1-ε)) + σ(-z)(logσ(-z) - log ε)``, z = β·d.
    ε = 0 is replaced by 1e-3 (the paper's value) for this loss only."""
    eps = x.eps if x.eps > 0 else 1e-3
    z = x.beta * (x.cl - x.rl)
    return torch.sigmoid(z) * (F.logsigmoid(z) - math.log(1 - eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )


def nca_pair(x: PairLogps) -> Tensor:
    """NCA (Chen et al. 2024, arXiv:2402.05369): ``-logσ(β·cl) - ½logσ(-β·cl) - ½logσ(-β·rl)``."""
    a, b = x.beta * x.cl, x.beta * x.rl
    return -F.logsigmoid(a) - 0.5 * F.logsigmoid(-a) - 0.5 * F.logsigmoid(-b)


def bco_pair(x: PairLogps) -> Tensor:
    """BCO, pairwise (Jung et al. 2024, arXiv:2404.04656; TRL 1.x form, no running shift):
    ``-logσ(β·cl) - logσ(-β·rl)``."""
    return -F.logsigmoid(x.beta * x.cl) - F.logsigmoid(-x.beta * x.rl)


def sppo_hard(x: PairLogps) -> Tensor:
    """SPPO with hard labels (Wu et al. 2024, arXiv:2405.00675):
    ``(cl - 1/(2β))² + (rl + 1/(2β))²``."""
    return (x.cl - 0.5 / x.beta) ** 2 + (x.rl + 0.5 / x.beta) ** 2


def apo_zero(x: PairLogps) -> Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, arXiv:2408.06266), for chosen better than the
    model: ``1 - σ(β·cl) + σ(β·rl)``."""
    return 1 - torch.sigmoid(x.beta * x.cl) + torch.sigmoid(x.beta * x.rl)


def apo_down(x: PairLogps) -> Tensor:
    """APO-down (D'Oosterlinck et al. 2024, arXiv:2408.06266), for chosen worse than the model:
    ``σ(β·cl) + 1 - σ(β·(cl - rl))``."""
    return torch.sigmoid(x.beta * x.cl) + 1 - torch.sigmoid(x.beta * (x.cl - x.rl))


def discopop(x: PairLogps) -> Tensor:
    """DiscoPOP / log-ratio modulated loss (Chan et al. 2024, arXiv:2406.08414), z = β·d,
    m = σ(z/τ): ``(1-m)·(-logσ(z)) + m·exp(-z)``."""
    z = x.beta * (x.cl - x.rl)
    m = torch.sigmoid(z / x.tau)
    # m·exp(-z) as exp(logσ(z/τ) - z): the naive product is 0·inf = nan once exp(-z) overflows.
    return (1 - m) * -F.logsigmoid(z) + torch.exp(F.logsigmoid(z / x.tau) - z)


def simpo(x: PairLogps) -> Tensor:
    """SimPO (Meng et al. 2024, arXiv:2405.14734), reference-free, length-averaged log-probs,
    margin γ: ``-(1-ε)·logσ(β·(pc/nc - pr/nr) - γ) - ε·logσ(-(…))``."""
    nc, nr = x.lengths("simpo")
    return _smoothed_sigmoid(x.beta * (x.pc / nc - x.pr / nr) - x.gamma, x.eps)


def cpo(x: PairLogps) -> Tensor:
    """CPO's preference term (Xu et al. 2024, arXiv:2401.08417), reference-free:
    ``-(1-ε)·logσ(β·(pc - pr)) - ε·logσ(-β·(pc - pr))``; add the paper's NLL term with
    ``nll_weight=1``."""
    return _smoothed_sigmoid(x.beta * (x.pc - x.pr), x.eps)


def orpo(x: PairLogps) -> Tensor:
    """ORPO (Hong et al. 2024, arXiv:2403.07691), reference-free, on length-averaged log-probs
    ``a_c``, ``a_r``: ``-a_c - β·logσ(log_odds)`` with ``log_odds = (a_c - a_r) -
    (log(1-e^a_c) - log(1-e^a_r))``; the NLL (first term) is part of the loss (β = λ)."""
    nc, nr = x.lengths("orpo")
    ac, ar = x.pc / nc, x.pr / nr
    log_odds = (ac - ar) - (_log1mexp(ac) - _log1mexp(ar))
    return -ac - x.beta * F.logsigmoid(log_odds)


def sft(x: PairLogps) -> Tensor:
    """NLL of the chosen completion per token, ``-pc/nc`` (MPO's / RPO's SFT term)."""
    nc, _ = x.lengths("sft")
    return -x.pc / nc


def _log1mexp(a: Tensor) -> Tensor:
    """``log(1 - exp(a))`` for ``a < 0``, stable near 0 and for very negative ``a``."""
    a = a.clamp(max=-1e-6)
    return torch.where(a > -math.log(2), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


#: Loss types by name.
DPO_LOSSES: dict[str, Callable[[PairLogps], Tensor]] = {
    fn.__name__: fn
    for fn in (
        sigmoid,
        sigmoid_norm,
        hinge,
        ipo,
        robust,
        exo_pair,
        nca_pair,
        bco_pair,
        sppo_hard,
        apo_zero,
        apo_down,
        discopop,
        simpo,
        cpo,
        orpo,
        sft,
    )
}
#: Loss types that use no reference model.
REFERENCE_FREE = frozenset({"simpo", "cpo", "orpo", "sft"})
