"""The HTTP query API (`memvq serve`): `app` (routes, lifetime), `schema` (wire models, JSON errors), `settings`
(ServeSettings), `guards`, `batcher`, `metrics`, `watch`, `runner` (uvicorn), `openai_api`, `page`, `replicas` (Ray
Serve)."""
