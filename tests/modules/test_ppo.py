"""PPOModule: ratio 1 at the first update, step counts, accumulation invariance, every flag,
frozen reference and reward model, checkpoint contents, kill-and-resume, bad settings.

The policy is a toy "SFT export" (random 2-layer Llama written to disk). A random model almost
never emits EOS, so most tests add an ``lm_head`` forward hook (:func:`boost_eos`) to the policy
*and* the reference: +2.5 on the EOS logit and no other special token. About half the responses
then end (mixed lengths, so masking and token means are exercised) and policy and reference
still agree. Some tests also move the policy away from the reference (:func:`perturb`) so that
the KL terms are non-zero. Optimizers are SGD where a comparison must not be hidden by Adam's
scale invariance (``max_grad_norm``).
"""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from prefl import CausalLMSpec, PPOModule, PreferenceDataModule
from prefl.data import load_tokenizer
from prefl.functional import masked_mean, masked_var
from prefl.generation.rollout import response_logprobs
from prefl.models import build_causal_lm
from prefl.models.reward import RewardModel, build_reward_model

EOS = 1
OTHER_SPECIALS = [0, 2, 3, 4, 5, 6]
EOS_BOOST = 2.5
RM_STATS = {"mean": 0.5, "std": 2.0}


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    """A toy reward-model export (random head) with stored statistics mean 0.5, std 2."""
    torch.manual_seed(1)
    tok = load_tokenizer("toy")
    rm = RewardModel(build_reward_model(CausalLMSpec(config="toy"), tok), tok, stats=RM_STATS)
    return str(rm.save_pretrained(tmp_path_factory.mktemp("rm")))


def data(n=4, batch_size=4):
    return PreferenceDataModule(
        mode="prompts", max_samples=n, batch_size=batch_size, max_length=32, max_prompt_length=16
    )


@pytest.fixture(scope="module")
def batch():
    """One batch of 4 left-padded toy prompts."""
    dm = data()
    dm.setup("fit")
    torch.manual_seed(0)  # the shuffle: the same batch whichever tests run before
    return next(iter(dm.train_dataloader()))


def trainer(tmp_path, **kw):
    defaults = dict(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=0,
    )
    return Trainer(**{**defaults, **kw})


def sgd(lr=0.5):
    return lambda params: torch.optim.SGD(params, lr=lr)


def _eos_hook(module, inputs, output):
    output = output.clone()
    output[..., EOS] += EOS_BOOST
    output[..., OTHER_SPECIALS] = -1e4
    return output


def boost_eos(module):
    """Make about half the responses end (see the module docstring): policy and reference."""
    for lm in (module.model, module.reference):
        lm.lm_head.register_forward_hook(_eos_hook)


