"""The choice after a model step: greedy, sampling and beam search on (masked) logits.

The choice works on tensors and is shared with the batched engine (engine/serving/runner.py), so that a request
decodes to the same poem in either. After each model step:

    bias = step_bias(rows, REPEAT_PENALTY, device)        # Bias: (N, V) as shared mask rows plus
                                                          # edits; -inf where a row may not go, minus its
                                                          # repetition penalty (no logits needed)
    choose_greedy(logits, bias)                           # (N,) the first best token per row
    choose_sample(logits, bias, rows, temperature, top_k, top_p, u)  # one draw per listed row, from its own u
    choose_beam(logits, bias, beam_scores, width)         # G requests of one width → BeamStep, and the
                                                          # log-sum-exps (N,): logits - lse are log-probs
    logsumexp(logits)                                     # (N,) for the totals of greedy and sample rows

Greedy and sampling rank `bias + logits`: the log-sum-exp is a per-row constant, which changes neither a
row's argmax nor its softmax. Beam search compares candidates across rows, so it ranks the constrained
log-probs plus each beam's score, `(bias + score) + (logits - lse)`; with width 1 it picks what greedy
picks (the same order; only a tie to the last bit of a float could split them). On a CPU with the C kernels
built (engine/sampling/kernels.py) each choice takes one or two passes per row; elsewhere (a GPU, an install
without a C compiler) the torch primitives below do it: greedy, sample_batch and beam_search_step on
those scores. Greedy picks the same tokens either way, beam search too but for near ties (the kernels
round the log-sum-exp differently); sampling keeps the same tokens and draws in proportion to their
probabilities, but by rejection, so a given seed writes another poem than on the torch path.

Reproducibility: a sampling request draws one uniform number per step from its own CPU
`torch.Generator` seeded with `seed`, and everything else is row-local, so its poem does not depend on
what else shares the batch. Greedy and beam search are deterministic.

Repetition: the constraints *block* a character's third use and a repeated line (a hard rule, every
mode). Every mode also pays a *penalty* of REPEAT_PENALTY nats per earlier use of a character, because
the most likely continuation of a character RNN is very often a character it just wrote: without it
greedy and beam search spend each character's two allowed uses ("春风春风") and beams collapse onto one
another, and sampled poems repeat characters far more often than poets do (blind panels read sampling
better with the penalty: docs/PERFORMANCE.md). The same penalty in greedy and beam keeps beam width 1
identical to greedy.
"""

from __future__ import annotations

import random
from array import array
from dataclasses import dataclass
from itertools import chain

import torch

from engine.poem.constraints import RowState
from engine.sampling import kernels

# Nats per earlier use of a character, every mode. 1.5, not 1.0: at 1.0 lstm-large repeated a character in
# 97 % of its beam-5 七律 (at 1.5: 74 %, the poets: 67 %), and blind panels read 1.5 better.
REPEAT_PENALTY = 1.5
FORMULA_PENALTY = 3.0  # nats for completing one of the model's formulas (engine.sampling.formulas), every mode
NEG_INF = float("-inf")


# NOTE: the likeliest poem of a character RNN is much the same whatever the prompt (its greedy and beam
# poems shared 60 % of their lines over 100 openings), so greedy and beam search take a small seeded draw:
# greedy draws among the GREEDY_TOP_K likeliest characters at GREEDY_TEMPERATURE, and beam search keeps
# the `width` best of its BEAM_CANDIDATES·width best candidates after adding BEAM_NOISE · Gumbel noise
# (a stochastic beam). The request's seed fixes the draw: the same request and seed give the same poem.
GREEDY_TEMPERATURE = 0.4
GREEDY_TOP_K = 5
BEAM_NOISE = 2.0  # scale of the Gumbel noise, in nats
BEAM_CANDIDATES = 3  # candidates per beam that the noise chooses among


def draw_params(request) -> tuple[float, int, float]:
    """(temperature, top_k, top_p) of a greedy or sample request's draws."""
    if request.mode == "greedy":
        return GREEDY_TEMPERATURE, GREEDY_TOP_K, 1.0
    return request.temperature, request.top_k, request.top_p


