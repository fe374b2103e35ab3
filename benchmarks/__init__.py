"""Speed and accuracy benchmarks; each ends with one `RESULT name=value ...` line."""
