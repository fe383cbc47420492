"""``omniframe serve``: any pipeline behind the OpenAI Realtime API (GA shape, WebSocket).

* :mod:`omniframe.serve.protocol`: client events in (parsed leniently, checked), server
  events out (built strictly, GA names only), the session's effective configuration;
* :mod:`omniframe.serve.bridge`: one pipeline per WebSocket session, fed by a live source
  stage and drained by a sink stage that turns frames into server events;
* :mod:`omniframe.serve.app`: the Starlette app (``/v1/realtime``), auth, limits, uvicorn;
* :mod:`omniframe.serve.contract`: checks a stream of server events against the openai SDK's
  own types and the response lifecycle (tests, and ``--check-events``).

Nothing here is imported by ``import omniframe``; starlette and uvicorn are imported only by
the app (the ``serve`` extra).
"""
