"""`bsmamba2-webui` as visitors use it: its "/separate" endpoint through gradio_client and the
page in a real browser (headless Chromium through Selenium), each against the files
`bsmamba2-separate` writes for the same model and settings; a registered model downloaded from
the page; the one-line errors. The launcher runs in a subprocess on 127.0.0.1."""
import contextlib
import dataclasses
import hashlib
import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
import tomllib
import urllib.request

import numpy as np
import pytest
import soundfile as sf

from tests.random_models import tiny_export

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = os.path.join(REPO, "tests", "data", "official_micro.ckpt")  # n_fft 256: hop 64
# The page's settings and the CLI's: 1-s chunks compile and run fast; precision "auto" on both.
SETTINGS = ("--segment=1", "--overlap=0.25")
MAX_MINUTES = 0.1  # the app's limit: the 4-s song passes, a 12-s file does not
BROWSER = (shutil.which("chromium"), shutil.which("chromedriver"))


@dataclasses.dataclass
class App:
  url: str
  log: str  # the server's stdout and stderr

  def output(self) -> str:
    with open(self.log, encoding="utf-8", errors="replace") as f:
      return f.read()


def _gradio_client():
  """gradio_client's Client, handle_file and AppError; skips without the web extra."""
  client = pytest.importorskip("gradio_client", reason="the web extra is not installed: pip "
                               "install -e '.[web]'")
  from gradio_client.exceptions import AppError
  return client.Client, client.handle_file, AppError


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def _serving(log: str, *flags: str, env: dict | None = None, timeout: float = 180):
  """Runs `python -m experiments.webui --port=<free> *flags` until the page answers; stops it
  (SIGTERM) at the end. Its Gradio cache is its own: a stopping app deletes what it cached,
  which would otherwise include the same upload of an app running beside it."""
  port = _free_port()
  cache = os.path.join(os.path.dirname(log), "gradio")
  with open(log, "w") as out:
    proc = subprocess.Popen([sys.executable, "-m", "experiments.webui", f"--port={port}", *flags],
                            cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, "GRADIO_TEMP_DIR": cache, **(env or {})})
  app = App(f"http://127.0.0.1:{port}/", log)
  try:
    deadline = time.monotonic() + timeout
    while True:
      assert proc.poll() is None, f"the app exited ({proc.returncode}):\n{app.output()[-3000:]}"
      try:
        urllib.request.urlopen(app.url, timeout=5).close()
        break
      except OSError:
        assert time.monotonic() < deadline, f"no answer from the app:\n{app.output()[-3000:]}"
        time.sleep(0.5)
    yield app
  finally:
    proc.terminate()
    try:
      proc.wait(30)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


def _cli(song: str, output_dir: str, *flags: str, env: dict | None = None) -> dict[str, str]:
  """The stems `bsmamba2-separate` writes for `song` with SETTINGS and `flags`."""
  proc = subprocess.run([sys.executable, "-m", "experiments.separate", song, "-o", output_dir,
                         *SETTINGS, *flags], cwd=REPO, capture_output=True, text=True,
                        timeout=300, env={**os.environ, **(env or {})})
  assert proc.returncode == 0, proc.stderr[-3000:]
  track = os.path.splitext(os.path.basename(song))[0]
  return {stem: os.path.join(output_dir, track, f"{stem}.wav")
          for stem in ("vocals", "accompaniment")}


def _read(path: str) -> np.ndarray:
  return sf.read(path, dtype="float32", always_2d=True)[0]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return tmp_path_factory.mktemp("webui")


@pytest.fixture(scope="module")
def song(folder):
  """4 s of a synthetic song (singer, drums, bass, pads), 16-bit stereo at 44.1 kHz."""
  from data_pipeline.songs import synthesize_track
  mixture = synthesize_track(seed=0, split_code=0, index=0, seconds=4.0,
                             vocal_density=1.0)["mixture"]
  path = str(folder / "song.wav")
  sf.write(path, mixture.T, 44100, subtype="PCM_16")
  return path


