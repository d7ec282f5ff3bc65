"""Read back a W&B offline run (run-*.wandb) without the network: the file is a 7-byte header and LevelDB-log
blocks of protobuf Records. Test helper only."""

import struct

BLOCK = 32768


def records(path):
    """Records of a .wandb file: a 7-byte header, then LevelDB-log blocks (checksum, length, type, data)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, parts = 7, []
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        parts.append(chunk)
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(b"".join(parts))
            parts = []
            yield rec
