"""Tones (平 level / 仄 oblique) and rhyme groups of a vocabulary's characters, as tensors, from the tables
of engine.poem.rhymes. A character found in neither 平水韵 nor 中华新韵 has no tone and no group: the tone
and rhyme rules never place it.

    prosody = prosody_for(vocab)        # cached per vocabulary
    prosody.level        # (V,) bool: can be read 平
    prosody.oblique      # (V,) bool: can be read 仄 (a character with both readings has both set)
    prosody.heard_level  # (V,) bool: both, but commonly read 平 (空, 乡): kept from unrhymed line ends
    prosody.rhyme        # (G, V) bool: member of level rhyme group g (the groups poems rhyme in)
    prosody.groups       # G names, e.g. "下平声七阳", "新韵·唐"
    prosody.info("月")   # CharInfo(level=False, oblique=True, groups=frozenset(), source="pingshui", …)

Only level (平声) groups are rhyme groups here: regulated verse rhymes on 平 at the even line ends. A 词
rhymes by 词林正韵 instead, on 平 or 仄 as its tune says: `rhyme_book(prosody, vocab, "cilin")`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from engine.poem.rhymes import LEVEL, CharInfo, char_info, cilin_bu, cilin_groups, cilin_tone, heard_level
from engine.poem.vocab import Vocab


@dataclass
class Prosody:
    """Tone and rhyme tables for one vocabulary. Tensors live on the CPU; constraints copy them per device."""

    vocab_size: int
    han: torch.Tensor  # (V,) bool: a Han character (the only tokens a line may hold)
    level: torch.Tensor  # (V,) bool: has a 平 reading
    oblique: torch.Tensor  # (V,) bool: has a 仄 reading
    heard_level: torch.Tensor  # (V,) bool: has both, and its common reading is 平 (engine.poem.rhymes.heard_level)
    rhyme: torch.Tensor  # (G, V) bool: in level rhyme group g
    groups: list[str]  # G group names
    tones: list[int]  # per token: LEVEL | OBLIQUE bits, for the Python side of the constraints
    token_groups: list[frozenset[int]]  # per token: the indices of its rhyme groups
    sources: Counter = field(default_factory=Counter)  # Han tokens per data source ("none" = no data)
    cache: dict = field(default_factory=dict, repr=False)  # per-device tables made by engine.poem.constraints

    @classmethod
    def build(cls, vocab: Vocab) -> Prosody:
        V = len(vocab)
        infos = [char_info(t) if vocab.first_han_id <= i < vocab.end_han_id else None for i, t in enumerate(vocab.tokens)]
        groups = sorted({g for info in infos if info for g in info.groups}, key=_group_order)
        gid = {g: k for k, g in enumerate(groups)}
        han = torch.zeros(V, dtype=torch.bool)
        han[vocab.first_han_id:vocab.end_han_id] = True
        level = torch.tensor([bool(info and info.level) for info in infos], dtype=torch.bool)
        oblique = torch.tensor([bool(info and info.oblique) for info in infos], dtype=torch.bool)
        heard = torch.tensor([info is not None and heard_level(t) for info, t in zip(infos, vocab.tokens)],
                             dtype=torch.bool)
        rhyme = torch.zeros(len(groups), V, dtype=torch.bool)  # (G, V)
        token_groups = []
        for i, info in enumerate(infos):
            ids = frozenset(gid[g] for g in info.groups) if info else frozenset()
            for k in ids:
                rhyme[k, i] = True
            token_groups.append(ids)
        sources = Counter(info.source if info else "none" for info in infos[vocab.first_han_id:vocab.end_han_id])
        return cls(vocab_size=V, han=han, level=level, oblique=oblique, heard_level=heard, rhyme=rhyme, groups=groups,
                   tones=[info.tones if info else 0 for info in infos], token_groups=token_groups, sources=sources)

    def char(self, ch: str) -> CharInfo | None:
        """Tones and group names of any character, from the same data (for checking finished poems)."""
        return char_info(ch)

    def info(self, token_id: int) -> tuple[int, frozenset[int]]:
        """(tone bits, rhyme group indices) of a token."""
        return self.tones[token_id], self.token_groups[token_id]


@dataclass
class RhymeBook:
    """One rhyme scheme over a vocabulary: 平水韵's level groups for 诗 ("pingshui"), or 词林正韵's 平, 仄
    and 入 groups for 词 ("cilin")."""

    name: str
    groups: list[str]  # G group names
    tones: list[int]  # per group: LEVEL or OBLIQUE
    matrix: torch.Tensor  # (G, V) bool: token v is in group g
    token_groups: list[frozenset[int]]  # per token: its group indices
    bus: list[str] = field(init=False)  # per group: its 部 (rhymes.cilin_bu); a 平水韵 group is its own
    sizes: list[int] = field(init=False)  # per group: how many of the vocabulary's characters it holds

    def __post_init__(self):
        self.bus = [cilin_bu(g) if self.name == "cilin" else g for g in self.groups]
        self.sizes = self.matrix.sum(dim=1).tolist()

    def bu(self, group: int) -> str:
        return self.bus[group]


def rhyme_book(prosody: Prosody, vocab: Vocab | None, name: str) -> RhymeBook:
    """The vocabulary's rhyme book `name`, built once per Prosody (the 平水韵 one needs no `vocab`)."""
    book = prosody.cache.get(("book", name))
    if book is not None:
        return book
    if name == "pingshui":
        book = RhymeBook(name, prosody.groups, [LEVEL] * len(prosody.groups), prosody.rhyme, prosody.token_groups)
    elif name == "cilin":
        per_token = [cilin_groups(t) if vocab.first_han_id <= i < vocab.end_han_id else frozenset()
                     for i, t in enumerate(vocab.tokens)]
        groups = sorted({g for gs in per_token for g in gs})
        gid = {g: k for k, g in enumerate(groups)}
        matrix = torch.zeros(len(groups), len(vocab), dtype=torch.bool)
        token_groups = []
        for i, gs in enumerate(per_token):
            ids = frozenset(gid[g] for g in gs)
            for k in ids:
                matrix[k, i] = True
            token_groups.append(ids)
        book = RhymeBook(name, groups, [cilin_tone(g) for g in groups], matrix, token_groups)
    else:
        raise ValueError(f"unknown rhyme book {name!r}")
    prosody.cache[("book", name)] = book
    return book


def _group_order(name: str) -> tuple[int, str]:
    return (1 if name.startswith("新韵") else 0, name)


_CACHE: dict[tuple[str, ...], Prosody] = {}
_CACHE_SIZE = 8  # a few models (and hot-swapped versions) at once


def prosody_for(vocab: Vocab) -> Prosody:
    """The Prosody of `vocab`, built once per distinct token list (a second call costs a dict lookup)."""
    key = tuple(vocab.tokens)
    prosody = _CACHE.get(key)
    if prosody is None:
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        prosody = _CACHE[key] = Prosody.build(vocab)
    return prosody
