"""The pipeline's SQL, one statement file per computation, shipped as the package
megapairs_ops.sql (pyproject.toml maps this folder). Read them with megapairs_ops.db.sql(name)."""
