"""A model's formulas: the 4-character spans it writes whatever the prompt, and the penalty for them.

A character RNN decoded greedily or by beam search falls into the same few phrases from any opening
(不知何处, 是人间事, 此日无人): its most likely continuations forget the prompt within a line. The engine
finds them once per loaded model, by greedy decoding without masks from many openings of every form,
and keeps the spans that turn up from FORMULA_SHARE of the openings or more:

    formulas = formulas_for(model, vocab)        # cached per model object
    formulas.completions(last_three_tokens)      # tokens that would complete a formula

Greedy and beam rows then pay FORMULA_PENALTY nats for a token that completes one (engine.sampling.choice),
so they write the model's next-best phrase instead; sampled rows pay it too, with the repetition penalty. The search is
deterministic for given weights, so the same request still gives the same poem.
"""

from __future__ import annotations

import weakref
from collections import Counter
from dataclasses import dataclass, field

import torch

from engine.poem.forms import FORM_NAMES
from engine.poem.vocab import Vocab

NUM_OPENINGS = 64  # opening characters per form: the most frequent Han characters of the vocabulary
NUM_STEPS = 32  # tokens decoded after each opening (two to four lines)
FORMULA_SHARE = 0.04  # a span written from this share of the openings or more is a formula
MIN_OPENINGS = 3  # … and from at least this many (tiny vocabularies)
SPAN = 4


@dataclass(frozen=True)
class Formulas:
    texts: tuple[str, ...] = ()  # the spans, most frequent first
    next_of: dict[tuple[int, ...], tuple[int, ...]] = field(default_factory=dict)  # 3 tokens → completions

    def completions(self, last: tuple[int, ...]) -> tuple[int, ...]:
        return self.next_of.get(last, ())

    @classmethod
    def of_texts(cls, texts, vocab: Vocab) -> Formulas:
        next_of: dict[tuple[int, ...], list[int]] = {}
        kept = []
        for text in texts:
            if len(text) == SPAN and all(ch in vocab for ch in text):
                ids = [vocab.index[ch] for ch in text]
                next_of.setdefault(tuple(ids[:-1]), []).append(ids[-1])
                kept.append(text)
        return cls(tuple(kept), {k: tuple(v) for k, v in next_of.items()})


@torch.inference_mode()
def find_formulas(model, vocab: Vocab) -> Formulas:
    """The model's formulas, by greedy decoding without masks from NUM_OPENINGS openings of every form."""
    device = model.device
    openings = list(vocab.han_ids())[:NUM_OPENINGS]
    if not openings:
        return Formulas()
    starts = torch.tensor([(vocab.form_id(form), h) for form in FORM_NAMES for h in openings], device=device)
    allowed = torch.full((len(vocab),), float("-inf"), device=device)  # text only: no <eos>, <unk> or forms
    allowed[vocab.first_han_id:vocab.end_han_id] = 0.0
    allowed[[vocab.comma_id, vocab.period_id]] = 0.0
    was_training = model.training
    model.eval()
    logits, state = model(starts)  # (N, 2, V)
    last, out = logits[:, -1], [starts[:, 1]]
    for _ in range(NUM_STEPS):
        token = (last.float() + allowed).argmax(dim=-1)  # (N,)
        out.append(token)
        last, state = model.step(token, state)
    model.train(was_training)
    counts: Counter = Counter()
    marks = {vocab.comma_id, vocab.period_id}
    for row in torch.stack(out, dim=1).tolist():
        spans, line = set(), []
        for t in row + [vocab.comma_id]:
            if t in marks:
                spans.update(tuple(line[i:i + SPAN]) for i in range(len(line) - SPAN + 1))
                line = []
            else:
                line.append(t)
        counts.update(spans)
    least = max(MIN_OPENINGS, FORMULA_SHARE * len(starts))
    texts = ["".join(vocab.tokens[t] for t in span) for span, n in counts.most_common() if n >= least]
    return Formulas.of_texts(texts, vocab)


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def formulas_for(model, vocab: Vocab) -> Formulas:
    """find_formulas, once per model object (a hot-swapped version is a new object)."""
    found = _CACHE.get(model)
    if found is None:
        found = _CACHE[model] = find_formulas(model, vocab)
    return found
