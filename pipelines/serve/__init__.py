"""``mmrerank serve``: the Ray Serve app over the published run.

* :mod:`pipelines.serve.app`: the HTTP ingress (routes, request limits, errors) and how it starts.
* :mod:`pipelines.serve.store`: the published run's results in memory, and its hot reload's loader.
* :mod:`pipelines.serve.live`: the live path (search + rerank of unseen queries) through the batch job's own
  operators, in the model deployment.

``pipelines.serve:app_from_env`` is the application builder RayService and ``serve run`` import.
"""

from pipelines.serve.app import ServeSettings, app_from_env, build_app, start
from pipelines.serve.store import ResultsStore, load_store

__all__ = ["ResultsStore", "ServeSettings", "app_from_env", "build_app", "load_store", "start"]
