"""Datasets for embtab: readers (polars), vocabularies, synthetic data, batching to torchrec.

Every loader returns `DatasetSplits` (train, valid, test `CTRDataset`s sharing vocabularies);
`make_dataloader` batches a split into `Batch` objects (a `KeyedJaggedTensor` of sparse ids,
dense features and labels) in a deterministic, resumable order.
"""

from data.avazu import load_avazu
from data.batch import Batch, CTRDataset, DatasetSplits
from data.criteo import load_criteo
from data.loader import BatchIndexSampler, make_dataloader
from data.movielens import ensure_movielens_100k, load_movielens_1m, load_movielens_100k
from data.reader import read_dataset, read_schema_dir
from data.registry import load_dataset
from data.schema import ColumnSpec, Schema
from data.synthetic import SyntheticConfig, generate_synthetic, make_synthetic
from data.vocab import OOV_ID, Vocabulary

__all__ = [
    "Batch",
    "BatchIndexSampler",
    "CTRDataset",
    "ColumnSpec",
    "DatasetSplits",
    "OOV_ID",
    "Schema",
    "SyntheticConfig",
    "Vocabulary",
    "ensure_movielens_100k",
    "generate_synthetic",
    "load_avazu",
    "load_criteo",
    "load_dataset",
    "load_movielens_1m",
    "load_movielens_100k",
    "make_dataloader",
    "make_synthetic",
    "read_dataset",
    "read_schema_dir",
]
