"""Special-token text in row data stays text (design §3).

A row's text is text: a completion that mentions ``</s>`` or ``<|im_end|>`` must not turn into
the EOS id. Only prefl (the BOS prefix that ``add_special_tokens`` places, the EOS it appends to
completions) and a chat template (the tokens the template itself writes) place special tokens.

- Plain rows (``explicit``, ``implicit``) are tokenized as with ``split_special_tokens=True``
  (by a cached copy of the fast tokenizer's backend that does not match special tokens, which
  leaves the user's tokenizer as it is): every special-token string in them is text.
- Conversational rows are rendered by a chat template whose output mixes both kinds. Before
  rendering, :func:`defuse` replaces each special-token string inside a message's content by a
  private marker (two characters of Unicode plane 15, the first :data:`MARK`), so that in the
  rendered text every real special-token string was written by the template. :func:`encode_text`
  then swaps the two (template specials become markers, markers become the original strings)
  and tokenizes with a cached copy of the fast tokenizer's backend in which the markers are
  added tokens standing for the special tokens, with the same strip flags, and special tokens
  are not matched. The text is tokenized in one piece, exactly as the tokenizer would tokenize
  it if only the template's tokens were special to it: the text between template tokens is
  normalized and pre-tokenized where it stands (SentencePiece's position-dependent ``"▁"``
  included), never in separately tokenized pieces. (``apply_chat_template(tokenize=True)``
  reads special strings in content as special tokens.)

A tokenizer that maps the *text* of a special token to its id anyway (a word-level vocabulary
that holds ``<eos>`` as a word) is refused loudly with :class:`SpecialTextError`, not
silently turned into a special token (``<unk>`` from text is fine).
"""

from __future__ import annotations

import contextlib
import re
import weakref
from dataclasses import dataclass, field
from typing import Any

#: First character of every marker (U+F0000, private use); message contents may not hold it.
MARK = "\U000f0000"
_FIRST = 0xF0100  # second character of marker k: chr(_FIRST + k)


class SpecialTextError(ValueError):
    """Text that the tokenizer turns into a special token even with special tokens split.

    Attributes:
        index: Position of the text in the batch given to :func:`encode_text`.
        token: The special token produced.
    """

    def __init__(self, index: int, token: str) -> None:
        super().__init__(
            f"the tokenizer turns the text {token!r} into its special token even with special "
            f"tokens split, so it cannot stay text (text {index} of the batch)"
        )
        self.index, self.token = index, token


@dataclass
class _Specials:
    """Per-tokenizer tables, built once per process (see :func:`_specials`)."""

    key: int  # len(tokenizer) when built
    strings: tuple[str, ...]  # special-token contents
    ids: dict[str, int]  # content -> id
    markers: dict[str, str]  # content -> marker and marker -> content
    find: re.Pattern  # any special string, longest first (the tokenizer's leftmost-longest)
    find_both: re.Pattern  # any special string or marker
    forbidden: frozenset[int]  # ids that text must not produce: the specials but <unk>
    prefix: list[int]  # what add_special_tokens puts before a text (BOS), see bos_prefix
    backends: dict[bool, Any] = field(default_factory=dict)  # chat -> backend copy, see _backend
    lut: list[int] = field(default_factory=list)  # id in the chat copy -> id (markers remapped)


_CACHE: dict[int, _Specials] = {}


def _alternation(strings: list[str]) -> re.Pattern:
    ordered = sorted(strings, key=len, reverse=True)
    return re.compile("|".join(re.escape(s) for s in ordered) or r"(?!x)x")


def _probe_prefix(tokenizer: Any) -> list[int]:
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    bos = tokenizer.bos_token_id
    return [bos] if full and full[0] == bos else []


def _specials(tokenizer: Any) -> _Specials:
    """The tables of ``tokenizer``, cached per tokenizer object and rebuilt when its vocabulary
    grows (a new special token such as ``<|pad|>``)."""
    cached = _CACHE.get(id(tokenizer))
    if cached is not None and cached.key == len(tokenizer):
        return cached
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    strings = tuple(t.content for t in added.values())
    markers: dict[str, str] = {}
    for k, s in enumerate(strings):
        markers[s], markers[MARK + chr(_FIRST + k)] = MARK + chr(_FIRST + k), s
    tables = _Specials(
        key=len(tokenizer),
        strings=strings,
        ids={t.content: i for i, t in added.items()},
        markers=markers,
        find=_alternation(list(strings)),
        find_both=_alternation(list(markers)),
        forbidden=frozenset(added) - {tokenizer.unk_token_id},
        prefix=_probe_prefix(tokenizer),
    )
    if cached is None:
        with contextlib.suppress(TypeError):  # an object without weak references stays cached
            weakref.finalize(tokenizer, _CACHE.pop, id(tokenizer), None)
    _CACHE[id(tokenizer)] = tables
    return tables


