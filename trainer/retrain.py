"""One retrain run: corpus → fine-tune (or train from scratch) → evaluate → publish or not → a record.

    python -m trainer retrain [--force]             # one run per served model now, prints the records as JSON
    python -m trainer schedule                      # the daemon that calls retrain_all() on RETRAIN_CRON

    records = retrain_all(RetrainConfig.from_env(), reason="cli")   # every model in ENGINE_MODELS, default first
    record = retrain(RetrainConfig.from_env(), reason="cli")        # one model: cfg.name, else the default
    record["outcome"]   # "published" | "rejected" | "superseded" | "skipped" | "failed" | "busy"

A run
1. hashes the corpus (trainer.corpus) and the training code; when both equal those of the last run that
   trained (published or rejected), it is skipped unless forced — the same data and code train the same
   model again, so a rejected run would only be rejected again;
2. fine-tunes the serving checkpoint of the store when its vocabulary still covers the corpus (about as
   well as a fresh vocabulary would), else trains from scratch with the serving model's sizes, within
   RETRAIN_TIME_BUDGET minutes; an interrupted run resumes from its run directory next time; with
   RETRAIN_NPROC=N > 1 the training step runs data-parallel in N processes (`python -m torch.distributed.run
   --nproc-per-node=N -m trainer train …` as a subprocess; RETRAIN_TIME_BUDGET is then each process's);
3. measures validation perplexity of the candidate and of the serving version on the same held-out poems
   (the hash split of trainer.corpus, so a poem never moves between splits as the corpus grows) and
   generates a few poems of each form;
4. publishes (engine.model.versions.publish) only when the candidate is not worse than the serving version beyond
   `tolerance` and every generated poem has its form, storing that verdict beside the version (the engine
   trusts it rather than gating again), and only if CURRENT still names the version the run started from:
   otherwise (a hand publish or rollback meanwhile) the outcome is "superseded" and nothing is published.
Every run, skipped ones too, appends one JSON line to CHECKPOINT_DIR/.trainer/runs.jsonl ("kind":
"retrain"; `python -m trainer publish` and `rollback` add theirs there too).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from engine.api import DEFAULT_MODELS, PoemRequest
from engine.model import versions as ckpt_store
from engine.model.checkpoint import (
    PACKAGE_CHECKPOINTS,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
)
from engine.poem.forms import FORMS
from engine.poem.judge import check_poem
from engine.poem.prosody import prosody_for
from engine.poem.vocab import Vocab, is_han
from engine.reference import generate_one
from trainer.corpus import CorpusError, load_corpus, split
from trainer.data import poems_of_kind
from trainer.evaluate import perplexity
from trainer.spool import records_path, trainer_dir

log = logging.getLogger("yinshi.retrain")

# Files whose change changes the model a run produces (not the bot's, not the service's).
CODE_FILES = ("engine/model/network.py", "engine/poem/vocab.py", "engine/poem/forms.py", "engine/model/checkpoint.py",
              "trainer/train.py", "trainer/data.py", "trainer/corpus.py", "trainer/evaluate.py")
TRAINED = ("published", "rejected")  # outcomes of runs that trained to the end


@dataclass
class RetrainConfig:
    store: str = "var/checkpoints"  # CHECKPOINT_DIR: the checkpoint store the engine serves from
    corpus: list[str] = field(default_factory=lambda: ["data/chinese-poetry"])  # CORPUS_DIR
    # ENGINE_MODELS: what the engine serves, the default first; a scheduled run retrains each, in this order.
    names: tuple[str, ...] = DEFAULT_MODELS
    name: str = ""  # the model one retrain() trains; "" = the first of `names` (the engine's default)
    work: str = "var/retrain"  # RETRAIN_WORK: run directories (resumable training state); not shared
    time_budget: float = 20.0  # RETRAIN_TIME_BUDGET: minutes of training per run
    nproc: int = 1  # RETRAIN_NPROC: training processes; > 1 trains data-parallel under torchrun (a subprocess)
    max_steps: int = 0  # 0: the time budget alone decides
    tolerance: float = 0.02  # publish when candidate ppl <= serving ppl * (1 + tolerance)
    vocab_tolerance: float = 0.001  # fine-tune while serving vocab coverage >= fresh coverage - this
    finetune_lr: float = 1e-3  # lower than from scratch: nudge what the serving model knows, not erase it
    keep: int = 5  # versions kept in the store
    eval_poems: int = 4000  # held-out poems scored per model (a fixed subset, for speed)
    form_check_poems: int = 2  # poems generated per form for the form check
    device: str = "auto"  # DEVICE
    base: str = "package"  # start point while the store is empty: "package" = the shipped default the
    # engine serves then (engine/checkpoints/<name>.safetensors), a path, or "" = none (train from scratch)
    train: dict = field(default_factory=dict)  # TrainConfig overrides (sizes for scratch runs, threads, …)
    code_version: str = ""  # "" = a hash of CODE_FILES
    # CORPUS_DOWNLOAD: fetch the corpus into an empty or missing corpus directory (trainer.download.fetch_corpus)
    download: bool = False
    base_url: str = ""  # CORPUS_BASE_URL; "" = the upstream repository

    @classmethod
    def from_env(cls, env=os.environ, **overrides) -> RetrainConfig:
        cfg = cls(store=env.get("CHECKPOINT_DIR") or cls.store,
                  corpus=[env["CORPUS_DIR"]] if env.get("CORPUS_DIR") else ["data/chinese-poetry"],
                  device=env.get("DEVICE") or cls.device)
        if env.get("ENGINE_MODELS"):  # parsed as the engine parses it (engine.serving.local.EngineSettings)
            cfg.names = tuple(n.strip() for n in env["ENGINE_MODELS"].split(",") if n.strip())
        if env.get("RETRAIN_WORK"):
            cfg.work = env["RETRAIN_WORK"]
        if env.get("RETRAIN_TIME_BUDGET"):
            cfg.time_budget = float(env["RETRAIN_TIME_BUDGET"])
        if env.get("RETRAIN_NPROC"):
            cfg.nproc = int(env["RETRAIN_NPROC"])
        download = env.get("CORPUS_DOWNLOAD") or "on"
        if download not in ("on", "off"):
            raise ValueError(f"CORPUS_DOWNLOAD must be on or off, got {download!r}")
        cfg.download = download == "on"
        cfg.base_url = env.get("CORPUS_BASE_URL") or ""
        for key, value in overrides.items():
            if value is not None:
                setattr(cfg, key, value)
        try:
            cfg.names = tuple(ckpt_store.check_name(n) for n in cfg.names)
        except ckpt_store.StoreError as e:
            raise ValueError(f"ENGINE_MODELS: {e}") from None
        if not cfg.names:
            raise ValueError("ENGINE_MODELS names no model to retrain")
        if cfg.nproc < 1:
            raise ValueError(f"RETRAIN_NPROC must be at least 1, got {cfg.nproc}")
        # NOTE: 0 and NaN turned the time limit off (a run for hours, holding the run lock), and a NaN or
        # infinite tolerance the quality gate; keep 0 failed only at publish, after the whole run.
        if not (0 < cfg.time_budget < math.inf or (cfg.time_budget == 0 and cfg.max_steps > 0)):
            raise ValueError(f"RETRAIN_TIME_BUDGET (--time-budget) must be a positive number of minutes (0 only "
                             f"with --max-steps), got {cfg.time_budget}")
        if not 0 <= cfg.tolerance < math.inf:
            raise ValueError(f"--tolerance must be a fraction of 0 or more, got {cfg.tolerance}")
        if cfg.keep < 1:
            raise ValueError(f"--keep must be at least 1, got {cfg.keep}")
        if cfg.max_steps < 0:
            raise ValueError(f"--max-steps must be 0 (the time budget decides) or more, got {cfg.max_steps}")
        return cfg


# -- records -------------------------------------------------------------------------------------------
def append_record(store, record: dict) -> None:
    """One JSON line, written with O_APPEND so concurrent writers never interleave; on its own line even after
    a torn one (a kill or a full disk mid-write), which would otherwise swallow it."""
    path = records_path(store)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        view = memoryview(line)
        while view:  # a short write (a nearly full disk) goes on, or raises: never a silent half line
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_run_records(store, name: str | None = None) -> list[dict]:
    """All records, oldest first; a torn last line (a kill mid-write) is skipped."""
    path = records_path(store)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and (name is None or rec.get("name") == name):
            out.append(rec)
    return out


def code_version(root: Path | None = None) -> str:
    """A hash of the training code, so a change to the model or the loop retrains even on the same corpus."""
    root = root or Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for rel in CODE_FILES:
        h.update(rel.encode())
        h.update((root / rel).read_bytes())
    return h.hexdigest()[:12]


def torchrun_command(tc, nproc: int, port: int) -> list[str]:
    """`python -m torch.distributed.run … -m trainer train` with every field of TrainConfig `tc` as a flag."""
    args = []
    for f in fields(tc):
        value, flag = getattr(tc, f.name), "--" + f.name.replace("_", "-")
        if f.name == "corpus":
            args += [flag, *value]
        elif isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args += [flag, str(value)]  # str() of a float reads back exactly
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr", "127.0.0.1",
            "--master-port", str(port), "-m", "trainer", "train", *args, "--resume", "--no-progress"]


# NOTE: torchrun runs in a session of its own (a group signal reaches it and its workers, nothing else), and it
# inherits the run lock's descriptor: a trainer killed outright leaves an orphan that still holds the lock, so
# no run starts beside it in the same run directory. `stop_training` ends it when the daemon stops.
_training: set[subprocess.Popen] = set()
_lock_fds: list[int] = []  # the run lock's descriptor while this process holds it


def stop_training(grace: float = 10.0) -> None:
    """Stop the torchrun processes of the run in progress, if any (TERM, then KILL after `grace` seconds)."""
    for proc in list(_training):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue


def _train_distributed(tc, nproc: int) -> dict:
    """Train `tc` in `nproc` processes under torchrun; returns the progress rank 0 saved."""
    from trainer.train import read_progress

    with socket.socket() as s:  # a free loopback port for the rendezvous (one node: nothing leaves the host)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one node: gloo's ranks meet over loopback
    root = str(Path(__file__).resolve().parent.parent)  # `-m trainer` from any working directory
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = torchrun_command(tc, nproc, port)
    log.info("training in %d processes: %s", nproc, " ".join(cmd))
    # The workers' log lines go to this log as they come; the last ones explain a failure in the record.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, pass_fds=tuple(_lock_fds))
    _training.add(proc)
    tail: list[str] = []
    try:
        for line in proc.stderr:
            log.info("train: %s", line.rstrip())
            tail = (tail + [line.strip()])[-50:]  # torchrun's own report follows the worker's error line
        proc.wait()
    except BaseException:  # Ctrl-C no longer reaches torchrun's own session: stop it here
        stop_training()
        raise
    finally:
        _training.discard(proc)
    if proc.returncode != 0:
        errors = [t for t in tail if t.startswith("error:")] or tail
        raise RuntimeError(f"torchrun training exited with status {proc.returncode}: {' | '.join(errors[-2:])}")
    progress = read_progress(Path(tc.out))
    if not progress or not progress.get("done"):
        raise RuntimeError(f"torchrun training ended without a finished state in {tc.out}")
    return progress


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# -- checks ----------------------------------------------------------------------------------------------
def vocab_coverage(texts: list[str], vocab: Vocab) -> float:
    """Share of the Han character occurrences in `texts` that `vocab` holds."""
    counts = Counter(ch for t in texts for ch in t if is_han(ch))
    total = sum(counts.values())
    return sum(n for ch, n in counts.items() if ch in vocab) / total if total else 1.0


def _generate(ckpt: Checkpoint, form: str, seed: int) -> str:
    """One poem as the engine writes it (rhyme and tone on)."""
    request = PoemRequest(form=form, mode="sample", seed=seed)
    return generate_one(ckpt.model, ckpt.vocab, prosody_for(ckpt.vocab), request).poem


def form_check(ckpt: Checkpoint, per_form: int = 2) -> dict:
    """Generate `per_form` poems of every form; ok when the poem judge finds each exactly its form's layout."""
    poems, failures = [], []
    for form in FORMS:
        for seed in range(per_form):
            try:
                poem = _generate(ckpt, form, seed)
            except Exception as e:  # a broken model may fail inside decoding: that is a failed check
                failures.append(f"{form} seed {seed}: {type(e).__name__}: {e}")
                continue
            if not check_poem(poem, form).form_valid:
                failures.append(f"{form} seed {seed}: {poem!r} is not a {form}")
            poems.append(poem)
    return {"ok": not failures, "poems": poems[: len(FORMS)], "failures": failures}


