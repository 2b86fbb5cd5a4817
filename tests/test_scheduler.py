"""The scheduler on its own, driven by a fake runner that finishes each request after a set number of steps."""

from __future__ import annotations

import pytest

from engine.api import PoemRequest
from engine.errors import QueueFullError
from engine.serving.scheduler import (
    FRESH_SECONDS,
    MIN_STEPS,
    EngineRequest,
    RequestStatus,
    RunnerOutput,
    Scheduler,
    SchedulerOutput,
)


class FakeRunner:
    """Keeps the set of rows the scheduler put in the batch and finishes a request after `steps[req_id]` steps."""

    def __init__(self, steps: dict[str, int] | None = None, default_steps: int = 3):
        self.steps, self.default_steps = steps or {}, default_steps
        self.rows: dict[str, int] = {}  # req_id → rows it holds in the batch
        self.done_steps: dict[str, int] = {}
        self.batch_sizes: list[int] = []

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        for req_id in out.finished_req_ids:
            self.rows.pop(req_id, None)
        for req in out.scheduled_new_reqs:
            assert req.req_id not in self.rows
            self.rows[req.req_id] = req.num_rows
        assert set(self.rows) == {r.req_id for r in out.scheduled_new_reqs} | set(out.scheduled_running_req_ids)
        num_rows = sum(self.rows.values())
        assert num_rows == out.num_scheduled_rows
        self.batch_sizes.append(num_rows)
        finished = {}
        for req_id in self.rows:
            self.done_steps[req_id] = self.done_steps.get(req_id, 0) + 1
            if self.done_steps[req_id] >= self.steps.get(req_id, self.default_steps):
                finished[req_id] = f"poem for {req_id}"
        return RunnerOutput(finished=finished, num_rows=num_rows)


def make_req(req_id: str, num_rows: int = 1, deadline: float | None = None) -> EngineRequest:
    mode = "beam" if num_rows > 1 else "greedy"
    return EngineRequest(req_id, PoemRequest(mode=mode, beam_width=num_rows), num_rows=num_rows,
                         arrival_time=0.0, deadline=deadline)


def checked(sched: Scheduler, now: float) -> SchedulerOutput:
    """schedule(), then the invariants every step must keep (the server skips these passes)."""
    out = sched.schedule(now)
    sched.check_invariants(out)
    return out


def run_until_idle(sched: Scheduler, runner: FakeRunner, max_steps: int = 1000) -> list[str]:
    order = []
    for step in range(max_steps):
        if not sched.has_work():
            return order
        out = checked(sched, float(step))
        run = runner.execute(out)
        order += [r.req_id for r in sched.update_from_output(run)]
    raise AssertionError("scheduler never went idle")


def measured(sched: Scheduler, seconds: float, rows: int, steps: int = 9) -> Scheduler:
    """Report `steps` steps of `seconds` at `rows` rows, as the engine does after each step."""
    for _ in range(steps):
        sched.observe_step(seconds, rows)
    return sched


def test_a_full_queue_rejects_the_next_request_at_once():
    sched = Scheduler(max_num_rows=16, max_queue=2)
    sched.add_request(make_req("a"))
    sched.add_request(make_req("b"))
    with pytest.raises(QueueFullError) as info:
        sched.add_request(make_req("c"))
    assert info.value.retry_after > 0


def test_requests_join_while_others_run_and_leave_when_finished():
    sched, runner = Scheduler(max_num_rows=2), FakeRunner({"a": 2, "b": 4, "c": 1})
    for r in "abc":
        sched.add_request(make_req(r))
    out = checked(sched, 0.0)
    assert [r.req_id for r in out.scheduled_new_reqs] == ["a", "b"]
    sched.update_from_output(runner.execute(out))
    out = checked(sched, 1.0)
    assert out.scheduled_new_reqs == [] and sorted(out.scheduled_running_req_ids) == ["a", "b"]
    done = sched.update_from_output(runner.execute(out))
    assert [r.req_id for r in done] == ["a"]
    out = checked(sched, 2.0)  # a left, c takes its row in the very next step
    assert out.finished_req_ids == {"a"}
    assert [r.req_id for r in out.scheduled_new_reqs] == ["c"] and out.scheduled_running_req_ids == ["b"]


def test_every_request_finishes_and_the_batch_never_exceeds_max_num_rows():
    sched = Scheduler(max_num_rows=20, max_queue=100)
    steps = {}
    for i in range(60):
        width = [1, 1, 5, 16, 3][i % 5]
        sched.add_request(make_req(f"r{i}", num_rows=width))
        steps[f"r{i}"] = 1 + i % 7
    runner = FakeRunner(steps)
    finished = run_until_idle(sched, runner)
    assert sorted(finished) == sorted(steps)
    assert max(runner.batch_sizes) <= 20
    assert sched.num_running_rows == 0 and not sched.running and not sched.waiting


