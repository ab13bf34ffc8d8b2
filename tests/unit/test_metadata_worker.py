"""The event worker's connection handling, its loop run in-process on loopback.

Each test drives real sockets against :class:`vr.http.worker.EventLoop` with
small limits (tests/helpers/loop_server.py). No timing is asserted: "soon" means
within a generous bound, and every wait ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import select
import socket
import struct
import termios
import threading
import time
from typing import Any

import pytest

from tests.helpers.loop_server import (
    HOST,
    WAIT,
    Reader,
    body_for,
    closed_within_wait,
    limits,
    request,
    serving,
    sized_app,
)
from vr.http.parser import MAX_BODY, MAX_HEAD
from vr.http.worker import BUF_LIMIT

# --- pipelining and large responses ----------------------------------------------------


def test_pipelined_requests_split_across_reads_are_answered_in_order() -> None:
    reqs = [request(f"/r{i}?size={100 + i}") for i in range(12)]
    stream = b"".join(reqs)
    cut = sum(len(r) for r in reqs[:5]) + len(reqs[5]) // 2  # inside request 5's head
    with serving(limits()) as srv, srv.connect() as c:
        reader = Reader(c)
        c.sendall(stream[:cut])
        for i in range(5):
            assert reader.response()[2] == body_for(f"/r{i}", 100 + i)
        c.sendall(stream[cut:])
        for i in range(5, 12):
            status, _, body = reader.response()
            assert (status, body) == (200, body_for(f"/r{i}", 100 + i))


def test_large_bodies_reach_a_slow_reader_byte_exact_and_in_order() -> None:
    sizes = [3_000_000, 17, 2_500_001]
    with serving(limits()) as srv, srv.connect(rcvbuf=8192) as c:
        c.sendall(b"".join(request(f"/big{i}?size={n}") for i, n in enumerate(sizes)))
        reader = Reader(c)
        for i, n in enumerate(sizes):
            status, headers, body = reader.response(chunk=4096)
            assert status == 200 and int(headers["content-length"]) == n
            assert body == body_for(f"/big{i}", n)


# --- a client that does not read --------------------------------------------------------


def test_client_that_pipelines_without_reading_is_stalled_and_server_buffers_stay_bounded() -> None:
    """Once its answers back up, the server stops reading: TCP pushes back on the
    client instead of the worker buffering everything it sends."""
    size = 256 * 1024
    one = request(f"/p?size={size}", "X-Pad: " + "p" * 4000)
    block = one * 64  # about 256 KB of requests per send
    cap = 256 * len(block)  # 64 MB: far beyond every socket buffer on the way
    with serving(limits()) as srv, srv.connect(rcvbuf=65536) as c:
        c.setblocking(False)
        sent = 0
        stalled = False
        while sent < cap:
            _, writable, _ = select.select([], [c], [], 2.0)
            if not writable:
                stalled = True
                break
            try:
                sent += c.send(block)
            except BlockingIOError:
                continue
        assert stalled, f"the server read {sent} bytes of requests it could not answer"
        conns = list(srv.loop.conns.values())
        assert len(conns) == 1
        assert len(conns[0].buf) <= BUF_LIMIT
        assert len(conns[0].out) <= size + 1024
        # The connection still works: the answers come, in order, once the client reads.
        c.setblocking(True)
        c.settimeout(10)
        reader = Reader(c)
        for _ in range(3):
            assert reader.response()[2] == body_for("/p", size)


def test_buffer_limit_covers_the_largest_request_allowed() -> None:
    assert BUF_LIMIT >= MAX_HEAD + 4 + MAX_BODY


# --- half-close -------------------------------------------------------------------------


def test_half_closed_client_gets_every_pipelined_answer_before_the_close() -> None:
    sizes = [1_500_000, 10, 5] + [100_000 + i for i in range(60)]
    with serving(limits()) as srv, srv.connect(rcvbuf=16384) as c:
        c.sendall(b"".join(request(f"/h{i}?size={n}") for i, n in enumerate(sizes)))
        c.shutdown(socket.SHUT_WR)
        reader = Reader(c)
        for i, n in enumerate(sizes):
            assert reader.response(chunk=8192)[2] == body_for(f"/h{i}", n)
        assert reader.closed() and not reader.buf


def test_half_close_after_an_incomplete_request_closes_the_connection() -> None:
    with serving(limits()) as srv, srv.connect() as c:
        c.sendall(request("/done") + b"GET /half HTTP/1.1\r\nHo")
        c.shutdown(socket.SHUT_WR)
        reader = Reader(c)
        assert reader.response()[2] == body_for("/done", 16)
        assert reader.closed() and not reader.buf


# --- idle and slow clients --------------------------------------------------------------


def test_connection_that_never_sends_is_closed_after_the_keepalive_time() -> None:
    with serving(limits(keepalive=0.3, timeout=60)) as srv, srv.connect() as c:
        assert closed_within_wait(c)


def test_request_head_trickled_byte_by_byte_is_dropped_after_the_request_time() -> None:
    """Slowloris: every byte arrives before the idle deadline, the head never ends."""
    with serving(limits(keepalive=0.5, request_time=1.0, timeout=60)) as srv, srv.connect() as c:
        dropped = False
        for _ in range(200):  # at most 20 s
            try:
                c.send(b"X")
            except (BrokenPipeError, ConnectionResetError):
                dropped = True
                break
            ready, _, _ = select.select([c], [], [], 0.1)
            if ready:
                dropped = closed_within_wait(c)
                break
        assert dropped


def test_keepalive_time_applies_again_after_a_large_response_was_written() -> None:
    with serving(limits(keepalive=0.3, timeout=60)) as srv, srv.connect(rcvbuf=8192) as c:
        c.sendall(request("/large?size=4000000"))
        reader = Reader(c)
        assert reader.response(chunk=4096)[2] == body_for("/large", 4_000_000)
        assert closed_within_wait(c)


# --- connection limits ------------------------------------------------------------------


def test_one_address_holding_idle_connections_cannot_lock_out_another() -> None:
    with serving(limits(connections=8, per_address=3)) as srv:
        hogs = [srv.connect(source="127.0.0.2") for _ in range(20)]
        try:
            refused = [s for s in hogs if closed_within_wait_or_open(s)]
            assert len(refused) >= 17
            assert srv.conns_from("127.0.0.2") <= 3
            with srv.connect() as c:
                c.sendall(request("/other"))
                assert Reader(c).response()[2] == body_for("/other", 16)
        finally:
            for s in hogs:
                s.close()


def test_at_the_connection_limit_the_oldest_idle_connection_makes_room() -> None:
    with serving(limits(connections=4, per_address=4)) as srv:
        idle = [srv.connect(source=f"127.0.0.{2 + i}") for i in range(4)]
        try:
            for s in idle:  # each one answered once: all four are idle keep-alive conns
                s.sendall(request("/first"))
                assert Reader(s).response()[2] == body_for("/first", 16)
            with srv.connect() as c:
                c.sendall(request("/newcomer"))
                assert Reader(c).response()[2] == body_for("/newcomer", 16)
            assert closed_within_wait(idle[0])
            idle[3].sendall(request("/still-open"))
            assert Reader(idle[3]).response()[2] == body_for("/still-open", 16)
        finally:
            for s in idle:
                s.close()


def closed_within_wait_or_open(sock: socket.socket) -> bool:
    """True if the server closed ``sock`` at once; False if it keeps it open (the
    socket stays silent for a second — only used where closing is immediate)."""
    ready, _, _ = select.select([sock], [], [], 1.0)
    return bool(ready) and closed_within_wait(sock)


# --- Expect, error replies ----------------------------------------------------------------


def test_expect_100_continue_is_answered_before_the_body_is_sent() -> None:
    head = b"POST /up HTTP/1.1\r\nHost: vr\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
    with serving(limits()) as srv, srv.connect() as c:
        c.sendall(head)
        reader = Reader(c)
        while b"\r\n\r\n" not in reader.buf:
            reader._more()
        assert bytes(reader.buf).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        del reader.buf[: len(b"HTTP/1.1 100 Continue\r\n\r\n")]
        c.sendall(b"hello")
        assert reader.response()[:1] == (200,)


def test_unknown_expectation_is_refused_with_417() -> None:
    head = b"POST /up HTTP/1.1\r\nHost: vr\r\nExpect: teapot\r\nContent-Length: 5\r\n\r\n"
    with serving(limits()) as srv, srv.connect() as c:
        c.sendall(head)
        reader = Reader(c)
        assert reader.response()[0] == 417
        assert reader.closed()


def _error_reply_survives_a_client_still_sending(bad: bytes, status: int) -> None:
    """A slow reader pipelines a large GET, then a bad request and more bytes. The
    error reply queues behind the large one; closing with the client's bytes unread
    would reset the connection and throw both away."""
    big = 2_000_000
    stream = request(f"/big?size={big}") + bad + b"j" * 300_000
    with serving(limits(linger=5.0)) as srv, srv.connect(rcvbuf=4096) as c:

        def send() -> None:
            with contextlib.suppress(OSError):  # the server may stop reading: fine
                c.sendall(stream)

        sender = threading.Thread(target=send)
        sender.start()
        try:
            reader = Reader(c)
            assert reader.response(chunk=4096)[2] == body_for("/big", big)
            assert reader.response()[0] == status
            assert reader.closed()
        finally:
            c.shutdown(socket.SHUT_RDWR)
            sender.join(timeout=15)


def test_oversized_head_gets_its_431_though_the_client_keeps_sending() -> None:
    bad = b"GET /a HTTP/1.1\r\nX-Big: " + b"a" * (3 * MAX_HEAD)
    _error_reply_survives_a_client_still_sending(bad, 431)


def test_oversized_body_gets_its_413_though_the_client_keeps_sending() -> None:
    bad = b"POST /a HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (10 * MAX_BODY)
    _error_reply_survives_a_client_still_sending(bad, 413)


def test_over_the_address_limit_with_nothing_idle_the_newcomer_gets_503() -> None:
    # By hand: the loop accepts when told and reads nothing before it starts, so
    # the order of events is fixed, whatever else the machine is doing.
    with serving(limits(per_address=2), start=False) as srv:
        busy = [srv.connect(source="127.0.0.2") for _ in range(2)]
        try:
            srv.accept()
            assert srv.conns_from("127.0.0.2") == 2
            for s in busy:  # a request begun: these connections are not idle
                s.sendall(b"GET /slow HTTP/1.1\r\nHo")
            srv.wait_input()
            with srv.connect(source="127.0.0.2") as extra:
                srv.accept()
                assert Reader(extra).response()[0] == 503
            srv.start()
            busy[0].sendall(b"st: vr\r\n\r\n")
            assert Reader(busy[0]).response()[2] == body_for("/slow", 16)
        finally:
            for s in busy:
                s.close()


@pytest.mark.parametrize(
    ("limit", "newcomer"),
    [({"per_address": 1}, "127.0.0.2"), ({"connections": 1}, "127.0.0.3")],
    ids=["address-limit", "connection-limit"],
)
def test_request_sent_but_not_yet_read_is_answered_not_evicted_as_idle(
    limit: dict[str, int], newcomer: str
) -> None:
    """The connection was idle when last read; its next request is in the kernel
    when a newcomer (from the same address, or any at the worker's connection
    limit) needs room. Closing it would drop a request the client sent; it is
    served, and the newcomer gets the 503."""
    with serving(limits(**limit), start=False) as srv, srv.connect("127.0.0.2") as sent:
        srv.accept()
        sent.sendall(request("/sent"))
        srv.wait_input()
        with srv.connect(source=newcomer) as extra:
            srv.accept()
            assert Reader(extra).response()[0] == 503
        reader = Reader(sent)
        assert reader.response()[2] == body_for("/sent", 16)
        srv.start()
        sent.sendall(request("/again"))
        assert reader.response()[2] == body_for("/again", 16)


def test_idle_connection_whose_client_half_closed_unread_makes_room() -> None:
    with serving(limits(per_address=1), start=False) as srv, srv.connect("127.0.0.2") as gone:
        srv.accept()
        gone.shutdown(socket.SHUT_WR)
        srv.wait_input()
        with srv.connect(source="127.0.0.2") as newcomer:
            srv.accept()
            assert closed_within_wait(gone)
            srv.start()
            newcomer.sendall(request("/newcomer"))
            assert Reader(newcomer).response()[2] == body_for("/newcomer", 16)


# --- requests the parser refuses: answered, and the worker goes on ------------------------


@pytest.mark.parametrize(
    "value",
    [b"\xb2", b"\xb9\xb3", b"9" * 5000, b"1" + b"0" * 5000],
    ids=["superscript-two", "superscripts", "5000-nines", "5001-digits"],
)
def test_content_length_int_cannot_read_gets_400_and_every_other_connection_is_served(
    value: bytes,
) -> None:
    with serving(limits()) as srv, srv.connect() as other, srv.connect() as bad:
        other.sendall(request("/before?size=5"))
        assert Reader(other).response()[2] == body_for("/before", 5)
        bad.sendall(b"POST /a HTTP/1.1\r\nHost: vr\r\nContent-Length: " + value + b"\r\n\r\nab")
        assert Reader(bad).response()[0] == 400
        other.sendall(request("/after?size=5"))
        assert Reader(other).response()[2] == body_for("/after", 5)
        assert srv.thread.is_alive()


def test_differing_content_lengths_are_refused_not_the_last_one_taken() -> None:
    with serving(limits()) as srv, srv.connect() as c:
        c.sendall(b"POST /a HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 5\r\n\r\nabcde")
        assert Reader(c).response()[0] == 400


@pytest.mark.parametrize(
    "raw", [b"GET /a HTTP/1.1\nHost: vr\n\n", b"GET /a HTTP/1.1\r\nHost: vr\n\r\n"]
)
def test_request_with_bare_lf_line_ends_gets_400_instead_of_silence(raw: bytes) -> None:
    with serving(limits()) as srv, srv.connect() as c:
        c.sendall(raw)
        reader = Reader(c)
        assert reader.response()[0] == 400
        assert reader.closed()


# --- kernel memory one address can pin ---------------------------------------------------


def _send_queue(sock: socket.socket) -> int:
    raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    return int(struct.unpack("i", raw)[0])


def test_an_address_reading_none_of_its_answers_pins_at_most_its_send_queue_budget() -> None:
    """16 connections each ask for 1 MiB and read nothing: on loopback the kernel
    would take all 16 MiB into the server's send queues. The worker hands it no more
    than the address's budget (1 MiB, UNSENT_PER_ADDRESS); the rest waits."""
    size = 1 << 20
    calls = []

    def counted(environ: dict[str, Any], start_response: Any) -> Any:
        calls.append(environ["PATH_INFO"])
        return sized_app(environ, start_response)

    with serving(limits(), app=counted) as srv, contextlib.ExitStack() as stack:
        hogs = [stack.enter_context(srv.connect(rcvbuf=4096)) for _ in range(16)]
        for i, c in enumerate(hogs):
            c.sendall(request(f"/hog{i}?size={size}"))
        deadline = time.monotonic() + WAIT
        while len(calls) < len(hogs):  # every request answered (sent or waiting)
            assert time.monotonic() < deadline, f"{len(calls)} of {len(hogs)} answered"
            time.sleep(0.01)
        conns = [c for c in list(srv.loop.conns.values()) if c.addr == HOST]
        assert sum(_send_queue(c.sock) for c in conns) <= 1 << 20
        # another guest is served in full meanwhile
        with srv.connect(source="127.0.0.2") as other:
            other.sendall(request(f"/other?size={size}"))
            status, _, body = Reader(other).response()
            assert (status, body) == (200, body_for("/other", size))
        assert len([c for c in list(srv.loop.conns.values()) if c.addr == HOST]) == 16


def test_connections_waiting_for_their_address_budget_are_served_once_it_reads() -> None:
    """Four connections of one address, 2.4 MB of answers, a 256 KiB budget: all of
    it arrives byte-exact once the clients read (each in its own thread)."""
    size = 600_000
    got: dict[int, list[tuple[int, bytes]]] = {}

    def read(i: int, c: socket.socket) -> None:
        reader = Reader(c)
        got[i] = [reader.response(chunk=4096)[::2] for _ in range(2)]

    with serving(limits(unsent=256 * 1024)) as srv, contextlib.ExitStack() as stack:
        conns = [stack.enter_context(srv.connect(rcvbuf=4096)) for _ in range(4)]
        for i, c in enumerate(conns):
            c.sendall(request(f"/w{i}?size={size}") * 2)
        readers = [threading.Thread(target=read, args=(i, c)) for i, c in enumerate(conns)]
        for t in readers:
            t.start()
        for t in readers:
            t.join(timeout=4 * WAIT)
        for i in range(4):
            assert got.get(i) == [(200, body_for(f"/w{i}", size))] * 2, f"connection {i}"
