"""Contrastive decoding: a strong model's choices, minus what a weaker model of the same vocabulary would
also have written (Li et al. 2023, "Contrastive Decoding: Open-ended Text Generation as Optimization").

    pair = ContrastivePair(expert, amateur, alpha=0.3)   # two PoemModels with one vocabulary
    scores, state = pair.step(tokens, state)             # what the engine steps instead of expert.step

A character model's likeliest poem is its blandest: stock lines (不知何处, 人间无限) that any model of
poems predicts. What the strong model knows and the weak one does not is what the context asks for. So
within the strong model's plausible characters (log p_expert at least log `beta` below its best), each is
scored

    log p_expert(x) − alpha · log p_amateur(x)

and every other character keeps its log p_expert, `OUTSIDE` nats lower, below all of them: where the masks
of a poem leave none of the plausible characters (a rhyme, a tone), the choice among the rest is the
expert's own. The scores are log-probabilities of the contrastive distribution up to each row's constant,
so greedy, sampling and beam search use them as they use a model's logits; a row's scores depend on that
row alone (batch invariance holds).

The pair steps both models on one recurrent state tensor, the expert's state and the amateur's side by side
(padded to the deeper one's layers), so the engine adds and drops rows exactly as for one model.
docs/DECODING.md ("Contrastive decoding") has the measurements behind the default alpha.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from engine.model.network import PoemModel

OUTSIDE = 1000.0  # nats below the plausible characters for every other one: never above any of them


@dataclass(frozen=True)
class PairConfig:
    """What the engine reads of a model's config, for the pair's stacked state."""

    vocab_size: int
    cell: str  # the expert's
    num_layers: int  # the deeper model's
    state_dim: int  # the expert's state and the amateur's side by side


class ContrastivePair(nn.Module):
    def __init__(self, expert: PoemModel, amateur: PoemModel, alpha: float, beta: float = 0.1):
        super().__init__()
        e, a = expert.config, amateur.config
        if e.vocab_size != a.vocab_size:
            raise ValueError(f"the amateur's vocabulary has {a.vocab_size} tokens, the expert's {e.vocab_size}")
        if not (isinstance(alpha, (int, float)) and 0 < alpha <= 1):
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        if not (isinstance(beta, (int, float)) and 0 < beta < 1):
            raise ValueError(f"beta must be in (0, 1), got {beta!r}")
        self.expert, self.amateur = expert, amateur
        self.alpha, self.beta = float(alpha), float(beta)
        self.config = PairConfig(vocab_size=e.vocab_size, cell=e.cell, num_layers=max(e.num_layers, a.num_layers),
                                 state_dim=e.state_dim + a.state_dim)

    def num_parameters(self) -> int:
        return self.expert.num_parameters() + self.amateur.num_parameters()

    @property
    def device(self) -> torch.device:
        return self.expert.device

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        c = self.config
        device = device if device is not None else self.device
        return torch.zeros(c.num_layers, batch_size, c.state_dim, device=device, dtype=self.expert.embed.weight.dtype)

    def step(self, tokens: torch.Tensor, state: torch.Tensor):
        """tokens (B,) and state (L, B, S) → contrastive scores (B, V) and the next state."""
        e, a = self.expert.config, self.amateur.config
        logits_e, state_e = self.expert.step(tokens, state[:e.num_layers, :, :e.state_dim].contiguous())
        logits_a, state_a = self.amateur.step(tokens, state[:a.num_layers, :, e.state_dim:].contiguous())
        logp_e = torch.log_softmax(logits_e.float(), dim=-1)
        logp_a = torch.log_softmax(logits_a.float(), dim=-1)
        plausible = logp_e >= logp_e.amax(dim=-1, keepdim=True) + math.log(self.beta)
        scores = torch.where(plausible, logp_e - self.alpha * logp_a, logp_e - OUTSIDE)
        new = torch.zeros_like(state)
        new[:e.num_layers, :, :e.state_dim] = state_e
        new[:a.num_layers, :, e.state_dim:] = state_a
        return scores, new

    def forward(self, tokens: torch.Tensor, state: torch.Tensor | None = None):
        """tokens (B, T) → scores (B, T, V) and the state after the last position, one step at a time."""
        state = self.init_state(tokens.shape[0], tokens.device) if state is None else state
        scores = []
        for t in range(tokens.shape[1]):
            out, state = self.step(tokens[:, t], state)
            scores.append(out)
        return torch.stack(scores, dim=1), state
