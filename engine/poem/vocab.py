"""Character vocabulary: special tokens, one token per poem form, the two line marks, then Han characters.

Ids are stable for a given token list, which a checkpoint stores in full; the model sees a poem as
    <qijue> 月 落 乌 啼 霜 满 天 ， … 。 <eos>
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
        bad = [t for t in tokens[len(head) :] if not is_han(t)]
        if bad:
            raise ValueError(f"vocabulary holds non-Han characters: {bad[:5]}")
        self.tokens = list(tokens)
        self.index = {t: i for i, t in enumerate(self.tokens)}
        self.pad_id, self.unk_id, self.eos_id = (self.index[t] for t in SPECIALS)
        self.comma_id, self.period_id = self.index[COMMA], self.index[PERIOD]
        self.first_han_id = len(head)

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

    def encode(self, text: str) -> list[int]:
        """Ids of a poem text's characters; unknown ones become <unk>."""
        return [self.index.get(ch, self.unk_id) for ch in text]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.tokens[i] for i in ids if i >= self.first_han_id - len(PUNCTUATION))

    def han_ids(self) -> range:
        return range(self.first_han_id, len(self.tokens))
