"""Reranker backends, one module each; importing this package registers them all."""

from operators.rerankers import blip_itm, clip, cross_encoder, vlm_yesno  # noqa: F401
from operators.rerankers.base import REGISTRY, Reranker, RerankerSpec, backends, create, register

__all__ = ["REGISTRY", "Reranker", "RerankerSpec", "backends", "create", "register"]
