"""Constrained decoding: which tokens each row may take next, so every poem has its form, rhyme and tone.

A request becomes a validated `PoemPlan` (form, forced characters, which rules are on); each decoding
row (one per greedy/sample request, `beam_width` per beam request) carries a small `RowState`:

    plan = build_plan(vocab, prosody_for(vocab), request)   # RequestError on bad input
    row = plan.new_row()
    token = plan.start_token                                 # the <form> token opens every sequence
    while not row.done:
        logits, state = model.step(torch.tensor([token]), state)
        token = row.forced()                                 # punctuation, <eos>, prompt/acrostic chars
        if token is None:
            bias = step_bias([row], penalty, device)         # engine.sampling.choice: masks as a Bias
            token = choose_greedy(logits, bias)              # or sample / beam
        row.advance(token)
    row.text, row.lines, row.notes

Rules (docs/DECODING.md has the long version); a 词 follows its tune instead (see "词" below):
- layout: exactly the form's lines of Han characters, ， after odd lines, 。 after even ones, then <eos>;
- prompt: opens the poem (it may run over line ends); acrostic: one character forced at each line start;
- keywords: each forced at a place chosen when the plan is made (`_place_keywords`), where its tones fit;
- rhyme (on by default): even lines end in level-tone characters sharing ONE rhyme group, chosen by the
  model at the first rhyming line end (a character in several groups keeps them all open until a later
  rhyme narrows them);
- tone: s = tone of line 1's 2nd character; line i's 2nd character follows 对/粘
  (s, ¬s, ¬s, s, s, ¬s, ¬s, s), the 4th is opposite the 2nd, the 6th (7-character lines) equals the 2nd,
  odd lines end 仄, even lines end 平, and line 1 may end in the rhyme instead (首句入韵: a 平 character of
  a group with room for one rhyme more, which then opens the rhyme). A character with both readings fits
  either tone, so s stays open until a character with one reading fixes it; at an unrhymed line end one
  commonly read 平 (空, 乡) is avoided while another is left;
- repetition: no character three times in a poem (forced characters are reserved up front), no line twice,
  no rhyme character twice (重韵).

词: the plan's `layout` (engine.poem.forms.Layout) holds the tune's line lengths and marks; the rhyme
positions fall into the tune's rhyme sets, each with its own 词林正韵 groups of its tone (the plan's `book`);
the tone requirements are the tune's strong positions, the same whatever s is; a line of one or two
characters may repeat the line before it (叠句).

Soft rules (tone, rhyme, repetition) bend instead of failing: a forced character that breaks one relaxes it
at that position, and a row that would have no allowed token relaxes tone, then rhyme, then repetition.
Every relaxation is written to `notes` (plan-level ones are in `plan.notes`, and every row starts with them).

Masks are built from precomputed tables: each row only picks a table index in Python, in `advance()`;
`engine.sampling.choice.step_bias` turns the rows' indices, forced tokens and banned pairs into the bias.
"""

from __future__ import annotations

import functools
import threading
from collections import Counter
from dataclasses import dataclass, field

import torch

from engine.api import keywords_fit, keywords_to_place
from engine.errors import RequestError
from engine.poem.forms import FORMS, PERIOD, Form, Layout, rhyme_positions
from engine.poem.prosody import Prosody, RhymeBook, rhyme_book
from engine.poem.rhymes import LEVEL, OBLIQUE
from engine.poem.tunes import Tune, format_ci, parse_tune
from engine.poem.vocab import Vocab, to_simplified

BOTH = LEVEL | OBLIQUE
TONE_NAMES = {LEVEL: "平", OBLIQUE: "仄", BOTH: "平 or 仄"}
# 对/粘: the tone of each line's 2nd character, relative to s (the tone of line 1's 2nd character).
SECOND_CHAR_SAME_AS_S = (True, False, False, True, True, False, False, True)

# Fixed rows of the mask table; rhyme-group sets get rows from RHYME_BASE on, registered as they appear.
MASK_NONE, MASK_HAN, MASK_LEVEL, MASK_OBLIQUE, MASK_TONED, MASK_OBLIQUE_END = 0, 1, 2, 3, 4, 5
RHYME_BASE = 6
_TONE_MASK = {0: MASK_HAN, LEVEL: MASK_LEVEL, OBLIQUE: MASK_OBLIQUE, BOTH: MASK_TONED}


def _flip(tone: int) -> int:
    return OBLIQUE if tone == LEVEL else LEVEL


# ---------------------------------------------------------------------------------------------------------
# Mask tables: shared by every plan of one vocabulary, kept in prosody.cache.


