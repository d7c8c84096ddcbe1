"""Packing and prompt sharing on real HH rows in SmolLM2's chat template, with its real BPE
tokenizer (PAD = EOS): the layouts of :mod:`prefl.data.packing` must give the padded path's
numbers.

The real 135M model scores a batch of 8 pairs in every layout (policy log-probs and rewards
within 1e-5 relative, float32); a small random-init Llama with SmolLM2's vocabulary and
tokenizer then trains three SGD steps of DPO, reward model and SFT in each layout, which must end
at the padded run's weights (the training test of the layouts on toy rows is
tests/modules/test_packed_layouts.py). The rows are the 64 training pairs of ``hh_pairs``: real
prompts of one to several turns and the template's system prompt, so sequence lengths vary.
"""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import seed_everything
from smollm2_support import cpu_trainer, pairs_data

from prefl import DPOModule, RewardModule, SFTModule
from prefl.data.packing import is_packed
from prefl.models import CausalLMSpec

pytestmark = pytest.mark.slow
LAYOUTS = {
    "padded": {},
    "packed": {"packing": True},
    "shared": {"share_prompt": True},
    "packed_shared": {"packing": True, "share_prompt": True},
}
#: a small Llama of SmolLM2's shape family: vocabulary and tied embeddings from the tokenizer
SMALL = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
}


def one_batch(model_dir, hh_pairs, mode: str = "pairs", **layout) -> dict:
    data = pairs_data(model_dir, hh_pairs, mode=mode, batch_size=8, eval_batch_size=8, **layout)
    data.setup("validate")
    return next(iter(data.val_dataloader()))


def test_the_real_model_scores_every_layout_alike(smollm2_dir, hh_pairs):
    seed_everything(0)
    dpo = DPOModule(str(smollm2_dir), str(smollm2_dir))
    dpo.configure_model()
    reward = RewardModule(str(smollm2_dir), str(smollm2_dir))
    reward.configure_model()
    results = {}
    with torch.no_grad():
        for name, layout in LAYOUTS.items():
            batch = one_batch(smollm2_dir, hh_pairs, **layout)
            assert is_packed(batch) == bool(layout)
            logps = dpo(batch)
            results[name] = (logps["chosen_logps"], logps["rejected_logps"], *reward(batch))
            loss = dpo._step(batch, "val")  # policy = reference at the start
            assert float(loss) == pytest.approx(math.log(2), abs=1e-6)
    for name in ("packed", "shared", "packed_shared"):
        for got, want in zip(results[name], results["padded"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stage", ["dpo", "reward", "sft"])
def test_three_steps_end_at_the_padded_weights(stage, smollm2_dir, hh_pairs, tmp_path):
    final = {}
    layouts = {"padded": {}, "packed": {"packing": True}}
    if stage != "sft":
        layouts["packed_shared"] = {"packing": True, "share_prompt": True}
    for name, layout in layouts.items():
        seed_everything(0)
        cls = {"dpo": DPOModule, "reward": RewardModule, "sft": SFTModule}[stage]
        kwargs = {"lr_scheduler": None} if stage != "sft" else {}
        module = cls(CausalLMSpec(config=SMALL), str(smollm2_dir), optimizer=sgd, **kwargs)
        mode = "sft" if stage == "sft" else "pairs"
        data = pairs_data(smollm2_dir, hh_pairs, mode=mode, **layout)
        trainer = cpu_trainer(
            precision="32-true", max_steps=3, limit_val_batches=0, default_root_dir=tmp_path / name
        )
        trainer.fit(module, datamodule=data)
        final[name] = torch.cat([p.detach().flatten() for p in module.parameters()])
    for name in layouts:
        torch.testing.assert_close(final[name], final["padded"], rtol=0, atol=1e-5)


def sgd(params):
    return torch.optim.SGD(params, lr=0.5)