def _score(ckpt: Checkpoint, poems) -> dict:
    pre_pad = ckpt.meta.get("train", {}).get("recipe") == "classic"
    m = perplexity(ckpt.model, ckpt.vocab, poems, pre_pad=pre_pad)
    return {"ppl": round(m["ppl"], 4), "nll": round(m["nll"], 6), "chars": m["chars"], "oov": m["oov"],
            "poems": len(poems)}


# -- the run --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _run_lock(store, wait: float = 0.0):
    """One run at a time across processes (daemon, CLI, bot request); yields False if still held after `wait` s."""
    path = trainer_dir(store) / "run.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait
    with open(path, "a") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        _lock_fds.append(f.fileno())
        try:
            yield True
        finally:
            _lock_fds.remove(f.fileno())
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_corpus(cfg: RetrainConfig) -> list[str]:
    """Fetch the corpus where `cfg.download` asks for it, then bring the store's known-lines table up to date
    with it; returns the corpus directories whose download is not finished (still missing files, or being
    made by another process). Neither raises: without a corpus the engine serves on, and the next run tries
    again."""
    from trainer.download import DEFAULT_BASE_URL, UNFINISHED, fetch_corpus
    from trainer.known_lines import refresh_or_warn

    if cfg.download:
        for path in cfg.corpus:
            try:
                result = fetch_corpus(path, cfg.base_url or DEFAULT_BASE_URL)
            except Exception:  # noqa: BLE001  NOTE: a bug or a full disk must not stop the retrain that follows
                log.exception("corpus download into %s failed", path)
                continue
            if result is None:
                continue
            if result.missing and not result.downloaded and not result.skipped:
                log.warning("corpus download into %s: %s has none of the corpus files (HTTP 404 for every one): "
                            "check CORPUS_BASE_URL", path, cfg.base_url or DEFAULT_BASE_URL)
                continue
            # NOTE: the first few failures, not all: without a network each of the 337 files fails alike.
            for why in list(result.failed.values())[:3]:
                log.warning("corpus download error: %s", why)
            if result.ok:
                log.info("corpus download into %s: %s", path, result.summary())
            elif len(result.missing) == len(result.failed):
                log.warning("corpus download into %s: %s; the source lacks %d of them, so it is finished without "
                            "them", path, result.summary(), len(result.missing))
            else:
                log.warning("corpus download into %s: %s; the next retrain run takes it up again", path,
                            result.summary())
    refresh_or_warn(cfg.corpus, Path(cfg.store))
    return [p for p in cfg.corpus if cfg.download and (Path(p).resolve() / UNFINISHED).exists()]


