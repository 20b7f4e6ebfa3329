"""Serving: a continuous depth-wise batching engine and an OpenAI-compatible HTTP server."""

from openmythos.serving.engine import Engine, Event, QueueFull, SamplingParams

__all__ = ["Engine", "Event", "QueueFull", "SamplingParams"]
