"""Request and response shapes of the HTTP API (OpenAI chat completions, /v1/ocr, errors).

The chat models follow the OpenAI wire format closely enough that the official ``openai`` client works
unchanged; optictx-specific knobs (``mode``, ``prompt``, ``target``, ``ignore_eos``) are extra body fields
(``extra_body=`` in the client) and the structured page result rides along as an extra ``optictx`` field.
Unknown request fields are ignored, as OpenAI-compatible servers do, so newer clients keep working.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


# --------------------------------------------------------------------------- errors
class ErrorBody(BaseModel):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorResponse(BaseModel):
    """Every non-2xx answer has this shape (also sent as an SSE event when a stream fails midway)."""

    error: ErrorBody


# --------------------------------------------------------------------------- chat completions (request)
class ImageURL(BaseModel):
    model_config = ConfigDict(extra="ignore")
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    """One part of a message: ``{"type": "text", "text": ...}`` or ``{"type": "image_url", "image_url": ...}``."""

    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None
    image_url: ImageURL | str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI ``POST /v1/chat/completions`` body (the subset an OCR model can honour).

    The last user message must hold exactly one image (a ``data:`` URL; remote URLs only when the server
    allows them). Its text, if any, is the prompt: an official prompt name (``markdown``, ``free-ocr``, ...),
    or free text, which gets ``<image>\\n`` in front unless it already contains ``<image>``. Empty text uses
    the server's default prompt. Earlier turns and system messages are ignored: DeepSeek-OCR reads a raw
    prompt with no chat roles.
    """

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1, description="only 1 is supported")
    stop: str | list[str] | None = None
    # optictx extensions (send with extra_body=...)
    mode: str | None = Field(default=None, description="resolution mode: nano, tiny, small, base, large, gundam")
    prompt: str | None = Field(default=None, description="official prompt name; overrides the message text")
    target: str | None = Field(default=None, description="what to find, for the 'locate' prompt")
    ignore_eos: bool = Field(default=False, description="keep generating past EOS (benchmarks)")


# --------------------------------------------------------------------------- chat completions (response)
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    """``content`` is the model's raw text (grounding tokens kept, as the boxes live in them); ``optictx``
    carries the parsed page: markdown, plain text, blocks with boxes, token counts and timings."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    optictx: dict[str, Any] | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    optictx: dict[str, Any] | None = None


# --------------------------------------------------------------------------- models, health, options
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "optictx"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    backend: str
    queued: int
    running: int
    batches: int
    rows: int
    max_batch_rows: int


class Limits(BaseModel):
    max_body_bytes: int
    max_pixels: int
    max_pages: int
    max_new_tokens: int
    request_timeout_s: float
    max_queue: int
    max_batch: int


class Options(BaseModel):
    """What the web page needs to build its form: modes, prompts, defaults and the server's limits."""

    model: str
    backend: str
    modes: list[str]
    default_mode: str
    prompts: dict[str, str]
    default_prompt: str
    default_max_new_tokens: int
    auth_required: bool
    limits: Limits


# --------------------------------------------------------------------------- /v1/ocr
class OCRResponse(BaseModel):
    """``pages`` are ``PageResult.to_dict()``: raw, markdown, text, blocks (label, content, boxes_999,
    boxes_px), tokens (vision, decoder_slots, prompt, output, text, compression), timings, finish_reason,
    mode, size, page. ``markdown`` joins the pages with the official page separator."""

    object: Literal["ocr.result"] = "ocr.result"
    model: str
    markdown: str
    pages: list[dict[str, Any]]
    usage: Usage
