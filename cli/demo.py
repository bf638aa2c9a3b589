"""`msabank demo`: the whole lifecycle on the embedded default model, on a fresh seeded corpus."""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from typing import Optional

import typer

from msabank.cli._render import emit_json, err_console, out_console


def _changed_value(answer: str, rng: random.Random) -> str:
    """A different value of the same shape (years stay plausible years, 7-digit numbers stay 7 digits)."""
    if answer.isdigit():
        while True:
            new = str(int(answer) + rng.choice((-1, 1)) * rng.randint(3, 40))
            if len(new) == len(answer) and new != answer:
                return new
    raise ValueError(answer)


def demo(docs: int = typer.Option(300, "--docs", min=20, help="Documents in the demo corpus."),
         seed: Optional[int] = typer.Option(None, "--seed", help="Corpus seed (default: a fresh random one)."),
         bank: Optional[Path] = typer.Option(None, "--bank", help="Keep the demo bank here (default: a temp dir)."),
         model: Optional[str] = typer.Option(None, "--model", "-m", help="Checkpoint (default: the embedded model)."),
         device: Optional[str] = typer.Option(None, "--device", help="torch device (default: cuda if available)."),
         json_out: bool = typer.Option(False, "--json", help="Machine-readable results on stdout.")) -> None:
    """Build a demo bank from a fresh seed, ask single- and two-hop questions with the evidence, then
    update a document and show the answer change."""
    from rich.markup import escape

    from msabank.engine import Engine
    from msabank.synth import World

    seed = seed if seed is not None else random.SystemRandom().randrange(1 << 30)
    rng = random.Random(seed)
    world = World(seed=seed, num_docs=docs)
    results: dict[str, object] = {"seed": seed, "questions": []}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="msabank-demo-") as tmp:
        path = bank or Path(tmp) / "bank"
        with Engine.create(path, model, device=device) as eng:
            if model is None:
                err_console.print("[dim]The embedded model is a 7.4M-parameter demonstration model trained on a "
                                  "synthetic world: expect some wrong answers (docs/eval.md has its numbers).[/]")
            err_console.print(f"[bold]demo[/] seed {seed}: ingesting {docs} synthetic documents into {escape(str(path))} …")
            rep = eng.ingest(((d.id, d.text) for d in world.documents()), batch_size=64)
            st = eng.stats()
            err_console.print(f"  {rep.added} documents, {st.tokens} tokens, {st.live_chunks} chunks "
                              f"in {time.perf_counter() - t0:.1f}s")
            questions = (world.questions(2, seed=seed + 1, kinds=("single",))
                         + world.questions(2, seed=seed + 2, kinds=("twohop",))
                         + world.questions(1, seed=seed + 3, kinds=("needle",)))
            for q, ans in zip(questions, eng.ask_batch([q.question for q in questions])):
                ok = ans.answer.strip() == q.answer
                results["questions"].append({"question": q.question, "expected": q.answer, "answer": ans.answer,
                                             "correct": ok, "hops": q.hops, "gold": [world.document(g).id for g in q.gold],
                                             "evidence": [h.id for h in ans.evidence], "batch_seconds": ans.timings["total"]})
                if not json_out:
                    _show(q.question, q.answer, ans, ok, gold=_gold_ids(world, q))
            # Update: change the fact a question asks about and ask again in the same long-lived engine. The
            # question is one whose routing reaches the document, so the change can show in the answer.
            upd = _update_question(eng, world, seed)
            if upd is not None:
                doc = world.document(upd.gold[0])
                new_value = _changed_value(upd.answer, rng)
                before = eng.ask(upd.question)
                t_upd = time.perf_counter()
                eng.update(doc.id, doc.text.replace(upd.answer, new_value))
                after = eng.ask(upd.question)
                seen_s = time.perf_counter() - t_upd
                results["update"] = {"document": doc.id, "question": upd.question, "old": upd.answer,
                                     "new": new_value, "answer_before": before.answer, "answer_after": after.answer,
                                     "changed": after.answer.strip() == new_value, "update_to_answer_s": seen_s}
                if not json_out:
                    out_console.print(f"\n[bold]update[/] {doc.id}: {upd.answer} → {new_value}")
                    gold = _gold_ids(world, upd)
                    _show(upd.question, upd.answer, before, before.answer.strip() == upd.answer, label="before", gold=gold)
                    _show(upd.question, new_value, after, after.answer.strip() == new_value, label="after", gold=gold)
    results["seconds"] = time.perf_counter() - t0
    qs = results["questions"]
    correct = sum(q["correct"] for q in qs)  # type: ignore[index, union-attr]
    if json_out:
        emit_json(results)
    else:
        out_console.print(f"\n{correct}/{len(qs)} answered correctly; demo took {results['seconds']:.1f}s")  # type: ignore[arg-type]


def _gold_ids(world, q) -> frozenset[str]:  # noqa: ANN001
    return frozenset(world.document(g).id for g in q.gold)


def _update_question(eng, world, seed: int, tries: int = 12):  # noqa: ANN001, ANN202
    """A single-hop or needle question with a numeric answer whose first-round routing selects its document
    (checked with `retrieve`, one prefill each); the first numeric one when none of `tries` is routed."""
    numeric = [q for q in world.questions(40, seed=seed + 4, kinds=("single", "needle")) if q.answer.isdigit()]
    for q in numeric[:tries]:
        if world.document(q.gold[0]).id in {h.id for h in eng.retrieve(q.question)}:
            return q
    return numeric[0] if numeric else None


def _show(question: str, expected: str, ans, ok: bool, label: str = "", gold: frozenset[str] = frozenset()) -> None:  # noqa: ANN001
    mark = "[green]✓[/]" if ok else "[red]✗[/]"
    out_console.print(f"\n[bold]Q{(' ' + label) if label else ''}:[/] {question}")
    from rich.markup import escape

    said = escape(ans.answer) if ans.outcome == "answer" else f"(no answer: {escape(ans.no_answer_reason or '')})"
    out_console.print(f"  {mark} answer: [bold]{said}[/]   expected: {escape(expected)}")
    from msabank.cli.ask import round_lines

    for line in round_lines(ans, max_docs=3, scores=False, gold=gold):
        out_console.print(line, markup=False)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
