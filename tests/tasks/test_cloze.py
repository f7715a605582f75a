"""The harness's cloze items: several per long document, distractors from elsewhere, never the answer."""

import numpy as np

from tasks.harness import HarnessConfig, cloze_items


def test_a_few_long_documents_give_many_items_with_honest_distractors():
    docs = [" ".join(f"d{d}w{i}" for i in range(n)) for d, n in ((0, 95), (1, 40), (2, 12))]
    cfg = HarnessConfig(tasks=["cloze"], cloze_context_words=8, cloze_answer_words=4, cloze_items_per_language=50)
    items = cloze_items(docs, cfg, np.random.default_rng(0))
    # windows of 12 words: 7 in the first document, 3 in the second, 1 in the third
    assert len(items) == 11
    contexts = [item["context"].split() for item in items]
    assert [c[0] for c in contexts[:3]] == ["d0w0", "d1w0", "d2w0"]  # round-robin: first windows first
    for item, context in zip(items, contexts):
        doc, first = context[0][1], int(context[0].split("w")[1])
        answer = item["choices"][item["label"]]
        assert answer == " ".join(f"d{doc}w{i}" for i in range(first + 8, first + 12))
        assert len(set(item["choices"])) == 4
        for choice in item["choices"]:
            if choice == answer:
                continue
            words = choice.split()
            assert len(words) == 4
            if words[0].startswith(f"d{doc}w"):  # from the same document: outside the item's own window
                start = int(words[0].split("w")[1])
                assert start + 4 <= first or start >= first + 12
    capped = cloze_items(docs, cfg.model_copy(update={"cloze_items_per_language": 2}), np.random.default_rng(0))
    assert len(capped) == 2
    assert cloze_items(docs, cfg, np.random.default_rng(0)) == items  # seeded


def test_too_little_text_gives_no_item():
    cfg = HarnessConfig(tasks=["cloze"], cloze_context_words=8, cloze_answer_words=4)
    assert (
        cloze_items(["one two three four five six seven eight nine ten eleven twelve"], cfg, np.random.default_rng(0))
        == []
    )
