"""`msabank serve`: the HTTP server (msabank.serve; docs/serve.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from msabank.cli.bank import BankArg, DeviceOpt, ModelOpt


def serve(bank: Path = BankArg, model: Optional[str] = ModelOpt, device: Optional[str] = DeviceOpt,
          host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; any non-loopback address needs "
                                   "--api-key-file."),
          port: int = typer.Option(8471, "--port", min=0, max=65535, help="Port (0: a free one, printed)."),
          api_key_file: Optional[Path] = typer.Option(None, "--api-key-file", help="File holding the bearer key "
                                                      "that may read and write."),
          read_key_file: Optional[Path] = typer.Option(None, "--read-key-file", help="File holding a read-only "
                                                       "bearer key (writes get 403)."),
          max_body_bytes: int = typer.Option(8 << 20, "--max-body-bytes", min=1, help="Request body cap (413)."),
          max_question_tokens: int = typer.Option(2048, "--max-question-tokens", min=1),
          max_documents: int = typer.Option(256, "--max-documents", min=1, help="Documents per upsert request."),
          max_rounds: int = typer.Option(8, "--max-rounds", min=0, help="Cap on a request's max_rounds."),
          max_new_tokens: int = typer.Option(512, "--max-new-tokens", min=1, help="Cap on a request's "
                                             "max_new_tokens."),
          batch_size: int = typer.Option(16, "--batch-size", min=1, help="Questions run together at most."),
          batch_wait_ms: float = typer.Option(5.0, "--batch-wait-ms", min=0.0, help="How long the engine waits "
                                              "for more questions before it runs a batch."),
          queue_size: int = typer.Option(256, "--queue-size", min=1, help="Jobs waiting at most (then 429)."),
          min_version_wait: float = typer.Option(10.0, "--min-version-wait", min=0.0, help="Seconds a question "
                                                 "with min_version waits for that version at most (then 409)."),
          log_level: str = typer.Option("warning", "--log-level", help="uvicorn log level.")) -> None:
    """Serve a bank over HTTP: one process holds the model, the routing index and the writer lock."""
    from msabank.serve.app import Limits
    from msabank.serve.server import serve as run

    limits = Limits(max_body_bytes=max_body_bytes, max_question_tokens=max_question_tokens,
                    max_documents=max_documents, max_rounds=max_rounds, max_new_tokens=max_new_tokens,
                    min_version_wait_s=min_version_wait)
    run(bank, model=model, device=device, host=host, port=port, api_key_file=api_key_file,
        read_key_file=read_key_file, limits=limits, batch_size=batch_size, batch_wait_ms=batch_wait_ms,
        queue_size=queue_size, log_level=log_level)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
