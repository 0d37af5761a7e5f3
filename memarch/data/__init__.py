"""Data: synthetic memory tasks (MQAR), a TFDS builder over them, the byte tokenizer, packed text, and
the grain pipelines the training loop calls (see pipeline.py for the batch format)."""

from memarch.data.pipeline import (
    BATCH_KEYS,
    DataInfo,
    create_eval_batches,
    create_train_iterator,
    data_info,
)
from memarch.data.synthetic import mqar_batch, mqar_example, mqar_eval_sets, mqar_mixture, setting_name
from memarch.data.text import PackedTextSource
from memarch.data.tfds_mqar import MemarchMqar, MqarBuilderConfig, make_builder_config
from memarch.data.tokenizer import ByteTokenizer

__all__ = [
    "BATCH_KEYS",
    "ByteTokenizer",
    "DataInfo",
    "MemarchMqar",
    "MqarBuilderConfig",
    "PackedTextSource",
    "create_eval_batches",
    "create_train_iterator",
    "data_info",
    "make_builder_config",
    "mqar_batch",
    "mqar_eval_sets",
    "mqar_example",
    "mqar_mixture",
    "setting_name",
]
