#!/usr/bin/env python3
"""Readiness probes for the local stack (stdlib only, one real request each, no JVM start).

    probe.py kafka HOST:PORT      Kafka Metadata request (v4): ready when a broker is listed and a
                                  controller is known; prints "cluster=<id> brokers=<n>"
    probe.py kafka-acls HOST:PORT FILE
                                  create the ACLs listed in FILE (CreateAcls v1; one per line:
                                  PRINCIPAL RESOURCE_TYPE PATTERN NAME OPERATION, '#' comments)
    probe.py cql HOST:PORT [CQL...|@FILE]
                                  CQL native protocol v4: STARTUP, then each query in turn (default
                                  SELECT release_version FROM system.local; @FILE: one a line); prints
                                  the last one's first row
    probe.py http URL             GET, ready on 200
    probe.py listening HOST:PORT  exit 0 when something accepts connections there
    probe.py uuid                 a new Kafka cluster id (16 random bytes, base64url, unpadded)

Exit 0 when ready, 1 otherwise (the reason on stderr). Each probe gives up after --timeout seconds
(default 3).

Secured services (scripts/stack up --secure): --cafile PEM turns TLS on (the server certificate is
verified against it, host name included); --user NAME with --password-file FILE authenticates
(Kafka: SASL SCRAM-SHA-512; CQL: PasswordAuthenticator). Passwords are read from files only, so
they never show in a process list.
"""
import base64
import hashlib
import hmac
import os
import socket
import ssl
import struct
import sys
import urllib.request
import uuid

# Set from the command line: TLS context (None = plaintext) and credentials (None = anonymous).
TLS = None
CREDENTIALS = None


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


def connect(addr, timeout):
    host, port = hostport(addr)
    s = socket.create_connection((host, port), timeout=timeout)
    s.settimeout(timeout)
    if TLS is not None:
        s = TLS.wrap_socket(s, server_hostname=host)
    return s


# ---- Kafka ------------------------------------------------------------------------------------

class Kafka:
    """One connection; requests with header v1 (api_key, api_version, correlation_id, client_id)."""

    CLIENT = b"streamoasis-stack-probe"

    def __init__(self, addr, timeout):
        self.sock = connect(addr, timeout)
        self.corr = 0
        if CREDENTIALS is not None:
            self.scram_sha512(*CREDENTIALS)

    def close(self):
        self.sock.close()

    def request(self, api_key, version, body):
        self.corr += 1
        msg = struct.pack(">hhih", api_key, version, self.corr, len(self.CLIENT)) + self.CLIENT + body
        self.sock.sendall(struct.pack(">i", len(msg)) + msg)
        (size,) = struct.unpack(">i", recv_exact(self.sock, 4))
        resp = recv_exact(self.sock, size)
        (corr,) = struct.unpack_from(">i", resp)
        if corr != self.corr:
            raise ValueError(f"unexpected correlation id {corr}")
        return resp[4:]

    def scram_sha512(self, user, password):
        # SaslHandshake v1, then SaslAuthenticate v1 twice (RFC 5802 client-first, client-final).
        mech = b"SCRAM-SHA-512"
        r = self.request(17, 1, struct.pack(">h", len(mech)) + mech)
        (err,) = struct.unpack_from(">h", r)
        if err:
            raise RuntimeError(f"SASL handshake refused (error {err}): the listener does not offer SCRAM-SHA-512")

        def authenticate(data):
            r = self.request(36, 1, struct.pack(">i", len(data)) + data)
            err, n = struct.unpack_from(">hh", r)
            msg = r[4:4 + max(n, 0)].decode(errors="replace")
            pos = 4 + max(n, 0)
            if err:
                raise RuntimeError(f"SASL authentication failed for {user}: {msg or err}")
            (blen,) = struct.unpack_from(">i", r, pos)
            return r[pos + 4:pos + 4 + max(blen, 0)]

        nonce = base64.b64encode(os.urandom(18)).decode()
        first_bare = f"n={user},r={nonce}"
        server_first = authenticate(("n,," + first_bare).encode()).decode()
        fields = dict(kv.split("=", 1) for kv in server_first.split(","))
        if not fields["r"].startswith(nonce):
            raise RuntimeError("SCRAM: server nonce does not extend ours")
        salted = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(fields["s"]), int(fields["i"]))
        client_key = hmac.new(salted, b"Client Key", hashlib.sha512).digest()
        stored_key = hashlib.sha512(client_key).digest()
        final_bare = f"c=biws,r={fields['r']}"
        auth_message = f"{first_bare},{server_first},{final_bare}".encode()
        signature = hmac.new(stored_key, auth_message, hashlib.sha512).digest()
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        server_final = authenticate(f"{final_bare},p={base64.b64encode(proof).decode()}".encode()).decode()
        server_key = hmac.new(salted, b"Server Key", hashlib.sha512).digest()
        expected = base64.b64encode(hmac.new(server_key, auth_message, hashlib.sha512).digest()).decode()
        if server_final != f"v={expected}":
            raise RuntimeError("SCRAM: the server's signature does not match")


