"""Typed errors of the RAG service, each with an HTTP status hint for the (thin) API layer: the
one error hierarchy, for the core and the HTTP layer alike.

Every error says what was wrong and what to do, and names the file when there is one. The HTTP
layer (rag_service/serve/errors.py) maps `RagError.status_code` to the response status and the
error to the OpenAI-style body {"error": {"message", "type", "code", ...}}; nothing here imports
FastAPI.

    RagError (500)
    +- DocumentError (422)             a document could not be turned into text
    |  +- UnsupportedDocument (415)      type not PDF / text / Markdown, or binary disguised as text
    |  +- UndecodableText (415)          bytes look like text but no known encoding decodes them
    |  +- EncryptedDocument (422)        password-protected PDF
    |  +- CorruptDocument (422)          truncated / malformed PDF, or a pypdf safety limit tripped
    |  +- EmptyDocument (422)            no bytes, no pages, or only whitespace
    |  +- NoTextLayer (422)              image-only (scanned) PDF: needs OCR first
    |  +- ParseTimeout (422)             the per-document parse time budget ran out
    |  +- DocumentTooLarge (413)         bytes / pages / tokens over a limit in settings
    +- UploadFailed (the first file's)  every file of an upload failed; `extra` has the per-file results
    +- BadRequest (400)                an argument is malformed (tenant name, empty batch, ...)
    +- InvalidRequest (422)            the request does not match its schema (field named in `param`)
    +- LimitExceeded (422)             a request over a limit in settings (question length, max_tokens)
    +- Unauthorized (401)              no valid API key; `headers` has WWW-Authenticate
    |  +- MissingApiKey (401)            no `Authorization: Bearer <key>`
    |  +- InvalidApiKey (401)            a key that is not configured
    +- NotFound (404)                  unknown document / pack id, or no such route
    |  +- OtherTenant (403)              the id exists, under another tenant (404 when auth is off)
    +- NoDocuments (404)               a question over a library (or a document filter) with no packs
    +- ModelNotFound (404)             an OpenAI request names a model this service does not serve
    +- MethodNotAllowed (405)          the route exists, not with this HTTP method
    +- ConflictError (409)             optimistic Redis transaction kept losing the race
    +- RequestTooLarge (413)           a request body over max_json_bytes / max_request_bytes
    +- UnsupportedMediaType (415)      a request body that is neither JSON nor multipart (uploads)
    +- TooManyRequests (429)           rate limit or concurrent streams per API key; `headers` has Retry-After
    +- HTTPError (any)                 another HTTP error the web framework raised, its status as is
    +- InternalError (500)             a bug: an unexpected exception, logged with its traceback
    +- EngineError (503)               the engine could not run a request (cache block pool full): retry
    |  +- UpstreamError (502)          engine `openai`: the upstream failed or cut its stream
    |  |  +- UpstreamTimeout (504)       ... sent nothing for upstream_timeout_s
    |  +- UpstreamUnavailable (503)    ... no upstream endpoint reachable
    |  +- UpstreamBusy (429)           ... every endpoint pushed back (429 / 503); Retry-After
    +- StorageError (503)              blob store or Redis failed (Redis unreachable: retry later)
       +- DiskFull (507)                 no space left on the data disk; nothing was stored

Run the tests: `.venv/bin/python -m pytest -q tests/rag_service tests/service/test_hardening.py`.
"""

from __future__ import annotations


class RagError(Exception):
    """Base class. `status_code` is a hint for HTTP layers; `code` a stable machine name."""

    status_code: int = 500
    code: str = "rag_error"
    headers: dict[str, str] | None = None  # extra HTTP headers (Retry-After, WWW-Authenticate)
    extra: dict | None = None  # extra top-level fields of the HTTP error body (next to "error")

    def __init__(self, message: str, *, filename: str | None = None, headers: dict[str, str] | None = None):
        self.message = message
        self.filename = filename
        if headers:
            self.headers = headers
        super().__init__(f"{filename}: {message}" if filename else message)

    def to_dict(self) -> dict:
        out = {"error": self.code, "message": str(self)}
        if self.filename is not None:
            out["filename"] = self.filename
        return out


class DocumentError(RagError):
    status_code = 422
    code = "document_error"


class UnsupportedDocument(DocumentError):
    status_code = 415
    code = "unsupported_document"


class UndecodableText(DocumentError):
    status_code = 415
    code = "undecodable_text"


