"""The web page of separation, `bsmamba2-webui`: drop (or record) a song, get its stems.

`build_app(page)` makes a Gradio Blocks app around the CLI's path. An upload is checked against
the page's length limit from its header, then streamed by `separate.separate_file`
(`AudioReader` -> `Separator.stream` -> `AudioWriter`) into a folder of its own, so an hour-long
file needs the memory of a minute-long one and the stems equal `bsmamba2-separate`'s for the
same model and settings. `Models` holds the loaded separators: each model is loaded (a registered
one downloaded and converted first when it is not cached, `registry`) once per process, and the
separators of one model at different overlaps share its jitted function, so each chunk shape
compiles once. One separation runs at a time and visitors queue (`default_concurrency_limit=1`).

The separation event's API name is "/separate": one audio file in; out the files of the first
two stems of `ordered_stems` (vocals and accompaniment for a vocals model), the list of every
stem's file, the spectrogram PNG of mixture and vocals, and a line of summary. What a visitor can
get wrong (an unreadable or too long file, a failed download, a bad setting through the API) is
a one-line `gr.Error` in the page, never a traceback. Gradio is imported by `build_app` alone
(the `web` extra), with its analytics off.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import threading
import time
from typing import Callable, Sequence

from bsmamba2_jax import registry
from bsmamba2_jax.audio_io.paths import output_paths
from bsmamba2_jax.audio_io.reader import AudioReader
from bsmamba2_jax.audio_io.writer import FORMATS, check_format
from bsmamba2_jax.errors import InputError
from bsmamba2_jax.separate import separate_file
from bsmamba2_jax.separator import RESIDUAL, Separator

# Downloads are named after the song: "song_vocals.wav".
TEMPLATE = "{track}_{stem}.{ext}"
BIT_DEPTHS = ("16", "24", "32f")
# The spectrograms show the song's beginning: an STFT of a whole long file would not fit memory.
SPECTROGRAM_SECONDS = 30.0
# Gradio's copies of served files older than this are deleted (checked every 10 minutes).
KEEP_SERVED_S = 3600


def ordered_stems(stems: Sequence[str]) -> list[str]:
  """`stems` with vocals and the accompaniment first where present, the rest in their order."""
  first = [s for s in ("vocals", RESIDUAL) if s in stems]
  return first + [s for s in stems if s not in first]


class Models:
  """The models a page offers, each loaded once: the registered ones (`registry.models()`, cached
  or not) or a single `checkpoint` (an export or a PyTorch .ckpt). `segment`, `batch_size`,
  `precision` and `device` are `Separator.from_checkpoint`'s and the same for every model."""

  def __init__(self, checkpoint: str | None = None, *, default: str = registry.DEFAULT_MODEL,
               segment: float = 8.0, batch_size: int = 1, precision: str = "auto",
               device: str | None = None):
    self.checkpoint = checkpoint
    # A checkpoint goes by its file name: the page and its API do not show the server's paths.
    self.default = os.path.basename(os.path.normpath(checkpoint)) if checkpoint else default
    if checkpoint is None:
      registry.entry(default)  # RegistryError listing the names when there is no such model
    self._settings = dict(segment=segment, batch_size=batch_size, precision=precision,
                          device=device)
    self._loaded: dict[str, Separator] = {}
    self._separators: dict[tuple[str, float], Separator] = {}
    self._lock = threading.Lock()

  def choices(self) -> list[tuple[str, str]]:
    """(label, name) of every model: the checkpoint's file name, or each registered name with
    its download size until it is cached."""
    if self.checkpoint is not None:
      return [(self.default, self.default)]
    rows = []
    for name, model in sorted(registry.models().items()):
      size = f"{model.size / 1e6:.0f} MB" if model.size else "size not published"
      rows.append((name if registry.is_cached(model) else f"{name} (downloads {size})", name))
    return rows

  def stems(self, name: str) -> list[str]:
    """The output stems of the loaded model `name`, in `ordered_stems` order."""
    return ordered_stems(self._loaded[name].stems)

  def load_default(self, overlap: float) -> None:
    """Loads the default model before the first visitor when that needs no download (a
    checkpoint, or a cached registered model), so a bad file or setting is said at start."""
    if self.checkpoint is not None or registry.is_cached(registry.entry(self.default)):
      self.separator(self.default, overlap)

  def separator(self, name: str, overlap: float) -> Separator:
    """The separator of model `name` at `overlap`, loading the model on its first use.

    Raises RegistryError (unknown name, failed download), CheckpointError, or ValueError for a
    bad setting, each in one line. The tqdm bar of a download is the registry's.
    """
    with self._lock:
      key = (name, float(overlap))
      if key in self._separators:
        return self._separators[key]
      base = self._loaded.get(name)
      if base is None:
        if self.checkpoint is not None:
          if name != self.default:
            raise ValueError(f"this page serves {self.default} only, not {name!r}")
          base = Separator.from_checkpoint(self.checkpoint, overlap=overlap, **self._settings)
        else:
          base = Separator.from_pretrained(name, overlap=overlap, progress=True,
                                           **self._settings)
        self._loaded[name] = base
      # Another overlap only changes the cross-fade around the same jitted model function.
      separator = Separator(base.model_fn, sample_rate=base.sample_rate, channels=base.channels,
                            segment=base.segment, overlap=overlap, batch_size=base.batch_size,
                            fixed_batch=base.fixed_batch, stems=base.model_stems)
      separator.dtype = base.dtype
      self._separators[key] = separator
      return separator


