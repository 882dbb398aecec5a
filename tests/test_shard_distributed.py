"""Two processes (gloo, CPU): every method under every sharding type torchrec offers on CPU trains
exactly like one process on the same global batch (forward, gradients, every parameter and buffer
after a step)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.models.dlrm import DLRM

import embtab
from embtab.config import EmbeddingSpec, FeatureSpec
from embtab.fused_state import attach_row_reset
from embtab.methods import DHE, DNIS, DPQ, MDE, MGQE, PEP, ROBE, AutoDim, AutoSrh, DeepLight, Dedup, OptEmbed, TTRec
from embtab.methods.managed_collision import ManagedCollision
from embtab.methods.multi_hash import MultiHash
from embtab.methods.hashing_trick import HashingTrick
from embtab.methods.multiplex import multiplex
from embtab.methods.qr import QREmbedding
from embtab.checkpoint import load_training_state, training_state
from embtab.shard import ShardingConstraints, global_mean
from embtab.testing import random_kjt, run_ranks, slice_batch

FEATURES = (
    FeatureSpec("user", 40),
    FeatureSpec("city", 20),  # with user: two like pooled tables, combined as one group
    FeatureSpec("tag", 30, pooling="mean"),
    FeatureSpec("item", 50),
    FeatureSpec("hist", 50, pooling="none", table="item"),
)
DIM = 16
BATCH = 12
LR = 0.5

# (pooled tables' type, per-id tables' type): every type torchrec offers on CPU appears once per side.
SHARDINGS = (
    ("table_wise", "table_wise"),
    ("column_wise", "row_wise"),
    ("table_column_wise", "column_wise"),
    ("data_parallel", "table_wise"),
)

METHODS = {
    "full": {},
    "hashing_trick": {"method": HashingTrick(rows=24)},
    "multi_hash": {"method": MultiHash(rows=24, hashes=2, shared=False)},
    "qr_add": {"method": QREmbedding(collisions=6, operation="add")},
    "qr_mult": {"method": QREmbedding(collisions=6, operation="mult")},
    "managed_collision": {"method": ManagedCollision(rows=20)},
    "optembed": {"method": OptEmbed(t_lr=1.0, alpha=1e-3)},  # thresholds that move measurably
    "pep_dimension": {"method": PEP(granularity="dimension", init_threshold=-2.0)},
    "pep_feature_dim": {"method": PEP(granularity="feature_dim", init_threshold=-2.0)},
    "mde": {"method": MDE(base_dim=8, reference_rows=20)},
    "dnis": {"method": DNIS()},
    "tt_rec": {"method": TTRec(rank=2)},
    "robe": {"method": ROBE(rows=32)},
    "dpq": {"method": DPQ(parts=4, codewords=8)},
    # prunes a quarter of every table before the step's lookup: a threshold over all its shards
    "deeplight": {"method": DeepLight(sparsity=0.5, prune_every=1, damping=0.5, damping_steps=1.0)},
    "dedup": {"method": Dedup(blocks=3, block_rows=8)},  # blocks 0..4 of 8 ids read stored blocks j % 3
    "autosrh": {"method": AutoSrh(groups=1, alpha_lr=0.1, l1=1e-2)},  # alpha steps in the backward, like PEP's s
    "autodim": {"method": AutoDim(alpha_lr=0.1)},
    "mgqe": {"method": MGQE(parts=4, codewords=8, rare_codewords=2, hot_ids=(1, 2, 3))},
    # no table for user and city, fused tables for the rest; batch norm would see local batches
    "dhe": {
        "method": DHE(hashes=16, hidden=8, layers=2, batch_norm=False),
        "table_methods": (("tag", HashingTrick(rows=24)), ("item", QREmbedding(collisions=6))),
    },
}
# OptEmbed samples a random width per id in training, AutoDim Gumbel noise per step (and batch
# statistics); these compare in eval mode (thresholds and mixture logits still train on their own
# optimizers).
EVAL_MODE = {"optembed", "autodim"}


def _spec(method: str) -> EmbeddingSpec:
    if method == "multiplex":
        return multiplex(EmbeddingSpec(features=FEATURES, dim=DIM), rows=48)
    return EmbeddingSpec(features=FEATURES, dim=DIM, **METHODS[method])


class Head(nn.Module):
    """Embeddings -> one logit per sample: pooled features and summed sequences, then a linear layer."""

    def __init__(self, spec: EmbeddingSpec) -> None:
        super().__init__()
        self.tables = embtab.EmbeddingTables(spec)
        self.linear = nn.Linear(5 * DIM, 1)

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        out = self.tables(kjt)
        hist = out.sequence["hist"]
        rows = torch.repeat_interleave(torch.arange(kjt.stride()), hist.lengths())
        summed = torch.zeros(kjt.stride(), DIM).index_add(0, rows, hist.values())
        return self.linear(torch.cat([out.pooled.values(), summed], 1)).squeeze(1)


def _constraints(model: Head, pooled: str, per_id: str) -> ShardingConstraints:
    per_id_tables = {c.name for ec in model.tables.ecs.values() for c in ec.embedding_configs()}
    types = {
        name: (per_id if name in per_id_tables else pooled,)
        for name in model.tables.physical_tables
    }
    return ShardingConstraints(sharding_types=types, column_shard_width=4)


def _reference_step(model: Head, kjt: KeyedJaggedTensor, target: torch.Tensor):
    """One process, no fused kernels: plain torchrec modules and torch's SGD on the global batch;
    parameters with an optimizer of their own (OptEmbed's thresholds) step with it in the backward."""
    plain = [p for p in model.parameters() if not hasattr(p, "_in_backward_optimizers")]
    optimizer = torch.optim.SGD(plain, lr=LR)
    logits = model(kjt)
    ((logits - target) ** 2).mean().backward()
    grad = model.linear.weight.grad.clone()
    optimizer.step()
    return logits.detach(), grad, model.state_dict()


def _local_part(tensor: torch.Tensor, whole: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if not isinstance(tensor, ShardedTensor):
        return [(tensor, whole)]
    pairs = []
    for shard in tensor.local_shards():
        window = tuple(
            slice(o, o + s) for o, s in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes)
        )
        pairs.append((shard.tensor, whole[window]))
    return pairs


def _check_case(rank: int, world: int, method: str, pooled: str, per_id: str) -> None:
    models = []
    for _ in range(2):  # built twice alike, each with its own in-backward optimizers
        torch.manual_seed(7)
        models.append(Head(_spec(method)).train(method not in EVAL_MODE))
    model, reference = models
    attach_row_reset(reference)  # what fuse binds on the sharded model (managed collisions' row reset)
    kjt = random_kjt(FEATURES, batch=BATCH, seed=3)
    target = torch.randn(BATCH, generator=torch.Generator().manual_seed(4))
    ref_logits, ref_grad, ref_state = _reference_step(reference, kjt, target)

    dmp = embtab.fuse(
        model,
        embtab.SparseOptimizer("sgd", lr=LR),
        process_group=torch.distributed.group.WORLD,
        constraints=_constraints(model, pooled, per_id),
    )
    dense = torch.optim.SGD(embtab.dense_parameters(dmp), lr=LR)
    lo, hi = (0, 5) if rank == 0 else (5, BATCH)  # uneven parts: the loss is still the global mean
    logits = dmp(slice_batch(kjt, lo, hi))
    global_mean((logits - target[lo:hi]) ** 2, BATCH, world).backward()
    grad = next(p.grad for n, p in dmp.named_parameters() if n.endswith("linear.weight"))
    dense.step()

    case = f"{method} with pooled {pooled}, per-id {per_id}"
    torch.testing.assert_close(logits, ref_logits[lo:hi], atol=1e-5, rtol=0, msg=f"forward: {case}")
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=0, msg=f"gradient: {case}")
    state = dmp.state_dict()
    for key, whole in ref_state.items():
        if key in state:
            for ours, theirs in _local_part(state[key], whole):
                torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0, msg=f"{key}: {case}")