def test_a_wide_beam_at_the_head_of_the_queue_is_not_overtaken():
    sched, runner = Scheduler(max_num_rows=16), FakeRunner(default_steps=5)
    sched.add_request(make_req("small", 1))
    sched.add_request(make_req("wide", 16))
    sched.add_request(make_req("late", 1))
    out = checked(sched, 0.0)
    assert [r.req_id for r in out.scheduled_new_reqs] == ["small"]  # wide does not fit; late waits behind it
    sched.update_from_output(runner.execute(out))
    assert [r.req_id for r in sched.waiting] == ["wide", "late"]
    assert run_until_idle(sched, runner) == ["small", "wide", "late"]


def test_a_beam_request_takes_beam_width_rows():
    sched = Scheduler(max_num_rows=16)
    sched.add_request(make_req("beam", 5))
    out = checked(sched, 0.0)
    assert out.num_scheduled_rows == 5 and sched.num_running_rows == 5


def test_a_cancelled_running_request_frees_its_rows_at_the_next_step():
    sched, runner = Scheduler(max_num_rows=5), FakeRunner(default_steps=100)
    sched.add_request(make_req("beam", 5))
    sched.add_request(make_req("next", 1))
    out = checked(sched, 0.0)
    sched.update_from_output(runner.execute(out))
    assert sched.abort("beam")
    out = checked(sched, 1.0)
    assert out.aborted == {"beam": RequestStatus.CANCELLED}
    assert "beam" in out.finished_req_ids  # the runner drops its rows
    assert [r.req_id for r in out.scheduled_new_reqs] == ["next"]  # and the freed rows are used at once
    runner.execute(out)


def test_a_cancelled_waiting_request_never_reaches_the_runner():
    sched = Scheduler(max_num_rows=1)
    sched.add_request(make_req("a"))
    sched.add_request(make_req("b"))
    checked(sched, 0.0)
    sched.abort("b")
    out = checked(sched, 1.0)
    assert out.aborted == {"b": RequestStatus.CANCELLED} and "b" not in out.finished_req_ids
    assert sched.num_waiting == 0


def test_a_request_past_its_deadline_expires_whether_running_or_waiting():
    sched, runner = Scheduler(max_num_rows=1), FakeRunner(default_steps=100)
    sched.add_request(make_req("running", deadline=2.0))
    sched.add_request(make_req("waiting", deadline=1.5))
    out = checked(sched, 0.0)
    sched.update_from_output(runner.execute(out))
    out = checked(sched, 1.0)
    assert out.aborted == {}
    out = checked(sched, 2.0)
    assert out.aborted == {"running": RequestStatus.EXPIRED, "waiting": RequestStatus.EXPIRED}
    assert not sched.has_work() or out.finished_req_ids == {"running"}


def test_aborting_a_finished_request_says_it_is_not_there():
    sched, runner = Scheduler(), FakeRunner(default_steps=1)
    sched.add_request(make_req("a"))
    sched.update_from_output(runner.execute(checked(sched, 0.0)))
    assert sched.abort("a") is False


def test_a_duplicate_or_oversized_request_is_refused():
    sched = Scheduler(max_num_rows=4)
    sched.add_request(make_req("a"))
    with pytest.raises(ValueError, match="duplicate"):
        sched.add_request(make_req("a"))
    with pytest.raises(ValueError, match="rows"):
        sched.add_request(make_req("wide", 5))


def test_the_invariant_check_catches_rows_that_do_not_add_up():
    sched = Scheduler(max_num_rows=16)
    sched.add_request(make_req("a", num_rows=3))
    out = checked(sched, 0.0)
    sched.num_running_rows -= 1  # a bookkeeping slip
    with pytest.raises(AssertionError):
        sched.check_invariants(out)


def test_admission_refuses_at_once_what_cannot_finish_before_its_deadline_and_admitted_ones_do():
    # Each step takes 0.1 s (fake time) at a full batch of 32 rows; every request needs 16 rows for 10 steps
    # and has 5 s. Queue length alone admitted them all, and the later ones expired in the queue (504s).
    sched = measured(Scheduler(max_num_rows=32, max_queue=1000), 0.1, 32)
    step, now = 0, 0.0
    admitted, refused = [], []

    def arrive(req_id):
        req = EngineRequest(req_id, PoemRequest(mode="beam", beam_width=16), num_rows=16, arrival_time=now,
                            deadline=now + 5.0, num_steps=10)
        try:
            sched.add_request(req)
        except QueueFullError as e:
            assert e.retry_after >= 1
            refused.append(req_id)
        else:
            admitted.append(req)

    for i in range(40):  # a burst
        arrive(f"burst{i}")
    assert admitted and refused and len(admitted) < 40
    runner, finished_at = FakeRunner(default_steps=10), {}
    while sched.has_work() or step < 200:
        if step < 200 and step % 5 == 0:
            arrive(f"later{step}")  # a steady trickle while the backlog drains
        out = checked(sched, now)
        assert not out.aborted  # nothing admitted expires
        run = runner.execute(out)
        now += 0.1
        step += 1
        for req in sched.update_from_output(run):
            finished_at[req.req_id] = now
        sched.observe_step(0.1, 32)
    assert set(finished_at) == {r.req_id for r in admitted}
    assert all(finished_at[r.req_id] <= r.deadline + 1e-9 for r in admitted)
    assert any(r.req_id.startswith("later") for r in admitted)  # the backlog drained and admission resumed


