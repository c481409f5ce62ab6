"""OpenAI-compatible HTTP server (API process) and the engine core process behind it."""
