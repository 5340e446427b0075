"""The public scoring API's models (:mod:`~service.api.schema`): requests, responses, errors — shared by the model
service and the router.

Must not: import anything of fraudwatch but :mod:`service.common` (pydantic otherwise): both sides depend on it.
"""
