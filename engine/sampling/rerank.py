"""Reranking a request's finished candidates by a right-to-left model.

A forward model scores each character given the ones before it, so it happily ends a poem in a line that
has nothing to do with its start. A model trained on the same poems read right to left (`trainer train
--reverse`) scores each character given the ones *after* it: a candidate both directions like is one whose
lines fit each other. Beam search ends with `beam_width` candidates of one form, so one length, and
their scores add without normalising:

    score = log p_forward(text) + RTL_WEIGHT · log p_backward(text)

(the Jiuge-style "bidirectional" rerank; with the weight at 1 it is the pointwise mutual information
between the two halves of any split of the poem, up to the forward score counted twice.)

The candidates are scored in one batch of `beam_width` rows, the same batch alone or beside other
requests, so a seeded request still gives the same poem.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.model.network import PoemModel

RTL_WEIGHT = 1.0


@torch.inference_mode()
def backward_logprobs(model: PoemModel, start_token: int, eos_token: int, texts: list[list[int]]) -> list[float]:
    """log p(text) under the right-to-left `model` for each text (token ids, punctuation included; all of
    one length): the model reads <start> then the text from its end."""
    device = model.head.weight.device
    seq = torch.tensor([[start_token, *text[::-1], eos_token] for text in texts], device=device)  # (N, T)
    logits, _ = model(seq[:, :-2])  # positions 0..T-3 predict the text, 1..T-2
    logp = F.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, seq[:, 1:-1, None])[..., 0].sum(dim=1).tolist()


def best_candidate(forward: list[float], backward: list[float], weight: float = RTL_WEIGHT) -> int:
    """Index of the candidate with the highest forward + weight · backward score (the first on a tie)."""
    combined = [f + weight * b for f, b in zip(forward, backward)]
    return max(range(len(combined)), key=lambda i: (combined[i], -i))
