"""Character vocabulary: special tokens, one token per poem form, the two line marks, Han characters, and
(in a model that writes 词) one token per tune after them.

Ids are stable for a given token list, which a checkpoint stores in full; the model sees a poem as
    <qijue> 月 落 乌 啼 霜 满 天 ， … 。 <eos>
and a 词 as
    <ci:浣溪沙> 一 曲 新 词 酒 一 杯 ， … 。 <eos>
where a tune without a token of its own opens with the generic <ci>.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterable

from engine.poem.forms import COMMA, FORM_NAMES, PERIOD

PAD, UNK, EOS = "<pad>", "<unk>", "<eos>"
SPECIALS = (PAD, UNK, EOS)
PUNCTUATION = (COMMA, PERIOD)


def form_token(form_name: str) -> str:
    return f"<{form_name}>"


FORM_TOKENS = tuple(form_token(name) for name in FORM_NAMES)
CI_TOKEN = "<ci>"  # opens a 词 of a tune that has no token of its own


def tune_token(tune_name: str) -> str:
    return f"<ci:{tune_name}>"


def is_tune_token(token: str) -> bool:
    return token == CI_TOKEN or (token.startswith("<ci:") and token.endswith(">") and len(token) > 5)


@functools.cache
def _t2s():
    import opencc  # late: the bot's process never converts

    return opencc.OpenCC("t2s")


def to_simplified(text: str) -> str:
    """Traditional → simplified by OpenCC's phrase-aware tables (髮/發 → 发 by context)."""
    return _t2s().convert(text)


def is_han(ch: str) -> bool:
    """A CJK unified ideograph, the only characters a line may hold.

    The basic block, extension A, and the supplementary planes (extensions B–H): OpenCC maps some rare
    traditional characters there, and a poem should not be dropped for one rare character.
    """
    return len(ch) == 1 and (
        "\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf" or "\U00020000" <= ch <= "\U000323af"
    )


class Vocab:
    """Token ↔ id mapping. Build one with `Vocab.build(texts)` or restore it with `Vocab(tokens)`."""

    def __init__(self, tokens: list[str]):
        head = [*SPECIALS, *FORM_TOKENS, *PUNCTUATION]
        if list(tokens[: len(head)]) != head:
            raise ValueError(f"vocabulary must start with {head}, got {list(tokens[: len(head)])}")
        if len(set(tokens)) != len(tokens):
            raise ValueError("vocabulary has duplicate tokens")
        # Han characters, then tune tokens: the Han ids stay one contiguous range for the masks.
        num_han = len(head)
        while num_han < len(tokens) and not is_tune_token(tokens[num_han]):
            num_han += 1
        bad = [t for t in tokens[len(head) : num_han] if not is_han(t)]
        bad += [t for t in tokens[num_han:] if not is_tune_token(t)]
        if bad:
            raise ValueError(f"vocabulary holds non-Han characters, or tokens after its tune tokens (tune tokens "
                             f"come last): {bad[:5]}")
        self.tokens = list(tokens)
        self.index = {t: i for i, t in enumerate(self.tokens)}
        self.pad_id, self.unk_id, self.eos_id = (self.index[t] for t in SPECIALS)
        self.comma_id, self.period_id = self.index[COMMA], self.index[PERIOD]
        self.first_han_id = len(head)
        self.end_han_id = num_han  # one past the last Han character

    @classmethod
    def build(cls, texts: Iterable[str], min_count: int = 1, max_size: int | None = None) -> Vocab:
        """Han characters seen at least `min_count` times, most frequent first, ties by code point."""
        counts = Counter(ch for text in texts for ch in text if is_han(ch))
        chars = sorted((c for c, n in counts.items() if n >= min_count), key=lambda c: (-counts[c], c))
        head = [*SPECIALS, *FORM_TOKENS, *PUNCTUATION]
        if max_size is not None:
            chars = chars[: max(0, max_size - len(head))]
        return cls(head + chars)

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, ch: str) -> bool:
        return ch in self.index

    def form_id(self, form_name: str) -> int:
        return self.index[form_token(form_name)]

    @property
    def writes_ci(self) -> bool:
        """The model was trained on 词 (its vocabulary has tune tokens)."""
        return CI_TOKEN in self.index

    def tune_id(self, tune_name: str) -> int:
        """The token that opens a 词 of this tune: its own, or the generic <ci>. KeyError if no 词 at all."""
        return self.index.get(tune_token(tune_name), self.index[CI_TOKEN])

    def grown(self, chars: Iterable[str], tunes: Iterable[str] = (), ci: bool = False) -> Vocab:
        """This vocabulary plus new Han characters and tune tokens (the <ci> token comes with any tune, or with
        `ci`); existing tokens keep their text, so a model's rows can be copied over by token."""
        head_and_han = self.tokens[: self.end_han_id]
        known = set(self.tokens)
        new_chars = [c for c in dict.fromkeys(chars) if is_han(c) and c not in known]
        tune_tokens = list(self.tokens[self.end_han_id :])
        tunes = list(tunes)
        wanted = [CI_TOKEN, *(tune_token(t) for t in tunes)] if ci or tunes or tune_tokens else []
        tune_tokens += [t for t in dict.fromkeys(wanted) if t not in known]
        return Vocab(head_and_han + new_chars + tune_tokens)

    def encode(self, text: str) -> list[int]:
        """Ids of a poem text's characters; unknown ones become <unk>."""
        return [self.index.get(ch, self.unk_id) for ch in text]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.tokens[i] for i in ids if self.first_han_id - len(PUNCTUATION) <= i < self.end_han_id)

    def han_ids(self) -> range:
        return range(self.first_han_id, self.end_han_id)
