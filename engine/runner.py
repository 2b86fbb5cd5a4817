"""The model runner: decides *how* a step runs. Tensors only; the scheduler decides who is in the batch.

For each serving model version it keeps one batch on the device: the next input token of every row (R,)
and the recurrent state (L, R, S). A step, per model version:

    drop the rows of requests that left        state = state[:, keep]
    append rows for requests that joined       zero state, the <form> start token
    one model.step on the batch, padded        logits (P, V), P = max(R, min_batch_rows)
    constrain and choose per request           greedy / sample (its own generator) / beam_step
    reorder beam rows, one transfer to host    tokens and beam parents, (2, R) → lists
    advance every RowState, finish the done    PoemResult per finished request

Batch invariance: on CPU, `model.step` gives bit-identical rows for any batch of 16 or more rows at any row
position, but different bits for batches of 1–15 (the BLAS kernels block small matrices differently).
So every step's batch is padded to at least `min_batch_rows` (16) with ignored rows, and a request's poem
is the same alone or among 255 others. Everything after the step is row-local (log_softmax, masks,
penalties, sampling from the request's own generator, beam search over the request's own rows). On a
GPU this is not guaranteed: cuBLAS may choose kernels by batch size at any size.

Rows keep the ServingModel they joined with, so after a hot-swap the old version's batch runs until its
last row finishes, alongside the new version's batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from engine.api import PoemRequest, PoemResult, RequestError
from engine.constraints import PoemPlan, RowState, allowed_masks, build_plan
from engine.decoding import (beam_step, constrain, greedy, make_generator, repeat_penalty_for, repetition_penalty,
                             sample_batch)
from engine.forms import format_poem
from engine.registry import ModelRegistry, ServingModel
from engine.scheduler import EngineRequest, RunnerOutput, SchedulerOutput

NEG_INF = float("-inf")
MIN_BATCH_ROWS = 16  # see the module docstring: batch invariance


def make_plan(serving: ServingModel, request: PoemRequest) -> PoemPlan:
    """The request's decoding plan for this model's vocabulary (RequestError for characters it lacks)."""
    return build_plan(serving.vocab, serving.prosody, request)


@dataclass
class RowGroup:
    """One request's rows in a model batch: 1 for greedy and sample, beam_width for beam."""

    req_id: str
    request: PoemRequest
    plan: PoemPlan
    rows: list[RowState]  # one per batch row, in batch order
    generator: torch.Generator | None  # sample mode: the request's own, seeded from `seed`
    beam_scores: torch.Tensor | None = None  # beam mode: (k,) cumulative ranking scores, on the device
    started: float = field(default_factory=time.perf_counter)

    @property
    def num_rows(self) -> int:
        return len(self.rows)


