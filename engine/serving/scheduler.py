"""The scheduler: decides *who* runs each step. Plain Python, no tensors — tested with a fake runner.

Iteration-level scheduling (Orca, vLLM): an RNN's state is a fixed size per row, so at every step the
requests that finished leave the batch and waiting ones join it, up to `max_num_rows` rows. A greedy or
sampling request takes one row, a beam request `beam_width` rows for its whole life.

    sched = Scheduler(max_num_rows=256, max_queue=1024)
    sched.add_request(EngineRequest("r1", request, num_rows=1, arrival_time=now))   # or QueueFullError
    out = sched.schedule(now)            # SchedulerOutput: who joins, who continues, who leaves
    run = runner.execute(out)            # RunnerOutput: which requests the step finished
    done = sched.update_from_output(run) # their rows are free for the next schedule()

Admission is FIFO: when the head of the queue does not fit (a wide beam while the batch is nearly full)
nothing behind it jumps ahead, so wide beams cannot starve. Cancellation and deadlines are noticed at
the next schedule(): the request leaves (`aborted`) and its rows are free in that same step.

Admission by estimated wait: add_request refuses at once (QueueFullError) a request that would not finish
within `admit_share` of the time to its deadline, estimated from the work ahead of it (rows × steps left of
the running and waiting requests), the batch size and the step times the engine reports (observe_step).
Admitting it would only have ended in a TimeoutError after holding rows others could use. The step time of
a batch size is the mean of the recent steps of that size (rows rounded up to a power of two), each counted
as at most SPIKE times their median: one step that waited while the event loop admitted a burst does not
multiply it, while slow steps that keep coming still count. Only steps of the last FRESH_SECONDS count: a
figure measured under a load long gone (the refused requests never run to correct it) expires. A size not
measured yet is taken from a larger measured one, or scaled up linearly from a smaller one. A request that
would not finish even on an idle engine, by the same step times, is refused as too short (TimeoutError, not
to be retried). Without MIN_STEPS fresh steps of some size, or for a request without `num_steps`, only
`max_queue` limits admission.
"""

from __future__ import annotations

import enum
import math
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.api import PoemRequest
from engine.errors import QueueFullError

STEP_WINDOW = 32  # recent steps kept per batch size
SPIKE = 4.0  # a step counts for at most this many times the median of its size's recent steps
MIN_STEPS = 3  # steps of a batch size measured before its time counts
FRESH_SECONDS = 10.0  # a step measured longer ago says nothing of the machine now


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"  # the runner produced its poem
    CANCELLED = "cancelled"  # the caller went away
    EXPIRED = "expired"  # its deadline passed


@dataclass
class EngineRequest:
    req_id: str  # unique while the engine runs
    request: PoemRequest  # the validated request, in full
    num_rows: int  # batch rows it takes while running: beam_width for beam mode, else 1
    arrival_time: float  # monotonic seconds when it was admitted
    deadline: float | None = None  # monotonic seconds after which it is dropped; None = never
    status: RequestStatus = RequestStatus.WAITING
    cancel_requested: bool = False  # set by abort(); acted on at the next schedule()
    payload: object = None  # what the runner needs to set the request up (model version, plan); opaque here
    num_steps: int = 0  # steps it runs until done (a poem's length is fixed by its form); 0 = unknown
    late: int = 0  # of those, the last ones after its poem is written, until the runner hands it over (graph rows: 1)
    start_step: int = 0  # the scheduler's step count when it joined the batch

    @property
    def is_done(self) -> bool:
        return self.status in (RequestStatus.FINISHED, RequestStatus.CANCELLED, RequestStatus.EXPIRED)


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list[EngineRequest]  # join the batch this step, in full (the runner sets up their rows)
    scheduled_running_req_ids: list[str]  # already in the runner's batch: run one more step
    finished_req_ids: set[str]  # leave the runner before this step: finished, cancelled or expired
    aborted: dict[str, RequestStatus]  # req_id → CANCELLED | EXPIRED, the running or waiting ones dropped now
    num_scheduled_rows: int  # rows this step runs, before the runner pads the batch
    num_waiting: int  # left in the queue after this step's admissions

    @property
    def is_empty(self) -> bool:
        """Nothing to run (the step loop may sleep if finished_req_ids is empty too)."""
        return self.num_scheduled_rows == 0