def bos_prefix(tokenizer: Any) -> list[int]:
    """The ids that ``add_special_tokens=True`` puts before a text (``[BOS]`` or ``[]``).

    Tokens a post-processor puts *after* a text (an EOS from ``add_eos_token=True``) are not
    returned: prefl ends completions with EOS itself and prompts never end with one.
    """
    return list(_specials(tokenizer).prefix)


def defuse(text: str, tokenizer: Any) -> str:
    """``text`` (a message's content) with each special-token string replaced by its marker.

    Raises:
        ValueError: ``text`` holds :data:`MARK`, which prefl reserves for its markers.
    """
    if MARK in text:
        raise ValueError("it holds the character U+F0000, which prefl reserves")
    tables = _specials(tokenizer)
    return tables.find.sub(lambda m: tables.markers[m.group()], text)


def restore(text: str, tokenizer: Any) -> str:
    """Undo :func:`defuse`: the text as the user wrote it (markers back to special strings)."""
    if MARK not in text:
        return text
    tables = _specials(tokenizer)
    return tables.find_both.sub(
        lambda m: tables.markers[m.group()] if m.group().startswith(MARK) else m.group(), text
    )


def _backend(tokenizer: Any, tables: _Specials, chat: bool) -> Any:
    """A cached copy of the fast tokenizer's backend that does not match special tokens (so
    their text is text); for ``chat``, the markers are added tokens there, with the special
    tokens' strip flags, and ``tables.lut`` maps their ids to the special tokens' ids."""
    if chat not in tables.backends:
        from tokenizers import AddedToken, Tokenizer

        copy = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        copy.no_truncation()
        copy.no_padding()
        copy.encode_special_tokens = True
        if chat:
            flags = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
            copy.add_tokens([
                AddedToken(
                    tables.markers[s], special=False, normalized=flags[s].normalized,
                    lstrip=flags[s].lstrip, rstrip=flags[s].rstrip,
                    single_word=flags[s].single_word,
                )
                for s in tables.strings
            ])  # fmt: skip
            tables.lut = list(range(copy.get_vocab_size(with_added_tokens=True)))
            for s in tables.strings:
                tables.lut[copy.token_to_id(tables.markers[s])] = tables.ids[s]
        tables.backends[chat] = copy
    return tables.backends[chat]


def _check(ids: list[list[int]], tables: _Specials, tokenizer: Any) -> None:
    for index, row in enumerate(ids):
        if not tables.forbidden.isdisjoint(row):
            token = next(i for i in row if i in tables.forbidden)
            raise SpecialTextError(index, tokenizer.convert_ids_to_tokens(token))


def encode_text(tokenizer: Any, texts: list[str], chat: bool) -> list[list[int]]:
    """Tokenize ``texts`` (no special tokens added) keeping special-token text as text.

    Args:
        tokenizer: A Hugging Face tokenizer (a fast one for chat texts holding markers).
        texts: ``N`` texts. Plain texts (``chat=False``), or chat texts rendered from
            :func:`defuse`-d messages (``chat=True``): their real special-token strings were
            written by the template and are tokenized as special tokens.
        chat: Whether ``texts`` are defused chat texts.

    Returns:
        ``N`` lists of token ids.

    Raises:
        SpecialTextError: The tokenizer produced a special token (other than ``<unk>``) from
            text; its ``index`` names the text.
    """
    if not texts:
        return []
    tables = _specials(tokenizer)
    if getattr(tokenizer, "backend_tokenizer", None) is None:  # a slow tokenizer
        if chat and any(MARK in t for t in texts):
            raise ValueError("special-token text in chat messages needs a fast tokenizer")
        ids = tokenizer(texts, add_special_tokens=False, split_special_tokens=not chat)
        if not chat:
            _check(ids["input_ids"], tables, tokenizer)
        return ids["input_ids"]
    backend = _backend(tokenizer, tables, chat)
    if chat:
        texts = [tables.find_both.sub(lambda m: tables.markers[m.group()], t) for t in texts]
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # fast: no offsets
    ids = [e.ids for e in encode(texts, add_special_tokens=False)]
    _check(ids, tables, tokenizer)
    if chat:
        ids = [list(map(tables.lut.__getitem__, row)) for row in ids]
    return ids