def test_the_estimate_uses_the_measured_step_time_and_the_work_ahead():
    sched = Scheduler(max_num_rows=32, max_queue=1000)
    req = EngineRequest("a", PoemRequest(), num_rows=1, arrival_time=0.0, deadline=1.0, num_steps=10)
    assert sched.estimate_seconds(req) is None  # nothing measured yet: admission by queue length only
    measured(sched, 0.05, 32)
    assert sched.estimate_seconds(req) == pytest.approx(0.5)  # an empty engine: its own 10 steps
    for i in range(4):
        sched.add_request(EngineRequest(f"b{i}", PoemRequest(mode="beam", beam_width=16), num_rows=16,
                                        arrival_time=0.0, deadline=100.0, num_steps=10))
    # 640 row-steps ahead at 32 rows a step: 20 steps of waiting, then its own 10.
    assert sched.estimate_seconds(req) == pytest.approx(1.5)
    with pytest.raises(QueueFullError):
        sched.add_request(req)


def test_a_timeout_shorter_than_the_request_alone_takes_is_a_timeout_not_a_busy_engine():
    """An idle engine answered "busy, retry in 1 s" to a request it could never admit (beam-16 with a 0.01 s
    timeout): the client retried for nothing. Now it expires at once, as it would once admitted (a 504)."""
    sched = measured(Scheduler(max_num_rows=32, max_queue=1000), 0.05, 32)
    req = EngineRequest("a", PoemRequest(mode="beam", beam_width=16), num_rows=16, arrival_time=0.0, deadline=0.01,
                        num_steps=10)
    with pytest.raises(TimeoutError, match="too short"):
        sched.add_request(req)
    assert sched.num_waiting == 0
    sched.add_request(EngineRequest("b", PoemRequest(), num_rows=1, arrival_time=0.0, deadline=10.0, num_steps=10))


def beam16(req_id: str, deadline: float, num_steps: int = 64) -> EngineRequest:
    return EngineRequest(req_id, PoemRequest(mode="beam", beam_width=16), num_rows=16, arrival_time=0.0,
                         deadline=deadline, num_steps=num_steps)


def test_one_slow_step_does_not_make_an_idle_engine_refuse_a_burst():
    """One slow step (the step loop waiting while the event loop admits a burst) lifted a moving average of the
    step time twentyfold, scaled again by 256/16 rows: 48 beam-16 requests at an idle engine with the default
    60 s got 503 "retry in 40-60 s" with the queue nearly empty."""
    sched = measured(Scheduler(max_num_rows=256, max_queue=1024), 0.002, 16, steps=50)
    sched.observe_step(0.2, 16)
    for i in range(48):
        sched.add_request(beam16(f"b{i}", deadline=60.0))
    assert sched.num_waiting == 48


def test_a_full_batch_is_estimated_from_full_batch_steps_not_scaled_up_from_small_ones():
    # A step's fixed cost does not grow with its rows: 256 rows took 8 ms here, 16 rows 2 ms, not 256/16 × 2 ms.
    sched = measured(measured(Scheduler(max_num_rows=256, max_queue=1024), 0.008, 256), 0.002, 16)
    for i in range(16):  # 256 rows ahead: a full batch from now on
        sched.add_request(beam16(f"b{i}", deadline=100.0, num_steps=10))
    # 16 × 16 × 10 row-steps ahead at 256 a step: 10 steps of waiting, then its own 10, at 8 ms each.
    assert sched.estimate_seconds(beam16("late", deadline=100.0, num_steps=10)) == pytest.approx(20 * 0.008)


def test_an_idle_engine_does_not_keep_the_step_time_measured_under_load():
    """After a burst the engine goes idle and runs no step, so the step time measured under load stayed: a
    request that takes 64 ms alone got 504 "takes about 3.2s on an idle engine" until another one ran."""
    sched = measured(measured(Scheduler(max_num_rows=256), 0.001, 16), 0.05, 256, steps=100)
    req = EngineRequest("a", PoemRequest(), num_rows=1, arrival_time=0.0, deadline=0.1, num_steps=64)
    assert sched.estimate_seconds(req) == pytest.approx(0.064)
    sched.add_request(req)  # neither a 504 (too short alone) nor a 503 (busy)
    assert sched.num_waiting == 1


