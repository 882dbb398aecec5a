"""Configuration as data: features, the tables they use, and the compression method of each table.

Everything here is a frozen dataclass, so a configuration can be hashed, compared, logged and
loaded from TOML (`EmbeddingSpec.from_dict(tomllib.load(f)["embedding"])`).

Example::

    spec = EmbeddingSpec(
        features=(
            FeatureSpec("user_id", cardinality=943),
            FeatureSpec("item_id", cardinality=1682),
            FeatureSpec("hist_item_ids", cardinality=1682, pooling="none", table="item_id"),
        ),
        dim=16,
    )
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal, Mapping

from embtab.checks import check_integer
from embtab.optimizers import CPU_KINDS, OptimizerKind, optimizer_kind
from embtab.quant.precision import check_precision
from embtab.quant.spec import LowPrecision
from embtab.registry import method_class, method_from_dict

DEFAULT_METHOD = "full"  # the registry key of the method of tables no spec names a method for

Pooling = Literal["sum", "mean", "none"]
POOLINGS: tuple[str, ...] = ("sum", "mean", "none")


@dataclass(frozen=True)
class FeatureSpec:
    """One logical sparse feature of a model's input.

    Args:
        name: key of the feature in the input `KeyedJaggedTensor`.
        cardinality: number of distinct ids; valid ids are ``0 .. cardinality - 1``.
        pooling: ``"sum"`` or ``"mean"`` for a pooled feature (one vector per sample), ``"none"``
            for a sequence feature (one vector per id).
        table: name of the feature whose table this feature shares (e.g. ``hist_item_ids`` shares
            ``item_id``'s table); ``None`` gives the feature a table of its own.
        required: every sample must carry at least one id; an empty bag is then an error
            (mean pooling always requires it).
    """

    name: str
    cardinality: int
    pooling: Pooling = "sum"
    table: str | None = None
    required: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("FeatureSpec.name must be a non-empty string")
        if self.cardinality < 1:
            raise ValueError(
                f"feature {self.name!r}: cardinality must be >= 1, got {self.cardinality}"
            )
        if self.pooling not in POOLINGS:
            raise ValueError(
                f"feature {self.name!r}: pooling must be one of {POOLINGS}, got {self.pooling!r}"
            )

    @property
    def rejects_empty(self) -> bool:
        return self.required or self.pooling == "mean"

    @property
    def table_name(self) -> str:
        return self.table or self.name

    @property
    def is_sequence(self) -> bool:
        return self.pooling == "none"


@dataclass(frozen=True)
class MethodSpec:
    """Base class of the per-table compression method specs; each method file defines one.

    A subclass sets `name` (its registry key) and implements `build`, which compiles the spec for
    one logical table into an `embtab.methods.base.TableMethod`.
    """

    name: ClassVar[str] = ""

    def build(self, table: "LogicalTable") -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement build()")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **{f.name: getattr(self, f.name) for f in fields(self)}}


@dataclass(frozen=True)
class LogicalTable:
    """A table as the model sees it: `cardinality` ids of width `dim`, used by `features`."""

    name: str
    cardinality: int
    dim: int
    features: tuple[FeatureSpec, ...]
    method: MethodSpec
    precision: str = "fp32"


@dataclass(frozen=True)
class EmbeddingSpec:
    """All sparse features of a model, their width, and the method of every table.

    Args:
        features: the logical features, in any order.
        dim: embedding width every logical table produces.
        method: method of every table not named in `table_methods` (default: the full table,
            registry key `DEFAULT_METHOD`).
        table_methods: per-table overrides as ``((table_name, spec), ...)``.
        precision: stored precision of every physical table while it trains (``"fp32"``, ``"fp16"``).
        table_precisions: per-table overrides as ``((table_name, precision), ...)``.
        low_precision: fp16 rounding and quantization-aware training (`embtab.quant.LowPrecision`).
    """

    features: tuple[FeatureSpec, ...]
    dim: int = 16
    method: MethodSpec = field(default=None)  # type: ignore[assignment]
    table_methods: tuple[tuple[str, MethodSpec], ...] = ()
    precision: str = "fp32"
    table_precisions: tuple[tuple[str, str], ...] = ()
    low_precision: LowPrecision = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(self.features))
        object.__setattr__(self, "table_methods", tuple(self.table_methods))
        if self.method is None:
            object.__setattr__(self, "method", method_class(DEFAULT_METHOD)())
        check_integer(self.dim, 1, "EmbeddingSpec.dim")
        object.__setattr__(self, "table_precisions", tuple(self.table_precisions))
        self._check_features()
        for table_name, precision in (("every table", self.precision), *self.table_precisions):
            check_precision(precision, f"table {table_name!r}")
        if self.low_precision is None:
            object.__setattr__(self, "low_precision", LowPrecision())

    def _check_features(self) -> None:
        by_name: dict[str, FeatureSpec] = {}
        for feature in self.features:
            if feature.name in by_name:
                raise ValueError(f"feature {feature.name!r} is declared twice")
            by_name[feature.name] = feature
        for feature in self.features:
            owner = by_name.get(feature.table_name)
            if feature.table is not None and owner is None:
                raise ValueError(
                    f"feature {feature.name!r} shares table {feature.table!r}, "
                    f"but no feature of that name exists; expected one of {sorted(by_name)}"
                )
            if owner is not None and owner.table is not None and owner is not feature:
                raise ValueError(
                    f"feature {feature.name!r} shares the table of {owner.name!r}, which itself "
                    f"shares {owner.table!r}; point it at {owner.table!r} directly"
                )
            if owner is not None and owner.cardinality != feature.cardinality:
                raise ValueError(
                    f"feature {feature.name!r} has cardinality {feature.cardinality} but shares "
                    f"table {owner.name!r} of cardinality {owner.cardinality}; expected equal"
                )
        known_tables = {f.table_name for f in self.features}
        for table_name, _ in (*self.table_methods, *self.table_precisions):
            if table_name not in known_tables:
                raise ValueError(
                    f"table_methods or table_precisions names table {table_name!r}; expected one of {sorted(known_tables)}"
                )

    def method_of(self, table_name: str) -> MethodSpec:
        return dict(self.table_methods).get(table_name, self.method)

    def tables(self) -> list[LogicalTable]:
        """The logical tables, in order of first use, each with its features and method."""
        grouped: dict[str, list[FeatureSpec]] = {}
        for feature in self.features:
            grouped.setdefault(feature.table_name, []).append(feature)
        return [
            LogicalTable(
                name=name,
                cardinality=members[0].cardinality,
                dim=self.dim,
                features=tuple(members),
                method=self.method_of(name),
                precision=dict(self.table_precisions).get(name, self.precision),
            )
            for name, members in grouped.items()
        ]

    def feature(self, name: str) -> FeatureSpec:
        for feature in self.features:
            if feature.name == name:
                return feature
        raise KeyError(f"unknown feature {name!r}; expected one of {[f.name for f in self.features]}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EmbeddingSpec":
        """Build from plain data (e.g. a TOML table) with methods given as ``{"name": ..., **params}``."""
        known = ("features", "dim", "method", "table_methods", "precision", "table_precisions", "low_precision")
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"embedding spec: unknown keys {unknown}; expected some of {list(known)}")
        features = tuple(FeatureSpec(**f) for f in data["features"])
        method = method_from_dict(data["method"]) if "method" in data else None
        overrides = tuple(
            (name, method_from_dict(m)) for name, m in dict(data.get("table_methods", {})).items()
        )
        precisions = tuple(dict(data.get("table_precisions", {})).items())
        return cls(
            features=features,
            dim=data.get("dim", 16),
            method=method,
            table_methods=overrides,
            precision=str(data.get("precision", "fp32")),
            table_precisions=precisions,
            low_precision=LowPrecision(**data.get("low_precision", {})),
        )


@dataclass(frozen=True)
class SparseOptimizer:
    """The optimizer fbgemm fuses into the embedding lookup's backward pass, with its settings.

    What each kind is (its class, state layout, CPU support) is described once, in
    `embtab.optimizers.OPTIMIZER_KINDS`.
    """

    kind: str = "rowwise_adagrad"
    lr: float = 0.01
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        optimizer_kind(self.kind)
        if self.lr <= 0:
            raise ValueError(f"sparse optimizer lr must be > 0, got {self.lr}")

    @property
    def description(self) -> OptimizerKind:
        return optimizer_kind(self.kind)

    def state_bytes(self, rows: int, dim: int) -> int:
        """Bytes of optimizer state fbgemm allocates for a `rows` x `dim` float32 table."""
        return self.description.state_bytes(rows, dim)

    def torch_kwargs(self) -> dict[str, float]:
        """The settings as keyword arguments of the kind's optimizer class."""
        kwargs = {"lr": self.lr}
        if self.description.takes_eps:
            kwargs["eps"] = self.eps
        if self.weight_decay:
            kwargs["weight_decay"] = self.weight_decay
        return kwargs

    def check_device(self, device_type: str) -> None:
        if device_type == "cpu" and not self.description.fused_on_cpu:
            raise ValueError(
                f"sparse optimizer {self.kind!r} runs only on CUDA in fbgemm (its CPU build fuses "
                f"{CPU_KINDS}); choose one of those on CPU, or train on a GPU"
            )
