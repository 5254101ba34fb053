"""The boto3-compatible Invoke HTTP API (spec §5, §7), importable from one place.

`InvokeApi` (in `http_routes`) turns one parsed HTTP request into one `HttpResponse`: it parses
requests, formats responses, holds no state and knows nothing about sockets. `InvokeApiServer`
(in `http_server`) is the standard-library HTTP/1.1 server around it. Everything that decides what
an invocation does lives behind the `InvokeBackend` protocol. This module re-exports the public
names of both; the server imports the routes, so neither may import this module.
"""

from __future__ import annotations

import logging

from lambda_runtime.http_routes import FUNCTION_REF_MAX_CHARS as FUNCTION_REF_MAX_CHARS
from lambda_runtime.http_routes import INVOCATION_TYPES as INVOCATION_TYPES
from lambda_runtime.http_routes import LIST_PAGE_DEFAULT as LIST_PAGE_DEFAULT
from lambda_runtime.http_routes import LIST_PAGE_MAX as LIST_PAGE_MAX
from lambda_runtime.http_routes import LOG_TYPES as LOG_TYPES
from lambda_runtime.http_routes import QUALIFIER_MAX_CHARS as QUALIFIER_MAX_CHARS
from lambda_runtime.http_routes import HttpResponse as HttpResponse
from lambda_runtime.http_routes import InvokeApi as InvokeApi
from lambda_runtime.http_routes import InvokeBackend as InvokeBackend
from lambda_runtime.http_routes import UnknownOperationException as UnknownOperationException
from lambda_runtime.http_routes import error_response as error_response
from lambda_runtime.http_routes import function_configuration as function_configuration
from lambda_runtime.http_routes import parse_function_name as parse_function_name
from lambda_runtime.http_server import BODY_READ_LIMIT_BYTES as BODY_READ_LIMIT_BYTES
from lambda_runtime.http_server import KEEPALIVE_IDLE_S as KEEPALIVE_IDLE_S
from lambda_runtime.http_server import InvokeApiServer as InvokeApiServer

# The logger both modules write to (they name it; getLogger returns this same object).
logger = logging.getLogger(__name__)
