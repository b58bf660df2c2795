"""Document segments of a prompt (RAG): prompt tokens whose KV may come from the document cache, computed
once per document at canonical positions 0.. and reused at any offset in any prompt.

A reused document never attended to what precedes it in this prompt, and its first tokens carry the false
attention sink of a sequence start. `DocumentRecompute` says which of its tokens are computed again in place
(restoring cross-document attention):
- EPIC: each document's first `first_tokens` tokens;
- CacheBlend: of the rest, the `ratio` whose K/V deviate most from the cached ones at layer `select_layer`
  (every token of the assembled range runs the layers up to it, so they see their real context there).

Blocks of a prompt from its first document on hash with the assembly (spans and selection) in their extra:
a prefix hit on them is KV assembled the same way, never KV that one full prefill computed.
"""

import hashlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

from engine.errors import ParameterError

_DOCUMENT_ROOT = b"ridgeline-document-v1"


@dataclass(frozen=True)
class DocumentSpan:
    """Prompt tokens [start, start + length) are one document."""

    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class DocumentRecompute:
    """Which tokens of each reused document are computed again in its prompt (module docstring)."""

    first_tokens: int = 16
    ratio: float = 0.0
    select_layer: int = 1

    def __post_init__(self) -> None:
        if (
            isinstance(self.first_tokens, bool)
            or not isinstance(self.first_tokens, int)
            or self.first_tokens < 0
        ):
            raise ParameterError(
                "document_recompute.first_tokens", f"got {self.first_tokens!r}, allowed >= 0"
            )
        if (
            isinstance(self.ratio, bool)
            or not isinstance(self.ratio, int | float)
            or not 0 <= self.ratio <= 1
        ):
            raise ParameterError("document_recompute.ratio", f"got {self.ratio!r}, allowed 0..1")
        if (
            isinstance(self.select_layer, bool)
            or not isinstance(self.select_layer, int)
            or self.select_layer < 1
        ):
            raise ParameterError(
                "document_recompute.select_layer",
                f"got {self.select_layer!r}, allowed >= 1 (layer 0's K/V do not depend on the context)",
            )

    def check_layers(self, num_layers: int) -> None:
        if self.ratio and self.select_layer >= num_layers:
            raise ParameterError(
                "document_recompute.select_layer",
                f"got {self.select_layer}, the model has layers 0..{num_layers - 1}",
            )

    @property
    def tag(self) -> bytes:
        return f"{self.first_tokens}:{float(self.ratio)!r}:{self.select_layer if self.ratio else 0}".encode()


def check_spans(spans: Sequence[DocumentSpan], num_prompt_tokens: int) -> None:
    """ParameterError unless the spans are non-empty, in order, disjoint and inside the prompt."""
    end = 0
    for i, span in enumerate(spans):
        if span.length < 1 or span.start < end or span.end > num_prompt_tokens:
            raise ParameterError(
                "documents",
                f"document {i} covers tokens [{span.start}, {span.end}): documents must be non-empty, in "
                f"order, disjoint and inside the prompt's {num_prompt_tokens} tokens",
            )
        end = span.end


def document_key(token_ids: Sequence[int], extra: bytes) -> bytes:
    """A document's cache key: its tokens alone, with the extra of its request's block hashes (model
    fingerprint, KV format, tenant salt)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(_DOCUMENT_ROOT)
    h.update(extra)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def tier_keys(key: bytes, num_blocks: int) -> list[bytes]:
    """The keys a document's blocks have in the KV tiers below HBM: one per block, apart from every block
    hash and every document key."""
    return [
        hashlib.blake2b(key + i.to_bytes(4, "little"), digest_size=16).digest() for i in range(num_blocks)
    ]


def assembly_extra(extra: bytes, spans: Sequence[DocumentSpan], recompute: DocumentRecompute) -> bytes:
    """The block-hash extra of a prompt's blocks from its first document on."""
    h = hashlib.blake2b(digest_size=16)
    h.update(extra)
    h.update(recompute.tag)
    h.update(array("q", [x for s in spans for x in (s.start, s.length)]).tobytes())
    return h.digest()