def kafka_metadata(addr, timeout):
    # Metadata v4 body: topics = null (all), allow_auto_topic_creation = false.
    k = Kafka(addr, timeout)
    try:
        resp = k.request(3, 4, struct.pack(">ib", -1, 0))
    finally:
        k.close()
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


ACL_RESOURCES = {"topic": 2, "group": 3, "cluster": 4, "transactional_id": 5}
ACL_PATTERNS = {"literal": 3, "prefixed": 4}
ACL_OPERATIONS = {"all": 2, "read": 3, "write": 4, "create": 5, "delete": 6, "alter": 7, "describe": 8,
                  "cluster_action": 9, "describe_configs": 10, "alter_configs": 11, "idempotent_write": 12}


def kafka_create_acls(addr, path, timeout):
    def kstr(v):
        b = v.encode()
        return struct.pack(">h", len(b)) + b

    entries = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            try:
                principal, rtype, pattern, name, op = line.split()
                entries.append(struct.pack(">b", ACL_RESOURCES[rtype]) + kstr(name) + struct.pack(">b", ACL_PATTERNS[pattern])
                               + kstr(principal) + kstr("*") + struct.pack(">bb", ACL_OPERATIONS[op], 3))
            except (ValueError, KeyError) as e:
                raise ValueError(f"{path}:{n}: expected PRINCIPAL RESOURCE_TYPE PATTERN NAME OPERATION ({e})")
    k = Kafka(addr, timeout)
    try:
        r = k.request(30, 1, struct.pack(">i", len(entries)) + b"".join(entries))
    finally:
        k.close()
    (count,) = struct.unpack_from(">i", r, 4)
    pos = 8
    for _ in range(count):
        err, n = struct.unpack_from(">hh", r, pos)
        pos += 4 + max(n, 0)
        if err:
            raise RuntimeError(f"CreateAcls failed: error {err} {r[pos - max(n, 0):pos].decode(errors='replace')}")
    return f"{count} ACLs in place"


# ---- CQL --------------------------------------------------------------------------------------

def cql_query(addr, queries, timeout):
    with connect(addr, timeout) as s:
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
        if opcode == 0x03:  # AUTHENTICATE: SASL PLAIN in an AUTH_RESPONSE
            if CREDENTIALS is None:
                raise RuntimeError("server asks for authentication (pass --user and --password-file)")
            token = b"\0" + CREDENTIALS[0].encode() + b"\0" + CREDENTIALS[1].encode()
            opcode, _ = request(0x0F, struct.pack(">i", len(token)) + token)
            if opcode != 0x10:
                raise RuntimeError(f"unexpected AUTH_RESPONSE answer opcode 0x{opcode:02x}")
        elif opcode != 0x02:
            raise RuntimeError(f"unexpected STARTUP answer opcode 0x{opcode:02x}")
        for query in queries:
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
    global TLS, CREDENTIALS
    opts = {}
    for opt in ("--timeout", "--cafile", "--user", "--password-file"):
        if opt in argv:
            i = argv.index(opt)
            opts[opt] = argv[i + 1]
            del argv[i:i + 2]
    timeout = float(opts.get("--timeout", 3.0))
    if "--cafile" in opts:
        TLS = ssl.create_default_context(cafile=opts["--cafile"])
    if "--user" in opts:
        with open(opts["--password-file"]) as f:
            CREDENTIALS = (opts["--user"], f.read().strip())
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = argv[0], argv[1:]
    try:
        if cmd == "kafka":
            print(kafka_metadata(args[0], timeout))
        elif cmd == "kafka-acls":
            print(kafka_create_acls(args[0], args[1], timeout))
        elif cmd == "cql":
            queries = args[1:] or ["SELECT release_version FROM system.local"]
            if len(queries) == 1 and queries[0].startswith("@"):  # one statement a line (keeps secrets off argv)
                with open(queries[0][1:]) as f:
                    queries = [q.strip() for q in f if q.strip()]
            print(cql_query(args[0], queries, timeout))
        elif cmd == "http":
            with urllib.request.urlopen(args[0], timeout=timeout, context=TLS) as r:
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
    except (OSError, ValueError, RuntimeError, struct.error, IndexError, KeyError) as e:
        print(f"{cmd}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