def perturb(module, scale=0.02):
    """Move the policy away from the reference (fixed noise), so the KL is not 0."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: one intra-op thread is several times faster than two on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(sft_dir, *, eos=True, moved=False, **kw):
    """A built PPOModule (toy oracle reward, 6 new tokens, 2 samples, 1 PPO epoch, SGD)."""
    defaults = dict(
        tokenizer="toy",
        reward_fns=["toy"],
        max_new_tokens=6,
        num_samples=2,
        ppo_epochs=1,
        log_samples_every=0,
        optimizer=sgd(),
        value_optimizer=sgd(),
    )
    torch.manual_seed(0)  # a critic with a new head draws it from the global RNG
    module = PPOModule(sft_dir, **{**defaults, **kw})
    module.configure_model()
    if eos:
        boost_eos(module)
    if moved:
        perturb(module)
    return module


def fit(module, tmp_path, dm=None, **kw):
    t = trainer(tmp_path, **kw)
    t.fit(module, datamodule=dm or data())
    return t


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ------------------------------------------------------------------ the first update: ratio 1


def test_first_update_has_ratio_one_and_zero_kl(sft_dir, batch, tmp_path):
    """On a fresh module policy == reference, so the rollout's per-token KL is exactly 0, and
    re-computing the policy log-probs on a minibatch (what the update does, in train mode, at
    temperature 0.7) gives the rollout's old log-probs back: ratio 1 within 1e-5 (design §5.3).
    Through ``fit`` with one minibatch and one PPO epoch the logged clip fraction and approx-KL
    of that only update are then 0."""
    module = make(sft_dir, temperature=0.7)
    module.train()
    r = module.rollout(batch, seed=1)
    assert torch.equal(r.logprobs, r.ref_logprobs)
    assert torch.equal(r.kl, torch.zeros_like(r.kl))
    assert 0 < r.responses.ended.sum() < len(r.completions)  # mixed lengths
    idx = torch.tensor([5, 0, 3])
    logprobs, _ = response_logprobs(module.model, r.responses.select(idx), 0.7)
    torch.testing.assert_close(logprobs, r.logprobs[idx], rtol=0, atol=1e-5)
    mask = r.mask[idx].bool()
    ratio = torch.exp(logprobs - r.logprobs[idx])[mask]
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-5)

    t = fit(make(sft_dir, temperature=0.7), tmp_path)
    m = t.callback_metrics
    assert m["ppo/kl"].item() == 0.0
    assert m["ppo/clip_frac"].item() == 0.0
    assert m["ppo/approx_kl"].item() < 1e-10


# ----------------------------------------------------------------- step counts, accumulation


@pytest.mark.parametrize(("estimator", "n_optimizers"), [("gae", 2), ("rloo", 1)])
def test_optimizers_step_ppo_epochs_times_minibatches_per_rollout(
    sft_dir, tmp_path, estimator, n_optimizers
):
    """2 rollouts of N = 4 prompts × 2 samples = 8, ``mini_batch_size`` 3, ``ppo_epochs`` 2:
    each optimizer steps 2 × 2 × ceil(8 / 3) = 12 times (AdamW's per-parameter ``step``)."""
    module = make(sft_dir, advantage_estimator=estimator, ppo_epochs=2, mini_batch_size=3)
    module.optimizer_factory = torch.optim.AdamW
    module.value_optimizer_factory = torch.optim.AdamW
    t = fit(module, tmp_path, dm=data(n=8), limit_train_batches=2)
    expected = 2 * 2 * math.ceil(8 / 3)
    assert len(t.optimizers) == n_optimizers
    for optimizer in t.optimizers:
        steps = {float(s["step"]) for s in optimizer.state.values()}
        assert steps == {float(expected)}
        n_params = sum(len(g["params"]) for g in optimizer.param_groups)
        assert len(optimizer.state) == n_params  # every parameter stepped
    assert module.update_steps == expected
    assert (module.value_model is not None) == (estimator == "gae")


def test_micro_batches_accumulate_to_the_same_update(sft_dir, tmp_path):
    """N = 8 responses of mixed lengths, two minibatches of 4 and two PPO epochs; splitting each
    minibatch into micro-batches of 3 + 1 (token counts differ) must give the same policy and
    critic as no splitting: losses are token sums over the minibatch's token count (§5.8)."""
    results = {}
    for micro in (None, 3):
        module = make(sft_dir, moved=True, ppo_epochs=2, mini_batch_size=4, micro_batch_size=micro)
        fit(module, tmp_path)
        results[micro] = (params(module.model), params(module.value_model))
    initial = build_causal_lm(sft_dir, load_tokenizer("toy")).state_dict()
    for whole, split in zip(results[None], results[3], strict=True):
        for key, value in whole.items():
            torch.testing.assert_close(split[key], value, rtol=0, atol=1e-6)
    moved = max((results[None][0][k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 1e-3  # the steps were real


# ---------------------------------------------------------------------- every flag counts


ROLLOUT_BASE = dict(moved=True, whiten_advantages=True)


@pytest.fixture(scope="module")
def rollouts(sft_dir, rm_dir, batch):
    """Rollouts (seed 1) of a moved policy, keyed by the non-default settings used."""
    cache = {}

    def get(**kw):
        key = tuple(sorted(kw.items()))
        if key not in cache:
            module = make(sft_dir, reward_model=rm_dir, moved=True, **kw)
            cache[key] = module.rollout(batch, seed=1)
        return cache[key]

    return get


def test_rollout_is_consistent(rollouts):
    """Hand relations on the baseline rollout (GAE, reward model + toy fn, β 0.05, no-EOS
    score -1, whitening): ``kl = (logp - ref_logp)·mask``; per-row reward sums are
    ``score - β·Σkl`` (§5.6); the reward model's part is ``(rm - 0.5) / 2``; unfinished rows
    score -1; advantages have masked mean 0 and biased variance 1; everything is 0 on padding."""
    r = rollouts()
    mask = r.mask
    assert torch.equal(mask, r.responses.response_mask.float())
    ended = r.responses.ended
    assert 0 < ended.sum() < len(ended)
    torch.testing.assert_close(r.kl, (r.logprobs - r.ref_logprobs) * mask)
    assert r.kl.abs().sum() > 0.1  # the policy was moved
    score = r.scores["score"]
    torch.testing.assert_close(r.rewards.sum(-1), score - 0.05 * r.kl.sum(-1))
    assert (score[~ended] == -1.0).all()
    torch.testing.assert_close(score[ended], r.scores["raw"][ended])
    raw = r.scores["raw"]
    torch.testing.assert_close(raw, r.scores["reward_model"] + r.scores["fn0"])
    valid = mask.bool()
    for key in ("rewards", "advantages", "values", "returns", "logprobs", "kl"):
        assert (getattr(r, key)[~valid] == 0).all(), key
    assert abs(masked_mean(r.advantages, mask).item()) < 1e-6
    assert masked_var(r.advantages, mask, unbiased=False).item() == pytest.approx(1, abs=1e-5)
    unwhitened = rollouts(whiten_advantages=False)
    torch.testing.assert_close(
        unwhitened.returns, (unwhitened.advantages + unwhitened.values) * mask
    )


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"whiten_advantages": False}, "advantages"),
        ({"kl_penalty": "loss"}, "rewards"),
        ({"kl_coef": 0.5}, "rewards"),
        ({"normalize_reward": False}, "score"),
        ({"reward_clip": 0.2}, "score"),
        ({"no_eos_score": None}, "score"),
        ({"temperature": 0.7}, "logprobs"),
        ({"gamma": 0.8}, "advantages"),
        ({"lam": 0.5}, "advantages"),
    ],
)
def test_every_rollout_flag_changes_the_rollout(rollouts, kwargs, key):
    """Same seed, one setting changed: the named output differs from the baseline's."""
    base, changed = rollouts(), rollouts(**kwargs)
    get = (lambda r: r.scores["score"]) if key == "score" else (lambda r: getattr(r, key))
    assert get(base).shape == get(changed).shape
    assert (get(base) - get(changed)).abs().max() > 1e-4


