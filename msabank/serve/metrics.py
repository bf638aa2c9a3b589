"""Prometheus text exposition (format 0.0.4) for the server's counters, gauges and histograms.

A few dozen series, written from the engine thread and read by `GET /metrics`: a lock and plain dicts
are enough, so the server needs no client library.
"""

from __future__ import annotations

import math
import threading
from typing import Any

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, math.inf)

HELP = {
    "msabank_questions_total": ("counter", "Questions answered (ask and chat completions)."),
    "msabank_rounds_total": ("counter", "Interleave rounds run over all answered questions."),
    "msabank_questions_cancelled_total": ("counter", "Questions dropped before they ran: the client went away."),
    "msabank_writes_total": ("counter", "Committed writes (upserts, updates, deletes)."),
    "msabank_errors_total": ("counter", "Jobs that failed, by error type."),
    "msabank_rejected_total": ("counter", "Requests refused before any work, by reason."),
    "msabank_http_requests_total": ("counter", "HTTP requests by route and status code."),
    "msabank_queue_depth": ("gauge", "Jobs waiting for the engine loop."),
    "msabank_write_in_progress": ("gauge", "1 while the engine loop encodes or commits a write."),
    "msabank_index_rows": ("gauge", "Routing-index rows on the device."),
    "msabank_index_documents": ("gauge", "Documents in the routing index."),
    "msabank_bank_version": ("gauge", "Bank version the served snapshot is at."),
    "msabank_ready": ("gauge", "1 once the model is loaded and the index is on the device."),
    "msabank_stage_seconds": ("histogram", "Seconds per question by stage (queue, refresh, route, fetch, "
                                           "prefill, decode, total)."),
    "msabank_batch_size": ("histogram", "Questions per engine batch."),
}
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, math.inf)


def _key(labels: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, str(v)) for k, v in labels.items()))


def _fmt_labels(key: tuple[tuple[str, str], ...], extra: tuple[tuple[str, str], ...] = ()) -> str:
    items = key + extra
    if not items:
        return ""
    esc = (lambda v: v.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n"))
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in items) + "}"


def _num(v: float) -> str:
    if v == math.inf:
        return "+Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        self._hist: dict[str, dict[tuple[tuple[str, str], ...], list[float]]] = {}

    def inc(self, name: str, value: float = 1, **labels: Any) -> None:
        with self._lock:
            series = self._values.setdefault(name, {})
            k = _key(labels)
            series[k] = series.get(k, 0) + value

    def set(self, name: str, value: float, **labels: Any) -> None:
        with self._lock:
            self._values.setdefault(name, {})[_key(labels)] = value

    def get(self, name: str, **labels: Any) -> float:
        with self._lock:
            return self._values.get(name, {}).get(_key(labels), 0)

    def observe(self, name: str, value: float, **labels: Any) -> None:
        buckets = _BATCH_BUCKETS if name == "msabank_batch_size" else BUCKETS
        with self._lock:
            series = self._hist.setdefault(name, {})
            h = series.setdefault(_key(labels), [0.0] * (len(buckets) + 2))  # buckets..., sum, count
            for i, b in enumerate(buckets):
                if value <= b:
                    h[i] += 1
            h[-2] += value
            h[-1] += 1

    def render(self) -> str:
        out: list[str] = []
        with self._lock:
            for name in sorted(set(self._values) | set(self._hist) | set(HELP)):
                kind, text = HELP.get(name, ("untyped", ""))
                out.append(f"# HELP {name} {text}")
                out.append(f"# TYPE {name} {kind}")
                if name in self._hist:
                    buckets = _BATCH_BUCKETS if name == "msabank_batch_size" else BUCKETS
                    for k, h in sorted(self._hist[name].items()):
                        for i, b in enumerate(buckets):
                            out.append(f"{name}_bucket{_fmt_labels(k, (('le', _num(b)),))} {_num(h[i])}")
                        out.append(f"{name}_sum{_fmt_labels(k)} {_num(h[-2])}")
                        out.append(f"{name}_count{_fmt_labels(k)} {_num(h[-1])}")
                else:
                    series = self._values.get(name, {})
                    if not series and kind in ("counter", "gauge") and name not in (
                            "msabank_errors_total", "msabank_rejected_total", "msabank_http_requests_total"):
                        series = {(): 0}
                    for k, v in sorted(series.items()):
                        out.append(f"{name}{_fmt_labels(k)} {_num(v)}")
        return "\n".join(out) + "\n"
