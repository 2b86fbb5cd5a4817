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
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from engine.api import PoemRequest
from engine.errors import QueueFullError


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
    retry_after: float = 1.0  # seconds a rejected caller is told to wait
    waiting: deque[EngineRequest] = field(default_factory=deque)  # FIFO admission queue
    running: dict[str, EngineRequest] = field(default_factory=dict)  # req_id → request in the batch
    num_running_rows: int = 0  # sum of num_rows over running
    _finished_since_schedule: set[str] = field(default_factory=set)  # reported by the runner, not yet told back
    _req_ids: set[str] = field(default_factory=set)  # every req_id waiting or running

    # -- admission -----------------------------------------------------------------------------------
    def add_request(self, req: EngineRequest) -> None:
        """Queue a request, or raise QueueFullError at once when the queue is full."""
        if req.num_rows > self.max_num_rows:
            raise ValueError(f"{req.req_id}: needs {req.num_rows} rows, the batch holds {self.max_num_rows}")
        if req.req_id in self._req_ids:
            raise ValueError(f"duplicate req_id {req.req_id}")
        if len(self.waiting) >= self.max_queue:
            raise QueueFullError(self.retry_after)
        req.status = RequestStatus.WAITING
        self.waiting.append(req)
        self._req_ids.add(req.req_id)

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
            status = self._abort_status(req, now)
            if status is not None:
                self._drop(req, status)
                del self.running[req_id]
                self.num_running_rows -= req.num_rows
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
                    aborted[req.req_id] = status
            self.waiting = keep

        new_reqs: list[EngineRequest] = []
        while self.waiting and self.num_running_rows + self.waiting[0].num_rows <= self.max_num_rows:
            req = self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running[req.req_id] = req
            self.num_running_rows += req.num_rows
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

    def update_from_output(self, output: RunnerOutput) -> list[EngineRequest]:
        """Record what the runner finished; their rows are free from the next schedule() on."""
        done = []
        for req_id in output.finished:
            req = self.running.pop(req_id, None)
            if req is None:  # aborted in the same breath; the runner's result is dropped
                continue
            self.num_running_rows -= req.num_rows
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

    def _drop(self, req: EngineRequest, status: RequestStatus) -> None:
        req.status = status
        self._req_ids.discard(req.req_id)
