"""Datasets: ``load_dataset(name, split, data_dir=None) -> Dataset`` (inputs in [0, 1])."""

from certkd.data import digits  # noqa: F401,E402  (registration)
from certkd.data._registry import Dataset, DatasetInfo, list_datasets, load_dataset, register_dataset

__all__ = ["Dataset", "DatasetInfo", "list_datasets", "load_dataset", "register_dataset"]
