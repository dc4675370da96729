"""Shared pieces of the benchmarks: device flag, threads, timing, tables, JSON.

Every benchmark times its pairs (ours, the reference) alternately in one
process: warm-up (compilation for JAX, the allocator and kernels for PyTorch)
runs first and is reported separately; then each repetition times every side
once, so a slow phase of a shared machine lands on both. The reported figure
is the median over repetitions.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import time
from typing import Any, Callable

RESULTS = pathlib.Path(__file__).parent / "results"

DEVICES = ("cpu", "gpu", "tpu")


def add_common_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--device", choices=DEVICES, default="cpu",
                      help="JAX platform; the PyTorch side uses cuda for gpu"
                      " and the CPU otherwise.")
  parser.add_argument("--threads", type=int, default=os.cpu_count(),
                      help="torch.set_num_threads (XLA:CPU uses one thread"
                      " per core of the machine, its default).")
  parser.add_argument("--quick", action="store_true",
                      help="Tiny shapes and one repetition (smoke test).")
  parser.add_argument("--out", default=None,
                      help="JSON path (default benchmarks/results/NAME.json).")


def jax_device(name: str):
  """The first JAX device of platform `name` (clear error if there is none)."""
  import jax  # pylint: disable=g-import-not-at-top
  try:
    return jax.devices(name)[0]
  except RuntimeError as e:
    raise SystemExit(f"--device={name}: no such JAX backend here ({e}); use"
                     f" one of {[d.platform for d in jax.devices()]}") from e


def torch_device(name: str) -> str:
  return "cuda" if name == "gpu" else "cpu"


def set_torch_threads(n: int) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(n)


def load_average() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def machine_info(device: str) -> dict[str, Any]:
  info: dict[str, Any] = {
      "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
      "machine": platform.machine(), "cpu_count": os.cpu_count(),
      "device_flag": device, "load_average_start": load_average(),
  }
  try:
    info["cpu_model"] = next(
        line.split(":", 1)[1].strip()
        for line in open("/proc/cpuinfo") if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  try:
    import jax  # pylint: disable=g-import-not-at-top
    info["jax"] = jax.__version__
    info["jax_device_kind"] = jax_device(device).device_kind
  except ImportError:
    pass
  try:
    import torch  # pylint: disable=g-import-not-at-top
    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
  except ImportError:
    pass
  return info


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int,
                warmups: dict[str, Callable[[], Any]] | None = None
                ) -> tuple[dict[str, float], dict[str, list[float]],
                           dict[str, Any]]:
  """Warm-up of each side, then `repeats` alternating timed calls.

  Args:
    fns: Side name -> the timed call.
    repeats: Timed calls per side.
    warmups: Optional cheaper warm-up call per side (default: the call).

  Returns:
    (warmup seconds per side, per-repetition seconds per side, last outputs).
  """
  warmup, outputs = {}, {}
  for name, fn in fns.items():
    warmup[name], outputs[name] = timed((warmups or {}).get(name, fn))
  times: dict[str, list[float]] = {name: [] for name in fns}
  for rep in range(repeats):
    order = list(fns) if rep % 2 == 0 else list(fns)[::-1]
    for name in order:
      seconds, outputs[name] = timed(fns[name])
      times[name].append(seconds)
  return warmup, times, outputs


def median(xs: list[float]) -> float:
  return float(statistics.median(xs))


def quartiles(xs: list[float]) -> tuple[float, float, float]:
  """(first quartile, median, third quartile); inclusive method, so one
  value gives (x, x, x)."""
  if len(xs) < 2:
    return (float(xs[0]),) * 3
  q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
  return float(q1), float(q2), float(q3)


def ratio_stats(numerators: list[float], denominators: list[float],
                prefix: str = "ratio") -> dict[str, float]:
  """Median and interquartile range of the per-pair ratios n_i / d_i.

  Keys: `{prefix}_median_of_pairs`, `{prefix}_q1`, `{prefix}_q3`,
  `{prefix}_iqr` (= q3 - q1).
  """
  q1, q2, q3 = quartiles([n / d for n, d in zip(numerators, denominators)])
  return {f"{prefix}_median_of_pairs": q2, f"{prefix}_q1": q1,
          f"{prefix}_q3": q3, f"{prefix}_iqr": q3 - q1}


def print_table(title: str, columns: list[tuple[str, str, str]],
                rows: list[dict[str, Any]]) -> None:
  """`columns`: (key, header, format spec) triples."""
  print(f"\n== {title}")
  widths = [max(len(h), 10) for _, h, _ in columns]
  print(" ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths)))
  for row in rows:
    cells = []
    for (key, _, fmt), w in zip(columns, widths):
      value = row.get(key)
      cells.append(("-" if value is None else format(value, fmt)).rjust(w))
    print(" ".join(cells))


def write_json(name: str, payload: dict[str, Any], out: str | None) -> None:
  path = pathlib.Path(out) if out else RESULTS / f"{name}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  payload["load_average_end"] = load_average()
  path.write_text(json.dumps(payload, indent=1))
  print(f"wrote {path}")


def run_json_subprocess(args: list[str], timeout: float = 3600
                        ) -> dict[str, Any]:
  """Runs `python -m ...` and parses the last stdout line as JSON."""
  proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                        check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n"
                       f"{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


# T5 v1.0 shapes (ReLU feed-forward, tied embeddings), as transformers names
# them. `tiny-*` are for --quick.
T5_SHAPES: dict[str, dict[str, int]] = {
    "t5-small": dict(d_model=512, d_kv=64, d_ff=2048, num_layers=6,
                     num_heads=8, vocab_size=32128),
    "t5-base": dict(d_model=768, d_kv=64, d_ff=3072, num_layers=12,
                    num_heads=12, vocab_size=32128),
    "tiny-small": dict(d_model=64, d_kv=16, d_ff=128, num_layers=2,
                       num_heads=4, vocab_size=512),
    "tiny-base": dict(d_model=96, d_kv=16, d_ff=192, num_layers=3,
                      num_heads=6, vocab_size=512),
}


def save_random_t5(shape: str, path: str, seed: int) -> None:
  """A random-weight HF T5ForConditionalGeneration of `shape`, saved to path."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  s = T5_SHAPES[shape]
  torch.manual_seed(seed)
  cfg = transformers.T5Config(
      vocab_size=s["vocab_size"], d_model=s["d_model"], d_kv=s["d_kv"],
      d_ff=s["d_ff"], num_layers=s["num_layers"],
      num_decoder_layers=s["num_layers"], num_heads=s["num_heads"],
      feed_forward_proj="relu", dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
      eos_token_id=1, tie_word_embeddings=True)
  transformers.T5ForConditionalGeneration(cfg).save_pretrained(path)


