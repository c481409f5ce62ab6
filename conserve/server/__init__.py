"""The OpenAI-compatible HTTP server (API process): routes, streaming, admission and guards.
The OpenAI logic is `conserve.openai`; the engine runs behind `conserve.core`."""
