"""The model runner: decides *how* a step runs. Tensors only; the scheduler decides who is in the batch.

For each serving model version it keeps one batch on the device: the next input token of every row (R,),
the recurrent state (L, R, S), each row's model log-prob so far and its beam score. Rows are ordered by
segment — greedy, sample, then beam requests grouped by width — so that every mode decodes a contiguous
slice and all beam requests of one width share one topk. A step, per model version:

    drop the rows that left or finished        one gather (it also restores the segment order)
    append rows for requests that joined       zero state, the <form> start token
    model step on the batch, padded  ─────────┐ here: logits (P, V), P = max(R, min_batch_rows)
    advance every RowState with the last      │ meanwhile, on the catch-up thread: the previous step's
      step's tokens                           │ tokens, in Python; the masks, bans and penalties this
                                              │ step needs; the last step's log-sum-exp for the greedy
                                              │ and sample totals
    constrain and choose, per segment ◄───────┘ choose_sample (greedy, sample) / choose_beam per width
    one device → host transfer                 the tokens (and beam parents); totals stay till a poem ends
    assemble the poems that chose <eos>        their rows are free for the next step

Greedy and sample rows choose by bias + logits (a row's log-sum-exp changes neither its argmax nor its
softmax), so the log-sum-exp their running log-probs need is paid during the next step (`owed`, `_pay_lse`).

The Python half of a step (RowState.advance, building the mask indices) runs while the model computes —
as vLLM's async scheduling overlaps the CPU's scheduling with the GPU's step. The step itself stays on the
step loop's thread, so that it starts at once and the choice finds the logits in this core's cache; it
runs traced (`ServingModel.step`, engine.model.network.compile_step), because eager, each of its ATen calls would
wait for the GIL while the catch-up's Python holds it. Only the requests that just chose <eos> are caught
up at once, so that their rows go back to the scheduler without waiting a step.

Batch invariance: on CPU, `model.step` gives bit-identical rows for any batch of 16 or more rows at any row
position, but different bits for batches of 1–15 (the BLAS kernels block small matrices differently).
So every step's batch is padded to at least `min_batch_rows` (16) with ignored rows, and a request's poem
is the same alone or among 255 others. Everything after the step is row-local (log-sum-exp, masks,
penalties, sampling from the request's own generator, beam search over the request's own rows). On a
GPU this is not guaranteed: cuBLAS may choose kernels by batch size at any size.

Rows keep the ServingModel they joined with, so after a hot-swap the old version's batch runs until its
last row finishes, alongside the new version's batch.
"""

from __future__ import annotations

import enum
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import count

import torch

from engine.api import PoemRequest, PoemResult
from engine.errors import EngineUnavailableError, RequestError
from engine.model.network import kept_step_inputs
from engine.poem.constraints import PoemPlan, RowState, beam_children
from engine.sampling.choice import (BEAM_CANDIDATES, REPEAT_PENALTY, Bias, choose_beam, choose_sample, draw_params,
                                    logsumexp, make_generator, step_bias)
from engine.serving.registry import ModelRegistry, ServingModel
from engine.serving.scheduler import EngineRequest, RunnerOutput, SchedulerOutput

NEG_INF = float("-inf")


class RowKind(enum.IntEnum):
    """How a group's rows choose; the batch keeps them in this order (then by beam width)."""

    GREEDY = 0
    SAMPLE = 1
    BEAM = 2


MIN_BATCH_ROWS = 16  # see the module docstring: batch invariance


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a tensor on `device` (see `moved`)."""
    return moved(torch.tensor(values, dtype=dtype), device)


def moved(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`. NOTE: on a GPU through pinned memory, which does not wait for the steps
    queued before it (a copy from ordinary memory does)."""
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor.to(device)


_arrivals = count()  # tie-break for the segment order: first come, first placed


