"""Training batches: poems encoded as <form> text <eos>, bucketed by form so no batch holds padding.

The four regular forms have fixed lengths (26, 34, 50 and 66 tokens with the form token and <eos>),
so bucketing by form packs every batch exactly: nothing is padded, nothing padded is computed or
counted in the loss. Each batch holds about `batch_tokens` tokens whatever its form. A 词 is encoded as
<ci:tune> text <eos> (`ci_poems`) and bucketed by its length, which packs it exactly too.

The classic recipe (every poem pre-padded to 125 tokens, loss over all positions) is here too, for the
benchmark and the quality baseline it is measured against.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from engine.poem.vocab import Vocab, is_han
from engine.poem.forms import split_lines
from trainer.corpus import Corpus, Poem

CLASSIC_LEN = 125
CI = "ci"  # Poem.form of a 词; its Poem.title is the tune
# A 词's line marks as the model sees them: a sentence's end is 。, any other break is ，.
CI_MARKS = {"。": "。", "？": "。", "！": "。", "，": "，", "、": "，", "；": "，", "：": "，"}


def encode_poem(vocab: Vocab, poem: Poem) -> list[int]:
    start = vocab.tune_id(poem.title) if poem.form == CI else vocab.form_id(poem.form)
    return [start, *vocab.encode(poem.text), vocab.eos_id]


def tune_name(rhythmic: str) -> str:
    """A name without the note after it (浣溪沙（春景） → 浣溪沙); "alias・tune" is left to `ci_poems`."""
    for cut in "（(":
        rhythmic = rhythmic.split(cut)[0]
    return rhythmic.strip()


def ci_text(text: str) -> str | None:
    """A 词's text with its marks as the model sees them (`CI_MARKS`), or None if it holds anything else."""
    out = []
    for ch in text:
        if is_han(ch):
            out.append(ch)
        elif ch in CI_MARKS:
            if out and out[-1] not in "，。":
                out.append(CI_MARKS[ch])
        elif not ch.isspace():
            return None
    if not out or out[-1] not in "，。":
        return None
    return "".join(out)


def is_ci_source(source: str) -> bool:
    """A record of the 词 sources (Poem.source)."""
    return source.startswith("ci") or source == "宋词三百首"


def ci_poems(corpus: Corpus) -> list[Poem]:
    """The corpus's 词 (records of the ci sources) as Poem(form="ci", title=tune, text=ci_text). Tunes are
    named as the tune table names them (trainer.tunes.canonical_names: 望江南・忆江南 is 忆江南); a poem whose
    tune is lost (失调名) keeps an empty title and opens with <ci>."""
    from trainer.tunes import canonical_names  # late: it imports this package's corpus reader

    ci = [p for p in corpus.poems if is_ci_source(p.source)]
    names, _ = canonical_names(tune_name(p.title) for p in ci)
    out = []
    for p in ci:
        text = ci_text(p.text)
        if text:
            out.append(Poem(text=text, form=CI, source=p.source, author=p.author,
                            title=names.get(tune_name(p.title), "")))
    return out


STANZA_FORMS = {5: "wujue", 7: "qijue"}  # a stanza's line length → the form token it trains under


def stanza_poems(poems: list[Poem], vocab: Vocab, avoid_lines: set[str] = frozenset()) -> list[Poem]:
    """The irregular 诗 (form "other") cut into stanzas a regular form's model can learn from: each run of four
    lines of five or seven characters, starting at a couplet, taken as a 五绝 or 七绝 (never overlapping).

    NOTE: the corpus holds 74,000 irregular poems (8 M characters) beside 226,000 regular ones (10 M), and a
    2 × 1024 LSTM overfits the regular ones after some 40 passes. Their stanzas are not 绝句 in tone or rhyme;
    the engine's masks enforce those when it writes one. A stanza with a character outside `vocab`, or with a
    line in `avoid_lines` (the held-out poems' lines), is left out."""
    out = []
    for p in poems:
        if p.form != "other" or is_ci_source(p.source):
            continue
        lines = split_lines(p.text)
        i = 0
        while i + 4 <= len(lines):
            window = lines[i:i + 4]
            n = len(window[0])
            if (n in STANZA_FORMS and all(len(line) == n for line in window)
                    and all(ch in vocab for line in window for ch in line)
                    and not any(line in avoid_lines for line in window)):
                out.append(Poem(text=f"{window[0]}，{window[1]}。{window[2]}，{window[3]}。", form=STANZA_FORMS[n],
                                source=p.source, author=p.author, title=p.title))
                i += 4
            else:
                i += 2
    return out


