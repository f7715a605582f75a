"""The compare stage's rule and its scoring across tokenizers."""

import numpy as np
import pytest

from tasks.compare import _score, decide
from tests.model.tiny import EOT, TEXT


@pytest.mark.parametrize(
    "candidate, promoted, tolerance, promote",
    [
        (2.0, None, 0.0, True),  # nothing promoted yet
        (2.0, 2.0, 0.0, True),  # not worse
        (1.9, 2.0, 0.0, True),
        (2.01, 2.0, 0.0, False),
        (2.01, 2.0, 0.01, True),  # within the allowed increase
        (2.03, 2.0, 0.01, False),
    ],
)
def test_a_candidate_is_promoted_when_not_worse_than_allowed(candidate, promoted, tolerance, promote):
    ok, reason = decide(candidate, promoted, tolerance)
    assert ok is promote
    if promoted is None:
        assert "first model" in reason
    else:
        assert f"{candidate:.4f}" in reason and f"{promoted:.4f}" in reason
        assert ("not worse" in reason) is promote


def test_a_model_read_through_decoded_text_scores_as_through_its_tokens(tiny_export):
    """The promoted model reads the candidate's documents as text through its own tokenizer; with the
    same tokenizer that must give the very same bits per byte (byte-level BPE decodes losslessly)."""
    from tokenizers import Tokenizer

    from model.evaluate import EvalDoc

    _, result, eot, shared = tiny_export
    tok = Tokenizer.from_str(shared.to_str())  # a copy: the shared fixture stays as it was
    texts = [TEXT, "the dog sat on the park. é ü 😀", "a " + EOT + " literal end-of-text marker in a page"]
    tok.encode_special_tokens = True
    docs = [EvalDoc(np.array(tok.encode(t).ids + [eot]), len(t.encode()), "x") for t in texts]
    direct = _score(result.dir, "int8", docs, 4, None)
    decoded = [tok.decode([int(t) for t in d.tokens if t != eot]) for d in docs]
    assert decoded == texts
    through_text = _score(result.dir, "int8", docs, 4, decoded)
    assert through_text["bits_per_byte"] == pytest.approx(direct["bits_per_byte"], rel=1e-9)
    assert through_text["tokens"] == direct["tokens"]
