"""Data: the shapes world, LAION-format shards, Ray Data readers and preprocessing."""
