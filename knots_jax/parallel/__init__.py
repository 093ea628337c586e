"""Meshes, every PartitionSpec, array placement and multi-host start (`sharding`)."""

__all__ = ["sharding"]
