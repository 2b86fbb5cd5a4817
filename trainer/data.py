"""Training batches: poems encoded as <form> text <eos>, bucketed by form so no batch holds padding.

The four regular forms have fixed lengths (26, 34, 50 and 66 tokens with the form token and <eos>),
so bucketing by form packs every batch exactly: nothing is padded, nothing padded is computed or
counted in the loss. Each batch holds about `batch_tokens` tokens whatever its form.

The classic recipe (every poem pre-padded to 125 tokens, loss over all positions) is here too, for the
benchmark and the quality baseline it is measured against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.poem.vocab import Vocab
from trainer.corpus import Poem

CLASSIC_LEN = 125


def encode_poem(vocab: Vocab, poem: Poem) -> list[int]:
    return [vocab.form_id(poem.form), *vocab.encode(poem.text), vocab.eos_id]


@dataclass
class Buckets:
    """Encoded poems, one (N, T) tensor per form."""

    tensors: dict[str, torch.Tensor]

    @classmethod
    def build(cls, vocab: Vocab, poems: list[Poem]) -> Buckets:
        by_form: dict[str, list[list[int]]] = {}
        for p in poems:
            if p.form != "other":
                by_form.setdefault(p.form, []).append(encode_poem(vocab, p))
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