def poems_of_kind(corpus: Corpus, kind: str) -> list[Poem]:
    """What a model of this kind trains on: shi, the regular poems; ci, the 词; all, both."""
    if kind == "shi":
        return corpus.regular()
    return ci_poems(corpus) if kind == "ci" else corpus.regular() + ci_poems(corpus)


def ci_vocab(vocab: Vocab, poems: list[Poem], min_count: int, tune_tokens: int) -> Vocab:
    """`vocab` grown for 词: their characters seen `min_count` times, and tokens for the `tune_tokens` most
    common tunes (the rest share <ci>)."""
    chars = Counter(ch for p in poems for ch in p.text)
    tunes = Counter(p.title for p in poems if p.title)
    new = sorted((c for c, n in chars.items() if n >= min_count and c not in vocab), key=lambda c: (-chars[c], c))
    common = [t for t, n in sorted(tunes.items(), key=lambda kv: (-kv[1], kv[0])) if n >= min_count]
    return vocab.grown(new, common[:tune_tokens], ci=True)


@dataclass
class Buckets:
    """Encoded poems, one (N, T) tensor per form."""

    tensors: dict[str, torch.Tensor]

    @classmethod
    def build(cls, vocab: Vocab, poems: list[Poem]) -> Buckets:
        by_form: dict[str, list[list[int]]] = {}
        for p in poems:
            if p.form != "other":
                ids = encode_poem(vocab, p)
                by_form.setdefault(f"{CI}:{len(ids)}" if p.form == CI else p.form, []).append(ids)
        return cls({form: torch.tensor(rows, dtype=torch.long) for form, rows in sorted(by_form.items())})

    @property
    def num_poems(self) -> int:
        return sum(t.shape[0] for t in self.tensors.values())

    @property
    def num_tokens(self) -> int:
        """Predicted tokens (every position after the form token)."""
        return sum(t.shape[0] * (t.shape[1] - 1) for t in self.tensors.values())

    def batches(self, batch_tokens: int, seed: int) -> list[tuple[str, torch.Tensor]]:
        """One epoch's batches, (form, row indices), in an order fixed by `seed` (so resume can skip)."""
        g = torch.Generator().manual_seed(seed)
        out: list[tuple[str, torch.Tensor]] = []
        for form, t in self.tensors.items():
            rows_per_batch = max(1, batch_tokens // t.shape[1])
            perm = torch.randperm(t.shape[0], generator=g)
            out.extend((form, perm[i : i + rows_per_batch]) for i in range(0, t.shape[0], rows_per_batch))
        order = torch.randperm(len(out), generator=g).tolist()
        return [out[i] for i in order]

    def get(self, form: str, rows: torch.Tensor) -> torch.Tensor:
        t = self.tensors[form]
        return t[rows.to(t.device)]

    def to(self, device) -> Buckets:
        """The same poems on `device` (a GPU then gathers its batches without a copy from the host)."""
        return Buckets({form: t.to(device) for form, t in self.tensors.items()})


def classic_tensor(vocab: Vocab, poems: list[Poem], length: int = CLASSIC_LEN) -> torch.Tensor:
    """The classic recipe's data: each poem pre-padded (or cut) to `length` tokens; (N, length)."""
    rows = []
    for p in poems:
        ids = encode_poem(vocab, p)[-length:]
        rows.append([vocab.pad_id] * (length - len(ids)) + ids)
    return torch.tensor(rows, dtype=torch.long)
