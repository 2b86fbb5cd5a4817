"""Quality report: how often poems keep their form, rhyme and tone, how much they repeat and copy, how fast.

    python -m trainer quality --checkpoint runs/lstm/best.safetensors --corpus ../shared/corpus/chinese-poetry --n 20

For every form × mode it writes N poems from a list of opening characters twice: with the constraints
(engine.reference.generate_one) and unconstrained, as a plain character model decodes (no masks: feed the form token and the opening,
then take tokens until <eos> or FREE_MAX_LEN). It prints JSON (one object per cell) and then a table.

Each poem is judged by engine.poem.judge.check_poem, the judge the engine and the retrain gate use too.

What a reader notices beyond form: whether the poems say the same things whatever the prompt. With
`--variety N` it writes one poem per mode for each of N different opening characters and reports

    shared_lines     the share of lines that stand in two or more of the poems
    formula_4grams   the share of 4-character spans (within a line) that are formulas: spans found in
                     FORMULA_SHARE (5 %) or more of the poems
    distinct_2       distinct character bigrams over all bigrams

and with `--held-out N --corpus DIR` the per-character perplexity on N poems of the corpus's held-out
split (the same hash split training leaves out).

For a model trained on 词, `--ci N` writes N 词 per tune × mode (every tune of engine.poem.tunes, or those
named by `--tunes`) and reports per tune the share with the tune's exact structure, with its rhymes
(engine.poem.tunes.check_ci, 词林正韵) and the agreement with its strong tones, then per mode the variety
measures above over all of them. `--held-out` then measures held-out 词 as well.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from engine.api import MODES, PoemRequest
from engine.errors import RequestError
from engine.model.checkpoint import DEFAULT_CHECKPOINT
from engine.poem.forms import FORM_NAMES, FORMS, Form
from engine.poem.judge import check_poem
from engine.poem.known_lines import KnownLines
from engine.reference import generate_one
from engine.sampling.choice import NEG_INF, make_generator, sample
from trainer.corpus import CorpusError, load_corpus, split
from trainer.evaluate import perplexity

OPENINGS = "月春山风花江秋夜云雪"  # one per poem, in turn
# 100 common opening characters, one poem each for the variety measures.
VARIETY_OPENINGS = ("月春山风花江秋夜云雪日天水人白青长高清孤落寒烟野西东南北千万一三何独远古空明新"
                    "红绿黄碧金玉石松竹柳桃梅菊草木林溪泉湖海雨霜露星晚朝暮晓夕歌酒诗书琴剑马舟楼门"
                    "城关路家乡故归客行来去闲幽深声光影心梦思愁鸟")
FORMULA_SHARE = 0.05  # a 4-gram in this share of the poems or more is a formula
FREE_MAX_LEN = 125  # the classic recipe pads its training rows to 125 tokens (trainer.data.CLASSIC_LEN)


# ---------------------------------------------------------------------------------------------------------
# Unconstrained decoding: a plain character model's way


@torch.no_grad()
def generate_free(model, vocab, form: Form, mode: str, prompt: str = "", seed: int = 0, beam_width: int = 5,
                  temperature: float = 0.8, top_p: float = 0.9, max_len: int = FREE_MAX_LEN) -> str:
    """No masks: <form> + prompt, then tokens until <eos> or `max_len`. Returns the decoded text."""
    device = next(model.parameters()).device
    prefix = [vocab.form_id(form.name)] + [vocab.index[c] for c in prompt if c in vocab]
    if mode == "beam":
        return vocab.decode(_free_beam(model, vocab, prefix, beam_width, max_len))
    generator = make_generator(seed)
    logits, state = model(torch.tensor([prefix], device=device))  # (1, T, V)
    logits = logits[:, -1]
    out = prefix[1:]
    while len(out) < max_len:
        if mode == "greedy":
            token = int(logits[0].argmax())
        else:
            token = sample(logits[0], temperature, 0, top_p, generator)
        if token == vocab.eos_id:
            break
        out.append(token)
        logits, state = model.step(torch.tensor([token], device=device), state)
    return vocab.decode(out)


def _free_beam(model, vocab, prefix: list[int], width: int, max_len: int) -> list[int]:
    """Plain beam search: finished hypotheses leave the beam at <eos>; the best finished one wins."""
    device = next(model.parameters()).device
    logits, state = model(torch.tensor([prefix], device=device))
    logprobs = torch.log_softmax(logits[:, -1].float(), dim=-1)  # (1, V)
    beams, scores = [prefix[1:]], torch.zeros(1, device=device)
    finished: list[tuple[float, list[int]]] = []
    while beams and len(beams[0]) < max_len and len(finished) < width:
        total = (scores[:, None] + logprobs).flatten()  # (k·V,)
        top, flat = total.topk(min(width * 2, total.numel()))
        V = logprobs.shape[1]
        keep_rows, keep_tokens, keep_scores = [], [], []
        for s, f in zip(top.tolist(), flat.tolist()):
            parent, token = divmod(f, V)
            if s == NEG_INF:
                break
            if token == vocab.eos_id:
                finished.append((s, beams[parent]))
            elif len(keep_rows) < width:
                keep_rows.append(parent), keep_tokens.append(token), keep_scores.append(s)
        if not keep_rows:
            break
        index = torch.tensor(keep_rows, device=device)
        beams = [beams[p] + [t] for p, t in zip(keep_rows, keep_tokens)]
        scores = torch.tensor(keep_scores, device=device)
        logits, state = model.step(torch.tensor(keep_tokens, device=device), state[:, index])
        logprobs = torch.log_softmax(logits.float(), dim=-1)
    if finished:
        return max(finished, key=lambda f: f[0])[1]
    return beams[0] if beams else []


# ---------------------------------------------------------------------------------------------------------
# The report


@dataclass
class Cell:
    form: str
    mode: str
    decoding: str  # "constrained" | "free"
    poems: int = 0
    form_valid: float = 0.0
    rhyme: float = 0.0
    tone_agreement: float = 0.0  # mean over form-valid poems
    repeat3: float = 0.0  # share of poems with a character used 3+ times
    distinct_1: float = 0.0
    distinct_2: float = 0.0
    copied_lines: float | None = None  # share of lines found verbatim in the corpus (None without --corpus)
    poems_per_s: float = 0.0
    examples: list[str] = field(default_factory=list)


def summarise(cell: Cell, texts: list[str], form: Form, prosody, seconds: float, corpus_lines: set[str] | None) -> Cell:
    checks = [check_poem(t, form, prosody) for t in texts]
    n = max(1, len(checks))
    valid = [c for c in checks if c.form_valid]
    chars = [ch for c in checks for line in c.lines for ch in line]
    bigrams = [line[i : i + 2] for c in checks for line in c.lines for i in range(len(line) - 1)]
    all_lines = [line for c in checks for line in c.lines]
    cell.poems = len(texts)
    cell.form_valid = len(valid) / n
    cell.rhyme = sum(c.rhyme for c in checks) / n
    cell.tone_agreement = sum(c.tone_agreement for c in valid) / len(valid) if valid else 0.0
    cell.repeat3 = sum(bool(c.repeated_chars) for c in checks) / n
    cell.distinct_1 = len(set(chars)) / max(1, len(chars))
    cell.distinct_2 = len(set(bigrams)) / max(1, len(bigrams))
    if corpus_lines is not None:
        cell.copied_lines = sum(line in corpus_lines for line in all_lines) / max(1, len(all_lines))
    cell.poems_per_s = len(texts) / seconds if seconds > 0 else 0.0
    cell.examples = texts[:2]
    return cell


def evaluate(model, vocab, prosody, forms: list[str], modes: list[str], n: int, openings: str = OPENINGS,
             beam_width: int = 5, seed: int = 0, corpus_lines: set[str] | None = None, tone: bool = True,
             known_lines=None) -> list[Cell]:
    openings = "".join(c for c in openings if c in vocab) or ""
    cells = []
    for form_name in forms:
        form = FORMS[form_name]
        for mode in modes:
            prompts = [openings[i % len(openings)] if openings else "" for i in range(n)]
            start = time.perf_counter()
            texts = [generate_one(model, vocab, prosody,
                                  PoemRequest(prompt=p, form=form_name, mode=mode, beam_width=beam_width,
                                              seed=seed + i, tone=tone), known_lines=known_lines).poem
                     for i, p in enumerate(prompts)]
            cells.append(summarise(Cell(form_name, mode, "constrained"), texts, form, prosody,
                                   time.perf_counter() - start, corpus_lines))
            start = time.perf_counter()
            texts = [generate_free(model, vocab, form, mode, p, seed=seed + i, beam_width=beam_width)
                     for i, p in enumerate(prompts)]
            cells.append(summarise(Cell(form_name, mode, "free"), texts, form, prosody,
                                   time.perf_counter() - start, corpus_lines))
    return cells


def format_table(cells: list[Cell]) -> str:
    head = ("form", "mode", "decoding", "n", "form ok", "rhyme", "tone", "rep3+", "dist-1", "dist-2", "copied", "poems/s")
    rows = [head]
    pct = lambda x: "–" if x is None else f"{100 * x:.0f}%"  # noqa: E731
    for c in cells:
        rows.append((c.form, c.mode, c.decoding, str(c.poems), pct(c.form_valid), pct(c.rhyme), pct(c.tone_agreement),
                     pct(c.repeat3), f"{c.distinct_1:.2f}", f"{c.distinct_2:.2f}", pct(c.copied_lines),
                     f"{c.poems_per_s:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def format_ci_table(rows: list[dict]) -> str:
    out = ["| tune | mode | n | structure | rhyme | tone |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    out += [f"| {r['tune']} | {r['mode']} | {r['poems']} | {r['structure']:.0%} | {r['rhyme']:.0%} | "
            f"{r['tone_agreement']:.0%} |" for r in rows]
    return "\n".join(out)


def variety(poems: list[list[str]]) -> dict:
    """Cross-poem repetition of a set of poems (each a list of lines): see the module docstring."""
    line_poems: Counter = Counter()
    gram_poems: Counter = Counter()
    bigrams = []
    for lines in poems:
        line_poems.update(set(lines))
        gram_poems.update({line[i:i + 4] for line in lines for i in range(len(line) - 3)})
        bigrams += [line[i:i + 2] for line in lines for i in range(len(line) - 1)]
    all_lines = [line for lines in poems for line in lines]
    grams = [line[i:i + 4] for lines in poems for line in lines for i in range(len(line) - 3)]
    formula = {g for g, n in gram_poems.items() if n >= max(2, FORMULA_SHARE * len(poems))}
    return {"poems": len(poems),
            "shared_lines": sum(line_poems[line] >= 2 for line in all_lines) / max(1, len(all_lines)),
            "formula_4grams": sum(g in formula for g in grams) / max(1, len(grams)),
            "distinct_2": len(set(bigrams)) / max(1, len(bigrams)),
            "top_formulas": [g for g, _ in gram_poems.most_common(8) if g in formula]}


def variety_report(model, vocab, prosody, form: str, modes: list[str], openings: str, beam_width: int = 5,
                   seed: int = 0, generate=None, known_lines=None) -> dict:
    """{mode: variety(...)} over one poem per opening character (those the vocabulary holds).
    `generate(request) -> PoemResult` decodes; the reference decoder by default."""
    generate = generate or (lambda request: generate_one(model, vocab, prosody, request, known_lines=known_lines))
    openings = [c for c in dict.fromkeys(openings) if c in vocab]
    out = {}
    for mode in modes:
        results = [generate(PoemRequest(prompt=c, form=form, mode=mode, beam_width=beam_width, seed=seed + i))
                   for i, c in enumerate(openings)]
        out[mode] = variety([r.lines for r in results]) | {"examples": [r.poem for r in results[:3]]}
    return out


def ci_report(model, vocab, prosody, tunes: list[str], modes: list[str], n: int, openings: str = OPENINGS,
              beam_width: int = 5, seed: int = 0, known_lines=None) -> dict:
    """{"tunes": [{tune, mode, poems, structure, rhyme, tone_agreement, example}], "variety": {mode: variety}}."""
    from engine.poem.tunes import TUNES, check_ci

    openings = "".join(c for c in openings if c in vocab) or ""
    rows, by_mode = [], {mode: [] for mode in modes}
    for name in tunes:
        tune = TUNES[name]
        for mode in modes:
            results = [generate_one(model, vocab, prosody,
                                    PoemRequest(prompt=openings[i % len(openings)] if openings else "", form="ci",
                                                tune=name, mode=mode, beam_width=beam_width, seed=seed + i),
                                    known_lines=known_lines)
                       for i in range(n)]
            checks = [check_ci(tune, r.poem) for r in results]
            rows.append({"tune": name, "mode": mode, "poems": n,
                         "structure": sum(c.structure_ok for c in checks) / max(1, n),
                         "rhyme": sum(c.rhyme_ok for c in checks) / max(1, n),
                         "tone_agreement": sum(c.tone_agreement for c in checks) / max(1, n),
                         "example": results[0].poem if results else ""})
            by_mode[mode] += [r.lines for r in results]
    return {"tunes": rows, "variety": {mode: variety(poems) for mode, poems in by_mode.items()}}


def held_out_ci(paths: list[str], n: int) -> list:
    """The first `n` held-out 词 (trainer.data.ci_poems), in a fixed order."""
    from trainer.data import ci_poems

    _, val = split(ci_poems(load_corpus(paths, include_ci=True)))
    return sorted(val, key=lambda p: hashlib.sha1(p.text.encode()).hexdigest())[:n]


def held_out_poems(paths: list[str], n: int, forms=FORM_NAMES) -> list:
    """The first `n` held-out poems of the given forms, in a fixed order (the split training leaves out)."""
    _, val = split(load_corpus(paths).regular())
    val = sorted((p for p in val if p.form in forms), key=lambda p: hashlib.sha1(p.text.encode()).hexdigest())
    return val[:n]


def corpus_line_set(paths: list[str]) -> set[str]:
    return {line for poem in load_corpus(paths).poems for line in poem.lines}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default=None, help=f"default {DEFAULT_CHECKPOINT}")
    parser.add_argument("--corpus", nargs="*", default=None, help="corpus dir(s) for the copied-lines share")
    parser.add_argument("--known-lines", default=None, metavar="PATH",
                        help="decode as an engine with this known-lines table does (python -m trainer corpus lines)")
    parser.add_argument("--n", "--poems-per-cell", dest="n", type=int, default=20, help="poems per form × mode")
    parser.add_argument("--forms", nargs="*", default=list(FORM_NAMES), choices=FORM_NAMES)
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    parser.add_argument("--openings", default=OPENINGS, help="opening characters, one per poem in turn")
    parser.add_argument("--beam-width", type=int, default=5)
    parser.add_argument("--no-tone", action="store_true", help="constrained poems without the tone rule")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variety", type=int, default=0, metavar="N",
                        help="also write one poem per mode for N different openings and report shared lines, "
                             f"formulas and distinct-2 (at most {len(VARIETY_OPENINGS)})")
    parser.add_argument("--variety-form", default="qijue", choices=FORM_NAMES)
    parser.add_argument("--held-out", type=int, default=0, metavar="N",
                        help="also the perplexity on N held-out poems of --corpus (and N held-out 词, with --ci)")
    parser.add_argument("--ci", type=int, default=0, metavar="N", help="also N 词 per tune × mode (a model trained on 词)")
    parser.add_argument("--tunes", nargs="*", default=None, help="the tunes for --ci (default: every tune)")


def main(args: argparse.Namespace) -> int:
    from engine.model.checkpoint import CheckpointError, load_checkpoint
    from engine.poem.prosody import prosody_for

    path = Path(args.checkpoint) if args.checkpoint else DEFAULT_CHECKPOINT
    from engine.poem.tunes import TUNES

    from engine.poem.tunes import parse_tune

    tunes, unknown = [], []
    for name in args.tunes or ():
        try:
            tunes.append(parse_tune(name).name)
        except ValueError:
            unknown.append(name)
    problem = ("--n, --variety, --held-out and --ci must not be negative" if min(args.n, args.variety, args.held_out, args.ci) < 0
               else f"unknown tune {unknown[0]!r}" if unknown
               else "--held-out needs --corpus" if args.held_out and not args.corpus
               else f"--variety takes at most {len(VARIETY_OPENINGS)}" if args.variety > len(VARIETY_OPENINGS)
               else None)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    report: dict = {"checkpoint": str(path)}
    try:
        ckpt = load_checkpoint(path, device=args.device)
        prosody = prosody_for(ckpt.vocab)
        report["version"] = ckpt.version
        known = None
        if args.known_lines:
            try:
                known = KnownLines.load(args.known_lines)
            except ValueError as e:
                raise OSError(str(e)) from None
            report["known_lines"] = len(known)
        cells = []
        if args.n:
            corpus_lines = corpus_line_set(args.corpus) if args.corpus else None
            cells = evaluate(ckpt.model, ckpt.vocab, prosody, args.forms, args.modes, args.n,
                             args.openings, args.beam_width, args.seed, corpus_lines, tone=not args.no_tone,
                             known_lines=known)
            report["cells"] = [asdict(c) for c in cells]
        if args.variety:
            report["variety"] = variety_report(ckpt.model, ckpt.vocab, prosody, args.variety_form, args.modes,
                                               VARIETY_OPENINGS[: args.variety], args.beam_width, args.seed,
                                               known_lines=known)
        if args.ci:
            if not ckpt.vocab.writes_ci:
                raise RequestError("no_ci", "form", f"{path} was not trained on 词")
            report["ci"] = ci_report(ckpt.model, ckpt.vocab, prosody, tunes or list(TUNES), args.modes, args.ci,
                                     args.openings, args.beam_width, args.seed, known_lines=known)
        if args.held_out:
            report["held_out"] = perplexity(ckpt.model, ckpt.vocab, held_out_poems(args.corpus, args.held_out))
            if args.ci:
                report["held_out_ci"] = perplexity(ckpt.model, ckpt.vocab, held_out_ci(args.corpus, args.held_out))
    except (CheckpointError, CorpusError, RequestError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, ensure_ascii=False, indent=2))
    if cells:
        print(format_table(cells))
    for mode, v in report.get("variety", {}).items():
        print(f"variety {mode}: {v['poems']} openings, shared lines {v['shared_lines']:.0%}, "
              f"formula 4-grams {v['formula_4grams']:.0%}, distinct-2 {v['distinct_2']:.2f}")
    if "ci" in report:
        print(format_ci_table(report["ci"]["tunes"]))
        for mode, v in report["ci"]["variety"].items():
            print(f"词 variety {mode}: {v['poems']} 词, shared lines {v['shared_lines']:.0%}, "
                  f"formula 4-grams {v['formula_4grams']:.0%}, distinct-2 {v['distinct_2']:.2f}")
    if "held_out" in report:
        print(f"held-out perplexity: {report['held_out']['ppl']:.1f} over {report['held_out']['poems']} poems")
    if "held_out_ci" in report:
        print(f"held-out 词 perplexity: {report['held_out_ci']['ppl']:.1f} over {report['held_out_ci']['poems']} 词")
    return 0
