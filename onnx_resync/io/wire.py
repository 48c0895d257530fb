"""Protobuf wire format, as far as ONNX files need it, so that weights need not pass through protobuf.

Parsing a ModelProto copies every payload into protobuf's memory, and reading a tensor's raw_data
copies it once more; serializing copies it again. For a large model those copies (fresh memory
that the kernel must fault in) cost more than all the matching. So:

- `cut_payloads` finds the large raw payloads of the graph's initializers in the file's bytes and
  returns the file without them (a small skeleton that protobuf parses quickly) and where each
  payload lies, so that the weights are memory-mapped from the file itself (io.load_model);
- `model_chunks` gives the bytes of a ModelProto whose initializers' payloads come from elsewhere
  (mapped or computed a piece at a time), in the order of SerializeToString, so that the file is
  written without ever holding it in memory (io.save_model).

Anything unexpected in the input (a group field, a second graph, a truncated length) makes
`cut_payloads` return None: the caller then lets protobuf parse the file, and report what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import onnx

VARINT, I64, LEN, I32 = 0, 1, 2, 5  # wire types; groups (3, 4) are not used by ONNX
MODEL_GRAPH = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
GRAPH_INITIALIZER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
TENSOR_RAW_DATA = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number


class WireError(ValueError):
    """The bytes are not the protobuf this module expects."""


@dataclass(frozen=True)
class Field:
    number: int
    wire_type: int
    start: int  # where its key begins
    value_start: int  # where its value (for LEN: the payload after the length) begins
    end: int


@dataclass(frozen=True)
class Cut:
    """A payload left in the file: initializer number `index`'s raw_data is buf[offset:offset+length]."""
    index: int
    offset: int
    length: int


def read_varint(buf, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(number: int, wire_type: int) -> bytes:
    return encode_varint(number << 3 | wire_type)


def fields(buf, start: int, end: int) -> Iterator[Field]:
    """The fields of the message buf[start:end], in the order written."""
    pos = start
    while pos < end:
        key, value_start = read_varint(buf, pos, end)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise WireError("field number 0")
        if wire_type == VARINT:
            _, value_end = read_varint(buf, value_start, end)
        elif wire_type == I64:
            value_end = value_start + 8
        elif wire_type == I32:
            value_end = value_start + 4
        elif wire_type == LEN:
            length, value_start = read_varint(buf, value_start, end)
            value_end = value_start + length
        else:
            raise WireError(f"wire type {wire_type}")
        if value_end > end:
            raise WireError("field runs past its message")
        yield Field(number, wire_type, pos, value_start, value_end)
        pos = value_end


def cut_payloads(buf, min_bytes: int) -> tuple[bytes, list[Cut]] | None:
    """The serialized ModelProto `buf` without the raw_data of the graph initializers holding at least
    min_bytes (the skeleton), and where those payloads are; None when buf is not plainly laid out
    (then protobuf must parse it whole)."""
    try:
        top = list(fields(buf, 0, len(buf)))
        graphs = [f for f in top if f.number == MODEL_GRAPH]
        if len(graphs) != 1 or graphs[0].wire_type != LEN:  # several would be merged by protobuf
            return None
        graph = graphs[0]
        pieces: list[bytes] = []
        cuts: list[Cut] = []
        copied_to = graph.value_start
        index = 0
        for field in fields(buf, graph.value_start, graph.end):
            if field.number != GRAPH_INITIALIZER:
                continue
            if field.wire_type != LEN:
                return None
            raw = [f for f in fields(buf, field.value_start, field.end) if f.number == TENSOR_RAW_DATA]
            if len(raw) == 1 and raw[0].wire_type == LEN and raw[0].end - raw[0].value_start >= min_bytes:
                tensor = bytes(buf[field.value_start:raw[0].start]) + bytes(buf[raw[0].end:field.end])
                pieces += [bytes(buf[copied_to:field.start]), _key(GRAPH_INITIALIZER, LEN),
                           encode_varint(len(tensor)), tensor]
                copied_to = field.end
                cuts.append(Cut(index, raw[0].value_start, raw[0].end - raw[0].value_start))
            index += 1
    except WireError:
        return None
    pieces.append(bytes(buf[copied_to:graph.end]))
    graph_bytes = b"".join(pieces)
    skeleton = b"".join([bytes(buf[:graph.start]), _key(MODEL_GRAPH, LEN), encode_varint(len(graph_bytes)),
                         graph_bytes, bytes(buf[graph.end:])])
    return skeleton, cuts


# ---- writing --------------------------------------------------------------------------------
def _split(message_bytes: bytes, number: int, descriptor) -> tuple[bytes, bytes]:
    """message_bytes cut where field `number` belongs: SerializeToString writes the known fields in
    the order of their numbers, then the unknown ones."""
    known = {f.number for f in descriptor.fields}
    for field in fields(message_bytes, 0, len(message_bytes)):
        if field.number > number or field.number not in known:
            return message_bytes[:field.start], message_bytes[field.start:]
    return message_bytes, b""


def copy_fields(source, target, skip: set[str]):
    """Every set field of the message `source` but those named in skip, into target (returned)."""
    for field, value in source.ListFields():
        if field.name in skip:
            continue
        if field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED:
            getattr(target, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)
    return target


# tensor fields that describe where a payload lives: a streamed payload is written inline instead
_PLACEMENT = {"raw_data", "external_data", "data_location"}


def model_chunks(model: onnx.ModelProto, streamed: Callable[[onnx.TensorProto], bool],
                 payload: Callable[[onnx.TensorProto], tuple[int, Iterable]]) -> Iterator:
    """The bytes of `model` as SerializeToString would give them, in chunks, where each graph initializer
    for which streamed(t) holds is written inline with the payload (length, chunks) = payload(t).

    Unknown fields at the top level of the model and of its graph are not kept (like any field-wise
    copy). Payload chunks are yielded as they come, so the model is never whole in memory."""
    head = copy_fields(model, onnx.ModelProto(), {"graph"}).SerializeToString()
    head_before, head_after = _split(head, MODEL_GRAPH, onnx.ModelProto.DESCRIPTOR)
    graph = copy_fields(model.graph, onnx.GraphProto(), {"initializer"}).SerializeToString()
    graph_before, graph_after = _split(graph, GRAPH_INITIALIZER, onnx.GraphProto.DESCRIPTOR)

    records = []  # per initializer: (its bytes before the payload, payload length, chunks, bytes after)
    graph_length = len(graph_before) + len(graph_after)
    for tensor in model.graph.initializer:
        if streamed(tensor):
            header = copy_fields(tensor, onnx.TensorProto(), _PLACEMENT).SerializeToString()
            before, after = _split(header, TENSOR_RAW_DATA, onnx.TensorProto.DESCRIPTOR)
            length, chunks = payload(tensor)
            before += _key(TENSOR_RAW_DATA, LEN) + encode_varint(length)
        else:
            before, length, chunks, after = tensor.SerializeToString(), 0, (), b""
        body = len(before) + length + len(after)
        before = _key(GRAPH_INITIALIZER, LEN) + encode_varint(body) + before
        graph_length += len(before) + length + len(after)
        records.append((before, length, chunks, after))

    yield head_before + _key(MODEL_GRAPH, LEN) + encode_varint(graph_length) + graph_before
    for before, length, chunks, after in records:
        yield before
        written = 0
        for chunk in chunks:
            written += memoryview(chunk).nbytes
            yield chunk
        if written != length:
            raise ValueError(f"a streamed payload gave {written} bytes, not the {length} announced")
        yield after
    yield graph_after + head_after
