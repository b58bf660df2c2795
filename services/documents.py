"""Documents at the API (RAG): the store behind /v1/documents, and prompts built with document segments.

A document is named by content: its id is a digest of its tokens and the tenant's cache_salt, so the same
text stored by two tenants gets two ids, and a tenant cannot name another's document (an unknown id is a
400). The engine keys its document cache the same way (engine/documents.py), so a prompt that repeats a
stored document's text reuses its KV as much as one that names its id.

In a chat, each document part is rendered through the model's template as a placeholder, and the rendered
text is split there: the text around the documents is tokenized as the template wrote it and every
document's tokens go in between, so the engine sees exactly which prompt tokens each document holds.
"""

import hashlib
import re
import time
from array import array
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from engine.documents import DocumentSpan
from engine.errors import ParameterError
from services.openai_protocol import DocumentRef

MAX_DOCUMENTS = 4096  # stored through the API, per frontend
_PLACEHOLDER = "\ue000ridgeline-document-{}\ue001"  # private-use code points: never in a client's text
_PLACEHOLDER_RE = re.compile("\ue000ridgeline-document-(\\d+)\ue001")

Tokenize = Callable[[str, bool], Awaitable[list[int]]]


@dataclass
class StoredDocument:
    id: str
    token_ids: list[int]
    cache_salt: str | None
    created: int

    def describe(self) -> dict:
        return {"id": self.id, "object": "document", "created": self.created, "tokens": len(self.token_ids)}


def document_id(token_ids: list[int], cache_salt: str | None) -> str:
    h = hashlib.blake2b(digest_size=16)
    salt = (cache_salt or "").encode()
    h.update(len(salt).to_bytes(4, "little") + salt)
    h.update(array("q", token_ids).tobytes())
    return f"doc-{h.hexdigest()}"


class DocumentStore:
    """Documents stored through the API, by id, at most `max_documents` (each stays until it is deleted)."""

    def __init__(self, max_documents: int = MAX_DOCUMENTS):
        self.max_documents = max_documents
        self._docs: OrderedDict[str, StoredDocument] = OrderedDict()

    def check_room(self, token_ids: list[int], cache_salt: str | None) -> None:
        """ParameterError when a new document would pass `max_documents` (they stay until deleted: the
        engines keep them pinned)."""
        if len(self._docs) >= self.max_documents and document_id(token_ids, cache_salt) not in self._docs:
            raise ParameterError(
                "documents",
                f"{self.max_documents} documents are stored already: DELETE /v1/documents/ID some",
            )

    def add(self, token_ids: list[int], cache_salt: str | None) -> StoredDocument:
        self.check_room(token_ids, cache_salt)
        doc_id = document_id(token_ids, cache_salt)
        doc = self._docs.get(doc_id) or StoredDocument(doc_id, list(token_ids), cache_salt, int(time.time()))
        self._docs[doc_id] = doc
        return doc

    def get(self, doc_id: str, cache_salt: str | None) -> StoredDocument | None:
        """The tenant's document by id; None when unknown (or another tenant's)."""
        doc = self._docs.get(doc_id)
        return doc if doc is not None and doc.cache_salt == cache_salt else None

    def remove(self, doc_id: str, cache_salt: str | None) -> StoredDocument | None:
        doc = self.get(doc_id, cache_salt)
        if doc is not None:
            del self._docs[doc_id]
        return doc

    def list(self, cache_salt: str | None) -> list[StoredDocument]:
        return [d for d in self._docs.values() if d.cache_salt == cache_salt]


async def document_tokens(
    refs: list[DocumentRef], store: DocumentStore, cache_salt: str | None, tokenize: Tokenize, max_len: int
) -> list[list[int]]:
    """Each document's tokens: a stored one's, or its text's. ParameterError for an unknown id or a
    document longer than the context."""
    out = []
    for i, ref in enumerate(refs):
        if ref.id is not None:
            doc = store.get(ref.id, cache_salt)
            if doc is None:
                raise ParameterError("documents", f"document {i}: unknown id {ref.id!r} (POST /v1/documents)")
            ids = doc.token_ids
        else:
            ids = await tokenize(ref.text or "", False)
        check_length(ids, max_len, f"document {i}")
        out.append(ids)
    return out


def check_length(ids: list[int], max_len: int, what: str = "the document") -> None:
    if not ids or len(ids) >= max_len:
        raise ParameterError(
            "documents", f"{what} holds {len(ids)} tokens, allowed 1..{max_len - 1} (the context)"
        )


def join(parts: list[list[int]], documents: list[list[int]]) -> tuple[list[int], tuple[DocumentSpan, ...]]:
    """parts[0] + documents[0] + parts[1] + ... (len(parts) == len(documents) + 1) -> (ids, the spans)."""
    ids = list(parts[0])
    spans = []
    for doc, after in zip(documents, parts[1:], strict=True):
        spans.append(DocumentSpan(len(ids), len(doc)))
        ids += doc + after
    return ids, tuple(spans)


def with_placeholders(messages: list[dict], extra: list[DocumentRef]) -> tuple[list[dict], list[DocumentRef]]:
    """Messages for the chat template with each document part (and the `documents` field's, at the start of
    the last user message) replaced by a numbered placeholder; -> (messages, the documents in that order)."""
    refs: list[DocumentRef] = []
    out = []
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if extra and last_user is None:
        raise ParameterError("documents", "they go into the last user message, and there is none")
    for i, message in enumerate(messages):
        parts = message.get("content")
        if not isinstance(parts, list) and not (extra and i == last_user):
            out.append(message)
            continue
        if not isinstance(parts, list):
            parts = [{"type": "text", "text": parts or ""}]
        if extra and i == last_user:
            parts = [{"type": "document", **ref.model_dump(exclude_none=True)} for ref in extra] + parts
        texts = []
        for part in parts:
            if part["type"] == "document":
                texts.append(_PLACEHOLDER.format(len(refs)))
                refs.append(
                    DocumentRef(id=part.get("id"), text=part.get("text") if "id" not in part else None)
                )
            else:
                texts.append(part.get("text", ""))
        out.append({**message, "content": "\n".join(texts)})
    return out, refs


def split_rendered(text: str, count: int) -> list[str]:
    """The rendered chat split at its placeholders: count + 1 texts. ParameterError when the template did not
    keep each document once and in order."""
    pieces = _PLACEHOLDER_RE.split(text)
    found = [int(x) for x in pieces[1::2]]
    if found != list(range(count)):
        raise ParameterError(
            "documents", "the model's chat template did not keep each document part once, in order"
        )
    return pieces[0::2]