def gumbel(uniform: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise from uniform numbers in [0, 1)."""
    return -torch.log(-torch.log(uniform.double().clamp(1e-12, 1 - 1e-12))).float()


# ---------------------------------------------------------------------------------------------------------
# Logit processing


def _uses(rows: list[RowState], penalty: float | list[float]):
    """Flat (row, token, penalty) triples: one per earlier use of a token, and FORMULA_PENALTY for each
    token that would complete a formula, in the rows that pay penalties at all; None when there are none."""
    per_row = [float(penalty)] * len(rows) if isinstance(penalty, (int, float)) else [float(p) for p in penalty]
    lengths = torch.tensor([len(r.used) if p else 0 for r, p in zip(rows, per_row)])
    # array → tensor avoids building one Python object per element (torch.tensor on a list is slow).
    tokens = torch.frombuffer(array("q", chain.from_iterable(r.used for r, p in zip(rows, per_row) if p)),
                              dtype=torch.int64) if int(lengths.sum()) else torch.zeros(0, dtype=torch.int64)
    row_ids = torch.repeat_interleave(torch.arange(len(rows)), lengths)
    values = torch.repeat_interleave(torch.tensor(per_row), lengths)
    formula = [(i, t) for i, (r, p) in enumerate(zip(rows, per_row)) if p for t in r.formula_tokens()]
    if formula:  # a few entries a step at most
        extra = torch.tensor(formula, dtype=torch.int64)
        row_ids, tokens = torch.cat([row_ids, extra[:, 0]]), torch.cat([tokens, extra[:, 1]])
        values = torch.cat([values, torch.full((len(formula),), FORMULA_PENALTY)])
    if not row_ids.numel():
        return None
    return row_ids, tokens, values


@dataclass
class Bias:
    """What each row's logits get added before ranking, kept sparse: row r is `table[index[r]]` with the
    entries `tokens[ptr[r]:ptr[r+1]]` replaced by `values[...]`. The table holds the plan's constraint masks
    (0 / -inf, a few dozen rows that every row shares); the replacements are a row's repetition penalties,
    bans and forced token, tens of entries where the dense (N, V) bias they stand for is N·V floats. The C
    kernels read a row in place (a row with replacements is copied into a buffer this core caches); the
    torch path asks for `dense()`. The table lives on the logits' device, the rest on the CPU."""

    table: torch.Tensor  # (T, V) float32
    index: torch.Tensor  # (N,) long: each row's table row
    ptr: torch.Tensor  # (N + 1,) long: row r's replacements are entries ptr[r] to ptr[r + 1]
    tokens: torch.Tensor  # (E,) long, ascending within a row
    values: torch.Tensor  # (E,) float32: what the bias holds there

    @classmethod
    def of_dense(cls, dense: torch.Tensor) -> Bias:
        """A dense bias (N, V) as a Bias: every row its own table row, nothing replaced."""
        n = dense.shape[0]
        # The index lives beside the rows: on a GPU, dense() then needs no copy from the host.
        return cls(dense.float().contiguous(), torch.arange(n, device=dense.device), torch.zeros(n + 1, dtype=torch.long),
                   torch.zeros(0, dtype=torch.long), torch.zeros(0))

    def __len__(self) -> int:
        return self.index.shape[0]

    def rows(self, a: int, b: int) -> Bias:
        """Rows a..b (b excluded)."""
        e0, e1 = int(self.ptr[a]), int(self.ptr[b])
        return Bias(self.table, self.index[a:b], self.ptr[a:b + 1] - e0, self.tokens[e0:e1], self.values[e0:e1])

    def dense(self) -> torch.Tensor:
        """The bias as (N, V) on the table's device."""
        device = self.table.device
        out = self.table[self.index.to(device)]
        if self.tokens.numel():
            rows = torch.repeat_interleave(torch.arange(len(self)), self.ptr.diff())
            out[rows.to(device), self.tokens.to(device)] = self.values.to(device)
        return out


def step_bias(rows: list[RowState], penalty: float | list[float], device) -> Bias:
    """What each row's log-probs get added before ranking: -inf where a row may not go next, minus the
    repetition penalty where it may (penalty: one value, or one per row). It needs no logits, so the engine
    builds it while the model step runs.

    The same values as the dense recipe — gather the rows' mask rows, 0 at a forced token, -inf at the
    banned ones, then subtract each earlier use's penalty in place — computed only where that recipe
    changes a mask row: the penalties are summed from 0 in the same order, and 0 + s is s exactly."""
    tables = rows[0].plan.tables
    table = tables.bias_on(device)  # (T, V) on the logits' device
    host = table if table.device.type == "cpu" else tables.bias_on("cpu")
    N, V = len(rows), table.shape[1]
    index, forced, banned = [], [], []  # forced and banned as keys row·V + token
    for i, r in enumerate(rows):
        index.append(r.mask_index)
        if r._forced is not None:
            forced.append(i * V + r._forced)
        elif r.step_banned:
            banned.extend(i * V + t for t in r.step_banned)
    index = torch.tensor(index, dtype=torch.long)
    uses = _uses(rows, penalty)
    parts = [torch.tensor(forced, dtype=torch.long), torch.tensor(banned, dtype=torch.long)]
    if uses is not None:
        parts.append(uses[0] * V + uses[1])
    keys = torch.cat(parts)
    if not keys.numel():
        return Bias(table, index, torch.zeros(N + 1, dtype=torch.long), keys, torch.zeros(0))
    unique, where = torch.unique(keys, sorted=True, return_inverse=True)  # by row, then token
    row_of, token = unique // V, unique % V
    values = host[index[row_of], token]
    values[where[:len(forced)]] = 0.0
    values[where[len(forced):len(forced) + len(banned)]] = NEG_INF
    if uses is not None:
        spent = torch.zeros(len(unique)).index_put_((where[len(forced) + len(banned):],), -uses[2].float(),
                                                    accumulate=True)
        values += spent
    ptr = torch.zeros(N + 1, dtype=torch.long)
    ptr[1:] = torch.bincount(row_of, minlength=N).cumsum(0)
    return Bias(table, index, ptr, token, values)


def greedy(scores: torch.Tensor) -> torch.Tensor:
    """The most likely token of each row: scores (N, V) → (N,) long, the first one on a tie (as argmax).

    On CPU by block maxima: the row's best token is in the first block holding the row's maximum; the
    vectorised amax pass plus two small argmaxes take a quarter of the time of argmax over the row. (On
    a GPU, argmax is one kernel and the extra launches would cost more than they save.)"""
    N, V = scores.shape
    B = _block_size(V)
    if B is None or not scores.is_contiguous() or scores.device.type != "cpu":  # a GPU's argmax is one kernel
        return scores.argmax(dim=-1)
    blocks = scores.view(N, V // B, B)
    block = blocks.amax(dim=-1).argmax(dim=-1)  # (N,)
    within = blocks[torch.arange(N, device=scores.device), block].argmax(dim=-1)  # (N,)
    return block * B + within


def top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(x, k, dim=-1) for x (N, M) and k much less than M: (values, indices), best first.

    The best k entries of a row lie in its k blocks with the best maxima (an entry outside them is beaten
    by the maxima of k other blocks), so one vectorised amax pass replaces most of topk's partial sort."""
    N, M = x.shape
    B = _block_size(M)
    if B is None or M // B <= k or not x.is_contiguous() or x.device.type != "cpu":  # one kernel on a GPU
        return x.topk(k, dim=-1)
    blocks = x.view(N, M // B, B)
    best = blocks.amax(dim=-1).topk(k, dim=-1).indices  # (N, k) the k best blocks
    candidates = blocks.gather(1, best[:, :, None].expand(N, k, B)).view(N, k * B)  # (N, k·B)
    values, idx = candidates.topk(k, dim=-1)
    return values, best.gather(1, idx // B) * B + idx % B


def _block_size(n: int) -> int | None:
    """A divisor of n near 64 (16–128) for the block-maxima tricks; None when n has none."""
    return next((b for b in (*range(64, 129), *range(63, 15, -1)) if n % b == 0), None)


MIN_TEMPERATURE = 1e-3  # sampling temperatures below this act as this (see sample_batch)


SAMPLE_BUCKETS = 64  # histogram buckets that locate each row's nucleus boundary (see sample_batch)
SAMPLE_WINDOW = 16.0  # nats below the row's best token that the buckets cover; the rest share the last one
MIN_LOG_SHARE = -87.0  # tokens this far (nats) below the best have no float32 probability: never drawn


def sample_batch(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 uniform: torch.Tensor) -> torch.Tensor:
    """One draw per row by inverting the kept distribution's CDF at that row's uniform number.

    logits (N, V), -inf where not allowed; temperature (N,) > 0; top_k (N,) long, 0 = off; top_p (N,) in
    (0, 1]; uniform (N,) in [0, 1). Returns (N,) long. Every row needs at least one finite logit.

    Kept: the nucleus — every token at least as likely as the one at which the best-first running mass
    reaches top_p (ties with it stay) — and, with top_k, every token at least as likely as the k-th best.
    The draw walks the kept tokens in vocabulary order, so no row is ever sorted in full: a 64-bucket
    histogram of each row's probability mass finds the bucket where the nucleus ends, and only that
    bucket's tokens are sorted to find the exact boundary (sorting whole rows would dominate a sampling
    step). Every operation is row-local, so batching never
    changes a poem.
    """
    N, V = logits.shape
    device = logits.device
    # A temperature the contract allows, (0, 2], can still be 0 or overflow the logits in float32 (5e-324
    # becomes 0.0; 1e-40 turns a logit of 20 into inf): softmax then gives NaN and the draw lands on a masked
    # token. Below MIN_TEMPERATURE sampling is greedy anyway, so clamp there; above it nothing changes.
    t = temperature.to(device, torch.float32).clamp_min(MIN_TEMPERATURE)
    x = logits.float() / t[:, None]  # (N, V)
    k, p, u = top_k.to(device), top_p.to(device, torch.float32), uniform.to(device, torch.float32)
    best = x.amax(dim=-1, keepdim=True)  # (N, 1)
    # Shares relative to the best token, unnormalised. Clamped first: on CPU, exp(-inf) (every masked
    # token) takes a slow path that costs 20x a normal exp.
    rel = (x - best).clamp_(min=MIN_LOG_SHARE)  # (N, V) in [-87, 0]
    share = rel.exp()  # (N, V), the best token 1
    bucket = rel.mul_(-SAMPLE_BUCKETS / SAMPLE_WINDOW).clamp_(max=SAMPLE_BUCKETS - 1).long()  # (N, V)
    mass = torch.zeros(N, SAMPLE_BUCKETS, device=device).scatter_add_(1, bucket, share).cumsum_(dim=-1)  # (N, B)
    need = p * mass[:, -1]  # (N,): the nucleus' mass
    last = (mass < need[:, None]).sum(dim=-1).clamp_(max=SAMPLE_BUCKETS - 1)  # (N,) the bucket it ends in
    before = torch.where(last > 0, mass.gather(1, (last - 1).clamp(min=0)[:, None]).squeeze(1), 0.0)  # (N,)

    # The boundary bucket's tokens, each row's best first (ties by vocabulary order), as padded rows.
    rows, cols = (bucket == last[:, None]).nonzero(as_tuple=True)  # row-major
    values = x[rows, cols]
    order = values.argsort(descending=True, stable=True)
    order = order[rows[order].argsort(stable=True)]
    rows, cols, values = rows[order], cols[order], values[order]
    counts = torch.bincount(rows, minlength=N)  # (N,) ≥ 1: the best token's bucket is never empty
    rank = torch.arange(len(rows), device=device) - (counts.cumsum(0) - counts)[rows]
    width = int(counts.max())
    run = torch.zeros(N, width, device=device)
    run[rows, rank] = share[rows, cols]
    run = before[:, None] + run.cumsum_(dim=-1)  # (N, width): mass up to and including each token
    cut = torch.full((N, width), float("inf"), device=device)
    cut[rows, rank] = values
    at = torch.minimum((run < need[:, None]).sum(dim=-1), counts - 1)  # (N,) the first token reaching it
    floor = torch.maximum(cut.gather(1, at[:, None]), best + MIN_LOG_SHARE)  # (N, 1): least kept value
    if bool((k > 0).any()):  # top-k: topk is slow on CPU, so only when asked
        kth = x.topk(int(k.clamp(max=V).max()), dim=-1).values  # (N, K)
        kth = kth.gather(1, (k.clamp(1, V) - 1)[:, None])  # (N, 1)
        floor = torch.where(k[:, None] > 0, torch.maximum(floor, kth), floor)
    return _draw_kept(x, share, floor, u)


def _draw_kept(x: torch.Tensor, share: torch.Tensor, floor: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The draw at each row's uniform u (N,) among its kept tokens (x ≥ floor (N, 1)), walked in vocabulary
    order by their shares (N, V): (N,) long."""
    V = x.shape[1]
    cdf = torch.where(x >= floor, share, 0.0).cumsum_(dim=-1)  # (N, V) over the kept tokens
    total = cdf[:, -1:]  # (N, 1)
    idx = torch.searchsorted(cdf, (u[:, None] * total).contiguous(), right=True)  # first index past the target
    # u * total can round up to total itself: then take the last kept token.
    idx = torch.where(idx < V, idx, torch.searchsorted(cdf, total.contiguous(), right=False))
    return idx.squeeze(1)


def sample_sorted(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  uniform: torch.Tensor) -> torch.Tensor:
    """`sample_batch`'s rule and arguments, by sorting every row in full. Every shape is fixed, so nothing
    waits for the device to say how many tokens a bucket holds: the GPU's way (a GPU sorts rows quickly,
    while on a CPU the full sort costs more than sample_batch's histogram). The kept set and the draw are
    sample_batch's; only the running mass is summed in another order, so a row whose nucleus boundary falls
    within a float's rounding of top_p can keep one token more or fewer."""
    V = logits.shape[1]
    t = temperature.to(logits.device, torch.float32).clamp_min(MIN_TEMPERATURE)
    x = logits.float() / t[:, None]  # (N, V)
    k, p, u = top_k.to(x.device), top_p.to(x.device, torch.float32), uniform.to(x.device, torch.float32)
    best = x.amax(dim=-1, keepdim=True)
    share = (x - best).clamp_(min=MIN_LOG_SHARE).exp_()  # (N, V), the best token 1 (see sample_batch)
    values, order = x.sort(dim=-1, descending=True, stable=True)
    run = share.gather(1, order).cumsum_(dim=-1)  # (N, V) best-first running mass
    at = (run < (p * run[:, -1])[:, None]).sum(dim=-1).clamp_(max=V - 1)  # the first token reaching top_p
    floor = torch.maximum(values.gather(1, at[:, None]), best + MIN_LOG_SHARE)  # (N, 1) least kept value
    kth = values.gather(1, (k.clamp(1, V) - 1)[:, None])
    floor = torch.where(k[:, None] > 0, torch.maximum(floor, kth), floor)
    return _draw_kept(x, share, floor, u)


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator for one request: seeded, or from fresh entropy when seed is None."""
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else random.SystemRandom().randrange(2**63))
    return g


@dataclass
class BeamStep:
    parents: torch.Tensor  # (G·width,) long: the row (of the block passed in) each new beam extends
    tokens: torch.Tensor  # (G·width,) long: the token it takes
    scores: torch.Tensor  # (G·width,) float: cumulative ranking score (log-prob minus penalties), best first per request


def beam_search_step(totals: torch.Tensor, width: int) -> BeamStep:
    """One step of beam search for G requests of the same width, in one top_k.

    totals (G·width, V): each candidate's cumulative ranking score, request after request — built as
    `(step_bias(rows) + beam_scores[:, None]) + logprobs`, in that order (as `choose_beam` builds it), with
    beam_scores -inf for an empty slot (start a request's beams with [0, -inf, …]). Every request keeps
    `width` beams: when fewer than `width` candidates are finite, the empty slots copy its best beam with
    score -inf, so every row stays a valid, advanceable state and never wins. Each request's result
    depends only on its own rows.
    """
    n, V = totals.shape
    top, flat = top_k(totals.view(n // width, width * V), width)  # (G, width), best first
    return _beam_step(top, flat, V, width)


def _beam_step(top: torch.Tensor, flat: torch.Tensor, V: int, width: int) -> BeamStep:
    """BeamStep from each request's best `width` candidates: values and flat indices (G, width), best first."""
    base = torch.arange(top.shape[0], device=top.device)[:, None] * width  # (G, 1): each request's first row
    parents, tokens = flat // V + base, flat % V
    dead = top == float("-inf")  # NOTE: no `if dead.any()`: asking would wait for a GPU
    parents = torch.where(dead, parents[:, :1], parents)
    tokens = torch.where(dead, tokens[:, :1], tokens)
    return BeamStep(parents=parents.flatten(), tokens=tokens.flatten(), scores=top.flatten())


# ---------------------------------------------------------------------------------------------------------
# The choice after a model step: C kernels on a CPU, the torch primitives above elsewhere


def logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """Each row's log Σ exp of logits (N, V): (N,) float32. logits - lse[:, None] are the log-probs."""
    if kernels.usable(logits):
        return kernels.logsumexp(logits)
    return torch.logsumexp(logits.float(), dim=-1)


def choose_greedy(logits: torch.Tensor, bias: Bias) -> torch.Tensor:
    """The first token with the best constrained score in each row: (N,) long. It ranks bias + logits,
    which orders a row as bias + log-probs does (the log-sum-exp is the row's constant), so no
    log-sum-exp waits in front of the choice."""
    if kernels.usable(logits, bias.table):
        return kernels.greedy(logits, bias)
    return greedy(bias.dense() + logits.float())


def choose_sample(logits: torch.Tensor, bias: Bias, rows: torch.Tensor, temperature: torch.Tensor,
                  top_k: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One draw for each of `rows` (n,) long from bias + logits (softmax ignores the log-sum-exp), by
    `sample_batch`'s rule: temperature, top_k, top_p and uniform are (n,), one per listed row. (n,) long."""
    temperature = temperature.float().clamp_min(MIN_TEMPERATURE)
    if kernels.usable(logits, bias.table):
        return kernels.sample(logits, bias, rows.cpu(), temperature.cpu(), top_k.cpu(), top_p.cpu(), uniform.cpu())
    draw = sample_batch if logits.device.type == "cpu" else sample_sorted
    return draw(bias.dense()[rows] + logits[rows].float(), temperature, top_k, top_p, uniform)


def sample(logits_row: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator,
           bias: Bias | None = None) -> int:
    """One token from logits (V,) plus a one-row bias (none: unconstrained), using `generator`'s next
    uniform number (one per call), as the engine draws a sample row's free step."""
    logits = logits_row[None].float().contiguous()  # (1, V)
    bias = Bias.of_dense(torch.zeros_like(logits)) if bias is None else bias
    u = float(torch.rand((), generator=generator, device=generator.device))
    one = lambda v, dtype=torch.float32: torch.tensor([v], dtype=dtype, device=logits.device)  # noqa: E731
    return int(choose_sample(logits, bias, one(0, torch.long), one(temperature), one(top_k, torch.long),
                             one(top_p), one(u))[0])


def choose_beam(logits: torch.Tensor, bias: Bias, beam_scores: torch.Tensor, width: int,
                uniform: torch.Tensor | None = None) -> tuple[BeamStep, torch.Tensor]:
    """One beam-search step for the G requests of width `width` whose rows these are, and the rows'
    log-sum-exps (N,). Beams of different rows compete, so they rank log-probs plus the beam's score:
    (bias + beam_scores[:, None]) + (logits - lse[:, None]), as `beam_search_step` describes.

    `uniform` (G, BEAM_CANDIDATES·width), each request's own uniform numbers for this step: the stochastic
    beam. Each request's BEAM_CANDIDATES·width best candidates get BEAM_NOISE · Gumbel noise, and the
    `width` best by the noisy score go on, sorted by their true score. None: plain beam search."""
    keep = width if uniform is None else uniform.shape[1]  # candidates per request before the noise
    V = logits.shape[1]
    if kernels.usable(logits, bias.table):
        lse, top, flat = kernels.beam(logits, bias, beam_scores.cpu(), width, keep)
    else:
        lse = logsumexp(logits)
        totals = (bias.dense() + beam_scores.float()[:, None]) + (logits.float() - lse[:, None].to(logits.device))
        if uniform is None:
            return beam_search_step(totals, width), lse
        top, flat = top_k(totals.view(-1, width * V), keep)  # (G, keep), best first
    if uniform is None:
        return _beam_step(top, flat, V, width), lse
    noisy = top + BEAM_NOISE * gumbel(uniform).to(top.device)  # -inf stays -inf
    pick = noisy.topk(width, dim=1).indices.sort(dim=1).values  # (G, width): ascending index = by true score
    return _beam_step(top.gather(1, pick), flat.gather(1, pick), V, width), lse
