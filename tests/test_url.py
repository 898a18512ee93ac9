"""Bus URL parsing, option reading and redaction."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import msgbus
from msgbus._url import REDACTED, _scrub, parse_url, redact
from msgbus.errors import ConfigError

SECRET = "s3cr3t-P@ss"


def test_parses_every_part() -> None:
    url = parse_url("amqp://user:pw@host.example:5672/vhost?heartbeat=30&prefetch=10")
    assert (url.scheme, url.host, url.port, url.username, url.password, url.path) == (
        "amqp",
        "host.example",
        5672,
        "user",
        "pw",
        "/vhost",
    )
    assert dict(url.options) == {"heartbeat": "30", "prefetch": "10"}


def test_password_never_in_str_or_repr() -> None:
    url = parse_url("amqp://user:" + SECRET.replace("@", "%40") + "@host/?sas_key=abc123&region=eu")
    assert url.password == SECRET
    for text in (str(url), repr(url), url.redacted):
        assert SECRET not in text and "abc123" not in text
        assert REDACTED in text and "region=eu" in text


@pytest.mark.parametrize(
    "bad",
    ["", "localhost:5672", "amqp://host:notaport/", "amqp://host:99999/", "://x", "memory://x#frag", "9x://host"],
)
def test_malformed_urls_raise_config_error(bad: str) -> None:
    with pytest.raises(ConfigError):
        parse_url(bad)


def test_malformed_url_error_hides_password() -> None:
    with pytest.raises(ConfigError) as info:
        parse_url(f"amqp://user:{SECRET}@host:bad/")
    assert SECRET not in str(info.value)


def test_duplicate_option_rejected() -> None:
    with pytest.raises(ConfigError, match="twice"):
        parse_url("memory://?a=1&a=2")


def test_option_reader_types_and_unknowns() -> None:
    reader = parse_url("memory://?n=3&t=1.5&flag=yes&mode=b&extra=1").reader({"kw": 7})
    assert reader.int("n", 0) == 3
    assert reader.float("t", 0.0) == 1.5
    assert reader.bool("flag", False) is True
    assert reader.choice("mode", "a", ("a", "b")) == "b"
    assert reader.int("kw", 0) == 7
    assert reader.str("absent", "dflt") == "dflt"
    with pytest.raises(ConfigError, match="extra") as info:
        reader.finish()
    assert "known:" in str(info.value)


def test_option_reader_notes_what_each_option_ended_up_as() -> None:
    reader = parse_url(f"memory://?n=3&flag=off&api_token={SECRET}").reader()
    reader.int("n", 0)
    reader.float("timeout", 30.0)  # not given: the default counts too
    reader.bool("flag", True)
    reader.choice("mode", "a", ("a", "b"))
    reader.str("api_token")
    reader.str("absent")  # no value at all: nothing to show
    assert reader.used() == {"n": "3", "timeout": "30.0", "flag": "false", "mode": "a", "api_token": REDACTED}


def test_bus_options_are_what_the_bus_runs_with() -> None:
    bus = msgbus.connect("memory://?visibility_timeout=2")
    assert bus.options == {
        "topology": "declare",
        "visibility_timeout": "2.0",
        "max_message_size": "1048576",
        "dedup_window": "0.0",
    }


@pytest.mark.parametrize(
    ("query", "call"),
    [
        ("n=x", lambda r: r.int("n", 0)),
        ("n=-1", lambda r: r.int("n", 0, min=0)),
        ("t=nan", lambda r: r.float("t", 0.0)),
        ("f=maybe", lambda r: r.bool("f", False)),
        ("m=z", lambda r: r.choice("m", "a", ("a", "b"))),
    ],
)
def test_option_reader_rejects_bad_values(query: str, call: object) -> None:
    reader = parse_url(f"memory://?{query}").reader()
    with pytest.raises(ConfigError):
        call(reader)  # type: ignore[operator]


def test_secret_option_value_not_echoed_in_errors() -> None:
    reader = parse_url("memory://?token_ttl=" + SECRET).reader()
    with pytest.raises(ConfigError) as info:
        reader.int("token_ttl", 0)
    assert SECRET not in str(info.value)


def test_redact_free_text() -> None:
    assert redact(f"login failed for {SECRET}", ["", None, SECRET]) == f"login failed for {REDACTED}"


@given(st.text(max_size=80))
def test_parse_never_raises_anything_but_config_error(text: str) -> None:
    try:
        url = parse_url(text)
    except ConfigError:
        return
    assert url.scheme


@given(
    user=st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=20),
    password=st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=4, max_size=30),
)
def test_any_password_roundtrips_and_is_redacted(user: str, password: str) -> None:
    from urllib.parse import quote

    url = parse_url(f"amqp://{quote(user, safe='')}:{quote(password, safe='')}@h:1/")
    assert url.username == user and url.password == password
    auth = url.redacted.split("://", 1)[1].rsplit("@", 1)[0]
    assert auth == f"{quote(user, safe='')}:{REDACTED}"


def test_service_bus_connection_string_is_a_bus_url() -> None:
    url = parse_url(f"Endpoint=sb://ns.example.net:5682/;SharedAccessKeyName=Root;SharedAccessKey={SECRET}")
    assert (url.scheme, url.host, url.port, url.username, url.password) == (
        "servicebus",
        "ns.example.net",
        5682,
        "Root",
        SECRET,
    )
    assert SECRET not in str(url) and SECRET not in repr(url)


def test_malformed_connection_string_error_hides_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        parse_url(f"Endpoint=sb://ns/;SharedAccessKeyName=Root;SharedAccessKey={SECRET};Bogus")
    assert SECRET not in str(info.value)
    assert SECRET not in _scrub(f"Endpoint=sb://ns/;SharedAccessKey={SECRET};X=1")


@pytest.mark.parametrize(
    "url",
    [
        f"redis://:{SECRET}#frag@host/0",
        f"amqp://svc:12345/{SECRET}@host/",
        f"amqp://u:a?{SECRET}@host/",
        f"amqp://u:{SECRET}@host/vhost@x",
        f"amqp://u:{SECRET}@host:bad/",
        f"amqp://u:[{SECRET}@host/",
    ],
)
def test_a_url_two_readers_could_split_differently_is_refused_without_the_password(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_url(url)
    assert "S3cr" not in str(info.value) and "s3cr" not in str(info.value)


def test_at_in_a_password_and_percent_encoded_specials_parse() -> None:
    assert parse_url("amqp://u:p@ss@host/").password == "p@ss"
    assert parse_url("redis://:a%23b%2Fc%3Fd%40e@host/0").password == "a#b/c?d@e"
    assert parse_url("sqlite:///data/a@b.db").path == "/data/a@b.db"  # no host: nothing to confuse


def test_a_url_inside_an_option_value_is_shown_without_its_password() -> None:
    url = parse_url("sqs://eu-west-1?endpoint_url=http%3A%2F%2Fadmin%3Ahunter2%40localhost%3A4566&region=x")
    assert url.options["endpoint_url"] == "http://admin:hunter2@localhost:4566"
    assert "hunter2" not in url.redacted and "localhost" in url.redacted


@pytest.mark.parametrize("name", ["private_key", "conn_str", "connection_string", "credentials", "dsn", "auth_token"])
def test_secret_looking_options_are_redacted(name: str) -> None:
    assert SECRET not in parse_url(f"memory://?{name}={SECRET}").redacted


def test_scrub_fails_closed_on_free_text() -> None:
    text = f"cannot reach amqp://svc:12345/{SECRET}@host:5672/ (SharedAccessKey={SECRET}; password: '{SECRET}')"
    assert SECRET not in _scrub(text) and "host:5672" in _scrub(text)


# Every character that has a meaning somewhere in a URL, and some that have none.
_SPECIAL = st.lists(
    st.sampled_from([*"@/#:?&=;%[]+ \\'\"<>{}|^`!$*,~", "\t", "\n", "é", "€", "😀", "%40", "%2F", "%"]),
    min_size=1,
    max_size=4,
).map("".join)
_TOKENS = ("Qx7Zt", "Wv3Kp", "Jm9Rd")  # each part of the password between special characters holds one


@settings(max_examples=300, deadline=None)  # the first example imports the adapters
@given(
    specials=st.lists(_SPECIAL, min_size=2, max_size=2),
    encode=st.booleans(),
    scheme=st.sampled_from(["amqp", "redis", "kafka", "memory", "servicebus", "connection-string"]),
    user=st.sampled_from(["", "svc", "a:b"]),
    tail=st.sampled_from(["@host/", "@host:5672/vhost", "@host:notaport/", "@[::1]:1/", "@host/?x=1&password=z"]),
)
def test_generated_passwords_never_appear_in_any_output(
    specials: list[str], encode: bool, scheme: str, user: str, tail: str
) -> None:
    """Whatever a password holds, and whether or not it is percent-encoded: the URL is parsed or refused,
    and no part of the password reaches str, repr, bus.url, an error, a log line or the CLI."""
    import contextlib
    import io
    import logging
    from urllib.parse import quote

    import msgbus
    from msgbus.cli import main

    password = _TOKENS[0] + specials[0] + _TOKENS[1] + specials[1] + _TOKENS[2]
    shown_password = quote(password, safe="") if encode else password
    url = f"{scheme}://{quote(user, safe=':') if encode else user}:{shown_password}{tail}"
    if scheme == "connection-string":  # Azure's form: the key is a Name=Value part
        url = f"Endpoint=sb://ns.example/;SharedAccessKeyName={user or 'Root'};SharedAccessKey={shown_password}"
    seen: list[str] = []
    logs = io.StringIO()
    handler = logging.StreamHandler(logs)
    logging.getLogger("msgbus").addHandler(handler)
    try:
        try:
            parsed = parse_url(url)
            seen += [str(parsed), repr(parsed), parsed.redacted]
            bus = msgbus.connect(url)
            seen += [repr(bus), bus.url, repr(bus.adapter)]
        except Exception as exc:
            assert isinstance(exc, msgbus.errors.MsgbusError), f"{type(exc).__name__} for a URL"
            seen += [str(exc), repr(exc)]
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main(["info", url])
            main(["info", url, "--json"])
        seen += [out.getvalue(), err.getvalue()]
    finally:
        logging.getLogger("msgbus").removeHandler(handler)
    seen.append(logs.getvalue())
    text = "\n".join(seen)
    for token in _TOKENS:
        assert token not in text, f"part of the password of {url!r} shown: {text}"
