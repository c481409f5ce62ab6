"""The engine core: the engine loop in its own process (`process`), the messages it exchanges
over a pipe (`messages`), and the API-process side that talks to it (`client`). No HTTP here:
the server and the batch runner both drive the engine through `EngineClient`."""
