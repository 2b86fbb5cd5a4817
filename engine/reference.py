"""The one-request reference decoder: `generate_one` writes one poem a step at a time, with the same plan,
bias and choice as the batched engine; the engine is tested against it and the benchmarks use it as the
unbatched baseline. It is also the CLI:

    python -m engine generate 月 --form qijue --mode beam --beam-width 5 --seed 7 --checkpoint PATH
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from engine.api import DEFAULT_TEMPERATURE, MAX_BEAM_WIDTH, MODES, PoemRequest, PoemResult
from engine.errors import RequestError
from engine.model.checkpoint import DEFAULT_CHECKPOINT
from engine.model.network import PoemModel
from engine.poem.constraints import RowState, beam_children, build_plan
from engine.poem.forms import DEFAULT_FORM, FORM_NAMES
from engine.poem.prosody import Prosody, prosody_for
from engine.poem.vocab import Vocab
from engine.sampling.choice import (BEAM_CANDIDATES, NEG_INF, REPEAT_PENALTY, choose_beam, draw_params, logsumexp,
                                    make_generator, sample, step_bias)
from engine.sampling.formulas import formulas_for


def _device_of(model: PoemModel) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate_one(model: PoemModel, vocab: Vocab, prosody: Prosody, request: PoemRequest, *,
                 model_info: dict | None = None, known_lines=None) -> PoemResult:
    """Write one poem for `request` (validated here; RequestError on bad input), one step at a time.
    `known_lines` (engine.poem.known_lines.KnownLines): corpus lines no line may complete."""
    start = time.perf_counter()
    known = known_lines.for_vocab(vocab) if known_lines is not None else None
    plan = build_plan(vocab, prosody, request, formulas_for(model, vocab), known)
    if request.mode == "beam":
        row, score = _beam(model, plan, request)
    else:
        row, score = _single(model, plan, request)
    return PoemResult(poem=plan.format_text(row.line_texts), lines=row.line_texts, form=plan.form_name, tune=plan.tune and plan.tune.name,
                      mode=request.mode, model=model_info or {}, elapsed_ms=(time.perf_counter() - start) * 1e3,
                      notes=list(row.notes), score=score)


def _single(model: PoemModel, plan, request: PoemRequest) -> tuple[RowState, float]:
    device = _device_of(model)
    generator = make_generator(request.seed)
    temperature, top_k, top_p = draw_params(request)
    row, state = plan.new_row(), model.init_state(1, device)
    token, total = plan.start_token, 0.0
    while not row.done:
        logits, state = model.step(torch.tensor([token], device=device), state)  # (1, V)
        lse = logsumexp(logits)  # (1,)
        token = row.forced()
        if token is None:
            bias = step_bias([row], REPEAT_PENALTY, device)  # one row
            token = sample(logits[0], temperature, top_k, top_p, generator, bias)
        total += float(logits[0, token] - lse[0])
        row.advance(token)
    return row, total


def _beam(model: PoemModel, plan, request: PoemRequest) -> tuple[RowState, float]:
    device = _device_of(model)
    width = request.beam_width
    generator = make_generator(request.seed)
    rows = [plan.new_row() for _ in range(width)]
    scores = torch.full((width,), NEG_INF, device=device)
    scores[0] = 0.0  # one live beam at the start; the others fill from its candidates
    totals = torch.zeros(width, device=device)  # model log-prob of each beam's text
    state = model.init_state(width, device)
    tokens = torch.full((width,), plan.start_token, dtype=torch.long, device=device)
    while not rows[0].done:
        logits, state = model.step(tokens, state)  # (k, V)
        uniform = torch.rand(1, BEAM_CANDIDATES * width, generator=generator)  # one request: G = 1
        step, lse = choose_beam(logits, step_bias(rows, REPEAT_PENALTY, device), scores, width, uniform)  # lse: (k,)
        rows = beam_children(rows, step.parents.tolist())
        for r, t in zip(rows, step.tokens.tolist()):
            r.advance(t)
        state = state[:, step.parents]
        totals = totals[step.parents] + (logits[step.parents, step.tokens] - lse[step.parents])
        scores, tokens = step.scores, step.tokens
    assert all(r.done for r in rows), "every beam of a fixed-length form ends on the same step"
    return rows[0], float(totals[0])  # beams are sorted by score


# ---------------------------------------------------------------------------------------------------------
# CLI: python -m engine generate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", default="", help="the poem's opening characters (0–14)")
    parser.add_argument("--form", default=DEFAULT_FORM, help=f"{' | '.join(FORM_NAMES)} (or 七绝 …)")
    parser.add_argument("--mode", default="sample", choices=MODES)
    parser.add_argument("--beam-width", type=int, default=5, help=f"1–{MAX_BEAM_WIDTH}, beam mode")
    parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--acrostic", default=None, help="one character per line (藏头诗)")
    parser.add_argument("--no-rhyme", action="store_true", help="do not force the rhyme")
    parser.add_argument("--no-tone", action="store_true", help="do not force the 平仄 pattern")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--checkpoint", default=None, help=f"a .safetensors checkpoint (default {DEFAULT_CHECKPOINT})")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--known-lines", default=None, metavar="PATH",
                        help="a known-lines table (python -m trainer corpus lines): do not complete its lines")
    parser.add_argument("--json", action="store_true", help="print the PoemResult as JSON")


def main(args: argparse.Namespace) -> int:
    import json

    from engine.model.checkpoint import CheckpointError, load_checkpoint

    def fail(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 2

    request = PoemRequest(prompt=args.prompt, form=args.form, mode=args.mode, beam_width=args.beam_width,
                          temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          acrostic=args.acrostic, rhyme=not args.no_rhyme, tone=not args.no_tone, seed=args.seed)
    try:
        request.validate()
    except RequestError as e:
        return fail(f"{e.field}: {e.message}" if e.field else e.message)
    path = Path(args.checkpoint) if args.checkpoint else DEFAULT_CHECKPOINT
    if not args.checkpoint and not path.is_file():
        return fail(f"no checkpoint at {path}; pass --checkpoint PATH")
    try:
        ckpt = load_checkpoint(path, device=args.device)
    except CheckpointError as e:
        return fail(str(e))
    known = None
    if args.known_lines:
        from engine.poem.known_lines import KnownLines

        try:
            known = KnownLines.load(args.known_lines)
        except ValueError as e:
            return fail(str(e))
    try:
        result = generate_one(ckpt.model, ckpt.vocab, prosody_for(ckpt.vocab), request,
                              model_info={"name": path.stem, "version": ckpt.version}, known_lines=known)
    except RequestError as e:
        return fail(f"{e.field}: {e.message}" if e.field else e.message)
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False, indent=2))
        return 0
    for i, line in enumerate(result.lines):
        print(line + ("，" if i % 2 == 0 else "。"))
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0

