"""Data helpers: the embedded synthetic dataset and MVTec-layout folder datamodules."""

from .folders import DatasetFolderError, folder_datamodule, validate_dataset_folder
from .synthetic import PRODUCTS, generate_synthetic_dataset

__all__ = [
    "PRODUCTS",
    "DatasetFolderError",
    "folder_datamodule",
    "generate_synthetic_dataset",
    "validate_dataset_folder",
]
