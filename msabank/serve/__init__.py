"""`msabank serve`: one long-lived process holds the model, the routing index and the bank's writer lock;
clients ask and write over HTTP (a native API and OpenAI-compatible routes). docs/serve.md.

- `msabank.serve.loop`: the engine loop (one thread owns the engine; questions batched, writes serialised).
- `msabank.serve.app`: the FastAPI app (routes, auth, limits, errors).
- `msabank.serve.server`: start-up (bind checks, key files, the `serve.json` lock note) and uvicorn.
- `msabank.serve.client`: the HTTP client the CLI uses with `--server URL` / `MSABANK_SERVER`.
"""

from __future__ import annotations

__all__ = ["serve"]


def serve(*args, **kwargs):  # type: ignore[no-untyped-def]
    """`msabank.serve.server.serve` (imported lazily: `import msabank.serve` stays cheap)."""
    from msabank.serve.server import serve as _serve

    return _serve(*args, **kwargs)
