"""The OpenAI-compatible server: `app` (HTTP), `engine` (batching worker), `protocol`, `cli`."""
