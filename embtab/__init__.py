"""embtab: compressed, sharded, offloadable embedding tables for recommender models on torchrec."""

from embtab._threads import prefer_passive_openmp

prefer_passive_openmp()


from embtab.collection import EmbeddingOutput, EmbeddingTables, MemoryReport, TableBytes
from embtab.config import EmbeddingSpec, FeatureSpec, LogicalTable, MethodSpec, SparseOptimizer
from embtab.methods import METHODS, FullTable
from embtab.torchrec_modules import CompressedEmbeddingBagCollection, CompressedEmbeddingCollection
from embtab.shard import ShardingConstraints, dense_parameters, format_plan, fuse, global_mean

__all__ = [
    "CompressedEmbeddingBagCollection",
    "CompressedEmbeddingCollection",
    "EmbeddingOutput",
    "EmbeddingSpec",
    "EmbeddingTables",
    "FeatureSpec",
    "FullTable",
    "LogicalTable",
    "METHODS",
    "MemoryReport",
    "MethodSpec",
    "ShardingConstraints",
    "SparseOptimizer",
    "TableBytes",
    "dense_parameters",
    "format_plan",
    "fuse",
    "global_mean",
]
