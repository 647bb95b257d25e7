"""Llama 3's tokenizer: byte-level BPE run by tiktoken from Meta's ``tokenizer.model``.

``tokenizer.model`` is tiktoken's plain format, one ``<base64 bytes> <rank>`` per line
(128000 tokens for Llama 3). Above them sit 256 special tokens. Nothing is downloaded:
point ``Tokenizer`` at the file from Meta's download, or, if the optional ``llama-models``
package is installed, ``Tokenizer.from_llama_models()`` finds the copy it ships.

tiktoken is an optional dependency (``pip install tiktoken``), imported when a Tokenizer
is made.
"""
from __future__ import annotations

import base64
import importlib.util
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import AbstractSet, Literal

# Llama 3's pre-tokenisation regex (as in Meta's tokenizer): contractions, words with an
# optional leading non-letter, numbers of up to 3 digits, punctuation runs, newlines, spaces.
PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

NUM_SPECIAL_TOKENS = 256
# The named special tokens of Llama 3.1 / 3.2, in id order from len(ranks) (128000); the
# rest of the 256 are <|reserved_special_token_N|>. (Llama 3.0 named fewer of them; the ids
# of begin/end_of_text, the header tokens and eot_id are the same.)
_NAMED_SPECIAL = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message (a tool call follows)
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
]


def special_token_names() -> list[str]:
    n_named_reserved = sum("reserved" in t for t in _NAMED_SPECIAL)
    extra = NUM_SPECIAL_TOKENS - len(_NAMED_SPECIAL)
    return _NAMED_SPECIAL + [f"<|reserved_special_token_{n_named_reserved + i}|>" for i in range(extra)]


# tiktoken's Rust regex engine can overflow its stack on very long runs of whitespace or of
# non-whitespace, so text is cut into pieces: no run longer than this, no piece longer than
# MAX_ENCODE_CHARS. The cuts only fall inside such runs, which are rare in real text.
MAX_RUN_CHARS = 25_000
MAX_ENCODE_CHARS = 400_000


def load_bpe_ranks(path: str | Path) -> dict[bytes, int]:
    """Read a tiktoken ``.model`` / ``.tiktoken`` file: ``<base64 token> <rank>`` per line."""
    ranks = {}
    for n, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:
            raise ValueError(f"{path}:{n}: expected '<base64 token> <rank>', got {line[:80]!r}") from e
    return ranks


def find_llama_models_tokenizer() -> Path | None:
    """Meta's Llama 3 ``tokenizer.model`` inside the installed ``llama-models`` package, if
    any, found without importing it. Only files under a ``llama3*`` folder count: the
    package also ships Llama 4's, a different tokenizer."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = [
        f for root in spec.submodule_search_locations for f in Path(root).rglob("tokenizer.model")
        if any(part.startswith("llama3") for part in f.relative_to(root).parts)
    ]
    return min(found, key=lambda f: (len(f.parts), str(f))) if found else None


def _split_long_runs(text: str, max_run: int = MAX_RUN_CHARS) -> Iterator[str]:
    if len(text) <= max_run:
        yield text
        return
    start = run = 0
    for i in range(1, len(text)):
        if text[i].isspace() == text[i - 1].isspace():
            run += 1
            if run >= max_run:
                yield text[start:i]
                start, run = i, 0
        else:
            run = 0
    yield text[start:]


class Tokenizer:
    """encode/decode for Llama 3. ``bos_id``, ``eos_id`` (<|end_of_text|>), ``eot_id``,
    ``eom_id``, ``pad_id``, ``stop_tokens`` (end_of_text, eom, eot), ``n_words``."""

    def __init__(self, model_path: str | Path):
        try:
            import tiktoken
        except ImportError as e:
            raise ImportError("llama_fast.tokenizer needs tiktoken: pip install tiktoken") from e
        model_path = Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {model_path}")
        ranks = load_bpe_ranks(model_path)
        self.special_tokens = {name: len(ranks) + i for i, name in enumerate(special_token_names())}
        self.model = tiktoken.Encoding(
            name=model_path.name, pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        self.n_words = len(ranks) + len(self.special_tokens)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]
        self.eom_id = self.special_tokens["<|eom_id|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]
        self.stop_tokens = [self.eos_id, self.eom_id, self.eot_id]

    @classmethod
    def from_llama_models(cls) -> Tokenizer:
        path = find_llama_models_tokenizer()
        if path is None:
            raise FileNotFoundError(
                "no Llama 3 tokenizer.model found: install the `llama-models` package, or pass the path "
                "of the tokenizer.model from Meta's download to Tokenizer(path)"
            )
        return cls(path)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False,
               allowed_special: Literal["all"] | AbstractSet[str] = frozenset(),
               disallowed_special: Literal["all"] | Collection[str] = ()) -> list[int]:
        """Token ids of ``text``. By default text that looks like a special token is
        encoded as plain text; ``allowed_special="all"`` turns it into the special id."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = [self.bos_id] if bos else []
        for i in range(0, len(text), MAX_ENCODE_CHARS):
            for piece in _split_long_runs(text[i : i + MAX_ENCODE_CHARS]):
                ids += self.model.encode(piece, allowed_special=allowed_special, disallowed_special=disallowed_special)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.model.decode(list(ids))
