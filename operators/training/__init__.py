"""Fine-tuning the retriever and the rerankers: training data from qrels and a run's candidates, and the
Ray Train per-worker loops (``clip``: contrastive; ``vlm_yesno``: RagVL's yes/no instruction tuning).
The driver side (config, Ray Train trainer, output directory and model card) is :mod:`pipelines.train`.
"""
