"""Forget/retain data: validated records (MCQ, QA, text) from JSONL, CSV or Parquet, and the demo world."""
