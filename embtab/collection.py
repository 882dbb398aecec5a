"""`EmbeddingTables`: every method's physical tables in one fused torchrec collection.

The forward pass is the three steps of DESIGN.md: remap logical ids to physical rows (per method,
vectorized), look every physical feature up at once (one `EmbeddingBagCollection` for pooled
lookups, one `EmbeddingCollection` per width for per-id lookups), combine physical vectors back into
logical ones. The collections are stock torchrec modules, so `embtab.fuse` / `DistributedModelParallel`
swaps them for fbgemm's fused kernels and shards them like any torchrec model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torchrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    JaggedTensor,
    KeyedJaggedTensor,
    KeyedTensor,
)

from embtab.config import EmbeddingSpec, FeatureSpec, LogicalTable, SparseOptimizer
from embtab.hashing import hash_to_ranges
from embtab.methods.base import PhysicalTable, TableMethod

POOLED_BUCKET = "pooled"
PER_ID_BUCKET = "per_id"


class EmbeddingOutput(NamedTuple):
    """What `EmbeddingTables` returns: torchrec's outputs for pooled and for sequence features."""

    pooled: KeyedTensor | None
    sequence: dict[str, JaggedTensor]


@dataclass(frozen=True)
class TableBytes:
    """Bytes of one physical table: float32 weights plus its fused optimizer's state."""

    rows: int
    dim: int
    parameter_bytes: int
    optimizer_bytes: int

    @property
    def total(self) -> int:
        return self.parameter_bytes + self.optimizer_bytes


@dataclass(frozen=True)
class MemoryReport:
    """Per physical table bytes, the methods' own parameters, and the total."""

    tables: dict[str, TableBytes]
    method_bytes: int

    @property
    def parameter_bytes(self) -> int:
        return sum(t.parameter_bytes for t in self.tables.values()) + self.method_bytes

    @property
    def optimizer_bytes(self) -> int:
        return sum(t.optimizer_bytes for t in self.tables.values())

    @property
    def total(self) -> int:
        return self.parameter_bytes + self.optimizer_bytes


@dataclass(frozen=True)
class _Piece:
    """The ids of one logical table's features for one physical table (probe `probe`)."""

    table: str
    probe: int
    keys: tuple[str, ...]
    bucket: str


