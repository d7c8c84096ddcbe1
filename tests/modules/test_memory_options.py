"""Memory options that are prefl's own or wired through it, each shown to change something.

* ``PPOModule(offload_frozen=True)`` keeps the frozen reference and reward model on the CPU
  between rollouts: every ``.to`` call on them is recorded, and their forwards must happen only
  between a move to the module's device and the move back. On this CPU-only machine the device
  *is* the CPU, so what is tested is the sequence of moves (the memory it saves is on a GPU).
* ``Trainer(precision="bf16-mixed")`` reaches the policy's forward: its logits are bfloat16
  under autocast, float32 without it, and the DPO loss stays finite.
* Precomputed reference log-probs, gradient checkpointing, LoRA's adapter-disabled reference
  and the chunked log-probs have their own tests (``test_dpo.py``, ``test_causal_lm.py``,
  ``test_functional.py``); ``benchmarks/memory_options.py`` measures what each one saves.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer

from prefl import DPOModule, PPOModule, PreferenceDataModule, RewardModel
from prefl.data import load_tokenizer
from prefl.models import CausalLMSpec, build_reward_model


def _trainer(tmp_path, **kw):
    defaults = dict(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_steps=2,
        limit_val_batches=0,
    )
    return Trainer(**{**defaults, **kw})


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    torch.manual_seed(1)
    tok = load_tokenizer("toy")
    rm = RewardModel(build_reward_model(CausalLMSpec(config="toy"), tok), tok)
    return str(rm.save_pretrained(tmp_path_factory.mktemp("rm")))


def _record_moves(module, events):
    """Log ``to(...)`` calls and forwards of the reference and the reward model."""
    frozen = {"reference": module.reference, "reward": module.scorer.reward_model}
    for name, model in frozen.items():
        original = model.to

        def to(*args, _name=name, _original=original, **kwargs):
            events.append((_name, "to", str(args[0] if args else kwargs.get("device"))))
            return _original(*args, **kwargs)

        model.to = to
        model.register_forward_pre_hook(lambda *_, _name=name: events.append((_name, "fwd", "")))


@pytest.mark.parametrize("offload", [True, False])
def test_offload_frozen_moves_reference_and_reward_model_around_each_rollout(
    sft_dir, rm_dir, tmp_path, offload
):
    torch.set_num_threads(1)
    module = PPOModule(
        sft_dir,
        tokenizer="toy",
        reward_model=rm_dir,
        advantage_estimator="rloo",
        num_samples=2,
        max_new_tokens=4,
        ppo_epochs=1,
        log_samples_every=0,
        offload_frozen=offload,
    )
    module.configure_model()
    events: list[tuple[str, str, str]] = []
    _record_moves(module, events)
    data = PreferenceDataModule(
        mode="prompts", max_samples=4, batch_size=2, max_length=32, max_prompt_length=16
    )
    _trainer(tmp_path).fit(module, datamodule=data)
    moves = [e for e in events if e[1] == "to"]
    if not offload:
        assert moves == []  # Lightning moves the LightningModule as a whole, not these
        return
    for name in ("reference", "reward"):
        mine = [(kind, where) for n, kind, where in events if n == name]
        # offloaded at train start, then per rollout (2 steps): to device, forward(s), to cpu
        assert mine[0] == ("to", "cpu")
        rollouts = mine[1:]
        assert [w for k, w in rollouts if k == "to"] == ["cpu", "cpu", "cpu", "cpu"]
        assert rollouts[0] == ("to", str(module.device)) and rollouts[-1] == ("to", "cpu")
        inside = False
        for kind, _ in rollouts:
            if kind == "to":
                inside = not inside
            else:
                assert inside, f"{name} ran a forward while offloaded"
    assert module.reference.lm_head.weight.device.type == "cpu"


def test_offload_frozen_is_rejected_with_a_sharded_model(sft_dir, monkeypatch):
    module = PPOModule(sft_dir, tokenizer="toy", reward_fns=["toy"], offload_frozen=True)
    module.configure_model()
    monkeypatch.setattr(type(module), "sharded", property(lambda self: True))
    with pytest.raises(ValueError, match="offload_frozen does not combine with a sharded"):
        module.offload_frozen_models()


@pytest.mark.parametrize(
    ("precision", "dtype"), [("bf16-mixed", torch.bfloat16), ("32", torch.float32)]
)
def test_bf16_mixed_reaches_the_policy_forward(sft_dir, tmp_path, precision, dtype):
    torch.set_num_threads(1)
    module = DPOModule(sft_dir, tokenizer="toy")
    module.configure_model()
    seen = []
    module.model.lm_head.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    data = PreferenceDataModule(mode="pairs", max_samples=4, batch_size=2, max_length=32)
    trainer = _trainer(tmp_path, precision=precision)
    trainer.fit(module, datamodule=data)
    assert seen and set(seen) == {dtype}
    assert module.model.lm_head.weight.dtype == torch.float32  # mixed: fp32 master weights
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


@pytest.mark.parametrize("accumulate", [1, 2])
def test_gradients_are_freed_right_after_each_optimizer_step(sft_dir, tmp_path, accumulate):
    """No gradient copy lives through the next forward (the peak), but accumulation keeps them
    between the micro-batches of one step."""
    from lightning.pytorch import Callback

    class Grads(Callback):
        def __init__(self):
            self.alive: list[bool] = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.alive.append(any(p.grad is not None for p in module.parameters()))

    torch.set_num_threads(1)
    grads = Grads()
    data = PreferenceDataModule(mode="pairs", max_samples=8, batch_size=2, max_length=32)
    trainer = _trainer(tmp_path, max_steps=2, accumulate_grad_batches=accumulate)
    trainer.callbacks.append(grads)
    trainer.fit(DPOModule(sft_dir, tokenizer="toy"), datamodule=data)
    expected = [False, False] if accumulate == 1 else [True, False, True, False]
    assert grads.alive == expected
