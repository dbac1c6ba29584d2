"""TLS on both ports against the real server, with a CA and certificate made at test time (trustme)."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import trustme
import websockets

from tests.helpers import COCO_MODEL, ROOT, require, running_server
from tests.integration.wire import EOF, Wire, bus_jpeg, frame, is_bus, wait_for
from visionstream.client.connection import connect
from visionstream.client.tls import client_context
from visionstream.wire.errors import ClientError
from visionstream.wire.protocol import CLIENT_LIMITS, FrameDecoder, encode, hello_msg


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    where = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    paths = {"ca": where / "ca.pem", "cert": where / "server.pem", "key": where / "server.key"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    leaf.private_key_pem.write_to_path(str(paths["key"]))
    with open(paths["cert"], "wb") as f:
        for blob in leaf.cert_chain_pems:
            f.write(blob.bytes())
    other = trustme.CA()  # a CA the server's certificate does not come from
    paths["other_ca"] = where / "other-ca.pem"
    other.cert_pem.write_to_path(str(paths["other_ca"]))
    return paths


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory, pki):
    require(COCO_MODEL)
    with running_server(tmp_path_factory.mktemp("tls"), "--tls-cert", str(pki["cert"]),
                        "--tls-key", str(pki["key"])) as handle:
        yield handle


def _https(server, pki, path: str = "/stats") -> httpx.Response:
    return httpx.get(f"https://127.0.0.1:{server.api_port}{path}", verify=client_context(ca=pki["ca"]),
                     timeout=10)


class TLSWire(Wire):
    """Wire over TLS: the same blocking reads, through an SSLSocket."""

    def __init__(self, port: int, ca: Path) -> None:
        ctx = client_context(ca=ca)
        assert ctx is not None
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        self.decoder = FrameDecoder(limits=CLIENT_LIMITS)
        self.pending = []
        self.eof = False


def _client(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "client.py"), "--mode", "2", "--max-frames", "2",
                           "--quiet", "--no-save", "--log-dir", "", "--connect-retries", "0", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_frames_health_stats_and_ws_over_tls(tls_server, pki):
    with TLSWire(tls_server.tcp_port, pki["ca"]) as w:
        assert w.sock.version() in ("TLSv1.2", "TLSv1.3")
        w.hello("tls-cam", drop=False)
        w.send(frame("tls-cam", 0, bus_jpeg()))
        assert is_bus(w.recv(timeout=30))
    assert _https(tls_server, pki, "/health").json()["ready"] is True

    async def view() -> dict:
        url = f"wss://127.0.0.1:{tls_server.api_port}/ws"
        async with websockets.connect(url, ssl=client_context(ca=pki["ca"]), open_timeout=10) as ws:
            def send_frame() -> None:
                with TLSWire(tls_server.tcp_port, pki["ca"]) as cam:
                    cam.hello("tls-ws-cam", drop=False)
                    cam.send(frame("tls-ws-cam", 0, bus_jpeg()))
                    cam.recv(timeout=30)
            sender = threading.Thread(target=send_frame)
            sender.start()
            try:
                return json.loads(await asyncio.wait_for(ws.recv(), 30))
            finally:
                await asyncio.to_thread(sender.join)

    event = asyncio.run(view())
    assert event["stream_name"] == "tls-ws-cam"


def test_the_client_scripts_stream_over_tls(tls_server, pki, tmp_path):
    proc = _client("--port", str(tls_server.tcp_port), "--tls-ca", str(pki["ca"]), "--stream", "tls-script")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "unanswered:    0" in proc.stdout and "frames sent:   2" in proc.stdout, proc.stdout
    viewer = subprocess.Popen([sys.executable, str(ROOT / "ws_demo_client.py"), "--api-port", str(tls_server.api_port),
                               "--tls-ca", str(pki["ca"]), "--count", "1", "--quiet", "--max-retries", "2"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        with TLSWire(tls_server.tcp_port, pki["ca"]) as cam:
            cam.hello("tls-viewer-cam", drop=False)
            fid = 0
            while viewer.poll() is None and fid < 60:  # until the viewer has connected and seen one
                cam.send(frame("tls-viewer-cam", fid, bus_jpeg()))
                cam.recv(timeout=30)
                fid += 1
        out, err = viewer.communicate(timeout=30)
    finally:
        if viewer.poll() is None:
            viewer.kill()
    assert viewer.returncode == 0, err
    assert json.loads(out.splitlines()[0])["stream_name"] == "tls-viewer-cam"
    stress = subprocess.run([sys.executable, str(ROOT / "stress_test.py"), "--port", str(tls_server.tcp_port),
                             "--api-port", str(tls_server.api_port), "--tls-ca", str(pki["ca"]), "--streams", "1",
                             "--fps", "5", "--duration", "1.5", "--grace", "2", "--no-plot", "--quiet",
                             "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert stress.returncode == 0, stress.stdout + stress.stderr
    report = json.loads(next(tmp_path.glob("stress-*.json")).read_text())
    after = report["summary"]["server_stats_after"]
    assert "error" not in after and after["processed_frames"] >= 1, after  # /stats fetched over https


def test_a_plaintext_client_on_the_tls_port_gets_one_clear_line(tls_server, pki):
    before = _https(tls_server, pki).json()["errors_by_code"].get("tls_handshake_failed", 0)
    proc = _client("--port", str(tls_server.tcp_port))
    out = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 1, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert errors == [f"error: 127.0.0.1:{tls_server.tcp_port} speaks TLS: add --tls (and --tls-ca CA.pem for a "
                      f"private CA)"], out
    with Wire(tls_server.tcp_port) as w:  # a raw plaintext hello: closed at once, nothing in clear
        w.send(hello_msg("plain"))
        assert w.rest(timeout=5) == [EOF]
    wait_for(lambda: _https(tls_server, pki).json()["errors_by_code"].get("tls_handshake_failed", 0) >= before + 2,
             5, "tls_handshake_failed counted")
    # Plain HTTP against the HTTPS port is counted the same way.
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{tls_server.api_port}/health", timeout=5)
    wait_for(lambda: _https(tls_server, pki).json()["errors_by_code"].get("tls_handshake_failed", 0) >= before + 3,
             5, "tls_handshake_failed counted for HTTP")
    log = tls_server.log()
    assert "Traceback" not in log
    assert "SSL handshake failed" not in log
    assert log.count("TLS handshake failed") == 1, "one line per burst"


def test_a_certificate_that_fails_verification_is_one_clear_line(tls_server, pki):
    proc = _client("--port", str(tls_server.tcp_port), "--tls-ca", str(pki["other_ca"]))
    out = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 1, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "failed verification" in errors[0] and "--tls-ca" in errors[0], out
    proc = _client("--port", str(tls_server.tcp_port), "--tls")  # the system store does not know the test CA
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "failed verification" in errors[0], proc.stderr


def test_the_ws_viewer_explains_a_plaintext_url_against_tls(tls_server, pki):
    proc = subprocess.run([sys.executable, str(ROOT / "ws_demo_client.py"), "--api-port", str(tls_server.api_port),
                           "--count", "1", "--max-retries", "1"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and errors == [f"error: 127.0.0.1:{tls_server.api_port} speaks TLS: add --tls "
                                               f"(and --tls-ca CA.pem for a private CA)"], proc.stderr


def test_a_tls_client_on_a_plaintext_port_gets_one_clear_line(tmp_path, pki):
    require(COCO_MODEL)
    with running_server(tmp_path) as plain:
        proc = _client("--port", str(plain.tcp_port), "--tls-ca", str(pki["ca"]))
        errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
        assert proc.returncode == 1 and errors == [f"error: TLS: 127.0.0.1:{plain.tcp_port} does not speak TLS (it "
                                                   f"answered in plaintext): drop --tls, or check the port"], proc.stderr

        async def via_library() -> None:
            await connect("127.0.0.1", plain.tcp_port, "lib", tls=client_context(ca=pki["ca"]), retries=2)

        with pytest.raises(ClientError, match="does not speak TLS"):
            asyncio.run(asyncio.wait_for(via_library(), 5))  # no retries: the answer would be the same


@pytest.mark.parametrize("flags, message", [
    (["--tls-cert", "{cert}"], "--tls-cert and --tls-key go together"),
    (["--tls-key", "{key}"], "--tls-cert and --tls-key go together"),
    (["--tls-cert", "{missing}", "--tls-key", "{key}"], "cannot read it"),
    (["--tls-cert", "{key}", "--tls-key", "{key}"], "not a usable certificate and key"),
])
def test_tls_flag_mistakes_are_one_line_and_exit_2(tmp_path, pki, flags, message):
    names = {"cert": pki["cert"], "key": pki["key"], "missing": tmp_path / "nope.pem"}
    args = [f.format(**names) for f in flags]
    proc = subprocess.run([sys.executable, str(ROOT / "server.py"), "--tcp-port", "0", "--api-port", "0",
                           "--log-dir", str(tmp_path / "logs"), "--placeholder", *args],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    out = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 2, out
    lines = [line for line in out.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and message in lines[0], out
    assert "Traceback" not in out


def test_plaintext_tls_mismatch_raw_socket_sees_no_plaintext(tls_server):
    """What a camera written in another language sees: the TLS port never answers a plaintext byte."""
    with socket.create_connection(("127.0.0.1", tls_server.tcp_port), timeout=5) as s:
        s.sendall(encode(hello_msg("raw")))
        s.settimeout(5)
        try:
            data = s.recv(100)
        except (ConnectionResetError, ssl.SSLError):
            data = b""
        assert data == b""


def test_silent_handshakes_cannot_exhaust_descriptors(tmp_path, pki):
    """1,100 sockets that never send a ClientHello, against a TLS server limited to 1024 descriptors."""
    require(COCO_MODEL)
    import resource

    from visionstream.server.tls import MAX_TLS_HANDSHAKES

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"the test needs 4096 open files, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), hard))
    flood: list[socket.socket] = []
    try:
        with running_server(tmp_path, "--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"]),
                            preexec_fn=limit) as srv:
            cam = TLSWire(srv.tcp_port, pki["ca"])  # seated before the flood
            cam.hello("seated-cam", drop=False)
            for port in (srv.api_port, srv.tcp_port):
                for _ in range(550):
                    flood.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            fds = len(list(Path(f"/proc/{srv.proc.pid}/fd").iterdir()))
            assert fds < 1024 - 64, fds
            cam.send(frame("seated-cam", 0, bus_jpeg()))
            assert is_bus(cam.recv(timeout=30))  # a seated camera is served through the flood
            cam.close()
            for s in flood:
                s.close()
            flood.clear()
            def fresh_camera() -> bool:
                try:
                    with TLSWire(srv.tcp_port, pki["ca"]) as w:
                        w.hello("fresh-cam", drop=False)
                        w.send(frame("fresh-cam", 0, bus_jpeg()))
                        return is_bus(w.recv(timeout=30))
                except (OSError, ssl.SSLError):
                    return False
            wait_for(fresh_camera, 15, "a new TLS camera served once the flood is gone")
            counts = _https(srv, pki).json()["errors_by_code"]
            assert counts.get("tls_handshake_refused", 0) >= 1100 - MAX_TLS_HANDSHAKES - 64, counts
            log = srv.log()
            assert log.count("TLS handshakes in progress: refusing") == 1, "one line per burst"
            assert "Traceback" not in log
    finally:
        for s in flood:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
