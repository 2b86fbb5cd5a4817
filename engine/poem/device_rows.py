"""RowState's rules for a whole batch of rows, as tensors on the model's device.

A `RowState` (engine.poem.constraints) advances in Python, one row and one token at a time. On a GPU that
host work, not the model, bounds the step. `DeviceRows` holds the same state for every row of a batch as
tensors (position, character counts, tone and rhyme state, the text so far). It turns that state into the
step's bias, and the chosen tokens back into state, with a fixed number of tensor operations however many
rows there are. The host reads a row only when its poem ends:

    rows = DeviceRows.new(tables, formulas, known, [(plan, num_rows, penalty, draw_params, generator, beam_draws), ...])
    bias, bent = rows.bias()        # (R, V): what step_bias gives the same rows, as a dense tensor; (R,) rules bent
    ... choose the tokens ...
    rows = rows.take(parents)       # beams continue their parents (dynamic state only)
    rows.advance(tokens, bent[parents])
    DeviceRows.result(plan, tokens, flagged)  # a finished row's lines and notes, on the host

Regular forms only: one rhyme set of 平水韵. A 词 tune keeps the host RowState (its rhyme sets, links and
refrains). The rules and relaxations are RowState's, so a request writes the same poem either way
(tests/test_device_rows.py compares them). Notes are not worded on the device. A row on which a rule bent
carries a flag, and the host replays that row's finished text through a RowState to word them.

The random numbers a request draws are drawn when it joins, from its own generator and in the order the
host path draws them one step at a time (a CPU generator's `rand(n)` is n single draws in a row). A row
then finds this step's numbers by its position, and no step waits on the host.
"""

from __future__ import annotations

import functools
from array import array
from dataclasses import dataclass, fields, replace

import torch

from engine.api import MAX_BEAM_WIDTH
from engine.poem.constraints import (
    BOTH,
    MASK_HAN,
    MASK_LEVEL,
    MASK_OBLIQUE,
    MASK_TONED,
    MASK_OBLIQUE_END,
    RHYME_BASE,
    PoemPlan,
    mask_tables,
)
from engine.poem.forms import FORMS, PERIOD, Layout
from engine.poem.known_lines import BASES, MIN_LEN, MODULI
from engine.poem.prosody import rhyme_book
from engine.poem.rhymes import LEVEL, OBLIQUE
from engine.sampling.choice import BEAM_CANDIDATES, FORMULA_PENALTY

NEG_INF = float("-inf")
TMAX = max(f.text_len for f in FORMS.values()) + 1  # positions of the longest form, <eos> included
LMAX = max(f.num_lines for f in FORMS.values())  # lines of the longest form
NMAX = max(f.line_len for f in FORMS.values())  # characters in the longest line
SPAN = 4  # a formula's length (engine.sampling.formulas)
BEAM_DRAWS = BEAM_CANDIDATES * MAX_BEAM_WIDTH  # uniform numbers a beam request draws per step, at most
# The array type code of each plan field DeviceRows.new gathers per row: long "q", bool "B", float32 "f".
_ROW_CODES = {"forced": "q", "plan_forced": "B", "han": "B", "tone_l": "q", "tone_o": "q", "rhyme_pos": "B",
              "first_rhyme": "B", "first_groups": "B", "col": "q", "line_of": "q", "line_pos": "q", "line_len": "q",
              "quotes_banned": "B", "eligible": "B", "penalty": "f", "temperature": "f", "top_k": "q", "top_p": "f",
              "starts": "q"}


@dataclass
class DeviceTables:
    """One vocabulary's constraint tables on one device (cached in the prosody's cache)."""

    fixed: torch.Tensor  # (RHYME_BASE, V) bool: MaskTables' fixed rows (none, Han, 平, 仄, toned, 仄 line end)
    tone_row: torch.Tensor  # (4,) long: the fixed row for a required tone 0, 平, 仄, 平 or 仄
    tones: torch.Tensor  # (V,) long: LEVEL | OBLIQUE bits per token
    groups: torch.Tensor  # (G, V) float: 平水韵 group g holds token v (float: "any of these groups" is a matmul)
    token_groups: torch.Tensor  # (V, G) bool
    open_groups: torch.Tensor  # (G,) bool: the groups a first rhyme may open (every level group)
    vocab_ids: torch.Tensor  # (V,) long: 0 … V-1


