"""The in-process engine: one step loop on a thread, shared by every request, behind an async API.

    engine = LocalEngine.from_env()            # CHECKPOINT_DIR, DEVICE, ENGINE_* from the environment
    await engine.start()
    result = await engine.generate(PoemRequest(prompt="月", form="qijue", mode="beam"))
    await engine.close()                       # stop admitting, drain in-flight requests, stop the thread

or `async with LocalEngine(EngineSettings(checkpoint_dir="...")) as engine: ...`.

The bot uses this class or `engine.serving.client.EngineClient` (same methods, over HTTP); both follow
`engine.api.PoemEngine`. Work is split as in vLLM: `engine.serving.scheduler` decides who runs each step,
`engine.serving.runner` runs it, `engine.serving.registry` holds the models and swaps in new versions.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import threading
import time
from dataclasses import dataclass

import torch

from engine.api import DEFAULT_MODELS, PoemRequest, PoemResult
from engine.errors import EngineUnavailableError, QueueFullError
from engine.sampling import kernels
from engine.serving.metrics import EngineMetrics
from engine.serving.registry import ModelRegistry
from engine.serving.runner import ROW_STATES, ModelRunner, row_state_of
from engine.serving.scheduler import (
    EngineRequest,
    RequestStatus,
    RunnerOutput,
    Scheduler,
)

log = logging.getLogger(__name__)

@dataclass
class EngineSettings:
    checkpoint_dir: str | None = None  # the store (engine.model.versions layout); None = package defaults only
    # Models to serve, the first the default; 词 go to the first that writes them.
    model_names: tuple[str, ...] = DEFAULT_MODELS
    device: str = "auto"  # auto | cpu | cuda
    max_num_rows: int = 256  # batch rows per step, summed over models (a beam request takes beam_width)
    max_queue: int = 1024  # waiting requests; one more gets QueueFullError at once
    min_batch_rows: int = 16  # pad each step's batch to this many rows: see docs/ENGINE.md, batch invariance
    request_timeout: float = 60.0  # default deadline (s) for a request without `timeout`
    # Admit a request only when its estimated finish (work ahead, measured step time) falls within this share
    # of its deadline; the rest get QueueFullError (503 + Retry-After) at once instead of a 504 later. 0 = off.
    admit_share: float = 0.8
    watch_interval: float = 10.0  # seconds between looks at CHECKPOINT_DIR for a new CURRENT; 0 = off
    ppl_tolerance: float = 0.05  # a new version may have val_ppl up to 5% worse than the serving one
    threads: int = 0  # torch threads for the step loop (0: leave torch's default)
    row_state: str = "host"  # where the rows' decoding state lives: host | device | graph (engine.serving.runner.ROW_STATES)
    quantize: str = "none"  # none | int8: run the models as int8 on a CPU (engine.model.network.quantize_int8)
    known_lines: bool = True  # ban completing the store's known lines (engine.poem.known_lines); False: quotes allowed

    @classmethod
    def from_env(cls, env=None, **overrides) -> EngineSettings:
        """Settings from CHECKPOINT_DIR, DEVICE and ENGINE_{MODELS,MAX_ROWS,MAX_QUEUE,THREADS,TIMEOUT,WATCH_INTERVAL,
        ADMIT_SHARE,ROW_STATE,QUANTIZE,KNOWN_LINES}."""
        env = os.environ if env is None else env
        values: dict = {}
        if env.get("CHECKPOINT_DIR"):
            values["checkpoint_dir"] = env["CHECKPOINT_DIR"]
        if env.get("DEVICE"):
            values["device"] = env["DEVICE"]
        if env.get("ENGINE_ROW_STATE"):
            values["row_state"] = env["ENGINE_ROW_STATE"]
        if env.get("ENGINE_QUANTIZE"):
            values["quantize"] = env["ENGINE_QUANTIZE"]
        if env.get("ENGINE_KNOWN_LINES"):
            if env["ENGINE_KNOWN_LINES"] not in ("on", "off"):
                raise ValueError(f"ENGINE_KNOWN_LINES must be on or off, got {env['ENGINE_KNOWN_LINES']!r}")
            values["known_lines"] = env["ENGINE_KNOWN_LINES"] == "on"
        if env.get("ENGINE_MODELS"):
            values["model_names"] = tuple(n.strip() for n in env["ENGINE_MODELS"].split(",") if n.strip())
        for key, name, kind in (("ENGINE_MAX_ROWS", "max_num_rows", int), ("ENGINE_MAX_QUEUE", "max_queue", int),
                                ("ENGINE_THREADS", "threads", int),
                                ("ENGINE_TIMEOUT", "request_timeout", float),
                                ("ENGINE_WATCH_INTERVAL", "watch_interval", float),
                                ("ENGINE_ADMIT_SHARE", "admit_share", float)):
            if env.get(key):
                try:
                    values[name] = kind(env[key])
                except ValueError:
                    raise ValueError(f"{key} must be a number, got {env[key]!r}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values).validate()

    def validate(self) -> EngineSettings:
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.row_state not in ROW_STATES:
            raise ValueError(f"row_state (ENGINE_ROW_STATE) must be one of {', '.join(ROW_STATES)}, got {self.row_state!r}")
        if not isinstance(self.known_lines, bool):
            raise ValueError(f"known_lines (ENGINE_KNOWN_LINES) must be true or false, got {self.known_lines!r}")
        if self.quantize not in ("none", "int8"):
            raise ValueError(f"quantize (ENGINE_QUANTIZE) must be none or int8, got {self.quantize!r}")
        if self.quantize == "int8" and str(self.device).startswith("cuda"):
            raise ValueError("ENGINE_QUANTIZE=int8 is for a CPU engine, and DEVICE is cuda")
        if not self.model_names:
            raise ValueError("model_names is empty")
        if self.max_num_rows < 16:
            raise ValueError("max_num_rows must be at least 16 (the widest beam)")
        if self.max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        if not 0 <= self.admit_share <= 1:
            raise ValueError(f"admit_share (ENGINE_ADMIT_SHARE) must be between 0 and 1, got {self.admit_share}")
        if not (isinstance(self.threads, int) and self.threads >= 0):
            raise ValueError(f"threads (ENGINE_THREADS) must be 0 (torch's default) or more, got {self.threads!r}")
        if not (math.isfinite(self.request_timeout) and self.request_timeout > 0):
            raise ValueError(f"request_timeout (ENGINE_TIMEOUT) must be a positive number of seconds, got "
                             f"{self.request_timeout!r}")
        if not (math.isfinite(self.watch_interval) and self.watch_interval >= 0):
            raise ValueError(f"watch_interval (ENGINE_WATCH_INTERVAL) must be 0 (off) or more seconds, got "
                             f"{self.watch_interval!r}")
        return self


class LocalEngine:
    """The PoemEngine that runs the models in this process (see the module docstring)."""

    def __init__(self, settings: EngineSettings | None = None, metrics: EngineMetrics | None = None):
        self.settings = (settings or EngineSettings()).validate()
        self.metrics = metrics or EngineMetrics()
        s = self.settings
        self.registry = ModelRegistry(s.checkpoint_dir, s.model_names, s.device, s.ppl_tolerance, metrics=self.metrics,
                                      quantize=s.quantize, known_lines=s.known_lines)
        self.scheduler = Scheduler(max_num_rows=s.max_num_rows, max_queue=s.max_queue, admit_share=s.admit_share)
        self.runner = ModelRunner(self.registry, min_batch_rows=s.min_batch_rows, row_state=s.row_state)
        self._cv = threading.Condition()  # guards the scheduler; wakes the step loop
        self._futures: dict[str, tuple[asyncio.Future, asyncio.AbstractEventLoop]] = {}
        self._thread: threading.Thread | None = None
        self._watcher: asyncio.Task | None = None
        self._accepting = False  # generate() admits requests
        self._stop = False  # the step loop exits once idle
        self._started_at: float | None = None
        self.counts = {"completed": 0, "failed": 0, "cancelled": 0, "expired": 0, "rejected": 0}
        self.num_steps = 0
        self.num_tokens = 0
        self._rate = (time.monotonic(), 0)  # (since, tokens) for tokens_per_second
        # Request ids need only be unique in this engine. A counter, not uuid4: os.urandom lets go of the
        # GIL, and the step loop, waiting for it, would take a burst of arrivals in two steps, not one.
        self._req_ids = itertools.count()

    @classmethod
    def from_env(cls, env=None, **overrides) -> LocalEngine:
        """An engine configured from the environment (EngineSettings.from_env); call start() next."""
        return cls(EngineSettings.from_env(env, **overrides))

    # -- life cycle --------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the models (off the event loop), start the step thread and the checkpoint watcher."""
        if self._thread is not None:
            return
        await asyncio.to_thread(self.registry.load_initial)
        if not self.registry.loaded_names():
            log.error("no model could be loaded; /readyz stays 503 until a valid version is published")
        if self.registry.device.type == "cpu" and not kernels.AVAILABLE:
            log.warning("engine._kernels is not built (no C compiler at install time): choosing tokens with "
                        "torch operations, several times slower on a CPU; reinstall with gcc to build it")
        if self.registry.device.type == "cpu" and self.settings.row_state == "graph":
            log.warning("ENGINE_ROW_STATE=graph on a CPU: the steps run eagerly, at about half the speed of host "
                        "rows (docs/PERFORMANCE.md); graph rows are for a GPU")
        self._stop = False
        self._thread = threading.Thread(target=self._step_loop, name="yinshi-step-loop", daemon=True)
        self._thread.start()
        self._accepting = True
        self._started_at = time.monotonic()
        if self.settings.watch_interval > 0 and self.settings.checkpoint_dir:
            self._watcher = asyncio.create_task(self._watch(), name="yinshi-checkpoint-watcher")

    async def close(self, drain_timeout: float = 30.0) -> None:
        """Stop admitting (new requests get EngineUnavailableError), finish in-flight ones, stop the thread."""
        self._accepting = False
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None
        if self._thread is None:
            return
        deadline = time.monotonic() + drain_timeout
        while time.monotonic() < deadline and self._thread.is_alive():  # a dead loop drains nothing
            with self._cv:
                if not self.scheduler.has_work():
                    break
            await asyncio.sleep(0.01)
        with self._cv:
            leftover = [r.req_id for r in (*self.scheduler.waiting, *self.scheduler.running.values())]
            for req_id in leftover:
                self.scheduler.abort(req_id)
            self._stop = True
            self._cv.notify_all()
        if leftover:
            log.warning("closing: %d requests did not finish within %.0fs", len(leftover), drain_timeout)
        await asyncio.to_thread(self._thread.join)
        self._thread = None
        self.runner.close()
        for req_id in list(self._futures):
            self._resolve(req_id, EngineUnavailableError("the engine is shutting down"))

    async def __aenter__(self) -> LocalEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def ready(self) -> bool:
        """Started, accepting, and at least one model loaded."""
        return (self._accepting and self._thread is not None and self._thread.is_alive()
                and bool(self.registry.loaded_names()))

    def loaded_names(self) -> list[str]:
        return self.registry.loaded_names()

    # -- requests --------------------------------------------------------------------------------------
    async def generate(self, request: PoemRequest) -> PoemResult:
        """Write one poem. Raises RequestError (bad input), QueueFullError (busy: retry later),
        EngineUnavailableError (not started, closing, or no such model) or TimeoutError (deadline passed).
        Cancelling the awaiting task frees the request's rows at the next step."""
        if not self._accepting:
            raise EngineUnavailableError("the engine is not running")
        request.validate()
        if request.form == "ci" and request.model is None:
            request.model = self.registry.ci_name()  # NOTE: bound here, so a hot swap rebinds to the same model
        serving = self.registry.get(request.model)
        plan = serving.make_plan(request)  # RequestError for characters the model cannot write
        now = time.monotonic()
        timeout = request.timeout if request.timeout is not None else self.settings.request_timeout
        late = 1 if row_state_of(self.settings.row_state, serving) == "graph" else 0  # graph rows read a poem a step late
        req = EngineRequest(req_id=str(next(self._req_ids)), request=request,
                            num_rows=request.beam_width if request.mode == "beam" else 1,
                            arrival_time=now, deadline=now + timeout, payload=(serving, plan),
                            num_steps=plan.num_steps + late, late=late)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cv:
            if not self._accepting:
                raise EngineUnavailableError("the engine is not running")
            try:
                self.scheduler.add_request(req)
            except QueueFullError:
                self.counts["rejected"] += 1
                self.metrics.rejections.inc()
                self.metrics.requests.labels("rejected").inc()
                raise
            except TimeoutError:  # a timeout shorter than the request alone takes: it expires at once
                self.counts["expired"] += 1
                self.metrics.requests.labels("expired").inc()
                raise
            self._futures[req.req_id] = (future, loop)
            self._cv.notify()
        try:
            return await future
        except asyncio.CancelledError:
            with self._cv:
                self.scheduler.abort(req.req_id)
                self._cv.notify()
            raise
        finally:
            self._futures.pop(req.req_id, None)

    async def models(self) -> list[dict]:
        """The serving models: name, cell, version, parameters, vocab_size, trained_on, metrics, default."""
        default = self.registry.default_name
        return [s.info() | {"default": s.name == default} for s in self.registry.all_serving()]

    async def status(self) -> dict:
        """Queue depth, running requests and rows, versions, uptime, request counts."""
        with self._cv:
            waiting, running = self.scheduler.num_waiting, len(self.scheduler.running)
            rows = self.scheduler.num_running_rows
        return {
            "ready": self.ready,
            "uptime_s": round(time.monotonic() - self._started_at, 3) if self._started_at else 0.0,
            "device": str(self.registry.device),
            "choice": "c-kernels" if self.registry.device.type == "cpu" and kernels.AVAILABLE else "torch",
            "queue_depth": waiting,
            "max_queue": self.settings.max_queue,
            "running_requests": running,
            "running_rows": rows,
            "max_num_rows": self.settings.max_num_rows,
            "models": {s.name: s.version for s in self.registry.all_serving()},
            # Where each model's rows keep their decoding state: host (RowState), device (DeviceRows) or graph.
            "row_state": {s.name: row_state_of(self.settings.row_state, s) for s in self.registry.all_serving()},
            # ENGINE_ROW_STATE=graph: per model version in use, its layouts, the CUDA graphs captured, why not.
            "graphs": self.runner.graph_status(),
            "default_model": self.registry.default_name,
            "refused_versions": self.registry.refused(),
            # Corpus lines no poem may complete (0: the store has no table; see docs/ENGINE.md).
            "known_lines": len(self.registry.known_lines) if self.registry.known_lines is not None else 0,
            "known_lines_error": self.registry.known_lines_error,
            "requests": dict(self.counts),
            "steps": self.num_steps,
            "tokens": self.num_tokens,
            "swaps": self.registry.num_swaps,
            "failed_validations": self.registry.num_failed_validations,
        }

    async def reload(self, name: str | None = None) -> dict:
        """Load the newest published version of each model (or of `name`) now: validate, then swap.
        Returns {name: {"status": "swapped" | "unchanged" | "refused", "version": …, "reason": …}}."""
        report = await asyncio.to_thread(self.registry.reload, name)
        await self._wait_for_swap()
        return report

    def refresh_gauges(self) -> None:
        """Set the point-in-time gauges (called before /metrics renders)."""
        with self._cv:
            self.metrics.queue_depth.set(self.scheduler.num_waiting)
            self.metrics.running_requests.set(len(self.scheduler.running))
            self.metrics.running_rows.set(self.scheduler.num_running_rows)

    # -- internals -------------------------------------------------------------------------------------
    async def _wait_for_swap(self, timeout: float = 10.0) -> None:
        """The step loop applies staged versions between steps; wait until it has."""
        with self._cv:
            self._cv.notify()
        deadline = time.monotonic() + timeout
        while self.registry.has_pending() and self._thread is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        if self._thread is None:  # not started: nobody else will apply it
            self.registry.apply_pending()

    async def _watch(self) -> None:
        """Look for a new CURRENT in the store every watch_interval seconds; reload the models that have one."""
        while True:
            await asyncio.sleep(self.settings.watch_interval)
            try:
                names = await asyncio.to_thread(self.registry.newer_names)
                for name in names:
                    log.info("model %s: a new version is published; loading it", name)
                    await asyncio.to_thread(self.registry.reload, name)
                if self.registry.known_lines_changed():
                    log.info("the store's known-lines table changed; loading it")
                    await asyncio.to_thread(self.registry.reload_known_lines)
                if names or self.registry.has_pending():
                    await self._wait_for_swap()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("checkpoint watcher failed; trying again in %.0fs", self.settings.watch_interval)

    def _resolve(self, req_id: str, outcome) -> None:
        """Hand a result or an exception to the awaiting task, from any thread."""
        self._resolve_all([(req_id, outcome)])

    def _resolve_all(self, outcomes: list[tuple[str, object]]) -> None:
        """`_resolve` for many requests: one wake-up of each waiting loop, not one per request (each wake-up
        is a write to the loop's pipe, and a step ends many poems at once)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for req_id, outcome in outcomes:
            entry = self._futures.get(req_id)
            if entry is not None:
                future, loop = entry
                by_loop.setdefault(loop, []).append((future, outcome))

        def settle(settling):
            for future, outcome in settling:
                if future.done():
                    continue
                try:
                    if isinstance(outcome, BaseException):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)
                except Exception as e:  # noqa: BLE001  e.g. an exception a future refuses: the others still settle
                    future.set_exception(RuntimeError(f"the engine's answer could not be handed over: {e}"))

        for loop, settling in by_loop.items():
            try:
                loop.call_soon_threadsafe(settle, settling)
            except RuntimeError:  # the caller's loop is closed; nobody is waiting
                pass

    def _step_loop(self) -> None:
        """The step thread. Should it ever die, nothing else would expire or answer requests: stop admitting and
        fail every waiting caller at once instead of leaving them hanging."""
        try:
            self._run_steps()
        except BaseException:
            log.exception("the engine's step loop stopped; failing every request, /readyz now 503")
            with self._cv:  # generate() registers its future under the same lock, after checking _accepting
                self._accepting = False
                waiting = list(self._futures)
            # NOTE: the exception's text (torch or CUDA messages, file paths) stays in the log, not in replies.
            error = EngineUnavailableError("the engine's step loop stopped")
            for req_id in waiting:
                self._count_failed()
                self._resolve(req_id, error)

    def _run_steps(self) -> None:
        """The one thread that runs steps: schedule → run → hand out results, until stopped and idle."""
        if self.settings.threads:
            torch.set_num_threads(self.settings.threads)
        while True:
            with self._cv:
                while not (self.scheduler.has_work() or self.registry.has_pending() or self._stop):
                    self._cv.wait()
                if self._stop and not self.scheduler.has_work():
                    return
                self.registry.apply_pending()  # a swap happens here, between two steps
                cycle_start = time.perf_counter()
                out = self.scheduler.schedule(time.monotonic())
            for req_id, status in out.aborted.items():
                self._abort_outcome(req_id, status)
            if out.is_empty and not out.finished_req_ids:
                continue
            t0 = time.perf_counter()
            try:
                run = self.runner.execute(out)
            except Exception as e:  # a bug, not the request's fault: fail what runs, keep serving
                log.exception("engine step failed; failing the %d running requests", len(self.scheduler.running))
                self._fail_running(e)
                continue
            elapsed = time.perf_counter() - t0
            with self._cv:
                done = self.scheduler.update_from_output(run)
            self._record_step(run, elapsed)
            outcomes = []
            for req in done:
                outcome = run.finished[req.req_id]
                if isinstance(outcome, BaseException):
                    self._count_failed()
                else:
                    latency = time.monotonic() - req.arrival_time
                    outcome.elapsed_ms = round(latency * 1e3, 3)  # admission to poem, queueing included
                    self.counts["completed"] += 1
                    self.metrics.requests.labels("completed").inc()
                    self.metrics.request_seconds.labels(req.request.mode).observe(latency)
                outcomes.append((req.req_id, outcome))
            self._resolve_all(outcomes)
            # The whole cycle, not only the runner: scheduling, handing out results and waiting for the lock
            # and the GIL are part of how long each step of a waiting request takes.
            with self._cv:
                self.scheduler.observe_step(time.perf_counter() - cycle_start, run.num_padded_rows or run.num_rows)

    def _abort_outcome(self, req_id: str, status: RequestStatus) -> None:
        if status is RequestStatus.EXPIRED:
            self.counts["expired"] += 1
            self.metrics.requests.labels("expired").inc()
            self._resolve(req_id, TimeoutError("the request's deadline passed before its poem was done"))
        else:
            self.counts["cancelled"] += 1
            self.metrics.requests.labels("cancelled").inc()
            if self._stop or not self._accepting:
                self._resolve(req_id, EngineUnavailableError("the engine is shutting down"))

    def _fail_running(self, error: Exception) -> None:
        with self._cv:
            req_ids = list(self.scheduler.running)
            self.scheduler.update_from_output(RunnerOutput(finished={r: error for r in req_ids}, num_rows=0))
        self.runner.reset()
        for req_id in req_ids:
            self._count_failed()
            self._resolve(req_id, EngineUnavailableError("the engine step failed; retry"))  # the log has why

    def _count_failed(self) -> None:
        self.counts["failed"] += 1
        self.metrics.requests.labels("failed").inc()

    def _record_step(self, run: RunnerOutput, elapsed: float) -> None:
        self.num_steps += 1
        self.num_tokens += run.num_rows
        m = self.metrics
        m.step_seconds.observe(elapsed)
        m.batch_rows.observe(run.num_rows)
        m.tokens.inc(run.num_rows)
        since, tokens = self._rate
        now = time.monotonic()
        if now - since >= 1.0:
            m.tokens_per_second.set((self.num_tokens - tokens) / (now - since))
            self._rate = (now, self.num_tokens)
