"""Datasets and transforms. Every dataset yields ``(image, label)``: a float CHW tensor in [0, 1] and an int.

No normalisation happens here: mean/std live inside the model (``casify.wrap(..., normalize=...)``), so adversarial
eps is always measured in [0, 1] pixel space. Splits: select checkpoints and tune on a held-out *validation* split,
never on the test set (:func:`train_val_split`; for CIFAR-10 the last 5,000 training images).

One job per file: ``transforms.py`` (images to tensors, the training / evaluation pipelines), ``datasets.py`` (the
dataset classes and direct sources), ``build.py`` (:func:`build_dataset`: a name to its split), ``image_records.py``
with ``hf_dataset.py`` and ``webdataset_shards.py`` (record sources), ``data_fit.py`` (whether data fit a model) and
``corruptions.py`` (seeded common corruptions). This package may import :mod:`casify.core` and below, never a model
class, an attack, training or evaluation.
"""
from .build import (DATASET_NAMES, RECORD_KWARGS, RECORD_SOURCES, build_dataset, dataset_name, record_source,
                    short_name)
from .datasets import (DATA_ENV, SPLITS, EpochSeededDataset, NpzDataset, TensorImageDataset, data_root, digits_dataset,
                       imagefolder_dataset, torchvision_dataset, train_val_split)
from .transforms import (ResizeTensor, Then, ToImageTensor, cifar_train_transform, imagenet_eval_transform,
                         imagenet_train_transform, to_image_tensor)

__all__ = [
    "DATA_ENV", "DATASET_NAMES", "EpochSeededDataset", "NpzDataset", "ResizeTensor", "TensorImageDataset", "Then",
    "ToImageTensor", "build_dataset", "cifar_train_transform",
    "data_root", "digits_dataset", "imagefolder_dataset", "imagenet_eval_transform", "imagenet_train_transform",
    "dataset_name", "short_name", "to_image_tensor", "torchvision_dataset", "train_val_split",
]
