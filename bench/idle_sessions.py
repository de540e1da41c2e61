#!/usr/bin/env python3
"""Idle-session memory and message round trip for a running Halyard (a first, rough probe; the
full load tool comes with the performance work).

Opens N authenticated, bound sessions (plain c2s with require_tls = false, or STARTTLS),
reads the server's RSS from /proc before and after, and measures a message round trip between
two sessions. Accounts u0..u{N-1} with password "pw" must exist.

Needs `pip install scramp`.

usage: idle_sessions.py --pid PID --port PORT [--tls] [-n N] [--domain localhost]
"""
import argparse, asyncio, base64, ssl, statistics, time

from scramp import ScramClient  # pip install scramp


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


HEADER = ("<?xml version='1.0'?><stream:stream to='{d}' version='1.0' xmlns='jabber:client' "
          "xmlns:stream='http://etherx.jabber.org/streams'>")


async def read_until(r, token):
    buf = b""
    while token not in buf:
        chunk = await r.read(65536)
        if not chunk:
            raise RuntimeError(f"closed waiting for {token!r}: {buf[-200:]!r}")
        buf += chunk
    return buf


async def login(host, port, user, domain, use_tls):
    r, w = await asyncio.open_connection(host, port)
    w.write(HEADER.format(d=domain).encode())
    await read_until(r, b"</features>")
    if use_tls:
        w.write(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        await read_until(r, b"<proceed")
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        await w.start_tls(ctx, server_hostname=domain)
        w.write(HEADER.format(d=domain).encode())
        await read_until(r, b"</features>")
    # SCRAM-SHA-256 without channel binding: offered on plain and TLS streams alike.
    c = ScramClient(["SCRAM-SHA-256"], user, "pw")
    first = base64.b64encode(c.get_client_first().encode()).decode()
    w.write(f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-256'>{first}</auth>".encode())
    ch = await read_until(r, b"</challenge>")
    ch = ch.split(b">", 1)[1].split(b"<", 1)[0]
    c.set_server_first(base64.b64decode(ch).decode())
    fin = base64.b64encode(c.get_client_final().encode()).decode()
    w.write(f"<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{fin}</response>".encode())
    await read_until(r, b"<success")
    w.write(HEADER.format(d=domain).encode())
    await read_until(r, b"</features>")
    w.write(b"<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>r</resource></bind></iq>")
    await read_until(r, b"</iq>")
    w.write(b"<presence/>")
    await asyncio.sleep(0)
    return r, w


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--domain", default="localhost")
    ap.add_argument("--tls", action="store_true")
    ap.add_argument("-n", type=int, default=1000)
    a = ap.parse_args()
    # Warm-up: log every account in and out once, so the store's page cache already holds the
    # accounts (a cache, not a per-session cost) when the "before" figure is taken.
    for i in range(2, a.n, 200):
        batch = [await login(a.host, a.port, f"u{j}", a.domain, a.tls) for j in range(i, min(i + 200, a.n))]
        for _, w in batch:
            w.close()
    await asyncio.sleep(1)
    # Two sessions first, so per-process one-time allocations are not counted per session.
    s0 = await login(a.host, a.port, "u0", a.domain, a.tls)
    s1 = await login(a.host, a.port, "u1", a.domain, a.tls)
    await asyncio.sleep(1)
    before = rss_kib(a.pid)
    conns = []
    for i in range(2, a.n):
        conns.append(await login(a.host, a.port, f"u{i}", a.domain, a.tls))
    await asyncio.sleep(2)
    after = rss_kib(a.pid)
    n = a.n - 2
    print(f"sessions={n} tls={a.tls} rss_before={before} KiB rss_after={after} KiB "
          f"per_session={(after - before) / n:.1f} KiB")
    # Round trip: u0 -> u1 -> u0 (u1 echoes by replying), 200 samples.
    (r0, w0), (r1, w1) = s0, s1
    await asyncio.sleep(0.5)
    for rr in (r0, r1):  # drain presence
        try:
            await asyncio.wait_for(rr.read(65536), 0.3)
        except asyncio.TimeoutError:
            pass
    rtts = []
    for i in range(200):
        t = time.perf_counter()
        w0.write(f"<message to='u1@{a.domain}/r' type='chat' id='m{i}'><body>{i}</body></message>".encode())
        await read_until(r1, f"id='m{i}'".encode())
        w1.write(f"<message to='u0@{a.domain}/r' type='chat' id='e{i}'><body>{i}</body></message>".encode())
        await read_until(r0, f"id='e{i}'".encode())
        rtts.append((time.perf_counter() - t) * 1000)
    rtts.sort()
    print(f"round trip (two hops through the server, incl. this Python client): "
          f"median={statistics.median(rtts):.3f} ms p90={rtts[int(len(rtts)*0.9)]:.3f} ms")


asyncio.run(main())
