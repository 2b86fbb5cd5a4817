"""engine.poem.meter (/check): regular classics read clean, each planted fault is found alone at its place,
古体 is named and not faulted; the HTTP route, the CLI and the bot command. The poems are public-domain
classics written out here (not read from any corpus file)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from bot_fixtures import *  # noqa: F401,F403
from bot_fixtures import make_settings

from bot.commands import CHECK_USAGE, Commands, Who
from engine.errors import RequestError
from engine.poem.meter import check_meter, format_report
from engine.serving.service import ServiceSettings, create_app

ROOT = Path(__file__).resolve().parent.parent

CHUNWANG = "国破山河在，城春草木深。感时花溅泪，恨别鸟惊心。烽火连三月，家书抵万金。白头搔更短，浑欲不胜簪。"  # 杜甫《春望》
GUANQUELOU = "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"  # 王之涣《登鹳雀楼》
CHUSAI = "秦时明月汉时关，万里长征人未还。但使龙城飞将在，不教胡马度阴山。"  # 王昌龄《出塞》
SHANXING = "远上寒山石径斜，白云生处有人家。停车坐爱枫林晚，霜叶红于二月花。"  # 杜牧《山行》
DENGGAO = ("风急天高猿啸哀，渚清沙白鸟飞回。无边落木萧萧下，不尽长江滚滚来。"
           "万里悲秋常作客，百年多病独登台。艰难苦恨繁霜鬓，潦倒新停浊酒杯。")  # 杜甫《登高》
# 拗救 in the classics: 南朝四百八十寺 (6th 仄) answered by 多少楼台烟雨中 (5th 平): 对句救.
JIANGNANCHUN = "千里莺啼绿映红，水村山郭酒旗风。南朝四百八十寺，多少楼台烟雨中。"  # 杜牧《江南春》
# 清新庾开府 and 何时一樽酒 are 平平仄平仄: 本句自救.
YILIBAI = "白也诗无敌，飘然思不群。清新庾开府，俊逸鲍参军。渭北春天树，江东日暮云。何时一樽酒，重与细论文。"  # 杜甫《春日忆李白》
JINGYESI = "床前明月光，疑是地上霜。举头望明月，低头思故乡。"  # 李白《静夜思》, a 古绝
JIANGXUE = "千山鸟飞绝，万径人踪灭。孤舟蓑笠翁，独钓寒江雪。"  # 柳宗元《江雪》, rhymes on 入声


def faults(text: str) -> list[tuple[str, int, int | None]]:
    report = check_meter(text)
    assert report.style == "jinti"
    return [(f.kind, f.line, f.position) for f in report.faults]


def altered(poem: str, old: str, new: str) -> str:
    assert poem.count(old) == 1, old
    return poem.replace(old, new)


@pytest.mark.parametrize("poem, form", [
    (CHUNWANG, "wulv"), (GUANQUELOU, "wujue"), (CHUSAI, "qijue"), (SHANXING, "qijue"), (DENGGAO, "qilv"),
    (JIANGNANCHUN, "qijue"), (YILIBAI, "wulv"),
])
def test_a_regular_classic_is_jinti_without_a_fault(poem, form):
    report = check_meter(poem)
    assert (report.form.name, report.style, report.faults) == (form, "jinti", [])


def test_chunwang_tones_rhyme_and_group():
    report = check_meter(CHUNWANG)
    assert [line.text for line in report.lines] == ["国破山河在", "城春草木深", "感时花溅泪", "恨别鸟惊心",
                                                    "烽火连三月", "家书抵万金", "白头搔更短", "浑欲不胜簪"]
    # 深 胜 更 不 have readings in both tones in 平水韵: 中.
    assert [line.tones for line in report.lines] == ["仄仄平平仄", "平平仄仄中", "仄平平中仄", "仄仄仄平平",
                                                     "平仄平中仄", "平平仄仄平", "仄平平中仄", "中仄中中平"]
    assert (report.rhyme_chars, report.rhyme_group) == (["深", "心", "金", "簪"], "下平声十二侵")


def test_a_rhyming_first_line_is_a_rhyme():
    report = check_meter(CHUSAI)
    assert (report.rhyme_chars, report.rhyme_group) == (["关", "还", "山"], "上平声十五删")


def test_characters_read_both_ways_are_zhong():
    report = check_meter("看花思故乡，更忘胜事长。" * 2)  # the shape of a 五绝, only the tones matter here
    assert report.lines[0].tones[:3] == "中平中" and report.lines[1].tones[:3] == "中中中"


@pytest.mark.parametrize("poem, old, new, fault", [
    # 人 (真) for 心 (侵): the classic 前鼻音/闭口 confusion.
    (CHUNWANG, "惊心", "惊人", ("出韵", 4, 5)),
    (GUANQUELOU, "层楼", "层山", ("出韵", 4, 5)),
    (CHUNWANG, "城春", "城外", ("失对", 2, 2)),
    (GUANQUELOU, "黄河", "黄水", ("失对", 2, 2)),
    (CHUSAI, "长征", "长戍", ("失对", 2, 4)),
    (CHUNWANG, "感时", "感事", ("失粘", 3, 2)),
    (CHUNWANG, "白头", "白日", ("失粘", 7, 2)),
    (DENGGAO, "万里悲秋", "万千悲秋", ("失粘", 5, 2)),
    (CHUNWANG, "鸟惊心", "花惊心", ("三平尾", 4, 3)),
    (CHUNWANG, "家书", "寄书", ("孤平", 6, 1)),
    (DENGGAO, "不尽长江", "不尽大江", ("孤平", 4, 3)),
    (CHUNWANG, "胜簪", "胜心", ("重韵", 8, 5)),
    # 拗 left unanswered: 烽火连日月 (平仄平仄仄) before 家书抵万金 (3rd 仄), 烟 (平) of the answer made 仄.
    (CHUNWANG, "连三月", "连日月", ("失对", 5, 4)),
    (JIANGNANCHUN, "烟雨", "雾雨", ("失对", 3, 6)),
])
def test_a_planted_fault_is_found_alone_at_its_place(poem, old, new, fault):
    assert faults(altered(poem, old, new)) == [fault]


def test_an_answered_ao_is_accepted():
    # 烽火连日月 (仄仄平平仄 with the 4th 仄) answered by 家书千万金 (平平平仄平): 对句救.
    poem = altered(altered(CHUNWANG, "连三月", "连日月"), "家书抵", "家书千")
    assert faults(poem) == []


def test_the_fault_message_is_chinese_then_english():
    fault = check_meter(altered(CHUNWANG, "惊心", "惊人")).faults[0].to_dict()
    assert set(fault) == {"kind", "line", "position", "message"}
    zh, en = fault["message"].split(" / ")
    assert "人" in zh and "下平声十二侵" in zh and en.startswith("rhyme 人")


@pytest.mark.parametrize("poem, group", [(JINGYESI, "下平声七阳"), (JIANGXUE, "入声九屑")])
def test_a_guti_poem_is_named_so_without_a_list_of_faults(poem, group):
    report = check_meter(poem)
    assert (report.style, report.faults, report.rhyme_group) == ("guti", [], group)
    assert "古体" in format_report(report) and "合律" not in format_report(report)


@pytest.mark.parametrize("text", [
    "國破山河在，城春草木深。感時花濺淚，恨別鳥驚心。烽火連三月，家書抵萬金。白頭搔更短，渾欲不勝簪。",
    "国破山河在 城春草木深\n感时花溅泪\n恨别鸟惊心\n烽火连三月，家书抵万金\n白头搔更短 浑欲不胜簪",
    CHUNWANG.replace("，", "").replace("。", ""),
    CHUNWANG.replace("，", ""),
])
def test_traditional_unpunctuated_and_spaced_text_reads_the_same(text):
    report, plain = check_meter(text), check_meter(CHUNWANG)
    assert [line.tones for line in report.lines] == [line.tones for line in plain.lines]
    assert (report.form, report.rhyme_group, report.faults) == (plain.form, plain.rhyme_group, [])


def test_traditional_rhymes_are_named_simplified_and_lines_kept_as_written():
    report = check_meter("風急天高猿嘯哀，渚清沙白鳥飛回。無邊落木蕭蕭下，不盡長江滾滾來。"
                         "萬里悲秋常作客，百年多病獨登臺。艱難苦恨繁霜鬢，潦倒新停濁酒杯。")
    assert report.lines[0].text == "風急天高猿嘯哀" and report.faults == []
    assert report.rhyme_chars == ["哀", "回", "来", "台", "杯"]
    # 來 and 来 are one rhyme character.
    assert [f.kind for f in check_meter(CHUSAI.replace("山", "還")).faults] == ["重韵"]


@pytest.mark.parametrize("text, code", [
    ("", "bad_poem"), ("春夏秋冬", "bad_poem"), ("白日依山尽，黄河入海流。", "bad_poem"),
    ("白日依山尽，黄河入海流。欲穷千里目，更上一层楼楼。", "bad_poem"),
    ("《登鹳雀楼》" + GUANQUELOU, "bad_character"), ("moon " * 4, "bad_character"), ("白日依山尽🌙", "bad_character"),
    ("\ud800", "bad_character"), ("春" * 1000, "bad_poem"), (5, "bad_type"), (None, "bad_type"),
])
def test_what_is_not_a_jueju_or_lushi_is_a_request_error(text, code):
    with pytest.raises(RequestError) as e:
        check_meter(text)
    assert (e.value.code, e.value.field) == (code, "poem") and e.value.message


def test_tones_agree_with_the_generators_tables():
    from engine.poem.rhymes import LEVEL, OBLIQUE, char_info

    for ch in set(CHUNWANG + GUANQUELOU + CHUSAI + SHANXING + DENGGAO + JIANGNANCHUN + YILIBAI + JINGYESI) - set("，。"):
        info = char_info(ch)
        want = {LEVEL: "平", OBLIQUE: "仄", LEVEL | OBLIQUE: "中"}[info.tones]
        assert check_meter(GUANQUELOU.replace("白", ch, 1)).lines[0].tones[0] == want, ch


def test_the_report_marks_every_character_then_the_verdict_chinese_first():
    text = format_report(check_meter(GUANQUELOU))
    rows = text.splitlines()
    assert rows[:8] == ["白日依山尽", "●●○○●", "黄河入海流", "○○●●○", "欲穷千里目", "●○○●●", "更上一层楼", "◐●●○○"]
    assert "五绝" in text and "下平声十一尤" in text and text.index("合律") < text.index("Follows the rules")
    faulted = format_report(check_meter(altered(GUANQUELOU, "层楼", "层山")))
    assert "出韵" in faulted and faulted.index("不在") < faulted.index("not 下平声十一尤")


def test_meter_and_the_bots_commands_load_no_torch():
    code = ("import sys; import bot.commands; from engine.poem.meter import check_meter; "
            f"check_meter({CHUNWANG!r}); print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# -- POST /v1/check ----------------------------------------------------------------------------------------------
class NoEngine:
    """The route needs no model: an engine that only starts and stops."""

    ready = False

    async def start(self):
        pass

    async def close(self, drain_timeout=None):
        pass


@pytest.fixture
async def service(aiohttp_client):
    return await aiohttp_client(create_app(ServiceSettings(), engine=NoEngine()))


async def test_check_route_returns_the_reading(service):
    resp = await service.post("/v1/check", json={"poem": altered(CHUNWANG, "惊心", "惊人")})
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert set(body) == {"form", "style", "lines", "rhyme", "faults"}
    assert (body["form"], body["style"]) == ("wulv", "jinti")
    assert body["lines"][0] == {"text": "国破山河在", "tones": "仄仄平平仄"}
    assert body["rhyme"] == {"chars": ["深", "人", "金", "簪"], "group": "下平声十二侵"}
    assert [(f["kind"], f["line"], f["position"]) for f in body["faults"]] == [("出韵", 4, 5)]
    guti = await (await service.post("/v1/check", json={"poem": JINGYESI})).json()
    assert (guti["style"], guti["faults"]) == ("guti", [])


@pytest.mark.parametrize("body, code, field", [
    (b"", "bad_request", None), (b"[1]", "bad_request", None), (b'"poem"', "bad_request", None),
    (b"{", "bad_json", None), (b"{}", "missing_field", "poem"), (b'{"poem": null}', "missing_field", "poem"),
    (b'{"poem": 5}', "bad_type", "poem"), (b'{"poem": "x", "form": "wujue"}', "unknown_field", "form"),
    ('{"poem": "春夏秋冬"}'.encode(), "bad_poem", "poem"), (b'{"poem": "moon"}', "bad_character", "poem"),
    ('{"poem": "白日依山尽，黄河入海流。欲穷千里目。"}'.encode(), "bad_poem", "poem"),
    (b'{"poem": "\\ud800"}', "bad_character", "poem"),
], ids=lambda v: v.decode("utf-8", "replace") if isinstance(v, bytes) else None)
async def test_check_route_bad_input_is_a_400(service, body, code, field):
    resp = await service.post("/v1/check", data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 400, await resp.text()
    error = (await resp.json())["error"]
    assert (error["code"], error["field"]) == (code, field) and error["message"]


# -- python -m engine check --------------------------------------------------------------------------------------
def test_cli_prints_the_marked_reading(capsys):
    from engine.__main__ import main

    assert main(["check", "白日依山尽，黄河入海流。", "欲穷千里目，更上一层楼。"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("白日依山尽\n●●○○●\n") and "合律" in out


def test_cli_bad_poem_is_one_error_line_and_exit_2(capsys):
    from engine.__main__ import main

    assert main(["check", "春夏秋冬"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1


# -- /check in the bot -------------------------------------------------------------------------------------------
@pytest.fixture
def commands(tmp_path, store, scripted_engine, clock) -> Commands:
    return Commands(scripted_engine, store, make_settings(tmp_path), clock=clock)


async def test_bot_check_replies_with_marks_and_verdict_without_the_engine(commands, scripted_engine):
    who = Who(chat_id=42, user_id=42)
    reply = await commands.handle(who, "/check 白日依山尽，黄河入海流。\n欲穷千里目，\n更上一层楼。")
    assert reply.text == format_report(check_meter(GUANQUELOU)) and reply.poem_id is None
    assert "○" in reply.text and "合律" in reply.text
    guti = await commands.handle(who, "/check " + JINGYESI)
    assert "古体" in guti.text and "old style" in guti.text
    assert scripted_engine.requests == []


@pytest.mark.parametrize("text", ["/check", "/check 春夏秋冬", "/check moon", "/check " + "春" * 4000])
async def test_bot_check_bad_text_gets_the_usage(commands, text):
    reply = await commands.handle(Who(chat_id=42, user_id=42), text)
    assert reply.text.startswith(CHECK_USAGE) and len(reply.text) <= 4096
