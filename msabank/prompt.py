"""Token layout of MSA prompts and memory documents (spec §2, §6.4), over a local tokenizer.json.

Scope: turn document text, questions and interleave transcripts into token ids and routing masks exactly
as the official engine lays them out. User text (documents, questions) is tokenized WITHOUT special-token
parsing, so a document containing "<|im_end|>" becomes ordinary tokens and cannot inject control tokens;
only msabank's own boilerplate is parsed with special tokens. No model, no tensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer as _HFTokenizer

from msabank.errors import CheckpointError

# Bump when any string below (or how it is tokenized) changes: it is part of the model fingerprint.
PROMPT_TEMPLATE_VERSION = "msa-official-30405b2/1"

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"  # pad token; also the placeholder the template is split at (spec §2.2)
OBJECT_REF_END = "<|object_ref_end|>"  # round delimiter of the interleave loop (spec §6)

PROMPT_TEMPLATE = IM_START + "user\n{prompt}" + IM_END + "\n"
RESPONSE_HEAD = IM_START
QUESTION_HEAD = "\nPlease answer the question based on the above historical document information\n\n"
QUESTION_TAIL = "\nPlease return all documents related to the question\n"
ROUTING_END_MARKER = "Please return all documents related to the question"
ROUND_BOUNDARY = "]" + OBJECT_REF_END + "["
END_OF_RETRIEVE = "<End-of-Retrieve>"
ANSWER_PREFIX = "The answer to the question is:"
RESTATEMENT = IM_START + "The user's question is: {question}\n" + OBJECT_REF_END

# Which tokens of the question block route (ModelConfig.routing_span): "official" = the whole block, as the
# official engine does; "question" = the question's own tokens only, for a model trained that way. The
# block's ~20 fixed tokens have one hidden state for every question at the first router layer, and with
# max over routing tokens they can win every score (docs/eval.md: the routing plateau).
ROUTING_SPANS = ("official", "question")


class Tokenizer:
    """A tokenizer.json wrapper with the two encodings MSA needs and the protocol's special ids."""

    def __init__(self, tokenizer: _HFTokenizer, *, json_bytes: bytes | None = None) -> None:
        self._trusted = tokenizer
        self.json_bytes = json_bytes if json_bytes is not None else tokenizer.to_str().encode("utf-8")
        # A second instance that treats special-token strings as plain text (tokenizers >= 0.15).
        self._plain = _HFTokenizer.from_str(self.json_bytes.decode("utf-8"))
        self._plain.encode_special_tokens = True
        self.im_start_id = self._special_id(IM_START)
        self.im_end_id = self._special_id(IM_END)
        self.endoftext_id = self._special_id(END_OF_TEXT)
        self.object_ref_end_id = self._special_id(OBJECT_REF_END)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        p = Path(path)
        try:
            data = p.read_bytes()
            return cls(_HFTokenizer.from_str(data.decode("utf-8")), json_bytes=data)
        except FileNotFoundError:
            raise CheckpointError(f"{p}: no tokenizer.json", hint="copy tokenizer.json into the checkpoint") from None
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise CheckpointError(f"{p}: unreadable tokenizer.json ({e})") from None

    def _special_id(self, token: str) -> int:
        tid = self._trusted.token_to_id(token)
        if tid is None:
            raise CheckpointError(f"tokenizer.json has no token {token!r}", hint="MSA needs the Qwen special tokens")
        return int(tid)

    @property
    def pad_id(self) -> int:
        return self.endoftext_id

    @property
    def vocab_size(self) -> int:
        return int(self._trusted.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        """User text: special-token strings are tokenized as ordinary text."""
        return list(self._plain.encode(text, add_special_tokens=False).ids)

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text, in one call: the Rust tokenizer spreads it over every core, without the GIL."""
        return [list(e.ids) for e in self._plain.encode_batch(list(texts), add_special_tokens=False)]

    def encode_trusted(self, text: str) -> list[int]:
        """msabank's own boilerplate: special-token strings become their special ids."""
        return list(self._trusted.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Special tokens are kept by default: the interleave protocol parses them (spec §5.5)."""
        return str(self._trusted.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        """Each id decoded on its own (byte-level pieces of a multi-byte char decode to U+FFFD)."""
        return [self.decode([i]) for i in ids]


@dataclass(frozen=True, slots=True)
class Prompt:
    """A stage-2 prompt: token ids and which of them are routing queries (doc_ids == 0 in the spec)."""

    ids: list[int]
    """Token ids, no padding."""
    routing_mask: list[bool]
    """True for tokens whose routing queries score the memory."""


@dataclass(frozen=True, slots=True)
class TemplateParts:
    """The prompt template split at the pad placeholder (spec §2.2)."""

    head: list[int]
    """`<|im_start|>user\\n`: the template prefix whose K/V are cached at positions 0..T0-1."""
    tail: list[int]
    """`<|im_end|>\\n` after the question."""
    response_head: list[int]
    """`<|im_start|>`: generation starts right after it."""


def template_parts(tok: Tokenizer) -> TemplateParts:
    ids = tok.encode_trusted(PROMPT_TEMPLATE.format(prompt=END_OF_TEXT))
    if ids.count(tok.endoftext_id) != 1:
        raise CheckpointError("tokenizer: the prompt template does not split at exactly one pad token")
    cut = ids.index(tok.endoftext_id)
    return TemplateParts(head=ids[:cut], tail=ids[cut + 1 :], response_head=tok.encode_trusted(RESPONSE_HEAD))


def document_ids(tok: Tokenizer, number: int, text: str) -> list[int]:
    """`<|im_start|>[n]. {text}[n]<|im_end|>` (spec §2.1); the bracketed text is never special-parsed."""
    return [tok.im_start_id, *tok.encode(f"[{number}]. {text}[{number}]"), tok.im_end_id]


def documents_ids(tok: Tokenizer, docs: Sequence[tuple[int, str]]) -> list[list[int]]:
    """`document_ids` of many (number, text) documents, tokenized in one batch."""
    bodies = tok.encode_many([f"[{number}]. {text}[{number}]" for number, text in docs])
    return [[tok.im_start_id, *ids, tok.im_end_id] for ids in bodies]


def question_prompt(tok: Tokenizer, question: str, *, span: str = "official") -> Prompt:
    """Round-1 prompt: question block (routes) + template tail + response head (spec §2.2).

    The block is tokenized as one string so BPE merges across the question/boilerplate seams match the
    official tokenization (e.g. "?\\n" is one Qwen token). `span` "question": only the tokens that carry
    the question's characters route (ROUTING_SPANS).
    """
    parts = template_parts(tok)
    block = tok.encode(QUESTION_HEAD + question + QUESTION_TAIL)
    rest = parts.tail + parts.response_head
    if span == "official":
        mask = [True] * len(block)
    elif span == "question":
        lo, hi = len(QUESTION_HEAD), len(QUESTION_HEAD) + len(question)
        mask, at = [], 0
        for piece in tok.token_texts(block):
            mask.append(at < hi and at + len(piece) > lo)
            at += len(piece)
    else:
        raise ValueError(f"span must be one of {ROUTING_SPANS}, got {span!r}")
    return Prompt(ids=block + rest, routing_mask=mask + [False] * len(rest))


def later_round_question_mask(tok: Tokenizer, first: Prompt) -> list[bool]:
    """The question block's routing tokens in rounds after the first (region 2 of spec §6.4): every round-1
    routing token up to and including `ROUTING_END_MARKER`, i.e. the block without its final newline (the
    official engine re-derives this from the text of the re-submitted transcript)."""
    pieces = tok.token_texts(first.ids)
    end = "".join(pieces).find(ROUTING_END_MARKER)
    if end < 0:
        return list(first.routing_mask)
    last = _char_to_token(pieces)[end + len(ROUTING_END_MARKER) - 1]
    return [m and i <= last for i, m in enumerate(first.routing_mask)]


def round_routing_mask(question_mask: Sequence[bool], length: int, latest: tuple[int, int] | None) -> list[bool]:
    """Routing tokens of a round's prompt of `length` tokens: the question block's (`question_mask`: round 1
    its own, later rounds `later_round_question_mask`) and the documents appended in the latest round
    (`latest`: their token span, without the closing `<|object_ref_end|>`; region 1 of §6.4). The interleave
    loop and the trainer both build masks here."""
    mask = list(question_mask) + [False] * (length - len(question_mask))
    if latest is not None:
        mask[latest[0] : latest[1]] = [True] * (latest[1] - latest[0])
    return mask


def _char_to_token(pieces: Sequence[str]) -> list[int]:
    owner: list[int] = []
    for i, p in enumerate(pieces):
        owner.extend([i] * len(p))
    return owner


def regenerate_prompt(tok: Tokenizer, transcript_ids: Sequence[int]) -> Prompt:
    """Layout of a re-submitted interleave transcript (spec §6.4), computed on token ids.

    Routing tokens: (region 2) every token up to and including the first `ROUTING_END_MARKER`, and
    (region 1) the tokens from the `[` after the last `]<|object_ref_end|>[` up to the next
    `<|object_ref_end|>`, i.e. the documents injected in the latest round. Everything else does not route.
    Nothing is appended: the transcript already ends where generation resumes.
    """
    ids = list(transcript_ids)
    pieces = tok.token_texts(ids)
    text = "".join(pieces)
    owner = _char_to_token(pieces)
    mask = [False] * len(ids)
    end = text.find(ROUTING_END_MARKER)
    if end >= 0:
        last = owner[end + len(ROUTING_END_MARKER) - 1]
        mask[: last + 1] = [True] * (last + 1)
    start = text.rfind(ROUND_BOUNDARY)
    if start >= 0:
        first_char = start + len(ROUND_BOUNDARY) - 1  # the "[" that opens the injected documents
        stop = text.find(OBJECT_REF_END, first_char)
        if stop > first_char:
            for i in range(owner[first_char], owner[stop]):
                mask[i] = True
    return Prompt(ids=ids, routing_mask=mask)


def injection_ids(tok: Tokenizer, docs: Sequence[tuple[int, str]]) -> list[int]:
    """What the engine appends after the model names documents: `[n]. text\\n` each, then `<|object_ref_end|>`.

    Ids are deduplicated and sorted ascending, as the official engine does (spec §6.2).
    """
    seen: dict[int, str] = {}
    for number, text in docs:
        seen.setdefault(number, text)
    body = "".join(f"[{n}]. {seen[n]}\n" for n in sorted(seen))
    return tok.encode(body) + [tok.object_ref_end_id]


def restatement_ids(tok: Tokenizer, question: str) -> list[int]:
    """Fed after `<End-of-Retrieve>`: `<|im_start|>The user's question is: {q}\\n<|object_ref_end|>`."""
    return [tok.im_start_id, *tok.encode(RESTATEMENT.format(question=question)[len(IM_START) : -len(OBJECT_REF_END)]),
            tok.object_ref_end_id]  # fmt: skip


def tokenizer_json_bytes(source: str | Path | Tokenizer | _HFTokenizer | bytes) -> bytes:
    """tokenizer.json bytes from a path, a wrapper, a `tokenizers.Tokenizer`, or raw JSON bytes/str."""
    if isinstance(source, Tokenizer):
        return source.json_bytes
    if isinstance(source, _HFTokenizer):
        return source.to_str().encode("utf-8")
    if isinstance(source, bytes):
        return source
    if isinstance(source, str) and source.lstrip().startswith("{"):
        json.loads(source)
        return source.encode("utf-8")
    p = Path(source)
    if p.is_dir():
        p = p / "tokenizer.json"
    return p.read_bytes()