class MaskTables:
    """Rows of allowed tokens: fixed ones (none, Han, 平, 仄, toned, 仄 at an unrhymed line end) and one per
    rhyme-group set in use.

    Index assignment is plain Python on the CPU; `bias_on(device)` is the table as 0/-inf scores on a device.
    """

    def __init__(self, prosody: Prosody):
        p = prosody
        none = torch.zeros_like(p.han)
        fixed = [none, p.han, p.han & p.level, p.han & p.oblique, p.han & (p.level | p.oblique),
                 p.han & p.oblique & ~p.heard_level]
        self.prosody = prosody
        self.rows: list[torch.Tensor] = fixed  # each (V,) bool, on the CPU
        self.counts: list[int] = [int(r.sum()) for r in fixed]  # allowed tokens per row
        self.rhyme_index: dict[tuple[str, frozenset[int]], int] = {}
        self.eligible: dict[tuple[str, int, int], frozenset[int]] = {}  # see eligible_groups
        self.toned: dict[tuple[str, int], frozenset[int]] = {}  # see groups_of_tone
        self._device: dict[str, torch.Tensor] = {}  # device → (K, V) bias table
        # NOTE: plans are made on the event loop's thread and rows prepared on the engine's; a new rhyme row
        # is registered under this lock, or two threads could take the same index for different rows.
        self._lock = threading.Lock()

    def rhyme_row(self, book: RhymeBook, groups: frozenset[int]) -> int:
        """The table row of "any character of these groups of `book`", registered on first use."""
        return self._registered((book.name, groups), lambda: book.matrix[sorted(groups)].any(dim=0) if groups
                                else torch.zeros_like(self.prosody.han))

    def first_rhyme_row(self, book: RhymeBook, groups: frozenset[int]) -> int:
        """The row for line 1's end where it may rhyme: what sounds 仄 (MASK_OBLIQUE_END), or a 平 character of
        these groups; registered on first use."""
        return self._registered(("first:" + book.name, groups),
                                lambda: self.rows[self.rhyme_row(book, groups)] | self.rows[MASK_OBLIQUE_END])

    def _registered(self, key: tuple, make) -> int:
        """The index of the row under `key`, made by `make()` and appended on first use."""
        index = self.rhyme_index.get(key)
        if index is None:
            row = make()
            with self._lock:
                index = self.rhyme_index.get(key)
                if index is None:
                    self.rows.append(row)
                    self.counts.append(int(row.sum()))
                    index = self.rhyme_index[key] = len(self.rows) - 1  # published once its row is there
        return index

    def allowed_ids(self, index: int) -> list[int]:
        return self.rows[index].nonzero().flatten().tolist()

    def bias_on(self, device) -> torch.Tensor:
        """The table as additive scores on `device`: (K, V) float, 0 where allowed and -inf where not.
        Copied to a device once, and again only when new rhyme sets were registered since. Adding a gathered
        bias row is several times faster on CPU than masked_fill with a scattered mask."""
        key = str(device)
        table = self._device.get(key)
        if table is None or table.shape[0] < len(self.rows):
            rows = torch.stack(self.rows)
            table = self._device[key] = torch.zeros(rows.shape).masked_fill_(~rows, float("-inf")).to(device)
        return table

    def eligible_groups(self, need: int, book: RhymeBook | None = None, tone: int = LEVEL) -> frozenset[int]:
        """The groups of `book` (平水韵 by default) of this tone with at least `need` members (a poem's rhyme
        positions: a smaller group would run dry), or every non-empty one if none has that many. Kept per
        (book, need, tone): every request asks."""
        book = book or rhyme_book(self.prosody, None, "pingshui")
        key = (book.name, need, tone)
        eligible = self.eligible.get(key)
        if eligible is None:
            sizes = [int(n) if t == tone else 0 for n, t in zip(book.matrix.sum(dim=1), book.tones)]
            eligible = frozenset(g for g, n in enumerate(sizes) if n >= need)
            eligible = self.eligible[key] = eligible or frozenset(g for g, n in enumerate(sizes) if n > 0)
        return eligible

    def groups_of_tone(self, book: RhymeBook, tone: int) -> frozenset[int]:
        """Every group of `book` of this tone (what a forced first rhyme may open)."""
        key = (book.name, tone)
        groups = self.toned.get(key)
        if groups is None:
            groups = self.toned[key] = frozenset(g for g, t in enumerate(book.tones) if t == tone)
        return groups


def mask_tables(prosody: Prosody) -> MaskTables:
    tables = prosody.cache.get("mask_tables")
    if tables is None:
        tables = prosody.cache["mask_tables"] = MaskTables(prosody)
    return tables


# ---------------------------------------------------------------------------------------------------------
# The plan: one per request.


