"""A model batch whose rows sit in fixed slots, so that a whole step is one CUDA graph (ENGINE_ROW_STATE=graph).

DeviceBatch keeps the rows' decoding state on the device, but gathers its tensors anew whenever a request joins
or leaves and launches a step's couple of hundred small kernels one by one: on a GPU those launches, not the
model, bound the step (docs/PERFORMANCE.md). A GraphBatch keeps every tensor of its rows in buffers of a fixed
size, laid out by a `SlotLayout`:

    [ greedy and sample rows | beam groups of width w1, w1 rows each | beam groups of width w2 | … ]

Each region holds a power of two of slots (of groups, for beams). A free slot holds a padding row
(DeviceRows.padding), which steps like any other row and is never read. A joining request takes free slots and a
finished one frees its own; the layout and its buffers change only when a region outgrows its size (regions
never shrink while the batch runs; an empty batch starts afresh). So a layout's step (model step, bias,
choice, advance: `device_batch.decide`) has fixed shapes at fixed addresses: on a GPU it is captured once as
a CUDA graph and then replayed, one launch a step. Host and device exchange only the joining rows and the
finished poems.

    arrange     free the slots of the requests that left or ended, place the joining ones (one index_copy
                per dtype: `Packing`); a new layout when a region no longer fits (one gather into its buffers)
    step        replay the layout's graph; on a CPU, and for a layout's first steps, the same function eagerly
    ended       the finished rows' text, flag and score: one transfer, read on the next step (`_read_later`)

Poems are the ones the other batches write for the same requests and seeds (tests/test_device_rows.py): every
operation is row-local (beam search: group-local), so neither a row's slot nor its padded neighbours change it.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch

from engine.api import PoemResult
from engine.poem.device_rows import DeviceRows
from engine.sampling.choice import BEAM_CANDIDATES, draw_params
from engine.serving.device_batch import DeviceBatch, decide
from engine.serving.registry import ServingModel
from engine.serving.runner import RowGroup, moved, to_device

log = logging.getLogger(__name__)

NEG_INF = float("-inf")
MAX_LAYOUTS = 16  # layouts whose buffers (and graph) a batch keeps; the least recently used goes first
# Eager steps before a capture: the batch's first layout GRAPH_WARMUP (NOTE: lazy CUDA set-up must not fall inside
# a capture), each later one LAYOUT_WARMUP (its shapes may pick other kernels, loaded on first use).
GRAPH_WARMUP = 2
LAYOUT_WARMUP = 1


def bucket(n: int) -> int:
    """The region size for n slots: the next power of two (0 for none)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def refit(size: int, need: int) -> int:
    """A region's size for `need` slots, given its size now: kept while it fits, else the bucket of `need`.
    NOTE: never smaller while the batch runs: every change of any region is a new layout, a new graph to
    capture (with mixed beam widths a shrinking rule recaptured every few steps); an emptied batch starts
    afresh."""
    return size if need <= size else bucket(need)


@dataclass(frozen=True)
class SlotLayout:
    """Where a batch's rows sit: `sample` slots for greedy and sample rows, then per beam width (ascending)
    `groups` groups of `width` rows."""

    sample: int
    beams: tuple[tuple[int, int], ...] = ()  # (width, groups)

    @property
    def num_rows(self) -> int:
        return self.sample + sum(w * g for w, g in self.beams)

    def segments(self) -> list[tuple[int, int, int]]:
        """(width, first row, end row) per beam region: what `decide` takes."""
        out, a = [], self.sample
        for width, groups in self.beams:
            out.append((width, a, a + width * groups))
            a += width * groups
        return out

    def region(self, key: int) -> tuple[int, int]:
        """(first row, end row) of a region: `key_of`'s key, 0 for the greedy and sample rows."""
        if key == 0:
            return 0, self.sample
        return next((a, b) for w, a, b in self.segments() if w == key)

    @classmethod
    def fit(cls, now: SlotLayout | None, need: dict[int, int], min_rows: int) -> SlotLayout:
        """The layout for `need` (region key → slots: 0 for greedy and sample rows, w for beam groups of width
        w), from the one `now` (None: none yet); at least `min_rows` rows in all, padded in the sample region."""
        sizes = ({0: now.sample} | dict(now.beams)) if now else {}
        fitted = {key: refit(sizes.get(key, 0), need.get(key, 0)) for key in {*need, *sizes}}
        beams = tuple(sorted((w, g) for w, g in fitted.items() if w and g))
        return cls(max(fitted.get(0, 0), min_rows - sum(w * g for w, g in beams)), beams)

    def pad_score(self, slot: int) -> float:
        """A free slot's beam score: a beam group's first row 0, the others -inf (one live beam, as a request
        starts), any other slot 0."""
        for width, a, b in self.segments():
            if a <= slot < b:
                return 0.0 if (slot - a) % width == 0 else NEG_INF
        return 0.0


