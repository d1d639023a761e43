"""Ray-free operators of the mmrerank pipeline: readers, embedders, search, rerankers, training loops."""

from operators.worker_logs import mark_worker_logs

mark_worker_logs()  # only in Ray workers started by a quiet CLI (MMR_MARK_WORKER_LOGS=1)
