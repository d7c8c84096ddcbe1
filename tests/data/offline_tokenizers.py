"""Tokenizers of real model families, built offline with the ``tokenizers`` library (no hub).

- :func:`sentencepiece_bpe`: Llama-2 / Mistral-v0.1 style, as their legacy ``tokenizer.json``: a
  BPE model with byte fallback (``<0x00>``..``<0xFF>``), a ``Prepend("▁")`` + ``Replace(" ",
  "▁")`` normalizer and no pre-tokenizer (``legacy=True``), or a ``Metaspace`` pre-tokenizer with
  ``prepend_scheme="first"`` (``legacy=False``); ``<unk>``/``<s>``/``</s>`` = 0/1/2, BOS added,
  and a Llama-2 chat template (``<s>[INST] user [/INST] reply </s>``).
- :func:`byte_level_bpe`: GPT-2 / Qwen style byte-level BPE with a ChatML template; EOS
  ``<|im_end|>``, PAD ``<|endoftext|>``, no BOS.

Both are trained on :data:`CORPUS` (sentences written for these tests) unless given texts, and
go through :func:`prefl.models.load_tokenizer` (which adds ``<|pad|>`` where PAD is missing).

Also the row-level helpers the data tests share: :func:`tokenize_rows` (``tokenize_batch`` on a
list of rows) and :func:`encode_alone` (the old completion-on-its-own rule).
"""

from __future__ import annotations

import json

from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast

from prefl.data import load_tokenizer
from prefl.data.formats import Columns
from prefl.data.tokenize import Limits, tokenize_batch

CORPUS = [
    "\n\nHuman: How do I bake bread at home?\n\nAssistant: Mix flour, water, salt and yeast.",
    "\n\nHuman: What is the capital of France?\n\nAssistant: Paris is the capital of France.",
    "\n\nHuman: Can you help me?\n\nAssistant: Sure, I am happy to help with anything.",
    "[INST] Tell me a joke. [/INST] Why did the chicken cross the road? To get across.",
    "[INST] Write a short poem about the sea. [/INST] The sea is wide, the sea is deep.",
    "Hello world! The quick brown fox jumps over the lazy dog. I don't know, sorry.",
    "Sure thing. Here is a recipe: eggs, milk, sugar and butter, then bake it for an hour.",
]
LLAMA2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + message['content'].strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'].strip() + ' ' + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BYTES = [f"<0x{b:02X}>" for b in range(256)]


def _train(core: Tokenizer, texts: list[str] | None, vocab_size: int, **kwargs) -> None:
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, **kwargs)
    core.train_from_iterator(texts or CORPUS, trainer)


def sentencepiece_core(
    texts: list[str] | None = None,
    vocab_size: int = 500,
    legacy: bool = True,
    added: tuple[str, ...] = ("<unk>", "<s>", "</s>"),
) -> Tokenizer:
    """The ``tokenizers`` core of :func:`sentencepiece_bpe`; ``added`` are the tokens registered
    as special (the same vocabulary either way: leave one out to tokenize it as text)."""
    trainer_core = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_core.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    _train(trainer_core, texts, vocab_size, special_tokens=["<unk>", "<s>", "</s>"])
    trained = json.loads(trainer_core.to_str())["model"]
    pieces = sorted(trained["vocab"], key=trained["vocab"].get)[3:]
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *BYTES, *pieces])}
    merges = [tuple(m) for m in trained["merges"]]
    core = Tokenizer(
        models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    if legacy:
        core.normalizer = normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
        )
        core.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
             decoders.Strip(" ", 1, 0)]
        )  # fmt: skip
    else:
        core.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
        core.decoder = decoders.Sequence(
            [decoders.ByteFallback(), decoders.Metaspace(prepend_scheme="first", split=False)]
        )
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    core.add_special_tokens([AddedToken(t, normalized=False) for t in added])
    return core


def sentencepiece_bpe(
    texts: list[str] | None = None, vocab_size: int = 500, legacy: bool = True
) -> PreTrainedTokenizerFast:
    """A Llama-2 / Mistral-v0.1 style SentencePiece BPE tokenizer (see the module doc)."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=sentencepiece_core(texts, vocab_size, legacy),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = LLAMA2_CHAT_TEMPLATE
    return load_tokenizer(tok)


def byte_level_bpe(
    texts: list[str] | None = None, vocab_size: int = 500, strip_flags: bool = False
) -> PreTrainedTokenizerFast:
    """A GPT-2 / Qwen style byte-level BPE tokenizer with a ChatML template (module doc).

    ``strip_flags`` gives ``<|im_end|>`` ``lstrip``/``rstrip`` (it then eats whitespace around
    itself), to check that prefl keeps such flags.
    """
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    _train(
        core, texts, vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    core.post_processor = processors.ByteLevel(trim_offsets=False)
    if strip_flags:
        core.add_special_tokens([AddedToken("<|im_end|>", lstrip=True, rstrip=True)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHATML_TEMPLATE
    return load_tokenizer(tok)


def lone_metaspace_id(tok: PreTrainedTokenizerFast) -> int:
    """The id of the lone ``"▁"`` piece."""
    return tok.convert_tokens_to_ids("▁")


def encode_alone(tokenizer, texts, chat):
    """Completions tokenized *on their own* (the pre-issue-15 rule, kept as the reference the
    boundary tests compare against): no special tokens added, special strings read as special,
    each ending with EOS exactly once (a chat text cut after its first EOS)."""
    from prefl.data.boundary import end_with_eos, strip_after_eos

    eos_id, eos = tokenizer.eos_token_id, tokenizer.eos_token
    if chat:
        texts = [strip_after_eos(t, eos) for t in texts]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return [end_with_eos(row, eos_id) for row in ids]


def tokenize_rows(
    tok, mode: str, rows: list[dict], fmt: str, max_length: int = 512, max_prompt_length=None
) -> dict[str, list]:
    """``tokenize_batch`` on ``rows`` (dicts with the same keys) as the first rows of the train
    split, default columns; the margin is used where the rows have one."""
    batch = {k: [r[k] for r in rows] for k in rows[0]}
    return tokenize_batch(
        batch,
        list(range(len(rows))),
        split="train",
        mode=mode,
        row_format=fmt,
        columns=Columns(),
        tokenizer=tok,
        limits=Limits(max_length, max_prompt_length),
        use_margin="margin" in rows[0],
    )
