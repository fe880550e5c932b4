"""The API's request bodies, the checks on adapter names and paths, and its errors, in OpenAI's
shapes.

Bodies are strict ("5" is not an int, 1 is not a bool) and every client mistake becomes an
`ApiError` carrying OpenAI's error body {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from fastapi import Request as HttpRequest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lorakit.lora.peft_format import CONFIG_NAME, WEIGHTS_NAME

MAX_BODY = 2 << 20  # bytes; far more than any prompt that fits a context
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # no '.': see LoRALinear


class ApiError(Exception):
    """An HTTP error with OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}
        self.headers = headers or {}


class _Body(BaseModel):
    """Strict types; unknown fields ignored (OpenAI clients send many we do not use)."""

    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class GenerateBody(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)  # OpenAI's default is 1
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None


class CompletionRequest(GenerateBody):
    prompt: str | list[int]
    echo: bool | None = False
    logprobs: int | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None


class ChatRequest(GenerateBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False


class AdapterLoad(_Body):
    name: str
    path: str


async def parse_body(cls: type[_Body], request: HttpRequest) -> Any:
    """The JSON body as `cls`, or a 400 naming the first problem (413 if it is too big)."""
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY:
            message = f"the request body exceeds {MAX_BODY >> 20} MiB"
            raise ApiError(413, message, code="request_too_large")
    try:
        return cls.model_validate_json(bytes(raw))
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        if err["type"] == "json_invalid":
            raise ApiError(400, f"the request body is not valid JSON: {err['msg']}") from None
        if not err["loc"]:
            raise ApiError(400, "the request body must be a JSON object") from None
        # Drop pydantic's union-branch tags ("str", "list[int]") from the location.
        loc = [str(x) for x in err["loc"] if not re.fullmatch(r"str|int|float|bool|.*\[.*", str(x))]
        raise ApiError(400, f"{'.'.join(loc)}: {err['msg']}", param=loc[0]) from None


def allowed_adapter_path(path: str, allowed: Sequence[str | Path]) -> Path:
    """The real directory `path` names, if it lies inside an allowed directory (symlinks
    resolved, its files too); relative paths are taken from each allowed directory in turn."""
    roots = [Path(d).resolve() for d in allowed]
    if not roots:
        raise ApiError(
            403,
            "this server loads adapters only at start-up; restart it with --adapter-dir DIR "
            "to allow loading adapters from DIR",
            "permission_error",
            "adapter_dirs_not_configured",
            "path",
        )

    def inside(p: Path) -> bool:
        return any(p.is_relative_to(root) for root in roots)

    raw = Path(path)
    for candidate in [raw] if raw.is_absolute() else [root / raw for root in roots]:
        try:
            real = candidate.resolve(strict=True)
            files = [(real / f).resolve() for f in (CONFIG_NAME, WEIGHTS_NAME)]
        except (OSError, RuntimeError, ValueError):  # missing, a symlink loop, a NUL byte
            continue
        if real.is_dir() and inside(real) and all(inside(f) for f in files):
            return real
    raise ApiError(
        403,
        f"adapter path {path!r} is not a directory inside the allowed adapter directories",
        "permission_error",
        "path_not_allowed",
        "path",
    )


def available_adapters(allowed: Sequence[str | Path], loaded: dict[str, str]) -> list[dict]:
    """The adapters inside the allowed directories (what POST /v1/adapters may load), up to
    two folders down: name, path, rank, eval loss, the name it is loaded under (`loaded`: name
    -> folder), and a name to load it under (unique in the list)."""
    import math

    from lorakit.lora.library import adapter_library

    folders = {str(Path(p).resolve()): n for n, p in loaded.items()}
    rows: dict[str, dict] = {}
    for root in dict.fromkeys(str(Path(d).resolve()) for d in allowed):
        if not Path(root).is_dir():
            continue  # deleted while serving: nothing to offer there
        for r in adapter_library(root, depth=2):
            path = str(Path(r.get("path", root)).resolve())
            if r.get("warning") or path in rows:
                continue
            loss = r["eval_loss"]
            rows[path] = {
                "name": r["name"],
                "path": path,
                "base_model": r["base_model"],
                "rank": r["rank"],
                "eval_loss": loss
                if isinstance(loss, int | float) and math.isfinite(loss)
                else None,
                "loaded": path in folders,
                "loaded_as": folders.get(path),
            }
    taken = set(loaded)
    for row in rows.values():
        if row["loaded_as"]:
            row["suggested_name"] = row["loaded_as"]
            continue
        stem = re.sub(r"[^A-Za-z0-9_-]", "-", row["name"]).strip("-_")[:60] or "adapter"
        name, n = stem, 1
        while name in taken:
            n += 1
            name = f"{stem}-{n}"
        taken.add(name)
        row["suggested_name"] = name
    return list(rows.values())


def check_adapter_name(name: str, base_name: str) -> None:
    if not ADAPTER_NAME.match(name) or name == base_name:
        raise ApiError(
            400,
            f"adapter name {name!r} is not allowed: use 1-64 letters, digits, '_' or '-', "
            "starting with a letter or digit, and not the base model's name",
            param="name",
        )
