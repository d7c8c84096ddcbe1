"""PPOModule with a LoRA policy: every advantage estimator trains, only adapters and heads move.

The policy is the toy "SFT export" with LoRA (r = 4); its reference is the policy with adapters
disabled. With GAE the critic is LoRA too (its own adapters, the policy's settings) with a head
trained in full (peft's ``SEQ_CLS`` ``modules_to_save``), see :mod:`prefl.models.value`. LoRA B
starts at zero, so the policy's adapters are first given fixed noise (:func:`perturb_adapters`):
policy and reference then differ (non-zero KL, so every estimator has non-zero advantages) and
every adapter weight gets a gradient from the first step. Two PPO epochs (two SGD steps) let the
critic's LoRA A move too (its B is zero until the first step). Every parameter is compared bit for
bit: frozen ones must not change at all, trainable ones must all move.
"""

from __future__ import annotations

import math
from typing import get_args

import pytest
import torch
from lightning.pytorch import Trainer

from prefl import CausalLMSpec, PPOModule, PreferenceDataModule
from prefl.data import load_tokenizer
from prefl.functional.advantages import ADVANTAGE_ESTIMATORS
from prefl.models import LoraSpec, is_lora
from prefl.models.reward import RewardModel, build_reward_model, reward_head
from prefl.models.value import critic_spec
from prefl.modules.ppo import Estimator

#: every estimator PPOModule accepts: GAE (with the critic) and the critic-free ones
ESTIMATORS = ["gae", *sorted(ADVANTAGE_ESTIMATORS)]
EOS, OTHER_SPECIALS = 1, [0, 2, 3, 4, 5, 6]


def test_the_estimator_list_is_complete():
    assert set(ESTIMATORS) == set(get_args(Estimator))


def test_critic_spec_trains_the_critic_like_the_policy():
    """From the policy's own source the critic spec is the policy's (LoRA included); from a
    reward-model export it takes the policy's ``lora`` and ``gradient_checkpointing``."""
    policy = CausalLMSpec(config="toy", lora=LoraSpec(r=2), gradient_checkpointing=True)
    assert critic_spec(policy) is policy
    spec = critic_spec(policy, "exports/rm")
    assert spec.name_or_path == "exports/rm" and spec.lora is policy.lora
    assert spec.gradient_checkpointing and spec.config is None
    assert critic_spec("exports/sft").name_or_path == "exports/sft"
    assert critic_spec("exports/sft", "exports/rm").lora is None


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    """A toy reward-model export (random head)."""
    torch.manual_seed(1)
    tok = load_tokenizer("toy")
    rm = RewardModel(build_reward_model(CausalLMSpec(config="toy"), tok), tok)
    return str(rm.save_pretrained(tmp_path_factory.mktemp("rm")))


def _eos_hook(module, inputs, output):
    output = output.clone()
    output[..., EOS] += 2.5
    output[..., OTHER_SPECIALS] = -1e4
    return output


