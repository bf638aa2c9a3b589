"""Seeded synthetic memory corpus: fictional people, companies and towns, plus RULER-style needles.

Everything is a pure function of (seed, index), so a corpus of any size streams out in document order
without holding a world in memory, and the same seed always gives the same bytes.

- Entity i (0 ≤ i < num_entities) has kind ``person | company | town``, a unique name, and attributes.
  Attributes that name another entity (employer, birthplace, founder, headquarters, mayor, …) point to
  other entity indices, so two-hop questions ("In which town is the employer of X headquartered?") need
  document X and then document Y, in that order.
- Every ``needle_every``-th document is a needle: filler sentences with one
  "One of the special magic numbers for {key} is: {value}." inside (RULER NIAH, single key).
- A document's **number** is its position in the corpus (0, 1, 2, …), which is what a bank assigns when the
  corpus is ingested in order into an empty bank.

Questions carry ``gold`` (document numbers, in hop order) and ``answer``. Sizes are in tokens of a
tokenizer when one is given, otherwise estimated as characters / 4.
"""

from __future__ import annotations

import hashlib
import json
import random
from functools import lru_cache
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

# --- vocabularies ------------------------------------------------------------------------------------
_SYL = ("ka", "lo", "mi", "ren", "tor", "va", "sel", "dun", "bri", "an", "el", "gor", "hal", "is", "jun",
        "kel", "mar", "nor", "os", "pel", "quin", "ros", "sta", "tel", "ul", "ver", "wyn", "yar", "zed",
        "bel", "cor", "dra", "fen", "gal", "hes", "ith", "lum", "mor", "nal", "or")
_FIRST = ("Alder", "Brina", "Corin", "Dalia", "Edric", "Faye", "Garrick", "Hesper", "Ilsa", "Joran",
          "Kaia", "Lucan", "Mirela", "Nestor", "Odile", "Perrin", "Quilla", "Rowan", "Saskia", "Tobin",
          "Una", "Varen", "Wilda", "Xander", "Yselle", "Zoran", "Anselm", "Beatrix", "Cassian", "Delphine",
          "Emeric", "Fiora")
_SUFFIX_CO = ("Works", "Industries", "Holdings", "Labs", "Foundry", "Trading", "Mills", "Systems")
_SUFFIX_TOWN = ("ford", "holm", "wick", "dale", "port", "stead", "mere", "ridge")
_COLORS = ("red", "blue", "green", "amber", "violet", "silver", "ochre", "teal", "crimson", "ivory")
_JOBS = ("baker", "pilot", "engineer", "painter", "surgeon", "librarian", "carpenter", "chemist",
         "teacher", "sailor", "architect", "farmer", "jeweler", "botanist", "clockmaker", "potter")
_PRODUCTS = ("lanterns", "bicycles", "violins", "glass beads", "steam engines", "maps", "umbrellas",
             "telescopes", "ceramic tiles", "rope", "clocks", "paper kites", "wool blankets", "ink")
_RIVERS = ("Ash", "Brim", "Cold", "Dusk", "Elm", "Fall", "Grey", "Hollow", "Iron", "Jade")
_WORDS = ("quiet", "harbor", "falcon", "marble", "copper", "meadow", "lantern", "thistle", "ember", "willow",
          "granite", "saffron", "orchid", "cobalt", "juniper", "velvet", "tundra", "beacon", "cinder", "pebble")
_FILLER = (
    "The weather that season was mild and the roads stayed open.",
    "Local records from that time are incomplete.",
    "Several letters from the period survive in a private collection.",
    "Visitors often remarked on the long evenings and the smell of bread.",
    "A small museum later collected photographs of the area.",
    "The old market square was rebuilt twice after floods.",
    "Many families kept gardens behind their houses.",
    "Trains arrived twice a day, usually late.",
    "Historians disagree about the exact dates involved.",
    "The winters were harsh and supplies came by boat.",
    "Most of the original buildings have since been replaced.",
    "Newspapers of the time gave the matter little attention.",
)

