"""Body codecs: objects to bytes on send, bytes to objects (optionally validated) on receipt.

bytes pass through, str is UTF-8 text, JSON values and typed models (pydantic, dataclasses) are JSON.
Nothing is ever pickled.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Hashable
from functools import lru_cache
from typing import Any, cast

from .errors import DecodeError, InvalidMessage

BYTES = "application/octet-stream"
TEXT = "text/plain; charset=utf-8"
JSON = "application/json"

_JSON_TYPES = (dict, list, tuple, int, float, bool, type(None))


def encode(body: object, content_type: str | None = None) -> tuple[bytes, str]:
    """Encode a body for the wire; returns (payload, content type)."""
    if isinstance(body, bytes | bytearray | memoryview):
        return bytes(body), content_type or BYTES
    if isinstance(body, str):
        return body.encode(), content_type or TEXT
    if isinstance(body, _JSON_TYPES):
        data = body
    elif hasattr(body, "model_dump_json") and hasattr(type(body), "model_fields"):
        return body.model_dump_json().encode(), content_type or JSON
    elif dataclasses.is_dataclass(body) and not isinstance(body, type):
        data = dataclasses.asdict(body)
    else:
        raise InvalidMessage(
            f"cannot encode a {type(body).__name__} body: send bytes, str, a JSON value, a pydantic model "
            "or a dataclass instance"
        )
    try:
        text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidMessage(f"body is not JSON-serialisable: {exc}") from exc
    return text.encode(), content_type or JSON


def decode(payload: bytes, content_type: str | None, model: type[Any] | None = None) -> Any:
    """Decode a payload by its content type, or validate it into ``model`` (JSON)."""
    if model is not None:
        return _validator(cast(Hashable, model))(payload)
    if content_type is None or content_type == BYTES:
        return payload
    base = content_type.split(";", 1)[0].strip().lower()
    if base == "application/json" or base.endswith("+json"):
        try:
            return json.loads(payload)
        except (ValueError, UnicodeDecodeError) as exc:
            raise DecodeError(f"invalid JSON payload: {exc}") from exc
    if base.startswith("text/"):
        try:
            return payload.decode()
        except UnicodeDecodeError as exc:
            raise DecodeError(f"text payload is not UTF-8: {exc}") from exc
    return payload


@lru_cache(maxsize=256)
def _validator(model: Any) -> Any:
    """A function payload -> validated instance of ``model``; pydantic when available."""
    if model is bytes:
        return lambda payload: payload
    if model is str:
        return lambda payload: decode(payload, TEXT)
    try:
        import pydantic
    except ImportError:  # pragma: no cover - exercised only without pydantic
        pydantic = None  # type: ignore[assignment]
    if pydantic is not None:
        adapter = pydantic.TypeAdapter(model)

        def validate(payload: bytes) -> Any:
            try:
                return adapter.validate_json(payload)
            except pydantic.ValidationError as exc:
                raise DecodeError(f"payload does not match {model.__name__}: {_short(exc)}") from exc

        return validate
    if dataclasses.is_dataclass(model):
        return lambda payload: _dataclass_from_json(model, payload)
    raise DecodeError(f"validating into {model.__name__} needs pydantic: pip install 'msgbus[pydantic]'")


def _short(exc: Exception) -> str:
    text = str(exc).replace("\n", " ")
    return text if len(text) <= 300 else text[:297] + "..."


def _dataclass_from_json(model: type[Any], payload: bytes) -> Any:
    """Minimal validation without pydantic: JSON object, known fields, required fields present."""
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DecodeError(f"invalid JSON payload: {exc}") from exc
    if not isinstance(data, dict):
        raise DecodeError(f"{model.__name__} needs a JSON object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(model)}
    unknown = set(data) - names
    if unknown:
        raise DecodeError(f"unknown field(s) for {model.__name__}: {', '.join(sorted(unknown))}")
    try:
        return model(**data)
    except TypeError as exc:
        raise DecodeError(f"payload does not match {model.__name__}: {exc}") from exc
