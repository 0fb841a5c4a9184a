"""Coverage-guided fuzzing of everything hostile input reaches (docs/fuzzing.md).

    data        `Input`: structured values read from the fuzzer's bytes
    messages    hostile protobuf messages: mostly valid, with mutations, or raw bytes
    driver      a target's contract (one input: decoded or our own error, in bounded time
                and memory) and the two engines that feed it (atheris, or a seeded mutator)
    libfuzzer   the atheris engine: one child process per target
    frames, server, replies, events, stdio, vminitd    the targets (`TARGETS` below)

`python -m fuzz` (`task fuzz`) runs every target; tests/unit/test_fuzz_smoke.py runs each
for a few thousand inputs.
"""
from __future__ import annotations

# target name -> module (fuzz.<module> defines `TARGET`); the order of the report
TARGETS = {
    "frames": "frames",
    "server": "server",
    "replies": "replies",
    "events": "events",
    "stdio": "stdio",
    "vminitd": "vminitd",
}