@dataclass
class PoemPlan:
    form: Form | None  # the regular form, or None for a 词
    vocab: Vocab
    prosody: Prosody
    prompt: str  # simplified, punctuation and spaces dropped
    acrostic: str | None  # simplified, one character per line
    rhyme: bool  # the rhyme rule is on (after relaxations at plan time)
    tone: bool  # the tone rule is on
    start_token: int  # the <form> (or <ci:tune>) token, fed to the model before the first character
    forced_at: dict[int, int]  # position in the text → token that must be there (prompt, acrostic, keywords)
    reserved: Counter  # forced Han token → times it is forced (counted against the three-times rule)
    eligible_groups: tuple[frozenset[int], ...]  # per rhyme set: groups its first rhyme may open
    rhyme_tones: tuple[int, ...]  # per rhyme set: LEVEL or OBLIQUE (诗: one set, LEVEL)
    tone_req: tuple[tuple[int, ...], tuple[int, ...]]  # [s is 平, s is 仄][pos] → LEVEL | OBLIQUE | 0
    rhyme_at: dict[int, int]  # rhyming position → its rhyme set (诗: one set, the even line ends); empty when off
    layout: Layout  # where the lines and marks are
    book: RhymeBook  # the groups the rhymes are drawn from: 平水韵 for 诗, 词林正韵 for 词
    tune: Tune | None = None  # the 词 tune, None for a regular form
    notes: list[str] = field(default_factory=list)  # soft rules relaxed by the request itself, and why
    tables: MaskTables | None = None
    formulas: object = None  # engine.sampling.formulas.Formulas of the model, or None: spans greedy and beam avoid
    known_lines: object = None  # engine.poem.known_lines.VocabLines, or None: corpus lines no line may complete
    keywords: tuple[str, ...] = ()  # simplified, as placed (those the prompt or acrostic already holds left out)
    starts: int = BOTH  # the values s may take from the start: narrowed when a keyword's tone fits only one
    # Rhyme set → the sets that must rhyme in its 部 (西江月's 平 and 仄 sets); each rhyme of one narrows
    # the others to the 部 still open (RowState._link_rhymes).
    linked: dict[int, tuple[int, ...]] = field(default_factory=dict)
    # Line 1's last position when it may rhyme (首句入韵, with rhyme and tone on), else None: there a 仄
    # character, or a 平 one of the eligible groups, which is then the poem's first rhyme.
    first_rhyme: int | None = None
    # The groups line 1 may rhyme in: eligible ones with a character to spare for the extra rhyme.
    first_rhyme_groups: frozenset[int] = frozenset()
    # The characters forced at rhyming line ends (次韵, a prompt reaching one): no free rhyme may take them,
    # line 1's included, or the poem would rhyme on one twice (重韵).
    forced_rhymes: tuple[int, ...] = ()

    @property
    def form_name(self) -> str:
        """The contract name: a regular form's, or "ci"."""
        return self.form.name if self.form else "ci"

    @property
    def num_steps(self) -> int:
        """Tokens a row produces: the text, then <eos>."""
        return self.layout.text_len + 1

    def new_row(self) -> RowState:
        """A row at the poem's start (the caller feeds `start_token` to the model first)."""
        return RowState.start(self)

    def format_text(self, lines: list[str]) -> str:
        """A finished row's text: the regular ，。 layout, or the tune's marks and stanza break."""
        if self.tune is not None:
            return format_ci(self.tune, lines)
        return "".join(line + mark for line, mark in zip(lines, self.layout.marks))


def _in_vocab(text: str, name: str, vocab: Vocab) -> str:
    """`text` (validated Han characters) as the simplified characters the vocabulary holds; RequestError
    `unknown_character` naming the first one the model cannot write."""
    whole = to_simplified(text)
    simple = whole if len(whole) == len(text) else "".join(to_simplified(ch) for ch in text)
    out = []
    for orig, ch in zip(text, simple):
        if ch not in vocab:
            if orig in vocab:  # the model knows the traditional form (e.g. 乾 in 乾坤)
                ch = orig
            else:
                shown = orig if orig == ch else f"{orig} ({ch})"
                raise RequestError("unknown_character", name,
                                   f"the model cannot write the character {shown} in {name}: it is not in its vocabulary")
        out.append(ch)
    return "".join(out)