def device_tables(prosody, device) -> DeviceTables:
    key = ("device_rows", str(device))
    tables = prosody.cache.get(key)
    if tables is None:
        masks = mask_tables(prosody)
        book = rhyme_book(prosody, None, "pingshui")
        opened = masks.groups_of_tone(book, LEVEL)
        tone_row = torch.tensor([MASK_HAN, MASK_LEVEL, MASK_OBLIQUE, MASK_TONED])
        tables = prosody.cache[key] = DeviceTables(
            fixed=torch.stack(masks.rows[:RHYME_BASE]).to(device), tone_row=tone_row.to(device),
            tones=torch.tensor(prosody.tones, dtype=torch.long, device=device),
            groups=book.matrix.float().to(device), token_groups=book.matrix.T.contiguous().to(device),
            # NOTE: dtype given: with no level groups at all the list is empty, and an empty tensor is float.
            open_groups=torch.tensor([g in opened for g in range(len(book.groups))], dtype=torch.bool, device=device),
            vocab_ids=torch.arange(prosody.vocab_size, device=device))
    return tables


@dataclass
class FormulaTable:
    """A model's formulas (engine.sampling.formulas) as sorted keys of their first three tokens."""

    keys: torch.Tensor  # (F,) long: t0·V² + t1·V + t2, ascending
    completions: torch.Tensor  # (F, C) long: the tokens completing each key, -1 where none

    @classmethod
    def of(cls, formulas, vocab_size: int, device) -> FormulaTable | None:
        next_of = getattr(formulas, "next_of", None)
        if not next_of:
            return None
        V = vocab_size
        items = sorted(((a * V + b) * V + c, comps) for (a, b, c), comps in next_of.items())
        width = max(len(comps) for _, comps in items)
        completions = [list(comps) + [-1] * (width - len(comps)) for _, comps in items]
        return cls(torch.tensor([k for k, _ in items], device=device), torch.tensor(completions, device=device))


@dataclass
class KnownTable:
    """A model's known lines (engine.poem.known_lines.VocabLines) on its device."""

    keys: torch.Tensor  # (N,) long, ascending
    last_tokens: torch.Tensor  # (N,) int32: the token ending each line, -1 where the vocabulary lacks it
    codes: torch.Tensor  # (V,) long: each token's code point (-1 for marks and special tokens)
    width: int  # the most lines sharing one key
    bases: torch.Tensor  # (2,) long: key_of's two hashes, side by side
    moduli: torch.Tensor  # (2,) long

    @classmethod
    def of(cls, known, device) -> KnownTable | None:
        """The table on `device`, copied there once per VocabLines (tens of MB: not once per batch)."""
        if known is None or not len(known.keys):
            return None
        table = known.on_device.get(str(device))
        if table is None:
            keys, last_tokens, codes = known.tensors
            table = known.on_device[str(device)] = cls(
                keys.to(device), last_tokens.to(device), codes.to(device), known.width,
                torch.tensor(BASES, device=device), torch.tensor(MODULI, device=device))
        return table


def _flags(n: int, at) -> bytearray:
    """n bytes, 1 at the indices `at` (a set, dict or tuple of them), else 0: a row of a bool field."""
    out = bytearray(n)
    for i in at:
        out[i] = 1
    return out


