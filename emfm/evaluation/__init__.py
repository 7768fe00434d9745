"""Scoring segmentations against ground truth: semantic, instance-agreement and instance-matching metrics."""
