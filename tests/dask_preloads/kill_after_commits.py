"""A `dask worker --preload` for tests: the worker dies (SIGKILL, no cleanup) right after encode has committed
SRCFLOW_TEST_KILL_AFTER shards, as a node lost mid-run would."""

import os
import signal
from pathlib import Path

import stages.encode as encode

real_encode_shard = encode.encode_shard


def encode_shard(job):
    result = real_encode_shard(job)
    if len(list(Path(job.commits).glob("*.npz"))) >= int(os.environ["SRCFLOW_TEST_KILL_AFTER"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return result


encode.encode_shard = encode_shard  # a task names the function by module and name: this one is found
