"""The public scoring API's models (:mod:`~service.api.schema`: requests, responses, errors) and the one builder of
its error answers (:mod:`~service.api.errors`) — shared by the model service, the router and the webhook.

Must not: import anything of fraudwatch but :mod:`service.common` (pydantic and starlette otherwise): both sides
depend on it.
"""
