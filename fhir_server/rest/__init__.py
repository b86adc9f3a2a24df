"""HTTP adapters: thin FastAPI routers over the transport-free interactions."""
