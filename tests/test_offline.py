"""The offline guarantee: the suite runs with HF_*_OFFLINE set and a socket guard that refuses non-loopback
connections, in the pytest process and in every Python child process it starts (docs/security.md)."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

import offline_guard
from offline_guard import NetworkBlockedError


# Reserved for documentation (RFC 5737 / RFC 3849) or unroutable: without the guard a connection would hang until
# its time-out, so an immediate NetworkBlockedError can only come from the guard.
UNROUTABLE = [("10.255.255.1", 9), ("192.0.2.1", 443), ("2001:db8::1", 443)]


def _assert_refused_at_once(call, host):
    start = time.perf_counter()
    with pytest.raises(NetworkBlockedError, match=f"Network access to \\[?{host}"):
        call()
    assert time.perf_counter() - start < 1.0


def test_offline_environment_is_read_by_the_hugging_face_libraries():
    import datasets
    import huggingface_hub

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        assert os.environ[name] == "1", name
    # The libraries read the variables at import time, so conftest must set them before the first import.
    # transformers 5 asks huggingface_hub (TRANSFORMERS_OFFLINE is kept for older tools that still read it).
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True and huggingface_hub.is_offline_mode()
    assert datasets.config.HF_HUB_OFFLINE is True and datasets.config.HF_DATASETS_OFFLINE is True


@pytest.mark.parametrize("host,port", UNROUTABLE)
def test_guard_refuses_non_loopback_connections(host, port):
    assert offline_guard.is_installed()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    _assert_refused_at_once(lambda: socket.create_connection((host, port), timeout=10), host)
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        _assert_refused_at_once(lambda: sock.connect((host, port)), host)
        _assert_refused_at_once(lambda: sock.connect_ex((host, port)), host)
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        _assert_refused_at_once(lambda: sock.sendto(b"x", (host, port)), host)


def test_guard_refuses_dns_lookups_of_public_names():
    import urllib.request

    _assert_refused_at_once(lambda: socket.getaddrinfo("huggingface.co", 443), "huggingface.co")
    _assert_refused_at_once(lambda: socket.gethostbyname("huggingface.co"), "huggingface.co")
    # what an HTTP client does: the error names the host and is not turned into a quiet "offline" fallback
    _assert_refused_at_once(lambda: urllib.request.urlopen("https://huggingface.co/api/models", timeout=10),
                            "huggingface.co")


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_guard_allows_loopback(host):
    family = socket.AF_INET6 if host == "::1" else socket.AF_INET
    if family == socket.AF_INET6 and not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        server = socket.create_server((host, 0), family=family)
    except OSError as err:  # e.g. a container without ::1
        pytest.skip(f"cannot listen on {host}: {err}")
    with server:
        port = server.getsockname()[1]
        with socket.create_connection((host, port), timeout=10) as client:
            peer, _ = server.accept()
            with peer:
                client.sendall(b"ping")
                assert peer.recv(4) == b"ping"


def test_guard_allows_unix_sockets(tmp_path):
    path = str(tmp_path / "s")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        server.listen()
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)
            peer, _ = server.accept()
            with peer:
                client.sendall(b"ping")
                assert peer.recv(4) == b"ping"


CHILD = r"""
import json, socket, sys
report = {"installed": "offline_guard" in sys.modules and sys.modules["offline_guard"].is_installed()}
try:
    socket.create_connection(("10.255.255.1", 9), timeout=10)
except Exception as err:
    report["remote"] = [type(err).__name__, str(err)]
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10) as client:
    client.sendall(b"from the child")
print(json.dumps(report))
"""


def test_guard_is_active_in_child_python_processes(tmp_path):
    """A child started the way tests start examples/*.py and `accelerate launch` (inheriting the environment) gets
    the guard from the sitecustomize on PYTHONPATH, and can still talk to the parent over loopback."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(60)
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(server.getsockname()[1])], cwd=tmp_path,
                                 env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        peer, _ = server.accept()
        with peer:
            received = peer.recv(64)
        stdout, stderr = child.communicate(timeout=60)
    assert child.returncode == 0, stderr
    assert received == b"from the child"
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["installed"] is True
    assert report["remote"][0] == "NetworkBlockedError" and "10.255.255.1:9" in report["remote"][1]
