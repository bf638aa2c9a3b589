"""The HTTP client the CLI uses when a server is configured (`--server URL` or `MSABANK_SERVER`).

`connect(option)` returns a `Client` or None (no server configured: the CLI works on the bank directly).
Results come back as `Obj`s: dicts (so `--json` prints them as they are) whose keys read as attributes,
with the field names of the in-process results (`Answer`, `Hit`, `DocumentRecord`, `WriteReport`,
`BankStats`), so the CLI renders both the same way. Errors are MsabankErrors naming the server.
The key, if the server needs one, comes from `MSABANK_API_KEY`.
"""

from __future__ import annotations

import os
import uuid
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

from msabank.errors import ConfigError, DocumentNotFoundError, InputError, ServerError

SERVER_ENV = "MSABANK_SERVER"
KEY_ENV = "MSABANK_API_KEY"


class Obj(dict):  # type: ignore[type-arg]
    """A JSON object whose keys also read as attributes (nested objects and lists of them too)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _obj(x: Any) -> Any:
    if isinstance(x, dict):
        return Obj({k: _obj(v) for k, v in x.items()})
    if isinstance(x, list):
        return [_obj(v) for v in x]
    return x


def server_url(option: Optional[str]) -> Optional[str]:
    url = option or os.environ.get(SERVER_ENV) or None
    return url.rstrip("/") if url else None


def connect(option: Optional[str], bank: Any = None) -> Optional[Client]:
    """A client for the configured server, or None. With `bank` (the CLI's BANK argument), a server that
    serves another bank directory of this machine is refused rather than silently used."""
    url = server_url(option)
    if not url:
        return None
    client = Client(url, os.environ.get(KEY_ENV) or None)
    if bank is not None:
        client.check_serves(bank)
    return client


def server_option() -> Any:
    """The CLI's `--server URL` option (typer)."""
    import typer

    return typer.Option(None, "--server", help=f"Use the msabank server at this URL instead of opening the bank "
                        f"(default: ${SERVER_ENV}; key: ${KEY_ENV}).", show_default=False)


class Client:
    def __init__(self, url: str, key: Optional[str] = None, *, timeout: float = 600.0) -> None:
        import httpx

        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"server URL {url!r} must start with http:// or https://",
                              hint=f"e.g. --server http://127.0.0.1:8471 (or {SERVER_ENV}=…)")
        self.url = url
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_serves(self, bank: Any) -> None:
        from pathlib import Path

        served = self._call("GET", "/v1/bank").get("bank", "")
        here = Path(bank)
        if served and (here / "engine.json").exists() and here.resolve() != Path(served).resolve():
            raise ConfigError(f"the server at {self.url} serves {served}, not {bank}",
                              hint="point --server at the server of this bank, or drop --server")

    # The Engine method names the CLI calls, so a Client stands in for an Engine there.
    @property
    def bank(self) -> Client:
        return self

    def sync(self, batches: Iterable[Sequence[tuple[str, str]]], *, batch_size: int = 32,
             progress: Optional[Callable[[int, int], None]] = None) -> Obj:
        return self.ingest(batches, batch_size=batch_size, progress=progress, sync=True)

    # ---- transport ---------------------------------------------------------------------------------

    def _call(self, method: str, path: str, *, json_body: Any = None, params: Any = None,
              headers: Optional[dict[str, str]] = None, doc_id: Optional[str] = None) -> Any:
        import httpx

        try:
            r = self._http.request(method, path, json=json_body, params=params, headers=headers)
        except httpx.HTTPError as err:
            raise ServerError(f"cannot reach the msabank server at {self.url}: {err}",
                              hint=f"is `msabank serve` running there? (unset {SERVER_ENV} or drop --server to "
                                   "work on the bank directory)") from None
        if r.status_code < 400:
            return r.json()
        try:
            e = r.json()["error"]
            message, kind, field = e.get("message", r.text), e.get("type", ""), e.get("field")
        except (ValueError, KeyError, TypeError, AttributeError):
            message, kind, field = r.text.strip() or r.reason_phrase, "", None
        if r.status_code == 404 and field == "id":
            if doc_id is not None:
                raise DocumentNotFoundError(doc_id)
            raise InputError(message, hint="list documents with `msabank ls`")
        if r.status_code in (401, 403):
            raise ServerError(f"the server at {self.url} refused: {message}",
                              hint=f"set {KEY_ENV} to a key the server accepts (a read-only key cannot write)")
        if r.status_code in (400, 413, 422):
            raise InputError(f"{message}" + (f" (field {field})" if field else ""))
        raise ServerError(f"the server at {self.url} answered {r.status_code} {kind}: {message}")

    # ---- questions -----------------------------------------------------------------------------------

    def ask(self, question: str, **options: Any) -> Obj:
        body = {"question": question, **{k: v for k, v in options.items() if v is not None}, "transcript": True}
        a = _obj(self._call("POST", "/v1/ask", json_body=body))
        for r in a.rounds:
            r["documents"] = [_hit(h) for h in r.documents]
        a["evidence"] = [_hit(h) for h in a.evidence]
        return a

    def retrieve(self, question: str) -> list[Obj]:
        out = self._call("POST", "/v1/retrieve", json_body={"question": question})
        return [_hit(h) for h in _obj(out["documents"])]

    # ---- documents -------------------------------------------------------------------------------------

    def put(self, items: Sequence[tuple[str, str]]) -> Obj:
        """One atomic upsert. Its idempotency key is new per call: a retried request commits once, a command
        run again is a new write (its unchanged documents are counted unchanged)."""
        docs = [{"id": i, "text": t} for i, t in items]
        return _obj(self._call("POST", "/v1/documents", json_body={"documents": docs},
                               headers={"Idempotency-Key": f"cli-{uuid.uuid4().hex}"}))

    def ingest(self, batches: Iterable[Sequence[tuple[str, str]]], *, batch_size: int = 32,
               progress: Optional[Callable[[int, int], None]] = None, sync: bool = False) -> Obj:
        """Upsert batch by batch (each one commit, retried safely by its idempotency key); `sync` also deletes
        the live ids absent from the batches."""
        totals = {"added": 0, "updated": 0, "unchanged": 0, "deleted": 0, "version": self.stats().version}
        seen: set[str] = set()
        docs = 0
        for batch in _rebatch(batches, batch_size):
            r = self.put(batch)
            for k in ("added", "updated", "unchanged"):
                totals[k] += r[k]
            totals["version"] = r["version"]
            seen.update(i for i, _ in batch)
            docs += len(batch)
            if progress:
                progress(docs, 0)
        if sync:
            absent = [d.id for d in self.list() if d.id not in seen]
            if absent:
                r = self.delete(absent)
                totals["deleted"], totals["version"] = r.deleted, r.version
        return Obj(totals)

    def update(self, doc_id: str, text: str) -> Obj:
        return _obj(self._call("PUT", f"/v1/documents/{_q(doc_id)}", json_body={"text": text}, doc_id=doc_id))

    def delete(self, doc_ids: Sequence[str]) -> Obj:
        ids = list(dict.fromkeys([doc_ids] if isinstance(doc_ids, str) else doc_ids))
        return _obj(self._call("POST", "/v1/documents/delete", json_body={"ids": ids},
                               doc_id=ids[0] if len(ids) == 1 else None))

    def get(self, doc_id: str) -> Obj:
        d = _obj(self._call("GET", f"/v1/documents/{_q(doc_id)}", doc_id=doc_id))
        return _record(d)

    def versions(self, doc_id: str) -> list[Obj]:
        return list(self.get(doc_id).versions)

    def list(self, limit: int = 0) -> list[Obj]:
        out = self._call("GET", "/v1/documents", params={"limit": limit})
        return [_record(_obj(d)) for d in out["documents"]]

    def stats(self) -> Obj:
        return _obj(self._call("GET", "/v1/bank")["stats"])


def _hit(h: Obj) -> Obj:
    h["layers"] = {int(k): v for k, v in h.layers.items()}  # JSON keys are strings; router layers are ints
    return h


def _record(d: Obj) -> Obj:
    """Server document JSON with the DocumentRecord field names the CLI reads as well."""
    d["user_id"], d["n_tokens"], d["num_chunks"] = d["id"], d["tokens"], d["chunks"]
    return d


def _q(doc_id: str) -> str:
    from urllib.parse import quote

    return quote(doc_id, safe="")


def _rebatch(batches: Iterable[Any], size: int) -> Iterator[list[tuple[str, str]]]:
    buf: list[tuple[str, str]] = []
    for batch in batches:
        for item in batch:
            buf.append((str(item[0]), item[1]))
            if len(buf) >= size:
                yield buf
                buf = []
    if buf:
        yield buf

