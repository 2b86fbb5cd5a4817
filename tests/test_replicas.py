"""Two engine replicas behind the real HAProxy (deploy/haproxy/), on one checkpoint store, on 127.0.0.1.

A stream of poem requests goes through the balancer with EngineClient while a new version is published
(both replicas must swap to it) and one replica is SIGKILLed with requests in flight on it: every request
of the stream must end in a poem. The compose wiring (deploy/compose.yaml) is checked by parsing it.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port

from engine.api import PoemRequest, PoemResult
from engine.model import versions as store
from engine.model.checkpoint import load_checkpoint, save_checkpoint
from engine.serving.client import EngineClient

ROOT = Path(__file__).resolve().parent.parent
HAPROXY_DIR = ROOT / "deploy" / "haproxy"
WATCH_INTERVAL = 0.5
WORKERS = 4  # concurrent callers in the stream
MAX_REQUESTS = 800  # the stream stops here at the latest (a bound, not an expectation)
AFTER_KILL = 20  # requests started after the kill that must complete before the stream stops


def haproxy_binary() -> str:
    path = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy")
                                            if os.access(p, os.X_OK)), None)
    if path is None:
        # Fail, not skip: CI installs it (.ci/run), and a skipped balancer test would look like a passing one.
        pytest.fail("haproxy is not installed: `apt-get install -y haproxy` (.ci/run does this before the tests)")
    return path


def new_version(src: Path, dst: Path) -> Path:
    """The same weights saved again: a new version (a new timestamp) that passes the perplexity gate."""
    time.sleep(0.002)  # versions have millisecond resolution
    ckpt = load_checkpoint(src)
    save_checkpoint(dst, ckpt.model, ckpt.vocab, {k: ckpt.meta[k] for k in ("metrics", "corpus_hash", "train")
                                                  if k in ckpt.meta})
    return dst


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def wait_ready(url: str, proc: subprocess.Popen, log: Path) -> None:
    for _ in range(1200):  # up to ~2 min on a loaded machine; the usual is a few seconds
        if proc.poll() is not None:
            pytest.fail(f"{url}: the process exited ({proc.returncode}):\n{log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    pytest.fail(f"{url} never answered 200:\n{log.read_text(errors='replace')[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def haproxy_stats(sock_path: str) -> dict[str, dict]:
    """`show stat` on the admin socket: {server name: row} for backend `engines`."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(sock_path)
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    rows = csv.DictReader(data.decode().lstrip("# ").splitlines())
    return {r["svname"]: r for r in rows if r["pxname"] == "engines" and r["svname"] not in ("BACKEND",)}


@pytest.fixture
def cluster(tmp_path, tiny_checkpoint):
    """Two `python -m engine serve` replicas on one store and haproxy in front; everything stopped after."""
    haproxy = haproxy_binary()
    root = tmp_path / "checkpoints"
    v1 = store.publish(root, "lstm", tiny_checkpoint)
    env = {k: v for k, v in os.environ.items() if k != "ENGINE_TOKEN"}
    env.update(PYTHONPATH=str(ROOT), ENGINE_MODELS="lstm", ENGINE_WATCH_INTERVAL=str(WATCH_INTERVAL),
               DEVICE="cpu", ENGINE_THREADS="1")
    procs: list[subprocess.Popen] = []
    # The admin socket's path must fit sun_path (108 bytes); tmp_path can be longer.
    sock_dir = tempfile.mkdtemp(prefix="yinshi-hap-")
    try:
        replicas = []
        for _ in range(2):
            port = free_port()
            log = tmp_path / f"engine-{port}.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen([sys.executable, "-m", "engine", "serve", "--host", "127.0.0.1", "--port",
                                         str(port), "--checkpoints", str(root)], cwd=tmp_path, env=env,
                                        stdout=out, stderr=subprocess.STDOUT)
            procs.append(proc)
            replicas.append({"port": port, "url": f"http://127.0.0.1:{port}", "proc": proc, "log": log,
                             "server": f"engine-{port}"})
        for r in replicas:
            wait_ready(r["url"] + "/readyz", r["proc"], r["log"])

        # The replica list from the generator the systemd unit uses; the admin socket only for this test.
        servers = tmp_path / "engines.cfg"
        servers.write_text(subprocess.run([str(HAPROXY_DIR / "replicas.sh"), *(str(r["port"]) for r in replicas)],
                                          check=True, capture_output=True, text=True).stdout)
        sock = os.path.join(sock_dir, "admin.sock")
        extra = tmp_path / "test-admin.cfg"
        extra.write_text(f"global\n    stats socket {sock} mode 600 level admin\n")
        lb_port = free_port()
        hap_env = {**os.environ, "HAPROXY_BIND": f"127.0.0.1:{lb_port}", "HAPROXY_CHECK_INTER": "200ms"}
        args = [haproxy, "-f", str(HAPROXY_DIR / "haproxy.cfg"), "-f", str(servers), "-f", str(extra)]
        check = subprocess.run([*args, "-c"], env=hap_env, capture_output=True, text=True, check=False)
        assert check.returncode == 0, check.stdout + check.stderr
        hap_log = tmp_path / "haproxy.log"
        with open(hap_log, "wb") as out:
            hap = subprocess.Popen([*args, "-db"], env=hap_env, stdout=out, stderr=subprocess.STDOUT)
        procs.append(hap)
        wait_ready(f"http://127.0.0.1:{lb_port}/readyz", hap, hap_log)
        yield {"replicas": replicas, "url": f"http://127.0.0.1:{lb_port}", "sock": sock, "haproxy_log": hap_log,
               "store": root, "v1": v1, "tmp": tmp_path}
    finally:
        for proc in procs:
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
                except ProcessLookupError:
                    pass
            stop(proc)
        shutil.rmtree(sock_dir, ignore_errors=True)


