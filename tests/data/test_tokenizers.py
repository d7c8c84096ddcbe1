"""Tests for prefl.data.tokenizers: the toy tokenizer's fixed ids, BOS handling, the PAD != EOS
guarantee of ``load_tokenizer``, and save/load round trips.

Toy ids (special tokens first, then ``prefl.tasks.toy.vocabulary()`` in order):
``<pad>``=0, ``<eos>``=1, ``<bos>``=2, ``<unk>``=3, ``<|system|>``=4, ``<|user|>``=5,
``<|assistant|>``=6, ``happily``=7, ``,``=28, ``the``=55, ``movie``=16, ``was``=24, ``great``=30,
``bad``=40, ``then``=69 (the last of 70).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from prefl.data import tokenizers as tokmod
from prefl.data.tokenizers import build_toy_tokenizer, load_tokenizer

WORD_IDS = {"happily": 7, ",": 28, "the": 55, "movie": 16, "was": 24, "great": 30, "bad": 40}
PROMPT = "happily , the movie was"
PROMPT_IDS = [7, 28, 55, 16, 24]


def word_level(vocab: dict[str, int], **special: str) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer built offline with the ``tokenizers`` library."""
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", **special)


SMALL_VOCAB = {"<unk>": 0, "</s>": 1, "a": 2, "b": 3}


@pytest.fixture(scope="module")
def toy_tok():
    return load_tokenizer("toy")


# --------------------------------------------------------------------------- the toy tokenizer


def test_toy_special_ids(toy_tok):
    assert (toy_tok.pad_token_id, toy_tok.eos_token_id, toy_tok.bos_token_id) == (0, 1, 2)
    assert toy_tok.unk_token_id == 3
    assert toy_tok.convert_tokens_to_ids(["<|system|>", "<|user|>", "<|assistant|>"]) == [4, 5, 6]
    assert toy_tok.pad_token_id != toy_tok.eos_token_id
    assert len(toy_tok) == 70
    assert toy_tok.convert_ids_to_tokens(69) == "then"


def test_toy_word_ids(toy_tok):
    for word, idx in WORD_IDS.items():
        assert toy_tok.convert_tokens_to_ids(word) == idx
    assert toy_tok.convert_tokens_to_ids("never-seen") == 3


def test_load_tokenizer_toy_keeps_its_pad(toy_tok):
    assert toy_tok.pad_token == "<pad>"
    assert "<|pad|>" not in toy_tok.get_vocab()


def test_toy_vocab_is_identical_in_a_fresh_process(toy_tok):
    code = (
        "import json; from prefl.data.tokenizers import load_tokenizer; "
        "print(json.dumps(load_tokenizer('toy').get_vocab(), sort_keys=True))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == toy_tok.get_vocab()


def test_bos_only_with_special_tokens(toy_tok):
    assert toy_tok(PROMPT)["input_ids"] == [2, *PROMPT_IDS]
    assert toy_tok(PROMPT, add_special_tokens=False)["input_ids"] == PROMPT_IDS
    assert toy_tok("great bad", add_special_tokens=False)["input_ids"] == [30, 40]
    # no EOS is appended; unknown words map to <unk>
    assert toy_tok("great xyzzy")["input_ids"] == [2, 30, 3]


def test_decode_skips_special_tokens(toy_tok):
    assert toy_tok.decode([2, 30, 40, 1, 0, 0], skip_special_tokens=True) == "great bad"
    assert toy_tok.decode([30, 1], skip_special_tokens=False) == "great <eos>"


def test_toy_chat_template(toy_tok):
    messages = [{"role": "user", "content": "great"}, {"role": "assistant", "content": "bad"}]
    text = toy_tok.apply_chat_template(messages, tokenize=False)
    assert text == "<bos><|user|> great <eos> <|assistant|> bad <eos> "
    prompt = toy_tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<bos><|user|> great <eos> <|assistant|> "
    ids = toy_tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids == [2, 5, 30, 1, 6]


# --------------------------------------------------------------------------- round trips


def test_save_and_reload_with_auto_tokenizer(toy_tok, tmp_path):
    toy_tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.get_vocab() == toy_tok.get_vocab()
    assert reloaded(PROMPT)["input_ids"] == [2, *PROMPT_IDS]
    assert reloaded(PROMPT, add_special_tokens=False)["input_ids"] == PROMPT_IDS
    assert (reloaded.pad_token_id, reloaded.eos_token_id, reloaded.bos_token_id) == (0, 1, 2)
    assert reloaded.chat_template == toy_tok.chat_template
    messages = [{"role": "user", "content": "great"}]
    assert reloaded.apply_chat_template(messages, tokenize=False) == toy_tok.apply_chat_template(
        messages, tokenize=False
    )


def test_load_tokenizer_from_a_local_directory_string(toy_tok, tmp_path):
    toy_tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert len(loaded) == 70  # it has a distinct pad already: nothing added
    assert loaded.pad_token == "<pad>"
    assert loaded(PROMPT)["input_ids"] == [2, *PROMPT_IDS]


def test_trust_remote_code_is_passed_through(monkeypatch):
    seen = []

    def fake_from_pretrained(name, **kwargs):
        seen.append((name, kwargs))
        return build_toy_tokenizer()

    monkeypatch.setattr(tokmod.AutoTokenizer, "from_pretrained", fake_from_pretrained)
    load_tokenizer("some/repo")
    load_tokenizer("some/repo", trust_remote_code=True)
    load_tokenizer("/models/x/model.Q4.gguf")  # a GGUF file: its folder and file name
    assert seen == [
        ("some/repo", {"gguf_file": None, "trust_remote_code": False}),
        ("some/repo", {"gguf_file": None, "trust_remote_code": True}),
        ("/models/x", {"gguf_file": "model.Q4.gguf", "trust_remote_code": False}),
    ]


# ------------------------------------------------------------------ PAD: the vocabulary kept


def test_no_pad_token_pads_with_eos():
    """No PAD: the EOS becomes PAD; nothing is added, so the vocabulary stays 4 tokens."""
    tok = word_level(SMALL_VOCAB, eos_token="</s>")
    assert tok.pad_token_id is None and len(tok) == 4
    out = load_tokenizer(tok)
    assert out is tok
    assert (out.pad_token, out.pad_token_id, out.eos_token_id) == ("</s>", 1, 1)
    assert len(out) == 4
    assert out("a b", padding="max_length", max_length=4)["input_ids"] == [2, 3, 1, 1]


def test_pad_equal_to_eos_is_kept():
    tok = word_level(SMALL_VOCAB, eos_token="</s>", pad_token="</s>")
    assert tok.pad_token_id == tok.eos_token_id == 1
    out = load_tokenizer(tok)
    assert (out.pad_token_id, out.eos_token_id, len(out)) == (1, 1, 4)


def test_a_distinct_pad_is_left_alone():
    vocab = {**SMALL_VOCAB, "<p>": 4}
    tok = load_tokenizer(word_level(vocab, eos_token="</s>", pad_token="<p>"))
    assert (tok.pad_token, tok.pad_token_id, len(tok)) == ("<p>", 4, 5)


def test_pad_set_to_eos_survives_a_round_trip(tmp_path):
    tok = load_tokenizer(word_level(SMALL_VOCAB, eos_token="</s>"))
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(str(tmp_path))
    assert (again.pad_token, again.pad_token_id, again.eos_token_id, len(again)) == (
        "</s>",
        1,
        1,
        4,
    )


def test_no_eos_raises():
    with pytest.raises(ValueError, match="no EOS token"):
        load_tokenizer(word_level(SMALL_VOCAB))