@pytest.fixture(scope="module")
def export(folder):
  return tiny_export(str(folder / "export"), seed=7)


@pytest.fixture(scope="module")
def cli_stems(song, export, folder):
  return _cli(song, str(folder / "cli"), f"--checkpoint={export}")


@pytest.fixture(scope="module")
def app(export, folder):
  pytest.importorskip("gradio", reason="the web extra is not installed: pip install -e '.[web]'")
  with _serving(str(folder / "app.log"), f"--checkpoint={export}", *SETTINGS,
                f"--max_minutes={MAX_MINUTES}") as served:
    yield served


def test_gradio_is_an_extra_and_the_page_a_console_script():
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  assert not any(d.lower().startswith("gradio") for d in project["dependencies"])
  assert any(d.startswith("gradio>=") for d in project["optional-dependencies"]["web"])
  assert project["scripts"]["bsmamba2-webui"] == "experiments.webui:run"


def test_the_stems_come_vocals_and_accompaniment_first():
  from bsmamba2_jax.webui import ordered_stems
  assert ordered_stems(("vocals", "accompaniment")) == ["vocals", "accompaniment"]
  assert ordered_stems(("drums", "bass", "vocals", "other")) == ["vocals", "drums", "bass",
                                                                  "other"]


def test_a_model_loads_once_and_its_overlaps_share_one_jitted_function(export, monkeypatch):
  from bsmamba2_jax.separator import Separator
  from bsmamba2_jax.webui import Models
  loads = []
  load = Separator.from_checkpoint
  monkeypatch.setattr(Separator, "from_checkpoint",
                      lambda path, **kwargs: loads.append(path) or load(path, **kwargs))
  models = Models(export, segment=1.0)
  assert models.choices() == [("export", "export")]  # the file name, not the server's path
  crossfaded, official = models.separator("export", 0.25), models.separator("export", 0.0)
  assert models.separator("export", 0.25) is crossfaded and loads == [export]
  assert official.model_fn is crossfaded.model_fn and official.overlap_samples == 0
  assert models.stems("export") == ["vocals", "accompaniment"]
  with pytest.raises(ValueError, match="this page serves export only, not 'other'"):
    models.separator("other", 0.25)


def test_uploads_are_checked_before_anything_loads(export, tmp_path):
  from bsmamba2_jax.errors import InputError
  from bsmamba2_jax.webui import Models, Page
  page = Page(Models(export), max_minutes=MAX_MINUTES)
  with pytest.raises(InputError, match="no audio: upload a song or record one first"):
    page.separate(None, "export")
  upload = tmp_path / "f0e1d2" / "long.wav"  # named as Gradio names an upload
  upload.parent.mkdir()
  sf.write(upload, np.zeros(12 * 8000, np.float32), 8000)
  with pytest.raises(InputError) as error:
    page.separate(str(upload), "export")
  assert str(error.value) == ("long.wav: 0.2 minutes is longer than this page's limit of 0.1 "
                              "minutes (bsmamba2-webui --max_minutes); bsmamba2-separate takes "
                              "any length")
  with pytest.raises(ValueError, match="FLAC has no 32-bit float"):
    page.separate(str(upload), "export", "flac", "32f")


@pytest.mark.integration
def test_nothing_imports_gradio_before_a_page_is_built():
  """The core install has no Gradio: the library and the launcher import it in `build_app`."""
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent("""
      import sys
      import bsmamba2_jax.webui, experiments.webui
      from bsmamba2_jax import Separator, separate_files
      print(sorted(m for m in sys.modules if m.split(".")[0] in ("gradio", "gradio_client")))
      """)], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == "[]"