async def until(what: str, condition, tries: int = 1200, pause: float = 0.05):
    """Poll `condition` (sync or async) until it returns something truthy; fail after `tries` polls."""
    for _ in range(tries):
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(pause)
    pytest.fail(f"gave up waiting: {what}")


async def test_two_replicas_behind_haproxy_swap_together_and_survive_a_sigkill(cluster, tiny_checkpoint):
    a, b = cluster["replicas"]
    phase = {"now": 0}  # 0: before both replicas serve v2, 1: after, 2: after the kill
    results: list[tuple[int, PoemResult | BaseException]] = []
    stream_stop = asyncio.Event()

    async def version(r) -> str | None:
        data = await asyncio.to_thread(get_json, r["url"] + "/v1/models")
        return data["models"][0]["version"]

    async def completed(r) -> int:
        return (await asyncio.to_thread(get_json, r["url"] + "/v1/status"))["requests"]["completed"]

    async with EngineClient(cluster["url"], retries=5, backoff=0.1, timeout=60) as client:
        async def caller(k: int) -> None:
            seed = k * 100_000
            while not stream_stop.is_set() and len(results) < MAX_REQUESTS:
                started, seed = phase["now"], seed + 1
                try:
                    result = await client.generate(PoemRequest(form="wujue", seed=seed))
                except Exception as e:  # noqa: BLE001 - every failure is recorded and asserted on below
                    result = e
                results.append((started, result))

        callers = [asyncio.create_task(caller(k)) for k in range(WORKERS)]
        try:
            # Both replicas take part in the stream before anything changes.
            await until("both replicas served a request through the balancer",
                        lambda: _both_completed(completed, a, b))

            v2 = await asyncio.to_thread(store.publish, cluster["store"], "lstm",
                                         new_version(tiny_checkpoint, cluster["tmp"] / "v2.safetensors"))
            published = time.monotonic()
            for r in (a, b):
                await until(f"{r['server']} serving {v2}", lambda r=r: _has(version(r), v2))
            swap_s = time.monotonic() - published
            phase["now"] = 1

            # SIGSTOP first, so that requests are certainly in flight on A when the SIGKILL lands (not a race
            # with a fast poem): wait until HAProxy has sent A a request A will never answer, then kill.
            os.kill(a["proc"].pid, signal.SIGSTOP)
            stuck = await until(f"a request in flight on stopped {a['server']}", lambda: int(
                haproxy_stats(cluster["sock"])[a["server"]]["scur"] or 0))
            a["proc"].kill()
            a["proc"].wait()
            phase["now"] = 2
            await until(f"{AFTER_KILL} requests started after the kill and completed",
                        lambda: sum(1 for p, _ in results if p == 2) >= AFTER_KILL)
        finally:
            stream_stop.set()
            await asyncio.gather(*callers)

    failures = [r for _, r in results if not isinstance(r, PoemResult)]
    assert not failures, f"{len(failures)} of {len(results)} requests failed: {failures[:3]}"
    assert len(results) < MAX_REQUESTS, "the stream hit its bound before the test's phases were done"
    before = {r.model["version"] for p, r in results if p == 0}
    after = {r.model["version"] for p, r in results if p > 0}
    assert cluster["v1"] in before  # the stream started on v1 …
    assert after == {v2}  # … and every request started once both replicas reported v2 got v2

    # HAProxy's log: the requests stuck on A came back through a retry (the last field of the a/f/b/s/r
    # counters; '+' = redispatched to another server), all answered 200 by B.
    lines = [m for m in re.finditer(r" (\S+) [\d-]+/[\d-]+/[\d-]+/[\d-]+/[\d-]+ (\d{3}) .* "
                                    r"\d+/\d+/\d+/\d+/(\+?)(\d+) \d+/\d+ \"POST /v1/poems",
                                    cluster["haproxy_log"].read_text(errors="replace"))]
    retried = [m for m in lines if int(m.group(4)) > 0]
    assert len(retried) >= stuck, (stuck, [m.group(0) for m in retried])
    assert all(m.group(1) == f"engines/{b['server']}" and m.group(2) == "200" for m in retried), \
        [m.group(0) for m in retried]
    print(f"\n{len(results)} requests, all 200 through the balancer; both replicas on {v2} {swap_s:.2f} s after "
          f"the publish (watch interval {WATCH_INTERVAL} s); {stuck} in flight on the killed replica, "
          f"{len(retried)} retried by HAProxy; statuses seen by HAProxy: "
          f"{sorted({m.group(2) for m in lines})}")


