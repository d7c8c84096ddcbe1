"""Tests for prefl.data.formats.split_implicit: the prompt of an implicit (HH-style) pair is the
texts' common prefix cut back to the last ``"\n\nAssistant:"`` marker (else to whitespace), and
prompt + reply gives back each text.
"""

from __future__ import annotations

from prefl.data.formats import ASSISTANT_MARKER, split_implicit

H, A = "\n\nHuman:", "\n\nAssistant:"


def check_split(chosen: str, rejected: str, prompt: str, c_reply: str, r_reply: str) -> None:
    assert split_implicit(chosen, rejected) == (prompt, c_reply, r_reply)
    assert prompt + c_reply == chosen and prompt + r_reply == rejected


def test_marker_constant():
    assert ASSISTANT_MARKER == A


def test_split_implicit_single_turn():
    prompt = f"{H} How do I bake bread?{A}"
    check_split(
        prompt + " Mix flour, water and yeast.",
        prompt + " I don't know.",
        prompt,
        " Mix flour, water and yeast.",
        " I don't know.",
    )


def test_split_implicit_multi_turn_cuts_at_last_marker():
    prompt = f"{H} Hi there.{A} Hello! How can I help?{H} Tell me a joke.{A}"
    check_split(
        prompt + " Why did the chicken...",
        prompt + " No.",
        prompt,
        " Why did the chicken...",
        " No.",
    )


def test_split_implicit_reply_containing_the_marker():
    # The chosen reply itself holds "\n\nAssistant:" (HH has such rows); the rejected one does
    # not, so the common prefix stops inside the replies and the prompt ends at the real marker.
    prompt = f"{H} Can you help me?{A}"
    chosen = prompt + f" Sure.{A} Here is how: first, relax."
    rejected = prompt + f" Sorry, no.{H} Why not?"
    check_split(
        chosen,
        rejected,
        prompt,
        f" Sure.{A} Here is how: first, relax.",
        f" Sorry, no.{H} Why not?",
    )
    # A reply that is the other reply plus a further "\n\nAssistant:" turn.
    check_split(
        prompt + f" Sure.{A} More.", prompt + " Sure.", prompt, f" Sure.{A} More.", " Sure."
    )
    # Same when the rejected reply is the one holding the marker.
    marked = prompt + f" Sorry, no.{A} Why not?"
    check_split(
        chosen, marked, prompt, f" Sure.{A} Here is how: first, relax.", f" Sorry, no.{A} Why not?"
    )


def test_split_implicit_replies_sharing_first_characters():
    # The longest common prefix runs into the replies (" It is "); the prompt cuts back to the
    # marker and the shared characters stay in both replies.
    prompt = f"{H} Is it safe to eat?{A}"
    check_split(
        prompt + " It is safe.",
        prompt + " It is not safe.",
        prompt,
        " It is safe.",
        " It is not safe.",
    )
    # Shared characters inside a word: " Yes" / " Yeah".
    check_split(prompt + " Yes.", prompt + " Yeah, sure.", prompt, " Yes.", " Yeah, sure.")
    # One reply a prefix of the other.
    check_split(prompt + " Ok", prompt + " Ok then", prompt, " Ok", " Ok then")


def test_split_implicit_identical_texts_keep_the_prompt():
    prompt = f"{H} Hello?{A}"
    check_split(prompt + " Hi.", prompt + " Hi.", prompt, " Hi.", " Hi.")


def test_split_implicit_no_common_prompt_is_none():
    assert split_implicit("abc def", "xyz uvw") is None
    # HH texts that differ in the human turn share only "\n\nHuman: " (no marker) -> no prompt.
    assert split_implicit(f"{H} Hello{A} Hi.", f"{H} Bye{A} Bye.") is None
    # A common prefix of whitespace only is no prompt either.
    assert split_implicit(" apple pie", " banana split") is None
    assert split_implicit("", "") is None


def test_split_implicit_whitespace_fallback_without_marker():
    check_split(
        "Q: why is the sky blue? Because of scattering.",
        "Q: why is the sky blue? No idea.",
        "Q: why is the sky blue?",
        " Because of scattering.",
        " No idea.",
    )
    # The common prefix ends inside a word ("ap"): cut back to the space before it.
    check_split(
        "Pick a fruit: apple", "Pick a fruit: apricot", "Pick a fruit:", " apple", " apricot"
    )
    # A newline is a boundary too.
    check_split(
        "Question\nanswer one", "Question\nanother", "Question", "\nanswer one", "\nanother"
    )


def test_split_implicit_marker_shared_by_both_replies():
    # Both replies start with the same text holding the marker: the prompt still ends at the
    # real turn (the first marker after the last human turn), not inside the replies.
    prompt = f"{H} q{A}"
    check_split(
        prompt + f" Sure.{A} yes",
        prompt + f" Sure.{A} no",
        prompt,
        f" Sure.{A} yes",
        f" Sure.{A} no",
    )


def test_split_implicit_texts_diverging_in_a_human_turn_use_the_last_assistant_turn():
    prompt = f"{H} q{A}"
    check_split(
        prompt + f" ok{H} more a",
        prompt + f" ok{H} more b",
        prompt,
        f" ok{H} more a",
        f" ok{H} more b",
    )
