"""Hand-derived checks of the direct-preference loss family in :mod:`prefl.losses.dpo`.

Notation as in the module: ``pc``/``pr`` policy log-probs of chosen/rejected, ``rc``/``rr`` the
reference's, ``nc``/``nr`` lengths, ``cl = pc - rc``, ``rl = pr - rr``, ``d = cl - rl``, ``β``,
``ε`` (label smoothing). Inputs are picked so that every expected number is a closed form:
with ``L3 = ln 3``, ``σ(L3) = 3/4`` and ``σ(-L3) = 1/4``, hence ``-logσ(L3) = ln(4/3)`` and
``-logσ(-L3) = ln 4``; ``σ(0) = 1/2`` and ``-logσ(0) = ln 2``. Everything runs in float64 and is
compared with ``abs=1e-6`` (or tighter).
"""

from __future__ import annotations

import math

import pytest
import torch

from prefl.losses.dpo import (
    DPO_LOSSES,
    REFERENCE_FREE,
    DPOLoss,
    DPOSettings,
    DPOSettingsError,
    dpo_loss,
    dpo_loss_terms,
    implicit_rewards,
)

L2 = math.log(2.0)
L3 = math.log(3.0)
L43 = math.log(4.0 / 3.0)  # -logσ(ln 3)
L4 = math.log(4.0)  # -logσ(-ln 3)
TOL = 1e-6
F64 = torch.float64


def t(*values: float, requires_grad: bool = False) -> torch.Tensor:
    """A float64 ``(B,)`` tensor."""
    return torch.tensor(values, dtype=F64, requires_grad=requires_grad)


def n(*values: int) -> torch.Tensor:
    """An integer ``(B,)`` lengths tensor."""
    return torch.tensor(values, dtype=torch.long)


