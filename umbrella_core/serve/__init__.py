"""``umbrella serve``: a checkpoint behind a web page and an OpenAI-compatible API.

The command is :mod:`umbrella_core.serve.command`'s (a built-in plugin); the
server, :mod:`umbrella_core.serve.server`'s.

(Since 0.3.)
"""
