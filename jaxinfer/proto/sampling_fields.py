"""The `SamplingParams` fields that are proto3 `optional` (unset means the engine's default), read from
the descriptor so the service and the client never keep their own list."""

from jaxinfer.proto import jaxinfer_pb2 as pb

OPTIONAL_SAMPLING_FIELDS = tuple(
    f.name for f in pb.SamplingParams.DESCRIPTOR.fields if f.has_presence and f.message_type is None
)