def _all_cases(rank: int, world: int) -> None:
    for method in [*METHODS, "multiplex"]:
        for pooled, per_id in SHARDINGS:
            _check_case(rank, world, method, pooled, per_id)


def test_every_method_and_sharding_type_matches_one_process():
    run_ranks(_all_cases, 2)


def _torchrec_dlrm(weighted: bool) -> DLRM:
    """torchrec's own DLRM whose collection is embtab's: QR tables, one hashed table."""
    configs = [
        EmbeddingBagConfig(name=f"t_{f.name}", embedding_dim=DIM, num_embeddings=f.cardinality, feature_names=[f.name])
        for f in FEATURES
        if f.pooling == "sum"
    ]
    ebc = embtab.CompressedEmbeddingBagCollection(
        tables=configs,
        method=QREmbedding(collisions=6, operation="add"),
        table_methods={"t_city": HashingTrick(rows=8)},
        is_weighted=weighted,
    )
    return DLRM(ebc, dense_in_features=3, dense_arch_layer_sizes=[8, DIM], over_arch_layer_sizes=[8, 1])


def _check_torchrec_dlrm(rank: int, world: int, sharding: str, weighted: bool) -> None:
    models = []
    for _ in range(2):
        torch.manual_seed(7)
        models.append(_torchrec_dlrm(weighted))
    model, reference = models
    features = [f for f in FEATURES if f.pooling == "sum"]
    kjt = random_kjt(features, batch=BATCH, seed=3)
    if weighted:
        weights = torch.rand(kjt.values().numel(), generator=torch.Generator().manual_seed(6))
        kjt = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(), weights=weights)
    dense_input = torch.randn(BATCH, 3, generator=torch.Generator().manual_seed(5))
    target = torch.randn(BATCH, generator=torch.Generator().manual_seed(4))

    ref_logits = reference(dense_input, kjt).squeeze(1)
    ((ref_logits - target) ** 2).mean().backward()
    ref_grad = reference.over_arch.model[1].weight.grad.clone()
    torch.optim.SGD(reference.parameters(), lr=LR).step()

    constraints = ShardingConstraints(default_types=(sharding,), column_shard_width=4)
    dmp = embtab.fuse(
        model, embtab.SparseOptimizer("sgd", lr=LR), process_group=torch.distributed.group.WORLD, constraints=constraints
    )
    dense = torch.optim.SGD(embtab.dense_parameters(dmp), lr=LR)
    lo, hi = (0, 5) if rank == 0 else (5, BATCH)
    logits = dmp(dense_input[lo:hi], slice_batch(kjt, lo, hi)).squeeze(1)
    global_mean((logits - target[lo:hi]) ** 2, BATCH, world).backward()
    grad = next(p.grad for n, p in dmp.named_parameters() if n.endswith("over_arch.model.1.weight"))
    dense.step()

    torch.testing.assert_close(logits, ref_logits[lo:hi].detach(), atol=1e-5, rtol=0, msg=f"forward: {sharding}, weighted={weighted}")
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=0, msg=f"gradient: {sharding}")
    state = dmp.state_dict()
    compared = 0
    for key, whole in reference.state_dict().items():
        if key in state:
            compared += 1
            for ours, theirs in _local_part(state[key], whole):
                torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0, msg=f"{key}: {sharding}")
    assert compared == len(reference.state_dict())


