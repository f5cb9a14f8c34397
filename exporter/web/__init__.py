"""The HTTP output: the server, the routes (/metrics, /status, /api/v1/...), TLS, authentication
and the live --web.config.file."""