def key_of(group: RowGroup) -> int:
    """A group's region: 0 for greedy and sample, its width for beam."""
    return group.num_rows if group.is_beam else 0


@dataclass(frozen=True)
class Packing:
    """Where each tensor of a DeviceRows sits in one buffer per dtype, a row of columns per row, so that rows
    move (joining, a new layout) in one copy per dtype instead of one per tensor. NOTE: on a GPU every copy
    is a launch, and launches are what a step's time went to."""

    fields: tuple[tuple[str, torch.dtype, int, int, tuple[int, ...]], ...]  # name, dtype, first column, columns, shape
    widths: tuple[tuple[torch.dtype, int], ...]  # columns per dtype

    @classmethod
    def of(cls, rows: DeviceRows) -> Packing:
        fields, widths = [], {}
        for name in rows._tensors():
            t = getattr(rows, name)
            shape, start = tuple(t.shape[1:]), widths.get(t.dtype, 0)
            fields.append((name, t.dtype, start, math.prod(shape), shape))
            widths[t.dtype] = start + math.prod(shape)
        return cls(tuple(fields), tuple(widths.items()))

    def pack(self, rows: DeviceRows) -> dict[torch.dtype, torch.Tensor]:
        """The rows' tensors side by side: (n, columns) per dtype."""
        parts: dict[torch.dtype, list[torch.Tensor]] = {}
        for name, dtype, _, width, _ in self.fields:
            parts.setdefault(dtype, []).append(getattr(rows, name).reshape(rows.num_rows, width))
        return {dtype: torch.cat(ts, dim=1) for dtype, ts in parts.items()}

    def views(self, buffers: dict[torch.dtype, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each tensor of the rows as a view of its dtype's buffer (P, columns)."""
        return {name: buffers[dtype][:, a:a + width].view(-1, *shape) for name, dtype, a, width, shape in self.fields}


@dataclass
class Slab:
    """One layout's buffers, at fixed addresses, and its captured step."""

    layout: SlotLayout
    tokens: torch.Tensor  # (P,) long: each slot's next input
    state: torch.Tensor  # (L, P, S)
    totals: torch.Tensor  # (P,) model log-prob of each row's text so far
    beam_scores: torch.Tensor  # (P,)
    buffers: dict[torch.dtype, torch.Tensor]  # (P, columns) per dtype: the rows' tensors (Packing)
    tensors: dict[str, torch.Tensor]  # the rows' tensors by name, views of `buffers`: what the graph writes
    rows: DeviceRows  # P rows, whose tensors are `tensors`
    graph: object = None  # torch.cuda.CUDAGraph once captured
    warm: int = 0  # eager steps run so far

    def restore(self) -> None:
        """Point `rows` at the slab's own tensors again (advance and take rebind some)."""
        for name, tensor in self.tensors.items():
            setattr(self.rows, name, tensor)


class GraphBatch(DeviceBatch):
    """The rows of one ServingModel version in fixed slots on its device; each step one graph replay."""

    steps_itself = True

    def __init__(self, serving: ServingModel, min_rows: int, graphs: bool | None = None):
        super().__init__(serving)
        self.min_rows = min_rows  # see runner.MIN_BATCH_ROWS: a CPU's BLAS is batch-invariant from 16 rows
        self.graphs = serving.device.type == "cuda" if graphs is None else graphs  # capture CUDA graphs
        self.pad_token = serving.vocab.eos_id
        pad = DeviceRows.padding(self.tables, self.formulas, self.known, 1, self.pad_token, host=True)
        self.packing = Packing.of(pad)
        self.pad_host = self.packing.pack(pad)  # one padding row, (1, columns) per dtype
        self.pad_device = {dtype: t.to(self.device) for dtype, t in self.pad_host.items()}
        self.slabs: OrderedDict[SlotLayout, Slab] = OrderedDict()  # most recently used last
        self.slab: Slab | None = None
        self.occupant: list[RowGroup | None] = []  # per slot of the current layout
        self.captures = 0  # graphs captured (engine status)
        self.capture_error: str | None = None  # why capturing failed; the batch then steps eagerly
        self.reading: tuple | None = None  # the last step's ended rows, on their way to the host (_read_later)
        # NOTE: warm-up and capture on one stream: set-up done once per stream (cuBLAS workspaces) then happens
        # before the capture, not in it.
        self.stream = torch.cuda.Stream(self.device) if self.graphs else None

    @property
    def num_rows(self) -> int:
        """Rows of live requests (padding excluded)."""
        return sum(g.num_rows for g in self.groups)

    @property
    def num_padded_rows(self) -> int:
        return self.slab.layout.num_rows if self.slab else 0

    # --- where rows sit ------------------------------------------------------------------------------------

    def arrange(self) -> None:
        """Free the slots of the requests that left or ended, and place those that joined (see the module
        docstring)."""
        if self.arranged:
            return
        self.arranged = True
        self.groups = [g for g in self.groups if g.ends > self.num_steps]
        live = {id(g) for g in self.groups}
        joining, self.joining = [g for g in self.joining if id(g) in live], []  # not those that left at once
        freed = []
        for slot, group in enumerate(self.occupant):
            if group is not None and id(group) not in live:
                self.occupant[slot] = None
                freed.append(slot)
        if not self.groups:  # the next request starts from padding (the layouts' buffers and graphs stay)
            self.slab, self.occupant = None, []
            return
        need: dict[int, int] = {}
        for g in self.groups:
            need[key_of(g)] = need.get(key_of(g), 0) + 1
        layout = SlotLayout.fit(self.slab.layout if self.slab else None, need, self.min_rows)
        if self.slab is None or layout != self.slab.layout:
            joined = {id(g) for g in joining}
            self._relayout(layout, [g for g in self.groups if id(g) not in joined])
            freed = []  # the new layout's free slots hold padding already
        self._place(joining, freed)

    def _slab(self, layout: SlotLayout) -> Slab:
        """The buffers of `layout`, made on first use (unfilled: `_relayout` writes every slot); the least
        recently used dropped past MAX_LAYOUTS."""
        slab = self.slabs.pop(layout, None)
        if slab is None:
            P, device = layout.num_rows, self.device
            buffers = {dtype: torch.empty((P, width), dtype=dtype, device=device) for dtype, width in self.packing.widths}
            tensors = self.packing.views(buffers)
            rows = replace(DeviceRows.new(self.tables, self.formulas, self.known, [], host=True), **tensors)
            slab = Slab(layout, tokens=torch.empty(P, dtype=torch.long, device=device),
                        state=self.state.new_empty(self.state.shape[0], P, self.state.shape[2]),  # (L, P, S)
                        totals=torch.empty(P, device=device), beam_scores=torch.empty(P, device=device),
                        buffers=buffers, tensors=tensors, rows=rows)
            while len(self.slabs) >= MAX_LAYOUTS:
                self.slabs.popitem(last=False)
        self.slabs[layout] = slab
        return slab

    def _pad_scores(self, layout: SlotLayout) -> torch.Tensor:
        """Beam scores of an empty layout (SlotLayout.pad_score)."""
        return to_device([layout.pad_score(s) for s in range(layout.num_rows)], torch.float32, self.device)

    def _relayout(self, layout: SlotLayout, staying: list[RowGroup]) -> None:
        """Move the staying groups into `layout`'s buffers (their slots in order of region), padding elsewhere."""
        old, new = self.slab, self._slab(layout)
        P = layout.num_rows
        pad_source = old.layout.num_rows if old else 0  # the row index of the padding appended to the source
        index = [pad_source] * P
        occupant: list[RowGroup | None] = [None] * P
        taken = {key: 0 for key in [0, *(w for w, _ in layout.beams)]}
        for g in sorted(staying, key=lambda g: g.offset):
            key = key_of(g)
            a, _ = layout.region(key)
            slot = a + taken[key] * g.num_rows
            taken[key] += 1
            index[slot:slot + g.num_rows] = range(g.offset, g.offset + g.num_rows)
            occupant[slot:slot + g.num_rows] = [g] * g.num_rows
            g.offset = g.last_offset = slot
        if old is not None and staying:
            idx = to_device(index, torch.long, self.device)
            for dtype, buffer in new.buffers.items():
                buffer.copy_(torch.cat([old.buffers[dtype], self.pad_device[dtype]])[idx])
            pad_scores = self._pad_scores(layout)
            keep = idx < pad_source
            clamped = idx.clamp(max=max(pad_source - 1, 0))
            new.tokens.copy_(torch.where(keep, old.tokens[clamped], self.pad_token))
            new.state.copy_(torch.where(keep[None, :, None], old.state[:, clamped], 0.0))
            new.totals.copy_(torch.where(keep, old.totals[clamped], 0.0))
            new.beam_scores.copy_(torch.where(keep, old.beam_scores[clamped], pad_scores))
        else:  # nothing stays: a fresh start (every slot padding)
            for dtype, buffer in new.buffers.items():
                buffer.copy_(self.pad_device[dtype].expand_as(buffer))
            new.tokens.fill_(self.pad_token)
            new.state.zero_()
            new.totals.zero_()
            new.beam_scores.copy_(self._pad_scores(layout))
        self.slab, self.occupant = new, occupant

    def _place(self, joining: list[RowGroup], freed: list[int]) -> None:
        """Put the joining groups into free slots and padding into the freed slots nobody takes, in one write
        per buffer."""
        layout, slab = self.slab.layout, self.slab
        free_at: dict[int, list[int]] = {}
        for key in [0, *(w for w, _ in layout.beams)]:
            a, b = layout.region(key)
            width = max(key, 1)
            free_at[key] = [s for s in range(a, b, width) if self.occupant[s] is None]
        slots, tokens, scores = [], [], []
        new = []
        for g in joining:
            slot = free_at[key_of(g)].pop(0)
            g.offset = g.last_offset = slot
            self.occupant[slot:slot + g.num_rows] = [g] * g.num_rows
            slots.extend(range(slot, slot + g.num_rows))
            tokens.extend([g.plan.start_token] * g.num_rows)
            scores.extend([0.0] + [NEG_INF] * (g.num_rows - 1) if g.is_beam else [0.0])
            new.append((g.plan, g.num_rows, g.penalty, draw_params(g.request) if not g.is_beam else (1.0, 0, 1.0),
                        g.generator, BEAM_CANDIDATES * g.num_rows if g.is_beam else 0))
        reset = [s for s in freed if self.occupant[s] is None]
        slots.extend(reset)
        tokens.extend([self.pad_token] * len(reset))
        scores.extend(layout.pad_score(s) for s in reset)
        if not slots:
            return
        packed = self.packing.pack(DeviceRows.new(self.tables, self.formulas, self.known, new, host=True))
        index = to_device(slots, torch.long, self.device)
        for dtype, buffer in slab.buffers.items():
            values = torch.cat([packed[dtype], self.pad_host[dtype].expand(len(reset), -1)])
            buffer.index_copy_(0, index, moved(values, self.device))
        slab.tokens.index_copy_(0, index, to_device(tokens, torch.long, self.device))
        slab.state.index_fill_(1, index, 0.0)
        slab.totals.index_fill_(0, index, 0.0)
        slab.beam_scores.index_copy_(0, index, to_device(scores, torch.float32, self.device))

    # --- the step ------------------------------------------------------------------------------------------

    def step(self) -> dict[str, PoemResult] | None:
        """One step of every row; the poems of the requests that chose <eos> on the step before (see
        `_read_later`). None when the batch is empty and owes no poems."""
        self.arrange()
        reading = None
        if self.groups:
            slab = self.slab
            if self.graphs and self.capture_error is None:
                self._replay(slab)
            else:
                self._body(slab)
            self.num_steps += 1
            ending = [g for g in self.ending.pop(self.num_steps, ()) if g.ends == self.num_steps]
            if ending:
                self.arranged = False
                reading = self._read_later(ending, slab)
        owed, self.reading = self.reading, reading
        if owed is None:
            return {} if self.groups or reading else None
        groups, ended, done = owed
        if done is not None:
            done.synchronize()
        kept = [(g, row) for g, row in zip(groups, ended.tolist()) if g.ends != -1]  # not those that left since
        return self._poems([g for g, _ in kept], [row for _, row in kept])

    def _read_later(self, ending: list[RowGroup], slab: Slab) -> tuple:
        """Start copying the ending groups' rows to the host; the next step reads them. NOTE: on a GPU the copy
        is queued behind this step and ahead of the next, so the host goes on to the next step at once and
        waits only for the copy, while the device runs that step: host and device overlap on the steps
        where poems end too. Their slots are free at once (the copy is ordered before any write to them)."""
        rows = self._ended_rows(ending, slab.rows, slab.totals)
        if self.device.type != "cuda":
            return ending, rows, None
        host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
        host.copy_(rows, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))  # the copy's stream (not the current device's)
        return ending, host, done

    def remove(self, req_ids: set[str]) -> None:
        """Forget requests that left, also one whose poem is on its way."""
        super().remove(req_ids)
        for g in self.reading[0] if self.reading else ():
            if g.req_id in req_ids:
                g.ends = -1

    def _body(self, slab: Slab) -> None:
        """The step on the slab's buffers, every result written back into them (what a graph replays)."""
        try:
            rows = slab.rows
            logits, state = self.serving.step(slab.tokens, slab.state)
            bias, bent = rows.bias()
            d = decide(logits.float(), state, rows, bias, bent, slab.layout.sample, slab.layout.segments(),
                       slab.beam_scores, slab.totals)
            slab.tokens.copy_(d.tokens)
            slab.state.copy_(d.state)
            slab.totals.copy_(d.totals)
            for name in DeviceRows.DYNAMIC:
                tensor = getattr(d.rows, name)
                if tensor is not slab.tensors[name]:
                    slab.tensors[name].copy_(tensor)
        finally:
            slab.restore()

    def _replay(self, slab: Slab) -> None:
        """The step as the layout's CUDA graph: its first steps eagerly on the batch's stream (GRAPH_WARMUP,
        LAYOUT_WARMUP), then captured there and replayed. A capture that fails is logged once; the batch steps
        eagerly from then on."""
        current = torch.cuda.current_stream(self.device)
        if slab.graph is None and slab.warm < (LAYOUT_WARMUP if self.captures else GRAPH_WARMUP):
            self.stream.wait_stream(current)
            with torch.cuda.stream(self.stream):
                self._body(slab)
            current.wait_stream(self.stream)
            slab.warm += 1
            return
        if slab.graph is None:
            graph = torch.cuda.CUDAGraph()
            try:
                # NOTE: thread_local: the registry's loader thread may use the device while this thread captures.
                with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                    self._body(slab)
            except Exception as e:  # noqa: BLE001  NOTE: a step that cannot be captured still runs eagerly
                # A failed capture can leave this thread on the capture stream (torch restores it only after a
                # capture that ends well): back to the step loop's stream, and nothing of the capture pending.
                torch.cuda.set_stream(current)
                torch.cuda.synchronize(self.device)
                self.capture_error = f"{type(e).__name__}: {e}"[:300]
                log.warning("model %s: the step could not be captured as a CUDA graph (%s); stepping eagerly",
                            self.serving.name, self.capture_error)
                self._body(slab)
                return
            slab.graph = graph
            self.captures += 1
        slab.graph.replay()
