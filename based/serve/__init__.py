"""`based serve`: an OpenAI-compatible HTTP server with continuous batching over the Decoder's slots.

    text.py       tokenizers with a batch decoder, incremental detokenisation, stop strings, chat templates
    protocol.py   request bodies (pydantic) and OpenAI's error body
    scheduler.py  the engine loop: one thread owns the model and the Decoder
    metrics.py    Prometheus metrics
    app.py        the FastAPI endpoints

Importing this package needs none of the server's dependencies (fastapi, uvicorn, prometheus_client): only
app.py, scheduler.py and metrics.py do, so `from based.serve.text import default_chat_template` works without
the `serve` extra.
"""
