"""A local chat in the terminal through the same command code as Telegram — no token needed.

    python -m bot console
    printf '/poem 月\n/beam 5\n/poem 山\n' | python -m bot console

Each input line is one message in a private chat (chat and user id CONSOLE_ID, a bot admin here, so
/status and /reload work). A daily subscription made here is stored, and never posted: no Telegram chat has
the console's id (bot.db.CONSOLE_CHAT), and `python -m bot run` leaves it out.
With `/card on` a poem's card is written as a PNG to `cards/poem-<id>.png` beside the database
(var/cards/ by default) and its path printed under the poem.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from bot.commands import Commands, Who
from bot.db import CONSOLE_CHAT, Store
from bot.engines import close_engine, make_engine, start_engine
from bot.settings import Settings

CONSOLE_ID = CONSOLE_CHAT  # the console's chat and user id in the store


async def read_lines(stream):
    """Lines of a text stream, read in a thread so the event loop (and the engine) keep running."""
    while True:
        line = await asyncio.to_thread(stream.readline)
        if not line:
            return
        yield line


async def chat(commands: Commands, lines, out=sys.stdout, prompt: str = "", card_dir: Path = Path("var/cards")) -> int:
    """Answer each line of `lines` (an async iterable of str); returns how many messages were handled. A
    reply with a card writes it to `card_dir` and prints its path."""
    who = Who(chat_id=CONSOLE_ID, user_id=CONSOLE_ID, chat_type="private")
    handled = 0
    async for line in lines:
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        reply = await commands.handle(who, line)
        if reply is not None:
            marks = "\n[👍 /👎]" if reply.poem_id is not None else ""
            if reply.photo is not None:
                marks = f"\n[🖼 {await write_card_file(card_dir, reply)}]" + marks
            out.write(reply.text + marks + "\n\n")
            out.flush()
        handled += 1
        if prompt:
            out.write(prompt)
            out.flush()
    return handled


async def write_card_file(card_dir: Path, reply) -> Path:
    """The reply's card as card_dir/poem-<id>.png, written atomically; its path."""
    from engine.files import atomic_write_bytes

    path = Path(card_dir) / f"poem-{reply.poem_id}.png"
    await asyncio.to_thread(atomic_write_bytes, path, reply.photo)
    return path


async def run_console(settings: Settings, engine=None, store=None, stdin=sys.stdin, out=sys.stdout,
                      retrain=None) -> int:
    engine = engine or make_engine(settings)
    store = store or Store.open(settings.database_path)
    commands = Commands(engine, store, settings, retrain=retrain)
    commands.admin_ids.add(CONSOLE_ID)  # whoever holds the terminal runs the bot
    interactive = stdin.isatty()
    if interactive:
        out.write("吟诗 console — /help for commands, Ctrl-D to quit.\n> ")
        out.flush()
    await start_engine(engine)
    try:
        return await chat(commands, read_lines(stdin), out, prompt="> " if interactive else "",
                          card_dir=Path(settings.database_path).parent / "cards")
    finally:
        await close_engine(engine)
        await asyncio.to_thread(store.close)  # waits for a store call in flight

