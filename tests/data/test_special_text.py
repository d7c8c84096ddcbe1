"""Issue 15, defect 3: special-token text in row data stays text (prefl.data.specials).

Every row format and mode, with the EOS, BOS and PAD strings (and chat-template tokens) of three
tokenizers written into prompts and completions: a Llama-2 style SentencePiece BPE (Llama-2 chat
template), a byte-level BPE (ChatML, EOS ``<|im_end|>``) and the toy word-level tokenizer. Each
completion holds exactly one EOS id, at its end, and no other special id; a plain prompt holds
only the BOS prefix; a chat prompt holds exactly the special tokens its template writes.
"""

from __future__ import annotations

import re

import pytest
from offline_tokenizers import byte_level_bpe, sentencepiece_bpe, sentencepiece_core, tokenize_rows
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from prefl.data.formats import RowError
from prefl.data.specials import MARK, bos_prefix, defuse, encode_text, restore
from prefl.data.tokenizers import build_toy_tokenizer, load_tokenizer

H, A = "\n\nHuman:", "\n\nAssistant:"
MAX_LENGTH = 4096  # far above every row here: nothing is cut


@pytest.fixture(scope="module")
def toks() -> dict:
    return {"sp": sentencepiece_bpe(), "bl": byte_level_bpe(), "toy": build_toy_tokenizer()}


def injected(tok) -> list[str]:
    """The special strings written into rows: EOS, BOS, PAD and the template's own tokens."""
    extra = {"<|im_start|>", "<|user|>", "<|assistant|>"} & set(tok.all_special_tokens)
    names = (tok.eos_token, tok.bos_token, tok.pad_token, *sorted(extra))
    return [s for s in names if s]


def texts(s: str) -> tuple[str, str, str]:
    """A prompt and two replies with ``s`` inside, a reply ending with it."""
    return f"Tell me about {s} please.", f" The end.{s}", f" I {s} don't know."


def plain_rows(fmt: str, mode: str, s: str) -> list[dict]:
    p, c, r = texts(s)
    if fmt == "implicit":
        return [{"chosen": f"{H} {p}{A}{c}", "rejected": f"{H} {p}{A}{r}"}]
    return [{"prompt": p} if mode == "prompts" else {"prompt": p, "chosen": c, "rejected": r}]


def chat_rows(shape: str, s: str) -> list[dict]:
    p, c, r = texts(s)
    user = [{"role": "user", "content": p}]
    reply = {"chosen": c.strip(), "rejected": r.strip()}
    if shape == "lists":
        return [
            {"prompt": user, **{k: [{"role": "assistant", "content": v}] for k, v in reply.items()}}
        ]
    if shape == "conversations":
        return [{k: [*user, {"role": "assistant", "content": v}] for k, v in reply.items()}]
    return [{"messages": [*user, {"role": "assistant", "content": reply["chosen"]}]}]  # sft


def special_ids(tok) -> set[int]:
    return set(tok.all_special_ids) - {tok.unk_token_id}  # <unk> from text is fine


def specials_in(ids: list[int], tok) -> list[int]:
    return [i for i in ids if i in special_ids(tok)]


def check_completions(out: dict, mode: str, tok) -> None:
    names = {"pairs": ["chosen_ids", "rejected_ids"], "sft": ["completion_ids"], "prompts": []}
    for name in names[mode]:
        for ids in out[name]:
            assert specials_in(ids, tok) == [tok.eos_token_id] and ids[-1] == tok.eos_token_id


def check_text_kept(tok, out: dict, mode: str, s: str) -> None:
    """The special string is still there, as text (the toy reads it as <unk>)."""
    if isinstance(tok.backend_tokenizer.model, models.WordLevel):
        return
    name = {"pairs": "chosen_ids", "sft": "completion_ids", "prompts": None}[mode]
    ids = out["prompt_ids"][0] + (out[name][0] if name else [])
    assert s in tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("which", ["sp", "bl", "toy"])
@pytest.mark.parametrize("mode", ["pairs", "sft", "prompts"])
@pytest.mark.parametrize("fmt", ["explicit", "implicit"])
def test_plain_rows_keep_special_text_as_text(toks, which, mode, fmt):
    tok = toks[which]
    for s in injected(tok):
        rows = plain_rows(fmt, mode, s)
        if mode == "sft" and fmt == "explicit":
            rows = [{"prompt": rows[0]["prompt"], "completion": rows[0]["chosen"]}]
        out = tokenize_rows(tok, mode, rows, fmt, MAX_LENGTH)
        assert out["drop_reason"] == [""]
        assert specials_in(out["prompt_ids"][0], tok) == bos_prefix(tok), s
        assert out["prompt_ids"][0][: len(bos_prefix(tok))] == bos_prefix(tok)
        check_completions(out, mode, tok)
        check_text_kept(tok, out, mode, s)


