"""The manager's REST API and live dashboard (HTTPS, bearer tokens): vmha.api.server."""
