"""Parallelism applied to the plain model: process groups, tensor-parallel layers, pipeline stages."""
