"""Training-state checkpoints: keep last/best, and resuming from the newest one that restores."""
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bsmamba2_jax.errors import CheckpointError
from bsmamba2_jax.training import steps
from bsmamba2_jax.training.checkpoints import DAMAGED_SUFFIX, TrainingCheckpoints


def _assert_trees_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _state(step=0, size=6):
  optimizer = steps.make_optimizer(ml_collections.ConfigDict(dict(
      lr=1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, clip=3.0, warmup_steps=0,
      schedule="constant", no_decay_mask=True, accumulate=2)), num_steps=10)
  # Random values: incompressible, stored as raw bytes (where a flipped bit raises nothing).
  params = {"w": jnp.asarray(np.random.default_rng(step).standard_normal(size), jnp.float32),
            "A_log": jnp.ones(2)}
  state = steps.TrainState.create(params, optimizer, jax.random.PRNGKey(3))
  return jax.device_get(state.replace(step=jnp.asarray(step, jnp.int32)))


def test_training_checkpoints_keep_last_and_best(tmp_path):
  state = _state()
  manager = TrainingCheckpoints(tmp_path / "ckpt", keep_last=2, keep_best=1)
  usdr = {1: 5.0, 2: 9.0, 3: 1.0, 4: 2.0, 5: None, 6: None}
  saved = {}
  for step, value in usdr.items():
    saved[step] = state = _state(step)
    manager.save(step, state, meta={"data_position": step},
                 metrics=None if value is None else {"usdr": value})
  assert manager.all_steps() == [2, 5, 6]  # Best uSDR (step 2) plus the last two.
  assert manager.latest_step() == 6
  restored, meta = manager.restore(state)
  assert meta == {"data_position": 6}
  _assert_trees_equal(state, restored)
  best, _ = manager.restore(state, step=manager.best_step())
  _assert_trees_equal(saved[2], best)
  assert isinstance(best.opt_state, type(state.opt_state))
  manager.close()
  reopened = TrainingCheckpoints(tmp_path / "ckpt", keep_last=2, keep_best=1)
  assert reopened.latest_step() == 6 and reopened.best_step() == 2
  reopened.save(7, state, meta={"data_position": 7}, metrics={"usdr": 0.0})
  assert reopened.all_steps() == [2, 6, 7]  # Step 2 stays best across the restart.
  reopened.close()


def _saved(folder, steps_to_save=(10, 20, 30), size=20_000):
  manager = TrainingCheckpoints(folder, keep_last=5, keep_best=0)
  for step in steps_to_save:
    manager.save(step, _state(step, size), meta={"data_position": step})
  manager.close()
  return TrainingCheckpoints(folder, keep_last=5, keep_best=0)


def _array_files(step_folder):
  """The files holding the state's array bytes (Orbax's OCDBT data files), largest first."""
  files = [os.path.join(root, name) for root, _, names in os.walk(step_folder)
           for name in names if f"{os.sep}d{os.sep}" in os.path.join(root, name)
           and f"{os.sep}state{os.sep}" in os.path.join(root, name)]
  return sorted(files, key=os.path.getsize, reverse=True)


def _flip(path, count=1):
  data = bytearray(open(path, "rb").read())
  for i in range(count):
    data[(i + 1) * len(data) // (count + 1)] ^= 0x10
  open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("damage", ["one bit in the largest array file", "every array file",
                                    "metadata", "truncated"])
def test_a_damaged_latest_checkpoint_is_named_skipped_and_the_previous_one_used(
    tmp_path, caplog, damage):
  folder = tmp_path / "checkpoints"
  manager = _saved(folder)
  latest = folder / "30"
  if damage == "one bit in the largest array file":  # restores without any error from Orbax
    _flip(_array_files(latest)[0])
  elif damage == "every array file":
    for path in _array_files(latest):
      _flip(path, count=8)
  elif damage == "metadata":
    _flip(latest / "state" / "_METADATA", count=20)
  else:
    for path in _array_files(latest):
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
  state, meta = manager.restore_newest(_state(size=20_000))
  assert meta["data_position"] == 20
  _assert_trees_equal(_state(20, 20_000), state)
  warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "root"]
  assert len(warned) == 1 and warned[0].startswith(f"{latest}: "), warned
  assert "skipped and renamed to 30" + DAMAGED_SUFFIX in warned[0]
  assert sorted(os.listdir(folder)) == ["10", "20", "30" + DAMAGED_SUFFIX]  # kept, set aside
  manager.save(30, _state(31, 20_000), meta={"data_position": 30})  # written anew, not skipped
  assert manager.all_steps() == [10, 20, 30]
  manager.close()


def test_no_checkpoint_that_restores_stops_in_one_line_and_renames_nothing(tmp_path, caplog):
  folder = tmp_path / "checkpoints"
  manager = _saved(folder, steps_to_save=(10, 20))
  for step in ("10", "20"):
    _flip(_array_files(folder / step)[0])
  with pytest.raises(CheckpointError) as error:
    manager.restore_newest(_state(size=20_000))
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith(f"{folder}: none of its 2 checkpoint(s) restores (newest: "
                            f"{folder / '20'}: ")
  assert "move the folder away or choose another --workdir" in message
  assert sorted(os.listdir(folder)) == ["10", "20"]  # a second attempt stops again
  assert len([r for r in caplog.records if r.levelname == "WARNING" and r.name == "root"]) == 2
  manager.close()


def test_a_half_written_checkpoint_is_skipped(tmp_path, caplog):
  """A run killed while saving leaves Orbax's temporary folder; the one before it is used."""
  folder = tmp_path / "checkpoints"
  manager = _saved(folder, steps_to_save=(10,))
  os.makedirs(folder / "20.orbax-checkpoint-tmp-1765000000")
  _, meta = manager.restore_newest(_state(size=20_000))
  assert meta["data_position"] == 10
  assert "20.orbax-checkpoint-tmp-1765000000: half written" in caplog.text
  manager.close()
  assert TrainingCheckpoints(tmp_path / "empty").restore_newest(_state()) is None


def test_after_a_failed_restore_only_the_abandoned_reads_are_silenced(caplog, monkeypatch):
  import logging
  import sys

  from bsmamba2_jax import errors
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))
  asyncio_log = logging.getLogger("asyncio")
  monkeypatch.setattr(asyncio_log, "filters", [])
  errors.ignore_abandoned_reads()
  errors.ignore_abandoned_reads()  # twice: one filter, one hook
  assert len(asyncio_log.filters) == 1
  with caplog.at_level(logging.ERROR, logger="asyncio"):
    asyncio_log.error("Task exception was never retrieved\nfuture: <Task finished>")
    asyncio_log.error("Future exception was never retrieved")
    asyncio_log.error("something else went wrong")
  assert [r.getMessage() for r in caplog.records] == ["something else went wrong"]
  unraisable = lambda e: type("U", (), {"exc_value": e})()
  sys.unraisablehook(unraisable(RuntimeError("Event loop is closed")))
  sys.unraisablehook(unraisable(RuntimeError("another")))
  assert [str(e) for e in seen] == ["another"]