def test_rollout_flags_by_hand(rollouts):
    """What each setting does, exactly: ``kl_penalty="loss"`` keeps the KL out of the rewards
    (row sums = scores); ``normalize_reward=False`` leaves the reward model's part raw
    (normalised = (raw - 0.5) / 2); ``reward_clip`` clips to ±0.2; ``no_eos_score=None`` keeps
    the raw score of unfinished rows."""
    base = rollouts()
    loss = rollouts(kl_penalty="loss")
    torch.testing.assert_close(loss.rewards.sum(-1), loss.scores["score"])
    torch.testing.assert_close(loss.kl, base.kl)
    raw = rollouts(normalize_reward=False).scores["reward_model"]
    torch.testing.assert_close(base.scores["reward_model"], (raw - 0.5) / 2.0)
    clipped = rollouts(reward_clip=0.2).scores["score"]
    torch.testing.assert_close(clipped, base.scores["score"].clamp(-0.2, 0.2))
    kept = rollouts(no_eos_score=None).scores["score"]
    torch.testing.assert_close(kept, base.scores["raw"])


def test_advantage_estimators_differ(rollouts):
    """Without whitening the four estimators give four different advantages (with whitening,
    RLOO = k/(k-1)·(R - mean) and REINFORCE++-baseline = R - mean would coincide). The
    critic-free ones are one value per response: RLOO with k = 2 is ``R_i - R_other``."""
    results = {
        name: rollouts(advantage_estimator=name, whiten_advantages=False)
        for name in ("gae", "rloo", "grpo", "reinforce_baseline")
    }
    names = list(results)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            diff = (results[a].advantages - results[b].advantages).abs().max()
            assert diff > 1e-4, (a, b)
    r = results["rloo"]
    assert r.values is None and r.returns is None
    returns = r.rewards.sum(-1).view(-1, 2)
    expected = torch.stack([returns[:, 0] - returns[:, 1], returns[:, 1] - returns[:, 0]], -1)
    torch.testing.assert_close(r.advantages, expected.reshape(-1, 1) * r.mask)


def test_num_samples_sets_the_rollout_size(rollouts, batch):
    r2, r3 = rollouts(), rollouts(num_samples=3)
    assert len(r2.completions) == 8 and len(r3.completions) == 12
    expected = batch["prompt_input_ids"].repeat_interleave(3, dim=0)
    assert torch.equal(r3.responses.query_ids, expected)
    assert r3.prompts == [p for p in batch["prompt"] for _ in range(3)]


