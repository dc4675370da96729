"""Benchmark: jitted `k_step_returns` against a NumPy loop over positions.

B = 64, T in {128, 512, 2048, 4096}, K in {1, 4, 16}. Compilation is timed
separately from the steady state; the steady state is the median of repeated
calls. Prints a table and writes benchmarks/results/returns.json.

    python -m benchmarks.returns [--repeats 20]
"""

import argparse
import json
import pathlib
import platform
import statistics
import time

import jax
import numpy as np

from ketchup_jax import returns

RESULTS = pathlib.Path(__file__).parent / "results"


def numpy_k_step(q, v, lengths, k):
  """SPEC §2 as a loop over positions, vectorised over the batch."""
  b_size, t_size = q.shape
  out = np.zeros_like(q)
  rows = np.arange(b_size)
  big_t = lengths - 1
  out[rows, big_t] = q[rows, big_t]
  for t in range(t_size - 2, -1, -1):
    live = t < big_t
    n = np.minimum(t + k, big_t)
    out[:, t] = np.where(live, q[:, t] - v[rows, n] + out[rows, n], out[:, t])
  return out


def median_seconds(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--batch", type=int, default=64)
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  rows = []
  print(f"device: {jax.devices()[0].device_kind}, B={args.batch}")
  print(f"{'T':>5} {'K':>3} {'compile ms':>10} {'jax ms':>8} {'numpy ms':>9} "
        f"{'speed-up':>8}")
  for t_size in (128, 512, 2048, 4096):
    lengths = rng.integers(t_size // 2, t_size + 1, size=args.batch)
    mask = (np.arange(t_size)[None] < lengths[:, None]).astype(np.int32)
    q = rng.normal(size=(args.batch, t_size)).astype(np.float32) * mask
    v = (q + rng.exponential(size=q.shape).astype(np.float32)) * mask
    q_dev, v_dev, m_dev = map(jax.device_put, (q, v, mask))
    for k in (1, 4, 16):
      # The jitted core, as the RL step calls it inside its own jit.
      fn = jax.jit(lambda q, v, m, k=k: returns.k_step_returns(q, v, m, k))
      start = time.perf_counter()
      got = fn(q_dev, v_dev, m_dev).block_until_ready()
      compile_s = time.perf_counter() - start
      jax_s = median_seconds(
          lambda: fn(q_dev, v_dev, m_dev).block_until_ready(), args.repeats)
      want = numpy_k_step(q, v, lengths, k)
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
      np_s = median_seconds(lambda: numpy_k_step(q, v, lengths, k),
                            max(3, args.repeats // 5))
      rows.append({"batch": args.batch, "T": t_size, "K": k,
                   "compile_ms": compile_s * 1e3, "jax_ms": jax_s * 1e3,
                   "numpy_ms": np_s * 1e3})
      print(f"{t_size:>5} {k:>3} {compile_s * 1e3:>10.1f} {jax_s * 1e3:>8.3f} "
            f"{np_s * 1e3:>9.2f} {np_s / jax_s:>7.1f}x")
  RESULTS.mkdir(exist_ok=True)
  out = RESULTS / "returns.json"
  out.write_text(json.dumps({
      "device": jax.devices()[0].device_kind,
      "machine": platform.machine(), "jax": jax.__version__,
      "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
