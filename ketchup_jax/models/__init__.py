"""T5 / FLAN-T5 in Flax: HF checkpoint import/export and a jitted KV-cache sampler.

Object API:

    lm = models.load("path/or/hub-name", dtype=jnp.bfloat16, mesh=None)
    lm.logits(input_ids, attention_mask, decoder_input_ids, decoder_mask)
    lm.generate(input_ids, attention_mask, max_new_tokens=64)
    lm.save_pretrained("out/")
    lm = models.init("tiny", jax.random.key(0))

Pure functions over a params pytree, for use inside a training step's jit:
`forward`, `encode`, `init_decode_cache`, `decode_step`, `sample`.
"""

from ketchup_jax.models.api import init
from ketchup_jax.models.api import load
from ketchup_jax.models.api import place_params
from ketchup_jax.models.api import T5LM
from ketchup_jax.models.config import get_config
from ketchup_jax.models.config import SIZES
from ketchup_jax.models.config import T5Config
from ketchup_jax.models.hf_io import load_checkpoint
from ketchup_jax.models.hf_io import save_checkpoint
from ketchup_jax.models.sampling import sample
from ketchup_jax.models.sampling import SampleOutput
from ketchup_jax.models.t5 import decode_step
from ketchup_jax.models.t5 import DecodeCache
from ketchup_jax.models.t5 import encode
from ketchup_jax.models.t5 import forward
from ketchup_jax.models.t5 import init_decode_cache
from ketchup_jax.models.t5 import init_params
from ketchup_jax.models.t5 import logical_axes
from ketchup_jax.models.t5 import param_shapes
from ketchup_jax.models.t5 import Params
from ketchup_jax.models.t5 import shift_right

__all__ = [
    "DecodeCache", "Params", "SIZES", "SampleOutput", "T5Config", "T5LM",
    "decode_step", "encode", "forward", "get_config", "init",
    "init_decode_cache", "init_params", "load", "load_checkpoint",
    "logical_axes", "param_shapes", "place_params", "sample",
    "save_checkpoint", "shift_right",
]
