"""The admin plane: a FastAPI app on its own port, in the data plane's process and loop."""
