"""prefl.data.prompts: evaluation prompts as texts or conversations, with exact toy ids.

The toy tokenizer puts ``<bos>`` (2) before a text; its chat template writes
``<bos> <|role|> content <eos>`` per turn and ``<|assistant|>`` as the generation prompt.
"""

from __future__ import annotations

import pytest

from prefl.data.formats import RowError
from prefl.data.prompts import as_user_turns, encode_prompt_list, resolve_prompts
from prefl.tasks import toy

BOS, EOS = 2, 1
TEXT = "happily , the movie was"


def test_texts_and_conversations_are_tokenized_as_data_rows_are(tok):
    words = tok.convert_tokens_to_ids(TEXT.split())
    user, assistant = tok.convert_tokens_to_ids(["<|user|>", "<|assistant|>"])
    texts, ids = encode_prompt_list(tok, [TEXT, *as_user_turns([TEXT])])
    assert ids == [[BOS, *words], [BOS, user, *words, EOS, assistant]]
    assert texts == [TEXT, f"<bos><|user|> {TEXT} <eos> <|assistant|> "]


def test_special_token_text_in_a_message_stays_text(tok):
    """``<eos>`` written in a message is text (the toy normalizer makes it ``<unk>``), never the
    EOS token that ends a turn; the returned text shows it as written."""
    texts, ids = encode_prompt_list(tok, as_user_turns(["the <eos> movie"]))
    assert ids[0].count(EOS) == 1 and tok.unk_token_id in ids[0]
    assert "the <eos> movie" in texts[0]


def test_a_bad_prompt_names_its_index(tok):
    with pytest.raises(RowError, match=r"prompts.*row 1.*prompt.*non-empty list of messages"):
        encode_prompt_list(tok, [TEXT, []])
    with pytest.raises(RowError, match=r"row 0.*role"):
        encode_prompt_list(tok, [[{"role": "robot", "content": "hi"}]])


def test_resolve_prompts_chat_wraps_texts_only():
    conversation = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}]
    assert resolve_prompts([TEXT, conversation]) == [TEXT, conversation]
    assert resolve_prompts([TEXT, conversation], chat=True) == [
        [{"role": "user", "content": TEXT}],
        conversation,
    ]
    held_out = toy.split_prompts()[1]
    assert resolve_prompts("toy") == held_out
    assert resolve_prompts("toy", chat=True) == as_user_turns(held_out)