def retrain_all(cfg: RetrainConfig, force: bool = False, reason: str = "manual", wait: float = 0.0) -> list[dict]:
    """Fetch the corpus if it is wanted and bring the store's known-lines table up to date with it
    (`prepare_corpus`), then retrain every model in `cfg.names`, one after the other, the default first;
    returns their records."""
    unfinished = prepare_corpus(cfg)
    if unfinished:
        # NOTE: a model trained on the few files that arrived would be published, and the budget spent on it.
        why = f"the corpus download into {', '.join(unfinished)} is not finished; the next run trains"
        log.warning("retrain skipped: %s", why)
        return [_record_skip(replace(cfg, name=name), reason, force, why) for name in cfg.names]
    return [retrain(replace(cfg, name=name), force=force, reason=reason, wait=wait) for name in cfg.names]


def _outcome_recorded(cfg: RetrainConfig, run_dir: Path) -> bool:
    """Whether a run of this model in `run_dir` recorded its outcome (a stopped one recorded none)."""
    return any(r.get("run_dir") == run_dir.name for r in read_run_records(cfg.store, cfg.name))


def _new_record(cfg: RetrainConfig, reason: str, force: bool) -> dict:
    return {"at": _now(), "kind": "retrain", "name": cfg.name, "reason": reason, "forced": force}


