"""The newllm server: OpenAI-compatible generation with persistent sessions (LitServe).

Start it with ``newllm serve`` (`server.cli`); `server.app.build_server` assembles the LitServer.
Modules: `settings` (run settings), `store` (session files and locks), `transcript` (what a
session consumed), `protocol` (request validation), `engine` (the inference worker),
`responses` (OpenAI response shapes), `http` (auth, limits, errors), `metrics` (Prometheus),
`app` (routes and assembly).
Nothing is imported here, so ``import server.cli`` stays light until a server is started.
"""
