"""The Telegram side: a python-telegram-bot Application whose handlers are a few lines each.

    python -m bot run            # polling; webhook when WEBHOOK_URL is set

Handlers turn an update into `commands.Who` + text, call `Commands`, and send the `Reply`; all behaviour
lives in bot.commands and bot.daily. All wiring is in `build_application`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import random
import uuid
from urllib.parse import urlparse

from telegram import (
    BotCommand,
    ChatMember,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    InlineQueryResultArticle,
    InputTextMessageContent,
    Message,
    Update,
)
from telegram.error import BadRequest, Forbidden, InvalidToken, NetworkError, RetryAfter, TelegramError
from telegram.ext import (
    AIORateLimiter,
    Application,
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
    InlineQueryHandler,
    MessageHandler,
    filters,
)

from bot.commands import (
    COMMANDS,
    NOT_ON_RECORD,
    SEED_LIMIT,
    Commands,
    PoemUnavailable,
    Reply,
    Who,
    format_reply,
    utc_now,
)
from bot.daily import Daily
from bot.db import Store
from bot.engines import close_engine, start_engine
from bot.settings import Settings
from engine.api import PoemEngine, PoemRequest
from engine.errors import RequestError

log = logging.getLogger(__name__)

# Commands arrive as messages in private chats and groups, and as channel posts in channels.
# Edited messages are left out: editing "/poem 月" should not write a second poem.
# NOTE: not a channel post's automatic copy in its linked discussion group: the channel's own post is answered.
COMMAND_UPDATES = (filters.UpdateType.MESSAGE | filters.UpdateType.CHANNEL_POST) & ~filters.IS_AUTOMATIC_FORWARD
INLINE_CANDIDATES = 3  # poems offered per inline query, one rate-limit token each
CAPTION_LIMIT = 1024  # Telegram's limit for a photo's caption


def redact(text: str, secrets: list[str]) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


class RedactSecrets(logging.Filter):
    """Replace secrets (the bot token, ENGINE_TOKEN) in every log record that passes a handler."""

    def __init__(self, secrets: list[str]):
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(s in message for s in self.secrets):
            record.msg, record.args = redact(message, self.secrets), None
        if record.exc_info and record.exc_info[1] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            if any(s in text for s in self.secrets):
                record.exc_text, record.exc_info = text, None
        # exc_text too: another filter (or handler) may already have turned the traceback into text.
        if record.exc_text and any(s in record.exc_text for s in self.secrets):
            record.exc_text = redact(record.exc_text, self.secrets)
        if record.stack_info and any(s in record.stack_info for s in self.secrets):
            record.stack_info = redact(record.stack_info, self.secrets)
        return True


class NoTracebackForMisconfiguration(logging.Filter):
    """PTB logs a rejected token, and a non-JSON answer (a wrong TELEGRAM_BASE_URL), with a traceback before
    raising; `python -m bot run` then says what to fix in one line, so the traceback only repeats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], (InvalidToken, json.JSONDecodeError)):
            record.exc_info, record.exc_text = None, None
        return True


def configure_logging(settings: Settings, level: int | None = None) -> None:
    """Log to stderr at `level` (default LOG_LEVEL), with secrets redacted and httpx quiet."""
    level = logging.getLevelName(settings.log_level) if level is None else level
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level)
    logging.getLogger().setLevel(level)  # basicConfig leaves the level alone when handlers exist
    # httpx logs every request URL at INFO, and the URL holds the bot token.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    redacting = RedactSecrets(settings.secrets())
    for handler in logging.getLogger().handlers:
        # Called again (tests, a second configuration): replace our filters rather than stack them.
        for old in [f for f in handler.filters if isinstance(f, (RedactSecrets, NoTracebackForMisconfiguration))]:
            handler.removeFilter(old)
        handler.addFilter(NoTracebackForMisconfiguration())
        handler.addFilter(redacting)


# helpers the handlers share

def poem_keyboard(poem_id: int, up: int = 0, down: int = 0, *, actions: bool = True,
                  card: bool = True) -> InlineKeyboardMarkup:
    """The buttons under a poem: 👍 👎 (with their counts), then 🔁 another and 🖼 card. `actions` False (in
    channels) leaves out 🔁 and 🖼; `card` False (the poem is a card already) leaves out 🖼."""
    rows = [[InlineKeyboardButton(f"👍 {up}" if up else "👍", callback_data=f"fb:{poem_id}:up"),
             InlineKeyboardButton(f"👎 {down}" if down else "👎", callback_data=f"fb:{poem_id}:down")]]
    if actions:
        rows.append([InlineKeyboardButton("🔁 再来一首", callback_data=f"again:{poem_id}")]
                    + ([InlineKeyboardButton("🖼 诗笺", callback_data=f"card:{poem_id}")] if card else []))
    return InlineKeyboardMarkup(rows)


