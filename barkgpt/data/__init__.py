"""Data: the bark conversation generator and token shards."""
