"""Train the default model's tokenizer.json on the synthetic corpus.

Byte-level BPE (any text round-trips), digits split one per token (numbers are copied digit by digit),
the special tokens of the MSA protocol, and "user" / "\\n" as single tokens so that `<|im_start|>user\\n`
is the 3-token template head the protocol assumes (MSA_SPEC §2.2).
"""

from __future__ import annotations

from typing import Iterable, Iterator

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>")
_PROTOCOL_TEXT = (
    "user\n", "assistant\n",
    "\nPlease answer the question based on the above historical document information\n\n",
    "\nPlease return all documents related to the question\n",
    "<End-of-Retrieve>", "The user's question is: ", "The answer to the question is: ",
)


def _corpus_text(num_docs: int, seed: int) -> Iterator[str]:
    from msabank.synth import World

    world = World(seed=seed, num_docs=num_docs)
    for doc in world.documents():
        yield f"[{doc.number}]. {doc.text}[{doc.number}]"
    for q in world.questions(num_docs // 4):
        yield q.question + " " + q.answer
    for _ in range(200):
        yield from _PROTOCOL_TEXT


def train_tokenizer(vocab_size: int = 4096, *, num_docs: int = 20_000, seed: int = 7,
                    texts: Iterable[str] | None = None):  # -> tokenizers.Tokenizer
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\d"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(texts if texts is not None else _corpus_text(num_docs, seed), trainer=trainer)
    check_tokenizer(tok)
    return tok


def check_tokenizer(tok) -> None:
    """The invariants the MSA protocol needs (raises AssertionError otherwise)."""
    for s in SPECIAL_TOKENS:
        assert tok.token_to_id(s) is not None, s
    head = tok.encode("<|im_start|>user\n", add_special_tokens=False).ids
    assert len(head) == 3, f"template head must be 3 tokens, got {head}"
    ids = tok.encode("1234567", add_special_tokens=False).ids
    assert len(ids) == 7, "digits must be single tokens"
    for text in ("héllo wörld ✓ 日本", "[12]. a\tb\n\n  c"):
        assert tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text
