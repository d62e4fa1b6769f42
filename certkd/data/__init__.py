"""Datasets: ``load_dataset(name, split, data_dir=None) -> Dataset`` (inputs in [0, 1])."""

from certkd.data import cifar, digits, imagenet, mnist  # noqa: F401,E402  (registration)
from certkd.data._registry import (
    DATASETS,
    SPLITS,
    BatchSource,
    Dataset,
    DatasetInfo,
    Points,
    TensorPoints,
    dataset_description,
    dataset_info,
    list_datasets,
    load_dataset,
    register_dataset,
)

__all__ = ["DATASETS", "SPLITS", "BatchSource", "Dataset", "DatasetInfo", "Points", "TensorPoints", "dataset_description", "dataset_info", "list_datasets", "load_dataset",
           "register_dataset"]
