"""A model batch whose rows' decoding state lives on the model's device (ENGINE_ROW_STATE=device).

`ModelBatch` (engine/serving/runner.py) keeps a RowState per row in Python and brings every step's tokens to
the host to advance them. `DeviceBatch` keeps the same state as `DeviceRows` tensors beside the recurrent
state, so a step is a fixed number of tensor operations however many rows there are:

    model step on the batch                 (the runner, as for ModelBatch)
    bias from the rows' state               catch_up: DeviceRows.bias, while the model step runs
    choose per segment                      the same choose_sample / choose_beam as ModelBatch
    beams take their parents' state, every row advances by its token      DeviceRows.take, advance
    the host reads only the rows of the poems that end this step

Poems are the ones ModelBatch writes for the same requests and seeds (tests/test_device_rows.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.api import PoemResult
from engine.poem.constraints import PoemPlan
from engine.poem.device_rows import (
    TMAX,
    DeviceRows,
    FormulaTable,
    KnownTable,
    device_tables,
)
from engine.sampling.choice import (
    BEAM_CANDIDATES,
    Bias,
    choose_beam,
    choose_sample,
    draw_params,
    logsumexp,
)
from engine.serving.registry import ServingModel
from engine.serving.runner import ModelBatch, beam_segments, to_device


class DeviceStep:
    """What a DeviceBatch's choice needs, made while the model step runs."""

    def __init__(self, bias: tuple[torch.Tensor, torch.Tensor] | None, nb: int, beam_segments: list[tuple[int, int, int]]):
        self.bias, self.bent = bias or (None, None)  # (R, V) and (R,): DeviceRows.bias
        self.nb = nb  # rows [0, nb) are greedy and sample rows; the rest are beam rows
        self.beam_segments = beam_segments  # (beam width, first row, end row) per run of one width


@dataclass
class Decision:
    """One step's choice for every row, and the state each row goes on with."""

    tokens: torch.Tensor  # (R,) long: the token each row took (its next input)
    state: torch.Tensor  # (L, R, S): the recurrent state, beams' taken from their parents
    totals: torch.Tensor  # (R,) model log-prob of each row's text so far
    rows: DeviceRows  # advanced by `tokens` (beams' first take their parents' state)


def decide(logits: torch.Tensor, state: torch.Tensor, rows: DeviceRows, bias: torch.Tensor, bent: torch.Tensor, nb: int,
           segments: list[tuple[int, int, int]], beam_scores: torch.Tensor, totals: torch.Tensor) -> Decision:
    """Choose every row's token from its logits (R, V) and `bias` (DeviceRows.bias): greedy and sample rows
    [0, nb) draw, each run of beam rows of one width (`segments`) takes a beam step, whose scores are written
    into `beam_scores` in place; then every row advances. `state` (L, ≥R, S) may hold padding rows after R.
    NOTE: no value goes to the host and every shape is fixed by (R, nb, segments), so a CUDA graph can
    capture it (engine.serving.graph_batch)."""
    device, R = logits.device, logits.shape[0]
    next_tokens = torch.empty(R, dtype=torch.long, device=device)
    lse = torch.empty(R, device=device)
    parents = torch.arange(R, device=device)
    pos = rows.pos.clamp(max=TMAX - 1)  # a padding row's position runs on; a poem's never passes its <eos>
    if nb:
        draw = rows.draws[:nb].gather(1, pos[:nb, None])[:, 0]
        next_tokens[:nb] = choose_sample(logits[:nb], Bias.of_dense(bias[:nb]), torch.arange(nb, device=device),
                                         rows.temperature[:nb], rows.top_k[:nb], rows.top_p[:nb], draw).to(device)
        lse[:nb] = logsumexp(logits[:nb]).to(device)
    for width, a, b in segments:
        first = torch.arange(a, b, width, device=device)  # each request's first row: its numbers this step
        uniform = rows.beam_draws[first, pos[first], :BEAM_CANDIDATES * width]
        step, beam_lse = choose_beam(logits[a:b], Bias.of_dense(bias[a:b]), beam_scores[a:b], width, uniform)
        lse[a:b] = beam_lse.to(device)
        next_tokens[a:b] = step.tokens.to(device)
        parents[a:b] = step.parents.to(device) + a
        beam_scores[a:b] = step.scores.to(device)
    if segments:
        state, totals = state.index_select(1, parents), totals[parents]
        rows = rows.take(parents)
    totals = totals + (logits[parents, next_tokens] - lse[parents])
    rows.advance(next_tokens, bent[parents])
    return Decision(next_tokens, state[:, :R], totals, rows)