class EncryptedDocument(DocumentError):
    code = "encrypted_document"


class CorruptDocument(DocumentError):
    code = "corrupt_document"


class EmptyDocument(DocumentError):
    code = "empty_document"


class NoTextLayer(DocumentError):
    code = "no_text_layer"


class ParseTimeout(DocumentError):
    code = "parse_timeout"


class DocumentTooLarge(DocumentError):
    status_code = 413
    code = "document_too_large"


class BadRequest(RagError):
    status_code = 400
    code = "bad_request"


class LimitExceeded(RagError):
    status_code = 422
    code = "limit_exceeded"


class NotFound(RagError):
    status_code = 404
    code = "not_found"


class OtherTenant(NotFound):
    """The id exists but belongs to another tenant. A NotFound for callers that only ask "may I
    see it?"; the API answers 403 when API keys are on, 404 (no leak) in open dev mode."""

    status_code = 403
    code = "forbidden"

    def __init__(self, message: str, *, not_found: str, **kw):
        super().__init__(message, **kw)
        self.not_found = not_found  # what a caller who must not learn the id exists is told


class TooManyRequests(RagError):
    status_code = 429
    code = "rate_limited"


class ConflictError(RagError):
    status_code = 409
    code = "conflict"


class StorageError(RagError):
    status_code = 503
    code = "storage_error"


class DiskFull(StorageError):
    status_code = 507
    code = "insufficient_storage"


class NoDocuments(RagError):
    status_code = 404
    code = "no_documents"


class ModelNotFound(RagError):
    status_code = 404
    code = "model_not_found"


class EngineError(RagError):
    """The engine could not run a request (e.g. its cache block pool is full); retry later."""

    status_code = 503
    code = "engine_error"


# An `engine: openai` upstream (vLLM / SGLang / `dsa-rag engine-server`, model/engine/upstream.py)
# failed; rag_service/ask/upstream_errors.py maps the engine's error event to one of these.
class UpstreamError(EngineError):
    """The upstream answered with an error status, or broke / cut its stream."""

    status_code = 502
    code = "upstream_error"


class UpstreamUnavailable(EngineError):
    """No upstream endpoint accepted a connection."""

    code = "upstream_unavailable"


class UpstreamTimeout(UpstreamError):
    """The upstream sent nothing for `upstream_timeout_s`."""

    status_code = 504
    code = "upstream_timeout"


class UpstreamBusy(EngineError):
    """Every upstream endpoint pushed back (429 / 503): retry after `Retry-After` seconds."""

    status_code = 429
    code = "upstream_busy"


# ------------------------------------------------------------------ errors of the HTTP layer
class InvalidRequest(RagError):
    """The request does not match its schema. `param` names the first bad field (None when the
    body as a whole is bad); `extra["detail"]` lists every error ({loc, msg, type})."""

    status_code = 422
    code = "validation_error"

    def __init__(self, message: str, *, param: str | None = None, errors: list[dict] | None = None):
        super().__init__(message)
        self.param = param
        self.extra = {"detail": list(errors or [])}


class Unauthorized(RagError):
    status_code = 401
    code = "unauthorized"


class MissingApiKey(Unauthorized):
    code = "missing_api_key"


class InvalidApiKey(Unauthorized):
    code = "invalid_api_key"


class MethodNotAllowed(RagError):
    status_code = 405
    code = "method_not_allowed"


class RequestTooLarge(RagError):
    status_code = 413
    code = "request_too_large"


class UnsupportedMediaType(RagError):
    status_code = 415
    code = "unsupported_media_type"


class HTTPError(RagError):
    """An HTTP error the web framework raised that no class above names; its status as is."""

    code = "http_error"

    def __init__(self, message: str, *, status_code: int, headers: dict[str, str] | None = None):
        super().__init__(message, headers=headers)
        self.status_code = status_code


class InternalError(RagError):
    """A bug: an exception nothing expected. The body names its type; the log has the traceback."""

    code = "internal_error"


class UploadFailed(RagError):
    """Every file of an upload failed. Status, code, message and filename are the first file's
    failure; `extra` holds the whole upload response (`ids` (empty) and the per-file `data`)."""

    def __init__(self, message: str, *, status_code: int, code: str, filename: str | None, response: dict):
        super().__init__(message)  # the message already names the file
        self.status_code, self.code, self.filename = status_code, code, filename
        self.extra = response