@pytest.mark.integration
def test_the_separate_endpoint_gives_the_clis_stems_and_one_line_errors(app, song, cli_stems,
                                                                        tmp_path):
  Client, handle_file, AppError = _gradio_client()
  client = Client(app.url, verbose=False, download_files=str(tmp_path / "client"))
  vocals, accompaniment, files, picture, summary = client.predict(handle_file(song),
                                                                  api_name="/separate")
  assert [os.path.basename(f) for f in files] == ["song_vocals.wav", "song_accompaniment.wav"]
  np.testing.assert_array_equal(_read(vocals), _read(cli_stems["vocals"]))
  np.testing.assert_array_equal(_read(accompaniment), _read(cli_stems["accompaniment"]))
  with open(picture, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert re.fullmatch(r"song\.wav: 4\.0 s of audio separated in [\d.]+ s by export "
                      r"\((float32|mixed), overlap 0\.25\)", summary), summary

  # The settings reach the writer: 16-bit FLAC, the CLI's 24-bit samples rounded to 16 bits.
  flac, _, _, _, _ = client.predict(handle_file(song), output_format="flac", bit_depth="16",
                                    api_name="/separate")
  assert os.path.basename(flac) == "song_vocals.flac"
  info = sf.info(flac)
  assert (info.format, info.subtype) == ("FLAC", "PCM_16")
  np.testing.assert_allclose(_read(flac), _read(cli_stems["vocals"]), rtol=0,
                             atol=2.0 ** -15 + 2.0 ** -23)

  long = str(tmp_path / "long.wav")
  sf.write(long, np.zeros(12 * 8000, np.float32), 8000)
  with pytest.raises(AppError, match=re.escape(
      "long.wav: 0.2 minutes is longer than this page's limit of 0.1 minutes")):
    client.predict(handle_file(long), api_name="/separate")
  with pytest.raises(AppError, match=re.escape("(FLAC has no 32-bit float)")):
    client.predict(handle_file(song), output_format="flac", bit_depth="32f",
                   api_name="/separate")
  assert "Traceback" not in app.output()


class _Files(http.server.BaseHTTPRequestHandler):
  """/micro.ckpt: the official micro checkpoint; anything else: 404."""

  def log_message(self, *args):  # quiet
    pass

  def do_GET(self):
    if self.path != "/micro.ckpt":
      self.send_error(404)
      return
    with open(MICRO, "rb") as f:
      body = f.read()
    self.send_response(200)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)


@pytest.mark.integration
def test_a_registered_model_is_downloaded_from_the_page_a_failed_download_is_one_line(
    tmp_path, song):
  Client, handle_file, AppError = _gradio_client()
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  base = f"http://127.0.0.1:{server.server_address[1]}"
  with open(MICRO, "rb") as f:
    payload = f.read()
  (tmp_path / "models.toml").write_text(
      f'[models.micro]\nurl = "{base}/micro.ckpt"\n'
      f'sha256 = "{hashlib.sha256(payload).hexdigest()}"\nsize = {len(payload)}\n'
      "hop_length = 64\n"
      f'[models.gone]\nurl = "{base}/gone.ckpt"\nsha256 = "{"0" * 64}"\nsize = 1\n')
  env = {"BSMAMBA2_HOME": str(tmp_path / "home"),
         "BSMAMBA2_REGISTRY": str(tmp_path / "models.toml")}
  try:
    with _serving(str(tmp_path / "app.log"), "--model=micro", *SETTINGS, env=env) as app:
      client = Client(app.url, verbose=False, download_files=str(tmp_path / "client"))
      with pytest.raises(AppError, match=re.escape(
          f"model gone: {base}/gone.ckpt: HTTP 404 Not Found; to install it by hand, download")):
        client.predict(handle_file(song), model="gone", api_name="/separate")
      vocals, accompaniment, _, _, summary = client.predict(handle_file(song), model="micro",
                                                            api_name="/separate")
      assert " by micro " in summary
      stems = {"vocals": _read(vocals), "accompaniment": _read(accompaniment)}
      assert "Traceback" not in app.output()
  finally:
    server.shutdown()
  # The CLI finds the model the page downloaded in the cache and gives the same stems.
  expected = _cli(song, str(tmp_path / "cli"), "-n", "micro", env=env)
  for stem, samples in stems.items():
    np.testing.assert_array_equal(samples, _read(expected[stem]))