UPDATE_BASE = dict(moved=True, ppo_epochs=2, mini_batch_size=4)


@pytest.fixture(scope="module")
def updates(sft_dir, tmp_path_factory):
    """Policy and critic parameters after one rollout and its update, keyed by settings."""
    cache = {}

    def get(**kw):
        key = tuple(sorted(kw.items()))
        if key not in cache:
            module = make(sft_dir, **{**UPDATE_BASE, **kw})
            fit(module, tmp_path_factory.mktemp("fit"))
            value = params(module.value_model) if module.value_model is not None else None
            cache[key] = (params(module.model), value)
        return cache[key]

    return get


@pytest.mark.parametrize(
    "kwargs",
    [
        {"whiten_advantages": False},
        {"kl_penalty": "loss"},
        {"max_grad_norm": None},
        {"max_grad_norm": 1e-3},
        {"clip_eps": 0.01},
        {"advantage_estimator": "rloo"},
    ],
)
def test_every_update_flag_changes_the_policy(updates, kwargs):
    base, changed = updates()[0], updates(**kwargs)[0]
    assert max_diff(base, changed) > 1e-5


def test_kl_in_the_loss_uses_kl_coef(updates):
    """With ``kl_penalty="loss"`` β is not in the rewards, so it can act only through the
    ``β·k3`` loss term: β 0 and β 1 must give different policies."""
    zero = updates(kl_penalty="loss", kl_coef=0.0)[0]
    one = updates(kl_penalty="loss", kl_coef=1.0)[0]
    assert max_diff(zero, one) > 1e-5


def test_adaptive_kl_coefficient_by_hand(sft_dir, tmp_path):
    """β₀ 0.05, target 0.5, horizon 100, two rollouts of N = 8. The first has KL 0 (policy ==
    reference): err = clip(0/0.5 - 1) = -0.2 and β₁ = 0.05·(1 - 0.2·8/100) = 0.0492 — the value
    logged with the second rollout (the one it was used in). Then β₂ = β₁·(1 + clip(kl₂/0.5 - 1,
    ±0.2)·0.08) with kl₂ the logged KL of the second rollout. A fixed β stays 0.05."""
    adaptive = make(sft_dir, kl_target=0.5, kl_horizon=100)
    t = fit(adaptive, tmp_path, dm=data(n=8), limit_train_batches=2)
    beta1 = 0.05 * (1 - 0.2 * 8 / 100)
    assert t.callback_metrics["ppo/kl_coef"].item() == pytest.approx(beta1, abs=1e-8)
    kl2 = t.callback_metrics["ppo/kl"].item()
    err = min(max(kl2 / 0.5 - 1, -0.2), 0.2)
    assert adaptive.kl_ctl.value == pytest.approx(beta1 * (1 + err * 8 / 100), abs=1e-8)
    fixed = make(sft_dir)
    fit(fixed, tmp_path, dm=data(n=8), limit_train_batches=2)
    assert fixed.kl_ctl.value == 0.05


# ----------------------------------------------------- frozen models, checkpoint contents


