"""How long a full garbage collection takes in a process that has imported the API server and
loaded the default model's tokenizer, before and after `gc.freeze()` (session 28). Usage:
python gc_pause.py. A record, not a maintained command."""

import gc
import time

import conserve.server.app  # noqa: F401 - what the API process imports
from conserve.model.loader import resolve_model
from conserve.model.tokenizer import Tokenizer


def full_collection_ms() -> float:
    t = time.perf_counter()
    gc.collect()
    return (time.perf_counter() - t) * 1e3


if __name__ == "__main__":
    gc.collect()
    print(
        f"after imports: {len(gc.get_objects())} tracked objects, full collection "
        f"{full_collection_ms():.1f} ms"
    )
    tokenizer = Tokenizer.load(resolve_model("default"))
    gc.collect()
    print(
        f"with the tokenizer: {len(gc.get_objects())} tracked objects, full collection "
        f"{full_collection_ms():.1f} ms"
    )
    gc.freeze()
    print(f"after gc.freeze(): full collection {full_collection_ms():.1f} ms")
