"""Benchmark: jitted `k_step_returns` vs a NumPy loop and a PyTorch loop.

B = 64, T in {128, 512, 2048}, K in {1, 4, 16}. The NumPy loop is SPEC §2
position by position (vectorised over the batch); the PyTorch one
(`benchmarks.torch_ref.k_step_returns`) is the same backward loop over
positions written with torch tensors, the way the authors' algorithm is
expressed. JAX compilation is timed separately; steady state is the median of
repeated calls, the three sides interleaved. Prints a table and writes
benchmarks/results/returns.json.

    python -m benchmarks.returns [--device=cpu|gpu|tpu] [--repeats 20] [--quick]
"""

import argparse
import time

import jax
import numpy as np
import torch

from benchmarks import common
from benchmarks import torch_ref
from ketchup_jax import returns

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


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  common.add_common_flags(parser)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--lengths", default="128,512,2048")
  parser.add_argument("--ks", default="1,4,16")
  args = parser.parse_args(argv)
  if args.quick:
    args.repeats, args.batch, args.lengths, args.ks = 2, 4, "16", "1,4"
  common.set_torch_threads(args.threads)
  device = common.jax_device(args.device)
  tdev = common.torch_device(args.device)
  info = common.machine_info(args.device)

  rng = np.random.default_rng(0)
  rows = []
  print(f"returns: jax {device.device_kind}, torch {tdev}, B={args.batch},"
        f" load {info['load_average_start']}", flush=True)
  for t_size in [int(t) for t in args.lengths.split(",")]:
    lengths = rng.integers(t_size // 2, t_size + 1, size=args.batch)
    mask = (np.arange(t_size)[None] < lengths[:, None]).astype(np.int32)
    q = rng.normal(size=(args.batch, t_size)).astype(np.float32) * mask
    v = (q + rng.exponential(size=q.shape).astype(np.float32)) * mask
    q_dev, v_dev, m_dev = (jax.device_put(x, device) for x in (q, v, mask))
    q_t, v_t = torch.tensor(q, device=tdev), torch.tensor(v, device=tdev)
    len_t = torch.tensor(lengths, device=tdev)
    for k in [int(k) for k in args.ks.split(",")]:
      # The jitted core, as the RL step calls it inside its own jit.
      fn = jax.jit(lambda q, v, m, k=k: returns.k_step_returns(q, v, m, k))
      start = time.perf_counter()
      compiled = fn.lower(q_dev, v_dev, m_dev).compile()
      compile_s = time.perf_counter() - start

      def run_jax(compiled=compiled):
        return compiled(q_dev, v_dev, m_dev).block_until_ready()

      def run_torch(k=k):
        out = torch_ref.k_step_returns(q_t, v_t, len_t, k)
        if tdev == "cuda":
          torch.cuda.synchronize()
        return out

      def run_numpy(k=k):
        return numpy_k_step(q, v, lengths, k)

      warm, times, outs = common.interleaved(
          {"jax": run_jax, "torch": run_torch, "numpy": run_numpy},
          args.repeats)
      want = outs["numpy"]
      np.testing.assert_allclose(np.asarray(outs["jax"]), want, rtol=1e-4,
                                 atol=1e-3)
      np.testing.assert_allclose(outs["torch"].cpu().numpy(), want, rtol=1e-4,
                                 atol=1e-3)
      jax_s, torch_s, np_s = (common.median(times[n])
                              for n in ("jax", "torch", "numpy"))
      rows.append({"batch": args.batch, "T": t_size, "K": k,
                   "compile_ms": compile_s * 1e3,
                   "jax_warmup_ms": warm["jax"] * 1e3,
                   "jax_ms": jax_s * 1e3, "torch_ms": torch_s * 1e3,
                   "numpy_ms": np_s * 1e3,
                   "speedup_vs_torch": torch_s / jax_s,
                   "speedup_vs_numpy": np_s / jax_s})
  common.print_table(
      "returns: k_step_returns, median ms per call",
      [("T", "T", "d"), ("K", "K", "d"), ("compile_ms", "compile ms", ".1f"),
       ("jax_ms", "jax ms", ".3f"), ("torch_ms", "torch ms", ".2f"),
       ("numpy_ms", "numpy ms", ".2f"),
       ("speedup_vs_torch", "vs torch", ".1f"),
       ("speedup_vs_numpy", "vs numpy", ".1f")], rows)
  common.write_json("returns", {**info, "repeats": args.repeats,
                                "rows": rows}, args.out)


if __name__ == "__main__":
  main()
