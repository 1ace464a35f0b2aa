"""DeepSeek-V4: compressed sparse attention (CSA), heavily compressed attention (HCA), sliding
window, attention sinks, hyper-connections, hash-routed MoE. Plain PyTorch, transformers'
`DeepseekV4ForCausalLM` as the parity oracle (tests/model/test_deepseek_v4*.py).

Read in this order:
  config.py     V4Config, HF config.json reader (legacy keys too), presets deepseek-v4-flash / -pro
  ops.py        RMS norms, interleaved partial RoPE (main / compress, YaRN)
  cache.py      the per-sequence cache (window, pools, compressor state) and its bytes per token
  paged.py      the pools in shared refcounted blocks (V4BlockPool, PagedV4Cache.fork), for the engine
  compress.py   the compressors (overlapping CSA windows, HCA pools) and the CSA lightning indexer
  attention.py  window + compressed entries + sink attention, grouped low-rank output
  moe.py        clamped SwiGLU experts, sqrtsoftplus router, hash routing
  model.py      hyper-connections (Sinkhorn), Block, Transformer
  load.py       checkpoint loading (HF / release names, FP8 + block scales, FP4 experts) and saving
  generate.py   chunked prefill + greedy decode over a V4Cache
  engine.py     the serving engine behind EngineProtocol: paged caches, batched decode (load_engine
                routes V4 dirs to it)
"""
