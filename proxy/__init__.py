"""The sluiceway gateway: ASGI app, routing, forwarding, admission, metrics, CLI."""
