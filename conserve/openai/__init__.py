"""The OpenAI API without a web framework: request bodies, their preparation into engine
requests, response bodies and error objects. The HTTP server and the batch runner both answer
requests through it, so a batch line gets exactly the answer `POST` would give."""