@dataclasses.dataclass
class Result:
  """One separated upload: `outputs` {stem: file} in `ordered_stems` order, the `spectrogram`
  PNG and a `summary` line."""
  outputs: dict[str, str]
  spectrogram: str
  summary: str


class Page:
  """The separations of a page: each upload checked, separated into a fresh folder, drawn.

  Outputs go to a folder of the request under one temporary folder of the process; Gradio
  copies what it serves into its own cache, so the folders of earlier requests are removed when
  the next one starts (`build_app` runs one request at a time).
  """

  def __init__(self, models: Models, *, max_minutes: float = 30.0):
    if not max_minutes > 0:
      raise ValueError(f"--max_minutes must be positive, got {max_minutes}")
    self.models = models
    self.max_minutes = max_minutes
    self._root = tempfile.TemporaryDirectory(prefix="bsmamba2-webui-")

  def separate(self, path: str | None, name: str, fmt: str = "wav", bit_depth: str = "24",
               overlap: float = 0.25,
               status: Callable[[str], None] = lambda message: None) -> Result:
    """Separates the audio file at `path` (an upload) with model `name` into `fmt` files.

    `status(message)` is told each step. Raises ValueError in one line (InputError naming the
    upload by its file name, RegistryError, CheckpointError, a bad format or overlap).
    """
    if not path:
      raise InputError("no audio: upload a song or record one first")
    track = os.path.basename(path)
    fmt, bit_depth = str(fmt).lower(), str(bit_depth).lower()
    check_format(fmt, bit_depth)
    try:
      reader = AudioReader(path)
      seconds = reader.frames / reader.sample_rate
      reader.close()
      if seconds > 60 * self.max_minutes:
        raise InputError(f"{path}: {seconds / 60:.1f} minutes is longer than this page's limit "
                         f"of {self.max_minutes:g} minutes (bsmamba2-webui --max_minutes); "
                         "bsmamba2-separate takes any length")
      status(f"loading {name}")
      separator = self.models.separator(name, overlap)
      for old in os.listdir(self._root.name):
        shutil.rmtree(os.path.join(self._root.name, old), ignore_errors=True)
      folder = tempfile.mkdtemp(dir=self._root.name)
      outputs = output_paths(path, folder, TEMPLATE, fmt, ordered_stems(separator.stems))
      status(f"separating {track}")
      start = time.perf_counter()
      result = separate_file(separator, path, outputs, fmt=fmt, bit_depth=bit_depth)
    except InputError as e:  # the upload's temporary path says nothing to the visitor
      raise InputError(str(e).replace(path, track)) from None
    wall = time.perf_counter() - start
    status("drawing the spectrograms")
    shown = next(iter(outputs))
    spectrogram = os.path.join(folder, "spectrograms.png")
    _spectrograms([("mixture", path), (shown, outputs[shown])], spectrogram, folder)
    summary = (f"{track}: {result.seconds:.1f} s of audio separated in {wall:.1f} s by {name} "
               f"({separator.dtype}, overlap {overlap:g})")
    return Result(outputs, spectrogram, summary)


