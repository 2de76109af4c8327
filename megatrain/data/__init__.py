"""The data path: raw text -> tokenizer -> preprocess -> `.bin/.idx` -> fixed-length samples."""
from megatrain.data.indexed import IndexedDataset, IndexedDatasetError, IndexedDatasetWriter, token_dtype_for_vocab
from megatrain.data.readers import InputError
from megatrain.data.samples import (
    BlendedDataset,
    GPTSampleDataset,
    SampleIndexError,
    build_gpt_datasets,
    parse_data_path,
    split_ranges,
)
from megatrain.data.tokenizer import Tokenizer, TokenizerError, build_tokenizer

__all__ = [
    "IndexedDataset", "IndexedDatasetError", "IndexedDatasetWriter", "token_dtype_for_vocab", "InputError",
    "BlendedDataset", "GPTSampleDataset", "SampleIndexError", "build_gpt_datasets", "parse_data_path",
    "split_ranges", "Tokenizer", "TokenizerError", "build_tokenizer",
]
