"""Bus URLs: parsing, typed option reading, and redaction of secrets."""

from __future__ import annotations

import builtins
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from .errors import ConfigError

_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*$")
_SECRET_OPTION = re.compile(r"(pass|secret|token|key|sig|cred|auth|private|conn_?str|connection_string|dsn)", re.I)
REDACTED = "***"  #: what stands in for a secret in every text msgbus shows
MAX_OPTION_SECONDS = 1e9  # about 31 years: the largest float option value (they are all durations)
_V = TypeVar("_V")


def _is_secret(name: str) -> bool:
    return bool(_SECRET_OPTION.search(name)) and name not in _NOT_SECRET


# Option names that match the secret pattern but hold no secret.
_NOT_SECRET = frozenset({"key_field", "partition_key", "ordering_key"})


@dataclass(frozen=True, slots=True)
class BusURL:
    """A parsed bus URL. ``repr`` and ``str`` never show the password or secret options."""

    scheme: str
    host: str | None = None
    port: int | None = None
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    path: str = ""
    options: Mapping[str, str] = field(default_factory=dict, repr=False)
    raw: str = field(default="", repr=False, compare=False)

    @property
    def redacted(self) -> str:
        """The URL as text with the password and secret-looking option values replaced."""
        auth = ""
        if self.username is not None:
            auth = quote(self.username, safe="")
            if self.password is not None:
                auth += ":" + REDACTED
            auth += "@"
        elif self.password is not None:
            auth = ":" + REDACTED + "@"
        netloc = auth + (self.host or "")
        if self.port is not None:
            netloc += f":{self.port}"
        query = "&".join(f"{k}={_shown_option(k, v)}" for k, v in self.options.items())
        return f"{self.scheme}://{netloc}{self.path}" + (f"?{query}" if query else "")

    def __str__(self) -> str:
        return self.redacted

    def __repr__(self) -> str:
        return f"BusURL({self.redacted!r})"

    def reader(self, extra: Mapping[str, object] | None = None) -> OptionReader:
        """Typed access to the URL's query options (plus ``extra`` keyword options)."""
        merged: dict[str, str] = dict(self.options)
        for k, v in (extra or {}).items():
            merged[k] = v if isinstance(v, str) else _to_text(k, v)
        return OptionReader(self.scheme, merged)


def _shown_option(name: str, value: str) -> str:
    """An option value as ``redacted`` shows it: hidden when its name looks secret, and a URL inside it
    (``endpoint_url=http://user:pw@host``) without its user name and password."""
    if _is_secret(name):
        return REDACTED
    if "@" in value and "://" in value:
        value = _scrub(value)
    return quote(value, safe="/:,*")


