"""A chat model as a pairwise judge, asked in both orders so that its position bias cancels.

An LLM judge that is shown answers X and Y tends to prefer whichever comes first (or second),
whatever they say. So every comparison is asked twice, X first and then Y first, and the
judge's verdict counts only when the two orders agree; otherwise the comparison is a tie.

The judge reads one user turn: :data:`JUDGE_TEMPLATE` (or a template of your own) filled with
the prompt and the two answers, and its preference is read from its next-token distribution
instead of a sampled reply: ``p_first`` is the probability of the first label (``"A"``) between
the two labels (``"A"``, ``"B"``), a number in ``[0, 1]`` whatever the judge would have
written. With ``p_xy`` asked X first and ``p_yx`` asked Y first, the judge prefers X in both
orders when ``p_xy > 1/2`` and ``p_yx < 1/2``, and the margin of X over Y is
``p_xy - p_yx`` (in ``[-1, 1]``: the mean probability of X minus that of Y over both orders).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from string import Formatter

from prefl.data.pairs import LabelCounts, Prompt, SampleRow, choose_pairs, comparisons

#: The judge's default instructions. ``{prompt}``, ``{first}`` and ``{second}`` are filled in;
#: the verdict is read from the probability of the labels A and B right after it.
JUDGE_TEMPLATE = """You compare two answers to the same conversation.

[Conversation]
{prompt}

[Answer A]
{first}

[Answer B]
{second}

Which answer is more helpful, honest and harmless? Reply with one letter: A or B."""
#: The two labels whose next-token probabilities give the verdict (first answer, second).
JUDGE_LABELS = ("A", "B")
_FIELDS = {"prompt", "first", "second"}
#: Asks the judge: one user turn per request, returns ``p_first`` per request (None on a
#: data-parallel rank other than 0, which leaves the rest to rank 0).
Ask = Callable[[list[list[dict[str, str]]]], list[float] | None]


def check_template(template: str) -> str:
    """``template``, checked to use exactly the fields ``{prompt}``, ``{first}``, ``{second}``
    (write ``{{`` and ``}}`` for literal braces)."""
    try:
        found = {name for _, name, _, _ in Formatter().parse(template) if name is not None}
    except ValueError as err:
        raise ValueError(f"judge template: {err} (write {{{{ and }}}} for braces)") from None
    if found != _FIELDS:
        raise ValueError(
            f"judge template: expected the fields {sorted(_FIELDS)}, found {sorted(found)}"
        )
    return template


def prompt_text(prompt: Prompt) -> str:
    """A prompt as the judge reads it: a text as it is; a conversation one turn a paragraph,
    ``"User: ..."`` / ``"Assistant: ..."`` (``"System: ..."``, ...)."""
    if isinstance(prompt, str):
        return prompt.strip()
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content'].strip()}" for m in prompt)


def judge_request(template: str, prompt: Prompt, first: str, second: str) -> list[dict[str, str]]:
    """The judge's one user turn, asking whether ``first`` (A) or ``second`` (B) is better."""
    text = template.format(prompt=prompt_text(prompt), first=first.strip(), second=second.strip())
    return [{"role": "user", "content": text}]


def agreed_margin(p_xy: float, p_yx: float) -> float | None:
    """Margin of X over Y when both orders agree, else None (a tie).

    Args:
        p_xy: The judge's probability of preferring the first answer, with X shown first.
        p_yx: The same with Y shown first.

    Returns:
        ``p_xy - p_yx`` when ``p_xy > 1/2 > p_yx`` (X both times) or ``p_xy < 1/2 < p_yx`` (Y
        both times); None otherwise (the judge followed the position, or could not decide).
    """
    if (p_xy > 0.5 > p_yx) or (p_xy < 0.5 < p_yx):
        return p_xy - p_yx
    return None


def judge_pairs(
    rows: Sequence[SampleRow],
    ask: Ask,
    counts: LabelCounts,
    template: str = JUDGE_TEMPLATE,
    min_margin: float | None = None,
) -> list[list[tuple[int, int, float]]] | None:
    """Judge every row's comparisons in both orders and choose its pairs.

    Every pair of different completions is asked X first and Y first (one ``ask`` call for all
    rows). A comparison whose orders agree is won by its winner; each completion's score is
    its number of wins, which ranks best against worst (:func:`choose_pairs`), whose pair is
    kept only when the judge preferred the best over the worst in both orders.

    Args:
        rows: The sample rows.
        ask: The judge: ``p_first`` for each request (a list of one user message).
        counts: Receives ties and pairs under ``min_margin``.
        template: The judge's instructions (:func:`check_template`).
        min_margin: None = best against worst; a number = every agreed comparison whose
            margin is at least this.

    Returns:
        Per row, its pairs ``(chosen, rejected, margin)`` (completion indices); None where
        ``ask`` returned None.
    """
    check_template(template)
    plan = [(r, i, j) for r, row in enumerate(rows) for i, j in comparisons(row.completions)]
    requests = []
    for r, i, j in plan:
        row = rows[r]
        a, b = row.completions[i], row.completions[j]
        requests += [
            judge_request(template, row.prompt, a, b),
            judge_request(template, row.prompt, b, a),
        ]
    p_first = ask(requests) if requests else []
    if p_first is None:  # a data-parallel rank other than 0: rank 0 builds the pairs
        return None
    if len(p_first) != len(requests):
        raise ValueError(f"the judge answered {len(p_first)} of {len(requests)} requests")
    verdicts: list[dict[tuple[int, int], float | None]] = [{} for _ in rows]
    for n, (r, i, j) in enumerate(plan):
        margin = agreed_margin(p_first[2 * n], p_first[2 * n + 1])
        verdicts[r][(i, j)] = margin
        verdicts[r][(j, i)] = None if margin is None else -margin
    out = []
    for row, verdict in zip(rows, verdicts, strict=True):
        wins = [0.0] * len(row.completions)
        for (i, _), margin in verdict.items():
            wins[i] += margin is not None and margin > 0
        out.append(
            choose_pairs(
                row.completions, wins, counts, lambda i, j, v=verdict: v.get((i, j)), min_margin
            )
        )
    return out
