"""Training data: sources → token shards on disk (cached, memory-mapped) → packed, mixed, resumable batches."""

from .loader import DataConfig, MixtureDataset, TrainLoader, build_dataset, feistel_permute
from .shards import TokenizedSource, default_cache_dir, token_dtype, tokenize_source
from .sources import DataError, SourceConfig, iter_documents

__all__ = [
    "DataConfig",
    "DataError",
    "MixtureDataset",
    "SourceConfig",
    "TokenizedSource",
    "TrainLoader",
    "build_dataset",
    "default_cache_dir",
    "feistel_permute",
    "iter_documents",
    "token_dtype",
    "tokenize_source",
]
