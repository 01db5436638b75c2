"""Data parallelism: int16 all-reduce of gradients (`collectives`) and exponent-sharing policies
(`data_parallel`), for `pmap` / `shard_map`."""
