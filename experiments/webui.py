"""The web page of separation: `bsmamba2-webui`, then open http://127.0.0.1:7860.

  bsmamba2-webui                                  # every registered model; bsmamba2-vocals chosen
  bsmamba2-webui --checkpoint=exports/mine --port=8080
  bsmamba2-webui --host=0.0.0.0 --max_minutes=10  # reachable from the network, shorter songs

A visitor drops or records a song, chooses the model (a registered one is downloaded on first
use, with its progress in the page), the output format and the overlap, and gets players,
downloads and spectrograms of the stems (`bsmamba2_jax.webui`; the API's endpoint is
"/separate"). It serves 127.0.0.1 only unless --host says otherwise, and makes a public
gradio.live link only with --share. Needs the `web` extra: pip install "bsmamba2-jax[web]".
"""
from __future__ import annotations

import signal
import sys

from absl import app, flags, logging

from bsmamba2_jax import registry, runtime
from experiments import cli

_MODEL = flags.DEFINE_string("model", registry.DEFAULT_MODEL, "The registered model the page "
                             "starts with (every registered model can be chosen).",
                             short_name="n")
_CHECKPOINT = cli.DEFINE_path(
    "checkpoint", None, "Instead of the registered models: the only model of the page, an "
    "export folder or a PyTorch .ckpt.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to serve on (0.0.0.0: every "
                            "network interface of this machine).")
_PORT = flags.DEFINE_integer("port", 7860, "Port to serve on.")
_SHARE = flags.DEFINE_bool("share", False, "Also make a public gradio.live link (through "
                           "Gradio's servers).")
_MAX_MINUTES = flags.DEFINE_float("max_minutes", 30.0, "Longest song the page separates, in "
                                  "minutes (read from the file's header before separating).")
_DEVICE = flags.DEFINE_string("device", None, "cpu, gpu or gpu:N (default: JAX's first device).")
_PRECISION = flags.DEFINE_enum(
    "precision", "auto", ["auto", "float32", "bfloat16"],
    "How the matmuls compute, as bsmamba2-separate's --precision (docs/separation.md).")
_SEGMENT = flags.DEFINE_float("segment", 8.0, "Chunk length in seconds.")
_OVERLAP = flags.DEFINE_float("overlap", 0.25, "The page's initial chunk overlap, in [0, 1).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 1, "Chunks per model call.")


def _interrupt(signum, frame):
  """SIGTERM handled as Ctrl-C: Gradio closes its server and the temporary files go."""
  del frame
  raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; --help lists the options")
  runtime.configure(compilation_cache=True, verbose=cli.verbose(), inference=True)
  from bsmamba2_jax import webui  # pylint: disable=g-import-not-at-top
  try:
    models = webui.Models(_CHECKPOINT.value, default=_MODEL.value, segment=_SEGMENT.value,
                          batch_size=_BATCH_SIZE.value, precision=_PRECISION.value,
                          device=_DEVICE.value)
    page = webui.Page(models, max_minutes=_MAX_MINUTES.value)
    models.load_default(_OVERLAP.value)
    demo = webui.build_app(page, overlap=_OVERLAP.value)
  except (ValueError, FileNotFoundError) as e:
    logging.error("%s", e)
    sys.exit(2)
  except ImportError as e:
    logging.error("bsmamba2-webui needs Gradio (%s): pip install \"bsmamba2-jax[web]\"", e)
    sys.exit(2)
  signal.signal(signal.SIGTERM, _interrupt)
  demo.launch(server_name=_HOST.value, server_port=_PORT.value, share=_SHARE.value)


def run():
  """Console-script entry point (`bsmamba2-webui`)."""
  cli.run(main)


if __name__ == "__main__":
  run()
