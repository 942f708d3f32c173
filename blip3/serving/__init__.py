"""Serving: an OpenAI-compatible HTTP API with batched generation, a chat page, and a terminal chat.

    blip3 serve CHECKPOINT      app.py (routes) ─► prompts.py (messages ─► inputs) ─► engine.py (batches)
                                                   media.py (image URLs, fetched and decoded safely)
    blip3 chat CHECKPOINT       chat.py, the same prompts and engine in one process

`create_app(model, processor, ServeSettings(...))` gives the FastAPI app; `BackgroundServer` runs one
on a loopback port in a thread.
"""

from blip3.serving.app import ServeSettings, create_app
from blip3.serving.background import BackgroundServer
from blip3.serving.media import MediaError, MediaLoader, MediaPolicy

__all__ = ["BackgroundServer", "MediaError", "MediaLoader", "MediaPolicy", "ServeSettings", "create_app"]
