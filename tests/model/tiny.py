"""A tiny byte-level BPE tokenizer and a GPT trained a few dozen steps on a repeated sentence.

Shared by the export tests (ONNX, Hugging Face): small enough to build in a second, trained
enough that its loss and its greedy continuations mean something.
"""

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from model.config import GPTConfig
from model.gpt import GPT

TEXT = "the cat sat on the mat. a dog ran to the park. "
EOT = "<|endoftext|>"


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=290, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([TEXT * 20], trainer)
    return tok


def train_tiny(tok: Tokenizer, eot_id: int, **shape) -> GPT:
    """A few dozen AdamW steps on the repeated sentence; documents start after EOT as in the shards."""
    torch.manual_seed(0)
    cfg = GPTConfig(
        **{"vocab_size": tok.get_vocab_size(), "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32, **shape}
    )
    model = GPT(cfg)
    stream = np.array(([eot_id] + tok.encode(TEXT * 12).ids) * 4, dtype=np.int64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rng = np.random.default_rng(0)
    for _ in range(60):
        starts = rng.integers(0, len(stream) - cfg.block_size - 1, 8)
        x = torch.from_numpy(np.stack([stream[s : s + cfg.block_size] for s in starts]))
        y = torch.from_numpy(np.stack([stream[s + 1 : s + 1 + cfg.block_size] for s in starts]))
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def export_tiny(directory, **shape):
    """Train the tiny GPT (``shape`` overrides its config) and export it (ONNX fp32/INT8/INT4 +
    tokenizer) into ``directory/model``.

    Returns (model, export result, eot id, tokenizer); the gate scores three held-out texts.
    """
    from model.evaluate import EvalDoc
    from model.export import export_model

    torch.set_num_threads(1)
    tok = build_tokenizer()
    eot_id = tok.token_to_id(EOT)
    model = train_tiny(tok, eot_id, **shape)
    tok_file = directory / "source-tokenizer.json"
    tok.save(str(tok_file))
    texts = [TEXT * 2, "a dog ran to the park. the cat sat", TEXT * 3 + "the cat"]
    docs = [EvalDoc(np.array(tok.encode(t).ids + [eot_id]), len(t.encode()), g) for t, g in zip(texts, "xyx")]
    result = export_model(model, directory / "model", eot_id=eot_id, val_docs=docs, tokenizer_file=tok_file, threads=1)
    return model, result, eot_id, tok
