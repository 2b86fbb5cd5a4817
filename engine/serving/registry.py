"""The model registry: which version of each named model serves, and hot-swapping in new ones.

    registry = ModelRegistry(checkpoint_dir, names=("lstm", "gru"), device="cpu")
    registry.load_initial()               # store CURRENT, else the package default engine/checkpoints/<name>.safetensors
    registry.get("lstm")                  # -> ServingModel (model, vocab, prosody, version, …)
    registry.reload()                     # load + validate newer published versions, stage the swaps
    registry.apply_pending()              # the step loop calls this between steps: the swap itself

A new version is loaded and validated off the step loop (the caller's thread): it must lie inside the
checkpoint directory, load without CheckpointError (SHA-256, shapes, finite weights), have usable
vocabulary and form tokens, write a greedy poem of every form that passes the form check, and pass one
perplexity gate: a version the trainer published through its gate (a verdict stored beside it for these
very weights, engine.model.versions.gate_path) against the version this engine serves is trusted, since
the trainer scored candidate and serving on the same held-out poems; any other version (published by hand,
or gated against another version, such as one this engine refused) must have a `metrics.val_ppl` no worse
than the serving version's by more than `ppl_tolerance`; a CURRENT written by `rollback` (the operator's
explicit choice) is held to neither. CURRENT and the verdict are read only if they are regular files, so a
FIFO put there never blocks; a CURRENT that cannot be read refuses that model alone. Then it is staged
and swapped in at the next step boundary. Rows already running hold a reference to the ServingModel
they started on and finish on it; new requests get the new one. A refused version keeps the old one
serving, is logged with its reason, counted in metrics, and not retried until CURRENT changes again.

The store's known-lines table (CHECKPOINT_DIR/known_lines.safetensors, engine.poem.known_lines, written by
the trainer from the corpus) is loaded with the models and looked at on every reload: when it changes,
each model is staged again with the new table, as a new ServingModel, so that rows in flight finish
with the table they started with. A table that cannot be read is logged and the previous one kept.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from engine.api import DEFAULT_MODELS, PoemRequest
from engine.errors import EngineUnavailableError, RequestError
from engine.model import versions as store
from engine.model.checkpoint import (
    PACKAGE_CHECKPOINTS,
    CheckpointError,
    load_checkpoint,
)
from engine.model.network import PoemModel, compile_step, pick_device, quantize_int8
from engine.poem.constraints import PoemPlan, build_plan
from engine.poem.forms import FORMS
from engine.poem.judge import check_poem
from engine.poem.known_lines import KNOWN_LINES_FILE, KnownLines, VocabLines
from engine.poem.tunes import TUNES, check_ci
from engine.poem.vocab import Vocab
from engine.sampling.formulas import Formulas, formulas_for

log = logging.getLogger(__name__)

MIN_HAN_CHARS = 64  # fewer and the rhyme/tone constraints may have no candidates at some position
UNREADABLE = "?"  # what a refusal of a CURRENT that cannot be read is recorded under


class ValidationError(Exception):
    """A checkpoint that must not serve; the message says why."""


@dataclass(eq=False)  # identity matters: the runner groups rows by the ServingModel object
class ServingModel:
    name: str  # the store name: lstm, gru, …
    version: str  # the checkpoint's version (its metadata), e.g. 20261127T031500456Z
    path: Path  # where it was loaded from
    model: PoemModel  # eval mode, on `device`
    vocab: Vocab
    meta: dict  # the checkpoint metadata
    prosody: object  # engine.poem.prosody tables for this vocabulary, built once per version
    device: torch.device
    step: Callable  # model.step as one TorchScript call (engine.model.network.compile_step): what the runner steps
    formulas: Formulas = field(default_factory=Formulas)  # the spans greedy and beam rows avoid
    known_lines: VocabLines | None = None  # the corpus lines no line may complete (the store's table)
    quantized: bool = False  # runs as int8 (ENGINE_QUANTIZE=int8, on a CPU)
    loaded_at: float = field(default_factory=time.time)  # wall-clock seconds

    @property
    def val_ppl(self) -> float | None:
        value = (self.meta.get("metrics") or {}).get("val_ppl")
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None

    def make_plan(self, request: PoemRequest) -> PoemPlan:
        """The request's decoding plan for this model's vocabulary (RequestError for characters it lacks)."""
        return build_plan(self.vocab, self.prosody, request, self.formulas, self.known_lines)

    def info(self) -> dict:
        """The GET /v1/models entry."""
        train = self.meta.get("train") or {}
        return {
            "name": self.name,
            "cell": self.model.config.cell,
            "version": self.version,
            "parameters": self.model.num_parameters(),
            "vocab_size": len(self.vocab),
            "writes_ci": self.vocab.writes_ci,
            "writes_shi": train.get("kind", "shi") != "ci",  # a model trained on 词 alone writes 诗 poorly
            "trained_on": {"corpus_hash": self.meta.get("corpus_hash"), "poems": train.get("train_poems"),
                           "tokens": train.get("tokens_seen"), "created_at": self.meta.get("created_at")},
            "metrics": self.meta.get("metrics") or {},
            "source": "package" if _inside(self.path, PACKAGE_CHECKPOINTS) else "store",
            "device": str(self.device),
            "quantized": "int8" if self.quantized else None,
            "known_lines": self.known_lines.num_lines if self.known_lines is not None else 0,
        }


def _inside(path: Path, root: Path) -> bool:
    try:
        return Path(path).resolve().is_relative_to(Path(root).resolve())
    except OSError:
        return False


def build_serving(name: str, path: Path, device: torch.device, quantize: str = "none",
                  known_lines: KnownLines | None = None) -> ServingModel:
    """Load a checkpoint and its prosody tables; CheckpointError when the file is unusable. `quantize`
    "int8" runs it as int8 on a CPU (engine.model.network.quantize_int8; ignored on a GPU). `known_lines`:
    the corpus lines its poems must not complete."""
    from engine.poem.prosody import prosody_for  # late: the prosody tables are large

    ckpt = load_checkpoint(path, device=device)
    model = quantize_int8(ckpt.model) if quantize == "int8" and device.type == "cpu" else ckpt.model
    return ServingModel(name=name, version=ckpt.version, path=Path(path), model=model, vocab=ckpt.vocab,
                        meta=ckpt.meta, prosody=prosody_for(ckpt.vocab), device=device,
                        step=compile_step(model), formulas=formulas_for(model, ckpt.vocab),
                        known_lines=known_lines.for_vocab(ckpt.vocab) if known_lines is not None else None,
                        quantized=any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules()))


def smoke_test(serving: ServingModel) -> None:
    """Write one greedy poem of every form, unbatched; each must pass the poem judge's form check."""
    from engine.reference import generate_one

    for form in FORMS.values():
        request = PoemRequest(form=form.name, mode="greedy", seed=0).validate()
        try:
            result = generate_one(serving.model, serving.vocab, serving.prosody, request)
        except RequestError as e:
            raise ValidationError(f"smoke generation of {form.name} failed: {e.message}") from None
        if not check_poem(result.poem, form, serving.prosody).form_valid:
            raise ValidationError(f"smoke generation of {form.name} gave {result.poem!r}, not a {form.name}")
    if serving.vocab.writes_ci and TUNES:
        tune = next(iter(TUNES.values()))  # the most common tune
        request = PoemRequest(form="ci", tune=tune.name, mode="greedy", seed=0).validate()
        result = generate_one(serving.model, serving.vocab, serving.prosody, request)
        if not check_ci(tune, result.poem).structure_ok:
            raise ValidationError(f"smoke generation of {tune.name} gave {result.poem!r}, not a {tune.name}")


