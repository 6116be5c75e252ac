"""The script behind 2026-11-26-h200-3.md (a record, not part of the package).

Phases named on the command line run in order, each printing one JSON row as it ends (the
`-call1.jsonl` / `-call2.jsonl` files beside this one). Run from the repository root with
ml_collections, soundfile (+ cffi) and soxr importable:
  python benchmarks/results/2026-11-26-h200-3-lease.py env,b1,b1blk,separate,b5r
The train phases build the launcher's pmapped `train_step` (as `experiments.benchmarks.train`
does) and time lowering, compiling and 5 steps; `b1` also records a 2-step profile
(jax.profiler) and sums GPU kernel time per HLO op. `b1blk` forces the CPU's blocked time path
(`ssd._sequences_per_block` as on "cpu") for an A/B in one process. The first call ran an
earlier copy without `b1blk`. LEASE_PRESET=tiny LEASE_SECONDS=1 make a quick CPU dry run;
output goes under $OUT.
"""
import collections, glob, gzip, json, os, re, shutil, subprocess, sys, time
OUT = os.environ.get("OUT") or "/tmp/lease_out"
os.makedirs(OUT, exist_ok=True)
PRESET = os.environ.get("LEASE_PRESET", "paper")
SECONDS = float(os.environ.get("LEASE_SECONDS", "8"))
SEP_SECONDS = float(os.environ.get("LEASE_SEP_SECONDS", "60"))
T0 = time.time()
import jax, jax.numpy as jnp, numpy as np
CACHE = "/tmp/jcc"
if os.path.isdir(".jcc"):
  shutil.copytree(".jcc", CACHE, dirs_exist_ok=True)
jax.config.update("jax_compilation_cache_dir", CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
LOG = open(os.path.join(OUT, "rows.jsonl"), "a")

def emit(**row):
  row["t"] = round(time.time() - T0, 1)
  s = json.dumps(row, default=str)
  print(s, flush=True); LOG.write(s + "\n"); LOG.flush()

def block(x):
  return jax.tree_util.tree_map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)

def times(fn, n, warm=1):
  for _ in range(warm): block(fn())
  out = []
  for _ in range(n):
    s = time.perf_counter(); block(fn()); out.append(time.perf_counter() - s)
  return out

def env():
  import flax, optax
  emit(phase="env", devices=str(jax.devices()), jax=jax.__version__, flax=flax.__version__,
       optax=optax.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""))
  try:
    emit(phase="smi", text=subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm", "--format=csv"], capture_output=True, text=True).stdout)
  except OSError as e:
    emit(phase="smi", error=str(e))

def matmul():
  for dt, n in ((jnp.float32, 8192), (jnp.bfloat16, 8192)):
    if jax.default_backend() == "cpu": n = 1024
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dt); b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dt)
    f = jax.jit(lambda a, b: a @ b)
    t = np.median(times(lambda: f(a, b), 20, 3))
    emit(phase="matmul", dtype=str(dt.dtype if hasattr(dt, "dtype") else dt), n=n, median_s=t, tflops=2 * n**3 / t / 1e12)

# --- attribution of GPU kernel time to the model's parts, via the optimized HLO's metadata ---
INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*op_name=\"([^\"]*)\"")
def op_names(hlo_text):
  names = {}
  for line in hlo_text.splitlines():
    m = INSTR.match(line)
    if m: names[m.group(1)] = m.group(2)
  return names

PARTS = (("ssd", "scan"), ("_ssd", "scan"), ("band_split", "band_split"), ("mask_estimator", "mask"),
         ("conv1d", "conv"), ("in_proj", "in_proj"), ("out_proj", "out_proj"), ("norm", "norms"),
         ("linear", "bimamba_linear"), ("stft", "stft"), ("loss", "loss"), ("optax", "optimizer"),
         ("adam", "optimizer"), ("clip", "optimizer"), ("ema", "ema"), ("fft", "stft"),
         ("silu", "activations"), ("bsmamba2", "model_other"))
def part(op_name):
  low = op_name.lower()
  direction = "bwd" if "transpose(" in low else "fwd"
  for key, name in PARTS:
    if key in low: return name, direction
  return "outside_model", direction