def markup_for(reply: Reply) -> InlineKeyboardMarkup | None:
    if reply.poem_id is None:
        return None
    return poem_keyboard(reply.poem_id, actions=reply.actions, card=reply.photo is None)


async def send_reply(bot, chat_id: int, reply: Reply, answering: Message | None = None,
                     thread_id: int | None = None) -> Message:
    """Send a Reply: text, or its card as a photo with the text as caption (cards hold at most 400
    characters, so the caption stays within Telegram's 1024). `answering`: the message it answers, replied
    to as PTB's reply_* do (quoted in groups; still sent if that message was deleted meanwhile).
    `thread_id`: the forum topic to send to, when not answering a message."""
    markup = markup_for(reply)
    if reply.photo is None or len(reply.text) > CAPTION_LIMIT:
        if answering is not None:
            return await answering.reply_text(reply.text, reply_markup=markup, allow_sending_without_reply=True)
        return await bot.send_message(chat_id, reply.text, reply_markup=markup, message_thread_id=thread_id)
    if answering is not None:
        return await answering.reply_photo(reply.photo, caption=reply.text, reply_markup=markup, filename="poem.png",
                                           allow_sending_without_reply=True)
    return await bot.send_photo(chat_id, reply.photo, caption=reply.text, reply_markup=markup, filename="poem.png",
                                message_thread_id=thread_id)


def topic_of(message) -> int | None:
    """The forum topic a message is in (None outside forum topics: the General topic takes no thread id)."""
    return message.message_thread_id if getattr(message, "is_topic_message", False) else None


def who_sent(update: Update, context: ContextTypes.DEFAULT_TYPE) -> Who:
    chat, user, message = update.effective_chat, update.effective_user, update.effective_message

    async def is_chat_admin() -> bool:
        # An anonymous group admin posts as the group itself.
        if message is not None and message.sender_chat is not None and message.sender_chat.id == chat.id:
            return True
        if user is None:
            return False
        member = await context.bot.get_chat_member(chat.id, user.id)
        return member.status in (ChatMember.ADMINISTRATOR, ChatMember.OWNER)

    sender_chat = message.sender_chat if message is not None else None
    answered = message.reply_to_message if message is not None else None
    return Who(chat_id=chat.id, user_id=user.id if user else None, chat_type=chat.type, is_chat_admin=is_chat_admin,
               sender_chat_id=sender_chat.id if sender_chat is not None else None,
               replied=(answered.text or answered.caption) if answered is not None else None)


def commands_of(context: ContextTypes.DEFAULT_TYPE) -> Commands:
    return context.bot_data["commands"]


# handlers

