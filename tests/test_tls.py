"""https backends: verified against a private CA given per backend (`tls_ca_file`), refused
without it (the system's CAs do not know a private CA), and reachable without verification
only when `tls_verify = false` says so. The CA and certificate are made by `trustme`."""

from __future__ import annotations

import ssl
import time
from pathlib import Path

import httpx
import trustme

from tests.conftest import Launcher, backend
from tests.probes import sdk
from tests.processes import Server

MSG = [{"role": "user", "content": "hi"}]


def tls_upstream(launch: Launcher, tmp_path: Path) -> tuple[str, Path]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca_file, cert_file, key_file = (tmp_path / n for n in ("ca.pem", "cert.pem", "key.pem"))
    ca.cert_pem.write_to_path(str(ca_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    up: Server = launch.upstream("tls", wait=False, ssl_certfile=cert_file,
                                 ssl_keyfile=key_file)
    url = f"https://127.0.0.1:{up.port}"
    context = ssl.create_default_context(cafile=str(ca_file))
    deadline = time.monotonic() + 20
    while True:
        try:
            httpx.get(url + "/health", verify=context, timeout=1)
            return url, ca_file
        except httpx.TransportError:
            assert time.monotonic() < deadline, up.output()
            time.sleep(0.05)


def test_an_https_backend_with_a_private_ca(launch: Launcher, tmp_path: Path) -> None:
    url, ca_file = tls_upstream(launch, tmp_path)
    trusted = launch.proxy([backend("tls", url, models=["m"], tls_ca_file=str(ca_file))])
    raw = sdk(trusted).chat.completions.with_raw_response.create(
        model="m", messages=MSG, max_tokens=5, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert raw.headers["x-sluiceway-backend"] == "tls" and text.count("tok") == 5
    state = httpx.get(trusted.url + "/admin/backends").json()["backends"][0]
    assert state["health"] == "healthy"  # the monitor trusts the same CA

    # the system's CAs do not know it: the first probe marks the backend down, and nothing
    # is sent to it
    untrusted = launch.proxy([backend("tls", url, models=["m"])])
    state = httpx.get(untrusted.url + "/admin/backends").json()["backends"][0]
    assert state["health"] == "down" and "CERTIFICATE_VERIFY_FAILED" in state["health_detail"]
    reply = httpx.post(untrusted.url + "/v1/chat/completions", timeout=10,
                       json={"model": "m", "messages": MSG, "max_tokens": 5})
    assert reply.status_code == 503 and reply.json()["error"]["type"]

    unverified = launch.proxy([backend("tls", url, models=["m"], tls_verify=False)])
    reply = httpx.post(unverified.url + "/v1/chat/completions", timeout=10,
                       json={"model": "m", "messages": MSG, "max_tokens": 5})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 5


def test_a_missing_ca_file_fails_at_start_naming_the_key(tmp_path: Path) -> None:
    from proxy.settings import ConfigError, load_settings

    config = tmp_path / "c.toml"
    config.write_text('[[backends]]\nname = "a"\nurl = "https://127.0.0.1:1"\n'
                      f'tls_ca_file = "{tmp_path / "nope.pem"}"\n')
    try:
        load_settings(config)
    except ConfigError as exc:
        assert "backends.0.tls_ca_file" in str(exc) and "nope.pem" in str(exc)
    else:
        raise AssertionError("a missing CA file was accepted")