class DeviceBatch(ModelBatch):
    """The rows of one ServingModel version and their decoding state, all resident on its device."""

    def __init__(self, serving: ServingModel):
        super().__init__(serving)
        self.tables = device_tables(serving.prosody, self.device)
        self.formulas = FormulaTable.of(serving.formulas, len(serving.vocab), self.device)
        self.known = KnownTable.of(serving.known_lines, self.device)
        self.rows = DeviceRows.empty(self.tables, self.formulas, self.known)

    def _new_rows(self, plan: PoemPlan, k: int) -> list:
        """None on the host: `_append_joining` makes the rows as DeviceRows."""
        if plan.tune is not None:
            raise ValueError("a DeviceBatch writes the regular forms; a 词 needs a ModelBatch")
        return []

    def _append_joining(self) -> None:
        joining = self.joining
        super()._append_joining()
        new = [(g.plan, g.num_rows, g.penalty, draw_params(g.request) if not g.is_beam else (1.0, 0, 1.0),
                g.generator, BEAM_CANDIDATES * g.num_rows if g.is_beam else 0) for g in joining]
        self.rows = self.rows.cat(DeviceRows.new(self.tables, self.formulas, self.known, new))

    def _select(self, index: torch.Tensor) -> None:
        super()._select(index)
        self.rows = self.rows.select(index)

    def catch_up(self) -> DeviceStep:
        """This step's bias from the rows' state (nothing to catch up: the state advanced on the device)."""
        for group in self.groups:
            group.last_offset = group.offset
        segments = beam_segments(self.groups)
        nb = segments[0][1] if segments else self.num_rows  # rows [nb, R) are beam rows
        return DeviceStep(self.rows.bias() if self.num_rows else None, nb, segments)

    def choose(self, logits: torch.Tensor, state: torch.Tensor, inputs: DeviceStep) -> dict[str, PoemResult]:
        R = self.num_rows
        d = decide(logits[:R].float(), state, self.rows, inputs.bias, inputs.bent, inputs.nb, inputs.beam_segments,
                   self.beam_scores, self.totals)
        self.tokens, self.state, self.totals, self.rows = d.tokens, d.state, d.totals, d.rows
        self.num_steps += 1
        ending = [g for g in self.ending.pop(self.num_steps, ()) if g.ends == self.num_steps]
        if not ending:
            return {}
        self.arranged = False
        return self._ended(ending, self.rows, self.totals)

    def _ended(self, ending: list, rows: DeviceRows, totals: torch.Tensor) -> dict[str, PoemResult]:
        """The poems of the groups that chose <eos> this step (each group's row `offset` is its best)."""
        # The one transfer to the host.
        return self._poems(ending, self._ended_rows(ending, rows, totals).tolist())

    def _ended_rows(self, ending: list, rows: DeviceRows, totals: torch.Tensor) -> torch.Tensor:
        """(n, TMAX + 2) float64 on the device: each ending group's text, flag and score (token ids are exact in
        float64)."""
        index = to_device([g.offset for g in ending], torch.long, self.device)
        return torch.cat([rows.history[index].double(), rows.flags[index, None].double(),
                          totals[index, None].double()], dim=1)

    def _poems(self, ending: list, ended: list[list[float]]) -> dict[str, PoemResult]:
        """The ending groups' poems from their `_ended_rows`, on the host."""
        results = {}
        for group, row in zip(ending, ended):
            group.score = row[-1]
            tokens = [int(t) for t in row[:group.plan.layout.text_len]]
            results[group.req_id] = self._result(group, *DeviceRows.result(group.plan, tokens, bool(row[-2])))
        return results