async def on_message(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A command (or plain text in a private chat): run it through the shared command code, reply."""
    message = update.effective_message
    reply = await commands_of(context).handle(who_sent(update, context), message.text)
    if reply is not None:
        await send_reply(context.bot, message.chat_id, reply, answering=message)


async def on_migrate(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A group became a supergroup: Telegram says so in both (migrate_to_chat_id in the old group,
    migrate_from_chat_id in the new); either moves the chat's settings and daily poem to the new id."""
    message = update.effective_message
    if message.migrate_to_chat_id:
        old, new = message.chat_id, message.migrate_to_chat_id
    else:
        old, new = message.migrate_from_chat_id, message.chat_id
    await context.bot_data["daily"].move_chat(old, new)


async def on_tap(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A tap on a button under a poem (every callback query comes here, forged ones too): the shared code
    checks the data and the poem and rate-limits; the tap is answered, then 👍/👎 show the new counts and
    🔁/🖼 send their poem or card. A refused tap gets its answer and nothing else."""
    query = update.callback_query
    message = query.message  # None for a message sent through inline mode (no buttons of ours)
    if message is None:
        await query.answer(NOT_ON_RECORD)
        return
    chat = message.chat
    # The tapper, not the message's sender (the bot, or the channel), is who the rate limit counts.
    who = Who(chat_id=chat.id, user_id=query.from_user.id, chat_type=chat.type)
    tap = await commands_of(context).tap(who, query.data)
    await query.answer(tap.answer)
    if tap.refused:
        return
    if tap.counts is not None:
        actions = chat.type != "channel"
        keyboard = poem_keyboard(tap.poem_id, *tap.counts, actions=actions,
                                 card=actions and not getattr(message, "photo", None))
        try:
            await query.edit_message_reply_markup(keyboard)
        except BadRequest as e:  # "message is not modified" when a user repeats the same vote
            log.debug("keeping the buttons: %s", e.message)
    if tap.then is not None:
        await send_reply(context.bot, chat.id, await tap.then(), thread_id=topic_of(message))


async def on_inline_query(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """`@bot 月`: offer up to three different poems opening with 月.

    Each candidate is a poem like /poem's, so each costs one rate-limit token: a user with one token left
    gets one candidate, not three poems for the price of one. The candidates are drawn with three different
    seeds (from one random draw), so they differ by construction rather than by chance, and a candidate that
    still repeats another (a model sure of itself draws the same lines) is dropped."""
    query = update.inline_query
    prompt = "".join(query.query.split())
    commands = commands_of(context)
    try:  # Telegram sends a query per keystroke: one that can never be a poem costs no tokens
        PoemRequest(prompt=prompt).validate()
    except RequestError:
        await query.answer([], cache_time=5)
        return
    granted = 0
    while prompt and granted < INLINE_CANDIDATES and commands.rate_limiter.acquire(query.from_user.id) == 0:
        granted += 1
    if not granted:
        await query.answer([], cache_time=5)
        return
    first_seed = commands.rng.randrange(SEED_LIMIT)
    # Together: the engine batches concurrent requests, and Telegram waits only seconds for an answer.
    outcomes = await asyncio.gather(
        *(commands.generate(query.from_user.id, prompt=prompt, seed=(first_seed + i) % SEED_LIMIT)
          for i in range(granted)), return_exceptions=True)
    settings = await commands.store.aio.chat_settings(query.from_user.id)
    results, seen = [], set()
    for outcome in outcomes:
        if isinstance(outcome, PoemUnavailable):
            continue
        if isinstance(outcome, BaseException):
            raise outcome
        if tuple(outcome.lines) in seen:
            continue
        seen.add(tuple(outcome.lines))
        results.append(InlineQueryResultArticle(
            id=uuid.uuid4().hex, title=outcome.lines[0], description="".join(outcome.lines[1:2]),
            input_message_content=InputTextMessageContent(format_reply(outcome, settings))))
    await query.answer(results, cache_time=0, is_personal=True)


async def on_error(update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Log every unhandled error with its traceback and tell the user something useful."""
    log.error("error while handling an update", exc_info=context.error)
    if isinstance(context.error, Forbidden) or not isinstance(update, Update) or update.effective_chat is None:
        return
    try:
        if update.callback_query is not None:  # a tap: answer the tapper, never post into the chat (a channel)
            await update.callback_query.answer("出错了，请稍后再试。 / Something went wrong; please try again.")
            return
        await context.bot.send_message(update.effective_chat.id,
                                       "出错了，请稍后再试。\nSomething went wrong on our side; please try again.",
                                       message_thread_id=topic_of(update.effective_message))
    except TelegramError:
        pass  # the chat is unreachable; the log has the story


# wiring

def build_application(settings: Settings, engine: PoemEngine, store: Store, *, retrain=None,
                      clock=utc_now, manage_resources: bool = False, rate_limiter_retries: int = 3,
                      concurrent_updates: int | bool = 64) -> Application:
    """The Application with every handler, the rate limiter, daily jobs, and start/stop hooks.

    manage_resources: start the engine on start and close engine and store on shutdown (`python -m bot run`);
    tests pass False and own them."""

    async def post_init(app: Application) -> None:
        if manage_resources:
            await start_engine(engine)
        try:
            await app.bot.set_my_commands([BotCommand(c.name, c.en[:256]) for c in COMMANDS.values() if not c.admin])
        except TelegramError as e:
            # Only the menu of command hints: the commands work without it, and the next start sets it.
            log.warning("could not publish the command menu (setMyCommands): %s", e)
        daily = app.bot_data["daily"]
        await daily.add_all_jobs()
        # Missed posts go out in the background so a slow engine does not hold up polling. (A plain
        # asyncio task: the Application is not running yet, so its create_task would not track it.)
        app.bot_data["catch_up"] = asyncio.get_running_loop().create_task(daily.catch_up(), name="daily catch-up")

    async def post_shutdown(app: Application) -> None:
        catch_up = app.bot_data.get("catch_up")
        if catch_up is not None and not catch_up.done():
            catch_up.cancel()
            await asyncio.gather(catch_up, return_exceptions=True)
        if manage_resources:
            await close_engine(engine)
            await asyncio.to_thread(store.close)  # waits for a store call in flight

    app = (Application.builder()
           .token(settings.require_token())
           .base_url(settings.bot_api_url)
           .base_file_url(settings.bot_file_url)
           .rate_limiter(AIORateLimiter(max_retries=rate_limiter_retries))
           # Poems take a while; other chats must not wait for them.
           .concurrent_updates(concurrent_updates)
           .post_init(post_init)
           .post_shutdown(post_shutdown)
           .build())

    async def send(chat_id: int, reply: Reply) -> None:
        await send_reply(app.bot, chat_id, reply)

    commands = Commands(engine, store, settings, retrain=retrain, clock=clock)
    daily = Daily(store, commands, send, settings.timezone, dt.timedelta(minutes=settings.daily_grace_minutes),
                  job_queue=app.job_queue, clock=clock)
    commands.on_subscription_change = daily.set_job
    app.bot_data.update(commands=commands, daily=daily, store=store)

    names = [name for name in COMMANDS]
    app.add_handler(CommandHandler(names, on_message, filters=COMMAND_UPDATES))
    # Unknown commands in private chats get "see /help"; in groups they may be meant for another bot.
    app.add_handler(MessageHandler(filters.ChatType.PRIVATE & filters.UpdateType.MESSAGE & filters.TEXT, on_message))
    app.add_handler(CallbackQueryHandler(on_tap))  # every button, so that a forged one is answered too
    app.add_handler(MessageHandler(filters.StatusUpdate.MIGRATE, on_migrate))
    app.add_handler(InlineQueryHandler(on_inline_query))
    app.add_error_handler(on_error)
    return app


def run(settings: Settings, engine: PoemEngine, store: Store, retrain=None) -> None:
    """Run until Ctrl-C: polling, or a webhook server when WEBHOOK_URL is set."""
    settings.check_webhook()
    app = build_application(settings, engine, store, retrain=retrain, manage_resources=True)
    # run_polling/run_webhook run on this loop; initializing here first lets a Bot API that is down or
    # answering 5xx be waited out with logged retries (PTB's own retries log only at DEBUG).
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(with_startup_retries(app.initialize, "at start-up"))
        if settings.webhook_url:
            # NOTE: set here first, as run_webhook would: its own retries take a refusal (a port or host Telegram
            # will not deliver to) for a passing fault and try for ever, logging only at DEBUG.
            try:
                loop.run_until_complete(with_startup_retries(lambda: app.bot.set_webhook(
                    settings.webhook_url, secret_token=settings.webhook_secret, allowed_updates=Update.ALL_TYPES),
                    "setting the webhook"))
            except BadRequest as e:
                raise WebhookRefused(f"Telegram refused WEBHOOK_URL {settings.webhook_url}: {e.message}") from None
    except KeyboardInterrupt:
        return
    # -1: deleteWebhook/setWebhook are retried too (with PTB's backoff); InvalidToken still ends the run.
    if settings.webhook_url:
        app.run_webhook(listen=settings.webhook_listen, port=settings.webhook_port,
                        url_path=urlparse(settings.webhook_url).path.lstrip("/"), webhook_url=settings.webhook_url,
                        secret_token=settings.webhook_secret, allowed_updates=Update.ALL_TYPES, bootstrap_retries=-1)
    else:
        app.run_polling(allowed_updates=Update.ALL_TYPES, bootstrap_retries=-1)


class WebhookRefused(Exception):
    """Telegram refused to deliver to WEBHOOK_URL (setWebhook answered 400); the message is one line."""


async def with_startup_retries(call, what: str, first_delay: float = 1.0, max_delay: float = 60.0):
    """`await call()` (app.initialize, setWebhook), retried while Telegram is unreachable or answers 5xx/429,
    with jittered exponential backoff. A refused token (InvalidToken) or another 4xx is raised at once:
    waiting won't fix it."""
    delay = first_delay
    while True:
        try:
            return await call()
        except BadRequest:  # a 4xx, though PTB files it under NetworkError
            raise
        except RetryAfter as e:
            wait = float(e.retry_after.total_seconds() if isinstance(e.retry_after, dt.timedelta) else e.retry_after)
            log.warning("the Bot API asks to wait %.0f s %s", wait, what)
        except NetworkError as e:  # connection errors, timeouts and 5xx (PTB maps those to NetworkError)
            wait = delay * random.uniform(0.5, 1.0)
            delay = min(max_delay, delay * 2)
            log.warning("the Bot API is unreachable %s (%s); retrying in %.1f s", what, e, wait)
        await asyncio.sleep(wait)
