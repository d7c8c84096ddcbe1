"""Tokenizer loading, and the offline word-level tokenizer of the toy task.

Every stage takes its tokenizer through :func:`load_tokenizer`. Its one rule: a tokenizer keeps
its vocabulary. One without a PAD token gets its EOS as PAD (no token is added, no embedding is
resized); one whose PAD already equals EOS (most instruct checkpoints) is left as it is. prefl
tells padding from a real EOS by the attention and loss masks, never by id (see
docs/data.md). The toy tokenizer has a PAD of its own, distinct from EOS.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from prefl.tasks import toy

TOY_SPECIAL_TOKENS: tuple[str, ...] = (
    "<pad>", "<eos>", "<bos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>",
)  # fmt: skip
#: A minimal chat template for the toy tokenizer (role marker, content, EOS after each turn).
TOY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|> ' + message['content'] + ' ' + eos_token + ' ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


def build_toy_tokenizer() -> PreTrainedTokenizerFast:
    """Build the toy task's word-level tokenizer offline, with the ``tokenizers`` library.

    The vocabulary is the special tokens followed by :func:`prefl.tasks.toy.vocabulary` in its
    fixed order, so ids are identical in every process and on every machine. Text is split on
    whitespace; a BOS token is prepended when special tokens are added; PAD (id 0) and EOS (id 1)
    are distinct. It carries a small chat template for conversational rows. Text never becomes a
    special token: its normalizer writes ``<`` as ``‹`` (no word has either), so a special-token
    string that is text (``split_special_tokens=True``, as prefl tokenizes rows) is ``<unk>``.
    """
    words = [*TOY_SPECIAL_TOKENS, *toy.vocabulary()]
    vocab = {word: i for i, word in enumerate(words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Replace("<", "\u2039")  # see the docstring
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = TOY_CHAT_TEMPLATE
    return tokenizer


def gguf_source(name_or_path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """``(folder or hub id, GGUF file name or None)`` as ``from_pretrained`` takes them.

    Args:
        name_or_path: A hub id, a local directory, or the path of a ``.gguf`` file itself.
        gguf_file: A GGUF file inside ``name_or_path``; None = none, unless ``name_or_path`` is
            itself a ``.gguf`` path (then it is split into its folder and file name).
    """
    if gguf_file is None and name_or_path.endswith(".gguf"):
        path = Path(name_or_path)
        return str(path.parent), path.name
    return name_or_path, gguf_file


def load_tokenizer(
    tokenizer: str | PreTrainedTokenizerBase,
    trust_remote_code: bool = False,
) -> PreTrainedTokenizerBase:
    """Return the tokenizer with a PAD token, its vocabulary unchanged.

    prefl tells padding from real tokens by the attention and loss masks, never by id, so PAD may
    equal EOS (as in most instruct checkpoints): a tokenizer without PAD gets its EOS as PAD (no
    token is added, so the model's vocabulary and embeddings stay as they are, as in TRL and
    OpenRLHF). The toy tokenizer has a PAD of its own.

    Args:
        tokenizer: ``"toy"`` for :func:`build_toy_tokenizer`, a Hugging Face hub id or local
            directory (``AutoTokenizer.from_pretrained``), the path of a ``.gguf`` file (its
            tokenizer; needs the ``gguf`` extra), or a tokenizer instance (used as is, apart from
            setting PAD).
        trust_remote_code: Passed to ``from_pretrained``; off unless you trust the source.

    Returns:
        The tokenizer, ``pad_token`` set.

    Raises:
        ValueError: The tokenizer has no EOS token (completions could not be terminated).
    """
    if isinstance(tokenizer, str):
        if tokenizer == "toy":
            tok = build_toy_tokenizer()
        else:
            source, gguf_file = gguf_source(tokenizer)
            tok = AutoTokenizer.from_pretrained(
                source, gguf_file=gguf_file, trust_remote_code=trust_remote_code
            )
    else:
        tok = tokenizer
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {tok.name_or_path!r} has no EOS token; set one first")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
