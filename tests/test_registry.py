"""Named pretrained models against an HTTP server of the test's own on 127.0.0.1: download,
verify, convert, cache, resume, refuse; the real URLs are never fetched."""
import hashlib
import http.server
import os
import subprocess
import sys
import threading
import tomllib
import urllib.parse

import numpy as np
import pytest

from bsmamba2_jax import download, registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = os.path.join(REPO, "tests", "data", "official_micro.ckpt")  # n_fft 256: hop 64
PAYLOAD = open(CKPT, "rb").read()
SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
  """/model.ckpt (Range), /cut.ckpt (the first answer stops half way), /short.ckpt (every answer
  stops half way), /page.html, /empty,
  /drive?id=X (a Google Drive confirmation page, then the file), anything else 404."""

  def log_message(self, *args):  # quiet
    pass

  def _send(self, body: bytes, status=200, content_type="application/octet-stream",
            length=None):
    self.send_response(status)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(body) if length is None else length))
    if status == 206:
      self.send_header("Content-Range", f"bytes {self.start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
    self.end_headers()
    self.wfile.write(body)

  def do_GET(self):
    server = self.server
    url = urllib.parse.urlparse(self.path)
    server.requests.append((url.path, self.headers.get("Range")))
    ranged = self.headers.get("Range", "")
    self.start = int(ranged[len("bytes="):].split("-")[0]) if ranged else 0
    if url.path in ("/model.ckpt", "/cut.ckpt", "/short.ckpt", "/drive-download"):
      if url.path == "/drive-download" and "confirm=t" not in url.query:
        return self._send(b"", 403)
      if url.path == "/short.ckpt":  # promises everything, sends half, every time
        self._send(PAYLOAD[:len(PAYLOAD) // 2], length=len(PAYLOAD))
        self.close_connection = True
        return None
      if url.path == "/cut.ckpt" and not ranged:  # promises everything, sends half, hangs up
        self._send(PAYLOAD[:len(PAYLOAD) // 2], length=len(PAYLOAD))
        self.close_connection = True
        return None
      if ranged:
        return self._send(PAYLOAD[self.start:], 206)
      return self._send(PAYLOAD)
    if url.path == "/drive":
      page = (b"<!DOCTYPE html><html><body>Google Drive can't scan this file for viruses."
              b'<form id="download-form" action="/drive-download" method="get">'
              b'<input type="hidden" name="id" value="X"><input type="hidden" name="confirm" '
              b'value="t"></form></body></html>')
      return self._send(page, content_type="text/html")
    if url.path == "/page.html":
      return self._send(b"<html><body>Sign in to continue</body></html>",
                        content_type="text/html")
    if url.path == "/empty":
      return self._send(b"")
    return self._send(b"not found", 404)


@pytest.fixture(scope="module")
def server():
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
  httpd.requests = []
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield httpd
  httpd.shutdown()


def _environ(tmp_path, server, **entries):
  """BSMAMBA2_HOME and BSMAMBA2_REGISTRY in `tmp_path`, with `entries` {name: (path, sha256)}."""
  lines = []
  for name, (path, sha256) in entries.items():
    lines += [f"[models.{name}]", f'url = "http://127.0.0.1:{server.server_port}{path}"',
              f'sha256 = "{sha256}"', f"size = {len(PAYLOAD)}", "hop_length = 64",
              'license = "test"', 'notes = "the micro checkpoint"', ""]
  (tmp_path / "models.toml").write_text("\n".join(lines))
  return {"BSMAMBA2_HOME": str(tmp_path / "home"),
          "BSMAMBA2_REGISTRY": str(tmp_path / "models.toml")}


def _files(folder):
  return sorted(os.path.relpath(os.path.join(r, f), folder)
                for r, _, names in os.walk(folder) for f in names)


def test_download_verify_convert_cache_and_offline_reuse(tmp_path, server):
  from bsmamba2_jax.separator import Separator
  environ = _environ(tmp_path, server, micro=("/model.ckpt", SHA256))
  before = len(server.requests)
  export = registry.pretrained("micro", progress=False, environ=environ)
  assert export == str(tmp_path / "home" / "models" / "micro")
  assert len(server.requests) == before + 1
  with open(tmp_path / "home" / "downloads" / "micro" / "model.ckpt", "rb") as f:
    assert f.read() == PAYLOAD  # verified copy of the published file
  assert registry.pretrained("micro", progress=False, environ=environ) == export
  assert len(server.requests) == before + 1  # cached: no request
  separator = Separator.from_checkpoint(export, segment=0.05)
  x = 0.1 * np.random.default_rng(0).standard_normal((2, 3000)).astype(np.float32)
  stems = separator.separate(x, 44100)
  assert stems["vocals"].shape == x.shape and np.isfinite(stems["vocals"]).all()
  assert "micro " in registry.listing(environ) and "yes" in registry.listing(environ)


def test_a_cut_transfer_resumes_with_a_range_request(tmp_path, server):
  environ = _environ(tmp_path, server, cut=("/cut.ckpt", SHA256))
  before = len(server.requests)
  registry.pretrained("cut", progress=False, environ=environ)
  asked = server.requests[before:]
  assert asked[0] == ("/cut.ckpt", None)
  assert asked[1] == ("/cut.ckpt", f"bytes={len(PAYLOAD) // 2}-"), asked


def test_google_drive_confirmation_is_followed(tmp_path, server):
  environ = _environ(tmp_path, server, drive=("/drive?id=X", SHA256))
  assert registry.is_cached(registry.entry("drive", environ), environ) is False
  registry.pretrained("drive", progress=False, environ=environ)
  assert registry.is_cached(registry.entry("drive", environ), environ)


@pytest.mark.parametrize("path, sha256, problem", [
    ("/model.ckpt", "0" * 64, f"sha256 {SHA256} does not match the expected " + "0" * 64),
    ("/page.html", SHA256, "answered with a web page, not the file"),
    ("/empty", SHA256, "answered with no data"),
    ("/gone.ckpt", SHA256, "HTTP 404"),
])
def test_a_failed_fetch_is_one_line_and_caches_nothing(tmp_path, server, path, sha256, problem):
  environ = _environ(tmp_path, server, broken=(path, sha256))
  with pytest.raises(registry.RegistryError) as error:
    registry.pretrained("broken", progress=False, environ=environ)
  message = str(error.value)
  assert "\n" not in message and message.startswith(
      f"model broken: http://127.0.0.1:{server.server_port}{path}: ")
  assert problem in message and "to install it by hand" in message
  assert _files(tmp_path / "home") == []


def _unpinned(tmp_path, server, path):
  """An entry like the authors' BS-RoFormer one: neither sha256 nor size published."""
  (tmp_path / "models.toml").write_text(
      f'[models.unpinned]\nurl = "http://127.0.0.1:{server.server_port}{path}"\nsha256 = ""\n'
      "hop_length = 64\n")
  return {"BSMAMBA2_HOME": str(tmp_path / "home"),
          "BSMAMBA2_REGISTRY": str(tmp_path / "models.toml")}


def test_an_unpinned_file_is_held_to_the_size_its_server_states(tmp_path, server, caplog):
  environ = _unpinned(tmp_path, server, "/cut.ckpt")
  assert registry.entry("unpinned", environ).size is None
  with caplog.at_level("WARNING"):
    export = registry.pretrained("unpinned", progress=False, environ=environ)
  assert os.path.isfile(os.path.join(export, "config.json"))  # resumed to the stated size
  assert f"sha256 {SHA256}" in caplog.text and "no sha256 is published" in caplog.text
  os.makedirs(tmp_path / "short", exist_ok=True)
  short = _unpinned(tmp_path / "short", server, "/short.ckpt")
  with pytest.raises(registry.RegistryError,
                     match=rf"got {len(PAYLOAD) // 2:,} bytes, expected {len(PAYLOAD):,}"):
    registry.pretrained("unpinned", progress=False, environ=short)
  assert "no sha256 published" in registry._by_hand(registry.entry("unpinned", short), "x")


def test_no_network_is_one_line(tmp_path):
  import socket
  with socket.socket() as s:  # a port nothing listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  (tmp_path / "models.toml").write_text(
      f'[models.offline]\nurl = "http://127.0.0.1:{port}/x.ckpt"\nsha256 = "{SHA256}"\n')
  environ = {"BSMAMBA2_HOME": str(tmp_path / "home"),
             "BSMAMBA2_REGISTRY": str(tmp_path / "models.toml")}
  with pytest.raises(registry.RegistryError, match=r"model offline: .*cannot connect"):
    registry.pretrained("offline", progress=False, environ=environ)


def test_unknown_names_and_bad_registries_are_named(tmp_path):
  with pytest.raises(registry.RegistryError, match="unknown model 'nope'; choose from "
                                                   "bsmamba2-vocals, bsmamba2-vocals-official"):
    registry.entry("nope", {})
  (tmp_path / "bad.toml").write_text('[models.x]\nurl = "http://a/b"\n')
  with pytest.raises(registry.RegistryError, match=r"bad.toml: \[models.x\] lacks sha256"):
    registry.models({"BSMAMBA2_REGISTRY": str(tmp_path / "bad.toml")})


def test_the_shipped_registry_names_the_published_files():
  models = registry.models({})
  vocals = models["bsmamba2-vocals"]
  assert vocals.url.endswith("/v1.0.19/bs_mamba2_vocals.ckpt") and vocals.size == 192_610_602
  assert vocals.sha256 == "fceb733b41742abb8df563092f4cb5bbc9243c6c03e7f34dc44c14e60732c72f"
  assert "not stated" in vocals.license
  official = models["bsmamba2-vocals-official"]
  assert "1W-IX8I5B2g-8JA5Zaf-HkUul0MpOEBaZ" in official.url and official.size == 770_628_060
  roformer = models["bsroformer-vocals-official"]
  assert "1xAjVjCIp71gqjjgCJYjU1yaMLp39pHEm" in roformer.url
  assert roformer.sha256 == "" and roformer.size is None and "not published" in roformer.notes


@pytest.mark.integration
def test_two_processes_fetching_one_model_end_with_one_good_copy(tmp_path, server):
  environ = dict(os.environ, PYTHONPATH=REPO,
                 **_environ(tmp_path, server, shared=("/model.ckpt", SHA256)))
  code = ("from bsmamba2_jax import registry\n"
          "print(registry.pretrained('shared', progress=False))")
  before = len([r for r in server.requests if r[0] == "/model.ckpt"])
  procs = [subprocess.Popen([sys.executable, "-c", code], env=environ, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for _ in range(2)]
  outputs = [p.communicate(timeout=300) for p in procs]
  assert all(p.returncode == 0 for p in procs), outputs
  assert {out.strip() for out, _ in outputs} == {str(tmp_path / "home" / "models" / "shared")}
  assert len([r for r in server.requests if r[0] == "/model.ckpt"]) == before + 1
  assert "downloads/shared/model.ckpt" in _files(tmp_path / "home")


def test_the_core_install_needs_no_training_stack():
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  names = {d.split(">")[0].split("=")[0].split("[")[0].strip().lower()
           for d in project["dependencies"]}
  assert not names & {"tensorflow", "tensorflow-cpu", "tensorflow-datasets", "tensorboard",
                      "torch", "matplotlib", "librosa"}
  assert "av" in names  # FFmpeg for the formats libsndfile does not read
  assert "tensorflow-cpu" in {d.split(">")[0] for d in project["optional-dependencies"]["train"]}


def test_sha256_of_reads_the_whole_file(tmp_path):
  path = tmp_path / "f"
  path.write_bytes(b"x" * (3 * download.CHUNK + 5))
  assert download.sha256_of(str(path)) == hashlib.sha256(b"x" * (3 * download.CHUNK + 5)).hexdigest()
