#!/usr/bin/env python3
"""Readiness probes for the local stack (stdlib only, one real request each, no JVM start).

    probe.py kafka HOST:PORT      Kafka Metadata request (v4): ready when a broker is listed and a
                                  controller is known; prints "cluster=<id> brokers=<n>"
    probe.py cql HOST:PORT [CQL]  CQL native protocol v4: STARTUP, then a query (default
                                  SELECT release_version FROM system.local); prints the first row
    probe.py http URL             GET, ready on 200
    probe.py listening HOST:PORT  exit 0 when something accepts connections there
    probe.py uuid                 a new Kafka cluster id (16 random bytes, base64url, unpadded)

Exit 0 when ready, 1 otherwise (the reason on stderr). Each probe gives up after --timeout seconds
(default 3).
"""
import base64
import socket
import struct
import sys
import urllib.request
import uuid


def hostport(s):
    host, _, port = s.rpartition(":")
    return host or "127.0.0.1", int(port)


def recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed by peer")
        buf += chunk
    return bytes(buf)


# ---- Kafka ------------------------------------------------------------------------------------

def kafka_metadata(addr, timeout):
    # Request header v1: api_key (Metadata=3), api_version, correlation_id, client_id.
    # Metadata v4 body: topics = null (all), allow_auto_topic_creation = false.
    client = b"streamoasis-stack-probe"
    body = struct.pack(">hhih", 3, 4, 7, len(client)) + client + struct.pack(">ib", -1, 0)
    with socket.create_connection(hostport(addr), timeout=timeout) as s:
        s.settimeout(timeout)
        s.sendall(struct.pack(">i", len(body)) + body)
        (size,) = struct.unpack(">i", recv_exact(s, 4))
        resp = recv_exact(s, size)
    pos = 0

    def take(fmt):
        nonlocal pos
        vals = struct.unpack_from(fmt, resp, pos)
        pos += struct.calcsize(fmt)
        return vals if len(vals) > 1 else vals[0]

    def string():
        nonlocal pos
        n = take(">h")
        if n < 0:
            return None
        v = resp[pos:pos + n].decode()
        pos += n
        return v

    corr = take(">i")
    if corr != 7:
        raise ValueError(f"unexpected correlation id {corr}")
    take(">i")  # throttle_time_ms
    brokers = []
    for _ in range(take(">i")):
        node = take(">i")
        host = string()
        port = take(">i")
        string()  # rack
        brokers.append((node, host, port))
    cluster_id = string()
    controller = take(">i")
    if not brokers:
        raise ValueError("metadata lists no broker yet")
    if controller < 0:
        raise ValueError("no active controller yet")
    return f"cluster={cluster_id} brokers={len(brokers)} controller={controller}"


# ---- CQL --------------------------------------------------------------------------------------

def cql_query(addr, query, timeout):
    with socket.create_connection(hostport(addr), timeout=timeout) as s:
        s.settimeout(timeout)
        stream = 0

        def request(opcode, body):
            nonlocal stream
            stream += 1
            s.sendall(struct.pack(">BBhBi", 0x04, 0, stream, opcode, len(body)) + body)
            while True:
                version, _flags, rstream, ropcode, length = struct.unpack(">BBhBi", recv_exact(s, 9))
                payload = recv_exact(s, length)
                if rstream == stream:  # skip events (stream -1)
                    break
            if ropcode == 0x00:  # ERROR: code, message
                code, n = struct.unpack_from(">ih", payload)
                raise RuntimeError(f"CQL error 0x{code:04x}: {payload[6:6 + n].decode(errors='replace')}")
            return ropcode, payload

        def cstring(v):
            b = v.encode()
            return struct.pack(">H", len(b)) + b

        opcode, _ = request(0x01, struct.pack(">H", 1) + cstring("CQL_VERSION") + cstring("3.0.0"))
        if opcode == 0x03:
            raise RuntimeError("server asks for authentication")
        if opcode != 0x02:
            raise RuntimeError(f"unexpected STARTUP answer opcode 0x{opcode:02x}")
        q = query.encode()
        opcode, p = request(0x07, struct.pack(">i", len(q)) + q + struct.pack(">HB", 0x0001, 0))
        if opcode != 0x08:
            raise RuntimeError(f"unexpected QUERY answer opcode 0x{opcode:02x}")
        pos = 0

        def take(fmt):
            nonlocal pos
            vals = struct.unpack_from(fmt, p, pos)
            pos += struct.calcsize(fmt)
            return vals if len(vals) > 1 else vals[0]

        def skip_string():
            nonlocal pos
            pos += 2 + struct.unpack_from(">H", p, pos)[0]

        def skip_type():
            tid = take(">H")
            if tid == 0x0000:
                skip_string()
            elif tid in (0x0020, 0x0022):  # list, set
                skip_type()
            elif tid == 0x0021:  # map
                skip_type()
                skip_type()
            elif tid == 0x0030:  # UDT
                skip_string()
                skip_string()
                for _ in range(take(">H")):
                    skip_string()
                    skip_type()
            elif tid == 0x0031:  # tuple
                for _ in range(take(">H")):
                    skip_type()

        kind = take(">i")
        if kind != 2:  # not Rows (e.g. Void for DDL): the query ran
            return f"ok (result kind {kind})"
        flags, ncols = take(">ii")
        if flags & 0x0002:  # has_more_pages: paging state
            pos += 4 + max(0, struct.unpack_from(">i", p, pos)[0])
        if not flags & 0x0004:  # metadata present
            if flags & 0x0001:  # global table spec
                skip_string()
                skip_string()
            for _ in range(ncols):
                if not flags & 0x0001:
                    skip_string()
                    skip_string()
                skip_string()
                skip_type()
        nrows = take(">i")
        if nrows == 0:
            return "no rows"
        cells = []
        for _ in range(ncols):
            n = take(">i")
            cells.append(None if n < 0 else p[pos:pos + n].decode(errors="replace"))
            pos += max(n, 0)
        return " ".join(str(c) for c in cells)


# ---- main -------------------------------------------------------------------------------------

def main(argv):
    timeout = 3.0
    if "--timeout" in argv:
        i = argv.index("--timeout")
        timeout = float(argv[i + 1])
        del argv[i:i + 2]
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = argv[0], argv[1:]
    try:
        if cmd == "kafka":
            print(kafka_metadata(args[0], timeout))
        elif cmd == "cql":
            query = args[1] if len(args) > 1 else "SELECT release_version FROM system.local"
            print(cql_query(args[0], query, timeout))
        elif cmd == "http":
            with urllib.request.urlopen(args[0], timeout=timeout) as r:
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}")
            print("HTTP 200")
        elif cmd == "listening":
            with socket.create_connection(hostport(args[0]), timeout=timeout):
                pass
        elif cmd == "uuid":
            cid = "-"
            while cid.startswith("-"):  # as Kafka's Uuid.randomUuid: no leading dash
                cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
            print(cid)
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except (OSError, ValueError, RuntimeError, struct.error, IndexError) as e:
        print(f"{cmd}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
