"""The bot's command line.

    python -m bot run        # Telegram (needs TELEGRAM_BOT_TOKEN); polling, or a webhook when WEBHOOK_URL is set
    python -m bot console    # a local chat in the terminal, same commands; works piped:
                             #   printf '/poem 月\\n' | python -m bot console
    python -m bot card "床前明月光，疑是地上霜。举头望明月，低头思故乡。" --out card.png   # a poem card PNG

Settings come from the environment and ./.env (see bot/settings.py and docs/BOT.md).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import threading

from bot.settings import Settings, SettingsError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the Telegram bot")
    sub.add_parser("console", help="chat with the bot in this terminal")
    card = sub.add_parser("card", help="draw a poem as a card (PNG); needs no settings")
    card.add_argument("poem", help="the poem: verses split at ，。、？！；, a newline between stanzas; - reads stdin")
    card.add_argument("--out", required=True, help="the PNG to write (atomically)")
    card.add_argument("--title", help="the title column (default: the form and the first verse, e.g. '五绝 · 床前明月光')")
    card.add_argument("--model", default="", help="model name in the small print, e.g. lstm")
    card.add_argument("--version", default="", help="model version in the small print")
    parser.add_argument("--env-file", default=".env", help="read settings from this file too (default .env)")
    args = parser.parse_args(argv)
    if args.command == "card":
        return card_command(args)
    try:
        settings = Settings.from_env(env_file=args.env_file)
        if args.command == "run":
            settings.require_token()
        retrain = settings.load_retrain_hook()
    except SettingsError as e:
        print(f"python -m bot: {e}", file=sys.stderr)
        return 2

    from bot.db import Store

    if args.command == "console":
        from bot.console import run_console

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        asyncio.run(run_console(settings, retrain=retrain))
        return 0

    from telegram.error import InvalidToken

    from bot.engines import make_engine
    from bot.telegram_app import WebhookRefused, configure_logging, redact, run

    configure_logging(settings)

    def one_line(kind, error, tb=None):
        # Tracebacks may quote a URL with the token in it; whatever escapes ends as one redacted line.
        text = redact(f"{kind.__name__}: {error}", settings.secrets())
        print(f"python -m bot: stopped by an unexpected error: {text}", file=sys.stderr)

    sys.excepthook = one_line
    threading.excepthook = lambda args: one_line(args.exc_type, args.exc_value)
    try:
        run(settings, make_engine(settings), Store.open(settings.database_path), retrain=retrain)
    except SettingsError as e:
        print(f"python -m bot: {e}", file=sys.stderr)
        return 2
    except WebhookRefused as e:
        print(f"python -m bot: {redact(str(e), settings.secrets())} (Telegram delivers only to https on ports "
              f"443, 80, 88 or 8443, to a host it can reach)", file=sys.stderr)
        return 1
    except InvalidToken:
        # PTB's message quotes the whole token; ours names the two settings that cause a 401/404 on getMe.
        print(f"python -m bot: Telegram refused TELEGRAM_BOT_TOKEN (401/404 on getMe): the token was revoked or "
              f"mistyped (check it with @BotFather), or TELEGRAM_BASE_URL ({settings.telegram_base_url}) is not "
              f"a Bot API server", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 — the last word of the process: one line, no secrets
        one_line(type(e), e)
        return 1
    return 0


def card_command(args) -> int:
    """`python -m bot card`: 0 and the PNG written, or 2, a one-line reason and nothing written."""
    from bot.card import CardError, render_card, write_card

    poem = sys.stdin.read() if args.poem == "-" else args.poem
    try:
        card = render_card(poem, args.title, model=args.model, version=args.version)
    except CardError as e:
        print(f"python -m bot card: {e}", file=sys.stderr)
        return 2
    try:
        path = write_card(card, args.out)
    except OSError as e:
        print(f"python -m bot card: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    if card.missing:
        print(f"python -m bot card: no font has {''.join(card.missing)}; drawn as empty frames", file=sys.stderr)
    print(f"{path} ({card.width}×{card.height}, {card.form})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