def test_frozen_models_and_checkpoint_contents(sft_dir, rm_dir, tmp_path):
    """After training: the reference is bit-identical to the export, in eval mode, frozen and in
    no optimizer; the reward model likewise (vs its export); the critic started as the reward
    model (§5.9) and moved. The checkpoint leaves out reference and reward model, and holds the
    policy, the critic, both optimizers' states and ``prefl_ppo`` with the KL controller."""
    module = make(sft_dir, reward_model=rm_dir, kl_target=1.0, kl_horizon=100)
    module.optimizer_factory = torch.optim.AdamW
    module.value_optimizer_factory = torch.optim.AdamW
    rm = module.scorer.reward_model
    exported_rm = RewardModel.from_pretrained(rm_dir).model.state_dict()
    value_start = params(module.value_model.model)
    for key, value in value_start.items():
        assert torch.equal(value, exported_rm[key]), key
    ckpt_dir = tmp_path / "ckpt"
    t = fit(
        module,
        tmp_path,
        enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True)],
    )
    tok = load_tokenizer("toy")
    for key, value in module.reference.state_dict().items():
        assert torch.equal(value, build_causal_lm(sft_dir, tok).state_dict()[key]), key
    for key, value in rm.model.state_dict().items():
        assert torch.equal(value, exported_rm[key]), key
    assert not module.reference.training
    frozen = [*module.reference.parameters(), *rm.parameters()]
    assert all(not p.requires_grad for p in frozen)
    in_optimizers = {id(p) for o in t.optimizers for g in o.param_groups for p in g["params"]}
    assert not in_optimizers & {id(p) for p in frozen}
    assert max_diff(value_start, params(module.value_model.model)) > 0  # the critic trained

    checkpoint = torch.load(ckpt_dir / "last.ckpt", weights_only=False)
    state = checkpoint["state_dict"]
    assert not [k for k in state if k.startswith(("reference.", "scorer."))]
    for prefix, model in (("model.", module.model), ("value_model.", module.value_model)):
        for key, value in model.state_dict().items():
            assert torch.equal(state[prefix + key], value), prefix + key
    assert len(checkpoint["optimizer_states"]) == 2
    assert all(len(o["state"]) > 0 for o in checkpoint["optimizer_states"])
    ppo = checkpoint["prefl_ppo"]
    assert ppo["kl_controller"] == module.kl_ctl.state_dict()
    assert ppo["kl_controller"]["value"] == pytest.approx(0.05 * (1 - 0.2 * 8 / 100), abs=1e-9)
    assert ppo["kl_controller"]["target"] == 1.0
    assert ppo["update_steps"] == module.update_steps == 1


def test_kill_and_resume_equals_the_uninterrupted_run(sft_dir, tmp_path):
    """Four rollouts straight (2 epochs × 2 batches) vs epoch 1, then a new Trainer and module
    resuming from ``last.ckpt``: the same final policy, critic, adaptive β and last logged
    metrics (sampling seeds, data order, optimizer and critic states all restored)."""

    def run(max_epochs, ckpt_dir, ckpt_path=None):
        seed_everything(0)
        module = make(sft_dir, kl_target=0.1, kl_horizon=50, ppo_epochs=2, mini_batch_size=3)
        module.optimizer_factory = lambda p: torch.optim.AdamW(p, lr=1e-2)
        module.value_optimizer_factory = lambda p: torch.optim.AdamW(p, lr=1e-2)
        t = trainer(
            tmp_path,
            max_epochs=max_epochs,
            limit_train_batches=2,
            enable_checkpointing=True,
            callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True)],
        )
        t.fit(module, datamodule=data(n=8, batch_size=2), ckpt_path=ckpt_path)
        return module, {k: v.item() for k, v in t.callback_metrics.items()}

    straight, straight_metrics = run(2, tmp_path / "a")
    run(1, tmp_path / "b")
    resumed, resumed_metrics = run(2, tmp_path / "c", ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    for a, b in ((straight.model, resumed.model), (straight.value_model, resumed.value_model)):
        for key, value in a.state_dict().items():
            torch.testing.assert_close(b.state_dict()[key], value, rtol=0, atol=1e-6)
    assert resumed.kl_ctl.value == pytest.approx(straight.kl_ctl.value, abs=1e-9)
    assert straight.kl_ctl.value != 0.05
    assert resumed.update_steps == straight.update_steps == 4 * 2 * 2
    assert resumed_metrics.keys() == straight_metrics.keys()
    for key, value in straight_metrics.items():
        assert resumed_metrics[key] == pytest.approx(value, abs=1e-6), key


# ----------------------------------------------------------------------------- bad settings


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"advantage_estimator": "ppo2"}, "model.advantage_estimator"),
        ({"advantage_estimator": "rloo", "num_samples": 1}, "model.num_samples"),
        ({"advantage_estimator": "grpo", "num_samples": 1}, "model.num_samples"),
    ],
)
def test_bad_settings_name_the_config_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PPOModule("unused", reward_fns=["toy"], **kwargs)


def test_no_reward_source_names_the_config_keys(sft_dir):
    with pytest.raises(ValueError, match="model.reward_model and/or model.reward_fns"):
        PPOModule(sft_dir, tokenizer="toy")


def test_wrong_number_of_reward_weights_names_the_config_key(sft_dir):
    with pytest.raises(ValueError, match="model.reward_weights has 2 values for 1 reward"):
        PPOModule(sft_dir, tokenizer="toy", reward_fns=["toy"], reward_weights=[1.0, 2.0])