def perturb_adapters(model: torch.nn.Module, scale: float = 0.05) -> None:
    """Fixed noise on the LoRA B weights (they start at zero)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=generator) * scale)


def make(sft_dir: str, **kw) -> PPOModule:
    """A built LoRA PPOModule (toy oracle, 2 samples of 6 tokens, 2 PPO epochs, SGD), its
    adapters perturbed and about half its responses ending (an EOS boost on the LM head, which
    the adapter-disabled reference shares)."""
    defaults = dict(
        tokenizer="toy",
        reward_fns=["toy"],
        max_new_tokens=6,
        num_samples=2,
        ppo_epochs=2,
        log_samples_every=0,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.5),
        value_optimizer=lambda params: torch.optim.SGD(params, lr=0.5),
    )
    torch.manual_seed(0)
    spec = CausalLMSpec(name_or_path=sft_dir, lora=LoraSpec(r=4))
    module = PPOModule(spec, **{**defaults, **kw})
    module.configure_model()
    module.model.get_base_model().lm_head.register_forward_hook(_eos_hook)
    perturb_adapters(module.model)
    return module


def fit(module: PPOModule, tmp_path) -> Trainer:
    trainer = Trainer(
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
    data = PreferenceDataModule(
        mode="prompts", max_samples=4, batch_size=4, max_length=32, max_prompt_length=16
    )
    trainer.fit(module, datamodule=data)
    return trainer


def snapshot(model: torch.nn.Module) -> dict[str, tuple[bool, torch.Tensor]]:
    return {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()}


def assert_only_trainable_moved(model: torch.nn.Module, before: dict, what: str) -> None:
    """Frozen parameters bit-identical, every trainable one (adapters, head copy) moved."""
    after = dict(model.named_parameters())
    assert after.keys() == before.keys(), what
    trainable = [n for n, (grad, _) in before.items() if grad]
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable), what
    for name, (grad, value) in before.items():
        assert torch.equal(after[name], value) != grad, (what, name, grad)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_every_estimator_trains_a_lora_policy(sft_dir, tmp_path, estimator):
    """One rollout, two SGD steps: finite losses; the policy's (and for GAE the LoRA critic's)
    frozen base weights bit-identical, their adapters (and the critic's head copy) all moved;
    the optimizers hold exactly the trainable parameters."""
    module = make(sft_dir, advantage_estimator=estimator)
    assert is_lora(module.model) and module.reference is None
    policy_before = snapshot(module.model)
    critic_before = None
    if estimator == "gae":
        assert is_lora(module.value_model.model)
        assert module.value_model.model.peft_config["default"].r == 4
        critic_before = snapshot(module.value_model)
    else:
        assert module.value_model is None

    t = fit(module, tmp_path)
    m = t.callback_metrics
    assert module.update_steps == 2
    assert math.isfinite(m["ppo/policy_loss"].item())
    assert m["ppo/kl"].item() != 0.0  # the perturbed adapters: policy != reference
    assert_only_trainable_moved(module.model, policy_before, "policy")
    models = [module.model]
    if critic_before is not None:
        assert math.isfinite(m["ppo/value_loss"].item())
        assert_only_trainable_moved(module.value_model, critic_before, "critic")
        models.append(module.value_model)
    assert len(t.optimizers) == len(models)
    for optimizer, model in zip(t.optimizers, models, strict=True):
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        assert held == {id(p) for p in model.parameters() if p.requires_grad}


def test_lora_critic_starts_as_the_reward_model(sft_dir, rm_dir, tmp_path):
    """GAE with a LoRA policy and a reward-model export (design §5.9): the critic is the export
    with LoRA adapters of its own, its trained head copy starting as the export's head, and
    (LoRA B = 0) its value at each sequence's last token is the reward model's reward. After
    training the export's weights in it (backbone and original head) are untouched, while its
    adapters and head copy moved."""
    module = make(sft_dir, reward_model=rm_dir, normalize_reward=False)
    critic = module.value_model.model
    assert is_lora(critic)
    exported = dict(RewardModel.from_pretrained(rm_dir).model.named_parameters())
    torch.testing.assert_close(reward_head(critic).weight, exported["score.weight"])
    base = base_weights(critic)
    assert base.keys() == exported.keys()
    assert all(torch.equal(base[k], v) for k, v in exported.items())
    ids = torch.tensor([[2, 7, 28, 55, 16, 1], [2, 8, 28, 1, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        values = module.value_model(ids, mask)[torch.arange(2), mask.sum(-1) - 1]
        torch.testing.assert_close(values, module.scorer.reward_model(ids, mask), atol=1e-5, rtol=0)
    before = snapshot(module.value_model)
    fit(module, tmp_path)
    assert_only_trainable_moved(module.value_model, before, "critic")
    assert all(torch.equal(base[k], v) for k, v in exported.items())


def base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The frozen weights of a peft classifier under the plain model's names (peft keeps them
    as ``base_layer`` of each adapted linear and ``original_module`` of the head)."""
    return {
        n.replace(".base_layer", "").replace(".original_module", ""): p
        for n, p in model.get_base_model().named_parameters()
        if "lora_" not in n and "modules_to_save" not in n
    }
