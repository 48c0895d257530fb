"""io: loading (external data, files read in place), weight access, atomic saving.

external.py: where a tensor's data lives, its checks and lengths; lazy.py: tensors kept out of
memory (mapped, permuted, computed); load.py: load_model; save.py: save_model, streamed payloads;
files.py: output paths and atomic writes; store.py: WeightStore; wire.py: the protobuf wire format;
prefetch.py: a piece computed while the previous one is written.
"""

from .external import (
    INLINE_LIMIT_BYTES, IN_PLACE_KEY, check_external_data, check_tensor_data, is_in_place, iter_graph_tensors,
    over_inline_limit,
)
from .files import (
    MAX_OPTION_FILE_BYTES, check_input_file, check_output_path, check_outputs, open_input, read_input,
    refuse_overwrite, write_text_atomic,
)
from .lazy import LazyTensor, is_lazy_model, is_lazy_tensor, release_lazy
from .load import LAZY_EXTERNAL_BYTES, load_model
from .save import save_model, serialize, streams_inline
from .store import WeightStore, copy_without_payloads, tensor_values

__all__ = [
    "INLINE_LIMIT_BYTES", "IN_PLACE_KEY", "LAZY_EXTERNAL_BYTES", "MAX_OPTION_FILE_BYTES", "LazyTensor", "WeightStore",
    "check_external_data", "check_input_file", "check_output_path", "check_outputs", "check_tensor_data",
    "copy_without_payloads", "is_in_place", "is_lazy_model", "is_lazy_tensor", "iter_graph_tensors", "load_model",
    "open_input", "over_inline_limit", "read_input", "refuse_overwrite", "release_lazy", "save_model", "serialize",
    "streams_inline", "tensor_values", "write_text_atomic",
]
