"""Refuse network connections from this Python process, while allowing loopback and Unix sockets.

The test suite must pass on a machine without network access. `HF_HUB_OFFLINE` and friends keep the Hugging Face
clients from trying; this guard makes any other attempt fail at once and loudly, naming the host, instead of hanging
on a DNS or TCP time-out (or passing only because the CI machine happens to be online).

Loopback (127.0.0.0/8, ::1, "localhost") and AF_UNIX stay allowed: multi-process tests rendezvous over localhost.
The guard patches Python's `socket` module, which every Python HTTP client goes through (http.client, urllib3,
requests, httpx, asyncio). Native code that opens its own sockets (gloo, the c10d TCPStore) is not covered.

`install()` is called by tests/conftest.py for the pytest process and by `sitecustomize.py` (next to this file) in
every child Python process whose PYTHONPATH contains this folder, which conftest arranges for the whole session.
"""

import ipaddress
import socket


LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
_originals = {}


class NetworkBlockedError(RuntimeError):
    """A non-loopback network access was attempted while the offline guard is installed.

    A RuntimeError rather than an OSError, so that code which quietly falls back on a network error (retries,
    "offline mode" heuristics) does not swallow it: any attempt is a bug in an offline test suite.
    """


def is_local(host) -> bool:
    """Whether `host` (a name or an address, as given to connect/getaddrinfo) can only mean this machine."""
    if host is None or host in ("", b""):  # getaddrinfo(None, port), connect(("", port)): this machine
        return True
    if isinstance(host, (bytes, bytearray)):
        host = bytes(host).decode("ascii", "replace")
    host = host.strip().strip("[]").split("%", 1)[0].rstrip(".").lower()  # "[::1]", "fe80::1%eth0", "localhost."
    if host in LOOPBACK_NAMES or host.endswith(".localhost") or host == _originals.get("hostname"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name that would need a DNS lookup
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    # connecting to the unspecified address (0.0.0.0, ::) reaches this machine
    return address.is_loopback or address.is_unspecified


def _refuse(what, host, port=None):
    host = f"[{host}]" if ":" in str(host) else host  # an IPv6 address
    target = f"{host}:{port}" if port is not None else f"{host}"
    raise NetworkBlockedError(
        f"Network access to {target!s} ({what}) refused: the test suite runs offline and allows only loopback "
        f"(127.0.0.1, ::1, localhost) and Unix sockets. Use a local fixture instead of a remote resource."
    )


def _check_address(sock, address, what):
    if sock.family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple) and not is_local(address[0]):
        _refuse(what, address[0], address[1] if len(address) > 1 else None)


def _connect(self, address):
    _check_address(self, address, "connect")
    return _originals["connect"](self, address)


def _connect_ex(self, address):
    _check_address(self, address, "connect_ex")
    return _originals["connect_ex"](self, address)


def _sendto(self, data, *flags_and_address):
    _check_address(self, flags_and_address[-1], "sendto")
    return _originals["sendto"](self, data, *flags_and_address)


def _getaddrinfo(host, *args, **kwargs):
    # numeric addresses need no lookup (connect checks them); any other name would be sent to a DNS server
    if not is_local(host) and not _is_numeric(host):
        _refuse("DNS lookup", host, args[0] if args else kwargs.get("port"))
    return _originals["getaddrinfo"](host, *args, **kwargs)


def _gethostbyname(host):
    if not is_local(host) and not _is_numeric(host):
        _refuse("DNS lookup", host)
    return _originals["gethostbyname"](host)


def _gethostbyname_ex(host):
    if not is_local(host) and not _is_numeric(host):
        _refuse("DNS lookup", host)
    return _originals["gethostbyname_ex"](host)


def _is_numeric(host) -> bool:
    if isinstance(host, (bytes, bytearray)):
        host = bytes(host).decode("ascii", "replace")
    try:
        ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return False
    return True


def install() -> None:
    """Patch the socket module of this process (idempotent)."""
    if is_installed():
        return
    # This machine's own name resolves locally (hosts file) and launchers such as torchrun look it up.
    _originals["hostname"] = socket.gethostname().lower()
    _originals.update(connect=socket.socket.connect, connect_ex=socket.socket.connect_ex,
                      sendto=socket.socket.sendto, getaddrinfo=socket.getaddrinfo,
                      gethostbyname=socket.gethostbyname, gethostbyname_ex=socket.gethostbyname_ex)
    socket.socket.connect, socket.socket.connect_ex, socket.socket.sendto = _connect, _connect_ex, _sendto
    socket.getaddrinfo, socket.gethostbyname, socket.gethostbyname_ex = _getaddrinfo, _gethostbyname, _gethostbyname_ex


def uninstall() -> None:
    if not is_installed():
        return
    socket.socket.connect, socket.socket.connect_ex = _originals["connect"], _originals["connect_ex"]
    socket.socket.sendto = _originals["sendto"]
    socket.getaddrinfo = _originals["getaddrinfo"]
    socket.gethostbyname, socket.gethostbyname_ex = _originals["gethostbyname"], _originals["gethostbyname_ex"]
    _originals.clear()


def is_installed() -> bool:
    return socket.socket.connect is _connect
