#!/usr/bin/env python3
"""Reads a TensorBoard events file with the protobuf library and the crc32c package (not with
twins' own code) and checks it against the run's metrics.jsonl.

usage: tfevents_check.py EVENTS_FILE METRICS_JSONL
Every frame's two masked CRC-32C must match; every field is one the schema declares, with its
wire type; the first event is file_version "brain.Event:2", the second SessionLog START at the
first logged step; each metrics.jsonl line with a "step" must appear as scalars at that step, "train/<key>" for
step lines and "epoch/<key>" for epoch lines (those with "epoch_seconds"), every number equal to
the line's value rounded to float32 (null: a NaN or infinity there). Exit 0: all good; 1: a mismatch (printed); 77: the
protobuf or crc32c Python package is missing (the caller skips).
"""
import json
import math
import struct
import sys

try:
    import crc32c
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
except ImportError as e:
    print(f"skip: {e}")
    sys.exit(77)


def event_class():
    """TensorBoard's Event, Summary, Summary.Value and SessionLog messages, the fields twins
    writes, declared proto2 so that HasField tells a written field from a default."""
    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="twins_event_check.proto", package="tbcheck", syntax="proto2")
    summary = fdp.message_type.add(name="Summary")
    value = summary.nested_type.add(name="Value")
    value.field.add(name="tag", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    value.field.add(name="simple_value", number=2, type=F.TYPE_FLOAT, label=F.LABEL_OPTIONAL)
    summary.field.add(name="value", number=1, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED,
                      type_name=".tbcheck.Summary.Value")
    session = fdp.message_type.add(name="SessionLog")
    session.field.add(name="status", number=1, type=F.TYPE_INT32, label=F.LABEL_OPTIONAL)
    event = fdp.message_type.add(name="Event")
    event.field.add(name="wall_time", number=1, type=F.TYPE_DOUBLE, label=F.LABEL_OPTIONAL)
    event.field.add(name="step", number=2, type=F.TYPE_INT64, label=F.LABEL_OPTIONAL)
    event.field.add(name="file_version", number=3, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    event.field.add(name="summary", number=5, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
                    type_name=".tbcheck.Summary")
    event.field.add(name="session_log", number=7, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
                    type_name=".tbcheck.SessionLog")
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(fdp.SerializeToString())
    desc = pool.FindMessageTypeByName("tbcheck.Event")
    if hasattr(message_factory, "GetMessageClass"):
        return message_factory.GetMessageClass(desc)
    return message_factory.MessageFactory(pool).GetPrototype(desc)


def fully_known(message):
    """No field of a number or wire type the schema does not declare, at any depth."""
    if len(message.UnknownFields()) != 0:
        return False
    for field, value in message.ListFields():
        if field.type == field.TYPE_MESSAGE:
            items = value if field.label == field.LABEL_REPEATED else [value]
            if not all(fully_known(v) for v in items):
                return False
    return True


def as_float32(value):
    """The float32 a double becomes (beyond float's range: the infinity of its sign)."""
    if abs(value) > 3.4028234663852886e38:
        return math.copysign(math.inf, value)
    return struct.unpack("<f", struct.pack("<f", value))[0]


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
    events = []
    for body in records(events_path):
        e = Event()
        e.ParseFromString(body)
        if not fully_known(e):
            print(f"event {len(events)}: fields the schema does not declare")
            return 1
        events.append(e)
    # 0: the version; 1: the session's start at its first step; then the scalars.
    if len(events) < 2 or events[0].file_version != "brain.Event:2" or events[0].step != 0:
        print("the first event is not file_version brain.Event:2 at step 0")
        return 1
    if not events[1].HasField("session_log") or events[1].session_log.status != 1:
        print("the second event is not SessionLog START")
        return 1
    got = {}
    for e in events:
        if e.wall_time < 1e9 or not e.HasField("wall_time"):
            print(f"wall_time {e.wall_time} is not a time")
            return 1
    for e in events[2:]:
        if not e.HasField("step") or not e.HasField("summary"):
            print("a scalar event without a step or a summary")
            return 1
        for v in e.summary.value:
            if not v.HasField("tag") or not v.HasField("simple_value"):
                print("a value without a tag or a simple_value")
                return 1
            got[(v.tag, e.step)] = v.simple_value
    expected = 0
    first_step = None
    for line in open(metrics_path):
        m = json.loads(line)
        if "step" not in m:
            continue
        first_step = m["step"] if first_step is None else first_step
        group = "epoch/" if "epoch_seconds" in m else "train/"
        for key, value in m.items():
            if key == "step" or isinstance(value, (bool, str, list, dict)):
                continue
            tag = group + key
            have = got.get((tag, m["step"]))
            if value is None:  # JSON's NaN and infinities
                ok = have is not None and not math.isfinite(have)
            else:
                ok = have == as_float32(float(value))
            if not ok:
                print(f"{tag} at step {m['step']}: events file {have}, metrics.jsonl {value}")
                return 1
            expected += 1
    if expected != len(got):
        print(f"{len(got)} scalars in the events file, {expected} numbers in metrics.jsonl")
        return 1
    if first_step is not None and events[1].step != first_step:
        print(f"SessionLog START at step {events[1].step}, but the first logged step is {first_step}")
        return 1
    print(f"ok: {len(events)} events, {expected} scalars")
    return 0


if __name__ == "__main__":
    sys.exit(main())
