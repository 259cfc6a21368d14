"""storage_schemas.success.write_atomic, the one file writer: all or nothing, and a killed writer leaves only
what the store's cleaner sweeps."""

import os
import subprocess
import sys

import numpy as np
import pytest

from pipeline.artifacts import ArtifactStore
from storage_schemas.success import temp_owner, write_atomic
from tests.conftest import REPO


def test_a_writer_that_fails_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "reference.npz"
    path.write_bytes(b"old")

    def failing(f):
        f.write(b"half of the new file")
        raise ValueError("the writer failed")

    with pytest.raises(ValueError, match="the writer failed"):
        write_atomic(path, failing)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["reference.npz"]


def test_savez_through_the_writer_keeps_the_name_and_the_bytes(tmp_path):
    arrays = {"mu": np.arange(3.0), "meta": np.array("{}")}
    write_atomic(tmp_path / "ref.npz", lambda f: np.savez(f, **arrays))
    np.savez(tmp_path / "direct.npz", **arrays)
    assert sorted(os.listdir(tmp_path)) == ["direct.npz", "ref.npz"]  # no .npz appended to a temp name
    assert (tmp_path / "ref.npz").read_bytes() == (tmp_path / "direct.npz").read_bytes()


KILLED_WRITER = """
import os, sys
from pathlib import Path
from storage_schemas.success import write_atomic

def dies(f):
    f.write(b"half written")
    f.flush()
    os._exit(9)  # no cleanup runs, as under SIGKILL

write_atomic(Path(sys.argv[1]), dies)
"""


def test_a_killed_writer_leaves_only_a_temp_file_that_the_store_sweeps(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    out = store.open_output("reference", "f" * 64)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out.path / "reference.npz")], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.wait() == 9
    (leftover,) = out.path.iterdir()
    assert leftover.match(".*.tmp-*") and temp_owner(leftover).pid == proc.pid  # the sweep's pattern, a dead owner
    store.open_output("reference", "f" * 64)  # a resumed run opens the output again
    assert list(out.path.iterdir()) == []
