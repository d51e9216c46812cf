"""The HTTP layer (FastAPI): the only package that imports FastAPI or Starlette."""
