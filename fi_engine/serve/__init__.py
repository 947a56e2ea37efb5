"""Serving many callers (docs/engine-text.md): the streaming service over the step API, the OpenAI-compatible HTTP
server, the engine in a process of its own, API-server processes in front of it, and metrics.

- :mod:`~fi_engine.serve.service`: ``GenerationService``: one engine thread, streams of tokens and text,
  cancellation, the queue limit; :mod:`~fi_engine.serve.metrics`: counters and latency histograms.
- :mod:`~fi_engine.serve.openai_protocol`: OpenAI request bodies checked, responses built;
  :mod:`~fi_engine.serve.openai_server`: the Starlette app and ``fi-engine serve``'s uvicorn run.
- :mod:`~fi_engine.serve.engine_process`: the engine stepped in a child process;
  :mod:`~fi_engine.serve.engine_client`: a front end's connection to it; :mod:`~fi_engine.serve.shared_queue`:
  the queue limit over all front ends; :mod:`~fi_engine.serve.api_servers`: the API-server processes.
"""

__all__: list[str] = []
