"""Output helpers shared by the command modules: data to stdout (text or --json), the rest to stderr."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

from rich.console import Console

# Diagnostics and progress go to stderr so `--json` output on stdout stays machine-readable.
err_console = Console(stderr=True, no_color=bool(os.environ.get("NO_COLOR")), highlight=False)
out_console = Console(no_color=bool(os.environ.get("NO_COLOR")), highlight=False, soft_wrap=True)


def to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return obj


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(to_jsonable(obj), indent=2, ensure_ascii=False) + "\n")


def report_line(report: Any) -> str:
    return (f"added {report.added}, updated {report.updated}, unchanged {report.unchanged}, "
            f"deleted {report.deleted} (bank version {report.version})")
