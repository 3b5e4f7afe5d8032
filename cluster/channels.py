"""Subscribing to Redis pub/sub channels for as long as a replica lives."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping

from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger("sluiceway.cluster")

Handler = Callable[[bytes], None]
Listening = Callable[[bool], None]


async def subscribe_forever(client: Redis, handlers: Mapping[str, Handler],
                            retry_s: float = 0.5, listening: Listening | None = None) -> None:
    """Call `handlers[channel](data)` for every message on those channels, until
    cancelled. Reconnects after a failure (a restarted Redis) every `retry_s`.
    `listening(True)` once subscribed; `listening(False)` as soon as that subscription
    ends, every message Redis sent on it handled."""
    while True:
        pubsub = client.pubsub()
        subscribed = False
        try:
            await pubsub.subscribe(*handlers)
            subscribed = True
            if listening is not None:
                listening(True)
            async for message in pubsub.listen():
                if message.get("type") != "message":
                    continue
                channel, data = message["channel"], message["data"]
                name = channel.decode() if isinstance(channel, bytes) else str(channel)
                handler = handlers.get(name)
                if handler is not None:
                    handler(data if isinstance(data, bytes) else str(data).encode())
        except (RedisError, OSError) as exc:
            log.debug("cluster: lost the subscription (%s); subscribing again", exc)
        finally:
            if subscribed and listening is not None:
                listening(False)
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()
        await asyncio.sleep(retry_s)
