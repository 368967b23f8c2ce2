"""The HTTP boundary: dependencies, routes and the ASGI middleware they need."""
