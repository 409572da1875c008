"""Experiment, not the operator: ``python -m finetune_operator`` with the connection fix applied at
run time, as ``bench.operator_scale`` measured it before it landed in the operator's code
(``finetune_operator.k8s`` now does both parts itself; kept to reproduce the experiments table).

The problem: ``finetune_operator.k8s.Kube`` sends creates, status writes and events with
``_preload_content=False`` and never reads those responses, so urllib3 never hands their
connections back to its pool and nearly every write opens a new TLS connection to the API server
(py-spy at N = 100: about half of the operator's CPU in TLS handshakes). The fix, in two parts:

- read every response body (done here for all calls of the Kubernetes client), which returns the
  connection to the pool; the operator's client never streams (kopf watches through aiohttp), so
  reading eagerly changes nothing else;
- size the pool for the worker threads (``FTJ_MAX_WORKERS`` + 4; the client's default is 5 per
  core), or connections beyond the pool are closed after one use.

    python -m bench.operator_patched --namespace NS --standalone   # same arguments as the operator
"""

from __future__ import annotations

import sys
from typing import Any

from kubernetes.client import Configuration
from kubernetes.client.api_client import ApiClient

from finetune_operator import settings
from finetune_operator.__main__ import main

_call_api = ApiClient.call_api
_configuration_init = Configuration.__init__


def _call_api_and_read(self: ApiClient, *args: Any, **kwargs: Any) -> Any:
    response = _call_api(self, *args, **kwargs)
    _ = response.response.data  # read and cache the body: urllib3 releases the connection
    return response


def _configuration_with_pool(self: Configuration, *args: Any, **kwargs: Any) -> None:
    _configuration_init(self, *args, **kwargs)
    self.connection_pool_maxsize = max(self.connection_pool_maxsize, settings.from_env().max_workers + 4)


if __name__ == "__main__":
    ApiClient.call_api = _call_api_and_read  # type: ignore[method-assign]
    Configuration.__init__ = _configuration_with_pool  # type: ignore[method-assign]
    sys.exit(main())
