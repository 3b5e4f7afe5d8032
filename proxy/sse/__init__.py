"""Server-sent event streams: framing, what carries content, usage, and the relay's observer."""

from proxy.sse.content import CHAT, MESSAGES, RESPONSES, ContentRule, finishes
from proxy.sse.framing import Event, Framer
from proxy.sse.observer import StreamObserver
from proxy.sse.usage import has_escape, might_hold_usage, token_counts, usage_in

__all__ = ["CHAT", "MESSAGES", "RESPONSES", "ContentRule", "Event", "Framer", "StreamObserver",
           "finishes", "has_escape", "might_hold_usage", "token_counts", "usage_in"]
