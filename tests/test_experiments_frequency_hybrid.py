"""experiments.frequency_hybrid: each table keeps its most frequent training ids exclusive."""

import torch

from data import load_dataset
from experiments.frequency_hybrid import hybrid_overrides


def test_hot_ids_are_each_tables_most_frequent_training_ids():
    data = {
        "name": "synthetic",
        "num_samples": 2000,
        "num_fields": 2,
        "cardinalities": 100,
        "dense_dim": 0,
        "zipf_a": 1.3,
    }
    overrides = hybrid_overrides({"data": data}, hot_share=0.1)
    counts = load_dataset("synthetic", **{k: v for k, v in data.items() if k != "name"}).id_counts()
    assert set(overrides) == set(counts) == {"C1", "C2"}
    for table, method in overrides.items():
        hot = torch.tensor(method["hot_ids"])
        assert method["name"] == "hashing_trick" and len(hot) == 10
        coldest_hot = counts[table][hot].min()
        others = torch.ones_like(counts[table], dtype=torch.bool)
        others[hot] = False
        assert coldest_hot >= counts[table][others].max()
