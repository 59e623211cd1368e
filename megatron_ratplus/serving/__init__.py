"""ratplus-serve: an OpenAI-compatible server with continuous batching over the sparse decode
cache (docs/DESIGN.md §5); the console script is megatron_ratplus/cli/serve.py."""
