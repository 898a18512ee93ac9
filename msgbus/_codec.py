"""Body codecs: objects to bytes on send, bytes to objects (optionally validated) on receipt.

bytes pass through, str is UTF-8 text, JSON values and typed models (pydantic, dataclasses) are JSON.
Nothing is ever pickled.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Hashable, Mapping
from functools import lru_cache
from typing import Any, cast

from .adapter import TIMESTAMP_LIMIT, Delivery, Record
from .errors import ConfigError, DecodeError, InvalidMessage

BYTES = "application/octet-stream"
TEXT = "text/plain; charset=utf-8"
JSON = "application/json"

_JSON_TYPES = (dict, list, tuple, int, float, bool, type(None))


def encode(body: object, content_type: str | None = None) -> tuple[bytes, str]:
    """Encode a body for the wire; returns (payload, content type)."""
    if isinstance(body, bytes | bytearray | memoryview):
        return bytes(body), content_type or BYTES
    if isinstance(body, str):
        return _utf8(body, "str body"), content_type or TEXT
    if isinstance(body, _JSON_TYPES):
        data = body
    elif hasattr(body, "model_dump_json") and hasattr(type(body), "model_fields"):
        return _utf8(body.model_dump_json(), "model body"), content_type or JSON
    elif dataclasses.is_dataclass(body) and not isinstance(body, type):
        data = dataclasses.asdict(body)
    else:
        raise InvalidMessage(
            f"cannot encode a {type(body).__name__} body: send bytes, str, a JSON value, a pydantic model "
            "or a dataclass instance"
        )
    try:
        text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidMessage(f"body is not JSON-serialisable: {exc}") from exc
    return _utf8(text, "JSON body"), content_type or JSON


def _utf8(text: str, what: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError as exc:  # a lone surrogate
        raise InvalidMessage(f"{what} is not valid text: {exc.reason} at position {exc.start}") from None


def decode_delivery(delivery: Delivery, model: type[Any] | None, default_type: str | None = None) -> Any:
    """The decoded body of a received message; ``DecodeError`` (only) when it has none, whatever the cause.
    ``default_type`` is the content type of a payload that names none (the consumer's ``content_type=``).

    Nothing a payload or its metadata holds may escape as another exception: the consume loop dead-letters
    on ``DecodeError`` and would stop on anything else (JSON nested deeper than the recursion limit, a
    content type that is not text, a model validator's own exception, metadata an adapter could not read).
    """
    try:
        if delivery.problem is not None:
            raise DecodeError(delivery.problem)
        record = delivery.record
        problem = received_problem(record)
        if problem is not None:
            raise DecodeError(problem)
        ctype = record.content_type
        return decode(record.body, default_type if ctype is None else ctype, model)
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError(describe(exc)) from exc


def received_problem(record: Record) -> str | None:
    """What makes a received record unfit to hand to a handler (wrong types, unencodable text, a timestamp
    no clock can show), or ``None``. It runs once per received message: the common record (exact types,
    ASCII text, a float timestamp) is passed by one expression; anything else gets the full check."""
    key, cid, ctype, headers, ts = (
        record.key,
        record.correlation_id,
        record.content_type,
        record.headers,
        record.timestamp,
    )
    if (
        type(record.body) is bytes
        and type(record.id) is str
        and record.id.isascii()
        and (key is None or (type(key) is str and key.isascii()))
        and (cid is None or (type(cid) is str and cid.isascii()))
        and (ctype is None or (type(ctype) is str and ctype.isascii()))
        and type(ts) is float
        and 0.0 <= ts < TIMESTAMP_LIMIT
        and (not headers or (type(headers) is dict and _ascii_headers(headers)))
    ):
        return None
    return _full_check(record)


def _ascii_headers(headers: dict[str, str]) -> bool:
    for k, v in headers.items():
        if type(k) is not str or type(v) is not str or not (k.isascii() and v.isascii()):
            return False
    return True


def _full_check(record: Record) -> str | None:
    body, text = record.body, (record.id, record.key, record.correlation_id, record.content_type)
    if not isinstance(body, bytes):
        return f"the body is a {type(body).__name__}, not bytes"
    if not isinstance(record.id, str):
        return f"the message id is a {type(record.id).__name__}, not text"
    for name, value in zip(_TEXT_FIELDS, text, strict=True):
        if value is not None and not (isinstance(value, str) and (value.isascii() or _encodable(value))):
            return f"the {name} is not text" if not isinstance(value, str) else f"the {name} is not valid UTF-8"
    headers = record.headers
    if not isinstance(headers, Mapping):
        return f"the headers are a {type(headers).__name__}, not a mapping"
    for k, v in headers.items():
        if not (isinstance(k, str) and isinstance(v, str)):
            return f"header {k[:40]!r} is not str -> str" if isinstance(k, str) else "a header name is not str"
        if not (k.isascii() and v.isascii()) and not (_encodable(k) and _encodable(v)):
            return f"header {k[:40]!r} is not valid UTF-8"
    ts = record.timestamp
    if not isinstance(ts, int | float) or isinstance(ts, bool):
        return f"the timestamp is a {type(ts).__name__}, not a number"
    if not 0 <= ts < TIMESTAMP_LIMIT:
        return f"the timestamp {ts!r} is not a time from 1970 to 9999"
    return None


_TEXT_FIELDS = ("message id", "key", "correlation id", "content type")


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def sanitize(delivery: Delivery) -> Record:
    """The delivery's record made storable on any backend, for dead-lettering a malformed message: a body
    that is not bytes, metadata that is not text or not encodable, a timestamp out of range become bytes,
    text (U+FFFD for what cannot be encoded) and 0.0. Replaces ``delivery.record`` (adapters dead-letter
    what it holds) when anything had to change."""
    record = delivery.record
    if received_problem(record) is None:
        return record
    body = record.body
    if not isinstance(body, bytes):
        body = bytes(body) if isinstance(body, bytearray | memoryview) else _text(body).encode()
    try:
        headers = {_text(k): _text(v) for k, v in record.headers.items()}
    except Exception:  # not a mapping at all
        headers = {}
    ts = record.timestamp
    fixed = Record(
        body=body,
        id=_text(record.id),
        headers=headers,
        key=None if record.key is None else _text(record.key),
        correlation_id=None if record.correlation_id is None else _text(record.correlation_id),
        content_type=None if record.content_type is None else _text(record.content_type),
        timestamp=float(ts) if isinstance(ts, int | float) and 0 <= ts < TIMESTAMP_LIMIT else 0.0,
    )
    delivery.record = fixed
    return fixed


def _text(value: object) -> str:
    """Any value as text that encodes as UTF-8 (``repr`` for non-text, U+FFFD for lone surrogates)."""
    if not isinstance(value, str):
        try:
            value = repr(value)
        except Exception:
            value = f"<{type(value).__name__}>"
    return value if value.isascii() or _encodable(value) else value.encode("utf-8", "replace").decode()


def check_content_type(content_type: object) -> None:
    """``ConfigError`` unless ``content_type`` is a media type a consumer can default to (``type/subtype``,
    optionally with parameters, printable ASCII, at most 256 characters)."""
    if not isinstance(content_type, str):
        raise ConfigError(f"content_type must be a str such as 'application/json', not {type(content_type).__name__}")
    if not (len(content_type) <= 256 and _MEDIA_TYPE.fullmatch(content_type)):
        raise ConfigError(f"content_type must be a media type such as 'application/json', got {content_type!r:.60}")


_MEDIA_TYPE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+/[!#$%&'*+.^_`|~0-9A-Za-z-]+(\s*;[ -~]*)?")


def check_model(model: object) -> None:
    """``ConfigError`` unless ``model`` is something payloads can be validated into (checked once, up front,
    so that a bad ``model=`` fails at ``bus.consumer()``, not by dead-lettering every message)."""
    if isinstance(model, str):  # pydantic takes it as a forward reference that never resolves
        raise ConfigError(f"model must be a type (a dataclass, a pydantic model...), not the string {model!r:.40}")
    try:
        _validator(model)(b"null")  # a probe: a model that cannot be built fails here, not on every message
    except DecodeError:
        pass
    except Exception as exc:
        raise ConfigError(f"model={model!r:.60} cannot validate JSON payloads: {describe(exc)}") from None


def describe(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` for a reason or a log line, at most ``limit`` characters (on one line when cut)."""
    try:
        text = str(exc)
    except Exception:  # an exception whose __str__ fails must not fail the caller too
        text = ""
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3].replace("\n", " ") + "..."


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
        except RecursionError:
            raise DecodeError("invalid JSON payload: nested too deeply") from None
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
    except RecursionError:
        raise DecodeError("invalid JSON payload: nested too deeply") from None
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
