"""Workload layer: bundled request traces, a user's own files, arrival processes and the workload builder.

Typical use::

    from data import WorkloadConfig, build_workload
    reqs = build_workload(WorkloadConfig(dataset="sharegpt", num_requests=2000, qps=20, seed=0))

See data/README.md for the origin and licences of the bundled files.
"""

from .arrivals import ARRIVALS, arrival_times, interarrival_gaps, tile_timestamps, trace_arrivals
from .datasets import (
    DATA_DIR,
    DATASETS,
    Columns,
    cache_dir,
    dataset_files,
    detect_format,
    filter_requests,
    list_datasets,
    load_columns,
    load_dataset,
)
from .workload import (WorkloadConfig, WorkloadError, build_workload, build_workload_columns, build_workload_frame,
                       workload_to_frame)

__all__ = [
    "ARRIVALS", "Columns", "DATASETS", "DATA_DIR", "WorkloadConfig", "WorkloadError", "arrival_times",
    "build_workload", "build_workload_columns", "build_workload_frame", "cache_dir", "dataset_files", "detect_format",
    "filter_requests", "interarrival_gaps", "list_datasets", "load_columns", "load_dataset", "tile_timestamps",
    "trace_arrivals", "workload_to_frame",
]
