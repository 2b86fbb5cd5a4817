"""Which engine the bot talks to: the HTTP service when ENGINE_URL is set, else one in this process.

    engine = make_engine(settings)
    await start_engine(engine)        # LocalEngine loads its models; the HTTP client needs nothing
    ...
    await close_engine(engine)

Both follow `engine.api.PoemEngine`; nothing else in the bot knows which one it has.
"""

from __future__ import annotations

from bot.settings import Settings
from engine.api import PoemEngine


def make_engine(settings: Settings) -> PoemEngine:
    if settings.engine_url:
        from engine.serving.client import EngineClient

        return EngineClient(settings.engine_url, token=settings.engine_token)
    from engine.serving.local import LocalEngine

    # Imported late: the HTTP client must not pay for loading torch.
    return LocalEngine.from_env(checkpoint_dir=str(settings.checkpoint_dir) if settings.checkpoint_dir else None,
                                device=settings.device)


async def start_engine(engine: PoemEngine) -> None:
    start = getattr(engine, "start", None)
    if start is not None:
        await start()


async def close_engine(engine: PoemEngine) -> None:
    close = getattr(engine, "close", None)
    if close is not None:
        await close()
