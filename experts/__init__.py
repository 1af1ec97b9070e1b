"""Routed-expert math: the expert FFN and grouped compute over a shard of stacked weights."""
