"""Datasets: every source becomes one normalized table with a content fingerprint (bundled sets, files,
Hugging Face datasets, images, text pairs, augmented views).
"""

from unipt._lazy import lazy_surface

_SURFACE = {
    "RECIPE": "augment",
    "TRAIN_SPLIT": "augment",
    "augmented_hashes": "augment",
    "view_for_epoch": "augment",
    "view_hash": "augment",
    "views_key_field": "augment",
    "bundled_cnn_settings": "bundled",
    "bundled_data_path": "bundled",
    "bundled_model_path": "bundled",
    "is_bundled": "bundled",
    "RT_SCORE_MIN_REVIEWS": "bundled_sets",
    "IMAGE_TYPE": "images",
    "image_array": "images",
    "load_image": "images",
    "make_image": "images",
    "RawExamples": "raw_examples",
    "DatasetTable": "table",
    "TEXT_PAIR_COLUMN": "table",
    "backbone_inputs": "table",
    "input_hashes": "table",
    "load_dataset": "table",
    "normalize": "table",
}
__all__ = sorted(_SURFACE)
__getattr__, __dir__ = lazy_surface(__name__, _SURFACE)
