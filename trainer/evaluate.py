"""Per-character perplexity of a model on poems.

Counted over the poem text, punctuation included; the form token and <eos> are context, not scored.
Characters outside the vocabulary are fed as <unk>, excluded from the score and counted as `oov`.

    python -m trainer eval --checkpoint engine/checkpoints/lstm.safetensors --poems held_out.txt
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.model.network import PoemModel
from engine.poem.vocab import Vocab
from trainer.corpus import CorpusError, Poem, normalise
from trainer.data import CLASSIC_LEN, encode_poem


def read_poem_lines(path) -> tuple[list[Poem], int]:
    """Poems from a file holding one poem per line; returns (regular-form poems, lines skipped)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CorpusError(f"{path}: cannot read poems ({e})") from None
    poems, skipped = [], 0
    for line in lines:
        if not line.strip():
            continue
        poem, _ = normalise({"paragraphs": [line]})
        if poem is None or poem.form == "other":
            skipped += 1
        else:
            poems.append(poem)
    return poems, skipped


def perplexity(model: PoemModel, vocab: Vocab, poems: list[Poem], pre_pad: bool = False,
               batch_size: int = 256) -> dict:
    """{'poems', 'chars', 'oov', 'nll', 'ppl'}; `pre_pad` feeds the classic recipe's padded context."""
    return perplexity_of_rows(model, vocab, encode_rows(vocab, poems, pre_pad), batch_size)


def encode_rows(vocab: Vocab, poems: list[Poem], pre_pad: bool = False) -> list[list[int]]:
    """Each poem as <form> text <eos>; `pre_pad`: left-padded to the classic recipe's length."""
    rows = [encode_poem(vocab, p) for p in poems]
    return [[vocab.pad_id] * (CLASSIC_LEN - len(ids)) + ids for ids in rows] if pre_pad else rows


@torch.inference_mode()
def perplexity_of_rows(model: PoemModel, vocab: Vocab, rows: list[list[int]], batch_size: int = 256) -> dict:
    """`perplexity` of poems already encoded as <form> text <eos> (each may be pre-padded)."""
    was_training = model.training
    model.eval()
    device = model.device
    by_len: dict[int, list[list[int]]] = {}
    for ids in rows:
        by_len.setdefault(len(ids), []).append(ids)
    nll, chars, oov = 0.0, 0, 0
    for same in by_len.values():
        for i in range(0, len(same), batch_size):
            seq = torch.tensor(same[i : i + batch_size], device=device)  # (B, T) ending in <eos>
            # <eos> is not scored, so the last text token is never fed: positions 0..T-3 predict 1..T-2.
            logits, _ = model(seq[:, :-2])  # (B, T-2, V)
            target = seq[:, 1:-1]  # the text: skip <eos>
            logp = F.log_softmax(logits.float(), dim=-1)
            tok = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (B, T-2)
            # Text is punctuation and Han characters; pads, the form token and <unk> are not scored.
            scored = target >= min(vocab.comma_id, vocab.period_id)
            nll -= tok[scored].double().sum().item()
            chars += int(scored.sum())
            oov += int((target == vocab.unk_id).sum())
    if was_training:
        model.train()
    mean = nll / chars if chars else float("nan")
    return {"poems": len(rows), "chars": chars, "oov": oov, "nll": mean,
            "ppl": math.exp(mean) if chars else float("nan")}