def _torchrec_dlrm_cases(rank: int, world: int) -> None:
    for sharding in ("table_wise", "column_wise", "table_column_wise", "data_parallel"):
        _check_torchrec_dlrm(rank, world, sharding, weighted=False)
    _check_torchrec_dlrm(rank, world, "column_wise", weighted=True)  # fbgemm's weighted kernel, sharded


def test_torchrec_dlrm_on_embtab_tables_matches_one_process():
    """torchrec's DLRM built on `CompressedEmbeddingBagCollection` shards like embtab's own models,
    with weighted ids too."""
    run_ranks(_torchrec_dlrm_cases, 2)


def _fused(model: Head, kind: str, pooled: str, per_id: str, group=None):
    return embtab.fuse(
        model,
        embtab.SparseOptimizer(kind, lr=0.2),
        process_group=group,
        constraints=_constraints(model, pooled, per_id),
    )


def _train_step(dmp, part: tuple[int, int], world: int) -> torch.Tensor:
    """One step on `part` of a fixed global batch; returns the logits of that part."""
    kjt = random_kjt(FEATURES, batch=BATCH, seed=3)
    target = torch.randn(BATCH, generator=torch.Generator().manual_seed(4))
    logits = dmp(slice_batch(kjt, *part))
    global_mean((logits - target[part[0] : part[1]]) ** 2, BATCH, world).backward()
    return logits.detach()