def _record_skip(cfg: RetrainConfig, reason: str, force: bool, why: str) -> dict:
    record = _new_record(cfg, reason, force) | {"outcome": "skipped", "why": why, "seconds": 0.0}
    append_record(cfg.store, record)
    return record


def retrain(cfg: RetrainConfig, force: bool = False, reason: str = "manual", wait: float = 0.0) -> dict:
    """Run once for `cfg.name`; returns the record it appended. Never raises for a failed run: the record says why.

    `wait`: seconds to wait for a run already going elsewhere before giving up with outcome "busy".
    """
    if not cfg.name:
        cfg = replace(cfg, name=cfg.names[0])
    t0 = time.monotonic()
    record = _new_record(cfg, reason, force)
    with _run_lock(cfg.store, wait) as locked:
        if not locked:
            record.update(outcome="busy", why="another retrain is running")
        else:
            try:
                _run(cfg, force, record)
            except Exception as e:
                log.exception("retrain failed")
                record.update(outcome="failed", why=f"{type(e).__name__}: {e}")
        record["seconds"] = round(time.monotonic() - t0, 1)
        append_record(cfg.store, record)
    log.info("retrain %s: %s", record["outcome"], record.get("why", ""))
    return record


def _load_serving(cfg: RetrainConfig, record: dict) -> tuple[Path | None, Checkpoint | None]:
    # CURRENT read once: the version the run starts from is the one its publish expects to replace.
    record["store_version"] = ckpt_store.current_version(cfg.store, cfg.name)
    path = ckpt_store.version_path(cfg.store, cfg.name, record["store_version"]) if record["store_version"] else None
    if path is None and cfg.base:
        path = PACKAGE_CHECKPOINTS / f"{cfg.name}.safetensors" if cfg.base == "package" else Path(cfg.base)
        if cfg.base == "package" and not path.is_file():
            return None, None
    if path is None:
        return None, None
    # A serving file that does not load raises CheckpointError: a candidate would be compared with nothing.
    ckpt = load_checkpoint(path)
    record["serving_version"] = ckpt.version
    return path, ckpt