# Attribute templates: {s} subject name, {v} value. Several phrasings per attribute so the model reads.
_TPL: dict[str, tuple[str, ...]] = {
    "birth_year": ("{s} was born in {v}.", "{s}'s year of birth is {v}.", "Born in {v}, {s} grew up quickly."),
    "birthplace": ("{s} was born in the town of {v}.", "{s} comes from {v}.", "The hometown of {s} is {v}."),
    "employer": ("{s} works for {v}.", "{s} is employed by {v}.", "{v} employs {s}."),
    "job": ("{s} works as a {v}.", "By profession, {s} is a {v}.", "{s} earns a living as a {v}."),
    "color": ("{s}'s favorite color is {v}.", "{s} likes the color {v} best.", "The color {s} prefers is {v}."),
    "founder": ("{s} was founded by {v}.", "{v} founded {s}.", "The founder of {s} is {v}."),
    "hq": ("{s} is headquartered in {v}.", "The headquarters of {s} are in {v}.", "{s} has its main office in {v}."),
    "founded": ("{s} was established in {v}.", "{s} was founded in the year {v}.", "Since {v}, {s} has been in business."),
    "product": ("{s} makes {v}.", "{s} is known for its {v}.", "The main product of {s} is {v}."),
    "mayor": ("The mayor of {s} is {v}.", "{v} serves as mayor of {s}.", "{s} is governed by mayor {v}."),
    "population": ("{s} has a population of {v}.", "About {v} people live in {s}.", "The population of {s} is {v}."),
    "river": ("{s} lies on the {v} River.", "The {v} River flows through {s}.", "{s} was built beside the {v} River."),
}
_Q: dict[str, tuple[str, ...]] = {
    "birth_year": ("In which year was {s} born?", "What is the birth year of {s}?"),
    "birthplace": ("In which town was {s} born?", "Where does {s} come from?"),
    "employer": ("Which company does {s} work for?", "Who employs {s}?"),
    "job": ("What is the profession of {s}?", "What does {s} work as?"),
    "color": ("What is the favorite color of {s}?", "Which color does {s} like best?"),
    "founder": ("Who founded {s}?", "Who is the founder of {s}?"),
    "hq": ("Where is {s} headquartered?", "In which town are the headquarters of {s}?"),
    "founded": ("In which year was {s} founded?", "When was {s} established?"),
    "product": ("What does {s} make?", "What is the main product of {s}?"),
    "mayor": ("Who is the mayor of {s}?", "Who serves as mayor of {s}?"),
    "population": ("What is the population of {s}?", "How many people live in {s}?"),
    "river": ("On which river does {s} lie?", "Which river flows through {s}?"),
}
# Two-hop: (first attribute, kind it points to, second attribute) and the question phrasing.
_HOP2: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("employer", "hq", ("In which town is the company that {s} works for headquartered?",
                        "Where are the headquarters of {s}'s employer?")),
    ("employer", "founded", ("In which year was the employer of {s} founded?",)),
    ("employer", "product", ("What does the company that employs {s} make?",)),
    ("birthplace", "mayor", ("Who is the mayor of the town where {s} was born?",)),
    ("birthplace", "river", ("On which river lies the hometown of {s}?",)),
    ("hq", "mayor", ("Who is the mayor of the town where {s} is headquartered?",)),
    ("founder", "birth_year", ("In which year was the founder of {s} born?",)),
    ("mayor", "job", ("What is the profession of the mayor of {s}?",)),
)
_KIND_ATTRS = {
    "person": ("birth_year", "birthplace", "employer", "job", "color"),
    "company": ("founder", "hq", "founded", "product"),
    "town": ("mayor", "population", "river"),
}
_REF_KIND = {"birthplace": "town", "employer": "company", "founder": "person", "hq": "town", "mayor": "person"}