def _chromium(downloads: str):
  """Headless Chromium of the system packages (`BROWSER`), downloading into `downloads`."""
  webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
  from selenium.webdriver.chrome.service import Service
  options = webdriver.ChromeOptions()
  options.binary_location = BROWSER[0]
  for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                   "--window-size=1280,1200", "--autoplay-policy=no-user-gesture-required"):
    options.add_argument(argument)
  options.add_experimental_option("prefs", {"download.default_directory": downloads,
                                            "download.prompt_for_download": False})
  return webdriver.Chrome(service=Service(BROWSER[1]), options=options)


def _upload(driver, url: str, path: str):
  """Opens the page and puts the file at `path` into its song box."""
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import WebDriverWait
  driver.get(url)
  WebDriverWait(driver, 60).until(
      lambda d: d.find_elements(By.CSS_SELECTOR, "#song input[type=file]"))
  driver.find_element(By.CSS_SELECTOR, "#song input[type=file]").send_keys(path)
  WebDriverWait(driver, 60).until(
      lambda d: d.find_elements(By.CSS_SELECTOR, "#song a.download-link"))  # uploaded


@pytest.mark.integration
@pytest.mark.skipif(not all(BROWSER), reason="no browser: chromium and chromedriver are not both "
                    "on PATH (Debian: apt-get install chromium chromium-driver; .ci/run does)")
def test_the_page_in_a_browser_plays_and_downloads_the_clis_stems(app, song, cli_stems,
                                                                  tmp_path):
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import WebDriverWait
  downloads = tmp_path / "downloads"
  downloads.mkdir()
  driver = _chromium(str(downloads))
  try:
    _upload(driver, app.url, song)
    driver.find_element(By.ID, "separate").click()
    WebDriverWait(driver, 120).until(
        lambda d: d.find_element(By.ID, "summary").text.startswith("song.wav: 4.0 s")
        and len(d.find_elements(By.CSS_SELECTOR, "#stem0 a.download-link, "
                                                 "#stem1 a.download-link")) == 2)
    for box, stem in (("stem0", "vocals"), ("stem1", "accompaniment")):
      label = driver.find_element(By.CSS_SELECTOR, f"#{box} [data-testid=block-label]").text
      assert label.strip() == stem
      driver.find_element(By.CSS_SELECTOR, f"#{box} button[aria-label='Play']").click()
      WebDriverWait(driver, 30).until(
          lambda d: d.find_element(By.CSS_SELECTOR, f"#{box} #time").text != "0:00")  # playing
      driver.find_element(By.CSS_SELECTOR, f"#{box} button[aria-label='Pause']").click()
      driver.find_element(By.CSS_SELECTOR, f"#{box} a.download-link").click()
      saved = downloads / f"song_{stem}.wav"
      WebDriverWait(driver, 30).until(lambda d: saved.exists())
      np.testing.assert_array_equal(_read(str(saved)), _read(cli_stems[stem]))
    assert driver.find_elements(By.CSS_SELECTOR, "#spectrogram img")
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, height + 100)  # the whole page, summary included
    shot = os.path.abspath(os.environ.get("BSMAMBA2_SCREENSHOT") or tmp_path / "webui.png")
    assert driver.save_screenshot(shot)

    bad = tmp_path / "bad" / "song.wav"
    bad.parent.mkdir()
    bad.write_bytes(b"these are text bytes, not audio\n" * 64)
    _upload(driver, app.url, str(bad))
    driver.find_element(By.ID, "separate").click()
    WebDriverWait(driver, 60).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "[data-testid=toast-text]"))
    message = driver.find_element(By.CSS_SELECTOR, "[data-testid=toast-text]").text
    assert message.startswith("song.wav: cannot read audio (") and "\n" not in message, message
  finally:
    driver.quit()
  assert "Traceback" not in app.output()
