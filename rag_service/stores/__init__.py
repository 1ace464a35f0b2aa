"""Storage: the content-addressed blob store, Redis metadata (embedded or external) and the
prefix KV-cache store (safetensors files indexed in Redis)."""