def attribute(xplane_path, hlo_text, tag):
  names = op_names(hlo_text)
  pd = jax.profiler.ProfileData.from_file(xplane_path)
  by_op = collections.defaultdict(lambda: [0.0, 0, ""])
  sample = []
  unnamed = collections.Counter()  # events that name no HLO op (memcpy, runtime)
  total = 0.0
  for plane in pd.planes:
    if not plane.name.startswith(os.environ.get("LEASE_PLANE", "/device:GPU")): continue
    for line in plane.lines:
      if not any(k in line.name for k in os.environ.get("LEASE_LINES", "Stream,stream").split(",")): continue
      for ev in line.events:
        stats = {k: v for k, v in ev.stats}
        if len(sample) < 3: sample.append(dict(line=line.name, name=ev.name, stats={k: str(v)[:80] for k, v in stats.items()}))
        if "hlo_op" not in stats:
          unnamed[ev.name[:60]] += ev.duration_ns / 1e6
          continue
        op = str(stats["hlo_op"])
        by_op[op][0] += ev.duration_ns / 1e6; by_op[op][1] += 1; by_op[op][2] = ev.name[:60]
        total += ev.duration_ns / 1e6
  parts = collections.defaultdict(float)
  rows = []
  for op, (ms, n, kernel) in by_op.items():
    name = names.get(op, "")
    p, d = part(name)
    parts[f"{p}/{d}"] += ms
    rows.append(dict(op=op, ms=ms, n=n, kernel=kernel, op_name=name[-160:], part=f"{p}/{d}"))
  rows.sort(key=lambda r: -r["ms"])
  with gzip.open(os.path.join(OUT, f"ops-{tag}.json.gz"), "wt") as f:
    json.dump(dict(rows=rows, sample=sample, total_ms=total), f)
  emit(phase="profile", tag=tag, kernel_ms_total=total, unnamed=unnamed.most_common(5), sample=sample[:2],
       parts={k: round(v, 2) for k, v in sorted(parts.items(), key=lambda kv: -kv[1])})
  for r in rows[:25]:
    print(f"  {r['ms']:8.2f} ms {r['n']:5d}x {r['part']:22s} {r['kernel'][:40]:40s} {r['op_name'][-90:]}", flush=True)

def train(batch=1, remat=False, chunk=None, profile=False, tag="b1", force_blocks=False):
  from bsmamba2_jax import ssd
  orig = ssd._sequences_per_block
  if force_blocks:  # the CPU's blocking, as before the change
    ssd._sequences_per_block = lambda b, s, c, st, platform: orig(b, s, c, st, "cpu")
  jax.clear_caches()
  try:
    _train(batch, remat, chunk, profile, tag)
  finally:
    ssd._sequences_per_block = orig

def _train(batch, remat, chunk, profile, tag):
  from experiments import train as T
  from experiments.benchmarks import limit, scaling
  from experiments.benchmarks.train import experiment_config
  config = experiment_config(PRESET, batch, SECONDS, False, False, None if jax.default_backend() != "cpu" else "float32")
  if remat: config.model.overrides.remat = True
  if chunk: config.model.overrides.chunk_size = chunk
  ex = T.Experiment(config); cfg = ex.model_config
  samples = T.segment_samples(SECONDS, cfg.sample_rate)
  rng = np.random.default_rng(0)
  mix = (0.1 * rng.standard_normal((1, batch, cfg.audio_channels, samples))).astype(np.float32)
  data = dict(mixture=mix, vocals=(0.5 * mix).astype(np.float32))
  state = T.replicate(ex.init_state(), 1)
  s = time.perf_counter(); lowered = ex.train_step.lower(state, data); lower_s = time.perf_counter() - s
  s = time.perf_counter(); compiled = lowered.compile(); compile_s = time.perf_counter() - s
  stats = scaling.compile_stats(compiled)
  box = [state]
  def step():
    box[0], m = compiled(box[0], data); return m
  last = {}
  def step_keep():
    last["m"] = step(); return last["m"]
  ts = times(step_keep, 5, 1)
  gflop = 3 * limit.model_flops(cfg, batch, samples)["total"] / 1e9
  med = float(np.median(ts))
  emit(phase="train", tag=tag, preset=PRESET, batch=batch, seconds=SECONDS, remat=remat, chunk=cfg.chunk_size,
       precision=config.precision, blocks=tag.endswith("blk"), lower_s=lower_s, compile_s=compile_s, median_s=med, min_s=min(ts), max_s=max(ts),
       examples_per_s=batch / med, analytic_gflop=gflop, tflops=gflop / med / 1e3,
       peak_gb=None if stats["peak_bytes"] is None else stats["peak_bytes"] / 1e9,
       metrics={k: float(np.asarray(v).ravel()[0]) for k, v in last["m"].items()} if isinstance(last["m"], dict) else None)
  if profile:
    d = f"/tmp/prof-{tag}"
    with jax.profiler.trace(d):
      for _ in range(2): block(step())
    p = sorted(glob.glob(f"{d}/**/*.xplane.pb", recursive=True))[-1]
    try:
      attribute(p, compiled.as_text(), tag)
    except Exception as e:  # keep going: the raw trace comes back anyway
      emit(phase="profile", tag=tag, error=repr(e)[:300])
    with open(p, "rb") as f, gzip.open(os.path.join(OUT, f"xplane-{tag}.pb.gz"), "wb") as g:
      shutil.copyfileobj(f, g)
    with gzip.open(os.path.join(OUT, f"hlo-{tag}.txt.gz"), "wt") as g:
      g.write(compiled.as_text())

