"""Request bytes checked before protobuf parses them, so a bad field gets INVALID_ARGUMENT naming it.

Protobuf refuses a `string` field holding invalid UTF-8 with a DecodeError that names no field (and
gRPC would answer INTERNAL), and it silently keeps fields it does not know. `wire_problem` walks the
wire format against the message descriptor and names the first such field, e.g. `messages[1].content`.
"""

from __future__ import annotations

import collections

from google.protobuf.descriptor import Descriptor, FieldDescriptor


class _Malformed(Exception):
    pass


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(data):
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise _Malformed


def wire_problem(descriptor: Descriptor, data: bytes) -> str | None:
    """An error message naming the first field of `data` that is unknown or holds invalid UTF-8; None if none."""
    try:
        return _walk(descriptor, data, "")
    except _Malformed:
        return f"request is not a valid {descriptor.full_name} message (truncated or corrupt)"


def _walk(descriptor: Descriptor, data: bytes, path: str) -> str | None:
    seen = collections.Counter()
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        field = descriptor.fields_by_number.get(number)
        if field is None:
            where = f"{path.rstrip('.')} has" if path else "request has"
            return f"{where} unknown field number {number} (not in {descriptor.full_name})"
        name = path + field.name
        if field.is_repeated:
            name += f"[{seen[number]}]"
            seen[number] += 1
        if wire_type == 0:
            _, pos = _varint(data, pos)
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
        elif wire_type == 2:
            size, pos = _varint(data, pos)
            chunk, pos = data[pos : pos + size], pos + size
            if field.type == FieldDescriptor.TYPE_STRING:
                try:
                    chunk.decode("utf-8")
                except UnicodeDecodeError as e:
                    return f"{name} is not valid UTF-8 (byte {e.start})"
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                problem = _walk(field.message_type, chunk, name + ".")
                if problem:
                    return problem
        else:
            raise _Malformed
        if pos > len(data):
            raise _Malformed
    return None