def _run(cfg: RetrainConfig, force: bool, record: dict) -> None:
    from trainer.train import TrainConfig, Trainer

    try:
        serving_path, serving = _load_serving(cfg, record)
    except CheckpointError as e:
        record.update(outcome="failed", why=f"the serving checkpoint does not load ({e}), so a candidate could be "
                                            f"compared with nothing: publish a good version or roll back")
        return
    # What the model was trained on, it retrains on: the 词 model (store name ci, or trained --kind ci) on 词;
    # a model that writes both (trained on a pack with its 词) on both, judged on both; the others on 诗.
    trained_kind = ((serving.meta.get("train") or {}).get("kind") if serving is not None else None)
    kind = ("ci" if cfg.name == "ci" or trained_kind == "ci"
            else "all" if serving is not None and serving.vocab.writes_ci else "shi")
    corpus = load_corpus(cfg.corpus, include_ci=kind != "shi")
    record["corpus_hash"] = corpus.digest()
    record["code_version"] = cfg.code_version or code_version()

    last = next((r for r in reversed(read_run_records(cfg.store, cfg.name))
                 if r.get("kind") == "retrain" and r.get("outcome") in TRAINED), None)
    if not force and last and (last.get("corpus_hash"), last.get("code_version")) == (
            record["corpus_hash"], record["code_version"]):
        record.update(outcome="skipped", why=f"corpus and code unchanged since the run of {last['at']} "
                                             f"({last['outcome']}{' ' + last['version'] if last.get('version') else ''})")
        return

    tc = TrainConfig(**cfg.train)
    if "cell" not in cfg.train and cfg.name in ("gru", "lstm"):
        tc.cell = cfg.name  # from scratch, the store name is the cell ("gru" must not become an LSTM)
    tc.corpus, tc.device = list(cfg.corpus), cfg.device
    tc.time_budget, tc.max_steps = cfg.time_budget, cfg.max_steps
    tc.epochs = max(tc.epochs, 1000)  # the budget decides, not epochs
    tc.kind = kind
    train_poems, val_poems = split(poems_of_kind(corpus, kind), tc.val_percent)
    if kind != "shi" and not any(p.form == "ci" for p in train_poems):
        raise CorpusError(f"{', '.join(cfg.corpus)} holds no 词 for the {cfg.name} model to retrain on: "
                          f"python -m trainer corpus download --include-ci")
    if not val_poems:
        raise ValueError("the corpus has no held-out poem to evaluate on")
    mode = "scratch"
    if serving is not None:
        texts = [p.text for p in train_poems]
        fresh = Vocab.build(texts, tc.min_count, tc.max_vocab)
        cov = {"serving": round(vocab_coverage(texts, serving.vocab), 6), "fresh": round(vocab_coverage(texts, fresh), 6)}
        record["vocab_coverage"] = cov
        for key in ("cell", "embed_dim", "hidden_dim", "num_layers", "tie_embeddings", "dropout", "input_dropout"):
            setattr(tc, key, getattr(serving.model.config, key))  # same shape and dropout either way: one model line
        if cov["serving"] >= cov["fresh"] - cfg.vocab_tolerance:
            mode = "finetune"
            tc.init_from, tc.lr = str(serving_path), cfg.finetune_lr
    record["mode"] = mode
    record["trains_on"] = {"shi": "诗", "ci": "词", "all": "诗 and 词"}[kind]

    # One directory per (corpus, code, start point): a run killed mid-training resumes here next time.
    run_dir = Path(cfg.work) / cfg.name / f"{record['corpus_hash']}-{record['code_version']}-" \
                                          f"{serving.version if mode == 'finetune' else 'scratch'}"
    state = run_dir / "state.json"
    finished = json.loads(state.read_text()) if state.exists() else {}
    if finished.get("done") and (force or _outcome_recorded(cfg, run_dir)):
        shutil.rmtree(run_dir)  # a forced rerun, or one whose outcome (say "failed") is on record: start over
        finished = {}
    for old in (run_dir.parent.iterdir() if run_dir.parent.is_dir() else []):
        if old != run_dir:
            shutil.rmtree(old, ignore_errors=True)
    tc.out = str(run_dir)
    record["resumed"] = state.exists()
    record["run_dir"] = run_dir.name
    if finished.get("done") and (run_dir / "best.safetensors").is_file():
        # NOTE: trained to the end by a run stopped before it recorded an outcome (a stop while evaluating or
        # publishing; one with an outcome on record started over above): what it trained is evaluated, not redone.
        progress = finished
    elif cfg.nproc > 1:
        progress = _train_distributed(tc, cfg.nproc)
    else:
        progress = Trainer(tc, resume=True, log=log.info).run(progress_bar=False)
    record["train"] = {k: progress.get(k) for k in ("step", "tokens", "stop_reason")} | {
        "seconds": round(progress["train_seconds"], 1)}

    candidate = load_checkpoint(run_dir / "best.safetensors")
    rng = torch.Generator().manual_seed(0)
    pick = sorted(torch.randperm(len(val_poems), generator=rng)[: cfg.eval_poems].tolist())
    held_out = [val_poems[i] for i in pick]
    metrics = {"candidate": _score(candidate, held_out)}
    compared = "candidate"
    if serving is not None:
        # NOTE: a model skips the characters its vocabulary lacks, so two vocabularies score different text:
        # the gate compares them on the held-out poems both can read.
        common = [p for p in held_out if all(ch in serving.vocab and ch in candidate.vocab for ch in p.text
                                             if is_han(ch))]
        if len(common) < len(held_out):
            metrics["candidate_common"] = _score(candidate, common)
            compared = "candidate_common"
        metrics["serving"] = _score(serving, common)
    record["metrics"] = metrics
    check = form_check(candidate, cfg.form_check_poems)
    record["form_check"] = check

    cand_ppl = metrics[compared]["ppl"]
    compared_poems = metrics[compared]["poems"]
    if serving is not None and not compared_poems:
        record.update(outcome="rejected", why="no held-out poem is written in characters both the candidate's and "
                                              "the serving model's vocabularies hold: nothing to compare them on")
    elif not math.isfinite(cand_ppl):
        record.update(outcome="rejected", why=f"candidate perplexity is {cand_ppl}")
    elif serving is not None and cand_ppl > metrics["serving"]["ppl"] * (1 + cfg.tolerance):
        record.update(outcome="rejected", why=f"validation ppl {cand_ppl:.2f} is worse than the serving "
                                              f"{metrics['serving']['ppl']:.2f} beyond {cfg.tolerance:.0%}")
    elif not check["ok"]:
        record.update(outcome="rejected", why=f"form check failed: {check['failures'][0]}")
    else:
        gate = {"candidate_ppl": cand_ppl, "serving_ppl": metrics.get("serving", {}).get("ppl"),
                "serving_version": record.get("serving_version"), "tolerance": cfg.tolerance,
                "held_out_poems": compared_poems, "corpus_hash": record["corpus_hash"]}
        try:
            # Compare-and-swap on the CURRENT this run started from: a hand publish or rollback made while it
            # trained is the operator's decision, and this candidate was only compared with the old version.
            version = ckpt_store.publish(cfg.store, cfg.name, run_dir / "best.safetensors", keep=cfg.keep,
                                         expect=record["store_version"], gate=gate)
        except ckpt_store.Superseded:
            now = ckpt_store.current_version(cfg.store, cfg.name)
            record.update(outcome="superseded", why=f"CURRENT moved from {record['store_version']} to {now} "
                                                    "while the run trained; not publishing over it")
            return
        was = f" (serving {metrics['serving']['ppl']:.2f})" if serving is not None else ""
        record.update(outcome="published", version=version,
                      why=f"validation ppl {cand_ppl:.2f}{was}, form check passed")