@dataclass
class RowGroup:
    """One request's rows in a model batch: 1 for greedy and sample, beam_width for beam."""

    req_id: str
    request: PoemRequest
    plan: PoemPlan
    rows: list[RowState]  # one per batch row, in batch order (a DeviceBatch keeps them as tensors: empty)
    generator: torch.Generator  # the request's own, seeded from `seed`: its draws (greedy, sample) or noise (beam)
    penalty: float  # nats per earlier use of a character (REPEAT_PENALTY; 0 would pay none, formulas neither)
    segment: tuple[RowKind, int]  # where its rows sit in the batch: (kind, beam width; 1 unless beam)
    arrival: int = field(default_factory=lambda: next(_arrivals))
    offset: int = 0  # its first row in the batch tensors
    last_offset: int = 0  # its first row in the last step (`arrange` may have moved it since)
    joined: int = 0  # the batch's step count when it joined: it takes part in the steps from this one on
    ends: int = 0  # the batch's step count once it has chosen <eos>
    score: float = 0.0  # model log-prob of row 0, set when it ends
    started: float = field(default_factory=time.perf_counter)
    num_rows: int = 1  # its rows in the batch (len(rows) when they live on the host)

    @property
    def is_beam(self) -> bool:
        return self.segment[0] == RowKind.BEAM

    def catch_up(self, tokens: list[int], parents: list[int] | None) -> None:
        """Apply a step's tokens (the batch's, on the host) to the rows; beams first take their parents'
        places (`parents`: the batch's, None when it has no beam rows)."""
        a = self.last_offset
        b = a + self.num_rows
        if self.is_beam:
            self.rows = beam_children(self.rows, [p - a for p in parents[a:b]])
        for row, token in zip(self.rows, tokens[a:b]):
            row.advance(token)


def beam_segments(groups: list[RowGroup]) -> list[tuple[int, int, int]]:
    """(beam width, first row, end row) per run of beam groups of one width: `arrange` puts the beam groups
    after the others, by width, so each width is one run and the choice reshapes it as (G, width, V)."""
    segments: list[tuple[int, int, int]] = []
    for group in groups:
        if group.is_beam:
            width = group.num_rows
            if segments and segments[-1][0] == width:
                segments[-1] = (width, segments[-1][1], group.offset + width)
            else:
                segments.append((width, group.offset, group.offset + width))
    return segments


@dataclass
class StepInputs:
    """What the choice needs from the rows, gathered while the model step runs."""

    bias: Bias  # step_bias: -inf where a row may not go, minus its repetition penalty (shared rows + edits)
    sample_rows: torch.Tensor | None  # (n,) greedy and sample rows with a free choice this step: they draw
    sample_cfg: tuple[torch.Tensor, ...]  # their temperature, top_k, top_p and uniform number, (n,) each
    forced_rows: torch.Tensor | None  # (f,) greedy and sample rows whose token is forced
    forced_tokens: torch.Tensor | None  # (f,)
    beam_segments: list[tuple[int, int, int]]  # (beam width, first row, end row) per run of one width
    beam_uniform: list[torch.Tensor]  # per segment (G, BEAM_CANDIDATES · width): each request's noise this step


