"""SampleModule: ``k`` answers per prompt from any causal LM, as Lightning's ``predict`` loop.

The first step of making preference pairs of one's own: sample a model's answers to a set of
prompts, then label them (a reward model, reward functions, a judge or a person). ``predict``
makes it data-parallel on any Trainer (1 CPU, or GPUs × nodes) with the strategies training uses.

Sampling goes through the generation path of PPO and online DPO
(:func:`prefl.generation.sampling_config`, :func:`prefl.generation.sample.generate_with`):
prompts rendered like training rows (a conversation in the tokenizer's chat template with its
generation prompt), left-padded, the KV cache, the checkpoint's own ``generation_config`` kept
out, everything after a completion's first EOS dropped (PAD may be EOS: masks tell them apart).
Two things differ, both for making datasets:

- ``top_p`` (nucleus sampling) may be set; reinforcement learning keeps it off (see
  :mod:`prefl.generation.sample`);
- each prompt's samples depend on the run's ``seed`` and the prompt's row id alone
  (:mod:`prefl.generation.seeded`), never on its batch, its batch size or the rank it lands
  on: a 2-rank run writes what a 1-rank run writes, and a resumed run what an uninterrupted one
  would. The ``k`` samples of a prompt share its forward (KV cache copied ``k`` times).

The model is any :class:`~prefl.models.CausalLMSpec` source: a Hugging Face directory or hub id,
a ``.gguf`` file, or a LoRA adapter saved by ``peft`` (merged into its base for sampling).

Use it with ``PreferenceDataModule(mode="prompts")`` (its ``predict_dataloader``) and
:class:`prefl.SampleWriter`, which writes the JSONL described in
:mod:`prefl.callbacks.sample_writer`.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from prefl.data.collate import PROMPT_SOURCE, ROW
from prefl.generation.sample import completion_mask, sampling_config
from prefl.generation.seeded import generate_seeded, sample_seed
from prefl.models import CausalLMSpec, disable_dropout, is_lora, merge_lora
from prefl.modules.base import CausalLMModule


class SampleModule(CausalLMModule):
    """Sample ``num_samples`` completions per prompt in ``predict`` (see the module docstring).

    Args:
        model: The model to sample: a :class:`~prefl.models.CausalLMSpec`, or a hub id, a
            local directory (an export, or a saved LoRA adapter), or a ``.gguf`` file.
        tokenizer: The tokenizer; None = the data module's (the CLI links them).
        num_samples: Completions per prompt (``k`` >= 1).
        temperature: Sampling temperature (> 0).
        top_p: Nucleus sampling: keep the most likely tokens up to this probability mass
            (after the temperature); 1.0 = off (the full ``softmax(logits / T)``).
        max_new_tokens: Most tokens per completion; one that reaches it without EOS is kept,
            marked ``ended: false`` in the samples.
        seed: Run seed: sample ``j`` of the prompt with row id ``r`` is drawn from
            ``sample_seed(seed, r, j)`` alone.
    """

    def __init__(
        self,
        model: CausalLMSpec | str,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        num_samples: int = 2,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        seed: int = 0,
    ) -> None:
        super().__init__(model, tokenizer)
        if num_samples < 1:
            raise ValueError(f"model.num_samples must be >= 1, got {num_samples}")
        if max_new_tokens < 1:
            raise ValueError(f"model.max_new_tokens must be >= 1, got {max_new_tokens}")
        sampling_config(temperature, max_new_tokens, 0, 0, top_p=top_p)  # checks T and top_p
        self.num_samples, self.temperature, self.top_p = num_samples, temperature, top_p
        self.max_new_tokens, self.seed = max_new_tokens, seed

    def settings(self) -> dict[str, Any]:
        """What decides the samples besides the prompt: the model and the sampling settings
        (``meta`` of every sample row, see :mod:`prefl.callbacks.sample_writer`)."""
        spec = self.model_spec
        if isinstance(spec, str):
            name = spec
        elif spec.name_or_path is not None:
            name = spec.lora_adapter or spec.name_or_path
            name = f"{name}/{spec.gguf_file}" if spec.gguf_file else name
        else:
            name = f"random init: {spec.config}"
        return {
            "model": str(name),
            "num_samples": self.num_samples,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens,
            "seed": self.seed,
        }

    def build_models(self) -> None:
        """The model, frozen, in eval mode, dropout off; a LoRA adapter is merged into its base
        (one matmul per layer instead of three) unless the model is to be sharded."""
        super().build_models()
        if is_lora(self.model) and getattr(self, "_device_mesh", None) is None:
            self.model = merge_lora(self.model, inplace=True)
        disable_dropout(self.model)
        self.model.requires_grad_(False)
        self.model.eval()

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Sample the batch's prompts.

        Args:
            batch: A ``prompts`` batch of :class:`~prefl.data.PreferenceDataModule`:
                ``prompt_input_ids`` / ``prompt_attention_mask`` ``(B, P)`` left-padded,
                ``row`` ``(B,)``, ``prompt_source`` (``B`` texts or message lists) and, under
                data parallelism, ``sample_weight`` ``(B,)`` (0 on the sampler's padding
                repeats, which are sampled, as every rank must run ``generate``, but not
                returned).
            batch_idx: Unused.

        Returns:
            One row per real prompt: ``{"prompt", "completions", "meta"}`` as
            :mod:`prefl.callbacks.sample_writer` documents it.
        """
        if ROW not in batch or PROMPT_SOURCE not in batch:
            raise ValueError(
                "SampleModule.predict_step needs prompts batches with row ids: use "
                "PreferenceDataModule(mode='prompts') and its predict_dataloader"
            )
        tokenizer = self.resolve_tokenizer()
        k, eos = self.num_samples, tokenizer.eos_token_id
        rows = [int(r) for r in batch[ROW]]
        config = sampling_config(
            self.temperature, self.max_new_tokens, tokenizer.pad_token_id, eos, top_p=self.top_p
        )
        seeds = [sample_seed(self.seed, row, j) for row in rows for j in range(k)]
        new = generate_seeded(
            self.model,
            batch["prompt_input_ids"],
            batch["prompt_attention_mask"],
            config,
            seeds,
            repeats=k,
        )
        lengths = completion_mask(new, eos).sum(-1).tolist()
        tokens = [row[:n].tolist() for row, n in zip(new, lengths, strict=True)]
        texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
        weights = batch.get("sample_weight", torch.ones(len(rows))).tolist()
        settings = self.settings()
        out = []
        for i, (row, prompt) in enumerate(zip(rows, batch[PROMPT_SOURCE], strict=True)):
            if weights[i] == 0:  # the distributed sampler's repeat of a row another rank has
                continue
            mine = range(i * k, (i + 1) * k)
            meta = {
                "row": row,
                **settings,
                "ended": [bool(tokens[j]) and tokens[j][-1] == eos for j in mine],
                "lengths": [lengths[j] for j in mine],
            }
            out.append({"prompt": prompt, "completions": [texts[j] for j in mine], "meta": meta})
        return out
