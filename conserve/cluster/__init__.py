"""Scale-out on Ray: several engine replicas behind one front door.

Each replica is a Ray actor running the same engine core loop as `conserve serve`'s child
process (`replica.py`); the front door reaches it through a `RayTransport` (`transport.py`)
behind the ordinary `EngineClient`, so streaming, aborts and errors stay those of one engine.
`ReplicaSet` (`replicas.py`) is the Backend the server and the Batch API use: it routes each
request (`router.py`: online by predicted TTFT, offline by prefix affinity), follows replicas
that Ray restarts, and retries work a lost replica had not answered. `launch.py` starts or joins
the Ray cluster. Ray is imported only here, and only when replicas are asked for.
"""
