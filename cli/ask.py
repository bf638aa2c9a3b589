"""Query commands: ask (route, fetch, generate, interleave) and retrieve (ranked documents only)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from msabank.cli._render import emit_json, err_console, out_console
from msabank.cli.bank import BankArg, DeviceOpt, JsonOpt, ModelOpt, ServerOpt, _open

NO_ANSWER_EXIT = 3
"""Exit status of `ask` when the loop ends without an answer (1 is an error, 2 a usage error)."""


def round_lines(ans, *, max_docs: int = 6, scores: bool = True, gold: frozenset[str] = frozenset()) -> list[str]:  # noqa: ANN001
    """One line per interleave round: documents routed to, numbers the model named, documents appended.
    Documents in `gold` (the demo knows which documents answer its questions) are marked with a star."""
    lines = []
    for r in ans.rounds:
        docs = ", ".join(f"{h.id}[{h.number}]" + ("★" if h.id in gold else "")
                         + (f" {h.score:.3f}/{len(h.layers)}L" if scores else "")
                         for h in r.documents[:max_docs])
        more = f" +{len(r.documents) - max_docs}" if len(r.documents) > max_docs else ""
        line = f"  round {r.index}: routed {docs or 'nothing (empty bank)'}{more}"
        if r.requested:
            line += f" → model named {', '.join(f'[{n}]' for n in r.requested)}"
        if r.injected:
            line += f" → appended {', '.join(r.injected)}"
        lines.append(line)
    return lines


def render_answer(ans, *, show_transcript: bool = False) -> None:  # noqa: ANN001
    """Answer on stdout; rounds, evidence and timings after it."""
    from rich.text import Text

    # The answer is generated text: a Text, so brackets in it are printed, never parsed as rich markup.
    if ans.outcome == "answer":
        out_console.print(Text(ans.answer, style="bold"))
    else:  # never print a limit's or an empty bank's generation as if it were an answer
        err_console.print(Text(f"no answer: {ans.no_answer_reason}"))
    for line in round_lines(ans):
        out_console.print(line, markup=False)
    t = ans.timings
    stages = ', '.join(f'{k} {t[k] * 1000:.0f}' for k in ('refresh', 'route', 'fetch', 'prefill', 'decode'))
    out_console.print(f"  finish: {ans.finish}; {t['total'] * 1000:.0f} ms ({stages} ms)",
                      markup=False)
    if show_transcript:
        out_console.print(ans.transcript, markup=False)


def ask(bank: Path = BankArg, question: str = typer.Argument(..., help="The question."),
        max_rounds: int = typer.Option(4, "--max-rounds", min=0, help="Interleave retrieval rounds at most."),
        max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1, help="Tokens generated per round at most."),
        temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy."),
        top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0),
        seed: Optional[int] = typer.Option(None, "--seed"),
        transcript: bool = typer.Option(False, "--transcript", help="Also print the whole transcript."),
        model: Optional[str] = ModelOpt, device: Optional[str] = DeviceOpt, json_out: bool = JsonOpt,
        server: Optional[str] = ServerOpt) -> None:
    """Ask a question: route, fetch, generate, with interleaved multi-hop rounds and the evidence shown."""
    with _open(bank, model, device, readonly=True, server=server) as eng:
        ans = eng.ask(question, max_rounds=max_rounds, max_new_tokens=max_new_tokens, temperature=temperature,
                      top_p=top_p, seed=seed)
    warn_damaged(bank, getattr(ans, "damaged", None) or [])
    if json_out:
        emit_json(ans)
    else:
        render_answer(ans, show_transcript=transcript)
    if ans.outcome != "answer":
        raise typer.Exit(NO_ANSWER_EXIT)


def retrieve(bank: Path = BankArg, question: str = typer.Argument(..., help="The question."),
             model: Optional[str] = ModelOpt, device: Optional[str] = DeviceOpt, json_out: bool = JsonOpt,
             server: Optional[str] = ServerOpt) -> None:
    """Rank the documents the router layers select for a question (no generation)."""
    with _open(bank, model, device, readonly=True, server=server) as eng:
        hits = eng.retrieve(question)
        damaged = [eng.damaged[n] for n in sorted(eng.damaged)] if isinstance(getattr(eng, "damaged", None), dict) else []
    warn_damaged(bank, damaged)
    if json_out:
        emit_json(hits)
        return
    for h in hits:
        out_console.print(f"{h.score:8.4f}  {h.id} [{h.number}]  layers {sorted(h.layers)}", markup=False)
    if not hits:
        err_console.print("no documents in the bank")


def warn_damaged(bank: Path, damaged: list[str]) -> None:
    """Damaged documents the engine left out: one `warning:` line each on stderr, then how to repair."""
    import sys

    for d in damaged:
        sys.stderr.write(f"warning: skipped damaged {d}\n")
    if damaged:
        sys.stderr.write(f"warning: {len(damaged)} damaged document(s) left out of this answer; repair with "
                         f"`msabank verify {bank} --repair CORPUS`\n")


def register(app: typer.Typer) -> None:
    app.command("ask")(ask)
    app.command("retrieve")(retrieve)
