"""How the Triton models report errors, as the gateway reads them.

Triton's gRPC stream API passes an error's message but not its code, so every model error message
starts with the code's name: `INVALID_ARGUMENT: ...` for a problem with the request (the caller
can fix it), `INTERNAL: ...` for anything else.
"""

CALLER_ERROR_PREFIX = "INVALID_ARGUMENT: "
INTERNAL_ERROR_PREFIX = "INTERNAL: "
