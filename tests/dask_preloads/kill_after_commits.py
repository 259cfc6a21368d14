"""A `dask worker --preload` for tests: the worker dies (SIGKILL, no cleanup) right after encode has committed
SRCFLOW_TEST_KILL_AFTER shards, as a node lost mid-run would."""

import os
import signal
from pathlib import Path

import stages.encode as encode


def killing(encode_shard):
    def encode_then_die(job):
        result = encode_shard(job)
        if len(list(Path(job.commits).glob("*.npz"))) >= int(os.environ["SRCFLOW_TEST_KILL_AFTER"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    encode_then_die.kills = True
    return encode_then_die


if not getattr(encode.encode_shard, "kills", False):  # a preload may be imported twice
    encode.encode_shard = killing(encode.encode_shard)  # a task names the function by module and name
