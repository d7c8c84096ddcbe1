"""A LoRA adapter saved by ``peft`` is a checkpoint source of SampleModule: its directory alone
(the base read from its ``adapter_config.json``) samples what the merged model samples, and
not what the base samples."""

from __future__ import annotations

import json

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefl import PreferenceDataModule, SampleModule, SampleWriter


def _texts(source, tokenizer_dir, quiet_trainer, out):
    data = PreferenceDataModule(
        mode="prompts", tokenizer=tokenizer_dir, max_length=32, batch_size=4, max_samples=4
    )
    module = SampleModule(source, num_samples=2, max_new_tokens=6, seed=1)
    writer = SampleWriter(str(out))
    trainer = quiet_trainer(out, callbacks=[writer])
    trainer.predict(module, datamodule=data, return_predictions=False)
    return [json.loads(line)["completions"] for line in writer.path.read_text().splitlines()]


def test_an_adapter_directory_samples_as_the_merged_model(sft_dir, quiet_trainer, tmp_path):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(sft_dir)
    config = LoraConfig(r=4, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    adapted = get_peft_model(base, config)  # random A and B: the adapter changes the model
    adapted.save_pretrained(tmp_path / "adapter")
    merged = adapted.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    AutoTokenizer.from_pretrained(sft_dir).save_pretrained(tmp_path / "merged")

    from_adapter = _texts(str(tmp_path / "adapter"), sft_dir, quiet_trainer, tmp_path / "a")
    from_merged = _texts(str(tmp_path / "merged"), sft_dir, quiet_trainer, tmp_path / "m")
    from_base = _texts(sft_dir, sft_dir, quiet_trainer, tmp_path / "b")
    assert from_adapter == from_merged
    assert from_adapter != from_base
