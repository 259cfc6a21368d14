"""pipeline.cache.per_process: built once per process, again when its files change."""

import os
import threading
import time

from pipeline.cache import per_process


def test_concurrent_callers_share_one_value_built_once():
    built, barrier = [], threading.Barrier(8)

    def build():
        built.append(1)
        time.sleep(0.05)  # the other callers arrive while it builds
        return object()

    def call():
        barrier.wait()
        values.append(per_process("test-concurrent", "key", build))

    values: list = []
    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(built) == 1 and len(values) == 8 and all(v is values[0] for v in values)


def test_a_file_rewritten_in_place_is_reloaded_and_an_unchanged_one_is_not(tmp_path):
    weights, loads = tmp_path / "weights.bin", []

    def load():
        loads.append(1)
        return weights.read_bytes()

    weights.write_bytes(b"first")
    assert per_process("test-files", "w", load, [weights]) == b"first"
    assert per_process("test-files", "w", load, [weights]) == b"first" and len(loads) == 1
    weights.write_bytes(b"a longer file")  # another size
    assert per_process("test-files", "w", load, [weights]) == b"a longer file"
    mtime = weights.stat().st_mtime_ns
    weights.write_bytes(b"the same size")  # the same size, a later mtime (set: a coarse clock could repeat it)
    os.utime(weights, ns=(mtime + 10**9, mtime + 10**9))
    assert per_process("test-files", "w", load, [weights]) == b"the same size" and len(loads) == 3


def test_a_new_key_replaces_the_value_of_its_kind():
    first = per_process("test-kind", 1, object)
    assert per_process("test-kind", 1, object) is first
    second = per_process("test-kind", 2, object)
    assert second is not first and per_process("test-kind", 1, object) is not first  # rebuilt: one held per kind