def run(inputs: dict, **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dpo_loss`` on an inputs dict with keys pc, pr, rc, rr, nc, nr (missing = None)."""
    return dpo_loss(
        inputs["pc"],
        inputs["pr"],
        inputs.get("rc"),
        inputs.get("rr"),
        chosen_lengths=inputs.get("nc"),
        rejected_lengths=inputs.get("nr"),
        **kwargs,
    )


def assert_close(actual: torch.Tensor, expected, tol: float = TOL, msg: str = "") -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    assert actual.shape == expected.shape, msg
    assert torch.allclose(actual.detach(), expected, rtol=0.0, atol=tol), (
        f"{msg}\nactual={actual.detach().tolist()} expected={expected.tolist()}"
    )


def zeros(b: int) -> torch.Tensor:
    return torch.zeros(b, dtype=F64)


# --------------------------------------------------------------------------------------------
# One hand-derived value per loss type: (loss_type, inputs, kwargs, expected, derivation).
# --------------------------------------------------------------------------------------------
CASES = [
    (
        "sigmoid",
        dict(pc=t(L3, 0.0), pr=t(0.0, L3), rc=zeros(2), rr=zeros(2)),
        dict(beta=1.0),
        [L43, L4],
        "β=1, refs 0: d = [L3, -L3]; -logσ(L3) = -ln(3/4) = ln(4/3), -logσ(-L3) = -ln(1/4) = ln 4",
    ),
    (
        "sigmoid_norm",
        dict(
            pc=t(2 * L3, 0.0), pr=t(0.0, 3 * L3), rc=zeros(2), rr=zeros(2), nc=n(2, 1), nr=n(3, 3)
        ),
        dict(beta=1.0),
        [L43, L4],
        "β=1: cl/nc - rl/nr = [2L3/2 - 0/3, 0/1 - 3L3/3] = [L3, -L3] -> [ln(4/3), ln 4] "
        "(un-normalised it would be -logσ(2L3) = ln(10/9))",
    ),
    (
        "hinge",
        dict(pc=t(1.0, 4.0, 0.0), pr=t(0.0, 0.0, 2.0), rc=zeros(3), rr=zeros(3)),
        dict(beta=0.5),
        [0.5, 0.0, 2.0],
        "β=1/2, d = [1, 4, -2]: relu(1 - d/2) = [relu(1/2), relu(-1), relu(2)] = [1/2, 0, 2]",
    ),
    (
        "ipo",
        dict(pc=t(3.0, 1.0), pr=t(0.0, 0.0), rc=zeros(2), rr=zeros(2)),
        dict(beta=0.5),
        [4.0, 0.0],
        "β=1/2 so 1/(2β) = 1; no lengths -> d = [3, 1]: (3-1)² = 4, (1-1)² = 0",
    ),
    (
        "robust",
        dict(pc=t(L3), pr=t(0.0), rc=zeros(1), rr=zeros(1)),
        dict(beta=1.0, label_smoothing=0.25),
        [1.5 * L43 - L2],
        "β=1, ε=1/4, z = L3: (-(3/4)·ln(3/4) + (1/4)·ln(1/4)) / (1 - 1/2) "
        "= 2·((3/4)·ln(4/3) - (1/4)·ln 4) = (3/2)·ln(4/3) - ln 2 ≈ -0.2616",
    ),
    (
        "exo_pair",
        dict(pc=t(L3, 0.0), pr=t(0.0, L3), rc=zeros(2), rr=zeros(2)),
        dict(beta=1.0, label_smoothing=0.25),
        [0.0, 0.5 * L3],
        "β=1, ε=1/4. z = L3: σ(z)=3/4=1-ε, σ(-z)=1/4=ε, so both brackets (logσ - log label) "
        "vanish -> 0 (KL of equal distributions). z = -L3: σ(z)=1/4, σ(-z)=3/4: "
        "(1/4)(ln(1/4) - ln(3/4)) + (3/4)(ln(3/4) - ln(1/4)) = -(1/4)ln 3 + (3/4)ln 3 = (1/2)ln 3",
    ),
    (
        "nca_pair",
        dict(pc=t(L3, 0.0), pr=t(-L3, 0.0), rc=zeros(2), rr=zeros(2)),
        dict(beta=1.0),
        [1.5 * L43 + L2, 2 * L2],
        "β=1. cl=L3, rl=-L3: -logσ(L3) - ½logσ(-L3) - ½logσ(L3) = ln(4/3) + ½ln 4 + ½ln(4/3) "
        "= (3/2)ln(4/3) + ln 2. cl=rl=0: ln 2 + ½ln 2 + ½ln 2 = 2 ln 2",
    ),
    (
        "bco_pair",
        dict(pc=t(L3, 0.0), pr=t(-L3, 0.0), rc=zeros(2), rr=zeros(2)),
        dict(beta=1.0),
        [2 * L43, 2 * L2],
        "β=1, no running shift. cl=L3, rl=-L3: -logσ(L3) - logσ(L3) = 2 ln(4/3). "
        "cl=rl=0: -logσ(0) - logσ(0) = 2 ln 2",
    ),
    (
        "sppo_hard",
        dict(pc=t(1.0, 0.0, 3.0), pr=t(-1.0, 0.0, 1.0), rc=zeros(3), rr=zeros(3)),
        dict(beta=0.5),
        [0.0, 2.0, 8.0],
        "β=1/2 so 1/(2β) = 1: (cl-1)² + (rl+1)² = [(0)²+(0)², 1+1, 2²+2²] = [0, 2, 8]",
    ),
    (
        "apo_zero",
        dict(pc=t(L3, 0.0, -L3), pr=t(-L3, 0.0, L3), rc=zeros(3), rr=zeros(3)),
        dict(beta=1.0),
        [0.5, 1.0, 1.5],
        "β=1: 1 - σ(cl) + σ(rl) = [1 - 3/4 + 1/4, 1 - 1/2 + 1/2, 1 - 1/4 + 3/4] = [1/2, 1, 3/2]",
    ),
    (
        "apo_down",
        dict(pc=t(L3, 0.0, 0.0), pr=t(0.0, -L3, L3), rc=zeros(3), rr=zeros(3)),
        dict(beta=1.0),
        [1.0, 0.75, 1.25],
        "β=1: σ(cl) + 1 - σ(cl-rl): cl=L3,rl=0: 3/4 + 1 - 3/4 = 1; cl=0,rl=-L3: "
        "1/2 + 1 - σ(L3) = 3/4; cl=0,rl=L3: 1/2 + 1 - σ(-L3) = 5/4",
    ),
    (
        "discopop",
        dict(pc=t(0.0, L3, 0.0), pr=t(0.0, 0.0, L3), rc=zeros(3), rr=zeros(3)),
        dict(beta=1.0, discopop_tau=1.0),
        [(L2 + 1) / 2, 0.25 * L43 + 0.25, 0.75 * L4 + 0.75],
        "β=1, τ=1, m=σ(z): z=0: m=1/2: ½·ln 2 + ½·e⁰ = (ln 2 + 1)/2. z=L3: m=3/4: "
        "¼·ln(4/3) + ¾·e^{-L3} = ¼ln(4/3) + ¾·⅓. z=-L3: m=1/4: ¾·ln 4 + ¼·e^{L3} = ¾ln 4 + ¾",
    ),
    (
        "simpo",
        dict(pc=t(-2.0, -2.0), pr=t(-(2 + L3), -2.0), nc=n(2, 2), nr=n(1, 1)),
        dict(beta=1.0, simpo_gamma=1.0),
        [L43, L2],
        "β=1, γ=1, no refs: pc/nc = -1; pr/nr = [-2-L3, -2] -> z = β·(-1 - pr/nr) - γ "
        "= [1 + L3 - 1, 1 - 1] = [L3, 0] -> [ln(4/3), ln 2]",
    ),
    (
        "cpo",
        dict(pc=t(-1.0, -1.0), pr=t(-1.0 - L3, -1.0 + L3)),
        dict(beta=1.0),
        [L43, L4],
        "β=1, no refs: pc - pr = [L3, -L3] -> [ln(4/3), ln 4]",
    ),
    (
        "orpo",
        dict(pc=t(-2 * L2, -2 * L2), pr=t(-2 * L2, -L2), nc=n(2, 1), nr=n(1, 1)),
        dict(beta=1.0),
        [math.log(8.0 / 3.0), 4 * L2],
        "β=1, no refs. Pair 1: a_c = -2ln2/2 = ln(1/2), a_r = ln(1/4); "
        "log-odds(a) = a - ln(1-e^a): odds_c = ln(1/2) - ln(1/2) = 0, "
        "odds_r = ln(1/4) - ln(3/4) = -ln 3, so log_odds = ln 3 and "
        "loss = -a_c - logσ(ln 3) = ln 2 + ln(4/3) = ln(8/3). "
        "Pair 2: a_c = ln(1/4), a_r = ln(1/2): log_odds = -ln 3, "
        "loss = ln 4 - logσ(-ln 3) = ln 4 + ln 4 = 4 ln 2",
    ),
    (
        "sft",
        dict(pc=t(-6.0, -1.0), pr=t(-100.0, -100.0), nc=n(3, 2), nr=n(1, 1)),
        dict(beta=1.0),
        [2.0, 0.5],
        "-pc/nc = [6/3, 1/2] = [2, 1/2]; rejected and β do not enter",
    ),
]


@pytest.mark.parametrize(
    ("loss_type", "inputs", "kwargs", "expected", "derivation"),
    CASES,
    ids=[c[0] for c in CASES],
)
def test_hand_derived_value(loss_type, inputs, kwargs, expected, derivation):
    """Each loss type reproduces the closed form derived in its table row (see ``derivation``)."""
    losses, chosen_rewards, rejected_rewards = run(inputs, loss_type=loss_type, **kwargs)
    assert_close(losses, expected, msg=f"{loss_type}: {derivation}")
    assert losses.shape == chosen_rewards.shape == rejected_rewards.shape == inputs["pc"].shape


def test_table_covers_every_loss_type():
    """The hand-derived table has a row for every key of ``DPO_LOSSES`` and nothing else."""
    assert {c[0] for c in CASES} == set(DPO_LOSSES)
    assert REFERENCE_FREE <= set(DPO_LOSSES)


@pytest.mark.parametrize(("loss_type", "inputs", "kwargs", "expected", "derivation"), CASES)
def test_dpo_loss_returns_three_tensors_of_shape_b(loss_type, inputs, kwargs, expected, derivation):
    """``dpo_loss`` returns ``(losses, chosen_rewards, rejected_rewards)``, all ``(B,)``."""
    out = run(inputs, loss_type=loss_type, **kwargs)
    assert isinstance(out, tuple) and len(out) == 3
    b = inputs["pc"].shape[0]
    for x in out:
        assert isinstance(x, torch.Tensor)
        assert x.shape == (b,)
        assert x.dtype == F64


# --------------------------------------------------------------------------------------------
# Plain DPO at policy == reference.
# --------------------------------------------------------------------------------------------


def test_sigmoid_at_reference_is_log2_with_opposite_gradients():
    """policy == reference -> d = 0 -> loss = -logσ(0) = ln 2 for every pair.

    With β = 1/2 and the batch mean over B = 4 pairs, d(-logσ(βd))/dd = -β·σ(-βd) = -β/2 at d = 0,
    and ∂d/∂pc = 1, ∂d/∂pr = -1, so ∂mean/∂pc = -β/(2B) = -1/16 and ∂mean/∂pr = +1/16: equal in
    magnitude, opposite in sign.
    """
    beta, b = 0.5, 4
    ref_c, ref_r = t(-3.0, -10.0, -0.5, -7.0), t(-4.0, -2.0, -9.0, -1.5)
    pc = ref_c.clone().requires_grad_(True)
    pr = ref_r.clone().requires_grad_(True)
    losses, chosen, rejected = dpo_loss(pc, pr, ref_c, ref_r, beta=beta, loss_type="sigmoid")
    assert_close(losses, [L2] * b, tol=1e-12)
    losses.mean().backward()
    assert_close(pc.grad, [-beta / (2 * b)] * b, tol=1e-12)
    assert_close(pr.grad, [beta / (2 * b)] * b, tol=1e-12)
    assert torch.equal(pc.grad, -pr.grad)
    assert_close(chosen, [0.0] * b, tol=0.0)
    assert_close(rejected, [0.0] * b, tol=0.0)


# --------------------------------------------------------------------------------------------
# Every option changes the result.
# --------------------------------------------------------------------------------------------

GENERIC = dict(
    pc=t(-1.0, -2.0),
    pr=t(-3.0, -1.5),
    rc=t(-1.5, -1.0),
    rr=t(-2.0, -2.5),
    nc=n(2, 3),
    nr=n(4, 1),
)


@pytest.mark.parametrize("loss_type", sorted(set(DPO_LOSSES) - {"sigmoid"}))
def test_every_loss_type_differs_from_sigmoid(loss_type):
    """On a generic input (refs non-zero, unequal lengths, β = 1/2, ε = 0.1 for both sides, since
    robust at ε = 0 *is* plain DPO) no loss type coincides with sigmoid (cDPO):
    cl = [0.5, -1], rl = [-1, 1], d = [1.5, -2]."""
    base, _, _ = run(GENERIC, beta=0.5, label_smoothing=0.1, loss_type="sigmoid")
    other, _, _ = run(GENERIC, beta=0.5, label_smoothing=0.1, loss_type=loss_type)
    assert (other - base).abs().max().item() > 1e-3


def test_label_smoothing_changes_sigmoid_cdpo():
    """cDPO, β = 1, d = L3: ε = 0 -> ln(4/3); ε = 1/4 -> -(3/4)·ln(3/4) - (1/4)·ln(1/4)
    = ln 4 - (3/4)·ln 3 (the entropy of (3/4, 1/4) in nats) ≈ 0.5623."""
    x = dict(pc=t(L3), pr=t(0.0), rc=zeros(1), rr=zeros(1))
    plain, _, _ = run(x, beta=1.0, loss_type="sigmoid")
    smooth, _, _ = run(x, beta=1.0, loss_type="sigmoid", label_smoothing=0.25)
    assert_close(plain, [L43])
    assert_close(smooth, [L4 - 0.75 * L3])


def test_label_smoothing_changes_robust():
    """Robust DPO, β = 1, d = L3: ε = 0 reduces to plain DPO, ln(4/3); ε = 1/4 gives
    (3/2)·ln(4/3) - ln 2 (derivation in the table)."""
    x = dict(pc=t(L3), pr=t(0.0), rc=zeros(1), rr=zeros(1))
    plain, _, _ = run(x, beta=1.0, loss_type="robust")
    smooth, _, _ = run(x, beta=1.0, loss_type="robust", label_smoothing=0.25)
    assert_close(plain, [L43])
    assert_close(smooth, [1.5 * L43 - L2])


def test_label_smoothing_changes_exo_pair_and_zero_means_1e_3():
    """EXO at z = 0 (σ = 1/2 both ways): loss = ½(ln ½ - ln(1-ε)) + ½(ln ½ - ln ε)
    = -ln 2 - ½·ln(ε(1-ε)).

    ε = 0 is replaced by 1e-3: -ln 2 - ½·ln(0.999·0.001) ≈ 2.7612, identical to ε = 1e-3.
    ε = 1/4: -ln 2 - ½·ln(3/16) = ½·ln(16/3) - ln 2 = ½·ln(4/3) ≈ 0.1438.
    """
    x = dict(pc=t(0.0), pr=t(0.0), rc=zeros(1), rr=zeros(1))
    zero, _, _ = run(x, beta=1.0, loss_type="exo_pair", label_smoothing=0.0)
    milli, _, _ = run(x, beta=1.0, loss_type="exo_pair", label_smoothing=1e-3)
    quarter, _, _ = run(x, beta=1.0, loss_type="exo_pair", label_smoothing=0.25)
    assert_close(zero, [-L2 - 0.5 * math.log(0.999 * 0.001)])
    assert_close(zero, milli.detach(), tol=1e-12)
    assert_close(quarter, [0.5 * L43])


def test_label_smoothing_changes_simpo_and_cpo():
    """Both use the cDPO form on their logit z; with z = L3 (β = 1):
    ε = 0 -> ln(4/3), ε = 1/4 -> ln 4 - (3/4)·ln 3.

    simpo: pc/nc = -1, pr/nr = -2 - L3, γ = 1 -> z = 1 + L3 - 1 = L3. cpo: pc - pr = L3.
    """
    simpo_x = dict(pc=t(-2.0), pr=t(-(2 + L3)), nc=n(2), nr=n(1))
    cpo_x = dict(pc=t(-1.0), pr=t(-1.0 - L3))
    for loss_type, x, extra in (("simpo", simpo_x, dict(simpo_gamma=1.0)), ("cpo", cpo_x, {})):
        plain, _, _ = run(x, beta=1.0, loss_type=loss_type, **extra)
        smooth, _, _ = run(x, beta=1.0, loss_type=loss_type, label_smoothing=0.25, **extra)
        assert_close(plain, [L43], msg=loss_type)
        assert_close(smooth, [L4 - 0.75 * L3], msg=loss_type)


def test_lengths_normalise_ipo():
    """IPO, β = 1/2 (target 1/(2β) = 1), cl = 4, rl = 0.

    Without lengths d = 4 -> (4 - 1)² = 9; with nc = 2, nr = 1: d = 4/2 - 0/1 = 2 -> (2 - 1)² = 1.
    """
    x = dict(pc=t(4.0), pr=t(0.0), rc=zeros(1), rr=zeros(1))
    raw, _, _ = run(x, beta=0.5, loss_type="ipo")
    normed, _, _ = run({**x, "nc": n(2), "nr": n(1)}, beta=0.5, loss_type="ipo")
    assert_close(raw, [9.0])
    assert_close(normed, [1.0])


@pytest.mark.parametrize("loss_type", ["sigmoid_norm", "simpo", "orpo", "sft"])
@pytest.mark.parametrize("missing", ["both", "chosen", "rejected"])
def test_lengths_required(loss_type, missing):
    """Length-normalised types raise a ValueError naming the loss when a length is missing."""
    nc = None if missing in ("both", "chosen") else n(2)
    nr = None if missing in ("both", "rejected") else n(2)
    with pytest.raises(ValueError, match=rf"'{loss_type}'.*chosen_lengths and rejected_lengths"):
        dpo_loss(
            t(-1.0),
            t(-2.0),
            zeros(1),
            zeros(1),
            loss_type=loss_type,
            chosen_lengths=nc,
            rejected_lengths=nr,
        )


def test_loss_weights_mix_exactly_as_weighted_sum():
    """Mixture ["sigmoid", "sft"] with weights [2, 1/2], β = 1.

    cl = pc - rc = -2 - (-2 - L3) = L3, rl = -1 - (-1) = 0 -> sigmoid = ln(4/3);
    sft = -pc/nc = 2/2 = 1. Total = 2·ln(4/3) + ½·1 ≈ 1.0754; default weights (1, 1) give
    ln(4/3) + 1. Each term is reported unweighted by ``dpo_loss_terms``.
    """
    x = dict(pc=t(-2.0), pr=t(-1.0), rc=t(-2.0 - L3), rr=t(-1.0), nc=n(2), nr=n(3))
    kw = dict(beta=1.0)
    sig, _, _ = run(x, loss_type="sigmoid", **kw)
    sft, _, _ = run(x, loss_type="sft", **kw)
    mixed, _, _ = run(x, loss_type=["sigmoid", "sft"], loss_weights=[2.0, 0.5], **kw)
    unweighted, _, _ = run(x, loss_type=["sigmoid", "sft"], **kw)
    assert_close(sig, [L43])
    assert_close(sft, [1.0])
    assert_close(mixed, [2 * L43 + 0.5])
    assert_close(mixed, 2.0 * sig + 0.5 * sft, tol=1e-12)
    assert_close(unweighted, [L43 + 1.0])
    terms = dpo_loss_terms(
        x["pc"],
        x["pr"],
        x["rc"],
        x["rr"],
        chosen_lengths=x["nc"],
        rejected_lengths=x["nr"],
        loss_type=["sigmoid", "sft"],
        loss_weights=[2.0, 0.5],
        **kw,
    )
    assert set(terms) == {"sigmoid", "sft", "total"}
    assert_close(terms["sigmoid"], [L43])
    assert_close(terms["sft"], [1.0])
    assert_close(terms["total"], [2 * L43 + 0.5])


def test_nll_weight_adds_per_sequence_nll_term():
    """sigmoid, β = 1, d = L3 -> ln(4/3); NLL = -pc/nc = -(-6)/3 = 2 (rejected length 5 unused).

    nll_weight = 1/2 -> total = ln(4/3) + ½·2 = ln(4/3) + 1, and ``terms["nll"] == 2``.
    """
    x = dict(pc=t(-6.0), pr=t(-1.0), rc=t(-6.0 - L3), rr=t(-1.0), nc=n(3), nr=n(5))
    args = (x["pc"], x["pr"], x["rc"], x["rr"])
    lengths = dict(chosen_lengths=x["nc"], rejected_lengths=x["nr"])
    without = dpo_loss_terms(*args, beta=1.0, **lengths)
    assert "nll" not in without
    assert_close(without["total"], [L43])
    terms = dpo_loss_terms(*args, beta=1.0, nll_weight=0.5, **lengths)
    assert_close(terms["nll"], [2.0])
    assert_close(terms["sigmoid"], [L43])
    assert_close(terms["total"], [L43 + 1.0])
    losses, _, _ = dpo_loss(*args, beta=1.0, nll_weight=0.5, **lengths)
    assert_close(losses, [L43 + 1.0])
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(*args, beta=1.0, nll_weight=0.5)


def test_simpo_gamma_changes_simpo():
    """SimPO, β = 1, pc/nc = -1, pr/nr = -2 - L3, so β·Δ = 1 + L3.

    γ = 1 -> z = L3 -> ln(4/3). γ = 0 -> z = 1 + L3, σ(z) = 3e/(3e + 1), so
    -logσ(z) = ln(1 + 1/(3e)) ≈ 0.1155.
    """
    x = dict(pc=t(-2.0), pr=t(-(2 + L3)), nc=n(2), nr=n(1))
    g1, _, _ = run(x, beta=1.0, loss_type="simpo", simpo_gamma=1.0)
    g0, _, _ = run(x, beta=1.0, loss_type="simpo", simpo_gamma=0.0)
    assert_close(g1, [L43])
    assert_close(g0, [math.log(1 + 1 / (3 * math.e))])


def test_discopop_tau_changes_discopop():
    """DiscoPOP, β = 1, z = L3: (1-m)·ln(4/3) + m·e^{-L3} = (1-m)·ln(4/3) + m/3.

    τ = 1: m = σ(L3) = 3/4 -> ¼·ln(4/3) + ¼. τ = ½: m = σ(2·L3) = 9/(9+1) = 9/10 ->
    (1/10)·ln(4/3) + 3/10.
    """
    x = dict(pc=t(L3), pr=t(0.0), rc=zeros(1), rr=zeros(1))
    tau1, _, _ = run(x, beta=1.0, loss_type="discopop", discopop_tau=1.0)
    tau_half, _, _ = run(x, beta=1.0, loss_type="discopop", discopop_tau=0.5)
    assert_close(tau1, [0.25 * L43 + 0.25])
    assert_close(tau_half, [0.1 * L43 + 0.3])


def test_beta_changes_loss_and_rewards():
    """cl = 2, rl = -1 (d = 3). β = ½: rewards (1, -½), loss -logσ(3/2);
    β = 2: rewards (4, -2), loss -logσ(6) = ln(1 + e^{-6})."""
    x = dict(pc=t(-1.0), pr=t(-4.0), rc=t(-3.0), rr=t(-3.0))
    l_half, c_half, r_half = run(x, beta=0.5)
    l_two, c_two, r_two = run(x, beta=2.0)
    assert_close(c_half, [1.0])
    assert_close(r_half, [-0.5])
    assert_close(c_two, [4.0])
    assert_close(r_two, [-2.0])
    assert_close(l_half, [math.log1p(math.exp(-1.5))])
    assert_close(l_two, [math.log1p(math.exp(-6.0))])


# --------------------------------------------------------------------------------------------
# Reference-free types, references required elsewhere.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", sorted(REFERENCE_FREE))
def test_reference_free_types_work_without_refs(loss_type):
    """With β = ½ and no references the rewards are β·policy: ½·(-2, -3) = (-1, -3/2)."""
    assert set(REFERENCE_FREE) == {"simpo", "cpo", "orpo", "sft"}
    x = dict(pc=t(-2.0), pr=t(-3.0), nc=n(2), nr=n(3))
    losses, chosen, rejected = run(x, beta=0.5, loss_type=loss_type)
    assert torch.isfinite(losses).all()
    assert_close(chosen, [-1.0])
    assert_close(rejected, [-1.5])


@pytest.mark.parametrize("loss_type", sorted(set(DPO_LOSSES) - REFERENCE_FREE))
@pytest.mark.parametrize("which", ["both", "chosen", "rejected"])
def test_reference_based_types_need_refs(loss_type, which):
    """Reference-based types raise a ValueError naming the type and the missing arguments."""
    rc = None if which in ("both", "chosen") else zeros(1)
    rr = None if which in ("both", "rejected") else zeros(1)
    with pytest.raises(ValueError, match=rf"'{loss_type}'.*ref_chosen_logps and ref_rejected"):
        dpo_loss(
            t(-1.0),
            t(-2.0),
            rc,
            rr,
            loss_type=loss_type,
            chosen_lengths=n(1),
            rejected_lengths=n(1),
        )


def test_mixture_with_a_reference_based_type_needs_refs():
    """A mixture is reference-free only if all its types are; the error names the culprit."""
    with pytest.raises(ValueError, match=r"\['sigmoid'\].*ref_chosen_logps"):
        dpo_loss(t(-1.0), t(-2.0), loss_type=["cpo", "sigmoid"])


# --------------------------------------------------------------------------------------------
# Implicit rewards.
# --------------------------------------------------------------------------------------------


def test_implicit_rewards_values_and_detached():
    """β = ½: chosen = ½·(-1 - (-3)) = 1, rejected = ½·(-4 - (-2)) = -1; no graph even when
    every input (references included) requires grad. Without references: ½·(-1, -4)."""
    pc, pr = t(-1.0, requires_grad=True), t(-4.0, requires_grad=True)
    rc, rr = t(-3.0, requires_grad=True), t(-2.0, requires_grad=True)
    chosen, rejected = implicit_rewards(pc, pr, rc, rr, 0.5)
    assert_close(chosen, [1.0])
    assert_close(rejected, [-1.0])
    assert not chosen.requires_grad and not rejected.requires_grad
    chosen, rejected = implicit_rewards(pc, pr, None, None, 0.5)
    assert_close(chosen, [-0.5])
    assert_close(rejected, [-2.0])
    assert not chosen.requires_grad and not rejected.requires_grad


def test_dpo_loss_rewards_are_detached_but_loss_has_grad():
    """The loss is differentiable; the rewards returned with it are not."""
    pc, pr = t(-1.0, requires_grad=True), t(-2.0, requires_grad=True)
    losses, chosen, rejected = dpo_loss(pc, pr, t(-1.5), t(-1.5), beta=0.5)
    assert losses.requires_grad
    assert not chosen.requires_grad and not rejected.requires_grad
    assert_close(chosen, [0.25])  # ½·(-1 + 1.5)
    assert_close(rejected, [-0.25])  # ½·(-2 + 1.5)


# --------------------------------------------------------------------------------------------
# Swapping chosen and rejected.
# --------------------------------------------------------------------------------------------


def test_swapping_chosen_and_rejected_negates_d_and_swaps_rewards():
    """β = 1, cl = L3 (pc = -1, rc = -1 - L3), rl = 0 (pr = rr = -2): d = L3 -> ln(4/3).

    Swapped, d -> -L3 -> -logσ(-L3) = ln 4, and the rewards (L3, 0) become (0, L3).
    """
    pc, rc, pr, rr = t(-1.0), t(-1.0 - L3), t(-2.0), t(-2.0)
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=1.0)
    s_loss, s_chosen, s_rejected = dpo_loss(pr, pc, rr, rc, beta=1.0)
    assert_close(loss, [L43])
    assert_close(s_loss, [L4])
    assert_close(chosen, [L3])
    assert_close(rejected, [0.0])
    assert torch.equal(s_chosen, rejected) and torch.equal(s_rejected, chosen)


# --------------------------------------------------------------------------------------------
# Argument errors.
# --------------------------------------------------------------------------------------------


def test_unknown_loss_type_raises_listing_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown loss_type \['dpo'\].*'sigmoid'"):
        dpo_loss(t(-1.0), t(-2.0), zeros(1), zeros(1), loss_type="dpo")
    with pytest.raises(ValueError, match=r"unknown loss_type \['nope'\]"):
        dpo_loss(t(-1.0), t(-2.0), zeros(1), zeros(1), loss_type=["sigmoid", "nope"])


def test_mismatched_loss_weights_raise():
    with pytest.raises(ValueError, match="loss_weights has 1 values for 2 loss types"):
        dpo_loss(
            t(-1.0), t(-2.0), zeros(1), zeros(1), loss_type=["sigmoid", "ipo"], loss_weights=[1.0]
        )
    with pytest.raises(ValueError, match="loss_weights has 2 values for 1 loss types"):
        dpo_loss(t(-1.0), t(-2.0), zeros(1), zeros(1), loss_weights=[1.0, 2.0])


# --------------------------------------------------------------------------------------------
# Numerical stability.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sigmoid_stable_at_large_margins(dtype):
    """β = 1, d = ±1000: -logσ(1000) ≈ e^{-1000} ≈ 0 and -logσ(-1000) ≈ 1000, with gradients
    ∂/∂pc = -σ(-d) ∈ {≈0, ≈-1} (sum over the batch) — all finite, no overflow of exp(1000)."""
    pc = torch.tensor([1000.0, -1000.0], dtype=dtype, requires_grad=True)
    pr = torch.zeros(2, dtype=dtype, requires_grad=True)
    ref = torch.zeros(2, dtype=dtype)
    losses, _, _ = dpo_loss(pc, pr, ref, ref, beta=1.0)
    losses.sum().backward()
    assert torch.isfinite(losses).all()
    assert losses[0].item() == pytest.approx(0.0, abs=1e-6)
    assert losses[1].item() == pytest.approx(1000.0, rel=1e-6)
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    assert pc.grad.tolist() == pytest.approx([0.0, -1.0], abs=1e-6)
    assert torch.equal(pc.grad, -pr.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_orpo_stable_near_zero_and_very_negative(dtype):
    """ORPO with average log-probs a ∈ {-1e-8, -50} (log(1 - e^a) ≈ ln|a| near 0, ≈ -e^a when very
    negative): loss and gradients stay finite in both orders and when a_c = a_r."""
    pc = torch.tensor([-1e-8, -50.0, -1e-8, -50.0], dtype=dtype, requires_grad=True)
    pr = torch.tensor([-50.0, -1e-8, -1e-8, -50.0], dtype=dtype, requires_grad=True)
    ones = n(1, 1, 1, 1)
    losses, _, _ = dpo_loss(
        pc, pr, beta=1.0, loss_type="orpo", chosen_lengths=ones, rejected_lengths=ones
    )
    losses.sum().backward()
    assert torch.isfinite(losses).all()
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    # a_c = a_r -> log_odds = 0 -> loss = -a_c + ln 2.
    assert losses[2].item() == pytest.approx(1e-8 + L2, abs=1e-6)
    assert losses[3].item() == pytest.approx(50.0 + L2, abs=1e-4)
    # Chosen near-certain vs rejected unlikely: the odds term is ~0 and the NLL ~1e-8.
    assert losses[0].item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("loss_type", sorted(DPO_LOSSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_loss_finite_at_large_margins(loss_type, dtype):
    """d = ±1000 (and per-token log-probs -1e-8 / -1000 for the length-averaged types): every loss
    and its gradient is finite. DiscoPOP needs m·e^{-z} = exp(logσ(z/τ) - z) here, because
    e^{1000} overflows while m = σ(-1000/τ) underflows to 0 (0·inf = nan)."""
    pc = torch.tensor([-1e-8, -1000.0], dtype=dtype, requires_grad=True)
    pr = torch.tensor([-1000.0, -1e-8], dtype=dtype, requires_grad=True)
    ref = torch.zeros(2, dtype=dtype)
    ones = n(1, 1)
    losses, chosen, rejected = dpo_loss(
        pc, pr, ref, ref, beta=1.0, loss_type=loss_type, chosen_lengths=ones, rejected_lengths=ones
    )
    losses.sum().backward()
    assert torch.isfinite(losses).all(), losses
    for g in (pc.grad, pr.grad):
        assert g is None or torch.isfinite(g).all(), g
    assert torch.isfinite(chosen).all() and torch.isfinite(rejected).all()


def test_discopop_matches_naive_formula_where_that_is_finite():
    """The stable DiscoPOP form equals (1-m)·(-logσ(z)) + m·e^{-z} at moderate z (τ = 0.05)."""
    z = t(-3.0, -0.4, 0.0, 0.1, 2.0)
    tau = 0.05
    m = torch.sigmoid(z / tau)
    naive = (1 - m) * -torch.nn.functional.logsigmoid(z) + m * torch.exp(-z)
    losses, _, _ = dpo_loss(
        z, zeros(5), zeros(5), zeros(5), beta=1.0, loss_type="discopop", discopop_tau=tau
    )
    assert_close(losses, naive, tol=1e-12)


def test_empty_loss_type_list_is_an_error():
    t = torch.zeros(1, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown loss_type"):
        dpo_loss_terms(t, t, t, t, loss_type=[])


def test_ipo_with_only_one_length_is_an_error():
    t = torch.zeros(1, dtype=torch.float64)
    with pytest.raises(ValueError, match="'ipo' needs chosen_lengths and rejected_lengths"):
        dpo_loss_terms(t, t, t, t, loss_type="ipo", chosen_lengths=torch.ones(1))


def test_nll_weight_without_lengths_names_the_option():
    t = torch.zeros(1, dtype=torch.float64)
    with pytest.raises(ValueError, match="nll_weight needs chosen_lengths"):
        dpo_loss_terms(t, t, t, t, nll_weight=1.0)


# --------------------------------------------------------------------------------------------
# DPOSettings: the knobs declared once, checked once; DPOLoss: the named result.
# --------------------------------------------------------------------------------------------


def test_settings_object_gives_the_same_result_as_keywords():
    """The mixture of ``test_loss_weights_mix_exactly_as_weighted_sum`` (total 2·ln(4/3) + ½)
    passed as one ``DPOSettings``; keywords next to ``settings`` override its fields (β = 2 doubles
    the rewards). The result is a ``DPOLoss`` whose fields are the three tensors."""
    x = dict(pc=t(-2.0), pr=t(-1.0), rc=t(-2.0 - L3), rr=t(-1.0), nc=n(2), nr=n(3))
    settings = DPOSettings(beta=1.0, loss_type=["sigmoid", "sft"], loss_weights=[2.0, 0.5])
    out = run(x, settings=settings)
    assert isinstance(out, DPOLoss)
    assert_close(out.losses, [2 * L43 + 0.5])
    assert_close(out.chosen_rewards, [L3])
    assert_close(out.rejected_rewards, [0.0])
    assert out == tuple(out) and len(out) == 3
    doubled = run(x, settings=settings, beta=2.0)
    assert_close(doubled.chosen_rewards, [2 * L3])
    assert settings.beta == 1.0  # frozen: the override made a new settings object


def test_settings_are_frozen_normalised_and_describe_the_terms():
    s = DPOSettings(loss_type=["sigmoid", "bco_pair"], loss_weights=[0.8, 0.2], nll_weight=1.0)
    assert s.loss_type == ("sigmoid", "bco_pair") and s.loss_weights == (0.8, 0.2)
    assert s.term_names == ("sigmoid", "bco_pair", "nll")
    assert s.needs_reference
    assert DPOSettings().loss_type == ("sigmoid",) and DPOSettings().weights == (1.0,)
    assert DPOSettings().term_names == ()
    assert DPOSettings(nll_weight=0.5).term_names == ("sigmoid", "nll")
    assert not DPOSettings(loss_type=["cpo", "sft"]).needs_reference
    with pytest.raises(AttributeError):
        s.beta = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"loss_type": "dpo"}, "loss_type"),
        ({"loss_type": []}, "loss_type"),
        ({"loss_weights": [1.0, 2.0]}, "loss_weights"),
        ({"beta": 0.0}, "beta"),
        ({"label_smoothing": 0.5}, "label_smoothing"),
        ({"label_smoothing": -0.1}, "label_smoothing"),
        ({"nll_weight": -1.0}, "nll_weight"),
        ({"discopop_tau": 0.0}, "discopop_tau"),
    ],
)
def test_bad_settings_raise_naming_the_field(kwargs, key):
    with pytest.raises(DPOSettingsError, match=key) as info:
        DPOSettings(**kwargs)
    assert info.value.key == key
