"""Data quality: the gates between stages and the instruction statistics.

- columns.py: helper columns computed with pyarrow (list lengths, membership, bands);
- rules.py: a Rule (one GX expectation, described without importing GX), common rule builders
  and the configured gates of `gates:`;
- suites.py: the four suites (ingest, mining per encoder, pairs, triplets) and what each checks;
- gx.py: the Great Expectations context, checkpoints and Data Docs;
- gates.py: `validate_stage`, the entry point the pipeline runner calls for a stage's gate;
- instruction_stats.py: diversity and repetition figures of the instruction lists (DuckDB).
"""
