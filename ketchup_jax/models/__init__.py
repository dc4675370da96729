"""Language models in Flax: T5 / FLAN-T5 and decoder-only Llama 3, Qwen2
(Qwen1.5, Qwen2.5) and Qwen3; HF checkpoint import/export and one jitted
KV-cache sampler for all of them.

Object API:

    lm = models.load("path/or/hub-name", dtype=None, mesh=None)  # by model_type
    lm.logits(input_ids, attention_mask)              # DecoderLM
    lm.logits(input_ids, attention_mask, decoder_input_ids, decoder_mask)  # T5LM
    lm.generate(input_ids, attention_mask, max_new_tokens=64)
    lm.save_pretrained("out/")
    lm = models.init("tiny", jax.random.key(0))       # or "qwen2-tiny", ...

Pure functions over a params pytree, for use inside a training step's jit:
`family` (the seam training code uses: `score`, `score_hidden`,
`output_head`, `start_decoding`, `decode_step`, ...), `sample`, and the
per-family modules `t5` and `decoder`. The T5 functions are also exported
here under their historical names (`forward`, `encode`, ...).
"""

from ketchup_jax.models import family
from ketchup_jax.models.api import DecoderLM
from ketchup_jax.models.api import default_dtype
from ketchup_jax.models.api import init
from ketchup_jax.models.api import LM
from ketchup_jax.models.api import load
from ketchup_jax.models.api import place_params
from ketchup_jax.models.api import T5LM
from ketchup_jax.models.config import get_config
from ketchup_jax.models.config import SIZES
from ketchup_jax.models.config import T5Config
from ketchup_jax.models.decoder_config import DECODER_SIZES
from ketchup_jax.models.decoder_config import DecoderConfig
from ketchup_jax.models.decoder_config import get_decoder_config
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
    "DECODER_SIZES", "DecodeCache", "DecoderConfig", "DecoderLM", "LM", "Params",
    "SIZES", "SampleOutput", "T5Config", "T5LM", "decode_step",
    "default_dtype", "encode", "family", "forward", "get_config",
    "get_decoder_config", "init", "init_decode_cache", "init_params", "load",
    "load_checkpoint", "logical_axes", "param_shapes", "place_params",
    "sample", "save_checkpoint", "shift_right",
]