class EmbeddingTables(nn.Module):
    """Compressed (or full) embedding tables for every sparse feature of a model.

    Takes a `KeyedJaggedTensor` of logical ids and returns an `EmbeddingOutput`: a `KeyedTensor`
    of pooled features ``[B, sum of widths]`` and a `JaggedTensor` per sequence feature.

    Example::

        spec = EmbeddingSpec(features=(FeatureSpec("user", 100), FeatureSpec("item", 50)), dim=8)
        tables = EmbeddingTables(spec)
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["user", "item"], values=torch.tensor([3, 7, 1, 2]), lengths=torch.tensor([1, 1, 1, 1])
        )
        tables(kjt).pooled.values().shape  # torch.Size([2, 16])
    """

    def __init__(self, spec: EmbeddingSpec, device: torch.device | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.sparse_optimizer: SparseOptimizer | None = None
        logical = spec.tables()
        with torch.device(device or "cpu"):
            self.methods = nn.ModuleDict({t.name: t.method.build(t) for t in logical})
        self._logical = {t.name: t for t in logical}
        self._feature_order = [f.name for t in logical for f in t.features]
        self._features = {f.name: f for t in logical for f in t.features}
        self._physical = self._collect_physical_tables()
        self._pieces = self._place_pieces()
        self._group_of = self._group_tables()
        self._group_members = {
            head: [(p.table, p.probe) for p in self._pieces if self._group_of.get(p.table) == head]
            for head in dict.fromkeys(self._group_of.values())
        }
        self._build_collections(device)
        self._column_cache: dict[tuple[str, ...], tuple[list[tuple[str, int]], list[int]]] = {}

    # ----------------------------------------------------------------------------- compile
    def _method(self, table: str) -> TableMethod:
        return self.methods[table]  # type: ignore[return-value]

    def _collect_physical_tables(self) -> dict[str, PhysicalTable]:
        physical: dict[str, PhysicalTable] = {}
        for name in self._logical:
            for table in self._method(name).physical_tables:
                seen = physical.setdefault(table.name, table)
                if seen != table:
                    raise ValueError(
                        f"physical table {table.name!r} is declared as {seen} and as {table}"
                    )
                if table.dim % 4:
                    raise ValueError(
                        f"physical table {table.name!r} has width {table.dim}; fbgemm's fused "
                        "kernels need a multiple of 4"
                    )
            method = self._method(name)
            if method.combine_uses_ids and (method.pooling_commutes or method.combine_signature()):
                raise ValueError(
                    f"table {name!r}: a combine that takes the ids needs per-id lookups on their "
                    "own (pooling_commutes False, combine_signature None)"
                )
        return physical

    def _bucket_of(self, table: LogicalTable, target: PhysicalTable) -> str:
        """Where a physical table is looked up: the pooled EBC when pooling commutes with the
        method's combine; one id per bag in the per-id EBC when it does not (pooled after the
        combine); the per-width EC when the table serves a sequence feature."""
        if any(f.is_sequence for f in table.features):
            return f"dim{target.dim}"
        return POOLED_BUCKET if self._method(table.name).pooling_commutes else PER_ID_BUCKET

    def _place_pieces(self) -> list[_Piece]:
        """A physical table shared by several logical tables (multiplexing) is looked up the way
        its most demanding user needs: per id in an EC, else one id per bag, else pooled."""
        rank = {POOLED_BUCKET: 0, PER_ID_BUCKET: 1}
        buckets: dict[str, str] = {}
        for table in self._logical.values():
            for target in self._method(table.name).physical_tables:
                bucket = self._bucket_of(table, target)
                seen = buckets.setdefault(target.name, bucket)
                if rank.get(bucket, 2) > rank.get(seen, 2):
                    buckets[target.name] = bucket
        pieces = []
        for table in self._logical.values():
            physical = self._method(table.name).physical_tables
            for probe, target in enumerate(physical):
                keys = tuple(physical_key(f.name, probe, len(physical)) for f in table.features)
                pieces.append(_Piece(table.name, probe, keys, buckets[target.name]))
        return pieces

    def _group_key(self, name: str) -> tuple | None:
        """Tables with equal keys combine in one call on their stacked columns: bag lookups only,
        the same combine, sum pooling, physical tables of one width that no other table reads."""
        method, table = self._method(name), self._logical[name]
        signature = method.combine_signature()
        pieces = [p for p in self._pieces if p.table == name]
        buckets = {p.bucket for p in pieces}
        widths = {t.dim for t in method.physical_tables}
        others = {t.name for n in self._logical if n != name for t in self._method(n).physical_tables}
        own = not others & {t.name for t in method.physical_tables}
        if signature is None or len(buckets) != 1 or len(widths) != 1 or not own:
            return None
        if buckets - {POOLED_BUCKET, PER_ID_BUCKET} or any(f.pooling != "sum" for f in table.features):
            return None
        return (signature, *buckets, len(table.features), len(pieces), *widths)

    def _group_tables(self) -> dict[str, str]:
        """Runs of consecutive tables with one group key: table -> the run's first table."""
        group_of: dict[str, str] = {}
        run: list[str] = []
        keys = {name: self._group_key(name) for name in self._logical}
        for name in [*self._logical, None]:
            if run and (name is None or keys[name] is None or keys[name] != keys[run[0]]):
                if len(run) > 1:
                    group_of.update({member: run[0] for member in run})
                run = []
            if name is not None and keys[name] is not None:
                run.append(name)
        return group_of

    def _table_features(self, bucket: str) -> dict[str, list[str]]:
        features: dict[str, list[str]] = {}
        for piece in self._pieces:
            if piece.bucket == bucket:
                target = self._method(piece.table).physical_tables[piece.probe]
                features.setdefault(target.name, []).extend(piece.keys)
        return features

    def _build_collections(self, device: torch.device | None) -> None:
        buckets = list(dict.fromkeys(p.bucket for p in self._pieces))
        self.ebc: EmbeddingBagCollection | None = None
        self.per_id_ebc: EmbeddingBagCollection | None = None
        self.ecs = nn.ModuleDict()
        for bucket in buckets:
            tables = self._table_features(bucket)
            if bucket in (POOLED_BUCKET, PER_ID_BUCKET):
                configs = [
                    EmbeddingBagConfig(
                        name=name,
                        num_embeddings=self._physical[name].rows,
                        embedding_dim=self._physical[name].dim,
                        feature_names=keys,
                        **self._physical[name].init_range(),
                    )
                    for name, keys in tables.items()
                ]
                collection = EmbeddingBagCollection(tables=configs, device=device)
                if bucket == POOLED_BUCKET:
                    self.ebc = collection
                else:
                    self.per_id_ebc = collection
            else:
                configs = [
                    EmbeddingConfig(
                        name=name,
                        num_embeddings=self._physical[name].rows,
                        embedding_dim=self._physical[name].dim,
                        feature_names=keys,
                        **self._physical[name].init_range(),
                    )
                    for name, keys in tables.items()
                ]
                self.ecs[bucket] = EmbeddingCollection(tables=configs, device=device)
        self._bucket_keys = {
            b: [k for p in self._pieces if p.bucket == b for k in p.keys] for b in buckets
        }

    def collections(self) -> list[nn.Module]:
        """The torchrec collections that hold the physical tables (what `embtab.fuse` shards)."""
        bags = [c for c in (self.ebc, self.per_id_ebc) if c is not None]
        return [*bags, *self.ecs.values()]

    # ----------------------------------------------------------------------------- accounting
    @property
    def physical_tables(self) -> dict[str, PhysicalTable]:
        return dict(self._physical)

    @property
    def feature_names(self) -> list[str]:
        return list(self._feature_order)

    def output_dim(self, feature: str) -> int:
        """Width of the vectors this module returns for `feature`."""
        return self._method(self._features[feature].table_name).out_dim

    def memory_bytes(self, optimizer: SparseOptimizer | None = None) -> MemoryReport:
        """Bytes allocated for weights and optimizer state (the fused optimizer by default)."""
        optimizer = optimizer or self.sparse_optimizer
        tables = {
            name: TableBytes(
                rows=t.rows,
                dim=t.dim,
                parameter_bytes=t.rows * t.dim * 4,
                optimizer_bytes=optimizer.state_bytes(t.rows, t.dim) if optimizer else 0,
            )
            for name, t in self._physical.items()
        }
        method_bytes = sum(self._method(name).extra_bytes() for name in self._logical)
        return MemoryReport(tables=tables, method_bytes=method_bytes)

    # ----------------------------------------------------------------------------- forward
    def forward(self, features: KeyedJaggedTensor) -> EmbeddingOutput:
        kjt = self._canonical(features)
        stride = kjt.stride()
        table_inputs = self._table_inputs(kjt)
        looked_up = self._lookup(self._physical_inputs(table_inputs))
        for bucket in (POOLED_BUCKET, PER_ID_BUCKET):
            if bucket in looked_up:
                looked_up[bucket] = self._piece_blocks(looked_up[bucket], bucket)  # type: ignore[arg-type]
        pooled_blocks: dict[str, torch.Tensor] = {}
        sequence: dict[str, JaggedTensor] = {}
        for name, (ids, lengths, sizes) in table_inputs.items():
            head = self._group_of.get(name)
            if head is None:
                self._combine_table(name, ids, lengths, sizes, stride, looked_up, pooled_blocks, sequence)
            elif head == name:
                pooled_blocks[name] = self._combine_group(name, table_inputs, stride, looked_up)
        return EmbeddingOutput(self._pooled_output(pooled_blocks, stride), sequence)

    def _combine_group(
        self,
        head: str,
        table_inputs: dict[str, tuple[torch.Tensor, torch.Tensor, list[int]]],
        stride: int,
        looked_up: dict[str, object],
    ) -> torch.Tensor:
        """One combine call for a run of like tables (the same method on stacked columns)."""
        names = [n for n, h in self._group_of.items() if h == head]
        pieces = [p for p in self._pieces if p.table == head]
        block = looked_up[pieces[0].bucket][(head, -1)]  # type: ignore[index]
        features, width = len(pieces[0].keys), self._method(head).physical_tables[0].dim
        stacked = block.reshape(block.shape[0], len(names), len(pieces), features, width)
        # one probe: a reshape, whose backward is a view, not unbind's zero-filled copy
        probes = [stacked.squeeze(2)] if len(pieces) == 1 else list(stacked.unbind(2))
        combined = self._method(head).combine(probes)
        lengths = torch.cat([table_inputs[n][1] for n in names])
        if pieces[0].bucket == POOLED_BUCKET or bool((lengths == 1).all()):
            return _first_rows(combined, stride).reshape(stride, -1)
        members = [
            self._pool_group_member(n, combined[:, i], table_inputs[n], stride) for i, n in enumerate(names)
        ]
        return torch.cat(members, 1)

    def _pool_group_member(
        self,
        name: str,
        combined: torch.Tensor,
        inputs: tuple[torch.Tensor, torch.Tensor, list[int]],
        stride: int,
    ) -> torch.Tensor:
        _, lengths, sizes = inputs
        per_feature = tuple(combined[:n, f] for f, n in enumerate(sizes))
        features = list(range(len(sizes)))
        table = self._logical[name]
        return self._pool_per_id(table, torch.cat(per_feature), per_feature, lengths, stride, features)

    def _canonical(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        keys = kjt.keys()
        if keys != self._feature_order:
            unknown = [k for k in keys if k not in self._features]
            if unknown:
                raise ValueError(
                    f"unknown feature {unknown[0]!r} in the input; expected features {self._feature_order}"
                )
            missing = [k for k in self._feature_order if k not in keys]
            if missing:
                raise ValueError(
                    f"feature {missing[0]!r} is missing from the input; expected features {self._feature_order}"
                )
        self._check_lengths(kjt)
        if kjt.weights_or_none() is not None:
            raise ValueError("weighted KeyedJaggedTensors are not supported; pass ids without weights")
        if keys != self._feature_order:
            kjt = kjt.permute([keys.index(k) for k in self._feature_order])
        return kjt

    def _check_lengths(self, kjt: KeyedJaggedTensor) -> None:
        values, lengths, keys = kjt.values(), kjt.lengths(), kjt.keys()
        if values.is_floating_point() or values.dtype == torch.bool:
            raise ValueError(f"ids must be integers, got values of dtype {values.dtype}")
        if lengths.numel() % len(keys):
            raise ValueError(
                f"{lengths.numel()} lengths cannot be split evenly over {len(keys)} features {keys}"
            )
        if lengths.numel() and int(lengths.min()) < 0:
            position = int(torch.argmin(lengths))
            raise ValueError(
                f"feature {keys[position // kjt.stride()]!r}: negative length {int(lengths.min())} "
                f"for sample {position % kjt.stride()}; expected lengths >= 0"
            )
        total = int(lengths.sum())
        if total != values.numel():
            raise ValueError(
                f"lengths add up to {total} ids but {values.numel()} values were given; expected equal"
            )
        self._check_empty_bags(lengths.view(len(keys), -1), keys)

    def _check_empty_bags(self, lengths: torch.Tensor, keys: list[str]) -> None:
        rejecting = [i for i, k in enumerate(keys) if self._features[k].rejects_empty]
        if not rejecting or lengths.shape[1] == 0:
            return
        empty = lengths[rejecting] == 0
        if bool(empty.any()):
            row, sample = (int(x) for x in torch.nonzero(empty)[0])
            feature = self._features[keys[rejecting[row]]]
            reason = "mean pooling" if feature.pooling == "mean" else "required=True"
            raise ValueError(
                f"feature {feature.name!r}: sample {sample} has an empty bag; expected at least one id "
                f"({reason})"
            )

    def _table_inputs(
        self, kjt: KeyedJaggedTensor
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor, list[int]]]:
        """Per logical table: its features' ids (range-checked), lengths and per-feature id counts."""
        values, lengths = kjt.values(), kjt.lengths()
        length_per_key, stride = kjt.length_per_key(), kjt.stride()
        inputs = {}
        first = 0
        for name, table in self._logical.items():
            count = len(table.features)
            sizes = length_per_key[first : first + count]
            start = sum(length_per_key[:first])
            ids = values[start : start + sum(sizes)]
            self._check_ids(table, ids, sizes)
            inputs[name] = (ids, lengths[first * stride : (first + count) * stride], sizes)
            first += count
        return inputs

    def _check_ids(self, table: LogicalTable, ids: torch.Tensor, sizes: list[int]) -> None:
        if ids.numel() == 0:
            return
        max_id = self._method(table.name).max_id
        low, high = torch.aminmax(ids)
        if int(low) >= 0 and (max_id is None or int(high) < max_id):
            return
        bad = (ids < 0) if max_id is None else (ids < 0) | (ids >= max_id)
        position = int(torch.nonzero(bad)[0])
        feature = table.features[int(torch.searchsorted(torch.tensor(sizes).cumsum(0), position, right=True))]
        expected = "0 <= id" if max_id is None else f"0 <= id < {max_id}"
        raise ValueError(
            f"feature {feature.name!r}: id {int(ids[position])} is out of range; expected {expected}"
        )

    def _physical_inputs(
        self, table_inputs: dict[str, tuple[torch.Tensor, torch.Tensor, list[int]]]
    ) -> dict[str, KeyedJaggedTensor]:
        values: dict[str, list[torch.Tensor]] = {b: [] for b in self._bucket_keys}
        lengths: dict[str, list[torch.Tensor]] = {b: [] for b in self._bucket_keys}
        remapped = self._remap(table_inputs)
        per_id_counts: list[int] = []
        for piece in self._pieces:
            values[piece.bucket].append(remapped[piece.table][piece.probe])
            if piece.bucket == PER_ID_BUCKET:
                per_id_counts.extend(table_inputs[piece.table][2])
            else:
                lengths[piece.bucket].append(table_inputs[piece.table][1])
        if per_id_counts:
            device = values[PER_ID_BUCKET][0].device
            lengths[PER_ID_BUCKET] = [_one_id_bags(per_id_counts, device)]
        return {
            bucket: KeyedJaggedTensor(
                keys=keys, values=torch.cat(values[bucket]), lengths=torch.cat(lengths[bucket])
            )
            for bucket, keys in self._bucket_keys.items()
        }

    def _remap(
        self, table_inputs: dict[str, tuple[torch.Tensor, torch.Tensor, list[int]]]
    ) -> dict[str, torch.Tensor]:
        """Every table's physical rows; the hashes of all hashing tables in one vectorized call."""
        requests = {name: self._method(name).hashes() for name in table_inputs}
        hashing = [name for name, r in requests.items() if r]
        remapped = {
            name: self._method(name).remap(ids)
            for name, (ids, _, _) in table_inputs.items()
            if not requests[name]
        }
        if not hashing:
            return remapped
        ids = {name: table_inputs[name][0].to(torch.int64) for name in hashing}
        segments = [(ids[name], request) for name in hashing for request in requests[name]]
        counts = [s.numel() for s, _ in segments]
        flat = torch.cat([s for s, _ in segments])
        hashed = iter(hash_to_ranges(flat, counts, [r for _, r in segments]).split(counts))
        for name in hashing:
            hashes = [next(hashed) for _ in requests[name]]
            remapped[name] = self._method(name).remap_hashed(ids[name], hashes)
        return remapped

    def _lookup(self, inputs: dict[str, KeyedJaggedTensor]) -> dict[str, object]:
        out: dict[str, object] = {}
        for bucket, kjt in inputs.items():
            module = {POOLED_BUCKET: self.ebc, PER_ID_BUCKET: self.per_id_ebc}.get(bucket)
            out[bucket] = (module or self.ecs[bucket])(kjt)
        return out

    def _piece_blocks(self, pooled: KeyedTensor, bucket: str) -> dict[tuple[str, int], torch.Tensor]:
        """Each piece's columns of a bag lookup's output, cut by one `split` (cheap backward); a
        table group's columns as one block keyed ``(head, -1)``, a view when the lookup kept them
        together in table order (as on one process), else assembled in that order."""
        keys = (bucket, *pooled.keys())
        if keys not in self._column_cache:
            self._column_cache[keys] = self._piece_layout(keys[1:], pooled.offset_per_key(), bucket)
        order, sizes = self._column_cache[keys]
        values = pooled.values()
        blocks = dict(zip(order, torch.split(values, sizes, dim=1)))
        for head, members in self._group_members.items():
            if members[0] not in blocks:
                continue
            first = order.index(members[0])
            if order[first : first + len(members)] == members:
                width = sum(sizes[first : first + len(members)])
                whole = width == values.shape[1]  # a narrow's backward would copy into zeros
                blocks[(head, -1)] = values if whole else values.narrow(1, sum(sizes[:first]), width)
            else:
                blocks[(head, -1)] = torch.cat([blocks[m] for m in members], 1)
        return blocks

    def _piece_layout(
        self, keys: tuple[str, ...], offsets: list[int], bucket: str
    ) -> tuple[list[tuple[str, int]], list[int]]:
        position = {k: i for i, k in enumerate(keys)}
        spans = []
        for piece in self._pieces:
            if piece.bucket == bucket:
                first, last = position[piece.keys[0]], position[piece.keys[-1]]
                if last - first + 1 != len(piece.keys):
                    raise RuntimeError(f"pooled lookup split the columns of {piece.keys}")
                spans.append((offsets[first], offsets[last + 1], (piece.table, piece.probe)))
        spans.sort()
        return [span[2] for span in spans], [end - start for start, end, _ in spans]

    def _combine_table(
        self,
        name: str,
        ids: torch.Tensor,
        lengths: torch.Tensor,
        sizes: list[int],
        stride: int,
        looked_up: dict[str, object],
        pooled_blocks: dict[str, torch.Tensor],
        sequence: dict[str, JaggedTensor],
    ) -> None:
        table, method = self._logical[name], self._method(name)
        pieces = [p for p in self._pieces if p.table == name]
        bucket = pieces[0].bucket if pieces else None  # no physical table (DHE): vectors from the ids
        if bucket == POOLED_BUCKET:
            pooled_blocks[name] = self._combine_pooled(table, method, pieces, lengths, stride, looked_up)
            return
        if bucket == PER_ID_BUCKET:
            pooled_blocks[name] = self._combine_one_id_bags(
                table, method, pieces, ids, lengths, sizes, stride, looked_up
            )
            return
        vectors = [_gather_per_id(looked_up[p.bucket], p.keys) for p in pieces]
        per_id = method.combine(vectors, ids) if method.combine_uses_ids else method.combine(vectors)
        per_feature = torch.split(per_id, sizes)
        for feature, rows, feature_lengths in zip(
            table.features, per_feature, lengths.view(len(table.features), stride)
        ):
            if feature.is_sequence:
                sequence[feature.name] = JaggedTensor(values=rows, lengths=feature_lengths)
        pooled = [i for i, f in enumerate(table.features) if not f.is_sequence]
        if pooled:
            pooled_blocks[name] = self._pool_per_id(table, per_id, per_feature, lengths, stride, pooled)

    def _combine_pooled(
        self,
        table: LogicalTable,
        method: TableMethod,
        pieces: list,
        lengths: torch.Tensor,
        stride: int,
        looked_up: dict[str, object],
    ) -> torch.Tensor:
        blocks: dict[tuple[str, int], torch.Tensor] = looked_up[POOLED_BUCKET]  # type: ignore[assignment]
        count = len(table.features)
        vectors = [blocks[(p.table, p.probe)].reshape(stride, count, -1) for p in pieces]
        combined = method.combine(vectors)
        combined = _apply_mean(combined, table.features, lengths.view(count, stride).t())
        return combined.reshape(stride, -1)

    def _combine_one_id_bags(
        self,
        table: LogicalTable,
        method: TableMethod,
        pieces: list,
        ids: torch.Tensor,
        lengths: torch.Tensor,
        sizes: list[int],
        stride: int,
        looked_up: dict[str, object],
    ) -> torch.Tensor:
        """Combine per id (row i of feature f's column block is its i-th id), then pool the bags;
        when every bag holds one id the combined rows already are the bags."""
        blocks: dict[tuple[str, int], torch.Tensor] = looked_up[PER_ID_BUCKET]  # type: ignore[assignment]
        count = len(table.features)
        vectors = [blocks[(p.table, p.probe)] for p in pieces]
        vectors = [v.reshape(v.shape[0], count, -1) for v in vectors]
        if method.combine_uses_ids:
            combined = method.combine(vectors, _padded_ids(ids, sizes, vectors[0].shape[0]))
        else:
            combined = method.combine(vectors)
        if bool((lengths == 1).all()):
            return _first_rows(combined, stride).reshape(stride, -1)
        per_feature = tuple(combined[:n, f] for f, n in enumerate(sizes))
        per_id = torch.cat(per_feature)
        return self._pool_per_id(table, per_id, per_feature, lengths, stride, list(range(count)))

    def _pool_per_id(
        self,
        table: LogicalTable,
        per_id: torch.Tensor,
        per_feature: tuple[torch.Tensor, ...],
        lengths: torch.Tensor,
        stride: int,
        pooled: list[int],
    ) -> torch.Tensor:
        """Pool per-id vectors into bags; single-id bags (a candidate item) need no scatter."""
        count = len(table.features)
        bag_lengths = lengths.view(count, stride)[pooled]
        if bool((bag_lengths == 1).all()):
            sums = torch.stack([per_feature[i] for i in pooled], 1)
        else:
            bags = torch.repeat_interleave(torch.arange(lengths.numel(), device=per_id.device), lengths)
            sums = per_id.new_zeros(lengths.numel(), per_id.shape[1]).index_add_(0, bags, per_id)
            sums = sums.view(count, stride, -1)[pooled].transpose(0, 1)
        chosen = [table.features[i] for i in pooled]
        sums = _apply_mean(sums, chosen, bag_lengths.t())
        return sums.reshape(stride, -1)

    def _pooled_output(self, blocks: dict[str, torch.Tensor], stride: int) -> KeyedTensor | None:
        if not blocks:
            return None
        keys, widths = [], []
        for name, table in self._logical.items():
            if name in blocks or self._group_of.get(name) in blocks:
                for feature in table.features:
                    if not feature.is_sequence:
                        keys.append(feature.name)
                        widths.append(self._method(name).out_dim)
        ordered = [blocks[name] for name in self._logical if name in blocks]  # group heads included
        values = ordered[0] if len(ordered) == 1 else torch.cat(ordered, dim=1)
        return KeyedTensor(keys=keys, length_per_key=widths, values=values)


def physical_key(feature: str, probe: int, probes: int) -> str:
    """Name of a logical feature's ids for one physical table (the feature's own name if only one)."""
    return feature if probes == 1 else f"{feature}@{probe}"


def _one_id_bags(counts: list[int], device: torch.device) -> torch.Tensor:
    """Lengths that make each id its own bag: key k gets `counts[k]` bags of one id, then empty
    bags up to the longest key (every key of a KeyedJaggedTensor has the same number of bags)."""
    bags = max(max(counts), 1)
    per_key = torch.tensor(counts, device=device).unsqueeze(1)
    return (torch.arange(bags, device=device) < per_key).flatten().to(torch.int64)


def _padded_ids(ids: torch.Tensor, sizes: list[int], rows: int) -> torch.Tensor:
    """The ids laid out like a per-id block ``[rows, features]``: column f holds feature f's ids,
    then -1 where the block is padded."""
    if min(sizes) == rows:  # no padding (e.g. one id per bag in every feature)
        return ids.to(torch.int64).view(len(sizes), rows).t()
    counts = torch.tensor(sizes, device=ids.device).unsqueeze(1)
    filled = torch.arange(rows, device=ids.device) < counts
    padded = torch.full((len(sizes), rows), -1, dtype=torch.int64, device=ids.device)
    padded[filled] = ids.to(torch.int64)
    return padded.t()


def _first_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """`tensor[:rows]`, without the slice (whose backward copies into zeros) when that is all of it."""
    return tensor if tensor.shape[0] == rows else tensor[:rows]


def _gather_per_id(per_feature: object, keys: tuple[str, ...]) -> torch.Tensor:
    if len(keys) == 1:
        return per_feature[keys[0]].values()  # type: ignore[index]
    return torch.cat([per_feature[k].values() for k in keys])  # type: ignore[index]


def _apply_mean(
    pooled: torch.Tensor, features: list[FeatureSpec] | tuple[FeatureSpec, ...], lengths: torch.Tensor
) -> torch.Tensor:
    """Divide the sums of mean-pooled features by their bag sizes; `pooled` is [B, F, D]."""
    means = [i for i, f in enumerate(features) if f.pooling == "mean"]
    if not means:
        return pooled
    divisor = torch.ones_like(lengths, dtype=pooled.dtype)
    divisor[:, means] = lengths[:, means].to(pooled.dtype)
    return pooled / divisor.unsqueeze(-1)
