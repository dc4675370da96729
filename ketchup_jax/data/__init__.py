"""Data: task registry, embedded tasks, tokenisers and batching.

Nothing here imports or calls a model; the pipeline hands a model what
:mod:`ketchup_jax.data.batching` produces.
"""
from ketchup_jax.data.batching import (Batch, BatchIterator, LazyTokenized,
                                       TokenizedExamples,
                                       bucket_length, collate, default_buckets,
                                       tokenize)
from ketchup_jax.data.tasks import SPLITS, Task, get_task, split_of, task_names
from ketchup_jax.data.tokenizers import (ByteTokenizer, HFTokenizer, Tokenizer,
                                         WordTokenizer, get_tokenizer,
                                         model_tokenizer,
                                         vocabulary_difference)

__all__ = [
    "SPLITS", "Batch", "BatchIterator", "ByteTokenizer", "HFTokenizer",
    "LazyTokenized", "Task",
    "TokenizedExamples", "Tokenizer", "WordTokenizer", "bucket_length", "collate",
    "default_buckets", "get_task", "get_tokenizer", "split_of", "task_names",
    "model_tokenizer", "tokenize", "vocabulary_difference",
]
