"""Sources (candidate Parquet) and sinks (ranked Parquet, rejected rows, manifest)."""
