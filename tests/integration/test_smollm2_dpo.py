"""DPO of the real SmolLM2-135M-Instruct on real HH pairs in its chat template, full and LoRA.

Full DPO must raise the held-out implicit-reward accuracy above chance and lower the training
loss, and its export must load with plain ``AutoModelForCausalLM``, keep the 49,152-token
vocabulary and tied embeddings, and generate. LoRA DPO must export a merged, plain checkpoint
that computes what the adapted model computed.
"""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import seed_everything
from smollm2_support import (
    PROMPTS,
    StepLosses,
    adamw,
    assert_vocabulary_kept,
    cpu_trainer,
    greedy_replies,
    pairs_data,
    training_pairs_loss,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefl import DPOModule, HFExport, SampleReport
from prefl.models import CausalLMSpec, LoraSpec

pytestmark = pytest.mark.slow


def test_dpo_raises_held_out_accuracy_and_exports_a_plain_model(smollm2_dir, hh_pairs, tmp_path):
    """One epoch over the 64 training pairs (8 steps of 8, lr 1e-4, beta 0.1, bf16-mixed), one
    validation on the 192 held-out pairs at its end.

    Measured (2-core CPU, seed 0; 189 held-out pairs parse, 3 have a blank reply): held-out
    implicit-reward accuracy 0.000 before (policy = reference: every margin is exactly 0, and
    the accuracy counts strict wins) and 0.635 after; the DPO loss on the training pairs falls
    from ln 2 = 0.693 (exact at the start) to 0.292.
    Two epochs at this lr overfit (training loss 0.09, held-out accuracy 0.583, held-out loss
    0.77 above ln 2); one epoch at 5e-5 over 128 pairs gave 0.587.

    Bounds: the accuracy must exceed 0.55. Under chance (a policy that ranks held-out pairs at
    random) the accuracy over 189 pairs has standard deviation 0.036, so 0.55 is 1.4 sigma above
    chance, and the measured value is 0.085 (2.4 sigma) above it: the margin absorbs what
    another CPU, thread count or library version changes in bf16 rounding (a 0.01 swing between
    runs that differ only in incidental ways here), while a broken mask or a sign error (which
    lands at or below 0.5) still fails. The training pairs' loss must be below ln 2 -
    0.05.
    The first step's loss is ln 2 up to bf16 rounding: the policy's forward runs with autograd
    and the reference's without, and under bf16 autocast the CPU may pick different kernels for
    the two (one CI run saw 0.683, a 0.2-nat summed log-ratio over ~100 reply tokens), so it is
    held to 0.03 here; its exactness (1e-5) is asserted in float32 on real HH rows in
    ``test_smollm2_packing.py``.
    """
    data = pairs_data(smollm2_dir, hh_pairs)
    seed_everything(0)
    dpo = DPOModule(str(smollm2_dir), beta=0.1, optimizer=adamw(1e-4))
    losses, export = StepLosses(), tmp_path / "dpo"
    trainer = cpu_trainer(max_epochs=1, callbacks=[losses, HFExport(str(export))])
    trainer.fit(dpo, datamodule=data)

    for split in ("train", "validation"):  # short rows: nothing cut; 1 and 3 blank replies
        stats = data.stats[split]
        assert stats["truncated"] == 0 and set(stats["unparsed"]) <= {"empty_reply"}
        assert stats["used"] >= 0.95 * stats["read"]
    accuracy = float(trainer.callback_metrics["val/rewards/accuracies"])
    train_loss = training_pairs_loss(trainer, dpo, smollm2_dir, hh_pairs)
    print(f"DPO held-out accuracy {accuracy:.3f}; training-pairs loss 0.693 -> {train_loss:.3f}")
    assert losses.losses[0] == pytest.approx(math.log(2), abs=0.03)
    assert accuracy > 0.55
    assert train_loss < math.log(2) - 0.05

    model = AutoModelForCausalLM.from_pretrained(export)  # plain transformers, no prefl
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert len(tokenizer) == 49_152 and tokenizer.pad_token_id == tokenizer.eos_token_id
    assert_vocabulary_kept(model)
    assert (export / "model.safetensors").is_file()
    replies = greedy_replies(model.eval(), tokenizer)
    print("DPO replies:", replies)
    assert all(reply.strip() for reply in replies)


def test_lora_dpo_exports_merged_adapters(smollm2_dir, hh_pairs, tmp_path):
    """LoRA DPO (r 8, all linear layers, lr 1e-3) for 2 steps, with a chat-format
    ``SampleReport`` against the reference; the export is a plain checkpoint
    of the original vocabulary whose logits equal the adapted model's (float32, within 1e-3:
    the merge adds ``B @ A * alpha / r`` to each weight, the adapters compute it on the side)
    and differ from the base model's (the adapters trained)."""
    data = pairs_data(smollm2_dir, hh_pairs)
    seed_everything(0)
    spec = CausalLMSpec(name_or_path=str(smollm2_dir), lora=LoraSpec(r=8, alpha=16))
    dpo = DPOModule(spec, beta=0.1, optimizer=adamw(1e-3))
    export = tmp_path / "dpo_lora"
    report = SampleReport(
        PROMPTS, chat=True, reward=None, num_samples=1, max_new_tokens=8, compare_reference=True
    )
    callbacks = [HFExport(str(export)), report]
    trainer = cpu_trainer(max_steps=2, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(dpo, datamodule=data)
    assert dpo.reference is None  # the reference is the network with its adapters disabled
    # SampleReport asked each prompt as a user turn in SmolLM2's template (its system prompt
    # first), and the policy answered (8 tokens each) after two small steps from the reference
    assert report.results["mean_length"] > 0 and abs(report.results["kl"]) < 5.0
    asked = report.sample(dpo.model, data.tokenizer).prompts
    assert all(p.startswith("<|im_start|>system\n") for p in asked)
    assert all(p.endswith("<|im_start|>assistant\n") for p in asked)

    merged = AutoModelForCausalLM.from_pretrained(export).eval()
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    assert_vocabulary_kept(merged)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    tokenizer = AutoTokenizer.from_pretrained(export)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Is it ever fine to lie?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        adapted = dpo.model.float().eval()(input_ids=ids).logits
        got, before = merged(input_ids=ids).logits, base(input_ids=ids).logits
    assert (got - adapted).abs().max() < 1e-3
    assert (got - before).abs().max() > 1e-2
    assert all(reply.strip() for reply in greedy_replies(merged, tokenizer))
