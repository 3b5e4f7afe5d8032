"""The sluiceway gateway: HTTP server and client, routing, forwarding, admission, metrics, CLI."""