def _sharded_save(rank: int, world: int, kind: str, pooled: str, per_id: str, path: str) -> None:
    torch.manual_seed(7)
    model = Head(_spec("full"))
    dmp = _fused(model, kind, pooled, per_id, torch.distributed.group.WORLD)
    _train_step(dmp, (rank * BATCH // world, (rank + 1) * BATCH // world), world)
    state = training_state(dmp)
    if rank == 0:
        torch.save(state, path)


def _sharded_load_save(rank: int, world: int, kind: str, pooled: str, per_id: str, folder: str) -> None:
    """Load a one-process checkpoint into a sharded model, check its forward, save it again."""
    torch.manual_seed(11)
    dmp = _fused(Head(_spec("qr_add")), kind, pooled, per_id, torch.distributed.group.WORLD)
    load_training_state(dmp, torch.load(Path(folder) / "single.pt", weights_only=True))
    lo, hi = rank * BATCH // world, (rank + 1) * BATCH // world
    with torch.no_grad():
        logits = dmp(slice_batch(random_kjt(FEATURES, batch=BATCH, seed=5), lo, hi))
    expected = torch.load(Path(folder) / "logits.pt", weights_only=True)[lo:hi]
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    state = training_state(dmp)
    if rank == 0:
        torch.save(state, Path(folder) / "resaved.pt")


def _assert_same_state(ours: dict, theirs: dict) -> None:
    for part in ("model", "sparse_optimizer"):
        assert ours[part].keys() == theirs[part].keys()
        for key, value in theirs[part].items():
            torch.testing.assert_close(ours[part][key], value, atol=1e-5, rtol=0, msg=key)


def test_sharded_checkpoint_loads_into_one_process(tmp_path):
    """Exact Adagrad keeps one state per element, so column shards train exactly as one table."""
    run_ranks(_sharded_save, 2, "adagrad", "column_wise", "row_wise", str(tmp_path / "sharded.pt"))
    torch.manual_seed(7)
    single = _fused(Head(_spec("full")), "adagrad", "table_wise", "table_wise")
    _train_step(single, (0, BATCH), 1)
    torch.manual_seed(11)
    restored = _fused(Head(_spec("full")), "adagrad", "table_wise", "table_wise")
    load_training_state(restored, torch.load(tmp_path / "sharded.pt", weights_only=True))
    _assert_same_state(training_state(restored), training_state(single))


def test_one_process_checkpoint_loads_into_shards_and_back(tmp_path):
    """Row-wise Adagrad's per-row state is replicated into every column shard on load and
    averaged back on save: the round trip returns the checkpoint unchanged."""
    torch.manual_seed(7)
    single = _fused(Head(_spec("qr_add")), "rowwise_adagrad", "table_wise", "table_wise")
    _train_step(single, (0, BATCH), 1)
    torch.save(training_state(single), tmp_path / "single.pt")
    with torch.no_grad():
        torch.save(single(random_kjt(FEATURES, batch=BATCH, seed=5)), tmp_path / "logits.pt")
    run_ranks(_sharded_load_save, 2, "rowwise_adagrad", "column_wise", "row_wise", str(tmp_path))
    resaved, original = torch.load(tmp_path / "resaved.pt", weights_only=True), torch.load(tmp_path / "single.pt", weights_only=True)
    _assert_same_state(resaved, original)
    assert any(v.abs().sum() > 0 for v in original["sparse_optimizer"].values())
