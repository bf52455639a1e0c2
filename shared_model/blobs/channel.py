"""gRPC settings both ends of the blob service use (server and client must agree)."""

from __future__ import annotations

#: Bytes per streamed ``Get``/``Put`` chunk.
CHUNK_SIZE = 1 << 20
#: A chunk is CHUNK_SIZE plus a few bytes of framing; tokens listing many blobs need more
#: than gRPC's default 8 KiB of metadata.
GRPC_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", 8 << 20),
    ("grpc.max_receive_message_length", 8 << 20),
    ("grpc.max_metadata_size", 256 << 10),
]
