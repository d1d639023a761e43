"""The request and response bodies of ``mmrerank serve`` (pydantic): search, and the rerank APIs in Cohere's
(v1, v2) and Jina's shapes. Text fields refuse lone surrogates; a document is a string or an object."""

# No `from __future__ import annotations` here: FastAPI and pydantic must see real types.
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator


def unicode_text(v: str) -> str:
    """JSON can carry lone surrogates (``"\\ud800"``): not text, nothing downstream can encode them."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it holds a lone surrogate)") from None
    return v


Text = Annotated[str, AfterValidator(unicode_text)]


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: Text = Field(min_length=1)
    top_k: int = Field(default=100, gt=0)
    top_n: int | None = Field(default=None, gt=0)
    rerank: bool = True


IMAGE_FIELDS = ("image", "image_url", "image_b64")  # a document carries at most one of them


class RerankDocument(BaseModel):
    """A document of a rerank call: text (the caption) and/or one image.

    ``image`` is Jina's form (jina-reranker-m0): an image URL (allowed schemes only), base64, or a
    ``data:image/...;base64,`` URI. ``image_url`` / ``image_b64`` say which explicitly."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"text": "a red circle on a white background"}, {"image": "data:image/png;base64,iVBORw0KGgo..."},
        {"image": "s3://bucket/images/0001.jpg", "text": "its caption"}]})

    text: Text | None = Field(default=None, description="the document's text (a caption for image rerankers)")
    image: Text | None = Field(default=None, description="Jina's form: an image URL (allowed schemes only), "
                                                         "base64, or a data:image/...;base64, URI")
    image_url: Text | None = Field(default=None, description="an image URL (allowed schemes only)")
    image_b64: Text | None = Field(default=None, description="base64 image bytes")

    @model_validator(mode="after")
    def _one_image(self) -> "RerankDocument":
        given = [f for f in IMAGE_FIELDS if getattr(self, f)]
        if len(given) > 1:
            raise ValueError(f"give one of {', '.join(IMAGE_FIELDS)}, not several")
        if not (self.text or given):
            raise ValueError(f"a document needs text or an image ({', '.join(IMAGE_FIELDS)})")
        return self


def document_kind(v: Any) -> str:
    return "string" if isinstance(v, str) else "object"


# A document as Cohere (v1 and v2) and Jina send it: a string (its text) or an object. The discriminator makes a
# bad document one error of its own kind (a plain union reports why it is neither).
Document = Annotated[Annotated[Annotated[Text, Field(min_length=1)], Tag("string")]
                     | Annotated[RerankDocument, Tag("object")],
                     Discriminator(document_kind),
                     Field(description="a string (the document's text), or an object with text and/or an image")]


class RerankRequest(BaseModel):
    """``POST /v1/rerank``: Cohere v1's and Jina's request."""

    model_config = ConfigDict(extra="forbid")

    query: Text = Field(min_length=1)
    documents: list[Document] = Field(min_length=1)
    top_n: int | None = Field(default=None, gt=0)
    return_documents: bool | None = Field(default=False, description="echo each document (null: false)")
    model: Text | None = Field(default=None, description="accepted and reported back; the served reranker is fixed")
    # Cohere v1 parameters: the SDK sends them as null when an integration passes None; see NOT_APPLIED.
    max_chunks_per_doc: int | None = Field(default=None, gt=0, description="accepted, not applied (meta.warnings)")
    rank_fields: list[Text] | None = Field(default=None, description="accepted, not applied (meta.warnings)")


class RerankV2Request(BaseModel):
    """``POST /v2/rerank``: Cohere v2's request (documents may also be the objects of ``/v1/rerank``)."""

    model_config = ConfigDict(extra="forbid")

    model: Text | None = Field(default=None, description="accepted and reported back; the served reranker is fixed")
    query: Text = Field(min_length=1)
    documents: list[Document] = Field(min_length=1)
    top_n: int | None = Field(default=None, gt=0)
    max_tokens_per_doc: int | None = Field(default=None, gt=0, description="accepted, not applied (meta.warnings)")
    priority: int | None = Field(default=None, ge=0, description="accepted, not applied (meta.warnings)")


class RerankResult(BaseModel):
    index: int = Field(description="the document's position in the request")
    relevance_score: float
    document: RerankDocument | None = Field(default=None, description="/v1/rerank with return_documents: true")


class ApiVersion(BaseModel):
    version: str


class RerankMeta(BaseModel):
    """Cohere's ``meta``: the API version answered, and what of the request was not applied."""

    api_version: ApiVersion
    warnings: list[str] | None = None


class RerankResponse(BaseModel):
    """Cohere's response (``id``, ``results``, ``meta``) plus ``model``: the served reranker's name."""

    id: str
    model: str
    results: list[RerankResult] = Field(description="best first")
    meta: RerankMeta


# Cohere parameters accepted so that its clients work, and not applied: why, for meta.warnings.
NOT_APPLIED = {
    "max_tokens_per_doc": "documents are truncated to the served reranker's max_length",
    "max_chunks_per_doc": "documents are not chunked; they are truncated to the served reranker's max_length",
    "rank_fields": "a document is ranked on its text and image",
    "priority": "requests are served in arrival order",
}


def rerank_meta(version: str, served: str, req: RerankRequest | RerankV2Request) -> RerankMeta:
    """Cohere's ``meta``; ``warnings`` say what of the request was not applied (never echoing it)."""
    warnings = [f"{name} is not applied: {why}" for name, why in NOT_APPLIED.items()
                if getattr(req, name, None) is not None]
    if req.model is not None and req.model != served:
        warnings.append(f"the requested model is not served here; scored with {served}")
    return RerankMeta(api_version=ApiVersion(version=version), warnings=warnings or None)
