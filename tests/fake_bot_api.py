"""A fake Telegram Bot API server on localhost (aiohttp), for end-to-end tests of the real PTB Application.

    api = FakeBotApi()
    base = await api.start()                      # "http://127.0.0.1:PORT"; point TELEGRAM_BASE_URL at it
    api.message(42, "/poem 月")                    # queue an update, as if user 42 wrote it in a private chat
    [sent] = await api.wait_for_sent(1)           # the bot's sendMessage calls, params JSON-decoded
    [photo] = await api.wait_for_photos(1)        # its sendPhoto calls; photo["photo"]["data"] is the uploaded file
    api.fail_next("sendMessage", 429, retry_after=1)   # inject faults: 429, 5xx, 403 …
    await api.stop()

Speaks just enough of the API for the bot: getMe, getUpdates (long-poll, capped at `max_poll_wait` so
tests stay fast), deleteWebhook, setWebhook, setMyCommands, sendMessage, sendPhoto (a multipart upload, as
PTB sends bytes), editMessageReplyMarkup, answerCallbackQuery, answerInlineQuery, getChatMember. Every call
is recorded in `calls`, failed ones included; an uploaded file's parameter is {"filename", "content_type",
"data": bytes}.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time

from aiohttp import web

TOKEN = "123456789:AAFakeTokenForTestsOnly_abcdefghijkl"
BOT_USER = {"id": 123456789, "is_bot": True, "first_name": "吟诗", "username": "yinshi_test_bot",
            "can_join_groups": True, "can_read_all_group_messages": False, "supports_inline_queries": True}
# PTB sends strings as they are and everything else JSON-encoded; these parameters are always strings.
STRING_PARAMS = {"text", "callback_query_id", "inline_query_id", "parse_mode", "url", "secret_token",
                 "caption", "description", "short_description", "name", "next_offset"}
ADMIN_RIGHTS = dict.fromkeys(
    ("can_be_edited", "is_anonymous", "can_manage_chat", "can_delete_messages", "can_manage_video_chats",
     "can_restrict_members", "can_promote_members", "can_change_info", "can_invite_users", "can_post_stories",
     "can_edit_stories", "can_delete_stories"), False)


class FakeBotApi:
    def __init__(self, token: str = TOKEN, max_poll_wait: float = 0.2):
        self.token = token
        self.max_poll_wait = max_poll_wait  # getUpdates never waits longer than this
        self.updates: list[dict] = []  # not yet confirmed by an offset
        self.calls: list[tuple[str, dict]] = []  # (method, params) of every call
        self.sent: list[dict] = []  # params of every sendMessage that succeeded
        self.photos: list[dict] = []  # params of every sendPhoto that succeeded
        self.chats: dict[int, dict] = {}  # chat_id -> Chat object, learned from queued updates
        self.members: dict[tuple[int, int], str] = {}  # (chat_id, user_id) -> creator | administrator | member
        self.forbidden_chats: set[int] = set()  # sendMessage to these: 403 (the bot was removed)
        self.migrated_chats: dict[int, int] = {}  # a group upgraded to a supergroup: old id → new id
        self.faults: dict[str, list[dict]] = {}  # method -> faults for its next calls, in order
        self._update_ids = itertools.count(1)
        self.last_update_id = 0  # the newest queued update's id
        self._message_ids = itertools.count(1000)
        self._new_update = asyncio.Event()
        self._runner: web.AppRunner | None = None

    # server lifecycle

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/bot{token}/{method}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # what the tests drive

    def message(self, chat_id: int, text: str, user_id: int | None = None, chat_type: str = "private",
                sender_chat: dict | None = None, reply_to: dict | None = None) -> dict:
        """Queue a message update (a channel_post when chat_type is "channel"); `reply_to`: the message it
        answers (a record from `sent`)."""
        chat = self._chat(chat_id, chat_type)
        msg = {"message_id": next(self._message_ids), "date": int(time.time()), "chat": chat, "text": text}
        if reply_to is not None:  # as Telegram gives it: the bot's message, its text (or a photo's caption)
            body = {"text": reply_to["text"]} if "text" in reply_to else {"caption": reply_to.get("caption") or ""}
            msg["reply_to_message"] = {"message_id": reply_to["message_id"], "date": int(time.time()), "chat": chat,
                                       "from": BOT_USER, **body}
        if text.startswith("/"):
            msg["entities"] = [{"type": "bot_command", "offset": 0, "length": len(text.split()[0])}]
        if chat_type != "channel":
            uid = user_id if user_id is not None else chat_id
            msg["from"] = {"id": uid, "is_bot": False, "first_name": f"user{uid}"}
        if sender_chat is not None:
            msg["sender_chat"] = sender_chat
        return self._queue({"channel_post" if chat_type == "channel" else "message": msg})

    def migrate(self, old: int, new: int, user_id: int) -> None:
        """Telegram upgrades group `old` to supergroup `new`: a service message in each, and sends to `old`
        are refused from now on (400 with migrate_to_chat_id)."""
        self.migrated_chats[old] = new
        self._queue({"message": {"message_id": next(self._message_ids), "date": int(time.time()),
                                 "chat": {"id": old, "type": "group", "title": "group"},
                                 "from": {"id": user_id, "is_bot": False, "first_name": f"user{user_id}"},
                                 "migrate_to_chat_id": new}})
        self._queue({"message": {"message_id": next(self._message_ids), "date": int(time.time()),
                                 "chat": {"id": new, "type": "supergroup", "title": "group"},
                                 "sender_chat": {"id": new, "type": "supergroup", "title": "group"},
                                 "migrate_from_chat_id": old}})

    def callback(self, chat_id: int, user_id: int, message: dict, data: str) -> dict:
        """Queue a button tap on `message` (a record from `sent` or `photos`), as `user_id` in `chat_id`."""
        msg = {"message_id": message["message_id"], "date": int(time.time()), "chat": self._chat(chat_id, None),
               "from": BOT_USER}
        if "photo" in message:
            msg.update(photo=[_photo_size(message["message_id"])], caption=message.get("caption") or "")
        else:
            msg["text"] = message["text"]
        if "reply_markup" in message:
            msg["reply_markup"] = message["reply_markup"]
        return self._queue({"callback_query": {"id": str(next(self._message_ids)), "chat_instance": "ci",
                                               "from": {"id": user_id, "is_bot": False, "first_name": "u"},
                                               "message": msg, "data": data}})

    def inline_query(self, user_id: int, query: str) -> dict:
        return self._queue({"inline_query": {"id": str(next(self._message_ids)), "query": query, "offset": "",
                                             "from": {"id": user_id, "is_bot": False, "first_name": "u"}}})

    def set_member(self, chat_id: int, user_id: int, status: str) -> None:
        self.members[(chat_id, user_id)] = status

    def fail_next(self, method: str, status: int, description: str | None = None, retry_after: int | None = None,
                  times: int = 1) -> None:
        """Make the next `times` calls of `method` fail with this HTTP status."""
        self.faults.setdefault(method, []).extend(
            [{"status": status, "description": description, "retry_after": retry_after}] * times)

    def calls_of(self, method: str) -> list[dict]:
        return [params for name, params in self.calls if name == method]

    async def wait_for_sent(self, count: int, timeout: float = 15.0, chat_id: int | None = None) -> list[dict]:
        """Wait until at least `count` messages were sent (to `chat_id`, if given); returns them."""
        return await self.wait_for(lambda: [m for m in self.sent if chat_id is None or m["chat_id"] == chat_id],
                                   count, timeout)

    async def wait_for_photos(self, count: int, timeout: float = 15.0, chat_id: int | None = None) -> list[dict]:
        """Wait until at least `count` photos were sent (to `chat_id`, if given); returns them."""
        return await self.wait_for(lambda: [m for m in self.photos if chat_id is None or m["chat_id"] == chat_id],
                                   count, timeout)

    async def wait_for_calls(self, method: str, count: int = 1, timeout: float = 15.0) -> list[dict]:
        return await self.wait_for(lambda: self.calls_of(method), count, timeout)

    async def wait_for_confirmed(self, update_id: int | None = None, timeout: float = 15.0) -> None:
        """Wait until the bot asked for updates past `update_id` (default: the newest queued), which it does
        only after taking that update in; from then on getUpdates never hands it out again."""
        last = self.last_update_id if update_id is None else update_id
        await self.wait_for(lambda: [p for p in self.calls_of("getUpdates") if (p.get("offset") or 0) > last],
                            1, timeout)

    async def wait_for(self, select, count: int, timeout: float) -> list:
        deadline = time.monotonic() + timeout
        while len(items := select()) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {count}, have {len(items)}: {items}")
            await asyncio.sleep(0.01)
        return items

    # the API

    async def _handle(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return _error(401, "Unauthorized")
        method = request.match_info["method"]
        params = await _params(request)
        self.calls.append((method, params))
        faults = self.faults.get(method)
        if faults:
            fault = faults.pop(0)
            return _error(fault["status"], fault["description"] or _default_description(fault),
                          {"retry_after": fault["retry_after"]} if fault["retry_after"] is not None else None)
        handler = getattr(self, f"_api_{method}", None)
        if handler is None:
            return _error(404, "Not Found: method not found")
        result = await handler(params)
        if isinstance(result, web.Response):
            return result
        return web.json_response({"ok": True, "result": result})

    async def _api_getMe(self, params):
        return BOT_USER

    async def _api_deleteWebhook(self, params):
        return True

    async def _api_setWebhook(self, params):
        return True

    async def _api_setMyCommands(self, params):
        return True

    async def _api_getUpdates(self, params):
        offset = params.get("offset")
        if offset:
            self.updates = [u for u in self.updates if u["update_id"] >= offset]
        if not self.updates:
            self._new_update.clear()
            wait = min(float(params.get("timeout") or 0), self.max_poll_wait)
            try:
                await asyncio.wait_for(self._new_update.wait(), wait)
            except TimeoutError:
                pass
        return list(self.updates)

    async def _api_sendMessage(self, params):
        chat_id = params["chat_id"]
        if chat_id in self.forbidden_chats:
            return _error(403, "Forbidden: bot was kicked from the group chat")
        if chat_id in self.migrated_chats:
            return _error(400, "Bad Request: group chat was upgraded to a supergroup chat",
                          {"migrate_to_chat_id": self.migrated_chats[chat_id]})
        msg = {"message_id": next(self._message_ids), "date": int(time.time()), "from": BOT_USER,
               "chat": self.chats.get(chat_id, {"id": chat_id, "type": "private"}), "text": params["text"]}
        if "reply_markup" in params:
            msg["reply_markup"] = params["reply_markup"]
        self.sent.append({**params, "message_id": msg["message_id"]})
        return msg

    async def _api_sendPhoto(self, params):
        chat_id = params["chat_id"]
        if chat_id in self.forbidden_chats:
            return _error(403, "Forbidden: bot was kicked from the group chat")
        photo = params.get("photo")
        if not isinstance(photo, dict) or not photo.get("data"):
            return _error(400, "Bad Request: there is no photo in the request")
        msg = {"message_id": next(self._message_ids), "date": int(time.time()), "from": BOT_USER,
               "chat": self.chats.get(chat_id, {"id": chat_id, "type": "private"})}
        msg.update(photo=[_photo_size(msg["message_id"])], caption=params.get("caption") or "")
        if "reply_markup" in params:
            msg["reply_markup"] = params["reply_markup"]
        self.photos.append({**params, "message_id": msg["message_id"]})
        return msg

    async def _api_editMessageReplyMarkup(self, params):
        return {"message_id": params["message_id"], "date": int(time.time()), "from": BOT_USER,
                "chat": self.chats.get(params["chat_id"], {"id": params["chat_id"], "type": "private"}),
                "text": "…", "reply_markup": params.get("reply_markup")}

    async def _api_answerCallbackQuery(self, params):
        return True

    async def _api_answerInlineQuery(self, params):
        return True

    async def _api_getChatMember(self, params):
        user = {"id": params["user_id"], "is_bot": False, "first_name": "u"}
        status = self.members.get((params["chat_id"], params["user_id"]), "member")
        if status == "administrator":
            return {"status": status, "user": user, **ADMIN_RIGHTS}
        if status == "creator":
            return {"status": status, "user": user, "is_anonymous": False}
        return {"status": "member", "user": user}

    # helpers

    def _chat(self, chat_id: int, chat_type: str | None) -> dict:
        if chat_type is None:
            return self.chats.get(chat_id, {"id": chat_id, "type": "private"})
        chat = {"id": chat_id, "type": chat_type}
        chat.update({"first_name": "u"} if chat_type == "private" else {"title": f"chat {chat_id}"})
        self.chats[chat_id] = chat
        return chat

    def _queue(self, body: dict) -> dict:
        update = {"update_id": next(self._update_ids), **body}
        self.last_update_id = update["update_id"]
        self.updates.append(update)
        self._new_update.set()
        return update


def _photo_size(message_id: int) -> dict:
    return {"file_id": f"photo-{message_id}", "file_unique_id": f"u{message_id}", "width": 800, "height": 600}


async def _params(request: web.Request) -> dict:
    if request.content_type == "application/json":
        return await request.json()
    raw = dict(await request.post()) if request.body_exists else {}  # urlencoded, or multipart with files
    raw.update(request.query)
    params = {}
    for key, value in raw.items():
        if isinstance(value, web.FileField):
            params[key] = {"filename": value.filename, "content_type": value.content_type, "data": value.file.read()}
            continue
        if key in STRING_PARAMS or not isinstance(value, str):
            params[key] = value
            continue
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value  # "@channelname" and other plain strings
    return params


def _error(status: int, description: str, parameters: dict | None = None) -> web.Response:
    body = {"ok": False, "error_code": status, "description": description}
    if parameters:
        body["parameters"] = parameters
    return web.json_response(body, status=status)


def _default_description(fault: dict) -> str:
    if fault["status"] == 429:
        return f"Too Many Requests: retry after {fault['retry_after']}"
    if fault["status"] == 403:
        return "Forbidden: bot was blocked by the user"
    if fault["status"] >= 500:
        return "Internal Server Error"
    return "Bad Request"