class ModelBatch:
    """The rows of one ServingModel version, resident on its device."""

    steps_itself = False  # True: `step()` runs the model step and the choice in one (GraphBatch)

    def __init__(self, serving: ServingModel):
        self.serving = serving
        self.device = serving.device
        self.groups: list[RowGroup] = []  # in batch order
        cfg = serving.model.config
        self.tokens = torch.empty(0, dtype=torch.long, device=self.device)  # (R,) next input token per row
        self.state = torch.zeros(cfg.num_layers, 0, cfg.state_dim, device=self.device)  # (L, R, S)
        self.totals = torch.zeros(0, device=self.device)  # (R,) model log-prob of each row's text so far…
        # …but for the last step's log-sum-exp, on greedy and sample rows: they choose without one, and it is
        # paid while the next model step runs (`_pay_lse`). (logits (n, V), row of logits each row owes or -1)
        self.owed: tuple[torch.Tensor, torch.Tensor] | None = None
        self.beam_scores = torch.zeros(0, device=self.device)  # (R,) beam rows: cumulative ranking score
        self.arranged = True  # no group joined, left or finished since the last `arrange`
        self.step_inputs: tuple[torch.Tensor, ...] | None = None  # see `_step_inputs`
        self.num_steps = 0  # steps chosen so far
        self.last: tuple[list[int], list[int] | None] | None = None  # the last step's tokens and parents, on the host
        self.ending: dict[int, list[RowGroup]] = {}  # step count → the groups that end there
        self.owed_index: tuple[int, int, torch.Tensor] | None = None  # `_owed_index`'s last answer
        self.joining: list[RowGroup] = []  # joined since the last step; `arrange` appends their rows

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    def add(self, req: EngineRequest, plan: PoemPlan) -> None:
        """Take the request in: `arrange` appends its rows (zero state, the <form> token as the first input)
        with those of every other request that joins this step, and places them."""
        request = req.request
        k = req.num_rows
        beam = request.mode == "beam"
        last = self.joining[-1] if self.joining else None
        offset = last.offset + last.num_rows if last else self.num_rows
        group = RowGroup(req.req_id, request, plan, self._new_rows(plan, k), make_generator(request.seed),
                         penalty=REPEAT_PENALTY,
                         segment=(RowKind.BEAM, k) if beam else (RowKind.SAMPLE if request.mode == "sample" else RowKind.GREEDY, 1),
                         offset=offset, last_offset=offset, joined=self.num_steps, ends=self.num_steps + plan.num_steps,
                         num_rows=k)
        self.groups.append(group)
        self.joining.append(group)
        self.ending.setdefault(group.ends, []).append(group)
        self.arranged = False

    def _new_rows(self, plan: PoemPlan, k: int) -> list[RowState]:
        """A joining request's k rows at the start of its poem."""
        return [plan.new_row() for _ in range(k)]

    def _append_joining(self) -> None:
        """The rows of the requests that joined since the last step, at the end of the batch, in one go (a
        request at a time, a burst would grow the tensors once per request)."""
        joining, self.joining = self.joining, []
        k = sum(g.num_rows for g in joining)
        starts = [g.plan.start_token for g in joining for _ in range(g.num_rows)]
        # beam: one live beam at the start; the others fill from its candidates
        scores = [0.0 if i == 0 else NEG_INF for g in joining for i in range(g.num_rows)]
        self.tokens = torch.cat([self.tokens, to_device(starts, torch.long, self.device)])
        self.state = torch.cat([self.state, self.serving.model.init_state(k, self.device)], dim=1)
        self.totals = torch.cat([self.totals, torch.zeros(k, device=self.device)])
        self.beam_scores = torch.cat([self.beam_scores, to_device(scores, torch.float32, self.device)])
        if self.owed is not None:
            logits, owes = self.owed
            self.owed = logits, torch.cat([owes, owes.new_full((k,), -1)])

    def remove(self, req_ids: set[str]) -> None:
        """Forget requests that left (cancelled, expired); `arrange` drops their rows."""
        for g in self.groups:
            if g.req_id in req_ids:
                g.ends = -1  # not among `ending` any more
        self.groups = [g for g in self.groups if g.req_id not in req_ids]
        self.arranged = False

    def arrange(self) -> None:
        """Drop the rows of finished groups and put the rest in segment order: at most one gather."""
        if self.arranged:
            return
        self.arranged = True
        if self.joining:
            self._append_joining()
        self.groups = sorted((g for g in self.groups if g.ends > self.num_steps), key=lambda g: (g.segment, g.arrival))
        keep, offset = [], 0
        for g in self.groups:
            keep.extend(range(g.offset, g.offset + g.num_rows))
            g.last_offset = g.offset
            g.offset, offset = offset, offset + g.num_rows
        if keep == list(range(self.num_rows)):
            return
        self._select(to_device(keep, torch.long, self.device))

    def _select(self, index: torch.Tensor) -> None:
        """Keep rows `index` (R',) of the batch tensors, in that order."""
        self.tokens, self.totals, self.beam_scores = self.tokens[index], self.totals[index], self.beam_scores[index]
        self.state = self.state.index_select(1, index)  # (L, R', S)
        if self.owed is not None:
            self.owed = self.owed[0], self.owed[1][index]

    def model_inputs(self, min_rows: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This step's model inputs, padded to P = max(R, min_rows) rows: (tokens (P,), state (L, P, S));
        None when the batch is empty."""
        R = self.num_rows
        if not R:
            return None
        P = max(R, min_rows)
        tokens, state = self._step_inputs(P)
        tokens[:R].copy_(self.tokens)
        state[:, :R].copy_(self.state)
        if P > R:  # pad rows: any token, zero state; their outputs are never read
            tokens[R:].zero_()
            state[:, R:].zero_()
        return tokens, state

    def _step_inputs(self, P: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's input buffers for P rows (engine.model.network.kept_step_inputs: why not the batch's own
        tensors), kept from step to step while P stays."""
        if self.step_inputs is None or self.step_inputs[0].shape[0] != P:
            self.step_inputs = kept_step_inputs(self.serving.model, P)
        return self.step_inputs[0], self.step_inputs[1]

    def catch_up(self) -> StepInputs:
        """Apply the last step's tokens and gather what this step's choice needs."""
        self._pay_lse()
        rows, penalties, sample_rows, sample_cfg, forced_rows, forced_tokens = [], [], [], [], [], []
        uniforms: list[torch.Tensor] = []  # each beam group's noise this step, in batch order
        last, self.last = self.last, None
        for group in self.groups:
            if last is not None and group.joined < self.num_steps:  # it took part in the last step
                group.catch_up(*last)
            group.last_offset = group.offset  # where its rows are in the step now running
            offset, k = group.offset, group.num_rows
            rows.extend(group.rows)
            penalties.extend([group.penalty] * k)
            if group.is_beam:
                # Every step, as the reference decoder draws: the noise is the request's alone.
                uniforms.append(torch.rand(BEAM_CANDIDATES * k, generator=group.generator))
                continue
            forced = group.rows[0].forced()
            if forced is not None:  # punctuation, <eos>, prompt characters: no draw, still a model step
                forced_rows.append(offset)
                forced_tokens.append(forced)
            else:
                sample_rows.append(offset)
                # One uniform per free step from the request's own generator: independent of the batch.
                sample_cfg.append((*draw_params(group.request), float(torch.rand((), generator=group.generator))))
        bias = step_bias(rows, penalties, self.device) if rows else None
        segments = beam_segments(self.groups)
        beam_uniform, taken = [], 0
        for width, a, b in segments:  # each segment's groups' noise, stacked (G, BEAM_CANDIDATES · width)
            n = (b - a) // width
            beam_uniform.append(torch.stack(uniforms[taken:taken + n]))
            taken += n
        tensor = lambda values, dtype=None: torch.tensor(values, dtype=dtype, device=self.device) if values else None  # noqa: E731
        cfg = tuple(torch.tensor(c) for c in zip(*sample_cfg))  # on the CPU: the sampler's arguments
        return StepInputs(bias, tensor(sample_rows), cfg, tensor(forced_rows), tensor(forced_tokens),
                          segments, beam_uniform)

    def _pay_lse(self) -> None:
        """Subtract the last step's log-sum-exp from the totals of the rows that chose without one."""
        if self.owed is None:
            return
        logits, owes = self.owed
        self.owed = None
        lse = logsumexp(logits)  # (n,)
        self.totals = self.totals - torch.where(owes >= 0, lse[owes.clamp(min=0)], 0.0)

    def choose(self, logits: torch.Tensor, state: torch.Tensor, inputs: StepInputs) -> dict[str, PoemResult]:
        """Pick every row's next token from this step's logits (one transfer to the host); returns the poems
        of the requests that chose <eos>, so that the scheduler frees their rows for the next step."""
        device, R = self.device, self.num_rows
        logits = logits[:R].float()  # (R, V) without the padding rows; contiguous
        nb = inputs.beam_segments[0][1] if inputs.beam_segments else R  # rows [nb, R) are beam rows: they rank log-probs
        bias = inputs.bias  # step_bias, built during the model step
        next_tokens = torch.empty(R, dtype=torch.long, device=device)  # (R,)
        if inputs.beam_segments:
            lse_beam = torch.empty(R - nb, device=device)  # their log-sum-exps
            parents = torch.arange(R, device=device)  # (R,) the row each row continues: itself, or a beam's parent
        if inputs.sample_rows is not None:
            next_tokens[inputs.sample_rows] = choose_sample(logits, bias, inputs.sample_rows, *inputs.sample_cfg).to(device)
        for (beam_width, a, b), uniform in zip(inputs.beam_segments, inputs.beam_uniform):
            step, lse = choose_beam(logits[a:b], bias.rows(a, b), self.beam_scores[a:b], beam_width, uniform)
            lse_beam[a - nb:b - nb] = lse.to(device)
            next_tokens[a:b] = step.tokens
            parents[a:b] = step.parents + a
            self.beam_scores[a:b] = step.scores
        if inputs.forced_rows is not None:
            next_tokens[inputs.forced_rows] = inputs.forced_tokens
        # Beam rows continue their parents' state; then the only device → host transfer of the step.
        if inputs.beam_segments:
            state, self.totals = state.index_select(1, parents), self.totals[parents]  # index_select: 5× [:, p]
            gain = logits[parents, next_tokens]  # (R,) the chosen tokens' logits; minus lse = their log-probs
            gain[nb:] -= lse_beam[parents[nb:] - nb]
        else:
            gain = logits.gather(1, next_tokens[:, None])[:, 0]
        self.state = state[:, :R]  # drops the padding rows
        self.totals = self.totals + gain
        if nb:
            self.owed = logits[:nb], self._owed_index(nb, R)
        self.tokens = next_tokens
        # The rows catch up on the host while the next step runs; their totals stay here till they end.
        self.last = next_tokens.tolist(), parents.tolist() if inputs.beam_segments else None
        self.num_steps += 1
        ending = [g for g in self.ending.pop(self.num_steps, ()) if g.ends == self.num_steps]
        if not ending:
            return {}
        self.arranged = False
        index = torch.tensor([g.offset for g in ending], device=device)
        scores = self.totals[index]
        owing = [not g.is_beam for g in ending]  # their totals still owe this step's log-sum-exp
        if any(owing):
            scores = scores - torch.where(torch.tensor(owing, device=device), logsumexp(logits[index]), 0.0)
        for group, score in zip(ending, scores.tolist()):
            group.catch_up(*self.last)
            assert all(r.done for r in group.rows), "every row of a fixed-length form ends on the same step"
            group.score = score
        return {group.req_id: self._result(group, group.rows[0].line_texts, group.rows[0].notes) for group in ending}

    def _owed_index(self, nb: int, R: int) -> torch.Tensor:
        """`owed`'s row index when rows [0, nb) of R owe: 0…nb-1, then -1 for the beam rows."""
        if self.owed_index is None or self.owed_index[:2] != (nb, R):
            self.owed_index = nb, R, torch.cat([torch.arange(nb), torch.full((R - nb,), -1)]).to(self.device)
        return self.owed_index[2]

    def _result(self, group: RowGroup, lines: list[str], notes: list[str]) -> PoemResult:
        """A finished group's poem from its first row's lines and notes (beams are sorted by score)."""
        return PoemResult(poem=group.plan.format_text(lines), lines=lines, form=group.plan.form_name,
                          tune=group.plan.tune and group.plan.tune.name,
                          mode=group.request.mode, model={"name": self.serving.name, "version": self.serving.version},
                          elapsed_ms=(time.perf_counter() - group.started) * 1e3, notes=list(notes),
                          score=group.score)


def _catch_up(batches: list[ModelBatch]) -> list[StepInputs]:
    with torch.inference_mode():  # thread-local: the catch-up thread needs its own
        return [batch.catch_up() for batch in batches]


# Where the rows' decoding state lives: "host" (a RowState per row, in Python), "device" (DeviceRows: tensors
# on the model's device) or "graph" (DeviceRows in fixed slots, each step one CUDA graph on a GPU:
# engine.serving.graph_batch). NOTE: host is the default on a GPU too: measured on an H200, host and device
# rows are both bound by kernel launches (docs/PERFORMANCE.md). A model whose vocabulary writes 词 always
# keeps host rows.
ROW_STATES = ("host", "device", "graph")


def row_state_of(row_state: str, serving: ServingModel) -> str:
    """Where `serving`'s rows keep their state under the ENGINE_ROW_STATE setting `row_state`."""
    return "host" if serving.vocab.writes_ci else row_state


class ModelRunner:
    """All model batches; executes the scheduler's decisions one step at a time."""

    def __init__(self, registry: ModelRegistry, min_batch_rows: int = MIN_BATCH_ROWS, row_state: str = "host"):
        self.registry = registry
        self.min_batch_rows = min_batch_rows
        self.row_state = row_state  # ROW_STATES: where the rows' decoding state lives
        self.batches: dict[int, ModelBatch] = {}  # id(ServingModel) → its batch
        self.req_batch: dict[str, ModelBatch] = {}  # req_id → the batch holding its rows
        self._pool: ThreadPoolExecutor | None = None  # the catch-up thread, started with the first step

    @property
    def num_rows(self) -> int:
        return sum(b.num_rows for b in self.batches.values())

    def reset(self) -> None:
        """Forget every row (after a failed step)."""
        self.batches.clear()
        self.req_batch.clear()

    def close(self) -> None:
        """Stop the catch-up thread (a later step starts a new one)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _new_batch(self, serving: ServingModel) -> ModelBatch:
        row_state = row_state_of(self.row_state, serving)
        if row_state == "graph":
            from engine.serving.graph_batch import GraphBatch

            return GraphBatch(serving, self.min_batch_rows)
        if row_state == "device":
            from engine.serving.device_batch import DeviceBatch

            return DeviceBatch(serving)
        return ModelBatch(serving)

    def graph_status(self) -> list[dict]:
        """Each graph batch's model and version, its layouts kept, graphs captured and capture error."""
        return [{"model": b.serving.name, "version": b.serving.version, "layouts": len(b.slabs),
                 "captured": b.captures, "capture_error": b.capture_error}
                for b in list(self.batches.values()) if b.steps_itself]

    def _serves_now(self, serving: ServingModel) -> bool:
        """Whether new requests for `serving`'s model go to this very version."""
        try:
            return self.registry.get(serving.name) is serving
        except (EngineUnavailableError, RequestError):  # the model went away
            return False

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        finished: dict[str, object] = {}
        # Leave: requests the scheduler dropped (cancelled, expired).
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
                    serving, plan = current, current.make_plan(req.request)
            except Exception as e:  # RequestError: the new version cannot write the prompt; or the model went away
                finished[req.req_id] = e
                continue
            batch = self.batches.get(id(serving))
            if batch is None:
                batch = self.batches[id(serving)] = self._new_batch(serving)
            batch.add(req, plan)
            self.req_batch[req.req_id] = batch
        # Run: every batch's model step, here; meanwhile the rows catch up on the other thread. The inputs
        # are ready before the catch-up starts: each torch call from Python lets go of the GIL, and taking it
        # back from the catch-up's Python could wait milliseconds; the traced step lets go once.
        batches = [b for b in self.batches.values() if not b.steps_itself]
        results, inputs = [], []
        if batches:  # NOTE: graph batches alone hand the other thread nothing (a hand-off costs a GIL switch)
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="yinshi-catch-up")
            model_inputs = []
            for batch in batches:
                batch.arrange()
                model_inputs.append(batch.model_inputs(self.min_batch_rows))
            catching_up = self._pool.submit(_catch_up, batches)
            try:
                results = [(batch, x if x is None else batch.serving.step(*x)) for batch, x in zip(batches, model_inputs)]
            finally:
                inputs = catching_up.result()  # also when a step failed: the batches are the catch-up's till then
        num_rows = num_padded = 0
        for (batch, result), step_inputs in zip(results, inputs):
            if result is None:  # an empty batch (an old version's last rows left): let it go
                del self.batches[id(batch.serving)]
                continue
            num_rows += batch.num_rows
            num_padded += max(batch.num_rows, self.min_batch_rows)
            for req_id, poem in batch.choose(*result, step_inputs).items():
                finished[req_id] = poem
                del self.req_batch[req_id]
        for batch in [b for b in self.batches.values() if b.steps_itself]:
            poems = batch.step()
            if poems is None:  # empty: kept while its version serves (its layouts' graphs with it)
                if not self._serves_now(batch.serving):
                    del self.batches[id(batch.serving)]
                continue
            num_rows += batch.num_rows
            num_padded += batch.num_padded_rows
            for req_id, poem in poems.items():  # the last step's poems (GraphBatch.step)
                finished[req_id] = poem
                del self.req_batch[req_id]
        return RunnerOutput(finished=finished, num_rows=num_rows, num_padded_rows=num_padded)