class ModelBatch:
    """The rows of one ServingModel version, resident on its device."""

    def __init__(self, serving: ServingModel):
        self.serving = serving
        self.device = serving.device
        self.groups: dict[str, RowGroup] = {}  # req_id → group, in batch-row order
        cfg = serving.model.config
        self.tokens = torch.empty(0, dtype=torch.long, device=self.device)  # (R,) next input token per row
        self.state = torch.zeros(cfg.num_layers, 0, cfg.state_dim, device=self.device)  # (L, R, S)
        self.totals = torch.zeros(0, device=self.device)  # (R,) model log-prob of each row's text so far

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    def remove(self, req_ids: set[str]) -> None:
        """Drop the rows of requests that left (finished, cancelled, expired)."""
        leaving = [r for r in req_ids if r in self.groups]
        if not leaving:
            return
        keep, offset = [], 0
        for req_id, group in self.groups.items():
            if req_id not in req_ids:
                keep.extend(range(offset, offset + group.num_rows))
            offset += group.num_rows
        for req_id in leaving:
            del self.groups[req_id]
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.tokens = self.tokens[index]  # (R',)
        self.state = self.state[:, index]  # (L, R', S)
        self.totals = self.totals[index]

    def add(self, req: EngineRequest, plan: PoemPlan) -> None:
        """Append the request's rows: zero state, the <form> token as the first input."""
        request = req.request
        k = req.num_rows
        group = RowGroup(req.req_id, request, plan, [plan.new_row() for _ in range(k)],
                         make_generator(request.seed) if request.mode == "sample" else None)
        if request.mode == "beam":
            group.beam_scores = torch.full((k,), NEG_INF, device=self.device)
            group.beam_scores[0] = 0.0  # one live beam at the start; the others fill from its candidates
        self.groups[req.req_id] = group
        start = torch.full((k,), plan.start_token, dtype=torch.long, device=self.device)
        self.tokens = torch.cat([self.tokens, start])
        self.state = torch.cat([self.state, self.serving.model.init_state(k, self.device)], dim=1)
        self.totals = torch.cat([self.totals, torch.zeros(k, device=self.device)])

    def step(self, min_rows: int) -> dict[str, PoemResult]:
        """One decoding step for every row; returns the requests it finished."""
        model, device, vocab_size = self.serving.model, self.device, len(self.serving.vocab)
        R = self.num_rows
        P = max(R, min_rows)
        tokens, state = self.tokens, self.state
        if P > R:  # pad rows: any token, zero state; their outputs are never read
            tokens = torch.cat([tokens, tokens.new_zeros(P - R)])  # (P,)
            state = torch.cat([state, state.new_zeros(state.shape[0], P - R, state.shape[2])], dim=1)  # (L, P, S)
        logits, state = model.step(tokens, state)  # (P, V), (L, P, S)
        logprobs = torch.log_softmax(logits.float(), dim=-1)[:R]  # (R, V): row-local
        state = state[:, :R]

        rows = [row for g in self.groups.values() for row in g.rows]  # batch order
        penalties = [repeat_penalty_for(g.request.mode) for g in self.groups.values() for _ in g.rows]
        mask = allowed_masks(rows, device)  # (R, V) bool
        penalty = repetition_penalty(rows, vocab_size, device, penalties)  # (R, V) or None
        scores = constrain(logprobs, mask, penalty)  # (R, V), for greedy and sample rows

        # Per row: the next token and the row it continues (itself, or a beam's parent).
        next_tokens = torch.empty(R, dtype=torch.long, device=device)  # (R,)
        parents = torch.arange(R, device=device)  # (R,)
        token_logprobs = torch.empty(R, device=device)  # (R,)
        greedy_idx, sample_idx, sample_u, sample_cfg = [], [], [], []
        forced_idx, forced_tok = [], []
        offset = 0
        for group in self.groups.values():
            k, mode = group.num_rows, group.request.mode
            if mode == "beam":
                sl = slice(offset, offset + k)
                bs = beam_step(logprobs[sl], group.beam_scores, k, mask[sl],
                               None if penalty is None else penalty[sl])
                next_tokens[sl] = bs.tokens
                parents[sl] = bs.parents + offset
                token_logprobs[sl] = bs.logprobs
                group.beam_scores = bs.scores
            else:
                forced = group.rows[0].forced()
                if forced is not None:  # punctuation, <eos>, prompt characters: no draw, still a model step
                    forced_idx.append(offset)
                    forced_tok.append(forced)
                elif mode == "sample":
                    sample_idx.append(offset)
                    # One uniform per free step from the request's own generator: independent of the batch.
                    sample_u.append(float(torch.rand((), generator=group.generator)))
                    r = group.request
                    sample_cfg.append((r.temperature, r.top_k, r.top_p))
                else:
                    greedy_idx.append(offset)
            offset += k
        if greedy_idx:
            idx = torch.tensor(greedy_idx, device=device)
            next_tokens[idx] = greedy(scores[idx])
        if sample_idx:
            idx = torch.tensor(sample_idx, device=device)
            temperature, top_k, top_p = (torch.tensor(c) for c in zip(*sample_cfg))
            next_tokens[idx] = sample_batch(scores[idx], temperature.float(), top_k.long(), top_p.float(),
                                            torch.tensor(sample_u, dtype=torch.float32))
        if forced_idx:
            next_tokens[torch.tensor(forced_idx, device=device)] = torch.tensor(forced_tok, device=device)
        single = greedy_idx + sample_idx + forced_idx
        if single:
            idx = torch.tensor(single, device=device)
            token_logprobs[idx] = logprobs[idx, next_tokens[idx]]

        # Beam rows continue their parents' state; then the only device → host transfer of the step.
        self.state = state[:, parents]  # (L, R, S)
        self.totals = self.totals[parents] + token_logprobs
        self.tokens = next_tokens
        host_tokens, host_parents = torch.stack([next_tokens, parents]).tolist()

        finished: dict[str, PoemResult] = {}
        offset = 0
        for req_id, group in self.groups.items():
            k = group.num_rows
            if group.request.mode == "beam":
                group.rows = _children(group.rows, [p - offset for p in host_parents[offset:offset + k]])
            for row, tok in zip(group.rows, host_tokens[offset:offset + k]):
                row.advance(tok)
            if group.rows[0].done:
                assert all(r.done for r in group.rows), "every row of a fixed-length form ends on the same step"
                finished[req_id] = self._result(group, float(self.totals[offset]))
            offset += k
        return finished

    def _result(self, group: RowGroup, score: float) -> PoemResult:
        row = group.rows[0]  # beams are sorted by score
        return PoemResult(poem=format_poem(row.line_texts), lines=row.line_texts, form=group.plan.form.name,
                          mode=group.request.mode, model={"name": self.serving.name, "version": self.serving.version},
                          elapsed_ms=0.0, notes=list(row.notes), score=score)