def _to_text(name: str, value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    raise ConfigError(f"option '{name}' must be a string, number or bool, not {type(value).__name__}")


def redact(text: str, secrets: list[str | None]) -> str:
    """Remove each known secret from free text (used on error messages from client libraries)."""
    for s in secrets:
        if s:
            text = text.replace(s, REDACTED)
            quoted = quote(s, safe="")
            if quoted != s:
                text = text.replace(quoted, REDACTED)
    return text


def parse_url(url: str) -> BusURL:
    """Parse a bus URL, raising ``ConfigError`` (never showing the password) when it is malformed.

    An Azure Service Bus connection string (``Endpoint=sb://...;SharedAccessKey...``) is accepted too.
    A URL that two readers could split differently is refused rather than guessed at: an ``@`` after the
    host (``amqp://svc:12345/secret@host/``, ``redis://:pw#frag@host``) means a user name or password holds
    an unescaped ``/``, ``?``, ``#`` or ``@``, and the error asks for it percent-encoded. Error texts quote
    nothing of such a URL but its scheme, so no reading of it can leak the password.
    """
    if not isinstance(url, str):
        raise ConfigError(f"bus URL must be a string, not {type(url).__name__}")
    text = url.strip()
    if text[:14].lower() == "endpoint=sb://":
        text = url_from_connection_string(text)
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise ConfigError("bus URL needs a scheme, e.g. 'memory://' or 'amqp://host:5672/'")
    if not _SCHEME.match(scheme.lower()):
        raise ConfigError("malformed URL scheme: letters, digits, '+', '.' or '-', starting with a letter")
    scheme = scheme.lower()
    authority = _authority(rest)
    if authority and "@" in rest[len(authority) :]:
        raise ConfigError(
            f"ambiguous {scheme}:// URL: an '@' follows the host, so a user name or password holds an unescaped "
            "'/', '?', '#' or '@'; percent-encode them (%2F, %3F, %23, %40)"
        )
    try:
        parts = urlsplit(text)
    except ValueError:
        raise ConfigError(
            f"malformed {scheme}:// URL: unbalanced '[' or ']' (an IPv6 host needs both; percent-encode them "
            "in a user name or password)"
        ) from None
    try:
        port = parts.port
    except ValueError:
        shown = "" if "@" in authority else f" {authority.rpartition(':')[2]!r}"
        raise ConfigError(f"malformed {scheme}:// URL: the port{shown} is not a number from 0 to 65535") from None
    if parts.fragment or "#" in text:
        raise ConfigError("a bus URL must not have a '#fragment' (percent-encode a '#' in a password as %23)")
    options: dict[str, str] = {}
    for k, v in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if not k:
            raise ConfigError(f"{scheme}:// URL has an option without a name")
        if k in options:
            raise ConfigError(f"option '{k}' is given twice in the bus URL")
        options[k] = v
    return BusURL(
        scheme=scheme,
        host=unquote(parts.hostname) if parts.hostname else None,
        port=port,
        username=unquote(parts.username) if parts.username is not None else None,
        password=unquote(parts.password) if parts.password is not None else None,
        path=parts.path,
        options=options,
        raw=text,
    )


def _authority(rest: str) -> str:
    """The text after ``scheme://`` up to the first ``/``, ``?`` or ``#`` (what ``urlsplit`` takes as netloc)."""
    end = len(rest)
    for stop in "/?#":
        at = rest.find(stop)
        if 0 <= at < end:
            end = at
    return rest[:end]


def _scrub(text: str) -> str:
    """Redact free text that may hold URLs or ``Name=secret`` pairs (a client library's error message).

    Fails closed: after each ``scheme://`` everything up to the last ``@`` of that word is taken as a
    user name and password, whatever it contains, and the value of every secret-looking ``name=value``
    (or ``name:value``) is hidden up to the next separator.
    """
    text = re.sub(r"(\w://)[^\s'\"<>]*@", r"\1" + REDACTED + "@", text)
    return _SECRET_PAIR.sub(lambda m: m.group(1) + REDACTED, text)


_SECRET_PAIR = re.compile(
    r"((?:^|(?<=[\s?&;,\"'{(]))[\w.-]*(?:pass|secret|token|key|sig|cred|auth|private|conn_?str|dsn)[\w.-]*[\"']?\s*[=:]\s*[\"']?)"
    r"[^\s&;,\"'})]+",
    re.I,
)


class OptionReader:
    """Reads typed options once each; ``finish()`` rejects any option nobody asked for."""

    def __init__(self, scheme: builtins.str, options: dict[builtins.str, builtins.str]) -> None:
        self._scheme = scheme
        self._options = options
        self._known: list[builtins.str] = []
        self._used: dict[builtins.str, builtins.str] = {}

    def _take(self, name: builtins.str) -> builtins.str | None:
        self._known.append(name)
        return self._options.pop(name, None)

    def _use(self, name: builtins.str, value: _V) -> _V:
        """Note the value an option ends up with (given or default), for ``used()``."""
        if value is not None:
            text = value if isinstance(value, builtins.str) else _to_text(name, value)
            self._used[name] = REDACTED if _is_secret(name) else text
        return value

    def used(self) -> dict[builtins.str, builtins.str]:
        """Every option read so far with the value it ended up with, defaults included, secrets redacted."""
        return dict(self._used)

    def str(self, name: builtins.str, default: builtins.str | None = None) -> builtins.str | None:
        """The text of option ``name``, or ``default``."""
        value = self._take(name)
        return self._use(name, default if value is None else value)

    def int(self, name: builtins.str, default: builtins.int, *, min: builtins.int | None = None) -> builtins.int:
        """Option ``name`` as an integer (at least ``min``), or ``default``; ``ConfigError`` otherwise."""
        value = self._take(name)
        if value is None:
            return self._use(name, default)
        try:
            out = int(value)
        except ValueError:
            raise ConfigError(f"option '{name}' must be an integer, got {self._show(name, value)}") from None
        if min is not None and out < min:
            raise ConfigError(f"option '{name}' must be >= {min}, got {out}")
        return self._use(name, out)

    def float(
        self, name: builtins.str, default: builtins.float, *, min: builtins.float | None = None
    ) -> builtins.float:
        """Option ``name`` as seconds (at least ``min``, at most ``MAX_OPTION_SECONDS``), or ``default``."""
        value = self._take(name)
        if value is None:
            return self._use(name, default)
        try:
            out = float(value)
        except ValueError:
            raise ConfigError(f"option '{name}' must be a number, got {self._show(name, value)}") from None
        # Every float option is a duration: infinity or 1e300 s would overflow the clocks they are added to.
        if not -MAX_OPTION_SECONDS <= out <= MAX_OPTION_SECONDS or (min is not None and out < min):
            low = f"{min:g}" if min is not None else f"{-MAX_OPTION_SECONDS:g}"
            raise ConfigError(
                f"option '{name}' must be a number from {low} to {MAX_OPTION_SECONDS:g}, got {self._show(name, value)}"
            )
        return self._use(name, out)

    def bool(self, name: builtins.str, default: builtins.bool) -> builtins.bool:
        """Option ``name`` as true (1, true, yes, on) or false (0, false, no, off), or ``default``."""
        value = self._take(name)
        if value is None:
            return self._use(name, default)
        low = value.lower()
        if low in ("1", "true", "yes", "on"):
            return self._use(name, True)
        if low in ("0", "false", "no", "off"):
            return self._use(name, False)
        raise ConfigError(f"option '{name}' must be true or false, got {self._show(name, value)}")

    def choice(self, name: builtins.str, default: builtins.str, choices: tuple[builtins.str, ...]) -> builtins.str:
        """Option ``name`` as one of ``choices``, or ``default``; ``ConfigError`` names the choices otherwise."""
        value = self._take(name)
        if value is None:
            return self._use(name, default)
        if value not in choices:
            raise ConfigError(f"option '{name}' must be one of {', '.join(choices)}; got {self._show(name, value)}")
        return self._use(name, value)

    def _show(self, name: builtins.str, value: builtins.str) -> builtins.str:
        return REDACTED if _is_secret(name) else repr(value)

    def finish(self) -> None:
        """Raise ``ConfigError`` naming any option that no reader asked for."""
        if self._options:
            unknown = ", ".join(sorted(self._options))
            known = ", ".join(sorted(set(self._known))) or "none"
            raise ConfigError(f"unknown option(s) for {self._scheme}://: {unknown} (known: {known})")


def url_from_connection_string(text: str) -> str:
    """``Endpoint=sb://host[:port]/;SharedAccessKeyName=N;SharedAccessKey=K[;UseDevelopmentEmulator=true]``
    as a ``servicebus://`` URL (the key URL-quoted). Raises ``ConfigError`` without echoing the key.
    """
    fields: dict[str, str] = {}
    for part in text.strip().strip(";").split(";"):
        name, sep, value = part.partition("=")
        if not sep:
            raise ConfigError("malformed Service Bus connection string: every part must be Name=Value")
        fields[name.strip().lower()] = value.strip()
    endpoint = fields.pop("endpoint", "")
    match = re.match(r"^sb://([^/;]+)/?$", endpoint)
    if match is None:
        raise ConfigError("Service Bus connection string needs Endpoint=sb://<host>[:port]/")
    name, key = fields.pop("sharedaccesskeyname", ""), fields.pop("sharedaccesskey", "")
    if not name or not key:
        raise ConfigError("Service Bus connection string needs SharedAccessKeyName and SharedAccessKey")
    emulator = fields.pop("usedevelopmentemulator", "false").lower() == "true"
    fields.pop("entitypath", None)
    if fields:
        raise ConfigError(f"unsupported Service Bus connection string part(s): {', '.join(sorted(fields))}")
    query = "?emulator=true" if emulator else ""
    return f"servicebus://{quote(unquote(name), safe='')}:{quote(key, safe='')}@{match.group(1)}{query}"