def _spectrograms(panels: Sequence[tuple[str, str]], path: str, folder: str) -> None:
  """`plots.spectrograms` of the first SPECTROGRAM_SECONDS of each (title, audio file) of
  `panels`, read through `AudioReader` (any input format) into WAV excerpts in `folder`."""
  import soundfile as sf  # pylint: disable=g-import-not-at-top

  from bsmamba2_jax import plots  # pylint: disable=g-import-not-at-top
  excerpts = []
  for i, (title, audio) in enumerate(panels):
    reader = AudioReader(audio)
    block = next(reader.blocks(int(SPECTROGRAM_SECONDS * reader.sample_rate)))
    reader.close()
    excerpt = os.path.join(folder, f".excerpt{i}.wav")
    sf.write(excerpt, block.T, reader.sample_rate, subtype="FLOAT")
    seconds = reader.frames / reader.sample_rate
    excerpts.append((title + (f" (first {SPECTROGRAM_SECONDS:g} s)"
                              if seconds > SPECTROGRAM_SECONDS else ""), excerpt))
  plots.spectrograms(excerpts, path)


def build_app(page: Page, *, overlap: float = 0.25):
  """The queued Gradio Blocks of `page`, `overlap` its initial setting (the format and bit
  depth start as the CLI's: WAV, 24-bit). Launch it with `.launch(server_name=...,
  server_port=...)`."""
  os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read when gradio is imported: no requests
  import gradio as gr  # pylint: disable=g-import-not-at-top

  def separate(song, model, output_format, bit_depth, overlap,
               progress=gr.Progress(track_tqdm=True)):
    """The "/separate" event: the files of the first two stems, of every stem, the
    spectrogram and the summary; or one line of error."""
    try:
      result = page.separate(song, model, output_format, bit_depth, overlap,
                             status=lambda message: progress(None, desc=message))
    except ValueError as e:  # InputError, RegistryError, CheckpointError, settings
      raise gr.Error(" ".join(str(e).split()), duration=None, print_exception=False) from None
    files = list(result.outputs.values())
    return files[0], files[1], files, result.spectrogram, result.summary

  def labels(model):
    """The players named after the stems they play (a model of other stems than vocals)."""
    stems = page.models.stems(model)
    return gr.Audio(label=stems[0]), gr.Audio(label=stems[1])

  with gr.Blocks(title="BSMamba2 separation", analytics_enabled=False,
                 delete_cache=(600, KEEP_SERVED_S)) as demo:
    gr.Markdown("## BSMamba2 source separation\nDrop a song (or record one), choose the model "
                "and press Separate: the stems play below and download as files.")
    with gr.Row():
      with gr.Column():
        song = gr.Audio(sources=["upload", "microphone"], type="filepath", label="song",
                        elem_id="song")
        choices = page.models.choices()
        model = gr.Dropdown(choices, value=page.models.default, label="model",
                            interactive=len(choices) > 1, elem_id="model")
        with gr.Row():
          format_box = gr.Dropdown(list(FORMATS), value="wav", label="output format",
                                   elem_id="format")
          depth_box = gr.Dropdown(list(BIT_DEPTHS), value="24",
                                  label="bit depth (WAV, FLAC)", elem_id="bit_depth")
        overlap_box = gr.Slider(0.0, 0.9, value=overlap, step=0.05,
                                label="overlap of the chunks (0: the official mode)",
                                elem_id="overlap")
        button = gr.Button("Separate", variant="primary", elem_id="separate")
      with gr.Column():
        first = gr.Audio(label="vocals", type="filepath", interactive=False, elem_id="stem0")
        second = gr.Audio(label=RESIDUAL, type="filepath", interactive=False, elem_id="stem1")
        files = gr.File(label="every stem", file_count="multiple", interactive=False,
                        elem_id="files")
        picture = gr.Image(label="spectrograms", type="filepath", interactive=False,
                           elem_id="spectrogram")
        summary = gr.Markdown(label="summary", elem_id="summary")
    button.click(separate, [song, model, format_box, depth_box, overlap_box],
                 [first, second, files, picture, summary], api_name="separate").success(
                     labels, model, [first, second], queue=False, show_progress="hidden",
                     api_visibility="private")
    # The labels say which registered models are cached when the page opens (the event does
    # not queue behind a separation).
    if page.models.checkpoint is None:
      demo.load(lambda: gr.Dropdown(choices=page.models.choices()), outputs=model, queue=False,
                show_progress="hidden", api_visibility="private")
  return demo.queue(default_concurrency_limit=1)