def separate():
  from experiments.benchmarks.separate import _random_params
  from bsmamba2_jax.model import BSMamba2, ModelConfig
  from bsmamba2_jax.separation import Separator
  audio = (0.1 * np.random.default_rng(0).standard_normal((2, int(SEP_SECONDS * 44100)))).astype(np.float32)
  outs = {}  # vocals of each precision
  for dtype in ("bfloat16", "float32"):
    config = ModelConfig.preset(PRESET, dtype=dtype)
    sep = Separator.from_model(BSMamba2(config), _random_params(config), segment=8.0, overlap=0.25, batch_size=1)
    s = time.perf_counter(); sep.separate(audio[:, :sep.segment_samples], 44100); compile_s = time.perf_counter() - s
    ts = []
    for _ in range(3):
      s = time.perf_counter(); out = sep.separate(audio, 44100); ts.append(time.perf_counter() - s)
    outs[dtype] = np.asarray(out["vocals"] if isinstance(out, dict) else out)
    emit(phase="separate", preset=PRESET, dtype=dtype, audio_s=SEP_SECONDS, compile_s=compile_s,
         median_s=float(np.median(ts)), realtime=SEP_SECONDS / float(np.median(ts)), shape=outs[dtype].shape)
  ref, est = outs["float32"].astype(np.float64), outs["bfloat16"].astype(np.float64)
  err = np.linalg.norm(est - ref) / np.linalg.norm(ref)
  emit(phase="separate_bf16_vs_fp32", rel_error=float(err), sdr_db=float(-20 * np.log10(err)),
       finite=bool(np.isfinite(est).all()))

def scan():
  from experiments.benchmarks import precision
  for r in precision.scan_rows(62, 801 if PRESET == "paper" else 101):
    emit(phase="scan_precision", **{k: v for k, v in r.items() if k != "repeats"})

def save_cache():
  if os.path.isdir(CACHE):
    subprocess.run(["tar", "czf", os.path.join(OUT, "jcc.tgz"), "-C", CACHE, "."])
    emit(phase="cache", bytes=os.path.getsize(os.path.join(OUT, "jcc.tgz")), files=len(os.listdir(CACHE)))

PHASES = dict(env=env, matmul=matmul, separate=separate, scan=scan, cache=save_cache,
              b1=lambda: train(1, profile=True, tag="b1"),
              b1c128=lambda: train(1, chunk=128, profile=True, tag="b1c128"),
              b5r=lambda: train(5, remat=True, tag="b5r"),
              b2=lambda: train(2, tag="b2"),
              b1blk=lambda: train(1, tag="b1blk", force_blocks=True))
for name in sys.argv[1].split(","):
  try:
    PHASES[name]()
  except Exception as e:
    import traceback; traceback.print_exc()
    emit(phase=name, error=repr(e)[:500])
emit(phase="done")