async def _both_completed(completed, a, b) -> bool:
    return min(await asyncio.gather(completed(a), completed(b))) >= 1


async def _has(value, expected) -> bool:
    return (await value) == expected


# -- deploy/compose.yaml: the balancer's wiring (no docker here, so the file is parsed and HAProxy checks its config)

def load_yaml_subset(text: str):
    """Enough YAML for deploy/compose.yaml (PyYAML is not a dependency): block mappings and sequences, JSON-style
    flow lists, quoted and plain scalars, comments, anchors, aliases and `<<` merges."""
    rows = []
    for raw in text.splitlines():
        kept, quote = [], None
        for j, ch in enumerate(raw):
            if quote:
                quote = None if ch == quote else quote
            elif ch in "\"'":
                quote = ch
            elif ch == "#" and (j == 0 or raw[j - 1] == " "):
                break
            kept.append(ch)
        line = "".join(kept).rstrip()
        if line.strip():
            rows.append([len(line) - len(line.lstrip()), line.strip()])
    anchors: dict = {}
    pos = 0

    def scalar(s: str):
        if s.startswith("*"):
            return anchors[s[1:]]
        if s.startswith("["):
            return json.loads(s)
        return s[1:-1] if s[:1] in "\"'" else s

    def block(indent: int):
        nonlocal pos
        if rows[pos][1].startswith("-"):
            items = []
            while pos < len(rows) and rows[pos][0] == indent and rows[pos][1].startswith("-"):
                rest = rows[pos][1][1:].strip()
                if ": " in rest or rest.endswith(":"):  # a mapping as the item: its keys sit at indent + 2
                    rows[pos] = [indent + 2, rest]
                    items.append(block(indent + 2))
                else:
                    items.append(scalar(rest))
                    pos += 1
            return items
        mapping: dict = {}
        while pos < len(rows) and rows[pos][0] == indent:
            key, _, rest = rows[pos][1].partition(":")
            key, rest = key.strip().strip("\"'"), rest.strip()
            pos += 1
            anchor = None
            if rest.startswith("&"):
                anchor, _, rest = rest[1:].partition(" ")
                rest = rest.strip()
            if rest:
                value = scalar(rest)
            elif pos < len(rows) and rows[pos][0] > indent:
                value = block(rows[pos][0])
            else:
                value = None
            if anchor:
                anchors[anchor] = value
            if key == "<<":
                for k, v in value.items():  # keys written out in the mapping win over merged ones
                    mapping.setdefault(k, v)
            else:
                mapping[key] = value
        return mapping

    return block(0)


def test_compose_puts_haproxy_in_front_of_scalable_engine_replicas():
    compose = load_yaml_subset((ROOT / "deploy" / "compose.yaml").read_text())
    services = compose["services"]
    engine, haproxy, bot = services["engine"], services["haproxy"], services["bot"]

    # `--scale engine=N` needs replicas without a fixed host port or container name.
    assert "ports" not in engine and "container_name" not in engine
    command = engine["command"]
    engine_port = command[command.index("--port") + 1]
    assert command[command.index("--host") + 1] == "0.0.0.0"  # reachable from the haproxy container

    # haproxy loads haproxy.cfg and compose.cfg from the mounted deploy/haproxy/.
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in haproxy["volumes"])
    assert mounts.get("./haproxy"), haproxy["volumes"]  # relative to deploy/, where compose.yaml is
    files = [haproxy["command"][i + 1] for i, a in enumerate(haproxy["command"]) if a == "-f"]
    assert [Path(f).parent.as_posix() for f in files] == [mounts["./haproxy"]] * 2, files
    assert {Path(f).name for f in files} == {"haproxy.cfg", "compose.cfg"}
    compose_cfg = (HAPROXY_DIR / "compose.cfg").read_text()
    # Docker's DNS name of the engine service and the port the replicas listen on.
    assert re.search(rf"^\s*server-template engine \d+-\d+ engine:{engine_port} .*resolvers docker", compose_cfg, re.MULTILINE)

    # The bot talks to haproxy, on the port haproxy binds; only haproxy is published, on the host's loopback.
    bind_port = haproxy["environment"]["HAPROXY_BIND"].rsplit(":", 1)[1]
    assert bot["environment"]["ENGINE_URL"] == f"http://haproxy:{bind_port}"
    assert "haproxy" in bot["depends_on"] and "engine" in haproxy["depends_on"]
    assert [p.rsplit(":", 1)[1] for p in haproxy["ports"]] == [bind_port]
    for name, service in services.items():
        assert all(p.startswith("127.0.0.1:") for p in service.get("ports", [])), name

    # And HAProxy accepts the compose variant of its configuration.
    check = subprocess.run([haproxy_binary(), "-c", "-f", str(HAPROXY_DIR / "haproxy.cfg"), "-f",
                            str(HAPROXY_DIR / "compose.cfg")], env={**os.environ, "HAPROXY_BIND": ":8080"},
                           capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
