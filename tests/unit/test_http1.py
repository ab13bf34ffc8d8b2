"""HTTP/1.x parsing and response framing of the event worker (pure parts)."""

from __future__ import annotations

import pytest

from vr.http.parser import (
    CONTINUE,
    MAX_BODY,
    MAX_HEAD,
    BadRequest,
    build_environ,
    parse_request,
    render_response,
    split_target,
)


def test_incomplete_head_needs_more_bytes() -> None:
    assert parse_request(b"GET /latest/instance-id HTTP/1.1\r\nHost: x\r\n") is None


def test_http11_keeps_alive_unless_told_to_close() -> None:
    req, used = parse_request(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\n")  # type: ignore[misc]
    assert (req.method, req.target, req.keep_alive) == ("GET", "/a", True)
    assert used == len(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    req, _ = parse_request(b"GET /a HTTP/1.1\r\nConnection: Close\r\n\r\n")  # type: ignore[misc]
    assert req.keep_alive is False


def test_http10_closes_unless_asked_to_keep_alive() -> None:
    req, _ = parse_request(b"GET /a HTTP/1.0\r\n\r\n")  # type: ignore[misc]
    assert req.keep_alive is False
    req, _ = parse_request(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")  # type: ignore[misc]
    assert req.keep_alive is True


def test_body_is_read_by_content_length_before_the_request_is_complete() -> None:
    head = b"POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\n"
    assert parse_request(head + b"abc") is None
    req, used = parse_request(head + b"abcdeGET")  # type: ignore[misc]
    assert req.body == b"abcde" and used == len(head) + 5


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /a\r\n\r\n", 400),
        (b"GET  /a HTTP/1.1\r\n\r\n", 400),
        (b"G(T /a HTTP/1.1\r\n\r\n", 400),
        (b"GET /a HTTP/2.0\r\n\r\n", 505),
        (b"GET /a FTP/1.0\r\n\r\n", 400),
        (b"GET /a HTTP/1.1\r\nBad Header: x\r\n\r\n", 400),
        (b"GET /a HTTP/1.1\r\n folded\r\n\r\n", 400),
        (b"GET /a HTTP/1.1\r\nX: a\x00b\r\n\r\n", 400),
        (b"GET /a HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"GET /a HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        # RFC 9112 6.3: differing values are refused, also when the first one is 0
        (b"GET /a HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 5\r\n\r\nabcde", 400),
        # digits str.isdigit() accepts but int() does not, and numbers of any length
        (b"POST /a HTTP/1.1\r\nContent-Length: \xb2\r\n\r\nab", 400),
        (b"POST /a HTTP/1.1\r\nContent-Length: \xb9\xb3\r\n\r\nab", 400),
        (b"POST /a HTTP/1.1\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", 400),
        (b"POST /a HTTP/1.1\r\nContent-Length: 1" + b"0" * 5000 + b"\r\n\r\n", 400),
        # bare LF line ends: refused at once, not waited on
        (b"GET /a HTTP/1.1\nHost: x\n\n", 400),
        (b"GET /a HTTP/1.1\r\nHost: x\n\r\n", 400),
        (b"GET /a HTTP/1.1\nHost: x\n", 400),
        (b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
        (b"POST /a HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1), 413),
        (b"GET /a HTTP/1.1\r\nX: " + b"a" * MAX_HEAD + b"\r\n\r\n", 431),
        (b"GET /a HTTP/1.1\r\nX: " + b"a" * (MAX_HEAD + 1), 431),
    ],
)
def test_malformed_requests_are_refused_with_a_status(raw: bytes, status: int) -> None:
    with pytest.raises(BadRequest) as exc:
        parse_request(raw)
    assert exc.value.status == status


def test_target_is_split_and_percent_decoded() -> None:
    assert split_target("/latest/meta-data/instance-id?x=1") == (
        "/latest/meta-data/instance-id",
        "x=1",
    )
    assert split_target("/latest/%75ser-data") == ("/latest/user-data", "")
    assert split_target("http://169.254.169.254/latest/x?q") == ("/latest/x", "q")


def test_environ_names_the_tcp_peer_and_merges_header_spellings() -> None:
    req, _ = parse_request(  # type: ignore[misc]
        b"GET /a?b HTTP/1.1\r\nX_Forwarded_For: 1.2.3.4\r\nX-Forwarded-For: 5.6.7.8\r\n\r\n"
    )
    env = build_environ(req, ("10.1.1.5", 40000), ("10.1.1.1", 80), None)
    assert env["REMOTE_ADDR"] == "10.1.1.5"
    assert env["PATH_INFO"] == "/a" and env["QUERY_STRING"] == "b"
    assert env["HTTP_X_FORWARDED_FOR"] == "1.2.3.4,5.6.7.8"


def test_response_framing() -> None:
    out = render_response(
        "200 OK", [("Content-Type", "text/plain")], b"v", True, "HTTP/1.0", "D"
    ).decode()
    assert out.startswith("HTTP/1.1 200 OK\r\nDate: D\r\n")
    assert "Content-Length: 1\r\n" in out and "Connection: keep-alive\r\n" in out
    assert out.endswith("\r\n\r\nv")
    closing = render_response(
        "404 Not Found", [("Content-Length", "0")], b"", False, "HTTP/1.1", "D"
    )
    assert b"Connection: close\r\n" in closing and closing.count(b"Content-Length") == 1


def test_expect_100_continue_asks_for_the_interim_reply_until_body_bytes_arrive() -> None:
    head = b"POST /a HTTP/1.1\r\nExpect: 100-Continue\r\nContent-Length: 3\r\n\r\n"
    assert parse_request(head) == CONTINUE
    assert parse_request(head + b"a") is None
    req, used = parse_request(head + b"abc")  # type: ignore[misc]
    assert req.body == b"abc" and used == len(head) + 3
    assert parse_request(head.replace(b"3", b"0")) is not None  # no body: no interim reply


def test_expectations_other_than_100_continue_are_refused_in_http11_only() -> None:
    with pytest.raises(BadRequest) as exc:
        parse_request(b"POST /a HTTP/1.1\r\nExpect: teapot\r\nContent-Length: 3\r\n\r\n")
    assert exc.value.status == 417
    http10 = b"POST /a HTTP/1.0\r\nExpect: teapot\r\nContent-Length: 3\r\n\r\n"
    assert parse_request(http10) is None


def test_content_length_with_thousands_of_leading_zeros_is_its_value() -> None:
    head = b"POST /a HTTP/1.1\r\nContent-Length: " + b"0" * 5000 + b"3\r\n\r\n"
    req, used = parse_request(head + b"abcGET")  # type: ignore[misc]
    assert req.body == b"abc" and used == len(head) + 3


def test_equal_repeated_content_length_is_refused_too() -> None:
    """RFC 9110 8.6 lets a recipient refuse it; llhttp does, and so do we."""
    with pytest.raises(BadRequest) as exc:
        parse_request(b"POST /a HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx")
    assert exc.value.status == 400


def test_a_parser_fed_in_pieces_gives_each_pipelined_request_once() -> None:
    from vr.http.parser import RequestParser

    stream = (
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /b HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi"
        b"GET /c HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    )
    parser = RequestParser()
    buf = bytearray()
    got = []
    for byte in stream:
        buf.append(byte)
        parsed = parser.parse(buf)
        if parsed is not None:
            assert parsed != CONTINUE
            req, used = parsed  # type: ignore[misc]
            got.append((req.method, req.target, req.body, req.keep_alive))
            del buf[:used]
    assert got == [("GET", "/a", b"", True), ("POST", "/b", b"hi", True), ("GET", "/c", b"", True)]
    assert not buf