def _rng(seed: int, *key: object) -> random.Random:
    h = hashlib.blake2b(repr((seed, *key)).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(h, "little"))


def _randbelow(seed: int, n: int, *key: object) -> int:
    """One seeded integer in [0, n) without building a Random (the hot path: kinds of documents)."""
    h = hashlib.blake2b(repr((seed, *key)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") % n


@dataclass(frozen=True, slots=True)
class Document:
    number: int
    """Position in the corpus (= bank number when ingested in order)."""
    id: str
    """User-facing id, e.g. ``doc-000042``."""
    text: str
    kind: str
    """``person | company | town | needle``."""


@dataclass(frozen=True, slots=True)
class Question:
    question: str
    answer: str
    gold: tuple[int, ...]
    """Document numbers in hop order (one for single-hop and needle, two for two-hop)."""
    hops: int
    type: str
    """``single:<attribute> | twohop:<a>.<b> | needle``."""


@dataclass(frozen=True)
class World:
    """A seeded world of ``num_docs`` documents. Entity documents and needle documents are interleaved:
    every ``needle_every``-th number (1-based) is a needle."""

    seed: int
    num_docs: int
    needle_every: int = 10
    filler_max: int = 4
    """Up to this many filler sentences per document (spreads lengths over 1..several chunks)."""
    _kinds: tuple[str, ...] = field(default=("person", "person", "company", "town"), repr=False)

    # --- layout ---
    def is_needle(self, n: int) -> bool:
        return self.needle_every > 0 and (n + 1) % self.needle_every == 0

    @lru_cache(maxsize=1 << 16)
    def kind(self, n: int) -> str:
        if self.is_needle(n):
            return "needle"
        return self._kinds[_randbelow(self.seed, len(self._kinds), "kind", n)]

    @lru_cache(maxsize=1 << 16)
    def name(self, n: int) -> str:
        """A unique name: n is mixed-radix encoded (so no two numbers collide) after a seeded shuffle."""
        kind = self.kind(n)
        r = _rng(self.seed, "name", n)
        # unique part: an affine bijection of n over 40**width (multiplier coprime to 40), then base-40 syllables
        width = 4 if self.num_docs <= len(_SYL) ** 4 else 5
        mod = len(_SYL) ** width
        x = (n * 2_654_435_761 + _randbelow(self.seed, mod, "off")) % mod
        syl = []
        for _ in range(width):
            x, d = divmod(x, len(_SYL))
            syl.append(_SYL[d])
        core = "".join(syl).capitalize()
        if kind == "person":
            return f"{_FIRST[r.randrange(len(_FIRST))]} {core}"
        if kind == "company":
            return f"{core} {_SUFFIX_CO[r.randrange(len(_SUFFIX_CO))]}"
        if kind == "town":
            return core + _SUFFIX_TOWN[r.randrange(len(_SUFFIX_TOWN))]
        return "-".join(_WORDS[r.randrange(len(_WORDS))] for _ in range(2)) + f"-{core.lower()}"

    def _pick(self, n: int, attr: str, want: str) -> int:
        """Another document of kind `want` (deterministic; searches forward from a seeded start)."""
        r = _rng(self.seed, "ref", n, attr)
        for _ in range(64):
            m = r.randrange(self.num_docs)
            if m != n and self.kind(m) == want:
                return m
        for m in range(self.num_docs):  # tiny worlds only
            if m != n and self.kind(m) == want:
                return m
        return -1

    @lru_cache(maxsize=1 << 16)
    def attrs(self, n: int) -> dict[str, object]:
        """attribute → value (str) or referenced document number (int)."""
        kind = self.kind(n)
        r = _rng(self.seed, "attrs", n)
        out: dict[str, object] = {}
        for a in _KIND_ATTRS.get(kind, ()):
            if a in _REF_KIND:
                m = self._pick(n, a, _REF_KIND[a])
                if m >= 0:
                    out[a] = m
            elif a == "birth_year":
                out[a] = str(r.randrange(1900, 2006))
            elif a == "founded":
                out[a] = str(r.randrange(1820, 2021))
            elif a == "population":
                out[a] = str(r.randrange(1_000, 990_000))
            elif a == "job":
                out[a] = _JOBS[r.randrange(len(_JOBS))]
            elif a == "color":
                out[a] = _COLORS[r.randrange(len(_COLORS))]
            elif a == "product":
                out[a] = _PRODUCTS[r.randrange(len(_PRODUCTS))]
            elif a == "river":
                out[a] = _RIVERS[r.randrange(len(_RIVERS))]
        return out

    def value(self, n: int, attr: str) -> str:
        v = self.attrs(n)[attr]
        return self.name(v) if isinstance(v, int) else str(v)

    def needle_value(self, n: int) -> str:
        return str(_rng(self.seed, "needle", n).randrange(1_000_000, 10_000_000))

    # --- documents ---
    def document(self, n: int) -> Document:
        r = _rng(self.seed, "doc", n)
        kind = self.kind(n)
        name = self.name(n)
        if kind == "needle":
            k = r.randrange(1, self.filler_max + 3)
            sents = [_FILLER[r.randrange(len(_FILLER))] for _ in range(k)]
            sents.insert(r.randrange(k + 1), f"One of the special magic numbers for {name} is: {self.needle_value(n)}.")
        else:
            sents = []
            for a in self.attrs(n):
                tpl = _TPL[a][r.randrange(len(_TPL[a]))]
                sents.append(tpl.format(s=name, v=self.value(n, a)))
            first = sents[0]
            rest = sents[1:]
            r.shuffle(rest)
            sents = [first] + rest
            for _ in range(r.randrange(self.filler_max + 1)):
                sents.insert(r.randrange(1, len(sents) + 1), _FILLER[r.randrange(len(_FILLER))])
        return Document(number=n, id=f"doc-{n:07d}", text=" ".join(sents), kind=kind)

    def documents(self) -> Iterator[Document]:
        for n in range(self.num_docs):
            yield self.document(n)

    # --- questions ---
    def question(self, n: int, r: random.Random, *, two_hop: bool) -> Question | None:
        """A question whose (first) gold document is n, or None when n cannot start one."""
        kind = self.kind(n)
        name = self.name(n)
        if kind == "needle":
            q = r.choice(("What is the special magic number for {s}?",
                          "What is the special magic number for {s} mentioned in the provided text?"))
            return Question(q.format(s=name), self.needle_value(n), (n,), 1, "needle")
        attrs = self.attrs(n)
        if two_hop:
            options = [h for h in _HOP2 if h[0] in attrs and h[1] in self.attrs(int(attrs[h[0]]))]  # type: ignore[arg-type]
            if not options:
                return None
            a, b, qs = options[r.randrange(len(options))]
            m = int(attrs[a])  # type: ignore[arg-type]
            return Question(r.choice(qs).format(s=name), self.value(m, b), (n, m), 2, f"twohop:{a}.{b}")
        a = r.choice(list(attrs))
        return Question(r.choice(_Q[a]).format(s=name), self.value(n, a), (n,), 1, f"single:{a}")

    def questions(self, count: int, *, seed: int | None = None, kinds: Sequence[str] = ("single", "twohop", "needle")
                  ) -> list[Question]:
        """`count` questions spread evenly over `kinds` (gold documents drawn uniformly)."""
        r = _rng(self.seed if seed is None else seed, "questions")
        out: list[Question] = []
        i = 0
        guard = 0
        while len(out) < count and guard < count * 200:
            guard += 1
            want = kinds[i % len(kinds)]
            n = r.randrange(self.num_docs)
            if (want == "needle") != self.is_needle(n):
                continue
            q = self.question(n, r, two_hop=want == "twohop")
            if q is not None:
                out.append(q)
                i += 1
        return out


def token_counter(tokenizer: object | None) -> Callable[[str], int]:
    """Exact count with a tokenizer, else chars / 4.

    `tokenizer.encode(text)` may return the ids themselves (msabank.prompt.Tokenizer, what the CLI passes)
    or an encoding with `.ids` (a raw `tokenizers.Tokenizer`)."""
    if tokenizer is None:
        return lambda text: max(1, len(text) // 4)

    def count(text: str) -> int:
        enc = tokenizer.encode(text)  # type: ignore[attr-defined]
        return len(getattr(enc, "ids", enc)) + 8  # + [n] markers

    return count


def docs_for_tokens(tokens: int, mean_doc_tokens: float = 60.0) -> int:
    """Documents needed for a bank of about `tokens` tokens."""
    return max(16, int(tokens / mean_doc_tokens))


def write_corpus(out_dir: str | Path, *, seed: int, tokens: int | None = None, num_docs: int | None = None,
                 num_questions: int = 1000, fmt: str = "jsonl", tokenizer: object | None = None,
                 needle_every: int = 10) -> dict[str, object]:
    """Stream a corpus to `out_dir`/documents.{jsonl,parquet} + questions.{…} + corpus.json (summary).

    With `tokens`, the document count is set from the mean size of 256 sample documents, so the corpus lands
    near the target in one pass (references must stay inside the corpus, so it cannot stop early)."""
    out = Path(out_dir)
    count = token_counter(tokenizer)
    if num_docs is None:  # before the folder exists: a failure here leaves nothing behind
        probe = World(seed=seed, num_docs=1_000_000, needle_every=needle_every)
        mean = sum(count(probe.document(n).text) for n in range(256)) / 256
        num_docs = docs_for_tokens(tokens or 16_000, mean)
    out.mkdir(parents=True, exist_ok=True)
    world = World(seed=seed, num_docs=num_docs, needle_every=needle_every)
    total = 0
    writer = _Writer(out / f"documents.{fmt}", fmt)
    for doc in world.documents():
        writer.add(asdict(doc))
        total += count(doc.text)
    writer.close()
    qwriter = _Writer(out / f"questions.{fmt}", fmt)
    for q in world.questions(num_questions):
        d = asdict(q)
        d["gold"] = list(q.gold)
        qwriter.add(d)
    qwriter.close()
    summary: dict[str, object] = {"seed": seed, "documents": num_docs, "tokens": total, "questions": num_questions,
                                  "token_count": "exact" if tokenizer is not None else "estimate (chars/4)",
                                  "needle_every": needle_every, "format": fmt}
    (out / "corpus.json").write_text(json.dumps(summary, indent=1))
    return summary


class _Writer:
    """JSONL streams line by line; Parquet buffers 50K rows per row group."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.path, self.fmt, self.buf = path, fmt, []  # type: ignore[var-annotated]
        if fmt == "jsonl":
            self.fh = path.open("w", encoding="utf-8")
        elif fmt == "parquet":
            self.pq_writer = None
        else:
            raise ValueError(f"unknown format {fmt!r} (jsonl | parquet)")

    def add(self, row: dict[str, object]) -> None:
        if self.fmt == "jsonl":
            self.fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            return
        self.buf.append(row)
        if len(self.buf) >= 50_000:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.buf:
            return
        table = pa.Table.from_pylist(self.buf)
        if self.pq_writer is None:
            self.pq_writer = pq.ParquetWriter(self.path, table.schema)
        self.pq_writer.write_table(table)
        self.buf = []

    def close(self) -> None:
        if self.fmt == "jsonl":
            self.fh.close()
            return
        self._flush()
        if self.pq_writer is not None:
            self.pq_writer.close()


def read_jsonl(path: str | Path) -> Iterator[dict[str, object]]:
    with Path(path).open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)
