"""MegaPairs synthesis pipeline: every stage as a plain function over Parquet/array files.

Airflow DAGs and the `megapairs` CLI both call the stage functions in `megapairs_ops.pipeline`.
Heavy libraries (torch, faiss, transformers, great_expectations) are imported inside the
functions that need them so that importing this package, and parsing DAGs, stays fast.
"""

__version__ = "0.1.0"
