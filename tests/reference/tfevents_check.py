#!/usr/bin/env python3
"""Reads a TensorBoard events file with the protobuf library and the crc32c package (not with
twins' own code) and checks it against the run's metrics.jsonl.

usage: tfevents_check.py EVENTS_FILE METRICS_JSONL
Every frame's two masked CRC-32C must match; the first event is file_version "brain.Event:2";
each metrics.jsonl line with a "step" must appear as scalars at that step, "train/<key>" for
step lines and "epoch/<key>" for epoch lines (those with "epoch_seconds"), every number equal to
the line's value rounded to float32. Exit 0: all good; 1: a mismatch (printed); 77: the
protobuf or crc32c Python package is missing (the caller skips).
"""
import json
import struct
import sys

try:
    import crc32c
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
except ImportError as e:
    print(f"skip: {e}")
    sys.exit(77)


def event_class():
    """TensorBoard's Event, Summary and Summary.Value messages, the fields twins writes."""
    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="twins_event_check.proto", package="tbcheck", syntax="proto3")
    summary = fdp.message_type.add(name="Summary")
    value = summary.nested_type.add(name="Value")
    value.field.add(name="tag", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    value.field.add(name="simple_value", number=2, type=F.TYPE_FLOAT, label=F.LABEL_OPTIONAL)
    summary.field.add(name="value", number=1, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED,
                      type_name=".tbcheck.Summary.Value")
    event = fdp.message_type.add(name="Event")
    event.field.add(name="wall_time", number=1, type=F.TYPE_DOUBLE, label=F.LABEL_OPTIONAL)
    event.field.add(name="step", number=2, type=F.TYPE_INT64, label=F.LABEL_OPTIONAL)
    event.field.add(name="file_version", number=3, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    event.field.add(name="summary", number=5, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
                    type_name=".tbcheck.Summary")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    desc = pool.FindMessageTypeByName("tbcheck.Event")
    if hasattr(message_factory, "GetMessageClass"):
        return message_factory.GetMessageClass(desc)
    return message_factory.MessageFactory(pool).GetPrototype(desc)


def masked(data):
    c = crc32c.crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def records(path):
    data = open(path, "rb").read()
    at = 0
    while at < len(data):
        header = data[at:at + 8]
        (length,) = struct.unpack("<Q", header)
        (crc,) = struct.unpack("<I", data[at + 8:at + 12])
        if crc != masked(header):
            raise ValueError(f"length CRC mismatch at byte {at}")
        body = data[at + 12:at + 12 + length]
        (crc,) = struct.unpack("<I", data[at + 12 + length:at + 16 + length])
        if len(body) != length or crc != masked(body):
            raise ValueError(f"data CRC mismatch at byte {at}")
        yield body
        at += 16 + length


def main():
    events_path, metrics_path = sys.argv[1], sys.argv[2]
    Event = event_class()
    got = {}
    events = []
    for body in records(events_path):
        e = Event()
        e.ParseFromString(body)
        events.append(e)
    if not events or events[0].file_version != "brain.Event:2":
        print("the first event is not file_version brain.Event:2")
        return 1
    for e in events[1:]:
        if e.wall_time < 1e9:
            print(f"wall_time {e.wall_time} is not a time")
            return 1
        for v in e.summary.value:
            got[(v.tag, e.step)] = v.simple_value
    expected = 0
    for line in open(metrics_path):
        m = json.loads(line)
        if "step" not in m:
            continue
        group = "epoch/" if "epoch_seconds" in m else "train/"
        for key, value in m.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            tag = group + key
            want = struct.unpack("<f", struct.pack("<f", float(value)))[0]
            if got.get((tag, m["step"])) != want:
                print(f"{tag} at step {m['step']}: events file {got.get((tag, m['step']))}, metrics.jsonl {value}")
                return 1
            expected += 1
    if expected != len(got):
        print(f"{len(got)} scalars in the events file, {expected} numbers in metrics.jsonl")
        return 1
    print(f"ok: {len(events)} events, {expected} scalars")
    return 0


if __name__ == "__main__":
    sys.exit(main())
