"""A part's funnel, counted where the part is processed (a worker that does not import the store)."""

from __future__ import annotations

from collections import Counter


def part_funnel(texts: list[str | None], reasons: list[str | None]) -> dict:
    """Documents and whitespace words in, kept (reason None) and dropped by reason: the
    attributes of ``storage.documents.Funnel`` as a dict, which ``Funnel.absorb`` adds up."""
    funnel = {"docs_in": 0, "words_in": 0, "docs_out": 0, "words_out": 0}
    funnel |= {"dropped_docs": Counter(), "dropped_words": Counter()}
    for text, reason in zip(texts, reasons):
        words = len(text.split()) if text else 0
        funnel["docs_in"] += 1
        funnel["words_in"] += words
        if reason is None:
            funnel["docs_out"] += 1
            funnel["words_out"] += words
        else:
            funnel["dropped_docs"][reason] += 1
            funnel["dropped_words"][reason] += words
    return funnel


def sum_funnels(funnels: list[dict]) -> dict:
    """The :func:`part_funnel` of the concatenated batches, from each batch's."""
    total = part_funnel([], [])
    for f in funnels:
        for k in ("docs_in", "words_in", "docs_out", "words_out"):
            total[k] += f[k]
        total["dropped_docs"].update(f["dropped_docs"])
        total["dropped_words"].update(f["dropped_words"])
    return total
