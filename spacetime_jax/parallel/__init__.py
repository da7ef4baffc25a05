"""Devices and shardings: the mesh, the sharding rules, multi-host start-up."""
