"""Rows whose decoding state lives in tensors (DeviceRows, DeviceBatch) follow RowState's rules exactly.

Run on the CPU here; tests/test_cuda.py runs the same comparison on a GPU. The tiny fixture vocabulary runs
out of rhymes and tones often, so the relaxations (and the notes the host replays) are exercised too.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import random
from dataclasses import replace

import pytest
import torch
from conftest import FIXTURE_CHARS
from engine_fixtures import checkpoint_store, engine_settings  # noqa: F401
from test_engine_local import mixed_requests

from engine.api import PoemRequest
from engine.poem.constraints import RowState, build_plan
from engine.poem.device_rows import DeviceRows, FormulaTable, KnownTable, device_tables
from engine.poem.forms import FORMS
from engine.poem.known_lines import KNOWN_LINES_FILE, KnownLines, known_lines_from
from engine.poem.prosody import prosody_for
from engine.poem.rhymes import char_info
from engine.poem.vocab import Vocab
from engine.sampling import kernels
from engine.sampling.choice import REPEAT_PENALTY, step_bias
from engine.sampling.formulas import Formulas
from engine.serving.local import EngineSettings, LocalEngine
from engine.serving.registry import build_serving
from engine.serving.runner import row_state_of


def varied_requests(n: int) -> list[PoemRequest]:
    """test_engine_local's mixed requests (every mode, form, beam width and rule switch, acrostics, both
    models), with keywords and with prompts that bend the rules, so that notes are written."""
    out = []
    for i, request in enumerate(mixed_requests(n)):
        keywords = ["明月"] if i % 7 == 5 else ["山", "水"] if i % 11 == 6 else []
        # Prompts that break the tone pattern, repeat a character or end a line off the rhyme: notes.
        prompt = ("月", "月山", "不见不见不见不", "白日登山望千万里")[i % 4] if request.prompt else ""
        # 次韵 (with line 1 every other time): forced line ends, and a forced first rhyme.
        first = (i // 5) % 2
        rhymes = ("明城声情名" if first else "城声情名")[:FORMS[request.form].num_lines // 2 + first] if i % 5 == 2 and len(prompt) < 5 else None
        out.append(replace(request, prompt=prompt, keywords=keywords, rhymes=rhymes, seed=2000 + i).validate())
    return out


async def serve(root, requests, row_state: str):
    async with LocalEngine(engine_settings(root, max_num_rows=96, max_queue=128, row_state=row_state)) as engine:
        together = await asyncio.gather(*(engine.generate(r) for r in requests))
        kinds = {type(b).__name__ for b in engine.runner.batches.values()}
    return together, kinds


@pytest.mark.parametrize("choice", ["c-kernels", "torch"])
async def test_device_rows_write_the_poems_and_notes_host_rows_write(checkpoint_store, monkeypatch, choice):
    # "torch" is the choice a GPU makes (dense bias, sample_sorted is a GPU's only, the rest the same ops).
    if choice == "torch":
        monkeypatch.setattr(kernels, "AVAILABLE", False)
    requests = varied_requests(72)
    # The store's known lines are the lines these requests write without them, so the ban bites often.
    before, _ = await serve(checkpoint_store, requests, "host")
    known_lines_from(line for r in before for line in r.lines).save(checkpoint_store / KNOWN_LINES_FILE)
    host, host_kinds = await serve(checkpoint_store, requests, "host")
    device, device_kinds = await serve(checkpoint_store, requests, "device")
    graph, graph_kinds = await serve(checkpoint_store, requests, "graph")
    assert host_kinds <= {"ModelBatch"} and device_kinds <= {"DeviceBatch"} and graph_kinds <= {"GraphBatch"}
    assert sum(a.poem != b.poem for a, b in zip(before, host)) >= 20
    notes = 0
    for request, a, b, c in zip(requests, host, device, graph):
        assert (a.poem, a.lines, a.notes, a.model) == (b.poem, b.lines, b.notes, b.model), request
        assert (a.poem, a.lines, a.notes, a.model) == (c.poem, c.lines, c.notes, c.model), request
        assert b.score == pytest.approx(a.score, rel=1e-4, abs=1e-3)  # float sums in another order
        assert c.score == pytest.approx(a.score, rel=1e-4, abs=1e-3)
        notes += len(a.notes) > 0
    assert notes >= 10  # the relaxations were exercised, not just the easy path


def random_walk(plans, penalties, tables, formulas, known, seed: int, favoured: list[int]):
    """Advance RowStates and DeviceRows side by side with random allowed tokens; yield both biases each step,
    and the device rows' flags with this step's bends.
    The walk often copies the line before (so a line's last character can be banned for completing it) and
    often takes a `favoured` token (so formulas get completed)."""
    rng = random.Random(seed)
    rows = [plan.new_row() for plan in plans]
    gen = torch.Generator().manual_seed(seed)
    device = DeviceRows.new(tables, formulas, known,
                            [(plan, 1, p, (1.0, 0, 1.0), gen, 0) for plan, p in zip(plans, penalties)])
    for _ in range(plans[0].num_steps):
        host_bias = step_bias(rows, penalties, "cpu").dense()
        device_bias, bent = device.bias()
        yield rows, host_bias, device_bias, device.flags | bent
        tokens = []
        for i, (r, b) in enumerate(zip(rows, host_bias)):
            allowed = set(torch.isfinite(b).nonzero().flatten().tolist())
            layout = r.plan.layout
            col = layout.col_of[min(r.pos, layout.text_len - 1)]
            copies = random.Random(seed * 1000 + i * 10 + len(r.lines)).random() < 0.5  # this line copies the last
            above = [r.lines[-1][col]] if r.lines and col < len(r.lines[-1]) and copies else []
            # Spending the open rhyme groups' characters early makes the later rhymes run dry: relaxations.
            groups = r.rhyme_groups[0] if r.rhyme_groups and r.rhyme_groups[0] else r.plan.eligible_groups[0]
            rhymes = r.plan.book.matrix[sorted(groups)].any(dim=0).nonzero().flatten().tolist() if groups else []
            liked = [t for t in (favoured if rng.random() < 0.5 else rhymes) if t in allowed]
            tokens.append(next(iter(allowed & set(above)), None) or (rng.choice(liked) if liked else rng.choice(sorted(allowed))))
            r.advance(tokens[-1])
        device.advance(torch.tensor(tokens), bent)


def quotes_a_known_line(row) -> bool:
    """The row is at a free last character of a line where some token would complete a known line."""
    layout, pos, known = row.plan.layout, row.pos, row.plan.known_lines
    if known is None or row.forced() is not None or pos >= layout.text_len:
        return False
    col, n = layout.col_of[pos], layout.line_lengths[layout.line_of[pos]]
    return col == n - 1 and bool(known.completions(row.tokens[len(row.tokens) - col:]))


@functools.cache
def walk_known_lines(han: tuple[str, ...]) -> KnownLines:
    """Known lines the walks below run into: every head of the favoured characters (and the echo prompt's
    head) ending on many characters, so that a line's end is often banned and, with sixteen characters,
    sometimes every character is."""
    lasts = han[:16]
    lines = []
    for n, favoured in ((5, han[:6]), (7, han[:3])):
        for head in itertools.product(favoured, repeat=n - 1):
            lines += ["".join(head) + last for last in lasts]
        lines += ["".join(han[:n - 1]) + last for last in lasts]  # the echo prompt's second line
        lines += ["".join(head) + "龘" for head in itertools.product(han[:3], repeat=n - 1)]  # a last character the model lacks
    return known_lines_from(lines)


def completes_a_line(row) -> bool:
    """The row is at a line's last character, and the line so far repeats the head of an earlier line."""
    layout, pos = row.plan.layout, row.pos
    if row.forced() is not None or pos >= layout.text_len:
        return False
    col, n = layout.col_of[pos], layout.line_lengths[layout.line_of[pos]]
    head = tuple(row.tokens[len(row.tokens) - col:])
    return col == n - 1 and any(line[:-1] == head for line in row.lines)


# The fixture's 180 characters, and 16 with which every rule runs dry: rhymes, tones, then characters; no
# level character at all (no rhyme group: the device tables were once float there); no rhyme group with room
# for line 1 to rhyme, and characters of both tones commonly read level (line 1 falls back to the 仄 row).
VOCABS = {"fixture": FIXTURE_CHARS, "sixteen": "床前明月光疑是地上霜举头望低思故乡",
          "oblique": "月日白雪石玉绿竹叶落影去鸟树草柳", "heard": "空中深思乡帆龙闻临行轻衣相离山花风云春秋天人"}


@pytest.mark.parametrize("chars", list(VOCABS))
@pytest.mark.parametrize("form", list(FORMS))
def test_the_step_bias_matches_row_for_row_along_random_poems(form, chars):
    vocab = Vocab.build([VOCABS[chars]])
    prosody = prosody_for(vocab)
    # Formulas over the vocabulary's own characters, so that the formula penalty takes part too.
    han = [vocab.tokens[i] for i in vocab.han_ids()]
    formulas = Formulas.of_texts(["".join(c) for c in itertools.permutations(han[:6], 4)][:200], vocab)
    n = FORMS[form].line_len
    # Two whole lines of prompt end the first rhyming line on 月, which rhymes in no level group; an echo
    # prompt repeats line 1 but for its last character, which is then banned there.
    moon = "月" if "月" in vocab else han[0]
    word = "明月" if "明" in vocab and "月" in vocab else han[1] + han[0]
    forced_rhyme = moon * n * 2
    echo = "".join(han[:n]) + "".join(han[:n - 1])
    # 次韵 beside the one-character prompt, line 1 included every other time: forced rhymes that free rhymes,
    # line 1's too, must not take again.
    groups = {}
    for ch in han:
        info = char_info(ch)
        if ch != moon and info and info.level and not info.oblique:
            for g in info.groups:
                groups.setdefault(g, []).append(ch)
    level = max(groups.values(), key=len, default=[])  # of one group, so that line 1 may rhyme with them
    rhyming = FORMS[form].num_lines // 2
    rhymes = lambda i: ("".join(level[:rhyming + (i % 8 == 0)]) if i % 4 == 0 and len(level) > rhyming else None)
    requests = [PoemRequest(form=form, seed=i, prompt=(moon, "", forced_rhyme, echo)[i % 4], tone=i % 4 != 1,
                            rhyme=i % 5 != 2, keywords=[word] if i % 6 == 1 else [], rhymes=rhymes(i)).validate()
                for i in range(18)]
    known = walk_known_lines(tuple(han)).for_vocab(vocab)
    # Most plans ban known lines; every fifth does not (a row of the batch without the table).
    plans = [build_plan(vocab, prosody, r, formulas, known if i % 5 != 4 else None) for i, r in enumerate(requests)]
    # Every mode pays REPEAT_PENALTY; a row's penalty is still a parameter, and 0 keeps its gating tested.
    penalties = [0.0 if i % 3 == 2 else REPEAT_PENALTY for i in range(len(plans))]
    tables = device_tables(prosody, torch.device("cpu"))
    table = FormulaTable.of(formulas, len(vocab), "cpu")
    favoured = [vocab.index[ch] for ch in han[:6]]
    seen = {"formula": 0, "line ban": 0, "known line": 0, "bent": 0}
    for seed in range(8):
        if seed >= 3 and all(seen.values()):
            break
        for rows, host_bias, device_bias, device_flags in random_walk(plans, penalties, tables, table,
                                                                KnownTable.of(known, "cpu"), seed, favoured):
            assert torch.equal(host_bias, device_bias)
            seen["formula"] += sum(bool(r.formula_tokens()) for r, p in zip(rows, penalties) if p)
            seen["line ban"] += sum(map(completes_a_line, rows))
            seen["known line"] += sum(map(quotes_a_known_line, rows))
            # A row is flagged once a rule bent on it, which grows its notes beyond the plan's. (The plan may
            # have worded a bend already, forced tones for one: a flag then only costs a replay.)
            bent = [any(not n.startswith("repetition: line") for n in r.notes[len(r.plan.notes):]) for r in rows]
            flags = device_flags.tolist()
            assert all(f for f, b in zip(flags, bent) if b)
            assert all(f == b for f, b, r in zip(flags, bent, rows) if not r.plan.notes)
            seen["bent"] += sum(bent)
    assert all(seen.values()), seen  # every rule took part


def test_every_relaxation_is_met_on_the_way(monkeypatch):
    """The walks above bend every soft rule (so the comparison covers each relaxation's branch)."""
    relaxed = set()
    original = RowState._note

    def note(row, message):
        relaxed.add(message.split(" ")[0] + (" after rhyme" if "tone" in message and relaxed_rhyme(row) else ""))
        original(row, message)

    def relaxed_rhyme(row):
        return any(n.startswith("rhyme: no character") for n in row.notes)

    monkeypatch.setattr(RowState, "_note", note)
    for form in FORMS:
        test_the_step_bias_matches_row_for_row_along_random_poems(form, "sixteen")
    assert {"tone:", "rhyme:", "repetition:", "tone: after rhyme", "quotation:"} <= relaxed, relaxed


def test_a_beam_row_continues_its_parents_state(tiny_checkpoint):
    serving = build_serving("lstm", tiny_checkpoint, torch.device("cpu"))
    plan = build_plan(serving.vocab, serving.prosody, PoemRequest(form="wujue", prompt="月").validate())
    tables = device_tables(serving.prosody, torch.device("cpu"))
    rows = DeviceRows.new(tables, None, None, [(plan, 2, 1.0, (1.0, 0, 1.0), torch.Generator(), 6)])
    first = torch.tensor([serving.vocab.index["月"]] * 2)
    rows.advance(first, torch.zeros(2, dtype=torch.bool))
    bias, bent = rows.bias()
    a, b = (int(torch.isfinite(bias[0]).nonzero()[k]) for k in (0, 1))
    rows.advance(torch.tensor([a, b]), bent)
    swapped = rows.take(torch.tensor([1, 1]))
    assert swapped.history[:, :2].tolist() == [[first[0].item(), b]] * 2
    assert torch.equal(swapped.uses[0], rows.uses[1]) and torch.equal(swapped.counts[0], rows.counts[1])
    assert torch.equal(swapped.forced, rows.forced)  # the plan's fields stay


def test_row_state_is_a_checked_setting_and_a_ci_model_keeps_host_rows(tiny_checkpoint, tiny_ci_checkpoint):
    assert EngineSettings(row_state="device").validate().row_state == "device"
    assert EngineSettings.from_env({"ENGINE_ROW_STATE": "host"}).row_state == "host"
    with pytest.raises(ValueError, match="ENGINE_ROW_STATE"):
        EngineSettings.from_env({"ENGINE_ROW_STATE": "auto"})
    cpu = torch.device("cpu")
    shi, ci = build_serving("lstm", tiny_checkpoint, cpu), build_serving("ci", tiny_ci_checkpoint, cpu)
    assert [row_state_of(r, shi) for r in ("host", "device", "graph")] == ["host", "device", "graph"]
    # A vocabulary that writes 词 keeps host rows: DeviceRows hold the regular forms only.
    assert row_state_of("device", ci) == row_state_of("graph", ci) == "host"