def _children(rows: list[RowState], parents: list[int]) -> list[RowState]:
    """The rows for the next step: a parent's first child reuses it, later children get copies."""
    out, taken = [], set()
    for p in parents:
        out.append(rows[p].copy() if p in taken else rows[p])
        taken.add(p)
    return out


class ModelRunner:
    """All model batches; executes the scheduler's decisions one step at a time."""

    def __init__(self, registry: ModelRegistry, min_batch_rows: int = MIN_BATCH_ROWS):
        self.registry = registry
        self.min_batch_rows = min_batch_rows
        self.batches: dict[int, ModelBatch] = {}  # id(ServingModel) → its batch
        self.req_batch: dict[str, ModelBatch] = {}  # req_id → the batch holding its rows

    @property
    def num_rows(self) -> int:
        return sum(b.num_rows for b in self.batches.values())

    def reset(self) -> None:
        """Forget every row (after a failed step)."""
        self.batches.clear()
        self.req_batch.clear()

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        finished: dict[str, object] = {}
        # Leave: one gather per batch that lost rows.
        by_batch: dict[int, set[str]] = {}
        for req_id in out.finished_req_ids:
            batch = self.req_batch.pop(req_id, None)
            if batch is not None:
                by_batch.setdefault(id(batch.serving), set()).add(req_id)
        for key, req_ids in by_batch.items():
            self.batches[key].remove(req_ids)
        # Join: bind each request to the version serving now (its plan is rebuilt if a swap happened
        # while it waited).
        for req in out.scheduled_new_reqs:
            serving, plan = req.payload
            try:
                current = self.registry.get(req.request.model)
                if current is not serving:
                    serving, plan = current, make_plan(current, req.request)
            except Exception as e:  # RequestError: the new version cannot write the prompt; or the model went away
                finished[req.req_id] = e
                continue
            batch = self.batches.get(id(serving))
            if batch is None:
                batch = self.batches[id(serving)] = ModelBatch(serving)
            batch.add(req, plan)
            self.req_batch[req.req_id] = batch
        # Run: one model step per version; empty batches (an old version's last rows left) are let go.
        num_rows = num_padded = 0
        for key, batch in list(self.batches.items()):
            if batch.num_rows == 0:
                del self.batches[key]
                continue
            num_rows += batch.num_rows
            num_padded += max(batch.num_rows, self.min_batch_rows)
            for req_id, result in batch.step(self.min_batch_rows).items():
                result.elapsed_ms = (time.perf_counter() - batch.groups[req_id].started) * 1e3
                finished[req_id] = result
        return RunnerOutput(finished=finished, num_rows=num_rows, num_padded_rows=num_padded)