@dataclass
class RunnerOutput:
    finished: dict[str, object]  # req_id → its result (whatever the runner makes: a PoemResult)
    num_rows: int  # rows the step ran, padding excluded
    num_padded_rows: int = 0  # rows the step ran, padding included (summed over models)


@dataclass
class Scheduler:
    max_num_rows: int = 256  # rows per step over all models; one beam request may take up to 16
    max_queue: int = 1024  # waiting requests; the next add_request raises QueueFullError
    retry_after: float = 1.0  # seconds a rejected caller is told to wait (at least)
    admit_share: float = 0.8  # admit when the estimated finish is within this share of the deadline; 0 = off
    # batch size (rows rounded up to a power of two) → its recent steps: (when, seconds scaled up to that size)
    step_times: dict[int, deque[tuple[float, float]]] = field(default_factory=dict)
    clock: Callable[[], float] = time.monotonic  # when a step is measured, and how old a measurement is
    num_steps: int = 0  # steps scheduled so far
    _waiting_rows: int = 0  # sum of num_rows over waiting
    _waiting_work: int = 0  # sum of num_rows * num_steps over waiting (row-steps)
    _running_work_at_0: int = 0  # sum of num_rows * (num_steps + start_step) over running; minus
    # num_steps * num_running_rows it is the running requests' row-steps left, kept without a pass per step
    waiting: deque[EngineRequest] = field(default_factory=deque)  # FIFO admission queue
    running: dict[str, EngineRequest] = field(default_factory=dict)  # req_id → request in the batch
    num_running_rows: int = 0  # sum of num_rows over running
    _finished_since_schedule: set[str] = field(default_factory=set)  # reported by the runner, not yet told back
    _req_ids: set[str] = field(default_factory=set)  # every req_id waiting or running
    _observed: int = 0  # steps observed so far
    # step_seconds's last answer: (steps observed then, until when it holds, the answer)
    _step_seconds: tuple[int, float, dict[int, float]] = field(default_factory=lambda: (-1, -math.inf, {}))

    # -- admission -----------------------------------------------------------------------------------
    def add_request(self, req: EngineRequest) -> None:
        """Queue a request, or raise QueueFullError at once when the queue is full."""
        if req.num_rows > self.max_num_rows:
            raise ValueError(f"{req.req_id}: needs {req.num_rows} rows, the batch holds {self.max_num_rows}")
        if req.req_id in self._req_ids:
            raise ValueError(f"duplicate req_id {req.req_id}")
        if len(self.waiting) >= self.max_queue:
            raise QueueFullError(self.retry_after)
        estimate = self.estimate_seconds(req)
        if estimate is not None and req.deadline is not None and self.admit_share > 0:
            budget = (req.deadline - req.arrival_time) * self.admit_share
            alone = self.estimate_seconds(req, alone=True)
            if alone > budget:
                # NOTE: not QueueFullError: no backlog to wait out, so a retry could never be admitted.
                raise TimeoutError(f"a timeout of {req.deadline - req.arrival_time:g}s is too short: this request "
                                   f"takes about {alone:.2g}s on an idle engine")
            if estimate > budget:
                # The backlog drains as fast as time passes: in about (estimate - budget) s it would fit.
                raise QueueFullError(max(self.retry_after, min(60.0, math.ceil(estimate - budget))))
        req.status = RequestStatus.WAITING
        self.waiting.append(req)
        self._waiting_rows += req.num_rows
        self._waiting_work += req.num_rows * req.num_steps
        self._req_ids.add(req.req_id)

    def observe_step(self, seconds: float, rows: int) -> None:
        """The engine's measurement of one step (its wall time, the rows it ran padded): feeds the estimate."""
        if seconds <= 0 or rows <= 0:
            return
        size = _size_class(rows)
        times = self.step_times.setdefault(size, deque(maxlen=STEP_WINDOW))
        times.append((self.clock(), seconds * size / rows))  # an overestimate for its rows, by less than 2×
        self._observed += 1

    def step_seconds(self) -> dict[int, float]:
        """Batch size → its step time, from its steps of the last FRESH_SECONDS (MIN_STEPS of them or more).
        NOTE: kept until the next step or until a measurement it used ages out: every arriving request asks."""
        now = self.clock()
        observed, until, seconds = self._step_seconds
        if observed != self._observed or now > until:
            self._step_seconds = (self._observed, *self._fresh_step_seconds(now))
        return dict(self._step_seconds[2])

    def _fresh_step_seconds(self, now: float) -> tuple[float, dict[int, float]]:
        """(when the first measurement used here ages out, the step times)."""
        out, until = {}, math.inf
        for size, times in self.step_times.items():
            fresh = [(at, t) for at, t in times if now - at <= FRESH_SECONDS]
            if len(fresh) >= MIN_STEPS:
                cap = SPIKE * statistics.median(t for _, t in fresh)
                out[size] = sum(min(t, cap) for _, t in fresh) / len(fresh)
                until = min(until, min(at for at, _ in fresh) + FRESH_SECONDS)
        return until, out

    def step_time(self, rows: int) -> float | None:
        """The time of one step of `rows` rows (see the module docstring); None without fresh measurements.
        An unmeasured size gets the nearest larger measured size's time, else the largest smaller one's scaled
        up linearly (an overestimate: part of a step's time does not grow with rows)."""
        measured = self.step_seconds()
        size = _size_class(rows)
        if size in measured:
            return measured[size]
        if not measured:
            return None
        larger = [s for s in measured if s > size]
        if larger:
            return measured[min(larger)]
        largest = max(measured)
        return measured[largest] * size / largest

    def estimate_seconds(self, req: EngineRequest, alone: bool = False) -> float | None:
        """When `req`, added now, would finish (`alone`: on an idle engine): None without fresh measured steps
        or a step count. NOTE: both from the same step times, so that a request refused as busy (503) could
        be admitted by a retry, and one refused as too short for an idle engine (504) could not."""
        if req.num_steps <= 0:
            return None
        rows = req.num_rows if alone else self.num_running_rows + self._waiting_rows + req.num_rows
        per_step = self.step_time(min(self.max_num_rows, rows))
        if per_step is None:
            return None
        wait_steps = 0.0
        if rows > self.max_num_rows:  # it must wait for rows: the work ahead drains a full batch per step
            running_left = max(0, self._running_work_at_0 - self.num_steps * self.num_running_rows)
            wait_steps = (running_left + self._waiting_work) / self.max_num_rows
        return (wait_steps + req.num_steps) * per_step

    def abort(self, req_id: str) -> bool:
        """Ask for a request to be dropped at the next schedule(); False when it is not here (done)."""
        req = self.running.get(req_id) or next((r for r in self.waiting if r.req_id == req_id), None)
        if req is None:
            return False
        req.cancel_requested = True
        return True

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._finished_since_schedule)

    # -- one step -------------------------------------------------------------------------------------
    def schedule(self, now: float) -> SchedulerOutput:
        """Decide this step: drop cancelled and expired requests, then admit waiting ones FIFO while rows last."""
        finished = set(self._finished_since_schedule)
        self._finished_since_schedule.clear()
        aborted: dict[str, RequestStatus] = {}

        # Running requests that were cancelled or ran out of time leave now; their rows are free below.
        for req_id, req in list(self.running.items()):
            # NOTE: one whose steps have all run is written; only its poem is on its way (graph rows read it a step
            # late): a deadline passing now must not throw it away.
            written = 0 < req.num_steps - req.late <= self.num_steps - req.start_step
            status = None if written else self._abort_status(req, now)
            if status is not None:
                self._drop(req, status)
                self._leave_running(req)
                finished.add(req_id)
                aborted[req_id] = status

        # Waiting ones too (they never reached the runner, so they are not in `finished`).
        if any(self._abort_status(r, now) for r in self.waiting):
            keep = deque()
            for req in self.waiting:
                status = self._abort_status(req, now)
                if status is None:
                    keep.append(req)
                else:
                    self._drop(req, status)
                    self._waiting_rows -= req.num_rows
                    self._waiting_work -= req.num_rows * req.num_steps
                    aborted[req.req_id] = status
            self.waiting = keep

        new_reqs: list[EngineRequest] = []
        while self.waiting and self.num_running_rows + self.waiting[0].num_rows <= self.max_num_rows:
            req = self.waiting.popleft()
            self._waiting_rows -= req.num_rows
            self._waiting_work -= req.num_rows * req.num_steps
            req.status = RequestStatus.RUNNING
            req.start_step = self.num_steps
            self.running[req.req_id] = req
            self.num_running_rows += req.num_rows
            self._running_work_at_0 += req.num_rows * (req.num_steps + req.start_step)
            new_reqs.append(req)

        new_ids = {r.req_id for r in new_reqs}
        continuing = [req_id for req_id in self.running if req_id not in new_ids]
        out = SchedulerOutput(
            scheduled_new_reqs=new_reqs,
            scheduled_running_req_ids=continuing,
            finished_req_ids=finished,
            aborted=aborted,
            num_scheduled_rows=self.num_running_rows,
            num_waiting=len(self.waiting),
        )
        assert 0 <= self.num_running_rows <= self.max_num_rows, self.num_running_rows
        if self.num_running_rows:
            self.num_steps += 1
        return out

    def check_invariants(self, out: SchedulerOutput) -> None:
        """What must hold after schedule() returned `out` (the tests call it after every step; each check
        is a pass over the batch, too dear for every step of the server)."""
        assert self.num_running_rows == sum(r.num_rows for r in self.running.values())
        assert not (out.finished_req_ids & set(self.running)), out.finished_req_ids & set(self.running)
        new_ids = {r.req_id for r in out.scheduled_new_reqs}
        assert len(new_ids) == len(out.scheduled_new_reqs) and not (new_ids & set(out.scheduled_running_req_ids))
        assert all(r.status is RequestStatus.RUNNING for r in self.running.values())
        assert all(r.status is RequestStatus.WAITING for r in self.waiting)
        assert len(self.waiting) <= self.max_queue
        assert self._req_ids == set(self.running) | {r.req_id for r in self.waiting}
        assert self._waiting_rows == sum(r.num_rows for r in self.waiting)
        assert self._waiting_work == sum(r.num_rows * r.num_steps for r in self.waiting)
        assert self._running_work_at_0 == sum(r.num_rows * (r.num_steps + r.start_step) for r in self.running.values())

    def update_from_output(self, output: RunnerOutput) -> list[EngineRequest]:
        """Record what the runner finished; their rows are free from the next schedule() on."""
        done = []
        for req_id in output.finished:
            req = self.running.get(req_id)
            if req is None:  # aborted in the same breath; the runner's result is dropped
                continue
            self._leave_running(req)
            req.status = RequestStatus.FINISHED
            self._req_ids.discard(req_id)
            self._finished_since_schedule.add(req_id)
            done.append(req)
        return done

    def _abort_status(self, req: EngineRequest, now: float) -> RequestStatus | None:
        if req.cancel_requested:
            return RequestStatus.CANCELLED
        if req.deadline is not None and now >= req.deadline:
            return RequestStatus.EXPIRED
        return None

    def _leave_running(self, req: EngineRequest) -> None:
        del self.running[req.req_id]
        self.num_running_rows -= req.num_rows
        self._running_work_at_0 -= req.num_rows * (req.num_steps + req.start_step)

    def _drop(self, req: EngineRequest, status: RequestStatus) -> None:
        req.status = status
        self._req_ids.discard(req.req_id)


def _size_class(rows: int) -> int:
    """The batch size a step of `rows` rows is filed under: the next power of two."""
    return 1 << (rows - 1).bit_length()
