"""The forward pass of `EmbeddingTables`: remap logical ids, look physical rows up, combine.

Functions of a `Layout`, the compiled methods and the torchrec collections' outputs; every step
returns its values (no out-parameters). The lookups themselves belong to the module that owns the
collections (`EmbeddingTables`), which hands them in as `LookupOutputs`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, NamedTuple

import torch
from torchrec import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from embtab.config import FeatureSpec, LogicalTable
from embtab.hashing import hash_to_ranges
from embtab.layout import PER_ID_BUCKET, POOLED_BUCKET, Layout, Piece
from embtab.methods.base import TableMethod
from embtab.validation import check_ids

Blocks = dict[tuple[str, int], torch.Tensor]


class TableInput(NamedTuple):
    """One logical table's share of the input: its features' ids, their bag lengths
    ``[features * batch]`` and the number of ids of each feature."""

    ids: torch.Tensor
    lengths: torch.Tensor
    sizes: list[int]


@dataclass(frozen=True)
class LookupOutputs:
    """What the lookups returned: each bag bucket's output cut into its pieces' column blocks
    (a table group's columns as one block keyed ``(head, -1)``), each sequence bucket's
    per-feature `JaggedTensor`s."""

    blocks: dict[str, Blocks] = field(default_factory=dict)
    sequences: dict[str, dict[str, JaggedTensor]] = field(default_factory=dict)


class DistinctRows(NamedTuple):
    """A `TableMethod.distinct_rows` table's lookup: per probe its distinct physical rows ``[u]``
    and each id's position among them ``[n]``."""

    rows: list[torch.Tensor]
    index: list[torch.Tensor]


class Occurrences(NamedTuple):
    """Where a `TableMethod.distinct_ids` table's distinct ids occur: its input as given, and
    for each of its ids the position of its distinct id."""

    original: TableInput
    inverse: torch.Tensor


class TableOutput(NamedTuple):
    """One logical table's result: its pooled features' vectors ``[B, pooled features * width]``
    (None when it has none) and a `JaggedTensor` per sequence feature."""

    pooled: torch.Tensor | None
    sequence: dict[str, JaggedTensor]


def table_inputs(
    kjt: KeyedJaggedTensor, layout: Layout, methods: Mapping[str, TableMethod]
) -> dict[str, TableInput]:
    """Per logical table: its features' ids (range-checked), lengths and per-feature id counts.
    `kjt` holds the features in `layout.feature_order`."""
    values, lengths = kjt.values(), kjt.lengths()
    length_per_key, stride = kjt.length_per_key(), kjt.stride()
    inputs = {}
    first = 0
    for name, table in layout.logical.items():
        count = len(table.features)
        sizes = length_per_key[first : first + count]
        start = sum(length_per_key[:first])
        ids = values[start : start + sum(sizes)]
        check_ids(table, ids, sizes, methods[name].max_id)
        inputs[name] = TableInput(ids, lengths[first * stride : (first + count) * stride], sizes)
        first += count
    return inputs


def deduplicate(
    inputs: Mapping[str, TableInput], methods: Mapping[str, TableMethod]
) -> tuple[dict[str, TableInput], dict[str, Occurrences]]:
    """The inputs with every `distinct_ids` table's ids reduced to its distinct ids (all under its
    first feature, in its first bag), and where those ids occur."""
    reduced, occurrences = dict(inputs), {}
    for name, table_input in inputs.items():
        if methods[name].distinct_ids:
            ids, inverse = torch.unique(table_input.ids, return_inverse=True)
            sizes, lengths = _under_first_key(ids.numel(), table_input)
            reduced[name] = TableInput(ids, lengths, sizes)
            occurrences[name] = Occurrences(table_input, inverse)
    return reduced, occurrences


def remap(inputs: Mapping[str, TableInput], methods: Mapping[str, TableMethod]) -> dict[str, torch.Tensor]:
    """Every table's physical rows; the hashes of all hashing tables in one vectorized call."""
    requests = {name: methods[name].hashes() for name in inputs}
    hashing = [name for name, r in requests.items() if r]
    remapped = {name: methods[name].remap(i.ids) for name, i in inputs.items() if not requests[name]}
    if not hashing:
        return remapped
    ids = {name: inputs[name].ids.to(torch.int64) for name in hashing}
    segments = [(ids[name], request) for name in hashing for request in requests[name]]
    counts = [s.numel() for s, _ in segments]
    flat = torch.cat([s for s, _ in segments])
    hashed = iter(hash_to_ranges(flat, counts, [r for _, r in segments]).split(counts))
    for name in hashing:
        hashes = [next(hashed) for _ in requests[name]]
        remapped[name] = methods[name].remap_hashed(ids[name], hashes)
    return remapped


def distinct_rows(remapped: Mapping[str, torch.Tensor], methods: Mapping[str, TableMethod]) -> dict[str, DistinctRows]:
    """The distinct rows of every table whose method looks them up once (`distinct_rows`)."""
    distinct = {}
    for name, rows in remapped.items():
        if methods[name].distinct_rows:
            pairs = [torch.unique(probe, return_inverse=True) for probe in rows]
            distinct[name] = DistinctRows([u for u, _ in pairs], [i for _, i in pairs])
    return distinct


def table_weights(kjt: KeyedJaggedTensor, inputs: Mapping[str, TableInput]) -> dict[str, torch.Tensor]:
    """Per logical table: the weights of its ids (`kjt` in the layout's feature order)."""
    return dict(zip(inputs, kjt.weights().split([sum(i.sizes) for i in inputs.values()])))


def physical_inputs(
    inputs: Mapping[str, TableInput],
    remapped: Mapping[str, torch.Tensor],
    layout: Layout,
    weights: Mapping[str, torch.Tensor] | None = None,
    distinct: Mapping[str, DistinctRows] | None = None,
) -> dict[str, KeyedJaggedTensor]:
    """The input of every bucket's lookup: the remapped rows under the physical feature keys;
    the pooled bucket's carries the ids' `weights` (per logical table) when given. A `distinct`
    table's piece looks up its distinct rows, all under its first key (one bag of them in a
    sequence bucket)."""
    weights, distinct = weights or {}, distinct or {}
    values: dict[str, list[torch.Tensor]] = {b: [] for b in layout.bucket_keys}
    lengths: dict[str, list[torch.Tensor]] = {b: [] for b in layout.bucket_keys}
    per_id_counts: list[int] = []
    pooled_weights: list[torch.Tensor] = []
    for piece in layout.pieces:
        table_input, rows = inputs[piece.table], distinct.get(piece.table)
        if rows is None:
            values[piece.bucket].append(remapped[piece.table][piece.probe])
            sizes, piece_lengths = table_input.sizes, table_input.lengths
        else:
            values[piece.bucket].append(rows.rows[piece.probe])
            sizes, piece_lengths = _under_first_key(rows.rows[piece.probe].numel(), table_input)
        if piece.table in weights:
            pooled_weights.append(weights[piece.table])
        if piece.bucket == PER_ID_BUCKET:
            per_id_counts.extend(sizes)
        else:
            lengths[piece.bucket].append(piece_lengths)
    if per_id_counts:
        device = values[PER_ID_BUCKET][0].device
        lengths[PER_ID_BUCKET] = [one_id_bags(per_id_counts, device)]
    return {
        bucket: KeyedJaggedTensor(
            keys=keys,
            values=torch.cat(values[bucket]),
            lengths=torch.cat(lengths[bucket]),
            weights=torch.cat(pooled_weights) if pooled_weights and bucket == POOLED_BUCKET else None,
        )
        for bucket, keys in layout.bucket_keys.items()
    }


def _under_first_key(count: int, table_input: TableInput) -> tuple[list[int], torch.Tensor]:
    """Per-key id counts and bag lengths that put `count` ids under a table's first key (in its
    first bag), none under the others."""
    lengths = torch.zeros_like(table_input.lengths)
    if lengths.numel():
        lengths[0] = count
    return [count] + [0] * (len(table_input.sizes) - 1), lengths


class PieceColumns:
    """Cuts a bag lookup's output into its pieces' column blocks, by one `split` (cheap
    backward). The column layout is worked out once per order of output keys and kept."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, ...], tuple[list[tuple[str, int]], list[int]]] = {}

    def blocks(self, pooled: KeyedTensor, bucket: str, layout: Layout) -> Blocks:
        """Each piece's columns; a table group's columns as one block keyed ``(head, -1)``, a
        view when the lookup kept them together in table order (as on one process), else
        assembled in that order."""
        keys = (bucket, *pooled.keys())
        if keys not in self._cache:
            self._cache[keys] = _piece_layout(layout, keys[1:], pooled.offset_per_key(), bucket)
        order, sizes = self._cache[keys]
        values = pooled.values()
        blocks = dict(zip(order, torch.split(values, sizes, dim=1)))
        for head, members in layout.group_members.items():
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
    layout: Layout, keys: tuple[str, ...], offsets: list[int], bucket: str
) -> tuple[list[tuple[str, int]], list[int]]:
    """(pieces in column order, their widths) of a bag lookup whose output keys are `keys`."""
    position = {k: i for i, k in enumerate(keys)}
    spans = []
    for piece in layout.pieces:
        if piece.bucket == bucket:
            first, last = position[piece.keys[0]], position[piece.keys[-1]]
            if last - first + 1 != len(piece.keys):
                raise RuntimeError(f"pooled lookup split the columns of {piece.keys}")
            spans.append((offsets[first], offsets[last + 1], (piece.table, piece.probe)))
    spans.sort()
    return [span[2] for span in spans], [end - start for start, end, _ in spans]


def combine(
    layout: Layout,
    methods: Mapping[str, TableMethod],
    inputs: Mapping[str, TableInput],
    looked_up: LookupOutputs,
    stride: int,
    distinct: Mapping[str, DistinctRows] | None = None,
    occurrences: Mapping[str, Occurrences] | None = None,
) -> tuple[KeyedTensor | None, dict[str, JaggedTensor]]:
    """The logical vectors: pooled features as one `KeyedTensor`, a `JaggedTensor` per sequence
    feature. Tables of a group combine in one call, at their first table. `inputs` are the
    lookups' (`deduplicate`d); a table's `occurrences` put its distinct ids' vectors back in
    place."""
    pooled_blocks: dict[str, torch.Tensor] = {}
    sequence: dict[str, JaggedTensor] = {}
    distinct, occurrences = distinct or {}, occurrences or {}
    for name, table_input in inputs.items():
        head = layout.group_of.get(name)
        if head is None:
            pieces = layout.pieces_of(name)
            out = combine_table(
                layout.logical[name], methods[name], pieces, table_input, stride, looked_up,
                distinct.get(name), occurrences.get(name),
            )
            if out.pooled is not None:
                pooled_blocks[name] = out.pooled
            sequence.update(out.sequence)
        elif head == name:
            pooled_blocks[name] = combine_group(layout, methods, name, inputs, stride, looked_up, occurrences)
    return pooled_output(layout, methods, pooled_blocks, stride), sequence


def combine_group(
    layout: Layout,
    methods: Mapping[str, TableMethod],
    head: str,
    inputs: Mapping[str, TableInput],
    stride: int,
    looked_up: LookupOutputs,
    occurrences: Mapping[str, Occurrences] | None = None,
) -> torch.Tensor:
    """One combine call for a run of like tables (stacked columns; `TableMethod.grouped` of the
    run). A `RunCombiner` (a combine that takes the ids) gets the whole block ``[rows, tables,
    probes, features, width]`` and the ids ``[rows, tables, features]``; otherwise the method
    gets the probes ``[rows, tables, features, width]`` as a list, like `TableMethod.combine`.
    A run of `distinct_ids` tables combines their distinct ids, then puts them back in place."""
    names = layout.group(head)
    method = methods[head]
    pieces = layout.pieces_of(head)
    block = looked_up.blocks[pieces[0].bucket][(head, -1)]
    features, width = len(pieces[0].keys), method.physical_tables[0].dim
    stacked = block.reshape(block.shape[0], len(names), len(pieces), features, width)
    run = method.grouped([methods[n] for n in names])
    if method.combine_uses_ids:
        ids = torch.stack([_padded_ids(inputs[n], block.shape[0]) for n in names], 1)
        combined = run.combine(stacked, ids)
    else:
        # one probe: a reshape, whose backward is a view, not unbind's zero-filled copy
        combined = run.combine([stacked.squeeze(2)] if len(pieces) == 1 else list(stacked.unbind(2)))
    if occurrences and head in occurrences:
        return _put_back_run(layout, names, combined, inputs, occurrences, stride)
    lengths = torch.cat([inputs[n].lengths for n in names])
    if pieces[0].bucket == POOLED_BUCKET or bool((lengths == 1).all()):
        return first_rows(combined, stride).reshape(stride, -1)
    members = [
        _pool_one_id_rows(layout.logical[n], combined[:, i], inputs[n], stride) for i, n in enumerate(names)
    ]
    return torch.cat(members, 1)


def _distinct_vectors(pieces: list[Piece], distinct: DistinctRows, looked_up: LookupOutputs) -> list[torch.Tensor]:
    """Each piece's looked-up distinct rows ``[u, width]``, all under its first key: that key's
    columns of a bag block (its first u bags), or every key's values of a sequence bucket (the
    others empty, but part of the graph, as gradient hooks on each key's output expect)."""
    vectors = []
    for piece in pieces:
        count = distinct.rows[piece.probe].numel()
        if piece.bucket in looked_up.blocks:
            block = looked_up.blocks[piece.bucket][(piece.table, piece.probe)]
            first_key = block if len(piece.keys) == 1 else block[:, : block.shape[1] // len(piece.keys)]
            vectors.append(first_rows(first_key, count))
        else:
            vectors.append(gather_per_id(looked_up.sequences[piece.bucket], piece.keys))
    return vectors


def _pool_one_id_rows(table: LogicalTable, combined: torch.Tensor, table_input: TableInput, stride: int) -> torch.Tensor:
    """Pool a table's combined one-id rows ``[ids, features, width]`` (row i of feature f is its
    i-th id) into its bags."""
    per_feature = _per_feature_rows(combined, table_input.sizes)
    features = list(range(len(table_input.sizes)))
    return pool_per_id(table, torch.cat(per_feature), per_feature, table_input.lengths, stride, features)


def _per_feature_rows(combined: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, ...]:
    """Each feature's combined rows of a one-id block ``[ids, features, width]`` (row i of
    feature f is its i-th id)."""
    return tuple(combined[:n, f] for f, n in enumerate(sizes))


def _one_id_rows(combined: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """A table's combined one-id rows ``[ids, features, width]`` in input order ``[n, width]``."""
    per_feature = _per_feature_rows(combined, sizes)
    return torch.cat(per_feature) if len(per_feature) > 1 else per_feature[0]


def _put_back_run(
    layout: Layout,
    names: list[str],
    combined: torch.Tensor,
    inputs: Mapping[str, TableInput],
    occurrences: Mapping[str, Occurrences],
    stride: int,
) -> torch.Tensor:
    """A run of `distinct_ids` tables' pooled output from their distinct ids' vectors `combined`
    ``[rows, tables, features, width]`` (a table's distinct ids in its first feature's rows):
    one gather when every bag holds one id, else table by table."""
    wheres = [occurrences[n] for n in names]
    if not bool((torch.cat([w.original.lengths for w in wheres]) == 1).all()):
        outputs = [
            _put_back(layout.logical[n], _one_id_rows(combined[:, i], inputs[n].sizes), w, stride)
            for i, (n, w) in enumerate(zip(names, wheres))
        ]
        return torch.cat([out.pooled for out in outputs], 1)
    rows, tables, features, width = combined.shape
    # bag b of feature f of table t holds the distinct id inverse[f * stride + b], at row r of
    # the flat [rows * tables] distinct vectors r * tables + t
    inverse = torch.stack([w.inverse.view(features, stride) for w in wheres])  # [tables, features, stride]
    flat = inverse * tables + torch.arange(tables, device=inverse.device).view(tables, 1, 1)
    distinct = combined[:, :, 0].reshape(rows * tables, width)
    return distinct.index_select(0, flat.permute(2, 0, 1).reshape(-1)).view(stride, tables * features * width)


def _put_back(table: LogicalTable, per_id: torch.Tensor, where: Occurrences, stride: int) -> TableOutput:
    """A `distinct_ids` table's output from its distinct ids' vectors."""
    return _table_output(table, per_id.index_select(0, where.inverse), where.original, stride)


def combine_table(
    table: LogicalTable,
    method: TableMethod,
    pieces: list[Piece],
    table_input: TableInput,
    stride: int,
    looked_up: LookupOutputs,
    distinct: DistinctRows | None = None,
    occurrences: Occurrences | None = None,
) -> TableOutput:
    """One logical table's vectors from its pieces' lookups (a method without physical tables,
    such as DHE, makes its vectors from the ids alone, per id; a `distinct` table's from the
    rows looked up once; a table with `occurrences` from its distinct ids')."""
    bucket = pieces[0].bucket if pieces else None
    if distinct is not None:
        per_id = method.combine_rows(_distinct_vectors(pieces, distinct, looked_up), distinct.index)
    elif bucket in looked_up.blocks:
        vectors = [looked_up.blocks[bucket][(p.table, p.probe)] for p in pieces]
        if occurrences is None:
            combine_bags = _combine_pooled if bucket == POOLED_BUCKET else _combine_one_id_bags
            return TableOutput(combine_bags(table, method, vectors, table_input, stride), {})
        per_id = _one_id_rows(_combine_one_ids(table, method, vectors, table_input), table_input.sizes)
    else:
        vectors = [gather_per_id(looked_up.sequences[p.bucket], p.keys) for p in pieces]
        per_id = method.combine(vectors, table_input.ids) if method.combine_uses_ids else method.combine(vectors)
    if occurrences is not None:
        return _put_back(table, per_id, occurrences, stride)
    return _table_output(table, per_id, table_input, stride)


def _table_output(table: LogicalTable, per_id: torch.Tensor, table_input: TableInput, stride: int) -> TableOutput:
    """A table's output from its vectors ``[n, width]`` in input order: sequence features as
    they are, the others pooled into their bags."""
    per_feature = torch.split(per_id, table_input.sizes)
    sequence = {}
    for feature, rows, feature_lengths in zip(
        table.features, per_feature, table_input.lengths.view(len(table.features), stride)
    ):
        if feature.is_sequence:
            sequence[feature.name] = JaggedTensor(values=rows, lengths=feature_lengths)
    pooled = [i for i, f in enumerate(table.features) if not f.is_sequence]
    if not pooled:
        return TableOutput(None, sequence)
    return TableOutput(pool_per_id(table, per_id, per_feature, table_input.lengths, stride, pooled), sequence)


def _combine_pooled(
    table: LogicalTable, method: TableMethod, vectors: list[torch.Tensor], table_input: TableInput, stride: int
) -> torch.Tensor:
    """Combine the pooled bags of every feature (`vectors`: each probe's ``[B, features * width]``)."""
    count = len(table.features)
    combined = method.combine([v.reshape(stride, count, -1) for v in vectors])
    combined = apply_mean(combined, table.features, table_input.lengths.view(count, stride).t())
    return combined.reshape(stride, -1)


def _combine_one_id_bags(
    table: LogicalTable, method: TableMethod, vectors: list[torch.Tensor], table_input: TableInput, stride: int
) -> torch.Tensor:
    """Combine per id (row i of feature f's column block is its i-th id), then pool the bags;
    when every bag holds one id the combined rows already are the bags."""
    combined = _combine_one_ids(table, method, vectors, table_input)
    if bool((table_input.lengths == 1).all()):
        return first_rows(combined, stride).reshape(stride, -1)
    return _pool_one_id_rows(table, combined, table_input, stride)


def _combine_one_ids(
    table: LogicalTable, method: TableMethod, vectors: list[torch.Tensor], table_input: TableInput
) -> torch.Tensor:
    """The combined one-id rows ``[rows, features, width]`` (row i of feature f is its i-th id)."""
    count = len(table.features)
    blocks = [v.reshape(v.shape[0], count, -1) for v in vectors]
    if method.combine_uses_ids:
        return method.combine(blocks, _padded_ids(table_input, blocks[0].shape[0]))
    return method.combine(blocks)


def _padded_ids(table_input: TableInput, rows: int) -> torch.Tensor:
    """The ids laid out like a per-id block ``[rows, features]``: column f holds feature f's ids,
    then -1 where the block is padded."""
    ids, sizes = table_input.ids.to(torch.int64), table_input.sizes
    if min(sizes) == rows:  # no padding (e.g. one id per bag in every feature)
        return ids.view(len(sizes), rows).t()
    counts = torch.tensor(sizes, device=ids.device).unsqueeze(1)
    filled = torch.arange(rows, device=ids.device) < counts
    padded = torch.full((len(sizes), rows), -1, dtype=torch.int64, device=ids.device)
    padded[filled] = ids
    return padded.t()


def pool_per_id(
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
    sums = apply_mean(sums, chosen, bag_lengths.t())
    return sums.reshape(stride, -1)


def pooled_output(
    layout: Layout, methods: Mapping[str, TableMethod], blocks: dict[str, torch.Tensor], stride: int
) -> KeyedTensor | None:
    if not blocks:
        return None
    keys, widths = [], []
    for name, table in layout.logical.items():
        if name in blocks or layout.group_of.get(name) in blocks:
            for feature in table.features:
                if not feature.is_sequence:
                    keys.append(feature.name)
                    widths.append(methods[name].out_dim)
    ordered = [blocks[name] for name in layout.logical if name in blocks]  # group heads included
    values = ordered[0] if len(ordered) == 1 else torch.cat(ordered, dim=1)
    return KeyedTensor(keys=keys, length_per_key=widths, values=values)


def one_id_bags(counts: list[int], device: torch.device) -> torch.Tensor:
    """Lengths that make each id its own bag: key k gets `counts[k]` bags of one id, then empty
    bags up to the longest key (every key of a KeyedJaggedTensor has the same number of bags)."""
    bags = max(max(counts), 1)
    per_key = torch.tensor(counts, device=device).unsqueeze(1)
    return (torch.arange(bags, device=device) < per_key).flatten().to(torch.int64)


def first_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """`tensor[:rows]`, without the slice (whose backward copies into zeros) when that is all of it."""
    return tensor if tensor.shape[0] == rows else tensor[:rows]


def gather_per_id(per_feature: Mapping[str, JaggedTensor], keys: tuple[str, ...]) -> torch.Tensor:
    if len(keys) == 1:
        return per_feature[keys[0]].values()
    return torch.cat([per_feature[k].values() for k in keys])


def apply_mean(
    pooled: torch.Tensor, features: list[FeatureSpec] | tuple[FeatureSpec, ...], lengths: torch.Tensor
) -> torch.Tensor:
    """Divide the sums of mean-pooled features by their bag sizes; `pooled` is [B, F, D]."""
    means = [i for i, f in enumerate(features) if f.pooling == "mean"]
    if not means:
        return pooled
    divisor = torch.ones_like(lengths, dtype=pooled.dtype)
    divisor[:, means] = lengths[:, means].to(pooled.dtype)
    return pooled / divisor.unsqueeze(-1)