@functools.cache
def _layout_rows(layout: Layout, comma_id: int, period_id: int, eos_id: int) -> dict:
    """A form's per-position tables, padded to TMAX positions (LMAX × NMAX for the lines)."""
    marks = [-1] * TMAX
    for line, n in enumerate(layout.line_lengths):
        marks[layout.starts[line] + n] = period_id if layout.marks[line] == PERIOD else comma_id
    marks[layout.text_len] = eos_id
    pad = TMAX - layout.text_len
    col = list(layout.col_of) + [0] * pad
    line_of = list(layout.line_of) + [0] * pad
    n = layout.line_lengths[0]  # a regular form's lines are all of one length
    line_pos = [[layout.starts[i] + c if i < layout.num_lines and c < n else 0 for c in range(NMAX)]
                for i in range(LMAX)]
    # Shared by every call (cached): tuples and bytes, so that nothing can change them.
    return {"marks": tuple(marks), "col": tuple(col), "line_of": tuple(line_of),
            "line_pos": tuple(p for line in line_pos for p in line), "line_len": n,
            "han": bytes(_flags(TMAX, layout.han_positions))}


@dataclass
class DeviceRows:
    """R rows' decoding state; every tensor's first dimension is the row. See the module docstring."""

    tables: DeviceTables
    formulas: FormulaTable | None
    known: KnownTable | None  # the corpus lines no line may complete (rows whose plan has known_lines)
    # The plan, per row (the same for every row of a request):
    forced: torch.Tensor  # (R, TMAX) long: the token position p must hold (marks, <eos>, prompt…), -1 if free
    plan_forced: torch.Tensor  # (R, TMAX) bool: p holds a prompt, acrostic or keyword character
    han: torch.Tensor  # (R, TMAX) bool: p holds a Han character
    tone_l: torch.Tensor  # (R, TMAX) long: the tone p needs when s is 平 (0: none)
    tone_o: torch.Tensor  # (R, TMAX) long: … when s is 仄
    rhyme_pos: torch.Tensor  # (R, TMAX) bool: p ends a rhyming line (and the rhyme rule is on)
    first_rhyme: torch.Tensor  # (R, TMAX) bool: p ends line 1, which may rhyme (PoemPlan.first_rhyme)
    first_groups: torch.Tensor  # (R, G) bool: the groups it may rhyme in (PoemPlan.first_rhyme_groups)
    col: torch.Tensor  # (R, TMAX) long: p's column in its line
    line_of: torch.Tensor  # (R, TMAX) long
    line_pos: torch.Tensor  # (R, LMAX · NMAX) long: the text position of line i's character c
    line_len: torch.Tensor  # (R,) long
    quotes_banned: torch.Tensor  # (R,) bool: the plan has known_lines
    eligible: torch.Tensor  # (R, G) bool: the groups a free first rhyme may open
    penalty: torch.Tensor  # (R,) float: nats per earlier use of a character (and the formulas' where > 0)
    temperature: torch.Tensor  # (R,) float: greedy and sample rows' draw (engine.sampling.choice.draw_params)
    top_k: torch.Tensor  # (R,) long
    top_p: torch.Tensor  # (R,) float
    draws: torch.Tensor  # (R, TMAX) float: a greedy or sample row's uniform number at each free position
    beam_draws: torch.Tensor  # (R, TMAX, BEAM_DRAWS) float: a beam request's numbers at each step (0 elsewhere)
    # Where the row is (what `take` moves with a beam's parent):
    pos: torch.Tensor  # (R,) long: the next position
    starts: torch.Tensor  # (R,) long: the values s may still take (LEVEL | OBLIQUE bits)
    rhymed: torch.Tensor  # (R,) bool: a rhyme has been taken
    groups: torch.Tensor  # (R, G) bool: the groups the rhymes so far share
    counts: torch.Tensor  # (R, V) uint8: uses counted against the three-times rule (forced ones reserved)
    uses: torch.Tensor  # (R, V) float: every use of a character so far (the repetition penalty)
    # (R, V + 1) bool: characters at earlier rhyme positions and those the plan forces at any (PoemPlan.forced_rhymes;
    # the last column: none)
    rhymed_tokens: torch.Tensor
    history: torch.Tensor  # (R, TMAX) long: the text so far, then <eos>
    # The current line's known-lines key so far (engine.poem.known_lines.key_of: both hashes), folded in as
    # each character is taken, so that a line's last character finds its head's key ready.
    head_hash: torch.Tensor  # (R, 2) long
    flags: torch.Tensor  # (R,) bool: a rule bent on this row: the host words its notes by replaying it

    DYNAMIC = ("pos", "starts", "rhymed", "groups", "counts", "uses", "rhymed_tokens", "history", "head_hash", "flags")

    @property
    def num_rows(self) -> int:
        return self.pos.shape[0]

    @classmethod
    def empty(cls, tables: DeviceTables, formulas: FormulaTable | None, known: KnownTable | None = None) -> DeviceRows:
        return cls.new(tables, formulas, known, [])

    @classmethod
    def new(cls, tables: DeviceTables, formulas: FormulaTable | None, known: KnownTable | None,
            requests: list, host: bool = False) -> DeviceRows:
        """Rows at the start of their poems: `requests` is [(plan, rows, penalty, (temperature, top_k, top_p),
        generator, beam_draws)], beam_draws being BEAM_CANDIDATES · width for a beam request and 0 otherwise.
        `host`: left on the CPU, for the caller to move (a GraphBatch packs them first)."""
        device = torch.device("cpu") if host else tables.vocab_ids.device
        # The plan's fields are built on the host and moved in one go (see _moved); the zeros start on the device.
        V, G = tables.vocab_ids.shape[0], tables.groups.shape[0]

        # NOTE: each field gathers its values in a flat array (C-typed), made a tensor at the end without a copy:
        # torch.tensor walks nested lists an element at a time, several times slower.
        flat = {name: array(code) for name, code in _ROW_CODES.items()}
        draws, beam_draws, counts, rhymed = [], [], [], []
        for plan, k, penalty, (temperature, top_k, top_p), generator, per_step in requests:
            if plan.tune is not None:
                raise ValueError("device rows hold regular forms only; a 词 keeps the host RowState")
            vocab, layout = plan.vocab, plan.layout
            lay = _layout_rows(layout, vocab.comma_id, vocab.period_id, vocab.eos_id)
            forced = list(lay["marks"])
            for p, t in plan.forced_at.items():
                forced[p] = t
            pad = [0] * (TMAX - len(plan.tone_req[0]))
            row = {"forced": forced, "plan_forced": _flags(TMAX, plan.forced_at), "han": lay["han"],
                   "tone_l": list(plan.tone_req[0]) + pad, "tone_o": list(plan.tone_req[1]) + pad,
                   "rhyme_pos": _flags(TMAX, plan.rhyme_at), "col": lay["col"],
                   "first_rhyme": _flags(TMAX, () if plan.first_rhyme is None else (plan.first_rhyme,)),
                   "first_groups": _flags(G, plan.first_rhyme_groups),
                   "line_of": lay["line_of"], "line_pos": lay["line_pos"],
                   "line_len": lay["line_len"], "quotes_banned": plan.known_lines is not None,
                   "eligible": _flags(G, plan.eligible_groups[0]),
                   "penalty": penalty, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                   "starts": plan.starts}
            for name, value in row.items():
                a = flat[name]
                add = a.frombytes if isinstance(value, (bytes, bytearray)) else \
                    a.extend if isinstance(value, (list, tuple)) else a.append
                for _ in range(k):
                    add(value)
            # The request's numbers, in the order the host path draws them (see the module docstring).
            draw = torch.zeros(TMAX)
            beam = torch.zeros(TMAX, BEAM_DRAWS)
            if per_step:
                beam[:plan.num_steps, :per_step] = torch.rand(plan.num_steps * per_step, generator=generator).view(-1, per_step)
            else:
                free = [p for p in layout.han_positions if p not in plan.forced_at]
                draw[free] = torch.rand(len(free), generator=generator)
            reserved = torch.zeros(V, dtype=torch.uint8)
            for t, n in plan.reserved.items():
                reserved[t] = n
            forced_rhymes = torch.zeros(V + 1, dtype=torch.bool)
            forced_rhymes[list(plan.forced_rhymes)] = True
            draws.extend([draw] * k)
            beam_draws.extend([beam] * k)
            counts.extend([reserved] * k)
            rhymed.extend([forced_rhymes] * k)
        R = len(draws)

        def tensor(name, shape):
            values = flat[name]
            dtype = {"q": torch.long, "B": torch.bool, "f": torch.float32}[values.typecode]
            if not len(values):  # no rows, or no columns (a vocabulary without rhyme groups)
                return torch.zeros(shape, dtype=dtype)
            # NOTE: the tensor shares the array's memory: nothing may grow the array after this.
            return torch.frombuffer(values, dtype=torch.uint8 if dtype == torch.bool else dtype).to(dtype).view(*shape)

        stack = lambda xs, *shape, dtype=torch.float32: (torch.stack(xs) if R else torch.zeros(0, *shape, dtype=dtype))
        rows = cls(tables, formulas, known,
                   forced=tensor("forced", (R, TMAX)), plan_forced=tensor("plan_forced", (R, TMAX)),
                   han=tensor("han", (R, TMAX)), tone_l=tensor("tone_l", (R, TMAX)), tone_o=tensor("tone_o", (R, TMAX)),
                   rhyme_pos=tensor("rhyme_pos", (R, TMAX)), first_rhyme=tensor("first_rhyme", (R, TMAX)),
                   first_groups=tensor("first_groups", (R, G)),
                   col=tensor("col", (R, TMAX)),
                   line_of=tensor("line_of", (R, TMAX)), line_pos=tensor("line_pos", (R, LMAX * NMAX)),
                   line_len=tensor("line_len", (R,)), quotes_banned=tensor("quotes_banned", (R,)), eligible=tensor("eligible", (R, G)),
                   penalty=tensor("penalty", (R,)), temperature=tensor("temperature", (R,)),
                   top_k=tensor("top_k", (R,)), top_p=tensor("top_p", (R,)),
                   draws=stack(draws, TMAX), beam_draws=stack(beam_draws, TMAX, BEAM_DRAWS),
                   pos=torch.zeros(R, dtype=torch.long, device=device), starts=tensor("starts", (R,)),
                   rhymed=torch.zeros(R, dtype=torch.bool, device=device),
                   groups=torch.zeros(R, G, dtype=torch.bool, device=device),
                   counts=stack(counts, V, dtype=torch.uint8), uses=torch.zeros(R, V, device=device),
                   rhymed_tokens=stack(rhymed, V + 1, dtype=torch.bool),
                   history=torch.zeros(R, TMAX, dtype=torch.long, device=device),
                   head_hash=torch.zeros(R, 2, dtype=torch.long, device=device),
                   flags=torch.zeros(R, dtype=torch.bool, device=device))
        return rows if device.type == "cpu" else rows._moved(device)

    @classmethod
    def padding(cls, tables: DeviceTables, formulas: FormulaTable | None, known: KnownTable | None, n: int,
                token: int, host: bool = False) -> DeviceRows:
        """n rows that fill a batch's free slots (engine.serving.graph_batch): every position forces `token`,
        so each step they take it and no rule, draw or penalty touches them. `host`: on the CPU."""
        rows = cls.new(tables, formulas, known, [], host=host)
        device = torch.device("cpu") if host else tables.vocab_ids.device

        def filled(t: torch.Tensor) -> torch.Tensor:
            return torch.zeros((n, *t.shape[1:]), dtype=t.dtype, device=device)

        rows = replace(rows, **{name: filled(getattr(rows, name)) for name in rows._tensors()})
        rows.forced.fill_(token)
        rows.temperature.fill_(1.0)
        rows.top_p.fill_(1.0)
        rows.starts.fill_(BOTH)
        rows.line_len.fill_(NMAX)  # any length a line may have: it indexes the line tables
        return rows

    def _moved(self, device: torch.device) -> DeviceRows:
        """These rows (built on the host) on `device`. NOTE: copies from pinned memory do not wait for the
        device, where a plain copy from the host waits for every step queued before it."""
        moved = {name: getattr(self, name) for name in self._tensors() if getattr(self, name).device != device}
        return replace(self, **{name: t.pin_memory().to(device, non_blocking=True) for name, t in moved.items()})

    def _tensors(self) -> list[str]:
        return [f.name for f in fields(self) if f.name not in ("tables", "formulas", "known")]

    def cat(self, other: DeviceRows) -> DeviceRows:
        """These rows, then `other`'s."""
        if not other.num_rows:
            return self
        return replace(self, **{name: torch.cat([getattr(self, name), getattr(other, name)]) for name in self._tensors()})

    def select(self, index: torch.Tensor) -> DeviceRows:
        """Rows `index` (R',) of these, every field (the batch dropped or reordered rows)."""
        return replace(self, **{name: getattr(self, name)[index] for name in self._tensors()})

    def take(self, parents: torch.Tensor) -> DeviceRows:
        """Each row continues row `parents[r]`'s state (a beam's parent). The plan's fields stay: parents are
        rows of the same request."""
        return replace(self, **{name: getattr(self, name)[parents] for name in self.DYNAMIC})

    def _at(self, table: torch.Tensor) -> torch.Tensor:
        """Each row's entry of a (R, TMAX) table at its position."""
        return table.gather(1, self.pos[:, None].clamp(max=TMAX - 1))[:, 0]

    def bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, V) float: 0 where a row may go next and -inf where not, minus its repetition and formula
        penalties: the values `step_bias` gives these rows; and (R,) bool: the rows on which a rule is relaxed,
        for `advance`. NOTE: reads the state and writes nothing, so a compiler may capture it as a graph."""
        t = self.tables
        R, V = self.num_rows, t.vocab_ids.shape[0]
        forced = self._at(self.forced)
        free = forced < 0
        # Tone: the union of what each still-possible s asks for here (nothing, if either asks nothing).
        req_l, req_o = self._at(self.tone_l), self._at(self.tone_o)
        tone = torch.where(self.starts == BOTH, torch.where((req_l > 0) & (req_o > 0), req_l | req_o, 0),
                           torch.where(self.starts == LEVEL, req_l, req_o))
        tone_rows = t.fixed[t.tone_row[tone]]  # (R, V)
        at_rhyme, at_first = self._at(self.rhyme_pos), self._at(self.first_rhyme)
        # The groups open here: at line 1's end (nothing rhymed yet) those it may rhyme in.
        groups = torch.where(at_first[:, None], self.first_groups,
                             torch.where(self.rhymed[:, None], self.groups, self.eligible))
        rhyme_rows = (groups.float() @ t.groups) > 0  # (R, V): any character of the open groups
        base = torch.where(at_rhyme[:, None], rhyme_rows, tone_rows)
        col = self._at(self.col)
        last_col = col == self.line_len - 1
        banned = (self.counts >= 2) | ((at_rhyme | at_first)[:, None] & self.rhymed_tokens[:, :V]) | \
            self._line_bans(last_col)
        if self.known is not None:  # the softest rule: dropped where it alone would leave nothing
            quoted = self._known_bans(last_col)
            relax_quote = free & quoted.any(dim=1) & ~(base & ~(banned | quoted)).any(dim=1)
            banned = banned | (quoted & ~relax_quote[:, None])
        else:
            relax_quote = torch.zeros_like(free)
        unbanned = ~banned
        # An unrhymed line's end prefers what sounds 仄 today, where any such character is left (RowState's rule);
        # line 1's end may instead rhyme (首句入韵): 仄 as sounded, or a 平 character of the eligible groups.
        end = ~at_rhyme & ~at_first & last_col & (tone == OBLIQUE)
        end = end & (t.fixed[MASK_OBLIQUE_END] & unbanned).any(dim=1)
        base = torch.where(end[:, None], t.fixed[MASK_OBLIQUE_END], base)
        # … where anything is left there; else the plain 仄 row stays, as at any unrhymed line end.
        first_rows = t.fixed[MASK_OBLIQUE_END] | rhyme_rows
        at_first = at_first & (first_rows & unbanned).any(dim=1)
        base = torch.where(at_first[:, None], first_rows, base)
        # Relax until something is allowed: tone, then rhyme (and then tone there), then repetition.
        ok = (base & unbanned).any(dim=1)
        toned = tone > 0
        relax_tone = free & ~at_rhyme & toned & ~ok
        relax_rhyme = free & at_rhyme & ~ok
        base = torch.where(relax_tone[:, None], t.fixed[MASK_HAN], torch.where(relax_rhyme[:, None], tone_rows, base))
        ok = (base & unbanned).any(dim=1)
        base = torch.where((relax_rhyme & toned & ~ok)[:, None], t.fixed[MASK_HAN], base)
        relax_repeat = free & ~(base & unbanned).any(dim=1)
        allowed = torch.where(free[:, None], base & ~(banned & ~relax_repeat[:, None]), t.vocab_ids == forced[:, None])
        bias = torch.zeros(R, V, device=allowed.device).masked_fill_(~allowed, NEG_INF)
        bias.addcmul_(self.penalty[:, None], self.uses, value=-1.0)  # -n·penalty: multiples of a half, exact
        if self.formulas is not None:
            self._formula_penalty(bias, free, col)
        return bias, relax_quote | relax_tone | relax_rhyme | relax_repeat

    def _line_bans(self, last_col: torch.Tensor) -> torch.Tensor:
        """(R, V) bool: at a line's last character (`last_col`), those that would complete a line written before."""
        R, V = self.num_rows, self.tables.vocab_ids.shape[0]
        lines = self.history.gather(1, self.line_pos).view(R, LMAX, NMAX)
        line = self._at(self.line_of)
        current = lines.gather(1, line[:, None, None].expand(R, 1, NMAX))  # (R, 1, NMAX)
        head = torch.arange(NMAX, device=lines.device)[None] < (self.line_len - 1)[:, None]  # (R, NMAX)
        same = ((lines == current) | ~head[:, None, :]).all(dim=2)  # (R, LMAX): the head matches line i's
        earlier = torch.arange(LMAX, device=lines.device)[None] < line[:, None]
        hit = same & earlier & last_col[:, None]
        last = lines.gather(2, (self.line_len - 1)[:, None, None].expand(R, LMAX, 1))[:, :, 0]  # (R, LMAX)
        out = torch.zeros(R, V + 1, dtype=torch.bool, device=lines.device)
        return out.scatter_(1, torch.where(hit, last, V), True)[:, :V]

    def _known_bans(self, last_col: torch.Tensor) -> torch.Tensor:
        """(R, V) bool: at a line's last character (`last_col`), those that would end a known line of the
        corpus after the head written so far (its key folded in `head_hash`)."""
        k, R, V = self.known, self.num_rows, self.tables.vocab_ids.shape[0]
        key = self.head_hash[:, 0] * (1 << 31) + self.head_hash[:, 1]  # (R,)
        at = torch.searchsorted(k.keys, key)[:, None] + torch.arange(k.width, device=key.device)  # (R, W)
        at = at.clamp(max=k.keys.shape[0] - 1)
        tokens = k.last_tokens[at].long()
        on = last_col & self.quotes_banned & (self.line_len >= MIN_LEN)
        known = on[:, None] & (k.keys[at] == key[:, None]) & (tokens >= 0)  # -1: a character the model lacks
        out = torch.zeros(R, V + 1, dtype=torch.bool, device=key.device)
        return out.scatter_(1, torch.where(known, tokens, V), True)[:, :V]

    def _formula_penalty(self, bias: torch.Tensor, free: torch.Tensor, col: torch.Tensor) -> None:
        """FORMULA_PENALTY nats off each token that would complete one of the model's formulas here (`col`:
        each row's column in its line)."""
        f, V = self.formulas, bias.shape[1]
        last3 = self.history.gather(1, (self.pos[:, None] - torch.arange(SPAN - 1, 0, -1, device=bias.device)).clamp(min=0))
        key = (last3[:, 0] * V + last3[:, 1]) * V + last3[:, 2]
        at = torch.searchsorted(f.keys, key).clamp(max=f.keys.shape[0] - 1)
        hit = free & (self.penalty > 0) & (col >= SPAN - 1) & (f.keys[at] == key)
        completions = f.completions[at]  # (R, C)
        penalty = torch.where(hit[:, None] & (completions >= 0), -FORMULA_PENALTY, 0.0)
        bias.scatter_add_(1, completions.clamp(min=0), penalty)

    def advance(self, tokens: torch.Tensor, bent: torch.Tensor) -> None:
        """Each row takes tokens[r] (R,) long at its position, chosen under a bias that bent a rule where
        bent[r] (`bias`'s second value, taken by the same parents): the state RowState.advance keeps."""
        t = self.tables
        self.flags |= bent
        V = t.vocab_ids.shape[0]
        pos = self.pos[:, None].clamp(max=TMAX - 1)
        self.history.scatter_(1, pos, tokens[:, None])
        han = self._at(self.han)
        by_plan = self._at(self.plan_forced)
        self.uses.scatter_add_(1, tokens[:, None], han.float()[:, None])
        # NOTE: one column per row, so a gather and a scatter add without atomics (Triton has none for uint8).
        column = tokens[:, None]
        self.counts.scatter_(1, column, self.counts.gather(1, column) + (han & ~by_plan).to(torch.uint8)[:, None])
        # Tone: the s values this character keeps possible; a forced one that keeps none bends the rule.
        tones = t.tones[tokens]
        req_l, req_o = self._at(self.tone_l), self._at(self.tone_o)
        fits = torch.where(((self.starts & LEVEL) > 0) & ((req_l & tones) > 0), LEVEL, 0) | \
            torch.where(((self.starts & OBLIQUE) > 0) & ((req_o & tones) > 0), OBLIQUE, 0)
        asks = han & ((req_l > 0) | (req_o > 0))
        self.starts = torch.where(asks & (fits > 0), fits, self.starts)
        # Rhyme: the groups this rhyme shares with those open so far. At line 1's end (首句入韵) a character
        # of the eligible groups is the first rhyme; any other is its 仄 ending.
        first_shared = self.first_groups & t.token_groups[tokens]
        first = han & self._at(self.first_rhyme) & first_shared.any(dim=1)
        self.flags |= asks & (fits == 0) & by_plan & ~first  # a forced first rhyme (次韵) bends no tone
        at_rhyme = han & self._at(self.rhyme_pos)
        opened = torch.where(self.rhymed[:, None], self.groups, t.open_groups[None])
        shared = opened & t.token_groups[tokens]
        any_shared = shared.any(dim=1)
        takes = at_rhyme & any_shared
        self.groups = torch.where(takes[:, None], shared, torch.where(first[:, None], first_shared, self.groups))
        self.rhymed = self.rhymed | takes | first
        self.flags |= at_rhyme & ~any_shared & by_plan
        self.rhymed_tokens.scatter_(1, torch.where(at_rhyme | first, tokens, V)[:, None], True)
        if self.known is not None:  # a line's first character starts its key from the line's length
            start = torch.where((self._at(self.col) == 0)[:, None], self.line_len[:, None], self.head_hash)
            folded = (start * self.known.bases + self.known.codes[tokens][:, None]) % self.known.moduli
            self.head_hash = torch.where(han[:, None], folded, self.head_hash)
        self.pos = (self.pos + 1).clamp_(max=TMAX)  # past its <eos> (a padding row) a row stays at the end

    @staticmethod
    def result(plan: PoemPlan, tokens: list[int], flagged: bool) -> tuple[list[str], list[str]]:
        """A finished row's lines and notes from its text (`tokens`, <eos> excluded). A flagged row, or one
        that repeats a line, is replayed through a RowState, which words the notes as the host path does."""
        layout, vocab = plan.layout, plan.vocab
        lines = [tuple(tokens[s:s + n]) for s, n in zip(layout.starts, layout.line_lengths)]
        if flagged or len(set(lines)) < len(lines):
            row = plan.new_row()
            for token in (*tokens, vocab.eos_id):
                row.advance(token)
            return row.line_texts, row.notes
        return ["".join(vocab.tokens[t] for t in line) for line in lines], list(plan.notes)