@pytest.mark.parametrize("which", ["sp", "bl", "toy"])
@pytest.mark.parametrize(
    ("shape", "mode"),
    [("lists", "pairs"), ("lists", "sft"), ("lists", "prompts"), ("conversations", "pairs"),
     ("conversations", "sft"), ("conversations", "prompts"), ("messages", "sft")],
)  # fmt: skip
def test_chat_rows_keep_content_specials_as_text_and_template_specials_special(
    toks, which, shape, mode
):
    tok = toks[which]
    for s in injected(tok):
        rows = chat_rows(shape, s)
        if shape == "lists" and mode == "sft":
            rows = [{"prompt": rows[0]["prompt"], "completion": rows[0]["chosen"]}]
        out = tokenize_rows(tok, mode, rows, "conversational", MAX_LENGTH)
        clean_rows = chat_rows(shape, "")  # no special text
        clean = tokenize_rows(tok, mode, clean_rows, "conversational", MAX_LENGTH)
        template = specials_in(clean["prompt_ids"][0], tok)
        assert template and specials_in(out["prompt_ids"][0], tok) == template, s
        check_completions(out, mode, tok)
        check_text_kept(tok, out, mode, s)
        if mode == "prompts":  # the prompt text handed to reward functions is the user's
            assert s in out["prompt"][0] and MARK not in out["prompt"][0]


@pytest.mark.parametrize("which", ["sp", "bl"])
def test_apply_chat_template_tokenize_reads_content_specials_as_tokens(toks, which):
    """Why prefl does not tokenize with ``apply_chat_template(tokenize=True)``: content that
    holds the EOS string gets an EOS id the template never wrote."""
    tok = toks[which]
    clean = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    dirty = [clean[0], {"role": "assistant", "content": f"ok{tok.eos_token}"}]
    count = [tok.apply_chat_template(m, tokenize=True, return_dict=False).count(tok.eos_token_id)
             for m in (clean, dirty)]  # fmt: skip
    assert count[1] == count[0] + 1


@pytest.mark.parametrize("legacy", [True, False], ids=["prepend-normalizer", "metaspace-first"])
def test_chat_text_is_tokenized_in_one_piece(legacy):
    """A defused chat text tokenizes exactly as the tokenizer tokenizes the text when only the
    template's tokens are registered as special (position-dependent ``"▁"`` included)."""
    tok = load_tokenizer(
        PreTrainedTokenizerFast(
            tokenizer_object=sentencepiece_core(legacy=legacy),
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
        )
    )
    oracle = sentencepiece_core(legacy=legacy, added=("<unk>", "<s>"))  # "</s>" is text
    assert oracle.get_vocab() == {k: v for k, v in tok.get_vocab().items() if k != "<|pad|>"}
    content = ["a </s>b", "</s>", " x</s> y ", "Sure.</s>"]
    for c in content:
        text = f"<s>[INST] {defuse(c, tok)} [/INST] ok<s>[INST] {defuse(c, tok)}b"
        expected = oracle.encode(restore(text, tok), add_special_tokens=False).ids
        assert encode_text(tok, [text], chat=True) == [expected], c


@pytest.mark.parametrize("strip_flags", [False, True])
def test_chat_text_without_content_specials_is_the_tokenizers_own(toks, strip_flags):
    tokenizers = [toks["sp"], toks["toy"], byte_level_bpe(strip_flags=strip_flags)]
    for tok in tokenizers:
        chat = tok.apply_chat_template(
            [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Sure"}],
            tokenize=False,
        )
        for text in (chat, f"a {tok.eos_token} b{tok.eos_token}\n"):
            assert encode_text(tok, [text], chat=True) == [
                tok(text, add_special_tokens=False)["input_ids"]
            ]


def test_plain_text_is_the_tokenizers_own_with_special_tokens_split(toks):
    for tok in toks.values():
        texts = [f"x {s} y{s}" for s in injected(tok)] + ["no specials", f"{A} Sure"]
        expected = tok(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        tok("warm up", add_special_tokens=False)  # the tokenizer's own state: split off
        assert encode_text(tok, texts, chat=False) == expected
        assert tok.backend_tokenizer.encode_special_tokens is False  # left as it was


def test_defuse_and_restore(toks):
    tok = toks["sp"]
    text = "a </s> b <s><unk></s"
    defused = defuse(text, tok)
    assert "</s>" not in defused and "<s>" not in defused and "<unk>" not in defused
    assert defused.count(MARK) == 3 and restore(defused, tok) == text
    assert defuse("no specials", tok) == "no specials"


def test_reserved_marker_character_is_a_row_error(toks):
    row = {
        "messages": [
            {"role": "user", "content": f"a{MARK}b"},
            {"role": "assistant", "content": "c"},
        ]
    }
    where = re.escape("split 'train', row 0, column 'messages': message 0 content: it holds")
    with pytest.raises(RowError, match=where):
        tokenize_rows(toks["sp"], "sft", [row], "conversational", MAX_LENGTH)


def test_tokenizer_that_reads_special_text_as_special_is_a_row_error():
    """A word-level vocabulary holding "</s>" as a word maps the text to the EOS id even with
    special tokens split: refused with the row and column named, not silently accepted."""
    core = Tokenizer(
        models.WordLevel(vocab={"<unk>": 0, "</s>": 1, "a": 2, "b": 3}, unk_token="<unk>")
    )
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = load_tokenizer(
        PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>")
    )
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": "b </s>"}]
    where = re.escape("split 'train', row 1, column 'completion': completion 0: the tokenizer ")
    where += re.escape("turns the text '</s>' into its special token")
    with pytest.raises(RowError, match=where):
        tokenize_rows(tok, "sft", rows, "explicit", MAX_LENGTH)