def validate(serving: ServingModel, running: ServingModel | None, ppl_tolerance: float) -> None:
    """Everything a new version must pass before it serves (beyond what load_checkpoint checks)."""
    for pname, p in serving.model.named_parameters():
        if not torch.isfinite(p).all():
            raise ValidationError(f"parameter {pname} is not finite")
    vocab = serving.vocab
    num_han = len(vocab.han_ids())
    if num_han < MIN_HAN_CHARS:
        raise ValidationError(f"vocabulary has {num_han} Han characters; at least {MIN_HAN_CHARS} needed")
    if serving.model.config.vocab_size != len(vocab):
        raise ValidationError("vocabulary size does not match the model")
    if running is not None and running.val_ppl is not None:
        new = serving.val_ppl
        if new is None:
            raise ValidationError(f"no metrics.val_ppl to compare with the serving {running.val_ppl:.3f}")
        if new > running.val_ppl * (1 + ppl_tolerance):
            raise ValidationError(f"val_ppl {new:.3f} is worse than the serving {running.val_ppl:.3f} "
                                  f"by more than {ppl_tolerance:.0%}")
    smoke_test(serving)


class ModelRegistry:
    def __init__(self, checkpoint_dir: str | Path | None, names: tuple[str, ...] = DEFAULT_MODELS,
                 device: str | torch.device = "cpu", ppl_tolerance: float = 0.05,
                 package_dir: Path = PACKAGE_CHECKPOINTS, metrics=None, quantize: str = "none",
                 known_lines: bool = True):
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.names = tuple(store.check_name(n) for n in names)
        self.device = pick_device(device) if isinstance(device, str) else device
        self.ppl_tolerance = ppl_tolerance
        self.quantize = quantize  # "int8": every version runs as int8 on a CPU (build_serving)
        if quantize == "int8" and self.device.type != "cpu":
            log.warning("ENGINE_QUANTIZE=int8 is for a CPU engine; on %s the models run in float", self.device)
        self.package_dir = Path(package_dir)
        self.metrics = metrics
        self._serving: dict[str, ServingModel] = {}  # name → the version new requests get
        self._pending: dict[str, ServingModel] = {}  # validated, swapped in at the next step boundary
        self._refused: dict[str, tuple[str, str]] = {}  # name → (version, reason) last refused
        self._lock = threading.Lock()  # guards the three dicts; held only for dict updates
        self._reload_lock = threading.Lock()  # one load/validate at a time
        self.num_swaps = 0
        self.num_failed_validations = 0
        self.use_known_lines = known_lines  # False: the store's table is not read (ENGINE_KNOWN_LINES=off)
        self.known_lines: KnownLines | None = None  # the store's table, None when it has none
        self._known_stamp: tuple | None = None  # (mtime_ns, size, inode) of the file last looked at
        self.known_lines_error: str | None = None  # why the file last looked at was not loaded

    # -- reading ---------------------------------------------------------------------------------------
    @property
    def default_name(self) -> str | None:
        with self._lock:
            return next((n for n in self.names if n in self._serving), None)

    def get(self, name: str | None = None) -> ServingModel:
        """The serving version of `name` (None: the default model)."""
        with self._lock:
            if name is None:
                name = next((n for n in self.names if n in self._serving), None)
                if name is None:
                    raise EngineUnavailableError("no model is loaded")
            serving = self._serving.get(name)
        if serving is None:
            if name in self.names:
                raise EngineUnavailableError(f"model {name!r} is not loaded")
            raise RequestError("unknown_model", "model", f"unknown model {name!r}; serving: {', '.join(self.loaded_names()) or 'none'}")
        return serving

    def ci_name(self) -> str:
        """The model a 词 goes to when the request names none: the first loaded one trained on 词."""
        with self._lock:
            name = next((n for n in self.names if n in self._serving and self._serving[n].vocab.writes_ci), None)
            unloaded = [n for n in self.names if n not in self._serving]
        if name is None and unloaded:  # one of them may write 词 once a version of it loads: retry later
            raise EngineUnavailableError(f"no model that writes 词 is loaded (not loaded: {', '.join(unloaded)})")
        if name is None:
            raise RequestError("no_ci", "form", f"no model serving here writes 词 (serving: "
                                                f"{', '.join(self.loaded_names()) or 'none'}); add ci to ENGINE_MODELS")
        return name

    def loaded_names(self) -> list[str]:
        with self._lock:
            return [n for n in self.names if n in self._serving]

    def all_serving(self) -> list[ServingModel]:
        with self._lock:
            return [self._serving[n] for n in self.names if n in self._serving]

    def refused(self) -> dict[str, dict]:
        with self._lock:
            return {n: {"version": v, "reason": r} for n, (v, r) in self._refused.items()}

    # -- loading ---------------------------------------------------------------------------------------
    def _store_path(self, name: str) -> Path | None:
        """The CURRENT version's file, refused if it resolves outside the checkpoint directory."""
        return self._store_state(name)[0]

    def _store_state(self, name: str) -> tuple[Path | None, bool]:
        """(the CURRENT version's file, whether `rollback` wrote CURRENT); ValidationError when CURRENT cannot be
        read or names a file outside the store."""
        if self.checkpoint_dir is None:
            return None, False
        version, rolled_back = self._read_current(name)
        try:
            path = store.version_path(self.checkpoint_dir, name, version) if version else None
        except store.StoreError as e:
            raise ValidationError(str(e)) from None
        if path is None:
            return None, False
        if not _inside(path, self.checkpoint_dir):
            raise ValidationError(f"{path} resolves outside the checkpoint directory {self.checkpoint_dir}")
        return path, rolled_back

    def _read_current(self, name: str) -> tuple[str | None, bool]:
        """store.current_state; ValidationError when CURRENT cannot be read (that model alone is refused)."""
        try:
            return store.current_state(self.checkpoint_dir, name)
        except store.StoreError as e:
            raise ValidationError(str(e)) from None

    def _current_text(self, name: str) -> str:
        """What CURRENT names, valid or not: a refusal recorded under it holds until CURRENT changes."""
        try:
            return self._read_current(name)[0] or UNREADABLE
        except ValidationError:
            return UNREADABLE

    def _gated(self, candidate: ServingModel, running: ServingModel | None) -> bool:
        """Whether the trainer's gate passed these very weights against the version serving: a verdict for other
        weights proves nothing, nor one measured against another version (a retrain compares with the version
        CURRENT names, which may be one this engine refused)."""
        if running is None:
            return False
        try:
            gate = store.gate_record(self.checkpoint_dir, candidate.name, candidate.version)
        except store.StoreError:
            return False
        return bool(gate and gate.get("passed") is True
                    and gate.get("weights_sha256") == candidate.meta.get("weights_sha256")
                    and gate.get("serving_version") == running.version)

    def _package_path(self, name: str) -> Path | None:
        for path in (self.package_dir / f"{name}.safetensors", self.package_dir / name / f"{name}.safetensors"):
            if path.is_file():
                return path
        return None

    # -- the known-lines table -----------------------------------------------------------------------
    def _known_path(self) -> Path | None:
        return self.checkpoint_dir / KNOWN_LINES_FILE if self.checkpoint_dir and self.use_known_lines else None

    def _known_file_stamp(self) -> tuple | None:
        path = self._known_path()
        try:
            st = path.stat() if path else None
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:  # there, but not readable now (permissions, a stale mount): not "gone"
            return ("unreadable", e.errno, e.strerror)
        return (st.st_mtime_ns, st.st_size, st.st_ino) if st else None

    def known_lines_changed(self) -> bool:
        """Whether the store's table file is not the one last looked at (written, replaced or removed)."""
        return self._known_file_stamp() != self._known_stamp

    def _refresh_known_lines(self) -> bool:
        """Load the store's table if its file changed; True when the table serving should change."""
        stamp = self._known_file_stamp()
        if stamp == self._known_stamp:
            return False
        self._known_stamp = stamp
        if stamp is None:
            self.known_lines_error = None
            if self.known_lines is None:
                return False
            log.warning("known lines: %s is gone; poems may quote corpus lines again", self._known_path())
            self.known_lines = None
            return True
        if stamp[0] == "unreadable":
            self.known_lines_error = f"{self._known_path()}: {stamp[2]}"
            log.error("known lines: %s; keeping the previous table", self.known_lines_error)
            return False
        try:
            table = KnownLines.load(self._known_path())
        except ValueError as e:
            self.known_lines_error = str(e)
            log.error("known lines: %s; keeping the previous table", e)
            return False
        self.known_lines, self.known_lines_error = table, None
        log.info("known lines: %d corpus lines from %s", len(table), self._known_path())
        return True

    def _restage_known_lines(self, report: dict) -> None:
        """Stage every model again with the current table (a model already staged gets it too)."""
        table = self.known_lines
        if table is not None:  # NOTE: made before taking the lock for long: the step loop needs it (tens of ms)
            with self._lock:
                vocabs = [s.vocab for s in (*self._pending.values(), *self._serving.values())]
            for vocab in vocabs:
                table.for_vocab(vocab)
        with self._lock:
            for name in self.names:
                base = self._pending.get(name) or self._serving.get(name)
                if base is None:
                    continue
                self._pending[name] = replace(base, known_lines=table.for_vocab(base.vocab) if table else None)
                if name in report:
                    report[name]["known_lines"] = len(table) if table else 0

    def load_initial(self) -> None:
        """Load every name from the store (else the package default). A name that fails stays unloaded."""
        self._refresh_known_lines()
        for name in self.names:
            candidates = []
            try:
                if (p := self._store_path(name)) is not None:
                    candidates.append(p)
            except ValidationError as e:
                self._refuse(name, self._current_text(name), str(e))
            if (p := self._package_path(name)) is not None:
                candidates.append(p)
            for path in candidates:
                try:
                    serving = build_serving(name, path, self.device, self.quantize, self.known_lines)
                    validate(serving, None, self.ppl_tolerance)
                except (CheckpointError, ValidationError) as e:
                    self._refuse(name, path.stem, str(e))
                    continue
                with self._lock:
                    self._serving[name] = serving
                self._set_info(None, serving)
                log.info("serving %s version %s from %s", name, serving.version, path)
                break
            else:
                log.warning("model %s: nothing to serve (store %s, package %s)", name, self.checkpoint_dir,
                            self.package_dir)

    def newer_names(self) -> list[str]:
        """Names whose store CURRENT names a version neither serving, staged, nor already refused."""
        out = []
        if self.checkpoint_dir is None:
            return out
        for name in self.names:
            try:
                version = self._read_current(name)[0]
            except ValidationError:
                version = UNREADABLE  # offered once: its refusal is recorded under the same mark
            if version is None:
                continue
            with self._lock:
                serving, pending = self._serving.get(name), self._pending.get(name)
                refused = self._refused.get(name, (None, None))[0]
                if refused not in (None, version) and version in (getattr(serving, "version", None),
                                                                  getattr(pending, "version", None)):
                    del self._refused[name]  # CURRENT names what serves again: the refusal is of the past
            known = {getattr(serving, "version", None), getattr(pending, "version", None), refused}
            if version not in known:
                out.append(name)
        return out

    def reload(self, name: str | None = None, force: bool = False) -> dict:
        """Load, validate and stage the store's CURRENT of `name` (None: every name). Blocking: call it off
        the event loop and off the step loop. Returns {name: {"status", "version", "reason"?}}."""
        if name is not None and name not in self.names:
            raise RequestError("unknown_model", "model", f"unknown model {name!r}; configured: {', '.join(self.names)}")
        names = [name] if name else list(self.names)
        report = {}
        with self._reload_lock:
            table_changed = self._refresh_known_lines()
            try:
                for n in names:
                    report[n] = self._reload_one(n, force)
            finally:  # a table already taken in reaches the models even if a reload failed
                if table_changed:
                    self._restage_known_lines(report)
        return report

    def reload_known_lines(self) -> bool:
        """Take in the store's table if its file changed, and stage every model with it (no model is
        reloaded: a refused version stays refused). True when the table changed."""
        with self._reload_lock:
            changed = self._refresh_known_lines()
            if changed:
                self._restage_known_lines({})
        return changed

    def _reload_one(self, name: str, force: bool) -> dict:
        with self._lock:
            running = self._pending.get(name) or self._serving.get(name)
        try:
            path, rolled_back = self._store_state(name)
        except ValidationError as e:
            return self._refuse(name, self._current_text(name), str(e))
        if path is None:
            return {"status": "unchanged", "version": getattr(running, "version", None),
                    "reason": "nothing published in the store"}
        if running is not None and path.stem == running.version and not force:
            return {"status": "unchanged", "version": running.version}
        try:
            candidate = build_serving(name, path, self.device, self.quantize, self.known_lines)
            if running is not None and candidate.version == running.version and not force:
                return {"status": "unchanged", "version": running.version}
            # One perplexity gate: the trainer's verdict when it published this version against the one
            # serving, else the metadata comparison. A rollback is the operator's explicit choice, recorded in
            # CURRENT by `rollback` (version order proves nothing: a candidate may sort older than a
            # hand-published version).
            trusted = rolled_back or self._gated(candidate, running)
            validate(candidate, None if trusted else running, self.ppl_tolerance)
        except (CheckpointError, ValidationError, OSError) as e:
            return self._refuse(name, path.stem, str(e))
        with self._lock:
            self._pending[name] = candidate
            self._refused.pop(name, None)
        log.info("model %s: version %s validated, swapping in at the next step", name, candidate.version)
        return {"status": "swapped", "version": candidate.version,
                "previous": getattr(running, "version", None)}

    def _refuse(self, name: str, version: str, reason: str) -> dict:
        log.error("model %s: refusing version %s: %s", name, version, reason)
        with self._lock:
            self._refused[name] = (version, reason)
            self.num_failed_validations += 1
        if self.metrics is not None:
            self.metrics.failed_validations.labels(name).inc()
        return {"status": "refused", "version": version, "reason": reason}

    def has_pending(self) -> bool:
        with self._lock:
            return bool(self._pending)

    def apply_pending(self) -> list[ServingModel]:
        """Swap staged versions in. Called by the step loop between steps, so a swap never splits a step."""
        with self._lock:
            if not self._pending:
                return []
            staged, self._pending = self._pending, {}
            old = {n: self._serving.get(n) for n in staged}
            self._serving.update(staged)
            self.num_swaps += len(staged)
        for name, serving in staged.items():
            self._set_info(old[name], serving)
            if self.metrics is not None:
                self.metrics.swaps.labels(name).inc()
            if old[name] is not None and old[name].version == serving.version:
                log.info("model %s: serving %s with the new known-lines table", name, serving.version)
            else:
                log.info("model %s: now serving %s (was %s)", name, serving.version, getattr(old[name], "version", None))
        return list(staged.values())

    def _set_info(self, old: ServingModel | None, new: ServingModel) -> None:
        if self.metrics is None:
            return
        if old is not None:
            self.metrics.model_info.remove(old.name, old.version) if (old.name, old.version) != (new.name, new.version) else None
        self.metrics.model_info.labels(new.name, new.version).set(1)
