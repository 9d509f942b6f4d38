"""Looking at models: what they attend to, what they cost, how runs compare.

- `capture`: the attention-capture contract (`AttentionLayer`, `record_attention`). It needs only
  torch, so every layer (attention kernels included) may import it;
- `flops`: the FLOP-count contract (`counted_op`): attention ops count the MACs of their math under
  torch.utils.flop_counter, whatever their implementation; torch only, importable from every layer;
- `viz`: attention figures (`viz`, `viz_1`) and per-head statistics;
- `timing`: params, MACs/FLOPs, throughput, latency, peak memory; interleaved timing for benches;
- `memory`: what autograd saves for backward (benches and tests);
- `report`: the results table over seeds and the cost plot;
- `study_report`: a study folder's table and figures.

May import: the foundation, `ops`, `models` and `data`. Never `train` or `tasks`. matplotlib is
imported inside the functions that draw, never at module level.
"""