@functools.cache  # a handful of (form, tone) pairs; every request asks
def _tone_requirements(form: Form, tone: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Required tone per text position, for s = 平 and for s = 仄 (0 where nothing is required)."""
    L, layout = form.line_len, form.layout
    reqs = []
    for s in (LEVEL, OBLIQUE):
        req = [0] * (form.text_len + 1)
        if tone:
            for line in range(form.num_lines):
                base = layout.starts[line]
                second = s if SECOND_CHAR_SAME_AS_S[line] else _flip(s)
                req[base + 1] = second
                req[base + 3] = _flip(second)
                if L == 7:
                    req[base + 5] = second
                req[base + L - 1] = OBLIQUE if line % 2 == 0 else LEVEL  # line 1 may rhyme instead: first_rhyme
        reqs.append(tuple(req))
    return reqs[0], reqs[1]


_TUNE_TONES = {"平": LEVEL, "仄": OBLIQUE}


@functools.cache
def _tune_tone_requirements(tune: Tune, tone: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A tune's strong tone positions: fixed by the tune, so the same whatever s is."""
    req = [0] * (tune.text_len + 1)
    if tone:
        layout = tune.layout
        for i, line in enumerate(tune.lines):
            for col, mark in enumerate(line.tones):
                req[layout.starts[i] + col] = _TUNE_TONES.get(mark, 0)
    return tuple(req), tuple(req)


def _set_names(group) -> str:
    return " and ".join(str(k + 1) for k in sorted(group))


def build_plan(vocab: Vocab, prosody: Prosody, request, formulas=None, known_lines=None) -> PoemPlan:
    """Validate `request` (a PoemRequest) against the model's vocabulary and make its plan.

    Raises RequestError: every error of `PoemRequest.validate()` (a non-Han or too long prompt, a bad
    acrostic, …), `unknown_character` for a Han character the model cannot write (after traditional
    → simplified), and `no_ci` for a 词 asked of a model that was not trained on 词.
    """
    request.validate()
    tune = parse_tune(request.tune) if request.form == "ci" else None
    if tune is not None and not vocab.writes_ci:
        raise RequestError("no_ci", "form", "this model writes only the regular forms, not 词; ask a model trained "
                                            "on 词 (GET /v1/models says which)")
    form = None if tune else FORMS[request.form]
    layout = tune.layout if tune else form.layout
    prompt = _in_vocab(request.prompt, "prompt", vocab)
    acrostic = _in_vocab(request.acrostic, "acrostic", vocab) if request.acrostic is not None else None

    keywords = keywords_to_place([_in_vocab(k, "keywords", vocab) for k in request.keywords], prompt, acrostic, layout)

    forced_at: dict[int, int] = {}
    for pos, ch in zip(layout.han_positions, prompt):
        forced_at[pos] = vocab.index[ch]
    for line, ch in enumerate(acrostic or ""):
        forced_at[layout.starts[line]] = vocab.index[ch]
    rhymes = _in_vocab(request.rhymes, "rhymes", vocab) if request.rhymes else ""
    again = next((ch for i, ch in enumerate(rhymes) if ch in rhymes[:i]), None)
    if again is not None:  # 鄉 and 乡 are one character once simplified
        raise RequestError("bad_rhymes", "rhymes", f"「{again}」 is in rhymes twice; a poem rhymes on a character once "
                                                   f"(重韵)")
    for pos, ch in zip(rhyme_positions(form, len(rhymes)) if rhymes else (), rhymes):
        if prosody.tones[vocab.index[ch]] == OBLIQUE:
            raise RequestError("bad_rhymes", "rhymes", f"「{ch}」 has no level-tone (平) reading, and a regular poem "
                                                       f"rhymes in level tones: 次韵 answers a poem that rhymes on 平")
        if forced_at.get(pos, vocab.index[ch]) != vocab.index[ch]:
            raise RequestError("bad_rhymes", "rhymes", f"the prompt puts 「{vocab.tokens[forced_at[pos]]}」 at the end "
                                                       f"of line {layout.line_of[pos] + 1}, where the rhymes put 「{ch}」")
        forced_at[pos] = vocab.index[ch]

    tables = mask_tables(prosody)
    rhyme = bool(request.rhyme)
    if tune:
        book = rhyme_book(prosody, vocab, "cilin")
        sets = tuple(zip(tune.rhyme_tones, (len(tune.rhyme_lines(k)) for k in range(len(tune.rhyme_tones)))))
        rhyme_at = {layout.starts[i] + line.length - 1: line.rhyme for i, line in enumerate(tune.lines)
                    if line.rhyme is not None}
        tone_req = _tune_tone_requirements(tune, request.tone)
        start_token = vocab.tune_id(tune.name)
    else:
        book = rhyme_book(prosody, vocab, "pingshui")
        sets = ((LEVEL, form.num_lines // 2),)
        rhyme_at = {layout.starts[line] + form.line_len - 1: 0 for line in range(1, form.num_lines, 2)}
        tone_req = _tone_requirements(form, request.tone)
        start_token = vocab.form_id(form.name)
    eligible = tuple(tables.eligible_groups(need, book, tone) for tone, need in sets)
    linked: dict[int, tuple[int, ...]] = {}
    unlinked = []  # groups of sets the vocabulary cannot rhyme in one 部
    for group in (tune.same_bu if tune else ()):
        # Only 部 where every set of the group can rhyme are open, so whichever set rhymes first, the
        # others still find groups of their tone there.
        common = set.intersection(*({book.bu(g) for g in eligible[k]} for k in group))
        if common:
            eligible = tuple(frozenset(g for g in e if book.bu(g) in common) if k in group else e
                             for k, e in enumerate(eligible))
            linked.update({k: tuple(m for m in group if m != k) for k in group})
        else:
            unlinked.append(group)
    rhyme_off = rhyme and not all(eligible)
    if rhyme_off:
        rhyme = False
    if not rhyme:
        rhyme_at = {}

    starts = BOTH
    if keywords:
        placed, starts, eligible = _place_keywords(layout, prosody, book, [[vocab.index[ch] for ch in k] for k in keywords],
                                                   forced_at, tone_req, rhyme_at, eligible, len(prompt))
        forced_at.update(placed)
    reserved = Counter(forced_at.values())
    by = " and ".join(name for name, there in (("prompt", prompt), ("acrostic", acrostic), ("keywords", keywords),
                                                 ("rhymes", rhymes)) if there)
    notes = [f"repetition: 「{vocab.tokens[token]}」 is forced {n} times by the {by}; the no-three-times rule is "
             f"relaxed for it" for token, n in sorted(reserved.items()) if n >= 3]
    if rhyme and unlinked:
        notes.extend(f"rhyme: the model's vocabulary has no 部 in which rhyme sets {_set_names(group)} can all "
                     f"rhyme; they rhyme apart" for group in unlinked)
    if rhyme_off:
        notes.append("rhyme: the model's vocabulary has no level-tone rhyme characters; rhyme is off" if form else
                     "rhyme: the model's vocabulary lacks rhyme characters for this tune's rhymes; rhyme is off")

    first_rhyme = layout.starts[0] + form.line_len - 1 if form and rhyme and request.tone else None
    first_groups = _first_rhyme_groups(book, eligible[0], sets[0][1], first_rhyme, rhyme_at, forced_at,
                                       len(rhymes) > len(rhyme_at))
    # A character forced at line 1's end is a rhyme only where 次韵 makes it one (a prompt's is a bent tone).
    rhyming = set(rhyme_at) | ({first_rhyme} if first_groups and first_rhyme in forced_at else set())
    plan = PoemPlan(form=form, vocab=vocab, prosody=prosody, prompt=prompt, acrostic=acrostic, rhyme=rhyme,
                    tone=bool(request.tone), start_token=start_token, forced_at=forced_at, first_rhyme=first_rhyme,
                    first_rhyme_groups=first_groups,
                    reserved=reserved, eligible_groups=eligible, rhyme_tones=tuple(t for t, _ in sets),
                    tone_req=tone_req, rhyme_at=rhyme_at,
                    forced_rhymes=tuple(sorted({forced_at[p] for p in rhyming & set(forced_at)})),
                    layout=layout, book=book, tune=tune, notes=notes, tables=tables, formulas=formulas,
                    known_lines=known_lines, keywords=tuple(keywords), starts=starts, linked=linked if rhyme else {})
    # Run the forced opening once so that what the prompt itself breaks is known (and said) up front.
    row = plan.new_row()
    while not row.done and row.forced() is not None:
        row.advance(row.forced())
    plan.notes = list(row.notes)
    return plan


def _first_rhyme_groups(book: RhymeBook, groups: frozenset[int], need: int, first: int | None,
                        rhyme_at: dict[int, int], forced_at: dict[int, int], rhymes_first: bool = False
                        ) -> frozenset[int]:
    """The groups line 1 (its end at `first`) may rhyme in: those of `groups` with more than `need` characters
    (room for one rhyme more), and that every character forced at a rhyme position belongs to. None where the
    line may not rhyme, or where its end is forced: only the model's own choice opens the rhyme there, and a
    prompt's 平 character is a bent tone, so the rhyme stays open for the lines the prompt did not write. The
    one exception is a line 1 that 次韵 rhymes (`rhymes_first`): its forced character is the first rhyme."""
    if first is None or (first in forced_at and not rhymes_first):
        return frozenset()
    out = frozenset(g for g in groups if book.sizes[g] > need)
    for p in (set(rhyme_at) | {first}) & set(forced_at):
        out &= book.token_groups[forced_at[p]]
    return out


# Where a line of this length pauses (the column after each pause): 五言 2|3, 七言 2|2|3, 四言 2|2, 六言 2|2|2.
# A keyword that straddles a pause reads as two broken words, so a place that keeps it whole ranks first.
CAESURAS = {4: (2,), 5: (2,), 6: (2, 4), 7: (2, 4)}


def _place_keywords(layout: Layout, prosody: Prosody, book: RhymeBook, words: list[list[int]],
                    forced_at: dict[int, int], tone_req, rhyme_at: dict[int, int],
                    eligible: tuple[frozenset[int], ...], prompt_len: int):
    """Where each keyword goes: {position: token}, the values s may start with, and per rhyme set the groups
    its first rhyme may open. Deterministic from the request, so every row of a batch (and the reference
    decoder) decodes the same plan.

    Each keyword, in request order, takes the free place that ranks first by: tone and rhyme misses (a
    character whose tone the pattern does not allow there, or one at a rhyme position that is not a rhyme
    character of the groups still open), then places that keep it whole within the line's pauses
    (CAESURAS), then rhyme positions last (they narrow the rhyme for the whole
    poem), then distance from its target line (keywords spread evenly over the lines after the prompt), then
    the earliest place. A place is only taken if the keywords after it still fit (`keywords_fit`), so a
    request that validation accepts always gets every keyword placed. With the tone rule on this is done for
    s = 平 and s = 仄 and the one with fewer misses kept; if its keywords fit only that s, s is fixed from
    the start, so the model's own choice of s cannot break them later. A miss is not an error: the character
    is forced anyway and the soft rule bends there with a note, as for a prompt."""
    han = layout.han_positions
    free0 = set(han) - set(forced_at)
    first = layout.line_of[han[prompt_len]] if prompt_len < len(han) else layout.num_lines - 1
    span_lines = layout.num_lines - first
    targets = [first + int((i + 0.5) * span_lines / len(words)) for i in range(len(words))]

    def misses(req, placed: dict[int, int]) -> int:
        return sum(1 for p, t in placed.items() if req[p] and not req[p] & prosody.info(t)[0])

    best = None
    for s_index in ((0, 1) if tone_req[0] != tone_req[1] else (0,)):
        req = tone_req[s_index]
        groups = list(eligible)
        for p in sorted(set(rhyme_at) & set(forced_at)):  # a prompt reaching a rhyme position narrows the groups
            k = rhyme_at[p]
            groups[k] = groups[k] & book.token_groups[forced_at[p]] or groups[k]
        free, placed = set(free0), {}
        for i, word in enumerate(words):
            rest = [len(w) for w in words[i + 1:]]
            choices = []
            for p in sorted(free):
                span = range(p, p + len(word))
                line = layout.line_of[p]
                if layout.col_of[p] + len(word) > layout.line_lengths[line] or any(q not in free for q in span):
                    continue
                if not keywords_fit(free - set(span), rest):
                    continue
                miss, at_rhyme, open_groups = 0, 0, list(groups)
                for q, t in zip(span, word):
                    miss += bool(req[q] and not req[q] & prosody.info(t)[0])
                    if q in rhyme_at:
                        at_rhyme += 1
                        k = rhyme_at[q]
                        if open_groups[k] & book.token_groups[t]:
                            open_groups[k] = open_groups[k] & book.token_groups[t]
                        else:
                            miss += 1
                col = layout.col_of[p]
                splits = sum(col < b < col + len(word) for b in CAESURAS.get(layout.line_lengths[line], ()))
                choices.append(((miss, splits, at_rhyme, abs(line - targets[i]), p), span, open_groups))
            if not choices:  # validation checks the room; a traditional word that simplifies apart could still miss
                raise RequestError("bad_keywords", "keywords", "the keywords do not fit beside the prompt or acrostic")
            _, span, groups = min(choices, key=lambda c: c[0])
            for q, t in zip(span, word):
                placed[q] = t
            free -= set(span)
        total = misses(req, placed) + misses(req, forced_at)
        if best is None or total < best[0]:
            best = (total, s_index, placed, groups)
    total, s_index, placed, groups = best
    starts = BOTH
    if tone_req[0] != tone_req[1]:
        other = tone_req[1 - s_index]
        if misses(other, placed) + misses(other, forced_at) > total:
            starts = (LEVEL, OBLIQUE)[s_index]
    # A set no keyword rhymes in keeps its eligible groups: the model still chooses that rhyme.
    rhymed = {rhyme_at[p] for p in set(rhyme_at) & set(placed)}
    return placed, starts, tuple(g if k in rhymed else eligible[k] for k, g in enumerate(groups))


# ---------------------------------------------------------------------------------------------------------
# One row's progress through the poem.

# A line this short may repeat the line before (叠句: 如梦令's 知否，知否); a longer one never repeats any.
MAX_REFRAIN = 2


class RowState:
    """Where one decoding row is and what it may do next. Cheap to copy (beam search copies per step)."""

    __slots__ = ("plan", "pos", "done", "tokens", "used", "counts", "banned", "starts", "rhyme_groups", "lines",
                 "notes", "_forced", "mask_index", "step_banned")

    plan: PoemPlan
    pos: int  # text position of the next token (text_len → <eos>)
    done: bool  # <eos> taken
    tokens: list[int]  # the text so far, punctuation included
    used: list[int]  # the Han tokens of the text so far, in order (for a repetition penalty)
    counts: dict[int, int]  # Han token → uses, forced ones reserved from the start
    banned: list[int]  # tokens used twice (their third use is not allowed)
    starts: int  # the values s may still take: LEVEL | OBLIQUE bits (BOTH until a character fixes it)
    rhyme_groups: tuple[frozenset[int] | None, ...]  # per rhyme set: groups its rhymes so far share (None: none yet)
    lines: list[tuple[int, ...]]  # the finished lines
    notes: list[str]  # plan notes plus relaxations made on this row
    _forced: int | None  # the token the next position must hold, or None
    mask_index: int  # row of the mask table that applies next (MASK_NONE when forced)
    step_banned: list[int]  # tokens removed from that row of the table for this step only

    @classmethod
    def start(cls, plan: PoemPlan) -> RowState:
        row = cls.__new__(cls)
        row.plan, row.pos, row.done, row.tokens, row.used = plan, 0, False, [], []
        row.counts = dict(plan.reserved)
        row.banned = [t for t, n in row.counts.items() if n >= 2]
        row.starts, row.lines, row.notes = plan.starts, [], list(plan.notes)
        row.rhyme_groups = (None,) * len(plan.eligible_groups)
        row._prepare()
        return row

    def copy(self) -> RowState:
        row = RowState.__new__(RowState)
        row.plan, row.pos, row.done, row.starts, row.rhyme_groups = self.plan, self.pos, self.done, self.starts, self.rhyme_groups
        row.tokens, row.used, row.counts, row.banned = list(self.tokens), list(self.used), dict(self.counts), list(self.banned)
        row.lines, row.notes = list(self.lines), list(self.notes)
        row._forced, row.mask_index, row.step_banned = self._forced, self.mask_index, self.step_banned
        return row

    def forced(self) -> int | None:
        """The token that must come next (punctuation, <eos>, a prompt or acrostic character), or None."""
        return self._forced

    def formula_tokens(self) -> tuple[int, ...]:
        """Tokens that would complete one of the model's formulas here (the plan's `formulas`)."""
        formulas = self.plan.formulas
        if formulas is None or self._forced is not None or self.plan.layout.col_of[self.pos] < 3:
            return ()
        return formulas.completions(tuple(self.tokens[-3:]))

    @property
    def text(self) -> str:
        return self.plan.vocab.decode(self.tokens)

    @property
    def line_texts(self) -> list[str]:
        vocab = self.plan.vocab
        return ["".join(vocab.tokens[t] for t in line) for line in self.lines]

    def _note(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)

    def advance(self, token: int) -> None:
        """Take `token` at the current position and prepare the next one."""
        plan, vocab, layout = self.plan, self.plan.vocab, self.plan.layout
        if self.done:
            raise ValueError("advance() on a finished row")
        if self._forced is not None and token != self._forced:
            raise ValueError(f"position {self.pos} must hold {vocab.tokens[self._forced]!r}, got {vocab.tokens[token]!r}")
        pos = self.pos
        if pos == layout.text_len:
            self.done = True
            self._forced, self.mask_index, self.step_banned = None, MASK_NONE, []
            return
        self.tokens.append(token)
        if layout.is_mark(pos):  # a line mark closed a line
            n = layout.line_lengths[layout.line_of[pos]]
            line = tuple(self.tokens[-n - 1 : -1])
            if line in self.lines and not (n <= MAX_REFRAIN and self.lines[-1] == line):
                forced = any(p in plan.forced_at for p in range(pos - n, pos))
                self._note(f"repetition: line {len(self.lines) + 1} repeats line {self.lines.index(line) + 1} "
                           f"({'forced by the prompt' if forced else 'the repetition rule was relaxed'})")
            self.lines.append(line)
        else:
            if not vocab.first_han_id <= token < vocab.end_han_id:
                raise ValueError(f"position {pos} needs a Han character, got {vocab.tokens[token]!r}")
            self.used.append(token)
            is_forced = pos in plan.forced_at
            if not is_forced:
                n = self.counts[token] = self.counts.get(token, 0) + 1
                if n == 2:
                    self.banned.append(token)
            tones = plan.prosody.tones[token]
            ch = vocab.tokens[token]
            req_l, req_o = plan.tone_req[0][pos], plan.tone_req[1][pos]
            first_rhyme = pos == plan.first_rhyme and bool(plan.first_rhyme_groups & plan.book.token_groups[token])
            if first_rhyme:  # line 1 rhymes: its character opens the rhyme, as line 2's would
                self.rhyme_groups = (plan.first_rhyme_groups & plan.book.token_groups[token],) + self.rhyme_groups[1:]
            if req_l or req_o:
                starts = (LEVEL if self.starts & LEVEL and req_l & tones else 0) | \
                         (OBLIQUE if self.starts & OBLIQUE and req_o & tones else 0)
                if starts:
                    self.starts = starts
                elif is_forced and not first_rhyme:  # a free token was masked to fit, or the rule was relaxed
                    # here already; a forced first rhyme (次韵) is 首句入韵, not a bent tone
                    want = TONE_NAMES[(req_l if self.starts & LEVEL else 0) | (req_o if self.starts & OBLIQUE else 0)]
                    have = TONE_NAMES.get(tones, "of unknown tone")
                    self._note(f"tone: the forced 「{ch}」 at {layout.where(pos)} is {have} where the pattern "
                               f"needs {want}; the tone rule is relaxed there")
            k = plan.rhyme_at.get(pos)
            if k is not None:
                current = self.rhyme_groups[k]
                tone = plan.rhyme_tones[k]
                # A free token was masked to the eligible groups; a forced one may open any group of the tone.
                open_groups = current if current is not None else plan.tables.groups_of_tone(plan.book, tone)
                shared = open_groups & plan.book.token_groups[token]
                if k in plan.linked:  # a character of two groups keeps only those whose 部 the link allows
                    shared = shared & plan.eligible_groups[k] or shared
                if shared:
                    self.rhyme_groups = self.rhyme_groups[:k] + (shared,) + self.rhyme_groups[k + 1:]
                    self._link_rhymes(k, shared)
                elif is_forced:
                    self._note(f"rhyme: the forced 「{ch}」 ending line {layout.line_of[pos] + 1} is not a "
                               f"{'level' if tone == LEVEL else 'oblique'}-tone rhyme character"
                               f"{' of the chosen group' if current else ''}; the rhyme rule is relaxed for that line")
        self.pos += 1
        self._prepare()

    def _link_rhymes(self, k: int, shared: frozenset[int]) -> None:
        """Each rhyme of a linked set narrows the sets linked to it to the 部 its groups still allow (a
        character of two groups, 涯 in 支 and 佳, leaves two 部 open until a later rhyme decides)."""
        plan = self.plan
        bus = {plan.book.bu(g) for g in shared}
        for m in plan.linked.get(k, ()):
            current = self.rhyme_groups[m]
            groups = frozenset(g for g in (current if current is not None else plan.eligible_groups[m])
                               if plan.book.bu(g) in bus)
            if groups:
                self.rhyme_groups = self.rhyme_groups[:m] + (groups,) + self.rhyme_groups[m + 1:]
            else:  # a forced rhyme outside the 部 the sets share: m keeps its own
                self._note(f"rhyme: rhyme sets {_set_names((k, m))} cannot share a 部 after the forced "
                           f"character ending line {plan.layout.line_of[self.pos] + 1}; they rhyme apart")

    def _prepare(self) -> None:
        """Work out the next position's forced token or mask row, relaxing rules rather than allowing nothing."""
        plan, layout, pos = self.plan, self.plan.layout, self.pos
        self.step_banned = []
        self.mask_index = MASK_NONE
        if pos == layout.text_len:
            self._forced = plan.vocab.eos_id
            return
        line_no = layout.line_of[pos]
        col, n = layout.col_of[pos], layout.line_lengths[line_no]
        if col == n:
            self._forced = plan.vocab.period_id if layout.marks[line_no] == PERIOD else plan.vocab.comma_id
            return
        self._forced = plan.forced_at.get(pos)
        if self._forced is not None:
            return

        tables = plan.tables
        # Tone: the union of what each still-possible s asks for here (nothing, if either asks nothing).
        req_l, req_o = plan.tone_req[0][pos], plan.tone_req[1][pos]
        starts = self.starts
        if starts == BOTH:
            tone = req_l | req_o if req_l and req_o else 0
        else:
            tone = req_l if starts == LEVEL else req_o
        index = _TONE_MASK[tone]
        banned = list(self.banned)
        k = plan.rhyme_at.get(pos)
        if k is not None:
            groups = self.rhyme_groups[k]
            index = tables.rhyme_row(plan.book, groups if groups is not None else plan.eligible_groups[k])
            # No rhyme character twice (重韵): the earlier rhyme positions' characters are out here, except in
            # a short line repeating the one before (叠句, 如梦令's 知否，知否).
            rhymed = [self.tokens[p] for p in plan.rhyme_at if p < pos]
            first = plan.first_rhyme
            if first is not None and plan.first_rhyme_groups & plan.book.token_groups[self.tokens[first]]:
                rhymed.append(self.tokens[first])  # line 1 opened the rhyme: its character is not rhymed again
            if self._refrain(col, n):
                rhymed = [t for t in rhymed if t != self.lines[-1][-1]]
            banned += rhymed + list(plan.forced_rhymes)
        if col == n - 1:  # the line's last character must not complete a line written before (a short
            head = tuple(self.tokens[len(self.tokens) - col:])  # line may repeat the one just before)
            earlier = self.lines[:-1] if n <= MAX_REFRAIN else self.lines
            banned += [line[-1] for line in earlier if len(line) == n and line[:-1] == head]
            # Nor quote a line of the corpus: the softest rule, so it bends first, before tone or rhyme would.
            quoted = plan.known_lines.completions(head) if plan.known_lines is not None else []
            if quoted and not self._feasible(index, banned + quoted):
                self._note(f"quotation: every character left at {layout.where(pos)} would end a line of the "
                           f"corpus; the known-lines rule is relaxed there")
            else:
                banned += quoted

        if pos == plan.first_rhyme:  # 首句入韵 or not: the model chooses (the plain 仄 row if nothing is left)
            banned += plan.forced_rhymes
            first = tables.first_rhyme_row(plan.book, plan.first_rhyme_groups)
            index = first if self._feasible(first, banned) else index
        elif k is None and col == n - 1 and index == MASK_OBLIQUE:
            # An unrhymed line's end is heard most: a character read 平 today (空, 乡) does not sound 仄 there.
            # A preference, not a rule: without such a character the plain 仄 row serves, and no note.
            index = MASK_OBLIQUE_END if self._feasible(MASK_OBLIQUE_END, banned) else MASK_OBLIQUE
        # Relax until something is allowed: tone, then rhyme, then repetition. At a rhyme position the rhyme
        # row already carries the tone, so rhyme goes first there (dropping tone alone would change nothing).
        # tables.counts makes the usual case one comparison; the exact check runs only when bans could
        # empty the row.
        rhymes = k is not None
        if not rhymes and tone and not self._feasible(index, banned):
            self._note(f"tone: no character fits the tone pattern at {layout.where(pos)}; the tone rule is relaxed there")
            index = MASK_HAN
        if rhymes and not self._feasible(index, banned):
            self._note(f"rhyme: no character of the rhyme group can end line {line_no + 1}; "
                       f"the rhyme rule is relaxed for that line")
            index = _TONE_MASK[tone]
            if tone and not self._feasible(index, banned):
                self._note(f"tone: no character fits the tone pattern at {layout.where(pos)}; the tone rule is relaxed there")
                index = MASK_HAN
        if not self._feasible(index, banned):
            self._note(f"repetition: every character left at {layout.where(pos)} was used twice already; "
                       f"the repetition rule is relaxed there")
            banned = []
        self.mask_index, self.step_banned = index, banned

    def _refrain(self, col: int, n: int) -> bool:
        """The line being written (column `col` of `n`) is short and so far repeats the line before."""
        return (n <= MAX_REFRAIN and bool(self.lines) and len(self.lines[-1]) == n
                and tuple(self.tokens[len(self.tokens) - col:]) == self.lines[-1][:col])

    def _feasible(self, index: int, banned: list[int]) -> bool:
        tables = self.plan.tables
        if tables.counts[index] > len(banned):
            return True
        if tables.counts[index] == 0:
            return False
        return bool(set(tables.allowed_ids(index)) - set(banned))


def beam_children(rows: list[RowState], parents: list[int]) -> list[RowState]:
    """The beam rows for the next step: a parent's first child reuses it, later children get copies."""
    out, taken = [], set()
    for p in parents:
        out.append(rows[p].copy() if p in taken else rows[p])
        taken.add(p)
    return out  # all copies exist before the caller advances any row
