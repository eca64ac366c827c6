"""The model registry and the downloader, against a real HTTP server on 127.0.0.1."""
import hashlib
import http.server
import os
import socket
import threading

import pytest

from synpo import weights
from synpo.errors import ModelError

PAYLOAD = bytes(range(256)) * 4096          # 1 MiB
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class Server:
    """Serves PAYLOAD at /model.bin with Range support; can drop the first connection midway,
    or serve corrupted bytes."""

    def __init__(self):
        self.requests = []
        self.drop_first = False
        self.corrupt = False
        self.honour_range = True
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.requests.append(dict(self.headers))
                if self.path != "/model.bin":
                    self.send_error(404)
                    return
                data = PAYLOAD if not outer.corrupt else b"\xff" + PAYLOAD[1:]
                start = 0
                rng = self.headers.get("Range")
                if rng and outer.honour_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", "bytes %d-%d/%d" % (start, len(data) - 1, len(data)))
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.drop_first and len(outer.requests) == 1:
                    self.wfile.write(body[: len(body) // 3])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d/model.bin" % self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def test_download_success_verified_and_atomic(server, tmp_path):
    target = str(tmp_path / "m.bin")
    seen = []
    weights.download(server.url, target, SHA, progress=lambda done, total: seen.append((done, total)))
    assert open(target, "rb").read() == PAYLOAD
    assert not os.path.exists(target + ".part")
    assert seen[-1] == (len(PAYLOAD), len(PAYLOAD))


def test_download_resumes_after_dropped_connection(server, tmp_path):
    server.drop_first = True
    target = str(tmp_path / "m.bin")
    weights.download(server.url, target, SHA, retries=3)
    assert open(target, "rb").read() == PAYLOAD
    assert len(server.requests) == 2
    assert server.requests[1].get("Range", "").startswith("bytes=")      # the second request resumed


def test_download_restarts_when_server_ignores_range(server, tmp_path):
    server.drop_first = True
    server.honour_range = False
    target = str(tmp_path / "m.bin")
    weights.download(server.url, target, SHA, retries=3)
    assert open(target, "rb").read() == PAYLOAD


def test_download_corrupt_file_rejected_and_removed(server, tmp_path):
    server.corrupt = True
    target = str(tmp_path / "m.bin")
    with pytest.raises(ModelError, match="checksum mismatch"):
        weights.download(server.url, target, SHA)
    assert not os.path.exists(target) and not os.path.exists(target + ".part")


def test_download_server_down(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    target = str(tmp_path / "m.bin")
    with pytest.raises(ModelError, match="cannot download"):
        weights.download("http://127.0.0.1:%d/model.bin" % port, target, SHA, retries=2, timeout=2)
    assert not os.path.exists(target)


def test_download_can_be_cancelled(server, tmp_path):
    target = str(tmp_path / "m.bin")
    with pytest.raises(ModelError, match="cancelled"):
        weights.download(server.url, target, SHA, cancel=lambda: True)
    assert not os.path.exists(target)


def test_checkpoint_path_downloads_into_cache_once(server, tmp_path, monkeypatch):
    monkeypatch.setenv("SYNPO_CACHE", str(tmp_path / "cache"))
    spec = weights.ModelSpec("test_model", "sam", "vit_b", "Apache-2.0", 1.0, url=server.url,
                             filename="test_model.pth", sha256=SHA)
    monkeypatch.setitem(weights.REGISTRY, "test_model", spec)
    path = weights.checkpoint_path("test_model")
    assert path == str(tmp_path / "cache" / "test_model.pth")
    assert weights.checkpoint_path("test_model") == path
    assert len(server.requests) == 1                     # the second call used the cache
    with pytest.raises(ModelError, match="downloads are off"):
        monkeypatch.setenv("SYNPO_CACHE", str(tmp_path / "empty"))
        weights.checkpoint_path("test_model", allow_download=False)


def test_registry_and_cache_dir(monkeypatch, tmp_path):
    with pytest.raises(ModelError, match="unknown model"):
        weights.get_spec("vit_q")
    for name in ("vit_b", "vit_l", "vit_h"):
        spec = weights.get_spec(name)
        assert spec.url.startswith("https://") and len(spec.sha256) == 64
    monkeypatch.delenv("SYNPO_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert weights.cache_dir() == str(tmp_path / "synpo")
    monkeypatch.setenv("SYNPO_CACHE", "/somewhere")
    assert weights.cache_dir() == "/somewhere"


def test_litemedsam_found_in_distribution_and_verified():
    path = weights.litemedsam_checkpoint()
    assert path.endswith("lite_medsam.pth") and os.path.isfile(path)
    assert weights.checkpoint_path("litemedsam") == path       # verifies the SHA-256
