"""Data for training: streaming sources (local json/jsonl/parquet/text, Hub datasets, the bundled corpus),
tokenization, packing with document ids and positions, weighted mixtures, DP sharding and exact per-rank resume.

The trainer uses `prepare_data` (checks before training) and `StreamingData` (a rank's batches and state);
`python -m data_pipelines.inspect` shows what a data config produces."""

from data_pipelines.packed import DataError
from data_pipelines.pipeline import (
    DataPlan,
    StreamingData,
    data_state_path,
    load_data_state,
    prepare_data,
    save_data_state,
)

__all__ = ["DataError", "DataPlan", "StreamingData", "data_state_path", "load_data_state", "prepare_data",
           "save_data_state"]