# Decoder-only shapes, Qwen2 layout (q/k/v bias, grouped-query attention,
# gated SiLU feed-forward), as transformers' `Qwen2Config` names them: a
# student / teacher pair a few times smaller than T5-small / T5-base, with a
# small vocabulary so that a step runs in seconds on 2 cores. The student's
# LM head is tied (as Qwen1.5-0.5B), the teacher's is not (as Qwen1.5-4B).
DECODER_SHAPES: dict[str, dict[str, Any]] = {
    "qwen2-small": dict(hidden_size=512, intermediate_size=1408,
                        num_hidden_layers=8, num_attention_heads=8,
                        num_key_value_heads=2, vocab_size=8192,
                        tie_word_embeddings=True),
    "qwen2-base": dict(hidden_size=768, intermediate_size=2048,
                       num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=4, vocab_size=8192,
                       tie_word_embeddings=False),
    "tiny-qwen2-small": dict(hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=512,
                             tie_word_embeddings=True),
    "tiny-qwen2-base": dict(hidden_size=96, intermediate_size=192,
                            num_hidden_layers=3, num_attention_heads=6,
                            num_key_value_heads=2, vocab_size=512,
                            tie_word_embeddings=False),
}

SHAPES = (*T5_SHAPES, *DECODER_SHAPES)


def is_decoder(shape: str) -> bool:
  if shape not in T5_SHAPES and shape not in DECODER_SHAPES:
    raise SystemExit(f"unknown model shape {shape!r}; expected one of"
                     f" {list(SHAPES)}")
  return shape in DECODER_SHAPES


def save_random_decoder(shape: str, path: str, seed: int) -> None:
  """A random-weight HF Qwen2ForCausalLM of `shape`, saved to path (EOS 1,
  pad 0, no BOS)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  cfg = transformers.Qwen2Config(**DECODER_SHAPES[shape], eos_token_id=1,
                                 pad_token_id=0, bos_token_id=None)
  transformers.Qwen2ForCausalLM(cfg).eval().save_pretrained(path)


def save_random(shape: str, path: str, seed: int) -> None:
  """`save_random_t5` or `save_random_decoder`, by the shape's family."""
  if is_decoder(shape):
    save_random_decoder(shape, path, seed)
  else:
    save_random_t5(shape, path, seed)


def load_torch(shape: str, path: str):
  """The transformers model of `shape` saved at `path` (eval mode)."""
  import transformers  # pylint: disable=g-import-not-at-top
  cls = (transformers.AutoModelForCausalLM if is_decoder(shape) else
         transformers.T5ForConditionalGeneration)
  return cls.from_pretrained(path).eval()


def no_eos(config):
  """A ketchup_jax model config with EOS disabled: every row runs to
  max_new_tokens (T5: id -1; decoder-only: no EOS ids)."""
  from ketchup_jax.models import family  # pylint: disable=g-import-not-at-top
  return config.replace(
      eos_token_id=-1 if family.is_encoder_decoder(config) else ())


def decoder_dims(shape: str) -> dict[str, int]:
  """E, F, L, H, KV heads, head width D, V and tied of a decoder shape."""
  s = DECODER_SHAPES[shape]
  return dict(e=s["hidden_size"], f=s["intermediate_size"],
              n=s["num_hidden_layers"], h=s["num_attention_heads"],
              kv=s["num_key_value_heads"],
              d=s["hidden_size"] // s["num_attention_heads"],
              v=s["vocab_size"], tied=int(s["tie_word_embeddings"]))


def decoder_params(shape: str) -> int:
  """Parameter count of a decoder shape (a tied head counted once)."""
  m = decoder_dims(shape)
  e, f, h, kv, d = m["e"], m["f"], m["h"], m["kv"], m["d"]
  attn = 2 * e * h * d + 2 * e * kv * d + h * d + 2 * kv * d  # + q/k/v bias
  layer = attn + 3 * e * f + 2 * e  # + two RMSNorm scales
  return m["v"] * e * (1 if m["tied"] else 2) + m["n"] * layer + e


def params(shape: str) -> int:
  return decoder_params(shape) if is_decoder(shape) else t5_params(shape)


def t5_params(shape: str) -> int:
  """Parameter count (embedding counted once: it is tied)."""
  s = T5_SHAPES[shape]
  e, f, h, d, n = (s["d_model"], s["d_ff"], s["num_heads"], s["d_kv"],
                   s["num_layers"])
  att = 4 * e * h * d
  return s["vocab_size"] * e + n * (att + 2 * e * f) + n * (2 * att + 2 * e * f)
