"""`corpus download` against a local aiohttp server that plays upstream: good files, a 404, server errors,
broken JSON, a connection dropped mid-file; resume skips finished files and continues partial ones."""

import asyncio
import json
import sys
from pathlib import Path

import pytest
from aiohttp import web

from conftest import make_poems, write_corpus
from trainer.corpus import load_corpus
from trainer.download import DownloadResult, download, file_list

ROOT = Path(__file__).resolve().parent.parent
FILES = ["全唐诗/poet.tang.0.json", "全唐诗/poet.tang.1000.json", "全唐诗/poet.tang.2000.json",
         "全唐诗/poet.tang.3000.json", "全唐诗/唐诗三百首.json"]


class Upstream:
    """Serves files under `root` at /raw/<path>; `faults[path]` is a list of misbehaviours, one per request
    (404, 500, "drop": half the body then a closed connection, or bytes to serve instead of the file)."""

    def __init__(self, root: Path):
        self.root, self.faults, self.requests = root, {}, []
        self.inflight = self.max_inflight = 0
        self.delay = 0.0
        self.generate = False  # serve a small valid file for any path (the full upstream list)
        self.gzip = False  # compress whole-file responses, as GitHub's raw server does
        self.encodings = []  # Accept-Encoding of each request

    async def handle(self, request: web.Request) -> web.StreamResponse:
        rel = request.match_info["path"]
        self.requests.append((rel, request.headers.get("Range")))
        self.encodings.append(request.headers.get("Accept-Encoding"))
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            queue = self.faults.get(rel, [])
            fault = queue.pop(0) if queue else None
            if fault in (404, 500):
                return web.Response(status=fault, text="no" if fault == 404 else "boom")
            if isinstance(fault, bytes):
                return web.Response(body=fault, content_type="application/json")
            path = self.root / rel
            if self.generate and not path.exists():
                return web.Response(body=json.dumps([{"paragraphs": [rel]}]).encode(), content_type="application/json")
            if not path.is_file():
                return web.Response(status=404, text="no")
            stat = path.stat()
            etag = f'"{stat.st_mtime_ns:x}-{stat.st_size:x}"'  # what web.FileResponse sends
            if request.headers.get("If-Range") not in (None, etag):
                # Changed since the part began: the whole file (FileResponse reads If-Range as a date only).
                return web.Response(body=path.read_bytes(), content_type="application/json", headers={"ETag": etag})
            if fault == "drop":
                data = path.read_bytes()
                resp = web.StreamResponse(headers={"ETag": etag})
                if self.gzip:
                    resp.enable_compression(web.ContentCoding.gzip)
                resp.content_length = len(data)
                await resp.prepare(request)
                await resp.write(data[: len(data) // 2])
                await asyncio.sleep(0.05)  # let the half reach the client before the connection goes
                request.transport.close()
                return resp
            if self.gzip and "Range" not in request.headers:
                resp = web.Response(body=path.read_bytes(), content_type="application/json", headers={"ETag": etag})
                resp.enable_compression(web.ContentCoding.gzip)
                return resp
            return web.FileResponse(path)  # honours Range, as GitHub's raw server does
        finally:
            self.inflight -= 1


@pytest.fixture
def upstream_root(tmp_path):
    root = write_corpus(tmp_path / "upstream", make_poems(200, seed=7), per_file=50)
    (root / "全唐诗" / "唐诗三百首.json").write_text(
        json.dumps([{"paragraphs": ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。"], "tags": ["五言绝句"]}],
                   ensure_ascii=False), encoding="utf-8")
    return root


@pytest.fixture
async def upstream(aiohttp_server, upstream_root):
    up = Upstream(upstream_root)
    app = web.Application()
    app.router.add_get("/raw/{path:.*}", up.handle)
    server = await aiohttp_server(app)
    up.base_url = str(server.make_url("/raw"))
    return up


async def fetch(upstream, dest, files=FILES, **kw) -> DownloadResult:
    kw = {"retries": 0, "retry_delay": 0.0, "timeout": 10.0} | kw
    return await download(dest, files, upstream.base_url, **kw)


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.rglob("*") if ".part" in p.name or ".tmp" in p.name)


def test_the_file_list_is_the_upstream_layout():
    files = file_list()
    assert len(files) == 58 + 255 + 1
    assert files[0] == "全唐诗/poet.tang.0.json" and "全唐诗/poet.tang.57000.json" in files
    assert "全唐诗/poet.song.254000.json" in files and "全唐诗/唐诗三百首.json" in files
    assert not any(f.startswith("宋词/") for f in files)
    with_ci = file_list(include_ci=True)
    assert len(with_ci) == len(files) + 22 + 1 and "宋词/ci.song.21000.json" in with_ci
    assert len(set(with_ci)) == len(with_ci)


async def test_download_fetches_every_file_byte_for_byte_in_the_upstream_layout(upstream, upstream_root, tmp_path):
    dest = tmp_path / "dest"
    result = await fetch(upstream, dest)
    assert result.ok and sorted(result.downloaded) == sorted(FILES) and not result.skipped
    for rel in FILES:
        assert (dest / rel).read_bytes() == (upstream_root / rel).read_bytes()
    assert result.num_bytes == sum((upstream_root / rel).stat().st_size for rel in FILES)
    assert leftovers(dest) == []
    assert len(load_corpus([dest]).poems) == 201  # the trainer reads the download as it reads a clone


async def test_a_second_run_skips_complete_files_without_asking_the_server(upstream, tmp_path):
    dest = tmp_path / "dest"
    await fetch(upstream, dest)
    upstream.requests.clear()
    result = await fetch(upstream, dest)
    assert result.ok and result.downloaded == [] and sorted(result.skipped) == sorted(FILES)
    assert upstream.requests == []
    assert "0 downloaded" in result.summary() and "5 already present" in result.summary()


async def test_a_404_fails_that_file_alone_with_a_one_line_reason(upstream, tmp_path):
    upstream.faults["全唐诗/poet.tang.1000.json"] = [404]
    result = await fetch(upstream, tmp_path / "dest")
    assert list(result.failed) == ["全唐诗/poet.tang.1000.json"]
    why = result.failed["全唐诗/poet.tang.1000.json"]
    assert "HTTP 404" in why and "\n" not in why and upstream.base_url in why
    assert len(result.downloaded) == 4 and not (tmp_path / "dest" / "全唐诗/poet.tang.1000.json").exists()
    assert not result.ok and "1 failed" in result.summary()


async def test_a_server_error_is_retried(upstream, tmp_path):
    upstream.faults["全唐诗/poet.tang.2000.json"] = [500, 500]
    result = await fetch(upstream, tmp_path / "dest", retries=2)
    assert result.ok
    assert [r for r, _ in upstream.requests].count("全唐诗/poet.tang.2000.json") == 3


async def test_after_a_server_error_mid_way_the_next_run_fetches_only_what_is_missing(upstream, tmp_path):
    dest = tmp_path / "dest"
    upstream.faults["全唐诗/poet.tang.2000.json"] = [500, 500]
    upstream.faults["全唐诗/poet.tang.3000.json"] = [500, 500]
    first = await fetch(upstream, dest, retries=1)
    assert sorted(first.failed) == ["全唐诗/poet.tang.2000.json", "全唐诗/poet.tang.3000.json"]
    assert "HTTP 500" in first.failed["全唐诗/poet.tang.2000.json"] and "after 2 tries" in first.failed["全唐诗/poet.tang.2000.json"]
    upstream.requests.clear()
    second = await fetch(upstream, dest)
    assert second.ok and sorted(second.downloaded) == ["全唐诗/poet.tang.2000.json", "全唐诗/poet.tang.3000.json"]
    assert len(second.skipped) == 3
    assert sorted(r for r, _ in upstream.requests) == ["全唐诗/poet.tang.2000.json", "全唐诗/poet.tang.3000.json"]


@pytest.mark.parametrize("body,problem", [
    (b'[{"paragraphs": ["\xe5\xba\x8a\xe5\x89\x8d', "invalid JSON"),  # cut off mid-record
    (b"<html>rate limited</html>", "invalid JSON"),
    (b'{"message": "Not Found"}', "expected a JSON array"),
    (b"[\"\xff\xfe\"]", "not UTF-8"),
])
async def test_a_broken_file_is_never_kept(upstream, tmp_path, body, problem):
    dest = tmp_path / "dest"
    upstream.faults["全唐诗/poet.tang.0.json"] = [body]
    result = await fetch(upstream, dest)
    assert list(result.failed) == ["全唐诗/poet.tang.0.json"] and problem in result.failed["全唐诗/poet.tang.0.json"]
    assert not (dest / "全唐诗/poet.tang.0.json").exists()
    assert leftovers(dest) == []
    # The next run, with upstream fixed, fetches it whole.
    again = await fetch(upstream, dest)
    assert again.downloaded == ["全唐诗/poet.tang.0.json"] and again.ok


async def test_a_file_broken_on_disk_is_fetched_again(upstream, upstream_root, tmp_path):
    dest = tmp_path / "dest"
    await fetch(upstream, dest)
    target = dest / "全唐诗/poet.tang.1000.json"
    target.write_bytes(target.read_bytes()[:100])  # say, a copy cut short by hand
    result = await fetch(upstream, dest)
    assert result.downloaded == ["全唐诗/poet.tang.1000.json"] and len(result.skipped) == 4
    assert target.read_bytes() == (upstream_root / "全唐诗/poet.tang.1000.json").read_bytes()


async def test_a_dropped_connection_is_continued_with_a_range_request(upstream, upstream_root, tmp_path):
    dest = tmp_path / "dest"
    rel = "全唐诗/poet.tang.3000.json"
    size = (upstream_root / rel).stat().st_size
    upstream.faults[rel] = ["drop"]
    first = await fetch(upstream, dest)  # no retries: the half stays as a .part
    assert rel in first.failed and "connection lost" in first.failed[rel]
    assert leftovers(dest) == [".poet.tang.3000.json.part", ".poet.tang.3000.json.part.validator"]
    assert not (dest / rel).exists()
    upstream.requests.clear()
    second = await fetch(upstream, dest)
    assert second.downloaded == [rel]
    assert upstream.requests == [(rel, f"bytes={size // 2}-")]
    assert second.num_bytes == size - size // 2
    assert (dest / rel).read_bytes() == (upstream_root / rel).read_bytes()
    assert leftovers(dest) == []


async def test_a_dropped_connection_is_retried_in_the_same_run(upstream, upstream_root, tmp_path):
    rel = "全唐诗/poet.tang.1000.json"
    upstream.faults[rel] = ["drop"]
    result = await fetch(upstream, tmp_path / "dest", retries=1)
    assert result.ok
    assert [h for r, h in upstream.requests if r == rel][1].startswith("bytes=")
    assert (tmp_path / "dest" / rel).read_bytes() == (upstream_root / rel).read_bytes()


async def test_a_gzip_download_is_stored_decoded_and_resumed_in_identity_bytes(upstream, upstream_root, tmp_path):
    dest = tmp_path / "dest"
    rel = "全唐诗/poet.tang.2000.json"
    # Big enough that zlib emits compressed bytes before the connection drops.
    records = [{"paragraphs": [t]} for t in make_poems(4000, seed=8)]
    (upstream_root / rel).write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    upstream.gzip = True
    upstream.faults[rel] = ["drop"]
    first = await fetch(upstream, dest, files=[rel])
    assert rel in first.failed and "gzip" in upstream.encodings[0]
    part = dest / "全唐诗" / ".poet.tang.2000.json.part"
    have = part.stat().st_size
    assert 0 < have and (upstream_root / rel).read_bytes().startswith(part.read_bytes())
    upstream.requests.clear()
    upstream.encodings.clear()
    second = await fetch(upstream, dest, files=[rel])
    assert second.ok and upstream.requests == [(rel, f"bytes={have}-")] and upstream.encodings == ["identity"]
    assert (dest / rel).read_bytes() == (upstream_root / rel).read_bytes()


async def test_a_file_changed_upstream_since_its_part_began_is_fetched_whole_not_spliced(upstream, upstream_root,
                                                                                          tmp_path):
    """A resume sent Range alone: with upstream changed since, the kept file was the old first half plus the
    new second half, a file that never existed upstream."""
    dest = tmp_path / "dest"
    rel = "全唐诗/poet.tang.3000.json"
    upstream.faults[rel] = ["drop"]
    assert rel in (await fetch(upstream, dest, files=[rel])).failed
    records = [{"paragraphs": [t]} for t in make_poems(50, seed=99)]
    (upstream_root / rel).write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    second = await fetch(upstream, dest, files=[rel])
    assert second.ok and (dest / rel).read_bytes() == (upstream_root / rel).read_bytes()
    assert leftovers(dest) == []


async def test_a_part_without_a_validator_is_started_again_not_resumed(upstream, upstream_root, tmp_path):
    dest = tmp_path / "dest"
    rel = "全唐诗/poet.tang.0.json"
    (dest / "全唐诗").mkdir(parents=True)
    data = (upstream_root / rel).read_bytes()
    (dest / "全唐诗" / ".poet.tang.0.json.part").write_bytes(data[:100])  # from a server that sent no ETag
    result = await fetch(upstream, dest, files=[rel])
    assert result.ok and upstream.requests == [(rel, None)] and (dest / rel).read_bytes() == data


@pytest.mark.parametrize("body, problem", [
    (b"[" * 5000, "RecursionError"),
    (b"[" + b"1" * 5000 + b"]", "ValueError"),
    ('[{"paragraphs": ["月"]}]'.encode("utf-16"), "not UTF-8"),
    (b"\xef\xbb\xbf[]", "invalid JSON"),
], ids=["deep-nesting", "long-number", "utf-16", "bom"])
async def test_a_file_the_corpus_reader_would_refuse_is_one_error_and_the_run_goes_on(upstream, tmp_path, body,
                                                                                      problem):
    """Deep nesting crashed the whole run with a traceback, and UTF-16 or a BOM was kept as a good file."""
    dest = tmp_path / "dest"
    upstream.faults["全唐诗/poet.tang.0.json"] = [body]
    result = await fetch(upstream, dest)
    assert list(result.failed) == ["全唐诗/poet.tang.0.json"] and problem in result.failed["全唐诗/poet.tang.0.json"]
    assert len(result.downloaded) == len(FILES) - 1 and leftovers(dest) == []
    (dest / "全唐诗/poet.tang.0.json").write_bytes(body)  # the same junk under the real name is not "complete"
    assert "全唐诗/poet.tang.0.json" in (await fetch(upstream, dest)).downloaded


async def test_negative_retries_are_refused(upstream, tmp_path):
    with pytest.raises(ValueError, match="retries"):
        await fetch(upstream, tmp_path / "dest", retries=-1)


async def test_a_stale_part_longer_than_the_file_is_restarted(upstream, upstream_root, tmp_path):
    dest = tmp_path / "dest"
    rel = "全唐诗/poet.tang.0.json"
    (dest / "全唐诗").mkdir(parents=True)
    (dest / "全唐诗" / ".poet.tang.0.json.part").write_bytes(b"x" * 10**6)
    result = await fetch(upstream, dest, files=[rel], retries=1)
    assert result.ok and (dest / rel).read_bytes() == (upstream_root / rel).read_bytes()


async def test_no_more_files_are_fetched_at_once_than_the_concurrency_limit(upstream, tmp_path):
    upstream.delay = 0.05
    result = await fetch(upstream, tmp_path / "dest", concurrency=2)
    assert result.ok and upstream.max_inflight == 2


async def test_an_unreachable_server_fails_each_file_in_one_line(tmp_path, unused_tcp_port):
    result = await download(tmp_path / "dest", FILES[:2], f"http://127.0.0.1:{unused_tcp_port}/raw",
                            retries=1, retry_delay=0.0, timeout=5.0)
    assert sorted(result.failed) == sorted(FILES[:2])
    assert all("gave up after 2 tries" in why and "\n" not in why for why in result.failed.values())


async def test_the_command_prints_one_line_per_failure_and_a_summary_then_resumes(upstream, tmp_path):
    upstream.generate = True
    missing = "全唐诗/poet.song.154000.json"
    upstream.faults[missing] = [404]
    dest = tmp_path / "dest"

    async def run_cli():
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "trainer", "corpus", "download", "--dest", str(dest), "--base-url",
            upstream.base_url, "--retries", "0", "--quiet", "--only", "全唐诗/poet.song.15*", "--only", "*三百首*",
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        return proc.returncode, out.decode(), err.decode()

    code, out, err = await run_cli()
    assert code == 1
    assert err.splitlines() == [f"error: {missing}: HTTP 404 Not Found ({upstream.base_url}/"
                                f"%E5%85%A8%E5%94%90%E8%AF%97/poet.song.154000.json)"]
    # poet.song.15000 and 150000…159000, and 唐诗三百首 (宋词三百首 needs --include-ci)
    assert out.startswith("incomplete: 11 downloaded") and "1 failed" in out and out.count("\n") == 1
    assert (dest / "全唐诗" / "唐诗三百首.json").is_file() and not (dest / "宋词").exists()
    code, out, err = await run_cli()
    assert (code, err) == (0, "")
    assert out.startswith("done: 1 downloaded") and "11 already present" in out


def test_only_that_matches_nothing_is_an_error_line(tmp_path, capsys):
    from trainer.__main__ import main

    assert main(["corpus", "download", "--dest", str(tmp_path), "--only", "全宋诗/*"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --only 全宋诗/* matches none") and err.count("\n") == 1


# -- the retrain daemon's download: an empty or missing corpus directory is filled, anything else is left alone --
def daemon_config(upstream, tmp_path, corpus: Path):
    from trainer.retrain import RetrainConfig

    env = {"CHECKPOINT_DIR": str(tmp_path / "store"), "CORPUS_DIR": str(corpus), "CORPUS_BASE_URL": upstream.base_url}
    return RetrainConfig.from_env(env)


async def test_the_daemon_fills_a_missing_corpus_directory_and_writes_its_known_lines_table(upstream, tmp_path):
    from engine.poem.known_lines import KNOWN_LINES_FILE, KnownLines
    from trainer.retrain import prepare_corpus

    upstream.generate = True  # the fixture's few real files, and a small valid one for every other upstream path
    corpus = tmp_path / "data" / "chinese-poetry"
    cfg = daemon_config(upstream, tmp_path, corpus)
    assert cfg.download  # on unless CORPUS_DOWNLOAD=off
    await asyncio.to_thread(prepare_corpus, cfg)
    assert all((corpus / rel).is_file() for rel in file_list(include_ci=True))
    from trainer.download import DOWNLOAD_LOCK

    assert sorted(p.name for p in corpus.iterdir()) == [DOWNLOAD_LOCK, "全唐诗", "宋词"]  # no marker, no parts
    assert leftovers(corpus) == []
    table = KnownLines.load(tmp_path / "store" / KNOWN_LINES_FILE)
    assert table.meta["corpus_hash"] == load_corpus([str(corpus)], include_ci=True).digest()

    # A finished corpus is not asked for again.
    asked = len(upstream.requests)
    await asyncio.to_thread(prepare_corpus, cfg)
    assert len(upstream.requests) == asked


async def test_a_directory_that_holds_a_corpus_of_its_own_is_left_alone(upstream, tmp_path):
    from trainer.download import fetch_corpus

    own = write_corpus(tmp_path / "own", make_poems(20, seed=3), per_file=10)
    before = sorted(p.relative_to(own) for p in own.rglob("*"))
    assert await asyncio.to_thread(fetch_corpus, own, upstream.base_url) is None
    assert sorted(p.relative_to(own) for p in own.rglob("*")) == before and upstream.requests == []


async def test_a_daemon_download_cut_short_is_taken_up_again_by_the_next_run(upstream, tmp_path):
    from trainer.download import UNFINISHED, fetch_corpus, wants_corpus

    upstream.generate = True
    broken = "宋词/ci.song.7000.json"
    upstream.faults[broken] = [500]
    corpus = tmp_path / "corpus"
    first = await asyncio.to_thread(fetch_corpus, corpus, upstream.base_url, retries=0, retry_delay=0.0)
    assert list(first.failed) == [broken]
    # The marker stays, so the directory, which now holds files, is still the daemon's to finish.
    assert (corpus / UNFINISHED).exists() and wants_corpus(corpus)
    asked = len(upstream.requests)
    second = await asyncio.to_thread(fetch_corpus, corpus, upstream.base_url, retries=0, retry_delay=0.0)
    assert second.ok and second.downloaded == [broken] and len(upstream.requests) == asked + 1
    assert not (corpus / UNFINISHED).exists() and not wants_corpus(corpus)


def test_corpus_download_is_on_or_off_and_nothing_else():
    from trainer.retrain import RetrainConfig

    assert RetrainConfig.from_env({}).download
    assert not RetrainConfig.from_env({"CORPUS_DOWNLOAD": "off"}).download
    with pytest.raises(ValueError, match="CORPUS_DOWNLOAD must be on or off, got 'no'"):
        RetrainConfig.from_env({"CORPUS_DOWNLOAD": "no"})


async def test_a_directory_with_only_hidden_files_is_filled(upstream, tmp_path):
    from trainer.download import fetch_corpus

    upstream.generate = True
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / ".gitkeep").write_text("")
    result = await asyncio.to_thread(fetch_corpus, corpus, upstream.base_url, retries=0)
    assert result.ok and (corpus / "全唐诗" / "唐诗三百首.json").is_file()


async def test_an_unfinished_download_does_not_claim_a_corpus_the_operator_put_there_since(upstream, tmp_path):
    from trainer.download import UNFINISHED, fetch_corpus

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / UNFINISHED).write_text("")  # a first start without a network left only this
    write_corpus(corpus / "mine", make_poems(20, seed=3), per_file=10)
    assert await asyncio.to_thread(fetch_corpus, corpus, upstream.base_url) is None
    assert upstream.requests == [] and sorted(p.name for p in corpus.iterdir()) == [UNFINISHED, "mine"]


async def test_a_symlink_to_a_directory_not_made_yet_is_filled_there_and_a_json_path_is_never_made(upstream, tmp_path):
    from trainer.download import fetch_corpus

    upstream.generate = True
    link = tmp_path / "corpus"
    link.symlink_to(tmp_path / "mounted" / "chinese-poetry")
    assert (await asyncio.to_thread(fetch_corpus, link, upstream.base_url, retries=0)).ok
    assert (tmp_path / "mounted" / "chinese-poetry" / "宋词" / "宋词三百首.json").is_file()
    typo = tmp_path / "tang300.json"
    assert await asyncio.to_thread(fetch_corpus, typo, upstream.base_url) is None and not typo.exists()


async def test_files_the_source_does_not_have_finish_the_download_and_are_not_asked_for_again(upstream, tmp_path):
    from trainer.download import UNFINISHED, fetch_corpus, wants_corpus

    upstream.generate = True
    upstream.faults["宋词/宋词三百首.json"] = [404]
    corpus = tmp_path / "corpus"
    result = await asyncio.to_thread(fetch_corpus, corpus, upstream.base_url, retries=0)
    assert result.missing == ["宋词/宋词三百首.json"] and list(result.failed) == result.missing
    assert not (corpus / UNFINISHED).exists() and not wants_corpus(corpus)
    asked = len(upstream.requests)
    assert await asyncio.to_thread(fetch_corpus, corpus, upstream.base_url) is None
    assert len(upstream.requests) == asked


async def test_a_download_another_process_is_making_is_left_to_it(upstream, tmp_path):
    import fcntl

    from trainer.download import DOWNLOAD_LOCK, UNFINISHED, fetch_corpus

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / UNFINISHED).write_text("")  # the other process began it
    with open(corpus / DOWNLOAD_LOCK, "a") as held:  # as the other process holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        assert await asyncio.to_thread(fetch_corpus, corpus, upstream.base_url) is None
    assert upstream.requests == []


async def test_no_model_retrains_on_a_corpus_whose_download_is_not_finished(upstream, tmp_path):
    """A retrain on the few files that had arrived (2 of 337 in the review) could be published."""
    import fcntl

    from trainer.download import DOWNLOAD_LOCK, UNFINISHED
    from trainer.retrain import read_run_records, retrain_all

    corpus = tmp_path / "corpus"
    write_corpus(corpus, make_poems(40, seed=5), per_file=20)
    (corpus / UNFINISHED).write_text("")
    cfg = daemon_config(upstream, tmp_path, corpus)
    cfg.names, cfg.time_budget, cfg.max_steps = ("lstm",), 0.01, 1  # were it to train, a short run
    cfg.work = str(tmp_path / "work")
    with open(corpus / DOWNLOAD_LOCK, "a") as held:  # another process is still downloading
        fcntl.flock(held, fcntl.LOCK_EX)
        records = await asyncio.to_thread(retrain_all, cfg)
    assert [r["outcome"] for r in records] == ["skipped"] * len(cfg.names)
    assert all("not finished" in r["why"] for r in records)
    assert [r["name"] for r in read_run_records(cfg.store)] == list(cfg.names)
    assert not Path(cfg.work).exists()  # nothing trained


async def test_without_a_network_the_daemon_tries_one_file_not_all(tmp_path, unused_tcp_port):
    """Every one of the 337 files failed alike, each after its retries: minutes of the retrain worker."""
    from trainer.download import UNFINISHED, fetch_corpus

    corpus = tmp_path / "corpus"
    result = await asyncio.to_thread(fetch_corpus, corpus, f"http://127.0.0.1:{unused_tcp_port}/raw", retries=0)
    assert len(result.failed) == 1 and not result.missing and (corpus / UNFINISHED).exists()


async def test_without_a_network_a_resumed_download_also_tries_one_file_not_all(upstream, tmp_path, unused_tcp_port):
    from trainer.download import fetch_corpus

    upstream.generate = True
    for rel in file_list(include_ci=True)[1:]:
        upstream.faults[rel] = [500]
    corpus = tmp_path / "corpus"
    first = await asyncio.to_thread(fetch_corpus, corpus, upstream.base_url, retries=0)
    assert first.downloaded == ["全唐诗/poet.tang.0.json"]  # the first file arrived, the others did not
    result = await asyncio.to_thread(fetch_corpus, corpus, f"http://127.0.0.1:{unused_tcp_port}/raw", retries=0)
    assert list(result.failed) == ["全唐诗/poet.tang.1000.json"] and not result.downloaded
