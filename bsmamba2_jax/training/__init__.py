"""Training as a library: what `python -m experiments.train` runs, in modules of one idea each.

  steps        the train state, optimiser, EMA and the pure (pmap-able) train / eval steps
  loop         `train_and_evaluate`: the experiment, the loop, signals, multi-host agreement
  validation   scoring the EMA model on the validation split
  workdir      the run folder: its lock, the recorded config and what a resume must share
  checkpoints  Orbax training-state checkpoints, resuming from the newest that restores
  logs         metrics.csv and TensorBoard, each step logged once across resumes
  export       a run's EMA (or raw) weights as an inference export

The recipe these implement is docs/training.md.
"""