def test_the_first_steps_of_a_cold_engine_do_not_decide_admission():
    # The first step also waits for the event loop admitting the burst that woke it; one such step is no measure.
    sched = Scheduler(max_num_rows=256, max_queue=1024)
    sched.observe_step(0.5, 16)
    for i in range(48):
        sched.add_request(beam16(f"b{i}", deadline=60.0))
    assert sched.num_waiting == 48


def test_slow_steps_that_keep_coming_count_and_a_slower_machine_is_followed():
    # Every fourth step waits for the event loop (3 ms against 1 ms): the engine pays that on every fourth step.
    sched = Scheduler(max_num_rows=64)
    for i in range(64):
        sched.observe_step(0.003 if i % 4 == 3 else 0.001, 64)
    assert sched.step_time(64) == pytest.approx(0.0015)
    measured(sched, 0.01, 64, steps=32)  # other load on the machine: every step ten times slower from now on
    assert sched.step_time(64) == pytest.approx(0.01)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_step_time_measured_long_ago_no_longer_decides_admission():
    """A burst run under load left a slow figure; the refused requests never ran to correct it, so an idle
    engine went on refusing 15 of every 16 requests, burst after burst."""
    clock = Clock()
    sched = measured(measured(Scheduler(max_num_rows=256, max_queue=1024, clock=clock), 0.01, 16), 0.5, 256)
    with pytest.raises(QueueFullError):
        for i in range(16):
            sched.add_request(beam16(f"b{i}", deadline=4.0))
    clock.now += FRESH_SECONDS + 1  # nothing ran since
    for i in range(16):
        sched.add_request(beam16(f"c{i}", deadline=4.0))
    assert sched.estimate_seconds(beam16("d", deadline=4.0)) is None  # unmeasured: the queue length decides


def test_an_idle_engine_refuses_as_busy_only_what_a_retry_could_get_in():
    """The busy check (503) and the too-short check (504) used different step times: on an idle engine a request
    got 503 "retry in 1s" that no retry could ever turn into a poem."""
    sched = measured(Scheduler(max_num_rows=256, max_queue=1024, clock=Clock()), 0.002, 1)
    measured(sched, 0.004, 16)
    req = EngineRequest("a", PoemRequest(), num_rows=1, arrival_time=0.0, deadline=0.2, num_steps=64)
    assert sched.estimate_seconds(req) == sched.estimate_seconds(req, alone=True)
    too_short = EngineRequest("b", PoemRequest(), num_rows=1, arrival_time=0.0, deadline=0.12, num_steps=64)
    with pytest.raises(TimeoutError):  # 64 steps of 2 ms do not fit 0.8 × 0.12 s: a 504, not a 503
        sched.add_request(too_short)
    sched.add_request(req)
    assert sched.num_waiting == 1


def test_a_step_time_ages_out_to_the_moment_not_the_whole_second():
    clock = Clock()
    clock.now = 0.4
    sched = measured(Scheduler(clock=clock), 0.01, 16, steps=MIN_STEPS)
    clock.now = 0.4 + FRESH_SECONDS  # the last moment they count
    assert sched.step_seconds() == {16: pytest.approx(0.01)}
    clock.now += 0.1  # within the same whole second, but past their age
    assert sched.step_seconds() == {}
    sched.step_seconds()[16] = 9.0  # a caller's copy: the cache is not changed through it
    measured(sched, 0.02, 16, steps=MIN_STEPS)
    assert sched.step_seconds() == {16: pytest.approx(0.02)}


def test_a_request_whose_steps_have_all_run_is_not_expired_while_its_poem_is_read():
    """Graph rows read a poem one step after its last: a deadline passing in between threw a written poem away."""
    sched = Scheduler(max_num_rows=16)
    sched.add_request(EngineRequest("done", PoemRequest(), num_rows=1, arrival_time=0.0, deadline=5.0, num_steps=3))
    # As the engine counts graph rows: three steps to write, one more until the poem is handed over.
    sched.add_request(EngineRequest("late", PoemRequest(), num_rows=1, arrival_time=0.0, deadline=5.0, num_steps=4,
                                    late=1))
    sched.add_request(EngineRequest("long", PoemRequest(), num_rows=1, arrival_time=0.0, deadline=5.0, num_steps=30))
    for now in (0.0, 1.0, 2.0):  # the three steps that write "done" and "late"; nobody reports them finished yet
        checked(sched, now)
    out = checked(sched, 6.0)  # the deadlines passed
    assert out.aborted == {"long": RequestStatus.EXPIRED} and {"done", "late"} <= set(sched.running)
    assert sched.abort("late") and checked(sched, 7.0).aborted == {}  # nor cancelled: the poem is written
