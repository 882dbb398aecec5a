"""embtab tables behind torchrec's own collection interfaces, so torchrec's models take them as is.

`CompressedEmbeddingBagCollection` is a torchrec `EmbeddingBagCollectionInterface` (forward:
`KeyedJaggedTensor` -> `KeyedTensor`) and `CompressedEmbeddingCollection` a torchrec
`EmbeddingCollectionInterface` (forward: `KeyedJaggedTensor` -> ``Dict[str, JaggedTensor]``). Both
describe the LOGICAL tables a model sees (`embedding_bag_configs()` / `embedding_configs()`: names,
features, widths, cardinalities), while the rows really allocated are those of each table's
compression method, in `embtab.EmbeddingTables`' fused collection. So `embtab.fuse` and
`DistributedModelParallel` shard them inside any torchrec model, exactly as in embtab's own models.

Each is built from torchrec's table configs plus a method per table (the one line a torchrec model
changes), from an `embtab.EmbeddingSpec`, or around an existing `embtab.EmbeddingTables`::

    ebc = CompressedEmbeddingBagCollection(tables=configs, method=QREmbedding(collisions=4))
    model = torchrec.models.dlrm.DLRM(embedding_bag_collection=ebc, ...)
    dmp = embtab.fuse(model, embtab.SparseOptimizer("rowwise_adagrad", lr=0.05))

Tables are named in embtab after their first feature (a torchrec table ``"t_user"`` with features
``["user", "user_2"]`` is embtab's table ``"user"``, its physical tables ``"user"``, ``"user@qr0"``, ...);
the configs this module returns keep torchrec's names. Initialization is the method's (the full
table: torchrec's default, U(-sqrt(1/n), sqrt(1/n))), not a config's `init_fn`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping, Sequence

import torch
from torch import nn
from torchrec import (
    EmbeddingBagConfig,
    EmbeddingConfig,
    JaggedTensor,
    KeyedJaggedTensor,
    KeyedTensor,
    PoolingType,
)
from torchrec.modules.embedding_configs import DataType
from torchrec.modules.embedding_modules import (
    EmbeddingBagCollectionInterface,
    EmbeddingCollectionInterface,
)

from embtab.collection import EmbeddingTables
from embtab.config import EmbeddingSpec, FeatureSpec, MethodSpec

_POOLINGS = {PoolingType.SUM: "sum", PoolingType.MEAN: "mean"}
_TORCHREC_POOLINGS = {v: k for k, v in _POOLINGS.items()}


class CompressedEmbeddingBagCollection(EmbeddingBagCollectionInterface):
    """torchrec's `EmbeddingBagCollection`, with every table compressed by an embtab method.

    Give exactly one of:
        tables: torchrec's `EmbeddingBagConfig`s (what `torchrec.EmbeddingBagCollection` takes),
            compressed with `method` (default: the full table) or, per torchrec table name,
            `table_methods`.
        spec: an `embtab.EmbeddingSpec` of pooled features (its methods apply).
        embeddings: an existing `embtab.EmbeddingTables` of pooled features.

    Args:
        is_weighted: the input carries a weight per id (torchrec's id-score-list features); each
            bag is the weighted sum of its ids' vectors. Needs methods whose combine commutes with
            pooling and sum pooling (a clear error names the table and method otherwise).
        device: where the tables are built.

    Tables of different widths live in one `EmbeddingTables` per width (torchrec's kernels group
    tables by width too); the output keeps the configs' order. Features of the input that no table
    uses are ignored, as torchrec does.
    """

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig] | None = None,
        *,
        spec: EmbeddingSpec | None = None,
        embeddings: EmbeddingTables | None = None,
        method: MethodSpec | None = None,
        table_methods: Mapping[str, MethodSpec] | None = None,
        is_weighted: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self._device = torch.device(device or "cpu")
        self._is_weighted = is_weighted
        if tables is not None:
            _check_only_source("tables", spec, embeddings)
            self._configs = _normalized(tables, EmbeddingBagConfig)
            specs = specs_from_configs(self._configs, method, table_methods, pooled=True)
            groups = [EmbeddingTables(s, device=self._device, weighted=is_weighted) for s in specs]
        else:
            _check_no_methods(method, table_methods)
            groups = [_tables_of(spec, embeddings, self._device, is_weighted)]
            _check_pooled(groups[0])
            self._configs = bag_configs(groups[0])
        self.groups = nn.ModuleList(groups)
        for group in groups:
            if group.weighted != is_weighted:
                raise ValueError(
                    f"is_weighted={is_weighted} but the given EmbeddingTables were built with "
                    f"weighted={group.weighted}; expected equal"
                )
        self._keys = [f for c in self._configs for f in c.feature_names]
        self._widths = [c.embedding_dim for c in self._configs for _ in c.feature_names]

    @property
    def embedding_tables(self) -> list[EmbeddingTables]:
        """The `EmbeddingTables` holding the physical tables (one per width)."""
        return list(self.groups)  # type: ignore[arg-type]

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pooled vectors ``[B, sum of widths]`` of every feature of the configs, in their order."""
        return _pooled_lookup(self, features)

    def lookup(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """The forward pass itself (see `_pooled_lookup`)."""
        outputs = [group(_select(features, group.feature_names)).pooled for group in self.groups]
        if len(outputs) == 1:
            return outputs[0]  # type: ignore[return-value]
        per_feature = {k: v for out in outputs for k, v in out.to_dict().items()}  # type: ignore[union-attr]
        values = torch.cat([per_feature[k] for k in self._keys], dim=1)
        return KeyedTensor(keys=list(self._keys), length_per_key=list(self._widths), values=values)

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        """The logical tables: torchrec's names, features, widths and cardinalities."""
        return self._configs

    def is_weighted(self) -> bool:
        return self._is_weighted

    @property
    def device(self) -> torch.device:
        return self._device


class CompressedEmbeddingCollection(EmbeddingCollectionInterface):
    """torchrec's `EmbeddingCollection` (one vector per id), with every table compressed by an
    embtab method.

    Give exactly one of `tables` (torchrec's `EmbeddingConfig`s, compressed with `method` or,
    per torchrec table name, `table_methods`), `spec` (an `embtab.EmbeddingSpec` whose features
    all have ``pooling="none"``) or `embeddings` (an existing `embtab.EmbeddingTables` of such
    features). Like torchrec's, every table has one width, and `need_indices` returns each
    feature's ids as its `JaggedTensor`'s weights.
    """

    def __init__(
        self,
        tables: Sequence[EmbeddingConfig] | None = None,
        *,
        spec: EmbeddingSpec | None = None,
        embeddings: EmbeddingTables | None = None,
        method: MethodSpec | None = None,
        table_methods: Mapping[str, MethodSpec] | None = None,
        need_indices: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self._device = torch.device(device or "cpu")
        self._need_indices = need_indices
        if tables is not None:
            _check_only_source("tables", spec, embeddings)
            self._configs = _normalized(tables, EmbeddingConfig)
            specs = specs_from_configs(self._configs, method, table_methods, pooled=False)
            if len(specs) > 1:
                widths = {c.name: c.embedding_dim for c in self._configs}
                raise ValueError(
                    f"an EmbeddingCollection needs one width for every table; got widths {widths}"
                )
            self.tables = EmbeddingTables(specs[0], device=self._device)
        else:
            _check_no_methods(method, table_methods)
            self.tables = _tables_of(spec, embeddings, self._device, weighted=False)
            self._configs = sequence_configs(self.tables)
        pooled = [f.name for f in self.tables.spec.features if not f.is_sequence]
        if pooled:
            raise ValueError(
                f"an EmbeddingCollection returns one vector per id; features {pooled} are pooled "
                "(expected pooling='none'); use CompressedEmbeddingBagCollection for them"
            )
        self._dim = self._configs[0].embedding_dim
        self._names_by_table = [list(c.feature_names) for c in self._configs]

    def forward(self, features: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        """One `JaggedTensor` of vectors per feature, keyed by feature, in the configs' order."""
        return _sequence_lookup(self, features)

    def lookup(self, features: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        """The forward pass itself (see `_sequence_lookup`)."""
        kjt = _select(features, self.tables.feature_names)
        sequence = self.tables(kjt).sequence
        if not self._need_indices:
            return {name: sequence[name] for names in self._names_by_table for name in names}
        ids = kjt.to_dict()
        return {
            name: JaggedTensor(
                values=sequence[name].values(), lengths=sequence[name].lengths(), weights=ids[name].values()
            )
            for names in self._names_by_table
            for name in names
        }

    def embedding_configs(self) -> list[EmbeddingConfig]:
        """The logical tables: torchrec's names, features, widths and cardinalities."""
        return self._configs

    def need_indices(self) -> bool:
        return self._need_indices

    def embedding_dim(self) -> int:
        return self._dim

    def embedding_names_by_table(self) -> list[list[str]]:
        return [list(names) for names in self._names_by_table]

    @property
    def device(self) -> torch.device:
        return self._device


# The forward passes are opaque calls to torch.fx, as a sharded torchrec collection is: remap,
# validation and combine branch on the data, which symbolic tracing (torchrec's train pipelines
# trace the model to find its sharded modules) cannot follow.
def _pooled_lookup(module: CompressedEmbeddingBagCollection, features: KeyedJaggedTensor) -> KeyedTensor:
    return module.lookup(features)


def _sequence_lookup(module: CompressedEmbeddingCollection, features: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
    return module.lookup(features)


torch.fx.wrap("_pooled_lookup")
torch.fx.wrap("_sequence_lookup")


# --------------------------------------------------------------------------------- torchrec -> embtab
def specs_from_configs(
    configs: Sequence[EmbeddingBagConfig] | Sequence[EmbeddingConfig],
    method: MethodSpec | None = None,
    table_methods: Mapping[str, MethodSpec] | None = None,
    pooled: bool = True,
) -> list[EmbeddingSpec]:
    """torchrec's table configs as embtab specs, one per width in order of first use: each table
    becomes an embtab table named after its first feature, compressed by `table_methods[name]`
    (torchrec's table name) or else `method` (default: the full table)."""
    table_methods = dict(table_methods or {})
    names = [c.name for c in configs]
    unknown = sorted(set(table_methods) - set(names))
    if unknown:
        raise ValueError(f"table_methods names unknown tables {unknown}; expected some of {names}")
    _check_tables(configs)
    widths = list(dict.fromkeys(c.embedding_dim for c in configs))
    specs = []
    for width in widths:
        chosen = [c for c in configs if c.embedding_dim == width]
        features = tuple(f for c in chosen for f in _feature_specs(c, pooled))
        overrides = tuple(
            (c.feature_names[0], table_methods[c.name]) for c in chosen if c.name in table_methods
        )
        specs.append(EmbeddingSpec(features=features, dim=width, method=method, table_methods=overrides))
    return specs


def _feature_specs(config: EmbeddingBagConfig | EmbeddingConfig, pooled: bool) -> list[FeatureSpec]:
    pooling = _pooling_of(config) if pooled else "none"
    first = config.feature_names[0]
    return [
        FeatureSpec(name, config.num_embeddings, pooling=pooling, table=None if name == first else first)
        for name in config.feature_names
    ]


def _pooling_of(config: EmbeddingBagConfig) -> str:
    if config.pooling not in _POOLINGS:
        raise ValueError(
            f"table {config.name!r}: pooling {config.pooling} is not offered; expected one of "
            f"{[p.name for p in _POOLINGS]}"
        )
    return _POOLINGS[config.pooling]


def _check_tables(configs: Sequence[EmbeddingBagConfig] | Sequence[EmbeddingConfig]) -> None:
    seen_tables: set[str] = set()
    owner: dict[str, str] = {}
    for config in configs:
        if config.name in seen_tables:
            raise ValueError(f"table {config.name!r} is declared twice; expected unique table names")
        seen_tables.add(config.name)
        if config.data_type != DataType.FP32:
            raise ValueError(
                f"table {config.name!r}: data_type {config.data_type.name} is not trained by embtab; "
                "expected FP32 (a method's physical tables set their own precision)"
            )
        for feature in config.feature_names:
            if feature in owner:
                raise ValueError(
                    f"feature {feature!r} is looked up in tables {owner[feature]!r} and {config.name!r}; "
                    "embtab reads each feature from one table"
                )
            owner[feature] = config.name


def _normalized(configs: Sequence, kind: type) -> list:
    """Copies of the configs in which a table without features has its own name as feature, as
    torchrec does (without changing the caller's configs)."""
    wrong = [c for c in configs if not isinstance(c, kind)]
    if wrong:
        raise TypeError(f"expected torchrec {kind.__name__}s, got {type(wrong[0]).__name__}")
    if not configs:
        raise ValueError("at least one table is required")
    return [c if c.feature_names else replace(c, feature_names=[c.name]) for c in configs]


# --------------------------------------------------------------------------------- embtab -> torchrec
def bag_configs(tables: EmbeddingTables) -> list[EmbeddingBagConfig]:
    """The logical tables of `tables` as torchrec describes pooled tables."""
    configs = []
    for table in tables.spec.tables():
        poolings = {f.pooling for f in table.features}
        if len(poolings) != 1 or "none" in poolings:
            raise ValueError(
                f"table {table.name!r}: torchrec pools every feature of a table alike; its features "
                f"pool as {sorted(poolings)}, expected one of 'sum' or 'mean'"
            )
        configs.append(
            EmbeddingBagConfig(
                num_embeddings=table.cardinality,
                embedding_dim=tables.output_dim(table.features[0].name),
                name=table.name,
                feature_names=[f.name for f in table.features],
                pooling=_TORCHREC_POOLINGS[poolings.pop()],
            )
        )
    return configs


def sequence_configs(tables: EmbeddingTables) -> list[EmbeddingConfig]:
    """The logical tables of `tables` as torchrec describes per-id tables."""
    return [
        EmbeddingConfig(
            num_embeddings=table.cardinality,
            embedding_dim=tables.output_dim(table.features[0].name),
            name=table.name,
            feature_names=[f.name for f in table.features],
        )
        for table in tables.spec.tables()
    ]


# --------------------------------------------------------------------------------- helpers
def _tables_of(
    spec: EmbeddingSpec | None, embeddings: EmbeddingTables | None, device: torch.device, weighted: bool
) -> EmbeddingTables:
    if spec is not None:
        _check_only_source("spec", embeddings)
        return EmbeddingTables(spec, device=device, weighted=weighted)
    if embeddings is None:
        raise ValueError("give the tables as one of tables=[torchrec configs], spec= or embeddings=")
    return embeddings


def _check_only_source(given: str, *others: object) -> None:
    if any(o is not None for o in others):
        raise ValueError(f"{given}= was given with another source; give exactly one of tables=, spec=, embeddings=")


def _check_no_methods(method: MethodSpec | None, table_methods: Mapping[str, MethodSpec] | None) -> None:
    if method is not None or table_methods:
        raise ValueError(
            "method= and table_methods= go with tables=[torchrec configs]; a spec carries its own methods"
        )


def _check_pooled(tables: EmbeddingTables) -> None:
    sequence = [f.name for f in tables.spec.features if f.is_sequence]
    if sequence:
        raise ValueError(
            f"an EmbeddingBagCollection pools every feature; features {sequence} have pooling='none' "
            "(use CompressedEmbeddingCollection for them)"
        )


def _select(features: KeyedJaggedTensor, names: list[str]) -> KeyedJaggedTensor:
    """`features` restricted to `names` in that order (torchrec's collections ignore other keys)."""
    keys = features.keys()
    if keys == names:
        return features
    missing = [n for n in names if n not in keys]
    if missing:
        raise ValueError(f"feature {missing[0]!r} is missing from the input; expected features {names}")
    return features.permute([keys.index(n) for n in names])
