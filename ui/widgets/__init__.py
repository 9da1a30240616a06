"""Reusable widgets of SnapGen Studio."""
