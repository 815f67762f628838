"""The service: a Ray Serve application that generates adapters, routes inputs and serves completions.

`serve.engine` (the batched multi-adapter LLM engine) and `serve.config` import neither Ray nor FAISS, so
the engine benchmark runs on machines that have only torch and transformers.
"""
